"""Building the C++ time loops (``cpu_loops.cpp``) on first use, and loading them.

The extension is compiled by ``torch.utils.cpp_extension`` in a child process, whose environment (not
this process's) gets the ``ninja`` of the ``ninja`` pip package on its ``PATH``. It lands in a directory
named after a hash of the source, the compiler flags and the torch and Python versions, under
``TORCH_EXTENSIONS_DIR`` (torch's default build root otherwise): a later process finds it there and only
imports it, and a changed source is never served from a stale build.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

#: Set to "python" to keep the fused layer's time loops in Python on CPU (they are compiled otherwise).
CPU_LOOPS_VARIABLE = "MLSTM_TORCH_CPU_LOOPS"
SOURCE = Path(__file__).with_name("cpu_loops.cpp")
#: torch.backends.cpu.get_cpu_capability() -> compiler flags for ATen's vector types at that level
CAPABILITY_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw",
               "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT"],
}
BUILD_TIMEOUT_S = 600

_state: dict = {}  # filled once: "module" (or None) and "reason" (what was built, or why not)
_lock = threading.Lock()


def cpu_loops() -> ModuleType | None:
    """The compiled module (functions ``layer_forward`` and ``layer_backward``), or None where it cannot
    be built; the first call builds it (about 20 s, once per machine, source and torch version)."""
    return _loaded()["module"]


def compiled_cpu_loops() -> tuple[bool, str]:
    """Whether the fused layer runs its time loops in compiled C++ on CPU, and what was built or why
    not. The first call compiles ``backends/torch/cpu_loops.cpp`` (see :func:`cpu_loops`). Where that
    cannot be done (no C++ compiler, or ``MLSTM_TORCH_CPU_LOOPS=python``), the same loops run in Python,
    which gives the same results more slowly; a warning says so once."""
    state = _loaded()
    return state["module"] is not None, state["reason"]


def _loaded() -> dict:
    if not _state:
        with _lock:
            if not _state:
                state = build()
                if state["module"] is None and state["warn"]:
                    warnings.warn(f"backends.torch: {state['reason']}; the fused layer runs its time loops "
                                  "in Python on CPU (same results, slower)", RuntimeWarning, stacklevel=4)
                _state.update(state)
    return _state


def build() -> dict:
    """Build (or find) and import the extension: ``{"module", "warn", "reason"}``."""
    choice = os.environ.get(CPU_LOOPS_VARIABLE, "compiled")
    if choice not in ("compiled", "python"):
        return {"module": None, "warn": True,
                "reason": f"{CPU_LOOPS_VARIABLE} must be 'compiled' or 'python', got {choice!r}"}
    if choice == "python":
        return {"module": None, "warn": False, "reason": f"{CPU_LOOPS_VARIABLE}=python"}
    capability = torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", *CAPABILITY_FLAGS.get(capability, CAPABILITY_FLAGS["DEFAULT"])]
    key = hashlib.sha256(SOURCE.read_bytes() + repr((flags, torch.__version__, sys.version)).encode())
    name = f"mlstm_cpu_loops_{capability.lower()}_{key.hexdigest()[:12]}"
    from torch.utils import cpp_extension

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
    directory = root / name
    library = directory / f"{name}.so"
    try:
        if not library.exists():
            _compile(name, flags, directory)
        spec = importlib.util.spec_from_file_location(name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - any build failure means: use the Python loops
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return {"module": None, "warn": True,
                "reason": f"could not compile {SOURCE.name} ({type(error).__name__}: {first_line[:300]})"}
    return {"module": module, "warn": False, "reason": f"compiled {SOURCE.name} for {capability}"}


def _compile(name: str, flags: list, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if shutil.which("ninja") is None:  # torch builds with ninja; the pip package puts one beside Python
        try:
            import ninja

            env["PATH"] = ninja.BIN_DIR + os.pathsep + env.get("PATH", "")
        except ImportError:
            pass
    script = (
        "import logging, sys\n"
        "logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)\n"  # "c++ is not g++"
        "from torch.utils import cpp_extension\n"
        "name, source, directory, *flags = sys.argv[1:]\n"
        "cpp_extension.load(name=name, sources=[source], extra_cflags=flags, build_directory=directory,\n"
        "                   is_python_module=True, verbose=False)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, name, str(SOURCE), str(directory), *flags], env=env,
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if "error" in line.lower()] or done.stderr.splitlines()
        raise RuntimeError(lines[0] if lines else f"the build exited with status {done.returncode}")
