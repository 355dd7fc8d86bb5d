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

A switched-off bias is simply not added.

Variants, each off by default (and then not computed at all, so the default results are bit for bit
those of the formulation above). Structural ones are read from the parameters present; run-time ones
are keyword arguments of ``cell``/``forward``/``backward``:

    projection   weight_hr (P, H), 1 <= P < H:  h' = clip(weight_hr @ (o * tanh(c')), proj_clip); the state
                 h is P wide, so weight_hh is (H, P) (a vector weight_hh cannot take it)
    peepholes    weight_ci, weight_cf, weight_co (each (H,)):  a_i += weight_ci * c,  a_f += weight_cf * c,
                 a_o += weight_co * c'  (c the previous cell state, c' the new one), added after the
                 integration of p and q in either integration mode
    cell_clip    c' = clip(f * c + i * z, cell_clip): the clipped value feeds o's peephole, the output and
                 the next step
    proj_clip    clips the projected h' (needs a projection)
    forget_bias  a_f += forget_bias, a constant added last

``clip(v, b)`` is ``min(max(v, -b), b)``; its derivative is taken as 1 on the closed interval
``[-b, b]`` and 0 outside (as TensorFlow's ``clip_by_value`` and ``torch.clamp`` define it).

``docs/equations.md`` states the same in mathematical notation; ``tests/test_docs.py`` checks its
tables, and the block lines of this docstring, against the constants below, so neither can drift from
the code.
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
#: ``weight_hh`` is ``("H",)`` under independent recurrence and ``("H", "P")`` with a projection.
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

#: Parameters of the structural variants, present only when the variant is on; P is the projection size.
VARIANT_PARAM_SHAPES = {
    "weight_hr": ("P", "H"),
    "weight_ci": ("H",),
    "weight_cf": ("H",),
    "weight_co": ("H",),
}
#: Which ``init_params`` option adds each variant parameter.
VARIANT_FLAGS = {"weight_hr": "proj_size", "weight_ci": "peepholes", "weight_cf": "peepholes",
                 "weight_co": "peepholes"}
#: The peephole weights, for the gates i, f, o in that order; all three or none.
PEEPHOLE_WEIGHTS = ("weight_ci", "weight_cf", "weight_co")
#: Run-time options of ``cell`` / ``forward`` / ``backward`` and the defaults that switch them off.
RUNTIME_DEFAULTS = {"cell_clip": None, "proj_clip": None, "forget_bias": 0.0}


def sigmoid(a):
    """Logistic function that never overflows: ``exp`` only ever sees ``-|a|``."""
    e = np.exp(-np.abs(a))
    return np.where(a >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(a.dtype, copy=False)


def clip(value, bound):
    """``value`` limited to ``[-bound, bound]`` (NaN stays NaN)."""
    return np.clip(value, -bound, bound)


def clip_gradient(d_value, value, bound):
    """The gradient through :func:`clip`: passed where ``|value| <= bound`` (both ends included, as
    TensorFlow and torch do), zero where the value was clipped."""
    return np.where(np.abs(value) > bound, 0.0, d_value).astype(d_value.dtype, copy=False)


def _gates(H):
    """Column slices of the i, o, f, z blocks of the gate pre-activations (B, 4H), by MH_BLOCKS."""
    return tuple(slice(k * H, (k + 1) * H) for k in (MH_BLOCKS.index(g) for g in "iofz"))


def _recurrent(params, h):
    """``r = weight_hh h + bias_hh``, the recurrent factor of the multiplicative state."""
    w = params["weight_hh"]
    r = h * w if w.ndim == 1 else h @ w.T
    if "bias_hh" in params:
        r = r + params["bias_hh"]
    return r


def _step(params, p, h, c, multiplicative, cell_clip=None, proj_clip=None, forget_bias=0.0):
    """One step from the precomputed input projection ``p`` (B, 5H). Returns the new state and a
    tape of intermediates for the backward pass."""
    H = c.shape[-1]
    gate_i, gate_o, gate_f, gate_z = _gates(H)
    peepholes = "weight_ci" in params
    p_m, p_gates = p[:, :H], p[:, H:]
    r = _recurrent(params, h)
    m = p_m * r
    q = m @ params["weight_mh"].T
    if "bias_mh" in params:
        q = q + params["bias_mh"]
    a = p_gates * q if multiplicative else p_gates + q
    if peepholes or forget_bias:
        a = a.copy()
        if peepholes:
            a[:, gate_i] += params["weight_ci"] * c
            a[:, gate_f] += params["weight_cf"] * c
        if forget_bias:
            a[:, gate_f] += forget_bias
    i, f = sigmoid(a[:, gate_i]), sigmoid(a[:, gate_f])
    z = np.tanh(a[:, gate_z])
    c_new = f * c + i * z
    tape = dict(h=h, c=c, r=r, m=m, q=q, p=p, i=i, f=f, z=z)
    if cell_clip is not None:
        tape["c_unclipped"] = c_new
        c_new = clip(c_new, cell_clip)
    a_o = a[:, gate_o]
    if peepholes:
        a_o = a_o + params["weight_co"] * c_new
        tape["c_new"] = c_new
    o = sigmoid(a_o)
    tanh_c = np.tanh(c_new)
    h_new = o * tanh_c
    if "weight_hr" in params:
        tape["k"] = h_new
        h_new = h_new @ params["weight_hr"].T
        if proj_clip is not None:
            tape["h_unclipped"] = h_new
            h_new = clip(h_new, proj_clip)
    tape.update(o=o, tanh_c=tanh_c)
    return h_new, c_new, tape


def input_projection(params, xs):
    """``weight_ih x_t + bias_ih`` for every step at once: (B, T, I) -> (B, T, 5H)."""
    p = xs @ params["weight_ih"].T
    if "bias_ih" in params:
        p = p + params["bias_ih"]
    return p


def run_forward(params, xs, h0, c0, multiplicative, keep_tape=False, *, cell_clip=None, proj_clip=None,
                forget_bias=0.0):
    """The time loop on validated, batched arrays: xs (B, T, I), h0 (B, P or H) and c0 (B, H).

    ``cell_clip``, ``proj_clip`` and ``forget_bias`` are the run-time options (validated; ``None`` /
    ``0.0`` switch them off). Returns ``hs`` (B, T, P or H), ``(h_T, c_T)``, and the per-step tapes
    when ``keep_tape``.
    """
    p_all = input_projection(params, xs)
    B, T = xs.shape[:2]
    hs = np.empty((B, T, h0.shape[-1]), dtype=h0.dtype)
    tapes = []
    h, c = h0, c0
    for t in range(T):
        h, c, tape = _step(params, p_all[:, t], h, c, multiplicative, cell_clip, proj_clip, forget_bias)
        hs[:, t] = h
        if keep_tape:
            tapes.append(tape)
    return hs, (h, c), tapes


def run_backward(params, xs, h0, c0, d_hs, d_hT, d_cT, multiplicative, *, cell_clip=None, proj_clip=None,
                 forget_bias=0.0):
    """Back-propagation through time on validated, batched arrays.

    Given the gradient of a loss with respect to every output ``d_hs`` (B, T, P or H) and to the final
    state ``(d_hT, d_cT)``, returns the gradient with respect to every parameter present and to
    ``x``, ``h0`` and ``c0``. The run-time options are those of :func:`run_forward`.
    """
    _, _, tapes = run_forward(params, xs, h0, c0, multiplicative, keep_tape=True, cell_clip=cell_clip,
                              proj_clip=proj_clip, forget_bias=forget_bias)
    B, T, _ = xs.shape
    H = c0.shape[-1]
    gate_i, _, gate_f, _ = _gates(H)
    peepholes = "weight_ci" in params
    projection = "weight_hr" in params
    w_hh, w_mh = params["weight_hh"], params["weight_mh"]
    d_p_all = np.empty((B, T, 5 * H), dtype=h0.dtype)
    d_w_hh = np.zeros_like(w_hh)
    d_w_mh = np.zeros_like(w_mh)
    d_b_hh = np.zeros(H, dtype=h0.dtype)
    d_b_mh = np.zeros(4 * H, dtype=h0.dtype)
    d_variants = {name: np.zeros_like(params[name]) for name in VARIANT_PARAM_SHAPES if name in params}
    d_h, d_c = d_hT, d_cT
    for t in reversed(range(T)):
        s = tapes[t]
        d_h = d_h + d_hs[:, t]
        if projection:
            # h' = clip(weight_hr k), k = o * tanh(c'): from here on d_h is the gradient of k
            if proj_clip is not None:
                d_h = clip_gradient(d_h, s["h_unclipped"], proj_clip)
            d_variants["weight_hr"] += d_h.T @ s["k"]
            d_h = d_h @ params["weight_hr"]
        # k = o * tanh(c');  c' = clip(f c + i z)
        d_o = d_h * s["tanh_c"]
        d_c = d_c + d_h * s["o"] * (1 - s["tanh_c"] ** 2)
        d_a_o = d_o * s["o"] * (1 - s["o"])
        if peepholes:  # a_o reads the new cell state
            d_c = d_c + d_a_o * params["weight_co"]
            d_variants["weight_co"] += (d_a_o * s["c_new"]).sum(axis=0)
        if cell_clip is not None:
            d_c = clip_gradient(d_c, s["c_unclipped"], cell_clip)
        d_a = np.concatenate(
            [
                d_c * s["z"] * s["i"] * (1 - s["i"]),
                d_a_o,
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
        if peepholes:  # a_i and a_f read the previous cell state
            d_a_i, d_a_f = d_a[:, gate_i], d_a[:, gate_f]
            d_c = d_c + d_a_i * params["weight_ci"] + d_a_f * params["weight_cf"]
            d_variants["weight_ci"] += (d_a_i * s["c"]).sum(axis=0)
            d_variants["weight_cf"] += (d_a_f * s["c"]).sum(axis=0)
    d_p_flat = d_p_all.reshape(B * T, 5 * H)
    grads = {
        "weight_ih": d_p_flat.T @ xs.reshape(B * T, -1),
        "weight_hh": d_w_hh,
        "weight_mh": d_w_mh,
        "bias_ih": d_p_flat.sum(axis=0),
        "bias_hh": d_b_hh,
        "bias_mh": d_b_mh,
        **d_variants,
    }
    grads = {name: g for name, g in grads.items() if name in params}
    grads.update(x=d_p_all @ params["weight_ih"], h0=d_h, c0=d_c)
    return grads
