"""Framework backends of the mLSTM: ``backends.torch``, ``backends.jax`` (with Flax's linen and nnx layers in
``backends.flax`` and ``backends.flax_nnx``), ``backends.tensorflow``.

Importing this package imports no framework. :data:`BACKENDS` is the one list of backends: the
conformance runner, its report's install hint and the tests read it, so adding a backend is one entry
here plus its module (docs/architecture.md). Each backend module has the same shape, built on
``backends._common``:

- ``MLSTMCell`` and ``MLSTM``, idiomatic layers of the framework, with ``from_canonical`` /
  ``to_canonical`` to move weights through :mod:`mlstm_spec`'s canonical parameter mappings;
- ``devices()``: the devices the framework sees, e.g. ``["cpu", "cuda:0"]``; ``describe_device(device)``:
  a human name for one (the GPU model); ``versions()``: what a report should name;
- ``ConformanceAdapter(device)``: the one adapter through which the conformance suite checks it.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Backend:
    """One backend: the module ``backends.<name>``, the framework module it needs, and the pip extra
    of this project that installs that framework."""

    name: str
    framework: str
    extra: str

    @property
    def install_hint(self) -> str:
        return f"pip install 'mlstm-spec[{self.extra}]'"

    def missing_reason(self) -> str | None:
        """Why this backend cannot be used here (its framework is not installed), or None if it can."""
        if importlib.util.find_spec(self.framework) is None:
            return f"{self.framework} is not installed ({self.install_hint})"
        return None

    def load(self):
        """Import ``backends.<name>``; ImportError with the reason when its framework is missing."""
        reason = self.missing_reason()
        if reason:
            raise ImportError(reason)
        return importlib.import_module(f"{__name__}.{self.name}")

    def devices(self) -> list[str]:
        return list(self.load().devices())

    def describe_device(self, device: str) -> str:
        return self.load().describe_device(device)

    def versions(self) -> dict:
        return dict(self.load().versions())


#: Every backend, by name, in the order reports list them.
BACKENDS = {backend.name: backend for backend in (
    Backend("torch", framework="torch", extra="torch"),
    Backend("jax", framework="jax", extra="jax"),
    Backend("flax", framework="flax", extra="flax"),  # linen
    Backend("flax_nnx", framework="flax", extra="flax"),
    Backend("tensorflow", framework="tensorflow", extra="tensorflow"),
)}

#: backend name -> the framework module it needs
FRAMEWORKS = {name: backend.framework for name, backend in BACKENDS.items()}


def get(backend: str) -> Backend:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    return BACKENDS[backend]


def missing_reason(backend: str) -> str | None:
    """Why ``backend`` cannot be used here (its framework is not installed), or None if it can."""
    return get(backend).missing_reason()


def load(backend: str):
    """Import ``backends.<backend>``; raises ImportError with the reason when its framework is missing."""
    return get(backend).load()
