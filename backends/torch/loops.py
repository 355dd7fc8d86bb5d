"""The fused layer's time loops in Python: the forward and the analytic backward of one layer on
time-major tensors (the math of :func:`mlstm_spec.equations.run_backward`). They are the default body of
the operator in ``fused.py``, what runs on GPUs, and the reference the C++ loops (``cpu_loops.cpp``,
the CPU kernel) are held to."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .tape import Tape

#: The input projection is computed for a chunk of steps per matrix product, into one reused buffer of
#: about this size: 10-30% faster forward at the benchmark sizes than one (T, B, 5H) array written to
#: and read back from main memory (docs/performance-torch.md).
PROJECTION_CHUNK_BYTES = 4 << 20


def forward_loop(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, w_mh: Tensor,
                 b_ih: Optional[Tensor], b_hh: Optional[Tensor], b_mh: Optional[Tensor],
                 multiplicative: bool, keep_tape: bool, chunk_bytes: int = PROJECTION_CHUNK_BYTES
                 ) -> tuple[Tensor, Tensor, Tensor, Tape]:
    """x (T, B, I) contiguous, h0/c0 (B, H). Returns hs (T, B, H), h_T, c_T and the :class:`Tape` for
    the backward; its factors that do not depend on the incoming gradient (K, dh_to_dc) are formed here
    while their inputs are in cache. Without ``keep_tape`` (inference) the intermediates live in
    per-step scratch buffers and the tape is empty."""
    T, B, I = x.shape
    H = h0.shape[-1]
    # The input projection is computed for many steps per matrix product. Under addition, bias_mh
    # is added to the gate blocks there, once instead of once per step.
    bias = b_ih
    if b_mh is not None and not multiplicative:
        folded = torch.cat([b_mh.new_zeros(H), b_mh])
        bias = folded if bias is None else bias + folded
    new = x.new_empty
    keep_all_p = keep_tape and multiplicative  # the backward needs p_gates only then
    chunk = T if keep_all_p else max(1, min(T, chunk_bytes // (B * 5 * H * x.element_size())))
    p_buffer = new(T if keep_all_p else chunk, B, 5 * H)
    p_m_tape = new(T, B, H) if keep_tape and not multiplicative else new(0)
    steps = T if keep_tape else 1
    hs = new(T, B, H)
    r_all, m_all = new(steps, B, H), new(steps, B, H)
    f_tape = new(T, B, H) if keep_tape else new(0)  # of the gates, the backward needs f alone
    gates = new(B, 4 * H)
    q_all = new(steps, B, 4 * H) if multiplicative else new(0)
    K, dh_to_dc = (new(T, B, 4 * H), new(T, B, H)) if keep_tape else (new(0), new(0))
    cs = new(2, B, H)  # c_{t-1} and c_t, alternating
    cs[0] = c0
    tanh_c, iz = new(B, H), new(B, H)
    independent = w_hh.dim() == 1
    # Contiguous transposed copies: the per-step products run ~10-30% faster on them than on
    # transposed views (measured with MKL on CPU), and the copies cost one pass over the weights.
    w_hh_t = w_hh if independent else w_hh.t().contiguous()
    w_mh_t = w_mh.t().contiguous()
    w_ih_t = w_ih.t()
    h = h0
    p = p_buffer
    for t in range(T):
        j = t % chunk  # this step's row of the projection buffer
        if j == 0:
            n = min(chunk, T - t)
            x_rows = x[t: t + n].reshape(n * B, I)
            p_rows = p_buffer[:n].view(n * B, 5 * H)
            if bias is None:
                torch.mm(x_rows, w_ih_t, out=p_rows)
            else:
                torch.addmm(bias, x_rows, w_ih_t, out=p_rows)
            p = p_buffer[:n]
            if p_m_tape.numel():
                p_m_tape[t: t + n] = p[:, :, :H]
        p_m, p_g = p[j, :, :H], p[j, :, H:]
        k = t if keep_tape else 0  # where this step's intermediates go
        c_prev, c = cs[t % 2], cs[(t + 1) % 2]
        r = r_all[k]
        if independent:
            if b_hh is None:
                torch.mul(h, w_hh, out=r)
            else:
                torch.addcmul(b_hh, h, w_hh, out=r)
        elif b_hh is None:
            torch.mm(h, w_hh_t, out=r)
        else:
            torch.addmm(b_hh, h, w_hh_t, out=r)
        m = torch.mul(p_m, r, out=m_all[k])
        a = gates
        if multiplicative:
            q = q_all[k]
            if b_mh is None:
                torch.mm(m, w_mh_t, out=q)
            else:
                torch.addmm(b_mh, m, w_mh_t, out=q)
            torch.mul(p_g, q, out=a)
        else:
            torch.addmm(p_g, m, w_mh_t, out=a)
        a[:, : 3 * H].sigmoid_()
        a[:, 3 * H:].tanh_()
        i, o, f, z = a[:, :H], a[:, H: 2 * H], a[:, 2 * H: 3 * H], a[:, 3 * H:]
        torch.mul(i, z, out=iz)
        torch.addcmul(iz, f, c_prev, out=c)
        torch.tanh(c, out=tanh_c)
        h = torch.mul(o, tanh_c, out=hs[t])
        if keep_tape:
            # K = (z i(1-i), tanh(c) o(1-o), c_prev f(1-f), i(1-z^2)); s - s*s is one addcmul
            k_t = torch.addcmul(a, a, a, value=-1, out=K[t])
            k_t[:, :H].mul_(z)
            k_t[:, H: 2 * H].mul_(tanh_c)
            k_t[:, 2 * H: 3 * H].mul_(c_prev)
            torch.addcmul(i, iz, z, value=-1, out=k_t[:, 3 * H:])
            torch.addcmul(o, h, tanh_c, value=-1, out=dh_to_dc[t])  # o(1 - tanh(c)^2) = dc/dh
            f_tape[t] = f
    h_T, c_T = hs[T - 1].clone(), cs[T % 2].clone()
    if not keep_tape:
        return hs, h_T, c_T, Tape(*(new(0) for _ in Tape._fields))
    p_tape = p_buffer if keep_all_p else p_m_tape
    return hs, h_T, c_T, Tape(p=p_tape, r=r_all, m=m_all, f=f_tape, K=K, dh_to_dc=dh_to_dc, q=q_all)



def backward_loop(d_hs: Optional[Tensor], d_hT: Optional[Tensor], d_cT: Optional[Tensor],
                  x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, w_mh: Tensor,
                  has_b_ih: bool, has_b_hh: bool, has_b_mh: bool, multiplicative: bool,
                  need_dx: bool, hs: Tensor, tape: Tape) -> tuple[Tensor, ...]:
    """Back-propagation through time (the math of mlstm_spec.equations.run_backward).

    With D = (d_c, d_h, d_c, d_c) for the gate blocks (i, o, f, z), the gradient of the gate
    pre-activations is d_a = D * K, K saved by the forward; the loop does per step two matrix
    products and a few element-wise products, and every weight gradient is one matrix product over
    all T*B rows at the end. Returns the gradients of x, h0, c0, w_ih, w_hh, w_mh, b_ih, b_hh, b_mh
    (an empty tensor for one not asked for or absent)."""
    T, B, I = x.shape
    H = h0.shape[-1]
    p, r_all, m_all, f, K, dh_to_dc, q_all = tape
    p_m, p_g = p[:, :, :H], p[:, :, H:]  # p is p_m alone under addition (p_g is not needed then)

    d_p = x.new_empty(T, B, 5 * H)
    d_a = d_p[:, :, H:]  # under addition d p_gates = d q = d a; written straight into d_p
    d_q = x.new_empty(T, B, 4 * H) if multiplicative else d_a
    d_m = x.new_empty(T, B, H)
    d_r = x.new_empty(T, B, H)
    independent = w_hh.dim() == 1
    zeros = None
    if d_hs is None or d_hT is None or d_cT is None:
        zeros = x.new_zeros(B, H)
    if d_hs is None:
        d_hs = x.new_zeros(T, B, H)
    d_hT = zeros if d_hT is None else d_hT
    d_c = zeros if d_cT is None else d_cT
    for t in range(T - 1, -1, -1):
        if t == T - 1:
            d_h = d_hs[t] + d_hT
        elif independent:
            d_h = torch.addcmul(d_hs[t], d_r[t + 1], w_hh)
        else:
            d_h = torch.addmm(d_hs[t], d_r[t + 1], w_hh)
        d_c = d_c if t == T - 1 else d_c * f[t + 1]
        d_c = torch.addcmul(d_c, d_h, dh_to_dc[t])
        d_a_t = d_a[t]
        torch.mul(K[t].view(B, 4, H), d_c.unsqueeze(1), out=d_a_t.view(B, 4, H))
        torch.mul(K[t, :, H: 2 * H], d_h, out=d_a_t[:, H: 2 * H])
        if multiplicative:
            torch.mul(d_a_t, p_g[t], out=d_q[t])
        torch.mm(d_q[t], w_mh, out=d_m[t])
        torch.mul(d_m[t], p_m[t], out=d_r[t])
    d_h0 = d_r[0] * w_hh if independent else torch.mm(d_r[0], w_hh)
    d_c0 = d_c * f[0]
    if multiplicative:
        d_a.mul_(q_all)
    torch.mul(d_m, r_all, out=d_p[:, :, :H])

    rows = T * B
    d_p2 = d_p.view(rows, 5 * H)

    def empty():  # a placeholder for a gradient not asked for; returns may not alias each other
        return x.new_empty(0)

    d_x = torch.mm(d_p2, w_ih).view(T, B, I) if need_dx else empty()
    d_w_ih = torch.mm(d_p2.t(), x.reshape(rows, I))
    d_q2 = d_q.reshape(rows, 4 * H)
    d_w_mh = torch.mm(d_q2.t(), m_all.view(rows, H))
    d_r2 = d_r.view(rows, H)
    # d weight_hh = sum_t d_r_t^T h_{t-1}, with h_{-1} = h0: no concatenated copy of the h's
    hs_prev = hs[:-1].reshape((T - 1) * B, H)
    if independent:
        d_w_hh = (d_r[0] * h0).sum(0)
        if T > 1:
            d_w_hh += (d_r[1:].reshape((T - 1) * B, H) * hs_prev).sum(0)
    else:
        d_w_hh = torch.mm(d_r[0].t(), h0)
        if T > 1:
            d_w_hh.addmm_(d_r[1:].reshape((T - 1) * B, H).t(), hs_prev)
    # bias gradients: column sums as matrix-vector products (2-3x faster than .sum(0) on CPU)
    ones = x.new_ones(rows) if has_b_ih or has_b_hh or has_b_mh else None
    d_b_ih = torch.mv(d_p2.t(), ones) if has_b_ih else empty()
    d_b_hh = torch.mv(d_r2.t(), ones) if has_b_hh else empty()
    d_b_mh = torch.mv(d_q2.t(), ones) if has_b_mh else empty()
    return d_x, d_h0, d_c0, d_w_ih, d_w_hh, d_w_mh, d_b_ih, d_b_hh, d_b_mh

