"""The skeleton every backend is written on: everything that does not depend on the framework.

- :data:`DTYPES` and :func:`work_dtype`: the dtypes the layers compute in, and the rule that float16 and
  bfloat16 compute in float32 (the results are rounded once, as :mod:`mlstm_spec` computes float16);
- :func:`check_layer_options` / :func:`set_layer_options`: a layer constructor's options;
- :class:`InputChecks`: the one input validator, told how the framework reads a shape and a dtype;
- :func:`canonical_import`: what every ``from_canonical`` accepts (a mapping, a stack, a
  :class:`mlstm_spec.WeightFile`, any backend's arrays) and the options it implies;
- :func:`init_layers`: initial parameters, drawn by :func:`mlstm_spec.init_params`;
- :class:`AdapterBase`: the conformance adapter, with ``forward`` and ``gradients`` written once on a
  few hooks.

docs/architecture.md shows how a backend is put together from these parts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from mlstm_spec.equations import BIAS_FLAGS, RUNTIME_DEFAULTS
from mlstm_spec.io import WeightFile
from mlstm_spec.params import init_params
from mlstm_spec.validation import (
    LayerInfo,
    check_directional_stack,
    check_dtype,
    check_integration_mode,
    check_sequence,
    check_sizes,
    check_stack,
    check_state,
    dtype_name,
)

#: The dtypes every backend computes in.
DTYPES = ("float64", "float32", "bfloat16", "float16")
#: Storage formats: computed in float32 (see :func:`work_dtype`).
HALF_DTYPES = ("float16", "bfloat16")

#: Keyword options every layer takes, with their defaults (the same as mlstm_spec.init_params).
LAYER_OPTIONS = dict(
    bias=True,
    recurrent_bias=True,
    multiplicative_bias=True,
    independent_recurrence=False,
    integration_mode="addition",
)
#: The options a canonical mapping implies by the keys it holds and the shape of weight_hh.
STRUCTURAL_OPTIONS = ("bias", "recurrent_bias", "multiplicative_bias", "independent_recurrence")
#: The spec's variants (docs/equations.md): structural ones, read from the parameters, and run-time ones,
#: which a weight file may carry. A backend names those it computes (``variants`` of InputChecks,
#: canonical_import and AdapterBase) and refuses the others (see refuse_variants) rather than compute
#: without them.
VARIANT_OPTIONS = ("proj_size", "peepholes", "cell_clip", "proj_clip", "forget_bias")


def refuse_variants(infos, options: dict, argument: str, backend: str, implemented=frozenset()) -> None:
    """NotImplementedError when the layers have a projection or peepholes, or ``options`` switch on a
    run-time variant, that is not among the ``implemented`` variant names (of :data:`VARIANT_OPTIONS`)."""
    structural = {"proj_size": "a projection (weight_hr)",
                  "peepholes": "peepholes (weight_ci, weight_cf, weight_co)"}
    missing = [what for name, what in structural.items()
               if name not in implemented and any(getattr(info, name) for info in infos)]
    if missing:
        raise NotImplementedError(
            f"{argument} has {' and '.join(missing)}, which "
            f"{backend} does not implement yet; mlstm_spec.forward computes them")
    given = {name: options[name] for name in VARIANT_OPTIONS if options.get(name) and name not in implemented}
    if given:
        raise NotImplementedError(f"{given} asks for variants of the spec that {backend} does not implement "
                                  "yet; mlstm_spec.forward computes them")


def work_dtype(dtype: str) -> str:
    """The dtype a layer of ``dtype`` computes in: float16 and bfloat16 compute in float32 and round
    their results once, because rounding every intermediate would compound over the steps."""
    return "float32" if dtype in HALF_DTYPES else dtype


# ---- constructor options ----

def check_layer_options(input_size, hidden_size, *, num_layers=1, dropout=0.0, integration_mode="addition",
                        **flags) -> None:
    """Validate a layer constructor's arguments (input_size may be None where it is inferred)."""
    check_sizes(1 if input_size is None else input_size, hidden_size)
    if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
        raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    check_integration_mode(integration_mode)
    for name, value in flags.items():
        if name not in LAYER_OPTIONS:
            raise TypeError(f"unexpected option {name!r}; the options are {sorted(LAYER_OPTIONS)}")
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def set_layer_options(layer, *, bias, recurrent_bias, multiplicative_bias, independent_recurrence,
                      integration_mode) -> None:
    """Store the (already checked) options on a layer object under their own names, plus
    ``multiplicative``: whether the gates use multiplicative integration."""
    layer.bias = bool(bias)
    layer.recurrent_bias = bool(recurrent_bias)
    layer.multiplicative_bias = bool(multiplicative_bias)
    layer.independent_recurrence = bool(independent_recurrence)
    layer.integration_mode = integration_mode
    layer.multiplicative = check_integration_mode(integration_mode)


def present_params(info: LayerInfo) -> list[str]:
    """Canonical names present in a layer with these options, in canonical order."""
    names = ["weight_ih", "weight_hh", "weight_mh"]
    return names + [name for name, flag in BIAS_FLAGS.items() if getattr(info, flag)]


def layer_info(input_size: int, hidden_size: int, dtype: str = "float32", **options) -> LayerInfo:
    """The :class:`LayerInfo` of a layer built from options (the structural ones; others are ignored)."""
    flags = {name: bool(options.get(name, LAYER_OPTIONS[name])) for name in STRUCTURAL_OPTIONS}
    return LayerInfo(input_size=input_size, hidden_size=hidden_size, dtype=dtype, **flags)


# ---- the input validator ----

class InputChecks:
    """The checks of a layer's inputs, for one framework.

    Args:
        is_array: whether a value is one of the framework's arrays.
        array_name: how errors name that kind, e.g. ``"a torch.Tensor"``.
        shape_of, dtype_of: read a value's shape (a tuple) and dtype (anything
            :func:`mlstm_spec.validation.dtype_name` reads).
        backend: how errors name the backend (when refusing the variants it does not implement).
        variants: the names of :data:`VARIANT_OPTIONS` the backend implements (not refused).

    The messages are :mod:`mlstm_spec.validation`'s: they name the argument, what was expected and what
    was given.
    """

    def __init__(self, *, is_array: Callable, array_name: str, shape_of: Callable = lambda v: tuple(v.shape),
                 dtype_of: Callable = lambda v: v.dtype, allowed: tuple = DTYPES, backend: str = "this backend",
                 variants=frozenset()):
        self.is_array, self.array_name, self.allowed, self.backend = is_array, array_name, allowed, backend
        self.variants = frozenset(variants)
        self.shape_of = lambda v: tuple(shape_of(v))
        self.dtype_of = lambda v: dtype_name(dtype_of(v))

    def array(self, value, argument: str) -> None:
        if not self.is_array(value):
            raise TypeError(f"{argument} must be {self.array_name}, got {type(value).__name__}")

    def dtype(self, value, argument: str) -> str:
        """The dtype name of an array, which must be one the layers compute in."""
        self.array(value, argument)
        return check_dtype(self.dtype_of(value), argument, self.allowed)

    def stack(self, layers, argument: str = "params") -> list[LayerInfo]:
        """A list of canonical mappings of arrays: see :func:`mlstm_spec.validation.check_stack`."""
        if isinstance(layers, (list, tuple)):
            for i, params in enumerate(layers):
                if isinstance(params, Mapping):
                    where = f"{argument}[{i}]" if len(layers) > 1 else argument
                    for name, value in params.items():
                        self.array(value, f"{where}[{name!r}]")
        infos = check_stack(layers, shape_of=self.shape_of, dtype_of=self.dtype_of, argument=argument,
                            allowed=self.allowed)
        refuse_variants(infos, {}, argument, self.backend, self.variants)
        return infos

    def params(self, params, argument: str = "params") -> LayerInfo:
        """One canonical mapping of arrays."""
        if not isinstance(params, Mapping):
            raise TypeError(f"{argument} must be a mapping of parameter name to array, got "
                            f"{type(params).__name__}")
        return self.stack([params], argument)[0]

    def sequence(self, xs, info: LayerInfo, argument: str = "xs", *, shape=None, dtype=None) -> bool:
        """A sequence (B, T, I) or (T, I) for the layer ``info``; True when batched. ``shape`` and
        ``dtype`` replace what is read from ``xs`` (a cell's step read as one step; autocast)."""
        self.array(xs, argument)
        return check_sequence(self.shape_of(xs) if shape is None else shape,
                              self.dtype_of(xs) if dtype is None else dtype, info, argument, self.allowed)

    def state(self, state, batch_shape, info: LayerInfo, argument: str = "state", *, dtype=None) -> None:
        """An ``(h, c)`` pair, each ``batch_shape + (H,)`` in the parameters' dtype (or ``dtype``)."""
        if isinstance(state, (tuple, list)) and len(state) == 2:
            for name, value in zip(("h", "c"), state):
                self.array(value, f"{argument} {name}")
        dtype_of = self.dtype_of if dtype is None else (lambda v: dtype)
        check_state(state, batch_shape, info, argument, self.allowed, shape_of=self.shape_of, dtype_of=dtype_of)


# ---- canonical parameters in ----

def as_numpy(value) -> np.ndarray:
    """A writable NumPy copy of any backend's array (bfloat16 as ``ml_dtypes.bfloat16``), exactly."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor: may require grad or be on a GPU
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            import ml_dtypes

            return value.float().numpy().astype(ml_dtypes.bfloat16)  # exact: bfloat16 widens to float32
        value = value.numpy()
    elif callable(getattr(value, "numpy", None)):  # a TensorFlow tensor or variable
        value = value.numpy()
    return np.array(value, copy=True)


_NUMPY = InputChecks(is_array=lambda v: isinstance(v, np.ndarray), array_name="an array")


def canonical_import(params, options: dict, *, one_layer: bool = False, owner: str = "MLSTM",
                     backend: str = "this backend", directions: int = 1,
                     variants=frozenset()) -> tuple[list[dict], list[LayerInfo], dict]:
    """What every backend's ``from_canonical(params, **options)`` accepts, checked once.

    ``params``: one canonical mapping, a list of them (a stack, first layer first), or what
    :func:`mlstm_spec.load` returns (a :class:`mlstm_spec.WeightFile`, whose options are used); the values
    may be any backend's arrays. Returns NumPy copies of the layers, their :class:`LayerInfo`, and
    ``options`` completed with what the parameters imply (the bias flags, ``independent_recurrence``,
    ``num_layers``, and a weight file's ``integration_mode``). A given option that contradicts them
    raises ValueError, and so does a stack given to ``owner`` where it is ``one_layer``; a variant of the
    spec that ``backend`` does not implement (is not in ``variants``) raises NotImplementedError.

    ``directions=2`` reads a bidirectional stack: ``directions`` mappings per layer in ``torch.nn.LSTM``'s
    order (layer 0 forward, layer 0 reverse, layer 1 forward, ...), where every layer after the first
    takes the concatenated outputs of both directions (``I = 2H``); ``num_layers`` counts layers, not
    mappings.
    """
    options = dict(options)
    if isinstance(params, WeightFile):
        if params.directions != directions:
            raise ValueError(_directions_message(params.directions, directions, owner, backend))
        implied = dict(params.options)
        params = params.layers
    else:
        implied = {}
    if isinstance(params, Mapping):
        layers = [params]
    elif isinstance(params, Sequence) and not isinstance(params, (str, bytes)) and len(params) > 0:
        layers = list(params)
    else:
        raise TypeError("params must be a canonical mapping, a non-empty list of them (one per layer) or "
                        f"what mlstm_spec.load returns, got {type(params).__name__}")
    for k, layer in enumerate(layers):
        if not isinstance(layer, Mapping):
            where = f"params[{k}]" if len(layers) > 1 else "params"
            raise TypeError(f"{where} must be a mapping of parameter name to array, got {type(layer).__name__}")
    if one_layer and len(layers) > 1:
        raise ValueError(f"params holds {len(layers)} layers, but {owner} is one layer; build one {owner} "
                         "per mapping and chain them")
    layers = [{name: as_numpy(value) for name, value in layer.items()} for layer in layers]
    if directions == 1:
        infos = check_stack(layers, shape_of=_NUMPY.shape_of, dtype_of=_NUMPY.dtype_of, allowed=DTYPES)
    else:
        infos = check_directional_stack(layers, directions, shape_of=_NUMPY.shape_of, dtype_of=_NUMPY.dtype_of,
                                        allowed=DTYPES)
    refuse_variants(infos, {**implied, **options}, "params", backend, variants)
    implied.update(infos[0].options, num_layers=len(layers) // directions)
    for name, value in implied.items():
        if name in options and options[name] != value:
            raise ValueError(f"{name}={options[name]!r} contradicts params, which imply {name}={value!r} "
                             "(read from the keys present, the shape of weight_hh and the number of layers)")
        options[name] = value
    return layers, infos, options


def _directions_message(found: int, wanted: int, owner: str, backend: str) -> str:
    if wanted == 1:
        return (f"params is a weight file with {found} directions (a bidirectional stack), but this {owner} "
                f"({backend}) runs one direction; load it into backends.torch.MLSTM (bidirectional=True), "
                f"or take the forward layers alone: from_canonical(w.layers[0::{found}])")
    return (f"params is a weight file with {found} direction, but bidirectional=True asks for {wanted}; "
            "leave bidirectional out to build the layer the file holds")


def init_layers(input_size, hidden_size, *, num_layers=1, rng=None, dtype="float32", **options) -> list[dict]:
    """Initial canonical parameters of a stack (NumPy), drawn by :func:`mlstm_spec.init_params`
    (float64 draws rounded to ``dtype``; bfloat16 as ``ml_dtypes.bfloat16``). ``rng``: a seed or a
    ``numpy.random.Generator`` shared by the layers, which draw in order."""
    generator = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    layers = []
    for layer in range(num_layers):
        drawn = init_params(input_size if layer == 0 else hidden_size, hidden_size, rng=generator,
                            dtype=np.float64, **options)
        layers.append({name: cast_numpy(value, dtype) for name, value in drawn.items()})
    return layers


def cast_numpy(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes

        return array.astype(ml_dtypes.bfloat16)
    return array.astype(dtype)


# ---- the conformance adapter ----

class AdapterBase:
    """A conformance adapter (the protocol of :mod:`mlstm_spec.conformance.suite`) written on hooks.

    ``forward`` and ``gradients`` convert the suite's arguments (one canonical mapping or a stack; a
    state ``(h, c)`` or a list of pairs; ``None`` for zeros) into the layer's conventions and back, once
    for every backend. A backend supplies:

    - :meth:`build` ``(layers, integration_mode, **runtime)``: the layer, through its public
      ``from_canonical``; ``runtime`` holds the run-time variants the case switches on (``cell_clip``,
      ``proj_clip``, ``forget_bias``; only those that differ from their defaults);
    - :meth:`run` ``(model, xs, state)``: ``hs, h_n, c_n`` as NumPy arrays, with the states stacked
      over the layers, ``(L, [B,] H)`` (``state`` likewise, or None);
    - :meth:`pullback` ``(model, xs, state, d_hs, d_state)``: the gradients of
      ``sum(hs * d_hs) + sum(h_n * d_h) + sum(c_n * d_c)``, as ``(per-layer mappings of parameter
      gradients, d_xs, d_h0, d_c0)``;
    - optionally :meth:`precision`, a context around each call (e.g. TF32 off, restored afterwards).

    Results are returned as the layer returns them: never cast to the expected dtype, so that the suite
    sees a dtype bug. ``dtypes`` are the dtypes offered; ``max_layers`` limits stacks; with
    ``batched_only`` unbatched input is given a batch axis of one. ``variants`` names the spec's
    variants the backend computes (a subset of :data:`VARIANT_OPTIONS`); a case with any other is
    declined by :meth:`supports`, so the suite reports it as not run instead of drawing it.
    """

    name: str = "backend"
    dtypes: tuple = DTYPES
    max_layers: int | None = None
    batched_only: bool = False
    variants: frozenset = frozenset()

    def __init__(self, device: str = "cpu"):
        self.device = str(device)

    # hooks
    def build(self, layers: list[dict], integration_mode: str, **runtime):
        raise NotImplementedError

    def run(self, model, xs, state):
        raise NotImplementedError

    def pullback(self, model, xs, state, d_hs, d_state):
        raise NotImplementedError

    def precision(self):
        return contextlib.nullcontext()

    # the protocol
    def supports(self, options) -> bool:
        if options.get("dtype", "float64") not in self.dtypes:
            return False
        if not variants_in(options) <= set(self.variants):
            return False
        return self.max_layers is None or options.get("num_layers", 1) <= self.max_layers

    def forward(self, params, xs, state, *, integration_mode, **runtime):
        layers, stacked = _suite_layers(params)
        state = _stacked_state(state, stacked)
        unbatched = self.batched_only and np.ndim(xs) == 2
        if unbatched:
            xs, state = xs[None], _add_batch_axis(state)
        with self.precision():
            model = self.build(layers, integration_mode, **_switched_on(runtime))
            hs, h_n, c_n = self.run(model, xs, state)
        if unbatched:
            hs, h_n, c_n = hs[0], h_n[:, 0], c_n[:, 0]
        pairs = [(h_n[k], c_n[k]) for k in range(len(layers))]
        return hs, pairs if stacked else pairs[0]

    def gradients(self, params, xs, state, d_hs, d_state, *, integration_mode, **runtime):
        layers, stacked = _suite_layers(params)
        zeros = _zero_state(layers, xs)
        state = zeros if state is None else _stacked_state(state, stacked)
        d_state = zeros if d_state is None else _stacked_state(d_state, stacked)
        unbatched = self.batched_only and np.ndim(xs) == 2
        if unbatched:
            xs, d_hs, state, d_state = xs[None], d_hs[None], _add_batch_axis(state), _add_batch_axis(d_state)
        with self.precision():
            model = self.build(layers, integration_mode, **_switched_on(runtime))
            grads, d_x, d_h0, d_c0 = self.pullback(model, xs, state, d_hs, d_state)
        if unbatched:
            d_x, d_h0, d_c0 = d_x[0], d_h0[:, 0], d_c0[:, 0]
        result = [dict(grads[k], h0=d_h0[k], c0=d_c0[k]) for k in range(len(layers))]
        result[0]["x"] = d_x
        return result if stacked else result[0]


def _add_batch_axis(state):
    return None if state is None else tuple(s[:, None] for s in state)


def variants_in(options: Mapping) -> set:
    """The names (from :data:`VARIANT_OPTIONS`) of the variants a case's ``options`` switch on."""
    return {name for name in VARIANT_OPTIONS
            if options.get(name, RUNTIME_DEFAULTS.get(name)) not in (None, 0, 0.0, False)}


def _switched_on(runtime: Mapping) -> dict:
    """The run-time options that differ from their defaults (what ``build`` receives)."""
    unknown = set(runtime) - set(RUNTIME_DEFAULTS)
    if unknown:
        raise TypeError(f"unexpected run-time options {sorted(unknown)}; the spec has {sorted(RUNTIME_DEFAULTS)}")
    return {name: value for name, value in runtime.items() if value != RUNTIME_DEFAULTS[name]}


def _zero_state(layers: list[dict], xs) -> tuple:
    """Zero ``(h0, c0)`` stacked over the layers: h has the projection's size where there is one."""
    hidden = layers[0]["weight_hh"].shape[0]
    output = layers[0]["weight_hr"].shape[0] if "weight_hr" in layers[0] else hidden
    batch = np.shape(xs)[:-2]
    return (np.zeros((len(layers),) + batch + (output,), xs.dtype),
            np.zeros((len(layers),) + batch + (hidden,), xs.dtype))


def _suite_layers(params) -> tuple[list[dict], bool]:
    return ([params], False) if isinstance(params, Mapping) else (list(params), True)


def _stacked_state(state, stacked):
    """The suite's ``(h, c)`` (one layer) or list of pairs (a stack) -> ``(h0, c0)`` each ``(L, [B,] H)``."""
    if state is None:
        return None
    pairs = state if stacked else [state]
    return tuple(np.stack([np.asarray(pair[k]) for pair in pairs]) for k in (0, 1))
