"""The public NumPy functions: validated wrappers around :mod:`mlstm_spec.equations`.

They accept batched ``(B, ...)`` and unbatched inputs, keep the inputs' dtype, and compute float16 in
float32 (so nothing overflows) before rounding the results back to float16.
"""

from __future__ import annotations

import numpy as np

from . import equations
from .validation import check_integration_mode, check_params, check_same_dtype, check_sequence, check_state


def _compute_dtype(dtype: str):
    return np.float32 if dtype == "float16" else np.dtype(dtype)


def _prepare(params, xs, state, xs_argument):
    """Validate, add a batch axis if missing, and cast to the compute dtype."""
    info = check_params(params)
    if not isinstance(xs, np.ndarray):
        raise TypeError(f"{xs_argument} must be a numpy.ndarray, got {type(xs).__name__}")
    batched = check_sequence(xs.shape, xs.dtype, info, xs_argument)
    if not batched:
        xs = xs[None]
    B = xs.shape[0]
    work = _compute_dtype(info.dtype)
    if state is None:
        h0 = c0 = np.zeros((B, info.hidden_size), dtype=work)
    else:
        check_state(state, (B,) if batched else (), info)
        h0, c0 = (np.asarray(s, dtype=work).reshape(B, info.hidden_size) for s in state)
    params = {k: v.astype(work, copy=False) for k, v in params.items()}
    return info, batched, params, xs.astype(work, copy=False), h0, c0


def forward(params, xs, state=None, *, integration_mode="addition"):
    """Run the mLSTM over a sequence.

    Args:
        params: canonical parameter mapping (see :func:`mlstm_spec.init_params`).
        xs: inputs, (B, T, I) batch-major or (T, I) unbatched.
        state: ``(h0, c0)``, each (B, H) or (H,); ``None`` means zeros.
        integration_mode: ``"addition"`` or ``"multiplicative_integration"``.

    Returns:
        ``hs, (h_T, c_T)``: hs is (B, T, H) or (T, H); the final state like ``state``.
    """
    return _forward(params, xs, state, integration_mode, "xs")


def _forward(params, xs, state, integration_mode, xs_argument):
    multiplicative = check_integration_mode(integration_mode)
    info, batched, p, xs_, h0, c0 = _prepare(params, xs, state, xs_argument)
    hs, (h, c), _ = equations.run_forward(p, xs_, h0, c0, multiplicative)
    out = np.dtype(info.dtype)
    if not batched:
        hs, h, c = hs[0], h[0], c[0]
    return hs.astype(out, copy=False), (h.astype(out, copy=False), c.astype(out, copy=False))


def cell(params, x, state=None, *, integration_mode="addition"):
    """One step: ``x`` (B, I) or (I,), ``state`` (h, c) each (B, H) or (H,). Returns ``h, (h, c)``."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a numpy.ndarray, got {type(x).__name__}")
    if x.ndim not in (1, 2):
        raise ValueError(f"x must have shape (B, I) or (I,), got {x.ndim} dimensions {x.shape}")
    input_size = check_params(params).input_size
    if x.shape[-1] != input_size or x.size == 0:
        # Checked here so the message shows the shape given, not the (B, 1, I) sequence made from it.
        raise ValueError(
            f"x must have shape (B, I) or (I,) with I={input_size} (from the parameters) and B >= 1, "
            f"got {x.shape}"
        )
    _, (h, c) = _forward(params, x[..., None, :], state, integration_mode, "x")
    return h, (h, c)


def backward(params, xs, state, d_hs, d_state=None, *, integration_mode="addition"):
    """Analytic back-propagation through time.

    Args:
        params, xs, state, integration_mode: as for :func:`forward`.
        d_hs: gradient of the loss with respect to ``hs``, same shape and dtype as ``hs``.
        d_state: ``(d_h_T, d_c_T)`` with respect to the final state, or ``None`` for zeros.

    Returns:
        A dict with the gradient of every parameter present in ``params`` (same keys, shapes) and
        ``"x"`` (like ``xs``), ``"h0"`` and ``"c0"`` (like the state), in the inputs' dtype.
    """
    multiplicative = check_integration_mode(integration_mode)
    info, batched, p, xs_, h0, c0 = _prepare(params, xs, state, "xs")
    B, T = xs_.shape[:2]
    H = info.hidden_size
    want = (B, T, H) if batched else (T, H)
    if not isinstance(d_hs, np.ndarray):
        raise TypeError(f"d_hs must be a numpy.ndarray, got {type(d_hs).__name__}")
    if d_hs.shape != want:
        raise ValueError(f"d_hs must have the shape of hs {want}, got {d_hs.shape}")
    check_same_dtype(d_hs.dtype, info.dtype, "d_hs")
    work = h0.dtype
    if d_state is None:
        d_hT = d_cT = np.zeros((B, H), dtype=work)
    else:
        check_state(d_state, (B,) if batched else (), info, argument="d_state")
        d_hT, d_cT = (np.asarray(s, dtype=work).reshape(B, H) for s in d_state)
    grads = equations.run_backward(
        p, xs_, h0, c0, d_hs.astype(work, copy=False).reshape(B, T, H), d_hT, d_cT, multiplicative
    )
    if not batched:
        grads.update(x=grads["x"][0], h0=grads["h0"][0], c0=grads["c0"][0])
    out = np.dtype(info.dtype)
    return {k: v.astype(out, copy=False) for k, v in grads.items()}
