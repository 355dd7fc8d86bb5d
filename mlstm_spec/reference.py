"""The public NumPy functions: validated wrappers around :mod:`mlstm_spec.equations`.

They accept batched ``(B, ...)`` and unbatched inputs, keep the inputs' dtype, and compute float16 in
float32 (so nothing overflows) before rounding the results back to float16.

The variants (see :mod:`mlstm_spec.equations`): a projection and peepholes are read from the parameters
present; ``cell_clip``, ``proj_clip`` and ``forget_bias`` are keyword arguments, off by default. With a
projection of size P, ``h`` (the output and the first half of the state) is P wide and ``c`` H wide.
"""

from __future__ import annotations

import numpy as np

from . import equations
from .validation import (
    check_integration_mode, check_ndarray, check_params, check_runtime_options, check_same_dtype, check_sequence,
    check_state,
)


def _compute_dtype(dtype: str):
    return np.float32 if dtype == "float16" else np.dtype(dtype)


def _prepare(params, xs, state, xs_argument):
    """Validate, add a batch axis if missing, and cast to the compute dtype."""
    info = check_params(params)
    check_ndarray(xs, xs_argument)
    batched = check_sequence(xs.shape, xs.dtype, info, xs_argument)
    if not batched:
        xs = xs[None]
    B = xs.shape[0]
    work = _compute_dtype(info.dtype)
    if state is None:
        h0 = np.zeros((B, info.output_size), dtype=work)
        c0 = np.zeros((B, info.hidden_size), dtype=work)
    else:
        check_state(state, (B,) if batched else (), info)
        h0 = np.asarray(state[0], dtype=work).reshape(B, info.output_size)
        c0 = np.asarray(state[1], dtype=work).reshape(B, info.hidden_size)
    params = {k: v.astype(work, copy=False) for k, v in params.items()}
    return info, batched, params, xs.astype(work, copy=False), h0, c0


def forward(params, xs, state=None, *, integration_mode="addition", cell_clip=None, proj_clip=None,
            forget_bias=0.0):
    """Run the mLSTM over a sequence.

    Args:
        params: canonical parameter mapping (see :func:`mlstm_spec.init_params`).
        xs: inputs, (B, T, I) batch-major or (T, I) unbatched.
        state: ``(h0, c0)``, each (B, H) or (H,) (h0 (B, P) or (P,) with a projection); ``None``
            means zeros.
        integration_mode: ``"addition"`` or ``"multiplicative_integration"``.
        cell_clip: ``None`` (off) or a bound: the cell state is clipped to ``[-cell_clip, cell_clip]``.
        proj_clip: ``None`` (off) or a bound for the projected output (needs ``weight_hr``).
        forget_bias: a constant added to the forget gate's pre-activation (0.0: off).

    Returns:
        ``hs, (h_T, c_T)``: hs is (B, T, H) or (T, H) (P wide with a projection); the final state
        like ``state``.
    """
    return _forward(params, xs, state, integration_mode, "xs",
                    dict(cell_clip=cell_clip, proj_clip=proj_clip, forget_bias=forget_bias))


def _forward(params, xs, state, integration_mode, xs_argument, runtime):
    multiplicative = check_integration_mode(integration_mode)
    info, batched, p, xs_, h0, c0 = _prepare(params, xs, state, xs_argument)
    options = check_runtime_options(info, **runtime)
    hs, (h, c), _ = equations.run_forward(p, xs_, h0, c0, multiplicative, **options)
    out = np.dtype(info.dtype)
    if not batched:
        hs, h, c = hs[0], h[0], c[0]
    return hs.astype(out, copy=False), (h.astype(out, copy=False), c.astype(out, copy=False))


def cell(params, x, state=None, *, integration_mode="addition", cell_clip=None, proj_clip=None,
         forget_bias=0.0):
    """One step: ``x`` (B, I) or (I,), ``state`` (h, c) each (B, H) or (H,) (h (B, P) or (P,) with a
    projection). Returns ``h, (h, c)``. The keyword options are those of :func:`forward`."""
    check_ndarray(x, "x")
    if x.ndim not in (1, 2):
        raise ValueError(f"x must have shape (B, I) or (I,), got {x.ndim} dimensions {x.shape}")
    input_size = check_params(params).input_size
    if x.shape[-1] != input_size or x.size == 0:
        # Checked here so the message shows the shape given, not the (B, 1, I) sequence made from it.
        raise ValueError(
            f"x must have shape (B, I) or (I,) with I={input_size} (from the parameters) and B >= 1, "
            f"got {x.shape}"
        )
    _, (h, c) = _forward(params, x[..., None, :], state, integration_mode, "x",
                         dict(cell_clip=cell_clip, proj_clip=proj_clip, forget_bias=forget_bias))
    return h, (h, c)


def backward(params, xs, state, d_hs, d_state=None, *, integration_mode="addition", cell_clip=None,
             proj_clip=None, forget_bias=0.0):
    """Analytic back-propagation through time.

    Args:
        params, xs, state, integration_mode, cell_clip, proj_clip, forget_bias: as for :func:`forward`.
        d_hs: gradient of the loss with respect to ``hs``, same shape and dtype as ``hs``.
        d_state: ``(d_h_T, d_c_T)`` with respect to the final state, or ``None`` for zeros.

    Returns:
        A dict with the gradient of every parameter present in ``params`` (same keys, shapes) and
        ``"x"`` (like ``xs``), ``"h0"`` and ``"c0"`` (like the state), in the inputs' dtype.
    """
    multiplicative = check_integration_mode(integration_mode)
    info, batched, p, xs_, h0, c0 = _prepare(params, xs, state, "xs")
    options = check_runtime_options(info, cell_clip=cell_clip, proj_clip=proj_clip, forget_bias=forget_bias)
    B, T = xs_.shape[:2]
    H, out_size = info.hidden_size, info.output_size
    want = (B, T, out_size) if batched else (T, out_size)
    check_ndarray(d_hs, "d_hs")
    if d_hs.shape != want:
        raise ValueError(f"d_hs must have the shape of hs {want}, got {d_hs.shape}")
    check_same_dtype(d_hs.dtype, info.dtype, "d_hs")
    work = h0.dtype
    if d_state is None:
        d_hT = np.zeros((B, out_size), dtype=work)
        d_cT = np.zeros((B, H), dtype=work)
    else:
        check_state(d_state, (B,) if batched else (), info, argument="d_state")
        d_hT = np.asarray(d_state[0], dtype=work).reshape(B, out_size)
        d_cT = np.asarray(d_state[1], dtype=work).reshape(B, H)
    grads = equations.run_backward(
        p, xs_, h0, c0, d_hs.astype(work, copy=False).reshape(B, T, out_size), d_hT, d_cT, multiplicative,
        **options,
    )
    if not batched:
        grads.update(x=grads["x"][0], h0=grads["h0"][0], c0=grads["c0"][0])
    out = np.dtype(info.dtype)
    return {k: v.astype(out, copy=False) for k, v in grads.items()}
