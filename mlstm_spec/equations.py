"""The mLSTM equations, once: one step forward, a sequence forward, and its analytic backward.

This is RecurrentLayers.jl's ``MultiplicativeLSTMCell`` as its *code* computes it (v0.3.4), written
batch-major in NumPy. For input ``x`` (B, I) and state ``(h, c)`` (each (B, H)):

    p = x @ weight_ih.T + bias_ih                    blocks  m, i, o, f, z   (each H wide)
    r = h @ weight_hh.T + bias_hh                    (h * weight_hh + bias_hh if weight_hh is a vector)
    m = p_m * r
    q = m @ weight_mh.T + bias_mh                    blocks  i, o, f, z
    a_g = p_g + q_g        (integration_mode="addition")
    a_g = p_g * q_g        (integration_mode="multiplicative_integration")
    i, o, f = sigmoid(a_i), sigmoid(a_o), sigmoid(a_f);   z = tanh(a_z)
    c' = f * c + i * z
    h' = o * tanh(c')

A switched-off bias is simply not added. ``docs/equations.md`` states the same in mathematical notation;
``tests/test_docs.py`` checks its tables, and the block lines of this docstring, against the constants
below, so neither can drift from the code.
"""

from __future__ import annotations

import numpy as np

#: Row blocks of ``weight_ih`` / ``bias_ih``, in order. Block k is rows ``k*H:(k+1)*H``.
IH_BLOCKS = ("m", "i", "o", "f", "z")
#: Row blocks of ``weight_mh`` / ``bias_mh``, in order.
MH_BLOCKS = ("i", "o", "f", "z")
#: The two ways the input and multiplicative projections are combined.
INTEGRATION_MODES = ("addition", "multiplicative_integration")
#: Logical shapes of every canonical parameter, in terms of the input size I and hidden size H.
#: ``weight_hh`` is ``("H",)`` under independent recurrence.
PARAM_SHAPES = {
    "weight_ih": ("5H", "I"),
    "weight_hh": ("H", "H"),
    "weight_mh": ("4H", "H"),
    "bias_ih": ("5H",),
    "bias_hh": ("H",),
    "bias_mh": ("4H",),
}
#: Which option switches each bias on.
BIAS_FLAGS = {"bias_ih": "bias", "bias_hh": "recurrent_bias", "bias_mh": "multiplicative_bias"}


def sigmoid(a):
    """Logistic function that never overflows: ``exp`` only ever sees ``-|a|``."""
    e = np.exp(-np.abs(a))
    return np.where(a >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(a.dtype, copy=False)


def _recurrent(params, h):
    """``r = weight_hh h + bias_hh``, the recurrent factor of the multiplicative state."""
    w = params["weight_hh"]
    r = h * w if w.ndim == 1 else h @ w.T
    if "bias_hh" in params:
        r = r + params["bias_hh"]
    return r


def _step(params, p, h, c, multiplicative):
    """One step from the precomputed input projection ``p`` (B, 5H). Returns the new state and a
    tape of intermediates for the backward pass."""
    H = h.shape[-1]
    p_m, p_gates = p[:, :H], p[:, H:]
    r = _recurrent(params, h)
    m = p_m * r
    q = m @ params["weight_mh"].T
    if "bias_mh" in params:
        q = q + params["bias_mh"]
    a = p_gates * q if multiplicative else p_gates + q
    i, o, f = sigmoid(a[:, :H]), sigmoid(a[:, H : 2 * H]), sigmoid(a[:, 2 * H : 3 * H])
    z = np.tanh(a[:, 3 * H :])
    c_new = f * c + i * z
    tanh_c = np.tanh(c_new)
    h_new = o * tanh_c
    tape = dict(h=h, c=c, r=r, m=m, q=q, p=p, i=i, o=o, f=f, z=z, tanh_c=tanh_c)
    return h_new, c_new, tape


def input_projection(params, xs):
    """``weight_ih x_t + bias_ih`` for every step at once: (B, T, I) -> (B, T, 5H)."""
    p = xs @ params["weight_ih"].T
    if "bias_ih" in params:
        p = p + params["bias_ih"]
    return p


def run_forward(params, xs, h0, c0, multiplicative, keep_tape=False):
    """The time loop on validated, batched arrays: xs (B, T, I), h0 and c0 (B, H).

    Returns ``hs`` (B, T, H), ``(h_T, c_T)``, and the per-step tapes when ``keep_tape``.
    """
    p_all = input_projection(params, xs)
    B, T = xs.shape[:2]
    hs = np.empty((B, T, h0.shape[-1]), dtype=h0.dtype)
    tapes = []
    h, c = h0, c0
    for t in range(T):
        h, c, tape = _step(params, p_all[:, t], h, c, multiplicative)
        hs[:, t] = h
        if keep_tape:
            tapes.append(tape)
    return hs, (h, c), tapes


def run_backward(params, xs, h0, c0, d_hs, d_hT, d_cT, multiplicative):
    """Back-propagation through time on validated, batched arrays.

    Given the gradient of a loss with respect to every output ``d_hs`` (B, T, H) and to the final
    state ``(d_hT, d_cT)``, returns the gradient with respect to every parameter present and to
    ``x``, ``h0`` and ``c0``.
    """
    _, _, tapes = run_forward(params, xs, h0, c0, multiplicative, keep_tape=True)
    B, T, _ = xs.shape
    H = h0.shape[-1]
    w_hh, w_mh = params["weight_hh"], params["weight_mh"]
    d_p_all = np.empty((B, T, 5 * H), dtype=h0.dtype)
    d_w_hh = np.zeros_like(w_hh)
    d_w_mh = np.zeros_like(w_mh)
    d_b_hh = np.zeros(H, dtype=h0.dtype)
    d_b_mh = np.zeros(4 * H, dtype=h0.dtype)
    d_h, d_c = d_hT, d_cT
    for t in reversed(range(T)):
        s = tapes[t]
        d_h = d_h + d_hs[:, t]
        # h' = o * tanh(c');  c' = f c + i z
        d_o = d_h * s["tanh_c"]
        d_c = d_c + d_h * s["o"] * (1 - s["tanh_c"] ** 2)
        d_a = np.concatenate(
            [
                d_c * s["z"] * s["i"] * (1 - s["i"]),
                d_o * s["o"] * (1 - s["o"]),
                d_c * s["c"] * s["f"] * (1 - s["f"]),
                d_c * s["i"] * (1 - s["z"] ** 2),
            ],
            axis=1,
        )
        p_gates = s["p"][:, H:]
        if multiplicative:
            d_p_gates, d_q = d_a * s["q"], d_a * p_gates
        else:
            d_p_gates, d_q = d_a, d_a
        d_w_mh += d_q.T @ s["m"]
        d_b_mh += d_q.sum(axis=0)
        d_m = d_q @ w_mh
        d_r = d_m * s["p"][:, :H]
        d_p_all[:, t, :H] = d_m * s["r"]
        d_p_all[:, t, H:] = d_p_gates
        if w_hh.ndim == 1:
            d_w_hh += (d_r * s["h"]).sum(axis=0)
            d_h = d_r * w_hh
        else:
            d_w_hh += d_r.T @ s["h"]
            d_h = d_r @ w_hh
        d_b_hh += d_r.sum(axis=0)
        d_c = d_c * s["f"]
    d_p_flat = d_p_all.reshape(B * T, 5 * H)
    grads = {
        "weight_ih": d_p_flat.T @ xs.reshape(B * T, -1),
        "weight_hh": d_w_hh,
        "weight_mh": d_w_mh,
        "bias_ih": d_p_flat.sum(axis=0),
        "bias_hh": d_b_hh,
        "bias_mh": d_b_mh,
    }
    grads = {name: g for name, g in grads.items() if name in params}
    grads.update(x=d_p_all @ params["weight_ih"], h0=d_h, c0=d_c)
    return grads
