"""Initialisers: the canonical parameter mapping of one layer, drawn like RecurrentLayers.jl draws it."""

from __future__ import annotations

import numpy as np

from .equations import BIAS_FLAGS, IH_BLOCKS, MH_BLOCKS
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
    forget_bias: float = 0.0,
) -> dict:
    """Draw one layer's canonical parameters.

    Defaults match RecurrentLayers.jl: ``glorot_uniform`` over each whole stacked matrix, biases zero,
    no forget-gate offset. ``weight_init="orthogonal"`` draws each gate block orthogonal instead, and
    ``forget_bias`` adds a constant to the forget block of ``bias_ih`` (or of ``bias_mh`` when
    ``bias=False``), as Krause's training code does with 3.0 -- documented options, never the default.

    Weights are drawn in the order weight_ih, weight_hh, weight_mh, in float64, then cast to ``dtype``.
    """
    check_sizes(input_size, hidden_size)
    try:
        dtype = np.dtype(dtype)
    except TypeError:  # a name NumPy does not know (e.g. "bfloat16"): check_dtype names the argument
        pass
    dtype_str = check_dtype(dtype, "dtype")
    if weight_init not in WEIGHT_INITS:
        raise ValueError(f"weight_init must be one of {WEIGHT_INITS}, got {weight_init!r}")
    if forget_bias and not (bias or multiplicative_bias):
        raise ValueError(
            f"forget_bias={forget_bias} needs bias=True or multiplicative_bias=True to live in"
        )
    generator = _rng(rng)
    shapes = expected_shapes(input_size, hidden_size, independent_recurrence)
    blocks = {"weight_ih": len(IH_BLOCKS), "weight_hh": 1, "weight_mh": len(MH_BLOCKS)}
    params = {}
    for name in ("weight_ih", "weight_hh", "weight_mh"):
        if weight_init == "glorot_uniform":
            params[name] = glorot_uniform(generator, shapes[name])
        else:
            params[name] = orthogonal(generator, shapes[name], blocks[name])
    flags = dict(bias=bias, recurrent_bias=recurrent_bias, multiplicative_bias=multiplicative_bias)
    for name, flag in BIAS_FLAGS.items():
        if flags[flag]:
            params[name] = np.zeros(shapes[name])
    if forget_bias:
        target, order = ("bias_ih", IH_BLOCKS) if bias else ("bias_mh", MH_BLOCKS)
        k = order.index("f")
        params[target][k * hidden_size : (k + 1) * hidden_size] = forget_bias
    return {name: value.astype(dtype_str) for name, value in params.items()}


def block(array, name: str, blocks=IH_BLOCKS):
    """The rows of gate ``name`` in a stacked weight or bias, e.g. ``block(w_ih, "f")``."""
    size = array.shape[0] // len(blocks)
    k = blocks.index(name)
    return array[k * size : (k + 1) * size]
