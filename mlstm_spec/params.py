"""Initialisers: the canonical parameter mapping of one layer, drawn like RecurrentLayers.jl draws it."""

from __future__ import annotations

import numpy as np

from .equations import BIAS_FLAGS, IH_BLOCKS, MH_BLOCKS, PEEPHOLE_WEIGHTS
from .validation import check_dtype, check_sizes, expected_shapes

WEIGHT_INITS = ("glorot_uniform", "orthogonal")


def _rng(rng) -> np.random.Generator:
    if rng is None or isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(rng)
    if isinstance(rng, np.random.Generator):
        return rng
    raise TypeError(f"rng must be None, an int seed or a numpy.random.Generator, got {type(rng).__name__}")


def glorot_uniform(rng: np.random.Generator, shape) -> np.ndarray:
    """``U(-a, a)`` with ``a = sqrt(6 / (fan_in + fan_out))`` over the whole (stacked) matrix.

    A vector of length H counts as an H x 1 matrix (fan_out = H, fan_in = 1), as Flux does.
    """
    fan_out, fan_in = (shape[0], 1) if len(shape) == 1 else shape
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape)


def orthogonal(rng: np.random.Generator, shape, blocks: int) -> np.ndarray:
    """Each of the ``blocks`` row blocks is an independent (semi-)orthogonal matrix.

    A vector (independent recurrence) gets random signs: the diagonal of an orthogonal matrix.
    """
    if len(shape) == 1:
        return rng.choice([-1.0, 1.0], size=shape)
    rows, cols = shape[0] // blocks, shape[1]
    parts = []
    for _ in range(blocks):
        a = rng.standard_normal((max(rows, cols), min(rows, cols)))
        q, r = np.linalg.qr(a)
        q = q * np.sign(np.diag(r))  # makes the draw uniform over orthogonal matrices
        parts.append(q if rows >= cols else q.T)
    return np.concatenate(parts, axis=0)


def init_params(
    input_size: int,
    hidden_size: int,
    *,
    rng=None,
    dtype=np.float32,
    bias: bool = True,
    recurrent_bias: bool = True,
    multiplicative_bias: bool = True,
    independent_recurrence: bool = False,
    weight_init: str = "glorot_uniform",
    proj_size: int = 0,
    peepholes: bool = False,
    unit_forget_bias: bool = False,
    forget_bias_init: float = 0.0,
) -> dict:
    """Draw one layer's canonical parameters.

    Defaults match RecurrentLayers.jl: ``glorot_uniform`` over each whole stacked matrix, biases zero,
    no forget-gate offset. ``weight_init="orthogonal"`` draws each gate block orthogonal instead.

    Variants (off by default): ``proj_size=P`` (1 <= P < hidden_size) adds ``weight_hr`` (P, H) and
    makes ``weight_hh`` (H, P); ``peepholes=True`` adds ``weight_ci``, ``weight_cf``, ``weight_co``
    (each (H,), drawn with the vector rule of ``glorot_uniform`` whatever ``weight_init`` is).

    Forget-gate initialisation: ``unit_forget_bias=True`` (Keras's name) sets the forget block of
    ``bias_ih`` to 1; ``forget_bias_init=b`` sets it to ``b`` (Krause's training code uses 3.0). Both
    need ``bias=True``. They are initial values of a trained parameter, unlike the run-time
    ``forget_bias`` of ``forward``, a constant added at every step.

    Weights are drawn in the order weight_ih, weight_hh, weight_mh, then weight_hr, weight_ci,
    weight_cf, weight_co when present, in float64, then cast to ``dtype``; so the variants leave the
    draws of a layer without them unchanged.
    """
    check_sizes(input_size, hidden_size)
    try:
        dtype = np.dtype(dtype)
    except TypeError:  # a name NumPy does not know (e.g. "bfloat16"): check_dtype names the argument
        pass
    dtype_str = check_dtype(dtype, "dtype")
    if weight_init not in WEIGHT_INITS:
        raise ValueError(f"weight_init must be one of {WEIGHT_INITS}, got {weight_init!r}")
    _check_proj_size(proj_size, hidden_size, independent_recurrence)
    forget_value = _initial_forget_bias(unit_forget_bias, forget_bias_init, bias)
    generator = _rng(rng)
    shapes = expected_shapes(input_size, hidden_size, independent_recurrence, proj_size)
    blocks = {"weight_ih": len(IH_BLOCKS), "weight_hh": 1, "weight_mh": len(MH_BLOCKS), "weight_hr": 1}
    names = ["weight_ih", "weight_hh", "weight_mh"] + (["weight_hr"] if proj_size else [])
    params = {}
    for name in names:
        if weight_init == "glorot_uniform":
            params[name] = glorot_uniform(generator, shapes[name])
        else:
            params[name] = orthogonal(generator, shapes[name], blocks[name])
    if peepholes:
        for name in PEEPHOLE_WEIGHTS:
            params[name] = glorot_uniform(generator, shapes[name])
    flags = dict(bias=bias, recurrent_bias=recurrent_bias, multiplicative_bias=multiplicative_bias)
    for name, flag in BIAS_FLAGS.items():
        if flags[flag]:
            params[name] = np.zeros(shapes[name])
    if forget_value:
        block(params["bias_ih"], "f")[:] = forget_value
    return {name: value.astype(dtype_str) for name, value in params.items()}


def _check_proj_size(proj_size, hidden_size, independent_recurrence) -> None:
    """``proj_size``: 0 (no projection) or 1 <= P < hidden_size, and not with a vector weight_hh."""
    if isinstance(proj_size, bool) or not isinstance(proj_size, (int, np.integer)):
        raise TypeError(f"proj_size must be an int (0 for no projection), got {type(proj_size).__name__} "
                        f"{proj_size!r}")
    if not 0 <= proj_size < hidden_size:
        raise ValueError(f"proj_size must be 0 (no projection) or in 1..hidden_size-1 = 1..{hidden_size - 1}, "
                         f"got {proj_size}")
    if proj_size and independent_recurrence:
        raise ValueError(
            f"proj_size={proj_size} cannot be combined with independent_recurrence=True: the vector "
            "weight_hh multiplies h element-wise, which needs h to be hidden_size wide"
        )


def _initial_forget_bias(unit_forget_bias, forget_bias_init, bias) -> float:
    """The value the forget block of ``bias_ih`` starts at (0.0: left at zero)."""
    if isinstance(forget_bias_init, bool) or not isinstance(forget_bias_init, (int, float, np.integer, np.floating)):
        raise TypeError(f"forget_bias_init must be a number, got {type(forget_bias_init).__name__} "
                        f"{forget_bias_init!r}")
    if not np.isfinite(forget_bias_init):
        raise ValueError(f"forget_bias_init must be finite, got {forget_bias_init!r}")
    if unit_forget_bias and forget_bias_init:
        raise ValueError(
            f"unit_forget_bias=True and forget_bias_init={forget_bias_init!r} both set the initial forget "
            "bias; give one (unit_forget_bias=True is forget_bias_init=1.0)"
        )
    value = 1.0 if unit_forget_bias else float(forget_bias_init)
    if value and not bias:
        option = "unit_forget_bias=True" if unit_forget_bias else f"forget_bias_init={forget_bias_init!r}"
        raise ValueError(
            f"{option} sets the forget block of bias_ih, which bias=False leaves out; pass bias=True, or "
            "use the run-time forget_bias of forward/cell/backward instead"
        )
    return value


def block(array, name: str, blocks=IH_BLOCKS):
    """The rows of gate ``name`` in a stacked weight or bias, e.g. ``block(w_ih, "f")``."""
    size = array.shape[0] // len(blocks)
    k = blocks.index(name)
    return array[k * size : (k + 1) * size]
