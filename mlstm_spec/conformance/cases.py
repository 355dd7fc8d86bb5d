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

A case may switch on the spec's variants (a projection, peepholes, the clips, a run-time forget
bias); the suite draws them only for an adapter that declares them. A clip's bound is chosen on the
case's own values (:func:`with_clips`), so that it clips some of them and none within rounding of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass

import numpy as np

from .. import equations, params as spec_params, reference
from ..equations import INTEGRATION_MODES
from .tolerances import CLIP_MARGIN, CLIP_MIN_VALUE

BIAS_OPTIONS = ("bias", "recurrent_bias", "multiplicative_bias")


#: The spec's variants (docs/equations.md) a case may switch on: structural ones (``proj_size``,
#: ``peepholes``: parameters present) and run-time ones (passed as keyword arguments).
VARIANT_OPTIONS = ("proj_size", "peepholes", "cell_clip", "proj_clip", "forget_bias")
#: The variants passed to ``forward`` / ``gradients`` as keyword arguments, with their "off" values.
RUNTIME_OPTIONS = dict(equations.RUNTIME_DEFAULTS)
_VARIANT_DEFAULTS = {"proj_size": 0, "peepholes": False, **RUNTIME_OPTIONS}


def variants_on(options) -> frozenset:
    """The names of the variants a case (or its ``options`` mapping) switches on."""
    get = options.get if isinstance(options, dict) else lambda name, default: getattr(options, name, default)
    return frozenset(name for name in VARIANT_OPTIONS
                     if get(name, _VARIANT_DEFAULTS[name]) not in (None, 0, 0.0, False))


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
    # The spec's variants, all off by default (and then the arrays are exactly those of a case
    # without these fields). With a projection h, d_h and every layer's output are P wide, c is H wide.
    proj_size: int = 0  # P; 0: no projection
    peepholes: bool = False  # weight_ci, weight_cf, weight_co, drawn like the other weights
    cell_clip: float | None = None  # run-time options, passed to forward/gradients when on
    proj_clip: float | None = None
    forget_bias: float = 0.0

    def __repr__(self) -> str:
        # The variants are printed only when on, so that reproducers of cases without them read as
        # they did before the variants existed (and paste into older versions).
        shown = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                 if f.name not in _VARIANT_DEFAULTS or getattr(self, f.name) != _VARIANT_DEFAULTS[f.name]]
        return f"Case({', '.join(f'{name}={value!r}' for name, value in shown)})"

    def _fan_in_root(self, key: str, value: np.ndarray) -> float:
        if not self.scale_by_fan_in or not key.startswith("weight_") or value.ndim == 1:
            return 1.0
        return float(np.sqrt(value.shape[1]))

    @property
    def output_size(self) -> int:
        """The width of h and of every layer's output: P with a projection, else H."""
        return self.proj_size or self.hidden_size

    @property
    def variants(self) -> frozenset:
        """The variants this case switches on."""
        return variants_on(self)

    @property
    def runtime(self) -> dict:
        """Every run-time option, for the spec (``mlstm_spec.forward(..., **case.runtime)``)."""
        return {name: getattr(self, name) for name in RUNTIME_OPTIONS}

    @property
    def runtime_on(self) -> dict:
        """The run-time options that are switched on: the keyword arguments an adapter receives (none
        for a case without run-time variants, so adapters written before them keep working)."""
        return {name: value for name, value in self.runtime.items() if value != RUNTIME_OPTIONS[name]}

    @property
    def size(self) -> int:
        """A measure of the work a case takes (multiply-adds of one forward pass), for ordering."""
        batch = self.batch or 1
        H, out = self.hidden_size, self.output_size
        per_step = 5 * H * self.input_size + H * out + 4 * H * H + self.proj_size * H
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
                proj_size=self.proj_size, peepholes=self.peepholes,
            )
            # Random values (not the initialiser's small ones, not zero biases) so every term matters.
            # Peephole weights, vectors, are never scaled: with |c| of order 1 their terms weigh like
            # a pre-activation's, at every size.
            layers.append({k: rng.uniform(-1, 1, v.shape) * self.weight_scale / self._fan_in_root(k, v)
                           for k, v in p.items()})
            size = self.output_size
        xs = rng.standard_normal(batch + (self.steps, self.input_size))
        h_shape, c_shape = batch + (self.output_size,), batch + (self.hidden_size,)

        def state_pair():
            return rng.uniform(-1, 1, h_shape), rng.standard_normal(c_shape)

        states = [state_pair() for _ in range(self.num_layers)]
        d_hs = rng.standard_normal(batch + (self.steps, self.output_size))
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

#: NumPy's bundled OpenBLAS can leave the processor's floating-point flags set after a product of finite
#: values whose result is finite, and NumPy then warns about the product. It depends on memory contents,
#: so it comes and goes (1 in ~12 runs of one float32 conformance test, the product clean when rerun),
#: and under ``-W error`` it failed the suite at random. A real overflow there still shows, as inf or nan
#: in the values the suite compares. (pyproject.toml's filterwarnings repeats it for the spec's tests.)
SPURIOUS_PRODUCT_WARNING = r"(divide by zero|overflow|invalid value) encountered in matmul"


@contextlib.contextmanager
def spurious_product_warnings_ignored():
    """Within the block, NumPy's warning about a matrix product (:data:`SPURIOUS_PRODUCT_WARNING`) is
    ignored; every other warning is handled as before."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", SPURIOUS_PRODUCT_WARNING, RuntimeWarning)
        yield


def reference_forward(arrays: CaseArrays, integration_mode: str, work=np.float64, between_layers=None,
                      **runtime):
    """The spec's forward pass on a case, computing in ``work`` (float64: the oracle).
    ``between_layers`` rounds one layer's output before the next layer reads it; ``runtime`` are the
    run-time variants (``case.runtime``)."""
    a = cast_tree(dataclasses.asdict(arrays), work)
    if isinstance(a["params"], dict):
        return reference.forward(a["params"], a["xs"], a["state"], integration_mode=integration_mode, **runtime)
    out, finals = a["xs"], []
    for layer, p in enumerate(a["params"]):
        if layer and between_layers is not None:
            out = between_layers(out)
        state = None if a["state"] is None else tuple(a["state"][layer])
        out, final = reference.forward(p, out, state, integration_mode=integration_mode, **runtime)
        finals.append(final)
    return out, finals


def reference_gradients(arrays: CaseArrays, integration_mode: str, work=np.float64, between_layers=None,
                        **runtime):
    """The spec's gradients on a case (see :func:`reference_forward` for the other arguments)."""
    a = cast_tree(dataclasses.asdict(arrays), work)
    if isinstance(a["params"], dict):
        d_state = None if a["d_state"] is None else tuple(a["d_state"])
        state = None if a["state"] is None else tuple(a["state"])
        return reference.backward(a["params"], a["xs"], state, a["d_hs"], d_state,
                                  integration_mode=integration_mode, **runtime)
    inputs, out = [], a["xs"]
    for layer, p in enumerate(a["params"]):
        if layer and between_layers is not None:
            out = between_layers(out)
        inputs.append(out)
        state = None if a["state"] is None else tuple(a["state"][layer])
        out, _ = reference.forward(p, out, state, integration_mode=integration_mode, **runtime)
    grads, d_out = [None] * len(inputs), a["d_hs"]
    for layer in reversed(range(len(inputs))):
        state = None if a["state"] is None else tuple(a["state"][layer])
        d_state = None if a["d_state"] is None else tuple(a["d_state"][layer])
        grads[layer] = reference.backward(a["params"][layer], inputs[layer], state, d_out, d_state,
                                          integration_mode=integration_mode, **runtime)
        d_out = grads[layer].pop("x")
        if layer and between_layers is not None:
            d_out = between_layers(d_out)
    grads[0]["x"] = d_out
    return grads


def rounded_reference(arrays: CaseArrays, integration_mode: str, dtype: str, gradients: bool, **runtime):
    """What the spec's own rounding in ``dtype`` does on this case, as float64 arrays
    ``(hs, final, grads or None)``.

    - float32: the spec computing in float32.
    - float16, bfloat16: the spec's public functions run one step at a time in that dtype: each step
      computed in float32 (as ``mlstm_spec`` computes float16) and its results, the state carried to
      the next step included, rounded to the dtype; the backward pass likewise, step by step, with
      the carried gradient rounded. (Keras's own RNN loop under mixed precision does the same.)

    For a stack each layer's output is rounded to the dtype before the next layer reads it.
    ``runtime``: the run-time variants, as for :func:`reference_forward`.
    """
    def rounded(tree):
        if isinstance(tree, dict):
            return {k: rounded(v) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(rounded(v) for v in tree)
        return np.asarray(to_dtype(np.asarray(tree, np.float32), dtype), dtype=np.float32)

    if dtype == "float32":
        hs, final = reference_forward(arrays, integration_mode, np.float32, **runtime)
        grads = reference_gradients(arrays, integration_mode, np.float32, **runtime) if gradients else None
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
    P = layers[0]["weight_hr"].shape[0] if "weight_hr" in layers[0] else H  # the width of h
    unbatch = (lambda t: t) if batched else (lambda t: t[0])  # noqa: E731

    def run_layer(params, inputs, state):
        """Step by step; returns the outputs and the state before every step (for the backward)."""
        h, c = (np.zeros((B, P), np.float32), np.zeros((B, H), np.float32)) if state is None else (
            np.reshape(state[0], (B, P)), np.reshape(state[1], (B, H)))
        before, outputs = [], []
        for t in range(inputs.shape[1]):
            before.append((h, c))
            _, (h, c) = reference.forward(params, inputs[:, t:t + 1], (h, c), integration_mode=integration_mode,
                                          **runtime)
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
            d_h, d_c = (np.zeros((B, P), np.float32), np.zeros((B, H), np.float32)) if d_state is None else (
                rounded(np.reshape(d_state[0], (B, P))), rounded(np.reshape(d_state[1], (B, H))))
            total, d_x = {}, [None] * inputs[layer].shape[1]
            for t in reversed(range(inputs[layer].shape[1])):
                step = reference.backward(params, inputs[layer][:, t:t + 1], befores[layer][t],
                                          d_out[:, t:t + 1], (d_h, d_c), integration_mode=integration_mode,
                                          **runtime)
                d_x[t] = step.pop("x")
                d_h, d_c = rounded(step.pop("h0")), rounded(step.pop("c0"))
                for key, value in step.items():
                    total[key] = total.get(key, 0) + value
            grads[layer] = rounded(total) | {"h0": unbatch(d_h), "c0": unbatch(d_c)}
            d_out = rounded(np.concatenate(d_x, axis=1))
        grads[0]["x"] = unbatch(d_out)
        grads = grads if stacked else grads[0]
    return as_float64((rounded(hs), rounded(final), None if grads is None else rounded(grads)))


# ---- clip bounds that clip some values, and none within rounding of the bound ----

#: One unit of rounding (machine epsilon) of each dtype judged below float64.
UNIT_ROUNDING = {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}


def perturbed_reference(arrays: CaseArrays, integration_mode: str, dtype: str, gradients: bool, seed: int,
                        **runtime):
    """How far the spec's results move when each value it is given (inputs, parameters, state and
    incoming gradients) moves by up to one unit of ``dtype``'s rounding: the spec in float64 on this
    case with every value multiplied by ``1 + u * eps`` (``u`` uniform in [-1, 1], drawn from
    ``seed``), as float64 arrays ``(hs, final, grads or None)``. Where the case amplifies rounding,
    this moves as far as rounding anywhere in the computation does (see tolerances.SENSITIVITY_SHARE)."""
    rng = np.random.default_rng(seed)
    eps = UNIT_ROUNDING[dtype]

    def moved(tree):
        if isinstance(tree, dict):
            return {k: moved(v) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(moved(v) for v in tree)
        if tree is None:
            return None
        values = np.asarray(tree, dtype=np.float64)
        return values * (1.0 + eps * rng.uniform(-1.0, 1.0, values.shape))

    shifted = CaseArrays(**{field.name: moved(getattr(arrays, field.name)) for field in dataclasses.fields(arrays)})
    hs, final = reference_forward(shifted, integration_mode, **runtime)
    grads = reference_gradients(shifted, integration_mode, **runtime) if gradients else None
    return hs, final, grads


def clipped_values(case: Case, arrays: "CaseArrays | None" = None) -> dict:
    """The values each clip acts on over the whole case, as computed in float64 with the case's
    run-time options: ``{"cell_clip": |c before the clip|, "proj_clip": |h before the clip|}``
    (flat arrays, every layer and step; a clip that is off gives the values it would act on)."""
    arrays = case.arrays() if arrays is None else arrays
    a = cast_tree(dataclasses.asdict(arrays), np.float64)
    layers = a["params"] if isinstance(a["params"], list) else [a["params"]]
    xs = a["xs"] if a["xs"].ndim == 3 else a["xs"][None]
    B, H, P = xs.shape[0], case.hidden_size, case.output_size
    # a bound beyond every value clips nothing and yields the unclipped values on the tape
    huge = 1e300
    runtime = {k: (huge if k in ("cell_clip", "proj_clip") and v is None else v) for k, v in case.runtime.items()}
    if not case.proj_size:
        runtime["proj_clip"] = None
    found = {"cell_clip": [], "proj_clip": []}
    out = xs
    for layer, params in enumerate(layers):
        if a["state"] is None:
            h0, c0 = np.zeros((B, P)), np.zeros((B, H))
        else:
            pair = a["state"][layer] if isinstance(a["params"], list) else a["state"]
            h0, c0 = np.reshape(pair[0], (B, P)), np.reshape(pair[1], (B, H))
        out, _, tapes = equations.run_forward(params, out, h0, c0, case.integration_mode != "addition",
                                              keep_tape=True, **runtime)
        for tape in tapes:
            found["cell_clip"].append(np.abs(tape["c_unclipped"]).ravel())
            if "h_unclipped" in tape:
                found["proj_clip"].append(np.abs(tape["h_unclipped"]).ravel())
    return {k: np.concatenate(v) for k, v in found.items() if v}


def _clip_bound(values: np.ndarray, dtype: str) -> float | None:
    """A bound in the widest gap between the larger half of ``values`` (so that the largest value,
    and at most half of them, are clipped; a single value is clipped whole), rounded to 3 significant
    digits and to ``dtype``; None when all values are near 0."""
    values = np.sort(values[np.isfinite(values)])
    if values.size == 0 or values[-1] < CLIP_MIN_VALUE:
        return None
    if values.size == 1 or values[0] == values[-1]:
        bound = values[-1] / 2
    else:
        upper = values[values.size // 2:]
        below = np.concatenate([[values[values.size // 2 - 1] if values.size > 1 else 0.0], upper[:-1]])
        gaps = upper - below
        k = int(np.argmax(gaps))
        bound = (upper[k] + below[k]) / 2
    bound = float(f"{bound:.3g}")
    return float(np.asarray(to_dtype(np.float64(bound), dtype), dtype=np.float64)) or None


def with_clips(case: Case, cell: bool, proj: bool, attempts: int = 4) -> Case:
    """``case`` with a ``cell_clip`` (when ``cell``) and a ``proj_clip`` (when ``proj`` and the case
    has a projection) that clip some but not all of the values they act on, with no value within
    :data:`~.tolerances.CLIP_MARGIN` of the bound (see tolerances.py: a value within rounding of the
    bound could be clipped by the implementation and not by the spec, which changes the gradient by
    O(1)). A clip for which no such bound is found is left off."""
    case = dataclasses.replace(case, cell_clip=None, proj_clip=None)
    arrays = case.arrays()
    for name, wanted in (("cell_clip", cell), ("proj_clip", proj and case.proj_size > 0)):
        if not wanted:
            continue
        candidate = case
        for _ in range(attempts):
            # clipping changes the values that follow: choose, then check on the run with the clip
            bound = _clip_bound(clipped_values(candidate, arrays)[name], case.dtype)
            if bound is None:
                break
            candidate = dataclasses.replace(case, **{name: bound})
            values = clipped_values(candidate, arrays)[name]
            clipped = values > bound
            margin = CLIP_MARGIN[case.dtype] * max(float(values.max()), CLIP_MIN_VALUE)
            if clipped.any() and (not clipped.all() or values.size == 1) and \
                    float(np.min(np.abs(values - bound))) > margin:
                case = candidate
                break
    return case


# ---- the large tier ----

@dataclass(frozen=True)
class Shape:
    """One entry of the large tier: the sizes of a case; its options are drawn per run. The variants
    named here are switched on for an adapter that computes them (and left off for one that does not,
    which gets the same shape without them): ``cell_clip`` and ``proj_clip`` ask for a clip, whose
    bound is chosen on the case's values (:func:`with_clips`). ``integration_mode`` pins the mode
    (None: drawn per run, like the other options)."""

    batch: int | None  # None: unbatched
    steps: int
    input_size: int
    hidden_size: int
    num_layers: int = 1
    proj_size: int = 0
    peepholes: bool = False
    cell_clip: bool = False
    proj_clip: bool = False
    forget_bias: float = 0.0
    integration_mode: str | None = None

    def __post_init__(self):
        if self.integration_mode not in (None, *INTEGRATION_MODES):
            raise ValueError(f"integration_mode must be None or one of {INTEGRATION_MODES}, "
                             f"got {self.integration_mode!r}")

    @property
    def variants(self) -> frozenset:
        return variants_on(self)

    def __str__(self) -> str:
        parts = [f"B={self.batch}", f"T={self.steps}", f"I={self.input_size}", f"H={self.hidden_size}"]
        parts += [self.integration_mode] if self.integration_mode else []
        parts += [f"P={self.proj_size}" if name == "proj_size" else
                  f"forget_bias={self.forget_bias:g}" if name == "forget_bias" else name
                  for name in VARIANT_OPTIONS if name in self.variants]
        return ", ".join(parts + ([f"{self.num_layers} layers"] if self.num_layers > 1 else []))

    def without(self, variants) -> "Shape":
        """This shape with ``variants`` (names) switched off."""
        off = {"proj_size": 0, "peepholes": False, "cell_clip": False, "proj_clip": False, "forget_bias": 0.0}
        return dataclasses.replace(self, **{name: off[name] for name in variants})


#: The large tier of each profile. Each shape sits just past (or just below) a size that optimised
#: code tiles or vectorises on: hidden and input sizes around 8, 16, 32, 64 and 128 (non-multiples,
#: so that a vector tail or a partial tile is left over), steps past 16, 32 and 64 (time chunks, and
#: a backward pass that must reach back further than a chunk), batches past 4 and 16 (batch
#: tiles), a stack of layers. Each is checked once per implementation, device and dtype: few and
#: cheap, so that the default run stays within a few minutes with JIT backends that compile once
#: per shape. ``thorough`` adds exact multiples, longer sequences, a stack of three and H = 257.
#:
#: Three shapes carry variants, for adapters that compute them (in place of the plain shape, so they
#: cost no extra example): a projection whose P sits below the boundary that H passes (P = 31 < 32 <
#: H = 33; in the stack P = 63 < 64 < H = 65, and layer 2 reads P = 63 inputs), with its clip and a
#: forget bias; peepholes with a cell clip (and a negative forget bias) over 65 steps (the weights
#: scaled by the fan-in keep the recurrence contracting there, see tolerances.py). Three shapes stay
#: plain, so that the formulation without variants is checked at large sizes too (an optimised kernel
#: may take another path for it); the other options of every shape are drawn per run, save the
#: integration mode of the first two, one of each.
LARGE_SHAPES = {
    "default": (
        # B past 16 in two even halves, T past 32, I past 32, H past 16 (below 32), in each integration
        # mode: the torch layer splits rows across threads in its forward, and under addition in the
        # forward that keeps a tape for the gradients too, each thread writing its rows of the tape
        Shape(18, 33, 33, 31, integration_mode="addition"),
        Shape(18, 33, 33, 31, integration_mode="multiplicative_integration"),
        Shape(17, 20, 15, 33, proj_size=31, proj_clip=True, forget_bias=1.0),  # B past 16, T past 16,
                                             # I past 8 (below 16), H past 32, P below 32
        Shape(None, 65, 65, 9, peepholes=True, cell_clip=True, forget_bias=-0.5),  # unbatched, T past 64,
                                             # I past 64, H past 8
        Shape(3, 6, 129, 129),               # I and H past 128
        Shape(5, 12, 24, 65, num_layers=2, proj_size=63, peepholes=True),  # a stack, B past 4,
                                             # H past 64, P below 64
    ),
}
LARGE_SHAPES["thorough"] = LARGE_SHAPES["default"] + (
    Shape(5, 17, 9, 17),                     # just past 4, 16, 8, 16
    Shape(8, 16, 32, 64, proj_size=32),      # exact multiples: no tail anywhere
    Shape(2, 130, 16, 32),                   # T past 128
    Shape(33, 40, 64, 128),                  # B past 32, H = 128 exactly
    Shape(1, 300, 7, 15, peepholes=True, cell_clip=True, forget_bias=1.0),  # a long sequence
    Shape(6, 10, 31, 63, num_layers=3, proj_size=33),  # a stack of three
    Shape(3, 5, 257, 257),                   # I and H past 256
)
LARGE_SHAPES["ci"] = LARGE_SHAPES["default"]

#: Weight scales of the large tier (times 1/sqrt(fan-in)): at these the recurrence contracts, so
#: errors do not grow with T (tolerances.py derives what that means for the tolerances).
LARGE_WEIGHT_SCALES = (1.0, 1.5)


def large_case(shape: Shape, dtype: str, rng: np.random.Generator, variants=frozenset()) -> Case:
    """A case of ``shape`` with options and a value seed drawn from ``rng``, and the shape's variants
    that are in ``variants`` (those the adapter computes) switched on. The draws from ``rng`` do not
    depend on the variants, so a shape gives the same case as before the variants existed where none
    is switched on."""
    pick = lambda: bool(rng.integers(2))  # noqa: E731
    drawn_mode = INTEGRATION_MODES[int(rng.integers(2))]  # drawn even where pinned: the later draws stay put
    case = Case(
        batch=shape.batch, steps=shape.steps, input_size=shape.input_size, hidden_size=shape.hidden_size,
        dtype=dtype, integration_mode=shape.integration_mode or drawn_mode,
        bias=pick(), recurrent_bias=pick(), multiplicative_bias=pick(),
        independent_recurrence=bool(rng.integers(4) == 0),  # the rarer variant
        num_layers=shape.num_layers, with_state=pick(), with_d_state=pick(),
        weight_scale=float(LARGE_WEIGHT_SCALES[int(rng.integers(len(LARGE_WEIGHT_SCALES)))]),
        seed=int(rng.integers(2**31 - 1)), scale_by_fan_in=True,
    )
    on = shape.variants & frozenset(variants)
    if not on:
        return case
    proj_size = shape.proj_size if "proj_size" in on else 0
    case = dataclasses.replace(
        case, proj_size=proj_size, peepholes="peepholes" in on,
        forget_bias=shape.forget_bias if "forget_bias" in on else 0.0,
        # a projection needs a matrix weight_hh
        independent_recurrence=case.independent_recurrence and not proj_size)
    return with_clips(case, cell="cell_clip" in on, proj="proj_clip" in on and proj_size > 0)


assert set(BIAS_OPTIONS) == set(equations.BIAS_FLAGS.values())
