"""What the benchmark scripts share: describing the machine and parsing sizes."""

from __future__ import annotations

import argparse
import os
import platform

#: The two sizes (B, T, I, H) every issue measures.
SIZES = ((32, 128, 64, 256), (64, 100, 512, 512))


def machine() -> str:
    """CPU model, logical CPU count and OS, for the report header."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def parse_size(text: str) -> tuple:
    """argparse type for ``B,T,I,H``."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"a size is B,T,I,H (four positive integers), got {text!r}")
    return values
