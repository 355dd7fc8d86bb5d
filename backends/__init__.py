"""Framework backends of the mLSTM: ``backends.torch``, ``backends.jax``, ``backends.tensorflow``.

Importing this package imports no framework. Each backend module has the same shape:

- ``MLSTMCell`` and ``MLSTM``, idiomatic layers of the framework, with ``from_canonical`` /
  ``to_canonical`` to move weights through :mod:`mlstm_spec`'s canonical parameter mappings;
- ``devices()``: the devices the framework sees, e.g. ``["cpu", "cuda:0"]``;
- ``ConformanceAdapter(device)``: the one adapter through which the conformance suite checks it.
"""

from __future__ import annotations

import importlib
import importlib.util

#: backend module name -> the framework module it needs
FRAMEWORKS = {"torch": "torch", "jax": "jax", "tensorflow": "tensorflow"}


def missing_reason(backend: str) -> str | None:
    """Why ``backend`` cannot be used here (its framework is not installed), or None if it can."""
    if backend not in FRAMEWORKS:
        raise ValueError(f"backend must be one of {sorted(FRAMEWORKS)}, got {backend!r}")
    framework = FRAMEWORKS[backend]
    if importlib.util.find_spec(framework) is None:
        return f"{framework} is not installed (pip install 'mlstm-spec[{backend}]')"
    return None


def load(backend: str):
    """Import ``backends.<backend>``; raises ImportError with the reason when its framework is missing."""
    reason = missing_reason(backend)
    if reason:
        raise ImportError(reason)
    return importlib.import_module(f"{__name__}.{backend}")
