"""What the suite checks: a :class:`Case` (shapes, options, seed), the arrays it stands for, and the
two size tiers cases come from.

A case is printable: ``Case(batch=2, steps=3, ...)`` is valid Python, so a failing example can be
pasted back to reproduce the failure. Values come from the seed, so shrinking acts on shapes and
options while the numbers stay random.

Two tiers (see docs/conformance.md, "Size tiers"):

- *small*: drawn by Hypothesis (B <= 3, T <= 6, I, H <= 5; see :func:`~.suite.cases`) and shrunk to
  the smallest failing example. Every option combination, and weights at scales up to 2.
- *large*: a fixed list of shapes per profile (:data:`LARGE_SHAPES`) on both sides of the sizes that
  optimised kernels vectorise and tile on, each checked once per implementation, device and dtype,
  with the options drawn from the run's seed. Weights are scaled by their fan-in (as an initialiser
  does), so that no gate saturates at H = 129 and the recurrence contracts over long sequences.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .. import equations, params as spec_params, reference
from ..equations import INTEGRATION_MODES

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
    #: Divide each weight matrix by the square root of its fan-in (its number of columns; 1 for the
    #: vector weight_hh), as initialisers do: the large tier's values, whose pre-activations then have
    #: the same spread at every size. Biases are not scaled.
    scale_by_fan_in: bool = False

    def _fan_in_root(self, key: str, value: np.ndarray) -> float:
        if not self.scale_by_fan_in or not key.startswith("weight_") or value.ndim == 1:
            return 1.0
        return float(np.sqrt(value.shape[1]))

    @property
    def size(self) -> int:
        """A measure of the work a case takes (multiply-adds of one forward pass), for ordering."""
        batch = self.batch or 1
        per_step = 5 * self.hidden_size * self.input_size + 5 * self.hidden_size * self.hidden_size
        return batch * self.steps * per_step * self.num_layers

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
            layers.append({k: rng.uniform(-1, 1, v.shape) * self.weight_scale / self._fan_in_root(k, v)
                           for k, v in p.items()})
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
    return cast_tree(tree, np.float64)


def cast_tree(tree, dtype):
    """Cast every array in a (nested) params/state structure to ``dtype``."""
    if isinstance(tree, dict):
        return {k: cast_tree(v, dtype) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(cast_tree(v, dtype) for v in tree)
    return None if tree is None else np.asarray(tree, dtype=dtype)


# ---- the reference for a case: mlstm_spec, chained over layers for a stack ----

def reference_forward(arrays: CaseArrays, integration_mode: str, work=np.float64, between_layers=None):
    """The spec's forward pass on a case, computing in ``work`` (float64: the oracle).
    ``between_layers`` rounds one layer's output before the next layer reads it."""
    a = cast_tree(dataclasses.asdict(arrays), work)
    if isinstance(a["params"], dict):
        return reference.forward(a["params"], a["xs"], a["state"], integration_mode=integration_mode)
    out, finals = a["xs"], []
    for layer, p in enumerate(a["params"]):
        if layer and between_layers is not None:
            out = between_layers(out)
        state = None if a["state"] is None else tuple(a["state"][layer])
        out, final = reference.forward(p, out, state, integration_mode=integration_mode)
        finals.append(final)
    return out, finals


def reference_gradients(arrays: CaseArrays, integration_mode: str, work=np.float64, between_layers=None):
    """The spec's gradients on a case (see :func:`reference_forward` for ``work``, ``between_layers``)."""
    a = cast_tree(dataclasses.asdict(arrays), work)
    if isinstance(a["params"], dict):
        d_state = None if a["d_state"] is None else tuple(a["d_state"])
        state = None if a["state"] is None else tuple(a["state"])
        return reference.backward(a["params"], a["xs"], state, a["d_hs"], d_state,
                                  integration_mode=integration_mode)
    inputs, out = [], a["xs"]
    for layer, p in enumerate(a["params"]):
        if layer and between_layers is not None:
            out = between_layers(out)
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
        if layer and between_layers is not None:
            d_out = between_layers(d_out)
    grads[0]["x"] = d_out
    return grads


def rounded_reference(arrays: CaseArrays, integration_mode: str, dtype: str, gradients: bool):
    """What the spec's own rounding in ``dtype`` does on this case, as float64 arrays
    ``(hs, final, grads or None)``.

    - float32: the spec computing in float32.
    - float16, bfloat16: the spec's public functions run one step at a time in that dtype: each step
      computed in float32 (as ``mlstm_spec`` computes float16) and its results, the state carried to
      the next step included, rounded to the dtype; the backward pass likewise, step by step, with
      the carried gradient rounded. (Keras's own RNN loop under mixed precision does the same.)

    For a stack each layer's output is rounded to the dtype before the next layer reads it.
    """
    def rounded(tree):
        if isinstance(tree, dict):
            return {k: rounded(v) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(rounded(v) for v in tree)
        return np.asarray(to_dtype(np.asarray(tree, np.float32), dtype), dtype=np.float32)

    if dtype == "float32":
        hs, final = reference_forward(arrays, integration_mode, np.float32)
        grads = reference_gradients(arrays, integration_mode, np.float32) if gradients else None
        return as_float64((hs, final, grads))
    a = cast_tree(dataclasses.asdict(arrays), np.float32)
    stacked = not isinstance(a["params"], dict)
    layers = a["params"] if stacked else [a["params"]]
    states = (a["state"] if stacked else [a["state"]]) if a["state"] is not None else [None] * len(layers)
    d_states = (a["d_state"] if stacked else [a["d_state"]]) if a["d_state"] is not None else [None] * len(layers)
    batched = a["xs"].ndim == 3
    xs = a["xs"] if batched else a["xs"][None]
    d_hs = a["d_hs"] if batched else a["d_hs"][None]
    B, H = xs.shape[0], layers[0]["weight_mh"].shape[1]
    unbatch = (lambda t: t) if batched else (lambda t: t[0])  # noqa: E731

    def run_layer(params, inputs, state):
        """Step by step; returns the outputs and the state before every step (for the backward)."""
        h, c = (np.zeros((B, H), np.float32),) * 2 if state is None else (
            np.reshape(state[0], (B, H)), np.reshape(state[1], (B, H)))
        before, outputs = [], []
        for t in range(inputs.shape[1]):
            before.append((h, c))
            _, (h, c) = reference.forward(params, inputs[:, t:t + 1], (h, c), integration_mode=integration_mode)
            h, c = rounded(h), rounded(c)
            outputs.append(h)
        return np.stack(outputs, axis=1), before, (h, c)

    inputs, befores, finals, out = [], [], [], xs
    for params, state in zip(layers, states):
        inputs.append(out)
        out, before, final = run_layer(params, out, state)
        befores.append(before)
        finals.append((unbatch(final[0]), unbatch(final[1])))
    hs = unbatch(out)
    final = finals if stacked else finals[0]
    grads = None
    if gradients:
        grads, d_out = [None] * len(layers), d_hs
        for layer in reversed(range(len(layers))):
            params, d_state = layers[layer], d_states[layer]
            d_h, d_c = (np.zeros((B, H), np.float32),) * 2 if d_state is None else (
                rounded(np.reshape(d_state[0], (B, H))), rounded(np.reshape(d_state[1], (B, H))))
            total, d_x = {}, [None] * inputs[layer].shape[1]
            for t in reversed(range(inputs[layer].shape[1])):
                step = reference.backward(params, inputs[layer][:, t:t + 1], befores[layer][t],
                                          d_out[:, t:t + 1], (d_h, d_c), integration_mode=integration_mode)
                d_x[t] = step.pop("x")
                d_h, d_c = rounded(step.pop("h0")), rounded(step.pop("c0"))
                for key, value in step.items():
                    total[key] = total.get(key, 0) + value
            grads[layer] = rounded(total) | {"h0": unbatch(d_h), "c0": unbatch(d_c)}
            d_out = rounded(np.concatenate(d_x, axis=1))
        grads[0]["x"] = unbatch(d_out)
        grads = grads if stacked else grads[0]
    return as_float64((rounded(hs), rounded(final), None if grads is None else rounded(grads)))


# ---- the large tier ----

@dataclass(frozen=True)
class Shape:
    """One entry of the large tier: the sizes of a case; its options are drawn per run."""

    batch: int | None  # None: unbatched
    steps: int
    input_size: int
    hidden_size: int
    num_layers: int = 1

    def __str__(self) -> str:
        text = f"B={self.batch}, T={self.steps}, I={self.input_size}, H={self.hidden_size}"
        return text + (f", {self.num_layers} layers" if self.num_layers > 1 else "")


#: The large tier of each profile. Each shape sits just past (or just below) a size that optimised
#: code tiles or vectorises on: hidden and input sizes around 8, 16, 32, 64 and 128 (non-multiples,
#: so that a vector tail or a partial tile is left over), steps past 16, 32 and 64 (time chunks, and
#: a backward pass that must reach back further than a chunk), batches past 4, 8 and 16 (batch
#: tiles), a stack of layers. Each is checked once per implementation, device and dtype: few and
#: cheap, so that the default run stays within a few minutes with JIT backends that compile once
#: per shape. ``thorough`` adds exact multiples, longer sequences, a stack of three and H = 257.
LARGE_SHAPES = {
    "default": (
        Shape(9, 33, 33, 31),                # B past 8, T past 32, I past 32, H past 16 (below 32)
        Shape(17, 20, 15, 33),               # B past 16, T past 16, I past 8 (below 16), H past 32
        Shape(None, 65, 65, 9),              # unbatched, T past 64, I past 64, H past 8
        Shape(3, 6, 129, 129),               # I and H past 128
        Shape(5, 12, 24, 65, num_layers=2),  # a stack, B past 4, H past 64
    ),
}
LARGE_SHAPES["thorough"] = LARGE_SHAPES["default"] + (
    Shape(5, 17, 9, 17),                     # just past 4, 16, 8, 16
    Shape(8, 16, 32, 64),                    # exact multiples: no tail anywhere
    Shape(2, 130, 16, 32),                   # T past 128
    Shape(33, 40, 64, 128),                  # B past 32, H = 128 exactly
    Shape(1, 300, 7, 15),                    # a long sequence
    Shape(6, 10, 31, 63, num_layers=3),      # a stack of three
    Shape(3, 5, 257, 257),                   # I and H past 256
)
LARGE_SHAPES["ci"] = LARGE_SHAPES["default"]

#: Weight scales of the large tier (times 1/sqrt(fan-in)): at these the recurrence contracts, so
#: errors do not grow with T (tolerances.py derives what that means for the tolerances).
LARGE_WEIGHT_SCALES = (1.0, 1.5)


def large_case(shape: Shape, dtype: str, rng: np.random.Generator) -> Case:
    """A case of ``shape`` with options and a value seed drawn from ``rng``."""
    pick = lambda: bool(rng.integers(2))  # noqa: E731
    return Case(
        batch=shape.batch, steps=shape.steps, input_size=shape.input_size, hidden_size=shape.hidden_size,
        dtype=dtype, integration_mode=INTEGRATION_MODES[int(rng.integers(2))],
        bias=pick(), recurrent_bias=pick(), multiplicative_bias=pick(),
        independent_recurrence=bool(rng.integers(4) == 0),  # the rarer variant
        num_layers=shape.num_layers, with_state=pick(), with_d_state=pick(),
        weight_scale=float(LARGE_WEIGHT_SCALES[int(rng.integers(len(LARGE_WEIGHT_SCALES)))]),
        seed=int(rng.integers(2**31 - 1)), scale_by_fan_in=True,
    )


assert set(BIAS_OPTIONS) == set(equations.BIAS_FLAGS.values())
