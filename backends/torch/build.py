"""Building the C++ time loops (``cpu_loops.cpp``, with the cell's one-step kernel ``cpu_step.cpp``) on
first use, and loading them.

The extension is compiled by ``torch.utils.cpp_extension`` in a child process, whose environment (not
this process's) gets the ``ninja`` of the ``ninja`` pip package on its ``PATH``. It lands in a directory
named after a hash of the source, the compiler flags and the torch and Python versions, under
``TORCH_EXTENSIONS_DIR`` (torch's default build root otherwise): a later process finds it there and only
imports it, and a changed source is never served from a stale build.

First use says on stderr that it is compiling (and, after, how long it took). Builds are serialised by a
lock file in the build directory holding the builder's process id, host and start time: a lock whose
process is gone (a build killed half-way) or that is older than a build may take is stale, reported once
and replaced (torch's own lock file, left by the killed build, is cleared with it); a live builder is
waited for at most :data:`LOCK_WAIT_S`, after which this process runs the Python loops. To build ahead
of time (e.g. in a Docker image): ``python -m backends.torch``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

#: Set to "python" to keep the fused layer's time loops in Python on CPU (they are compiled otherwise).
CPU_LOOPS_VARIABLE = "MLSTM_TORCH_CPU_LOOPS"
SOURCE = Path(__file__).with_name("cpu_loops.cpp")
#: Every source of the extension: the loops, and the one-step kernel of the cell (its ``cell_step``).
SOURCES = (SOURCE, Path(__file__).with_name("cpu_step.cpp"))
#: Headers the sources include: hashed with them (see build_name), not compiled on their own.
HEADERS = (Path(__file__).with_name("mkl_routines.h"),)
#: torch.backends.cpu.get_cpu_capability() -> compiler flags for ATen's vector types at that level
CAPABILITY_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw",
               "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT"],
}
BUILD_TIMEOUT_S = 600
#: The lock file (in the build directory) that serialises builds of one extension.
LOCK_NAME = "mlstm_build.lock"
#: How long to wait for another live process's build before running the Python loops instead.
LOCK_WAIT_S = 300.0

_state: dict = {}  # filled once: "module" (or None) and "reason" (what was built, or why not)
_lock = threading.Lock()


def cpu_loops() -> ModuleType | None:
    """The compiled module (functions ``layer_forward``, ``layer_backward``, ``variant_layer_forward``,
    ``variant_layer_backward`` and ``cell_step``), or None where it cannot
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
    flags = _flags(capability)
    name = build_name()
    from torch.utils import cpp_extension

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
    directory = root / name
    library = directory / f"{name}.so"
    try:
        if not library.exists():
            _build_locked(name, flags, directory, library)
        spec = importlib.util.spec_from_file_location(name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except BuildBusy as busy:
        return {"module": None, "warn": True, "reason": str(busy)}
    except Exception as error:  # noqa: BLE001 - any build failure means: use the Python loops
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return {"module": None, "warn": True,
                "reason": f"could not compile {SOURCE.name} ({type(error).__name__}: {first_line[:300]})"}
    threads = openmp()[1] if "-fopenmp" in flags else f"without OpenMP: {openmp()[1]}"
    return {"module": module, "warn": False, "reason": f"compiled {SOURCE.name} for {capability}, {threads}"}


def _flags(capability: str) -> list:
    return ["-O3", *CAPABILITY_FLAGS.get(capability, CAPABILITY_FLAGS["DEFAULT"]), *openmp()[0]]


#: File names of OpenMP runtimes, as they appear among a process's mapped files.
OPENMP_RUNTIMES = ("libgomp", "libiomp", "libomp")


def openmp_runtimes_loaded() -> list[str]:
    """The OpenMP runtime libraries mapped into this process (Linux; empty elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    files = {line.split()[-1] for line in maps.splitlines() if "/" in line}
    return sorted(path for path in files if Path(path).name.startswith(OPENMP_RUNTIMES))


@functools.lru_cache(maxsize=None)
def openmp() -> tuple[tuple, str]:
    """(compiler flags, why): ``-fopenmp`` where the extension can join torch's own OpenMP runtime.

    Compiled without it, ATen's ``at::parallel_for`` runs its whole range on the calling thread, so the
    loops' element-wise passes (``over_rows``) ran on one thread. With it they share the threads torch
    and MKL use, which is safe only if the extension loads the very runtime torch loaded: GCC links
    ``libgomp.so.1``, and the dynamic loader hands an already-loaded library of that name to the
    extension instead of loading a second one. So the flag is given only with GCC, on Linux, when the
    runtime torch loaded is a file of exactly that name (a wheel that renamed it, Intel's or LLVM's
    runtime, or another compiler would bring a second runtime, whose threads would compete with
    torch's: the loops then stay without OpenMP, as they were).
    """
    if not sys.platform.startswith("linux"):
        return (), "not Linux"
    if not torch.backends.openmp.is_available():
        return (), "torch is built without OpenMP"
    runtimes = openmp_runtimes_loaded()
    names = [Path(path).name for path in runtimes]
    if len(names) != 1 or not (names[0] == "libgomp.so.1" or names[0].startswith("libgomp.so.1.")):
        return (), f"torch's OpenMP runtime is not GCC's libgomp.so.1 alone ({runtimes or 'none found'})"
    compiler = os.environ.get("CXX", "c++")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return (), f"could not ask {compiler} its version"
    if "Free Software Foundation" not in version:
        return (), f"{compiler} is not GCC"
    return ("-fopenmp",), "with OpenMP (torch's libgomp)"


def build_name() -> str:
    """The extension's name (and build directory): a hash of the source, flags and versions."""
    capability = torch.backends.cpu.get_cpu_capability()
    key = hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES + HEADERS) + repr((_flags(capability), torch.__version__, sys.version)).encode())
    return f"mlstm_cpu_loops_{capability.lower()}_{key.hexdigest()[:12]}"


class BuildBusy(RuntimeError):
    """Another live process holds the build lock for longer than this process waits."""


def _say(message: str) -> None:
    print(f"backends.torch: {message}", file=sys.stderr, flush=True)


def _lock_holder(lock: Path) -> tuple[int, str, float] | None:
    """(pid, host, start time) written in a lock file, or None if it cannot be read (being written)."""
    try:
        pid, host, started = lock.read_text().split()
        return int(pid), host, float(started)
    except (OSError, ValueError):
        return None


def _stale_reason(lock: Path) -> str | None:
    """Why the lock is stale (its builder is gone or overdue), or None while it may be working."""
    holder = _lock_holder(lock)
    if holder is None:
        try:  # a lock file never completed: stale once it is older than writing three numbers takes
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return None
        return f"unreadable lock {age:.0f} s old" if age > 10 else None
    pid, host, started = holder
    age = time.time() - started
    if age > BUILD_TIMEOUT_S + 60:
        return f"pid {pid} on {host} started {age:.0f} s ago, longer than a build may take"
    if host == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"pid {pid} is dead (a build killed half-way)"
        except PermissionError:
            pass
    return None


def _build_locked(name: str, flags: list, directory: Path, library: Path) -> None:
    """Compile under the build lock, unless another process's build finishes first."""
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / LOCK_NAME
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            stale = _stale_reason(lock)
            if stale is not None:
                _say(f"found a stale build lock in {directory} ({stale}); removing it and building again")
                lock.unlink(missing_ok=True)
                continue
            if library.exists():
                return
            if time.monotonic() > deadline:
                holder = _lock_holder(lock)
                who = f"pid {holder[0]}" if holder else "unknown pid"
                raise BuildBusy(f"another process ({who}) has been building {name} in {directory} for more "
                                f"than {LOCK_WAIT_S:.0f} s; gave up waiting (delete {lock} if no build runs)")
            time.sleep(0.2)
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(f"{os.getpid()} {socket.gethostname()} {time.time():.3f}\n")
        break
    try:
        if library.exists():  # built by the lock's previous holder
            return
        # torch's own lock (a FileBaton) left by a killed build would make its build wait forever; we
        # hold the build lock, so no other build is using it
        (directory / "lock").unlink(missing_ok=True)
        _say(f"compiling the C++ CPU loops ({SOURCE.name}) once for this machine and torch version; this "
             f"takes about 20-60 s (set {CPU_LOOPS_VARIABLE}=python to skip, or build ahead of time with "
             "`python -m backends.torch`)")
        started = time.monotonic()
        # Built in a directory of its own and moved into place whole: another process that finds the
        # library (it checks that the file exists, without the lock) must never load a half-linked one.
        staging = directory.with_name(f"{directory.name}.building-{os.getpid()}")
        try:
            _compile(name, flags, staging)
            os.replace(staging / library.name, library)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _say(f"compiled the C++ CPU loops in {time.monotonic() - started:.0f} s into {directory}")
    finally:
        lock.unlink(missing_ok=True)


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
        "import os\n"
        "name, sources, directory, *flags = sys.argv[1:]\n"
        "cpp_extension.load(name=name, sources=sources.split(os.pathsep), extra_cflags=flags,\n"
        "                   extra_ldflags=['-fopenmp'] if '-fopenmp' in flags else [],\n"
        "                   build_directory=directory,\n"
        "                   is_python_module=True, verbose=False)\n"
    )
    sources = os.pathsep.join(str(source) for source in SOURCES)
    done = subprocess.run([sys.executable, "-c", script, name, sources, str(directory), *flags], env=env,
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(build_error(done.stderr, done.returncode))


def build_error(stderr: str, returncode: int) -> str:
    """The line of a failed build's output that says why: the compiler's first error (``file:line:col:
    error: ...``, the driver's ``c++: error: ...`` or a bare ``error: ...``), else the exception that
    ended the build, else the last line printed, else the exit status. (torch's build prints the
    traceback of its ninja call first, whose lines also contain "error", so the first such line says
    nothing.)"""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("error:", "fatal error:")) or ": error:" in line or ": fatal error:" in line:
            return line
    exceptions = [line for line in lines if ":" in line and line.split(":")[0].endswith(("Error", "Exception"))]
    if exceptions:
        return exceptions[-1]
    return lines[-1] if lines else f"the build exited with status {returncode}"
