"""Input validation shared by the spec and every backend.

Everything here works on shapes, dtypes names and option values, never on a framework's tensors, so a
backend can call it with ``tuple(tensor.shape)`` and ``str(tensor.dtype)``. Each error names the
argument, what was expected and what was given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .equations import (
    BIAS_FLAGS, INTEGRATION_MODES, PARAM_SHAPES, PEEPHOLE_WEIGHTS, VARIANT_PARAM_SHAPES,
)

#: dtypes the NumPy spec computes in (bfloat16 has no NumPy dtype; backends compare it in float64).
SPEC_DTYPES = ("float16", "float32", "float64")


@dataclass(frozen=True)
class LayerInfo:
    """What a canonical parameter mapping says about its layer."""

    input_size: int
    hidden_size: int
    bias: bool
    recurrent_bias: bool
    multiplicative_bias: bool
    independent_recurrence: bool
    dtype: str
    proj_size: int = 0  # P, the width of h, when weight_hr is present; 0 without a projection
    peepholes: bool = False

    @property
    def output_size(self) -> int:
        """The width of h (the output and the recurrent state): P with a projection, else H."""
        return self.proj_size or self.hidden_size

    @property
    def options(self) -> dict:
        """The ``init_params`` keywords that give this layer's structure. ``proj_size`` and
        ``peepholes`` appear only when switched on, so a layer without variants has the same options
        as before the variants existed."""
        options = dict(
            bias=self.bias,
            recurrent_bias=self.recurrent_bias,
            multiplicative_bias=self.multiplicative_bias,
            independent_recurrence=self.independent_recurrence,
        )
        if self.proj_size:
            options["proj_size"] = self.proj_size
        if self.peepholes:
            options["peepholes"] = True
        return options


def dtype_name(dtype) -> str:
    """'float32' for np.float32, a NumPy dtype, a torch/jax/tf dtype or a string."""
    name = getattr(dtype, "name", None) or str(dtype)
    return name.replace("torch.", "").replace("<dtype: '", "").rstrip("'>")


def check_integration_mode(integration_mode) -> bool:
    """Validate ``integration_mode``; returns True for multiplicative integration."""
    if integration_mode not in INTEGRATION_MODES:
        raise ValueError(
            f"integration_mode must be one of {INTEGRATION_MODES}, got {integration_mode!r}"
        )
    return integration_mode == "multiplicative_integration"


def check_runtime_options(info: LayerInfo | None = None, *, cell_clip=None, proj_clip=None,
                          forget_bias=0.0) -> dict:
    """Validate the run-time options of ``cell`` / ``forward`` / ``backward``; returns them as a dict
    of Python floats (``None`` for a clip that is off).

    ``cell_clip`` and ``proj_clip`` are ``None`` (off) or a finite number > 0; ``forget_bias`` a finite
    number. ``proj_clip`` needs a projection (``weight_hr`` in the parameters described by ``info``).
    """
    options = {}
    for name, value in (("cell_clip", cell_clip), ("proj_clip", proj_clip), ("forget_bias", forget_bias)):
        is_clip = name != "forget_bias"
        wanted = "None or a finite number > 0" if is_clip else "a finite number"
        if value is None and is_clip:
            options[name] = None
            continue
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} must be {wanted}, got {type(value).__name__} {value!r}")
        number = float(value)
        if not np.isfinite(number) or (is_clip and number <= 0):
            raise ValueError(f"{name} must be {wanted}, got {value!r}")
        options[name] = number
    if options["proj_clip"] is not None and info is not None and not info.proj_size:
        raise ValueError(
            f"proj_clip={proj_clip!r} clips the projected output, but the parameters have no projection "
            "(no weight_hr); pass proj_clip=None or use parameters with a projection"
        )
    return options


def check_sizes(input_size, hidden_size) -> None:
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be a positive int, got {value}")


def expected_shapes(input_size: int, hidden_size: int, independent_recurrence: bool,
                    proj_size: int = 0) -> dict:
    """Concrete shape of every canonical parameter for the given sizes (``weight_hr`` only when
    ``proj_size`` > 0; the peephole weights always, for when they are present)."""
    sizes = {"I": input_size, "H": hidden_size, "4H": 4 * hidden_size, "5H": 5 * hidden_size,
             "P": proj_size}
    shapes = {name: tuple(sizes[s] for s in dims) for name, dims in PARAM_SHAPES.items()}
    shapes.update({name: tuple(sizes[s] for s in dims) for name, dims in VARIANT_PARAM_SHAPES.items()})
    if independent_recurrence:
        shapes["weight_hh"] = (hidden_size,)
    if proj_size:
        shapes["weight_hh"] = (hidden_size, proj_size)
    else:
        del shapes["weight_hr"]
    return shapes


def _symbolic_shape(name: str, independent: bool, projected: bool) -> str:
    if name == "weight_hh" and independent:
        return "H"
    if name == "weight_hh" and projected:
        return "H,P"
    return ",".join(PARAM_SHAPES.get(name) or VARIANT_PARAM_SHAPES[name])


def check_params(params, *, shape_of=None, dtype_of=None, argument="params",
                 allowed=SPEC_DTYPES) -> LayerInfo:
    """Check a canonical parameter mapping and return what it describes.

    ``shape_of``/``dtype_of`` read a value's shape and dtype name; by default they require NumPy arrays.
    Backends pass their own so that one set of rules covers every framework, and ``allowed`` the
    dtype names they compute in (e.g. adding ``"bfloat16"``).
    """
    if not isinstance(params, Mapping):
        raise TypeError(
            f"{argument} must be a mapping of parameter name to array, got {type(params).__name__}"
        )
    unknown = sorted(set(params) - set(PARAM_SHAPES) - set(VARIANT_PARAM_SHAPES))
    if unknown:
        raise ValueError(
            f"{argument} has unknown keys {unknown}; expected only {list(PARAM_SHAPES)} and, for the "
            f"variants, {list(VARIANT_PARAM_SHAPES)}"
        )
    missing = [w for w in ("weight_ih", "weight_hh", "weight_mh") if w not in params]
    if missing:
        raise ValueError(f"{argument} is missing {missing}; the three weights are always required")
    if shape_of is None:
        for name, value in params.items():
            check_ndarray(value, f"{argument}[{name!r}]")
        shape_of = lambda v: v.shape  # noqa: E731
        dtype_of = lambda v: v.dtype.name  # noqa: E731
    shapes = {name: tuple(shape_of(v)) for name, v in params.items()}
    dtypes = {name: dtype_name(dtype_of(v)) for name, v in params.items()}
    for name, dt in dtypes.items():
        check_dtype(dt, f"{argument}[{name!r}]", allowed)
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"{argument} mixes dtypes {dtypes}; all parameters must share one dtype")
    w_ih = shapes["weight_ih"]
    if len(w_ih) != 2 or w_ih[0] % 5 or w_ih[0] == 0 or w_ih[1] == 0:
        raise ValueError(
            f"{argument}['weight_ih'] must have shape (5H, I) with H, I >= 1, got {w_ih}"
        )
    hidden, inputs = w_ih[0] // 5, w_ih[1]
    independent = len(shapes["weight_hh"]) == 1
    proj_size = _projection_size(shapes, hidden, independent, argument, w_ih)
    peepholes = [name for name in PEEPHOLE_WEIGHTS if name in params]
    if peepholes and len(peepholes) != len(PEEPHOLE_WEIGHTS):
        missing = [name for name in PEEPHOLE_WEIGHTS if name not in params]
        raise ValueError(
            f"{argument} has {peepholes} but not {missing}; peepholes need all three of "
            f"{list(PEEPHOLE_WEIGHTS)} (gates i, f, o)"
        )
    expected = expected_shapes(inputs, hidden, independent, proj_size)
    for name, shape in shapes.items():
        if shape != expected[name]:
            dims = _symbolic_shape(name, independent, bool(proj_size))
            sizes = f"I={inputs}, H={hidden}" + (f", P={proj_size}" if proj_size else "")
            raise ValueError(
                f"{argument}[{name!r}] must have shape ({dims}) = {expected[name]} for "
                f"{sizes} (read from weight_ih {w_ih}" + (" and weight_hr" if proj_size else "")
                + f"), got {shape}"
            )
    return LayerInfo(
        input_size=inputs,
        hidden_size=hidden,
        independent_recurrence=independent,
        dtype=dtypes["weight_ih"],
        proj_size=proj_size,
        peepholes=bool(peepholes),
        **{flag: key in params for key, flag in BIAS_FLAGS.items()},
    )


def _projection_size(shapes, hidden, independent, argument, w_ih) -> int:
    """P from ``weight_hr`` (P, H), 1 <= P < H; 0 when absent."""
    if "weight_hr" not in shapes:
        return 0
    w_hr = shapes["weight_hr"]
    if len(w_hr) != 2 or w_hr[1] != hidden or not 1 <= w_hr[0] < hidden:
        raise ValueError(
            f"{argument}['weight_hr'] must have shape (P, H) with 1 <= P < H = {hidden} (H read from "
            f"weight_ih {w_ih}), got {w_hr}"
        )
    if independent:
        raise ValueError(
            f"{argument} has a vector weight_hh {shapes['weight_hh']} (independent recurrence) and a "
            f"projection weight_hr {w_hr}; they cannot be combined: the vector multiplies h element-wise, "
            f"which needs h to be H = {hidden} wide, but the projection makes it P = {w_hr[0]} wide"
        )
    return int(w_hr[0])


def check_stack(layers, *, shape_of=None, dtype_of=None, argument="params",
                allowed=SPEC_DTYPES) -> list[LayerInfo]:
    """Check a stack: a non-empty list of canonical mappings, first layer first.

    Each layer must be valid (:func:`check_params`), all layers must share one dtype and one set of
    options, and layer ``l > 0`` must take the previous layer's output as input
    (``I_l = H_{l-1}``, or ``P_{l-1}`` with a projection) with the same hidden size. Returns one :class:`LayerInfo` per layer.
    Errors name the layer as ``params[l]``.
    """
    if isinstance(layers, (Mapping, str, bytes)) or not isinstance(layers, (list, tuple)) or not layers:
        raise TypeError(
            f"{argument} must be a non-empty list of canonical mappings (one per layer), "
            f"got {type(layers).__name__}" + (" of length 0" if isinstance(layers, (list, tuple)) else "")
        )
    single = len(layers) == 1
    infos = [
        check_params(p, shape_of=shape_of, dtype_of=dtype_of, allowed=allowed,
                     argument=argument if single else f"{argument}[{i}]")
        for i, p in enumerate(layers)
    ]
    first = infos[0]
    for i, info in enumerate(infos[1:], start=1):
        if info.options != first.options or info.dtype != first.dtype:
            raise ValueError(
                f"{argument}[{i}] has options {info.options} and dtype {info.dtype}, but {argument}[0] "
                f"has {first.options} and {first.dtype}; a stack shares one set"
            )
        previous = infos[i - 1]
        if info.input_size != previous.output_size or info.hidden_size != first.hidden_size:
            size = "proj_size" if previous.proj_size else "hidden_size"
            raise ValueError(
                f"{argument}[{i}] must take input_size = {size} of layer {i - 1} ({previous.output_size}) "
                f"and have hidden_size {first.hidden_size}, got I={info.input_size}, H={info.hidden_size}"
            )
    return infos



def check_directional_stack(layers, directions: int, *, shape_of=None, dtype_of=None, argument="params",
                            allowed=SPEC_DTYPES) -> list[LayerInfo]:
    """:func:`check_stack` for ``directions`` mappings per layer in ``torch.nn.LSTM``'s order (layer 0
    forward, layer 0 reverse, layer 1 forward, ...): each layer after the first takes the directions'
    outputs concatenated. Errors name the mapping as ``{argument}[k]``."""
    if len(layers) % directions:
        raise ValueError(f"{argument} holds {len(layers)} mappings; a stack with {directions} directions needs "
                         f"a multiple of {directions} (layer 0 forward, layer 0 reverse, layer 1 forward, ...)")
    infos = [check_stack([layer], shape_of=shape_of, dtype_of=dtype_of, argument=f"{argument}[{k}]",
                         allowed=allowed)[0] for k, layer in enumerate(layers)]
    first = infos[0]
    for k, info in enumerate(infos):
        want_input = first.input_size if k < directions else directions * first.output_size
        if info.options != first.options or info.dtype != first.dtype:
            raise ValueError(f"{argument}[{k}] has options {info.options} and dtype {info.dtype}, but "
                             f"{argument}[0] has {first.options} and {first.dtype}; a stack shares one set")
        if info.input_size != want_input or info.hidden_size != first.hidden_size:
            raise ValueError(f"{argument}[{k}] (layer {k // directions}, direction {k % directions}) must have "
                             f"I={want_input} and H={first.hidden_size}, got I={info.input_size}, "
                             f"H={info.hidden_size}")
    return infos

def check_ndarray(value, argument) -> None:
    """``value`` must be a NumPy array, and not an ``np.matrix``: that stays 2-D under indexing and
    reductions, which breaks the equations' shapes far from the argument that caused it."""
    if isinstance(value, np.matrix):
        raise TypeError(f"{argument} must be a numpy.ndarray, got numpy.matrix (always 2-D); "
                        "pass np.asarray(value)")
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{argument} must be a numpy.ndarray, got {type(value).__name__}")


def check_dtype(dtype, argument, allowed=SPEC_DTYPES) -> str:
    name = dtype_name(dtype)
    if name not in allowed:
        raise TypeError(f"{argument} must have a floating dtype in {allowed}, got {name}")
    return name


def check_sequence(shape, dtype, info: LayerInfo, argument="xs", allowed=SPEC_DTYPES) -> bool:
    """Check an input sequence (B, T, I) or (T, I) against the layer; returns True when batched."""
    shape = tuple(shape)
    if len(shape) not in (2, 3):
        raise ValueError(
            f"{argument} must have shape (B, T, I) or (T, I), got {len(shape)} dimensions {shape}"
        )
    if shape[-1] != info.input_size:
        raise ValueError(
            f"{argument} must have I={info.input_size} features in its last dimension "
            f"(from the parameters), got shape {shape}"
        )
    if 0 in shape:
        raise ValueError(f"{argument} must have at least one step and one batch row, got {shape}")
    check_same_dtype(dtype, info.dtype, argument, allowed)
    return len(shape) == 3


def check_same_dtype(dtype, param_dtype, argument, allowed=SPEC_DTYPES) -> None:
    name = check_dtype(dtype, argument, allowed)
    if name != param_dtype:
        raise TypeError(
            f"{argument} has dtype {name} but the parameters are {param_dtype}; "
            "convert one explicitly (nothing is cast silently)"
        )


def check_state(state, batch_shape, info: LayerInfo, argument="state", allowed=SPEC_DTYPES,
                shape_of=np.shape, dtype_of=lambda v: v.dtype) -> None:
    """Check an ``(h, c)`` pair: ``batch_shape + (P or H,)`` and ``batch_shape + (H,)``, in the
    parameters' dtype (h is P wide with a projection)."""
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError(
            f"{argument} must be a pair (h, c) of arrays, got {type(state).__name__}"
            + (f" of length {len(state)}" if isinstance(state, (tuple, list)) else "")
        )
    for name, value, width in zip(("h", "c"), state, (info.output_size, info.hidden_size)):
        want = tuple(batch_shape) + (width,)
        if shape_of is np.shape:
            check_ndarray(value, f"{argument} {name}")
        got = tuple(shape_of(value))
        if got != want:
            raise ValueError(
                f"{argument} {name} must have shape {want}"
                + (" (h is P wide: the projection's output)" if name == "h" and info.proj_size else "")
                + f", got {got}"
            )
        check_same_dtype(dtype_of(value), info.dtype, f"{argument} {name}", allowed)
