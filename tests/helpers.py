"""Helpers shared by the backend test modules (importable as ``helpers`` from tests)."""

from __future__ import annotations

import os

import numpy as np
import pytest

import backends
import mlstm_spec


def requested_backends() -> set[str]:
    """Frameworks that must be present: ``MLSTM_BACKENDS``, or all of them in CI (which installs all)."""
    value = os.environ.get("MLSTM_BACKENDS")
    if value is None:
        return set(backends.BACKENDS) if os.environ.get("CI") else set()
    return {name.strip() for name in value.split(",") if name.strip()}


def require_backend(name: str):
    """Import ``backends.<name>``; skip the module with the reason if its framework is missing,
    or fail if ``MLSTM_BACKENDS`` asked for it."""
    reason = backends.missing_reason(name)
    if reason is None:
        return backends.load(name)
    if name in requested_backends():
        pytest.fail(f"MLSTM_BACKENDS requests {name}, but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def compiled_torch_loops():
    """The torch backend's compiled C++ loops (``backends.torch.build.cpu_loops()``); a skip, with the
    reason, where they cannot be built here."""
    torch_backend = require_backend("torch")
    built, reason = torch_backend.compiled_cpu_loops()
    if not built:
        pytest.skip(f"the C++ loops are not built here: {reason}")
    from backends.torch import build

    return build.cpu_loops()


def gpu_required() -> bool:
    return os.environ.get("MLSTM_REQUIRE_GPU", "") not in ("", "0")


def device_params(backend_module) -> list:
    """``pytest.param(device)`` for CPU and the GPU: a missing GPU is a skip with its reason (or an
    error when MLSTM_REQUIRE_GPU is set), never a silent pass."""
    devices = backend_module.devices()
    params = [pytest.param("cpu", id="cpu")]
    gpus = [d for d in devices if d != "cpu"]
    if gpus:
        params += [pytest.param(d, id=d.replace(":", ""), marks=pytest.mark.gpu) for d in gpus]
    else:
        name = backend_module.__name__.split(".")[-1]
        reason = f"no GPU visible to {name} on this machine"
        marks = [pytest.mark.gpu] + ([] if gpu_required() else [pytest.mark.skip(reason=reason)])
        params.append(pytest.param("gpu-missing", id="gpu", marks=marks))
    return params


def conformance_params(backend_module) -> list:
    """``(device, dtype)`` pairs to run the conformance suite on, with GPU skips as above."""
    out = []
    for p in device_params(backend_module):
        device = p.values[0]
        if device == "gpu-missing":
            out.append(pytest.param(device, "any", id="gpu", marks=p.marks))
            continue
        for dtype in backend_module.ConformanceAdapter(device).dtypes:
            out.append(pytest.param(device, dtype, id=f"{p.id}-{dtype}", marks=p.marks))
    return out


def assert_gpu_present(device: str) -> None:
    if device == "gpu-missing":
        pytest.fail("MLSTM_REQUIRE_GPU is set, but no GPU is visible", pytrace=False)


def run_conformance(adapter_factory, device: str, dtype: str, **check_options) -> None:
    """Run the shared suite for one backend, device and dtype; print each check's worst error
    (visible with ``-rP``) and fail with the smallest failing example."""
    from mlstm_spec.conformance import check

    assert_gpu_present(device)
    results = check(adapter_factory(device), dtype, raise_on_failure=True, **check_options)
    for result in results:
        print(f"{result.device} {result.dtype} {result.check}: worst {result.worst_error:.2e} "
              f"<= {result.tolerance:.0e} at {result.worst_at}")
        assert result.status == "pass", result.message


def random_params(rng, input_size, hidden_size, dtype="float64", scale=1.0, **options):
    """Canonical NumPy parameters with random values everywhere (biases included): uniform in
    [-scale, scale], drawn in float64 and rounded to ``dtype`` ("bfloat16": ``ml_dtypes.bfloat16``)."""
    shapes = mlstm_spec.init_params(input_size, hidden_size, rng=0, dtype=np.float64, **options)
    if dtype == "bfloat16":
        import ml_dtypes

        dtype = ml_dtypes.bfloat16
    return {k: (rng.uniform(-1, 1, v.shape) * scale).astype(dtype) for k, v in shapes.items()}


def jaxprs(jaxpr):
    """A jaxpr and every sub-jaxpr inside it (scan bodies, jit calls), depth first."""
    yield jaxpr
    for eqn in jaxpr.eqns:
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from jaxprs(inner)
