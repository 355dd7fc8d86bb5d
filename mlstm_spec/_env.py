"""Environment variables that the frameworks read when they start, set by the project's check entry
points (the tests' ``conftest.py``, the conformance runner, ``benchmarks/gpu_check.py``) before any
framework is imported. Imports no framework.

Each variable is set only where the user has not set it, so ``XLA_PYTHON_CLIENT_PREALLOCATE=true``
(say) still wins.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

#: variable -> value, and why the checks want it.
FRAMEWORK_ENVIRONMENT = {
    # TensorFlow's C++ information and warning lines, printed at import and on first use.
    "TF_CPP_MIN_LOG_LEVEL": "2",
    # TensorFlow's oneDNN notice at import.
    "TF_ENABLE_ONEDNN_OPTS": "0",
    # JAX otherwise claims 75% of each GPU's memory when it first touches the GPU: two pytest-xdist
    # workers, or JAX beside torch in one process, would then run out of memory.
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    # TensorFlow otherwise claims nearly all of each GPU's memory when it creates its GPU devices (the
    # variable does what tf.config.experimental.set_memory_growth does, and needs no TensorFlow import).
    "TF_FORCE_GPU_ALLOW_GROWTH": "true",
}


def set_framework_environment(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set each of :data:`FRAMEWORK_ENVIRONMENT` in ``environ`` (default ``os.environ``) where it is
    unset; return the values now in effect. Call it before the first framework import: JAX and
    TensorFlow read these when they start their GPU (or C++ logging) machinery."""
    environ = os.environ if environ is None else environ
    for name, value in FRAMEWORK_ENVIRONMENT.items():
        environ.setdefault(name, value)
    return {name: environ[name] for name in FRAMEWORK_ENVIRONMENT}
