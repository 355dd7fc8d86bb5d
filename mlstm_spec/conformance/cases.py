"""What the suite draws: a :class:`Case` (shapes, options, seed) and the arrays it stands for.

A case is small and printable: ``Case(batch=2, steps=3, ...)`` is valid Python, so the smallest failing
example Hypothesis finds can be pasted back to reproduce the failure. Values come from the seed, so
shrinking acts on shapes and options while the numbers stay random.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .. import equations, params as spec_params, reference

BIAS_OPTIONS = ("bias", "recurrent_bias", "multiplicative_bias")


@dataclass(frozen=True)
class Case:
    batch: int | None  # None: unbatched input (T, I)
    steps: int
    input_size: int
    hidden_size: int
    dtype: str = "float64"
    integration_mode: str = "addition"
    bias: bool = True
    recurrent_bias: bool = True
    multiplicative_bias: bool = True
    independent_recurrence: bool = False
    num_layers: int = 1
    with_state: bool = True  # False: state=None (zeros)
    with_d_state: bool = True  # False: d_state=None
    weight_scale: float = 1.0
    seed: int = 0

    @property
    def options(self) -> dict:
        """What an adapter's ``supports()`` is asked about."""
        return dataclasses.asdict(self) | {"batched": self.batch is not None}

    def arrays(self) -> "CaseArrays":
        """The case's inputs, in ``dtype`` (bfloat16 as ml_dtypes.bfloat16 when available)."""
        rng = np.random.default_rng(self.seed)
        batch = () if self.batch is None else (self.batch,)
        layers, size = [], self.input_size
        for _ in range(self.num_layers):
            p = spec_params.init_params(
                size, self.hidden_size, rng=rng, dtype=np.float64,
                bias=self.bias, recurrent_bias=self.recurrent_bias,
                multiplicative_bias=self.multiplicative_bias,
                independent_recurrence=self.independent_recurrence,
            )
            # Random values (not the initialiser's small ones, not zero biases) so every term matters.
            layers.append({k: rng.uniform(-1, 1, v.shape) * self.weight_scale for k, v in p.items()})
            size = self.hidden_size
        xs = rng.standard_normal(batch + (self.steps, self.input_size))
        state_shape = batch + (self.hidden_size,)

        def state_pair():
            return rng.uniform(-1, 1, state_shape), rng.standard_normal(state_shape)

        states = [state_pair() for _ in range(self.num_layers)]
        d_hs = rng.standard_normal(batch + (self.steps, self.hidden_size))
        d_states = [state_pair() for _ in range(self.num_layers)]
        cast = lambda a: to_dtype(a, self.dtype)  # noqa: E731
        pairs = lambda ps: [(cast(h), cast(c)) for h, c in ps]  # noqa: E731
        stacked = self.num_layers > 1
        layers = [{k: cast(v) for k, v in p.items()} for p in layers]
        return CaseArrays(
            params=layers if stacked else layers[0],
            xs=cast(xs),
            state=(pairs(states) if stacked else pairs(states)[0]) if self.with_state else None,
            d_hs=cast(d_hs),
            d_state=(pairs(d_states) if stacked else pairs(d_states)[0]) if self.with_d_state else None,
        )


@dataclass
class CaseArrays:
    params: dict | list  # one canonical mapping, or a list of them for a stack
    xs: np.ndarray
    state: tuple | list | None
    d_hs: np.ndarray
    d_state: tuple | list | None


def round_to_bfloat16(a: np.ndarray) -> np.ndarray:
    """Round float values to the nearest bfloat16 (ties to even), returned as float32."""
    bits = np.asarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def to_dtype(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype != "bfloat16":
        return np.asarray(a).astype(dtype)
    try:
        import ml_dtypes
    except ImportError:  # still exactly representable values, carried as float32
        return round_to_bfloat16(a)
    return np.asarray(a, dtype=np.float32).astype(ml_dtypes.bfloat16)


def as_float64(tree):
    """Cast every array in a (nested) params/state structure to float64."""
    if isinstance(tree, dict):
        return {k: as_float64(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(as_float64(v) for v in tree)
    return None if tree is None else np.asarray(tree, dtype=np.float64)


# ---- the reference for a case: mlstm_spec in float64, chained over layers for a stack ----

def reference_forward(arrays: CaseArrays, integration_mode: str):
    a = as_float64(dataclasses.asdict(arrays))
    if isinstance(a["params"], dict):
        return reference.forward(a["params"], a["xs"], a["state"], integration_mode=integration_mode)
    out, finals = a["xs"], []
    for layer, p in enumerate(a["params"]):
        state = None if a["state"] is None else tuple(a["state"][layer])
        out, final = reference.forward(p, out, state, integration_mode=integration_mode)
        finals.append(final)
    return out, finals


def reference_gradients(arrays: CaseArrays, integration_mode: str):
    a = as_float64(dataclasses.asdict(arrays))
    if isinstance(a["params"], dict):
        d_state = None if a["d_state"] is None else tuple(a["d_state"])
        state = None if a["state"] is None else tuple(a["state"])
        return reference.backward(a["params"], a["xs"], state, a["d_hs"], d_state,
                                  integration_mode=integration_mode)
    inputs, out = [], a["xs"]
    for layer, p in enumerate(a["params"]):
        inputs.append(out)
        state = None if a["state"] is None else tuple(a["state"][layer])
        out, _ = reference.forward(p, out, state, integration_mode=integration_mode)
    grads, d_out = [None] * len(inputs), a["d_hs"]
    for layer in reversed(range(len(inputs))):
        state = None if a["state"] is None else tuple(a["state"][layer])
        d_state = None if a["d_state"] is None else tuple(a["d_state"][layer])
        grads[layer] = reference.backward(a["params"][layer], inputs[layer], state, d_out, d_state,
                                          integration_mode=integration_mode)
        d_out = grads[layer].pop("x")
    grads[0]["x"] = d_out
    return grads


assert set(BIAS_OPTIONS) == set(equations.BIAS_FLAGS.values())
