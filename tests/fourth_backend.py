"""A throwaway fourth backend, written against the skeleton of ``backends._common`` the way
docs/architecture.md describes: NumPy in disguise (its "framework" is NumPy, its kernels are the spec's
own ``forward`` and ``backward``). It exists to show, and to test, that a backend is this small: the
contract tests and the conformance suite run on it through the same adapter base as on the real ones.
"""

from __future__ import annotations

import numpy as np

import mlstm_spec
from backends._common import (
    DTYPES,
    AdapterBase,
    InputChecks,
    as_numpy,
    canonical_import,
    cast_numpy,
    check_layer_options,
    init_layers,
    work_dtype,
)
from mlstm_spec.validation import check_integration_mode

CHECKS = InputChecks(is_array=lambda v: isinstance(v, np.ndarray), array_name="a numpy.ndarray")


def _has_ml_dtypes() -> bool:
    try:
        import ml_dtypes  # noqa: F401
    except ImportError:
        return False
    return True


def devices() -> list[str]:
    return ["cpu"]


def describe_device(device: str) -> str:
    return device


def versions() -> dict:
    return {"numpy": np.__version__}


class MLSTM:
    """A stack of layers: ``MLSTM(input_size, hidden_size, num_layers=1, *, <mLSTM options>, rng=None,
    dtype="float32")``, called as ``model(xs, state=None) -> hs, (h_n, c_n)`` with ``xs`` (B, T, I) or
    (T, I) and states (L, [B,] H), like the JAX module."""

    def __init__(self, input_size, hidden_size, num_layers=1, *, integration_mode="addition", rng=None,
                 dtype="float32", **flags):
        check_layer_options(input_size, hidden_size, num_layers=num_layers, integration_mode=integration_mode,
                            **flags)
        self.integration_mode = integration_mode
        self.layers = init_layers(input_size, hidden_size, num_layers=num_layers, rng=rng, dtype=dtype, **flags)

    @classmethod
    def from_canonical(cls, params, **options):
        layers, _, options = canonical_import(params, options)
        model = object.__new__(cls)
        model.integration_mode = options.get("integration_mode", "addition")
        check_integration_mode(model.integration_mode)
        model.layers = layers
        return model

    def to_canonical(self) -> list[dict]:
        return [{name: as_numpy(value) for name, value in layer.items()} for layer in self.layers]

    def _checked(self, xs, state):
        infos = CHECKS.stack(self.layers)
        batched = CHECKS.sequence(xs, infos[0])
        if state is not None:
            CHECKS.state(state, (len(self.layers),) + (xs.shape[:1] if batched else ()), infos[0])
        return infos[0].dtype

    def __call__(self, xs, state=None):
        dtype = self._checked(xs, state)
        return self._run(xs, state, dtype)[0]

    def _run(self, xs, state, dtype):
        """The stack in the work dtype: (hs, (h_n, c_n)) rounded to ``dtype``, and each layer's inputs."""
        work = work_dtype(dtype)
        inputs = [xs.astype(work)]
        finals = []
        for k, layer in enumerate(self.layers):
            params = {name: value.astype(work) for name, value in layer.items()}
            start = None if state is None else (state[0][k].astype(work), state[1][k].astype(work))
            hs, final = mlstm_spec.forward(params, inputs[-1], start, integration_mode=self.integration_mode)
            inputs.append(hs)
            finals.append(final)
        h_n, c_n = (np.stack([final[i] for final in finals]) for i in (0, 1))
        return (cast_numpy(inputs[-1], dtype), (cast_numpy(h_n, dtype), cast_numpy(c_n, dtype))), inputs

    def vjp(self, xs, state, d_hs, d_state):
        """The gradients of ``sum(hs * d_hs) + sum(h_n * d_state[0]) + sum(c_n * d_state[1])``:
        (per-layer parameter gradients, d_xs, d_h0, d_c0), each rounded to the parameters' dtype."""
        dtype = self._checked(xs, state)
        work = work_dtype(dtype)
        _, inputs = self._run(xs, state, dtype)
        grads, d_h0, d_c0 = [None] * len(self.layers), [None] * len(self.layers), [None] * len(self.layers)
        d_out = d_hs.astype(work)
        for k in reversed(range(len(self.layers))):
            params = {name: value.astype(work) for name, value in self.layers[k].items()}
            start = (state[0][k].astype(work), state[1][k].astype(work))
            g = mlstm_spec.backward(params, inputs[k], start, d_out, (d_state[0][k].astype(work),
                                    d_state[1][k].astype(work)), integration_mode=self.integration_mode)
            d_out, d_h0[k], d_c0[k] = g.pop("x"), g.pop("h0"), g.pop("c0")
            grads[k] = {name: cast_numpy(value, dtype) for name, value in g.items()}
        return grads, cast_numpy(d_out, dtype), cast_numpy(np.stack(d_h0), dtype), cast_numpy(np.stack(d_c0), dtype)


class ConformanceAdapter(AdapterBase):
    """Three hooks: build through the public ``from_canonical``, run, and pull back."""

    name = "numpy-in-disguise"
    dtypes = tuple(d for d in DTYPES if d != "bfloat16" or _has_ml_dtypes())

    def build(self, layers, integration_mode):
        return MLSTM.from_canonical(layers, integration_mode=integration_mode)

    def run(self, model, xs, state):
        hs, (h_n, c_n) = model(xs, state)
        return hs, h_n, c_n

    def pullback(self, model, xs, state, d_hs, d_state):
        return model.vjp(xs, state, d_hs, d_state)

