"""What the benchmark scripts share: describing the machine, parsing sizes, the table of medians."""

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


def ratio_table(results: dict, names, base: str, decimals: int = 1) -> str:
    """Markdown: per size and implementation, the median forward and forward+backward times (ms, with
    ``decimals`` places) and their ratios to ``base``'s. ``results[size][(name, mode)]`` is in ms."""
    lines = [
        "| size (B, T, I, H) | implementation | forward ms | forward+backward ms | "
        f"forward: time / {base}'s | forward+backward: time / {base}'s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for size, medians in results.items():
        base_f, base_b = medians[(base, "forward")], medians[(base, "forward+backward")]
        for name in names:
            f, b = medians[(name, "forward")], medians[(name, "forward+backward")]
            lines.append(f"| {size} | {name} | {f:.{decimals}f} | {b:.{decimals}f} | {f / base_f:.2f} | "
                         f"{b / base_b:.2f} |")
    return "\n".join(lines)
