"""The fused layer with the spec's variants (docs/equations.md, Variants): a projection (``weight_hr``),
peepholes (``weight_ci``, ``weight_cf``, ``weight_co``), ``cell_clip``, ``proj_clip`` and ``forget_bias``.

A layer that uses any of them runs these operators instead of those of ``fused.py``, so the variant-free
layer runs exactly the code it ran before the variants existed. As ``fused.py``'s, each has two bodies:
the Python loops below (the math of :func:`mlstm_spec.equations.run_backward`, time-major) for every
device, and the compiled C++ loops (``variant_layer_forward``/``variant_layer_backward`` of
``cpu_loops.cpp``) registered as the CPU kernel, which hands float16/bfloat16, ``python_loops=True`` and a
machine without a compiler back to the Python loops. Like ``fused.py``'s they are custom operators in the
``mlstm`` namespace, with a fake implementation for ``torch.compile`` and an autograd formula that is the
analytic backward (the plain path's differentiable one when a graph of the gradient is asked for).
Without ``keep_tape`` (no gradient will be asked for) the forward returns an empty tape and keeps only
one step's intermediates while it runs.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import build, loops
from .fused import NAMESPACE, gradients_with_graph, keep_for_backward
from .plain import plain_layer

# Change when what the operators compute or return changes without a change of schema (see fused.py).
_VERSION = 2
_WEIGHTS = ("w_ih", "w_hh", "w_mh", "b_ih", "b_hh", "b_mh", "w_hr", "w_ci", "w_cf", "w_co")
#: canonical name of each weight argument
_CANONICAL = dict(zip(_WEIGHTS, ("weight_ih", "weight_hh", "weight_mh", "bias_ih", "bias_hh", "bias_mh",
                                 "weight_hr", "weight_ci", "weight_cf", "weight_co")))
_GRADIENTS = ("x", "h0", "c0") + _WEIGHTS


class VariantTape(NamedTuple):
    """What the forward keeps for the backward, time-major; a field a layer does not need is zero-size,
    and every field is when the forward ran without ``keep_tape``. Besides these the backward reads the
    forward's inputs and its outputs ``hs``. The C++ loops return and take the fields in this order."""

    #: the input projection W_ih x + b_ih, (T, B, 5H)
    p: Tensor
    #: the recurrent factor W_hh h_{t-1} + b_hh, (T, B, H)
    r: Tensor
    #: the multiplicative state p_m * r, (T, B, H)
    m: Tensor
    #: W_mh m + b_mh, (T, B, 4H), under multiplicative integration only
    q: Tensor
    #: the gates i, o, f, z, (T, B, 4H)
    gates: Tensor
    #: the cell states c_0 ... c_T (each after cell_clip), (T + 1, B, H)
    cs: Tensor
    #: f c + i z before cell_clip, (T, B, H), with cell_clip only
    c_unclipped: Tensor
    #: tanh(c_t), (T, B, H)
    tanh_c: Tensor
    #: o tanh(c), the input of the projection, (T, B, H), with a projection only
    k: Tensor
    #: weight_hr k before proj_clip, (T, B, P), with proj_clip only
    h_unclipped: Tensor

    @staticmethod
    def shapes(steps, batch, hidden, output, multiplicative, projection, cell_clip, proj_clip,
               keep_tape=True) -> "VariantTape":
        T, B, H, P = steps, batch, hidden, output
        if not keep_tape:
            return VariantTape(*[(0,)] * len(VariantTape._fields))
        return VariantTape(p=(T, B, 5 * H), r=(T, B, H), m=(T, B, H), q=(T, B, 4 * H) if multiplicative else (0,),
                           gates=(T, B, 4 * H), cs=(T + 1, B, H), c_unclipped=(T, B, H) if cell_clip else (0,),
                           tanh_c=(T, B, H), k=(T, B, H) if projection else (0,),
                           h_unclipped=(T, B, P) if proj_clip else (0,))


def forward_loop(x, h0, c0, w_ih, w_hh, w_mh, b_ih, b_hh, b_mh, w_hr, w_ci, w_cf, w_co, multiplicative: bool,
                 cell_clip: Optional[float], proj_clip: Optional[float], forget_bias: float, keep_tape: bool = True):
    """x (T, B, I), h0 (B, P or H), c0 (B, H) -> hs (T, B, P or H), h_T, c_T and the :class:`VariantTape`
    (every field empty without ``keep_tape``: then each step's intermediates overwrite the last's)."""
    T, B, _ = x.shape
    H = c0.shape[-1]
    new = x.new_empty
    steps = T if keep_tape else 1  # the intermediates' rows: step t writes row t % steps
    p = torch.nn.functional.linear(x, w_ih, b_ih)
    hs = new(T, B, h0.shape[-1])
    r_all, m_all, tanh_c_all = new(steps, B, H), new(steps, B, H), new(steps, B, H)
    q_all = new(steps, B, 4 * H) if multiplicative else new(0)
    gates = new(steps, B, 4 * H)
    cs = new(T + 1 if keep_tape else 2, B, H)
    cs[0] = c0
    c_unclipped = new(steps, B, H) if cell_clip is not None else new(0)
    k_all = new(steps, B, H) if w_hr is not None else new(0)
    h_unclipped = new(steps, B, w_hr.shape[0]) if proj_clip is not None else new(0)
    independent = w_hh.dim() == 1
    h = h0
    for t in range(T):
        s = t % steps
        r = torch.mul(h, w_hh, out=r_all[s]) if independent else torch.mm(h, w_hh.t(), out=r_all[s])
        if b_hh is not None:
            r += b_hh
        m = torch.mul(p[t, :, :H], r, out=m_all[s])
        q = torch.nn.functional.linear(m, w_mh, b_mh)
        if multiplicative:
            q_all[s] = q
        a = p[t, :, H:] * q if multiplicative else p[t, :, H:] + q
        a_i, a_o, a_f, a_z = a.split(H, dim=1)
        c_prev = cs[t % len(cs)]
        if w_ci is not None:
            a_i += w_ci * c_prev
            a_f += w_cf * c_prev
        if forget_bias:
            a_f += forget_bias
        i, o, f, z = gates[s].split(H, dim=1)
        torch.sigmoid(a_i, out=i)
        torch.sigmoid(a_f, out=f)
        torch.tanh(a_z, out=z)
        c = f * c_prev + i * z
        if cell_clip is not None:
            c_unclipped[s] = c
            c = c.clamp(-cell_clip, cell_clip)
        cs[(t + 1) % len(cs)] = c
        if w_co is not None:
            a_o += w_co * c
        torch.sigmoid(a_o, out=o)
        tanh_c = torch.tanh(c, out=tanh_c_all[s])
        if w_hr is None:
            h = torch.mul(o, tanh_c, out=hs[t])
            continue
        k = torch.mul(o, tanh_c, out=k_all[s])
        if proj_clip is None:
            h = torch.mm(k, w_hr.t(), out=hs[t])
        else:
            torch.mm(k, w_hr.t(), out=h_unclipped[s])
            h = torch.clamp(h_unclipped[s], -proj_clip, proj_clip, out=hs[t])
    c_T = cs[T % len(cs)].clone()
    if not keep_tape:
        return hs, hs[T - 1].clone(), c_T, VariantTape(*(new(0) for _ in VariantTape._fields))
    tape = VariantTape(p=p, r=r_all, m=m_all, q=q_all, gates=gates, cs=cs, c_unclipped=c_unclipped,
                       tanh_c=tanh_c_all, k=k_all, h_unclipped=h_unclipped)
    return hs, hs[T - 1].clone(), c_T, tape


def _passed(d_value: Tensor, value: Tensor, bound: float) -> Tensor:
    """The gradient through clamp(value, -bound, bound): kept where |value| <= bound (both ends
    included, as torch.clamp and the spec's clip_gradient), zero where the value was clipped."""
    return d_value * (value.abs() <= bound)


def backward_loop(d_hs, d_hT, d_cT, x, h0, w_ih, w_hh, w_mh, w_hr, w_ci, w_cf, w_co, has_b_ih: bool,
                  has_b_hh: bool, has_b_mh: bool, multiplicative: bool, cell_clip: Optional[float],
                  proj_clip: Optional[float], need_dx: bool, hs: Tensor, tape: VariantTape) -> tuple[Tensor, ...]:
    """Back-propagation through time (the math of mlstm_spec.equations.run_backward): per step the
    products that carry the gradient back; every weight gradient as one product or sum over all T*B
    rows at the end. Returns the gradients named by ``_GRADIENTS`` (an empty tensor for one not asked
    for or absent)."""
    T, B, I = x.shape
    H = tape.cs.shape[-1]
    i_all, o_all, f_all, z_all = tape.gates.split(H, dim=2)
    d_p = x.new_empty(T, B, 5 * H)
    d_a = x.new_empty(T, B, 4 * H)
    d_q = x.new_empty(T, B, 4 * H) if multiplicative else d_a
    d_r = x.new_empty(T, B, H)
    d_k = x.new_empty(T, B, w_hr.shape[0]) if w_hr is not None else None  # gradient of weight_hr k
    independent = w_hh.dim() == 1
    zeros_h, zeros_c = h0.new_zeros(h0.shape), x.new_zeros(B, H)
    d_h = zeros_h if d_hT is None else d_hT
    d_c = zeros_c if d_cT is None else d_cT
    for t in range(T - 1, -1, -1):
        if d_hs is not None:
            d_h = d_h + d_hs[t]
        if w_hr is not None:
            if proj_clip is not None:
                d_h = _passed(d_h, tape.h_unclipped[t], proj_clip)
            d_k[t] = d_h
            d_h = d_h @ w_hr
        i, o, f, z = i_all[t], o_all[t], f_all[t], z_all[t]
        tanh_c = tape.tanh_c[t]
        d_c = d_c + d_h * o * (1 - tanh_c * tanh_c)
        d_a_i, d_a_o, d_a_f, d_a_z = d_a[t].split(H, dim=1)
        torch.mul(d_h * tanh_c, o * (1 - o), out=d_a_o)
        if w_co is not None:
            d_c = d_c + d_a_o * w_co
        if cell_clip is not None:
            d_c = _passed(d_c, tape.c_unclipped[t], cell_clip)
        c_prev = tape.cs[t]
        torch.mul(d_c, z * i * (1 - i), out=d_a_i)
        torch.mul(d_c, c_prev * f * (1 - f), out=d_a_f)
        torch.mul(d_c, i * (1 - z * z), out=d_a_z)
        if multiplicative:
            torch.mul(d_a[t], tape.p[t, :, H:], out=d_q[t])
        d_m = d_q[t] @ w_mh
        torch.mul(d_m, tape.p[t, :, :H], out=d_r[t])
        d_h = d_r[t] * w_hh if independent else d_r[t] @ w_hh
        d_c = d_c * f
        if w_ci is not None:
            d_c = d_c + d_a_i * w_ci + d_a_f * w_cf
        torch.mul(d_m, tape.r[t], out=d_p[t, :, :H])
    if multiplicative:
        torch.mul(d_a, tape.q, out=d_p[:, :, H:])
    else:
        d_p[:, :, H:] = d_a

    def empty():  # a placeholder for a gradient not asked for; returns may not alias each other
        return x.new_empty(0)

    rows = T * B
    d_p2 = d_p.view(rows, 5 * H)
    d_q2 = d_q.reshape(rows, 4 * H)
    d_r2 = d_r.view(rows, H)
    h_prev = torch.cat([h0.unsqueeze(0), hs[:-1]]).reshape(rows, -1)
    grads = dict(
        x=torch.mm(d_p2, w_ih).view(T, B, I) if need_dx else empty(),
        h0=d_h, c0=d_c,
        w_ih=torch.mm(d_p2.t(), x.reshape(rows, I)),
        w_hh=(d_r2 * h_prev).sum(0) if independent else torch.mm(d_r2.t(), h_prev),
        w_mh=torch.mm(d_q2.t(), tape.m.reshape(rows, H)),
        b_ih=d_p2.sum(0) if has_b_ih else empty(),
        b_hh=d_r2.sum(0) if has_b_hh else empty(),
        b_mh=d_q2.sum(0) if has_b_mh else empty(),
        w_hr=torch.mm(d_k.reshape(rows, -1).t(), tape.k.reshape(rows, H)) if w_hr is not None else empty(),
    )
    if w_ci is not None:
        d_a_i, d_a_o, d_a_f, _ = d_a.split(H, dim=2)
        grads.update(w_ci=(d_a_i * tape.cs[:-1]).sum((0, 1)), w_cf=(d_a_f * tape.cs[:-1]).sum((0, 1)),
                     w_co=(d_a_o * tape.cs[1:]).sum((0, 1)))
    else:
        grads.update(w_ci=empty(), w_cf=empty(), w_co=empty())
    return tuple(grads[name] for name in _GRADIENTS)


_OPTIONAL = ", ".join(f"Tensor? {name}" for name in _WEIGHTS[3:])
_TAPE_ARGS = ", ".join(f"Tensor {name}" for name in VariantTape._fields)
_FORWARD_SCHEMA = (f"(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor w_mh, {_OPTIONAL}, "
                   "bool multiplicative, float? cell_clip, float? proj_clip, float forget_bias, bool keep_tape, "
                   "bool python_loops) -> ("
                   + ", ".join(["Tensor"] * (3 + len(VariantTape._fields))) + ")")
_BACKWARD_SCHEMA = ("(Tensor? d_hs, Tensor? d_hT, Tensor? d_cT, Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, "
                    "Tensor w_mh, Tensor? w_hr, Tensor? w_ci, Tensor? w_cf, Tensor? w_co, bool has_b_ih, "
                    "bool has_b_hh, bool has_b_mh, bool multiplicative, float? cell_clip, float? proj_clip, "
                    f"bool need_dx, bool python_loops, Tensor hs, {_TAPE_ARGS}) -> ("
                    + ", ".join(["Tensor"] * len(_GRADIENTS)) + ")")


def _forward(x, h0, c0, w_ih, w_hh, w_mh, b_ih, b_hh, b_mh, w_hr, w_ci, w_cf, w_co, multiplicative, cell_clip,
             proj_clip, forget_bias, keep_tape, python_loops):
    with torch.autocast(x.device.type, enabled=False), torch.no_grad():
        hs, h_T, c_T, tape = forward_loop(x, h0, c0, w_ih, w_hh, w_mh, b_ih, b_hh, b_mh, w_hr, w_ci, w_cf, w_co,
                                          multiplicative, cell_clip, proj_clip, forget_bias, keep_tape)
    return (hs, h_T, c_T, *tape)


def _backward_body(d_hs, d_hT, d_cT, x, h0, w_ih, w_hh, w_mh, w_hr, w_ci, w_cf, w_co, has_b_ih, has_b_hh,
                   has_b_mh, multiplicative, cell_clip, proj_clip, need_dx, python_loops, hs, *tape):
    with torch.autocast(x.device.type, enabled=False), torch.no_grad():
        return backward_loop(d_hs, d_hT, d_cT, x, h0, w_ih, w_hh, w_mh, w_hr, w_ci, w_cf, w_co, has_b_ih,
                             has_b_hh, has_b_mh, multiplicative, cell_clip, proj_clip, need_dx, hs,
                             VariantTape(*tape))


layer_forward = torch.library.custom_op(f"{NAMESPACE}::variant_layer_forward_v{_VERSION}", _forward,
                                        mutates_args=(), schema=_FORWARD_SCHEMA)
layer_backward = torch.library.custom_op(f"{NAMESPACE}::variant_layer_backward_v{_VERSION}", _backward_body,
                                         mutates_args=(), schema=_BACKWARD_SCHEMA)


def _compiled(x: Tensor, python_loops: bool):
    """The compiled CPU loops for this call, or None (then the Python loops run): as fused.py decides."""
    if python_loops or x.dtype not in (torch.float32, torch.float64):
        return None
    return build.cpu_loops()


@layer_forward.register_kernel("cpu")
def _(x, h0, c0, w_ih, w_hh, w_mh, b_ih, b_hh, b_mh, w_hr, w_ci, w_cf, w_co, multiplicative, cell_clip,
      proj_clip, forget_bias, keep_tape, python_loops):
    compiled = _compiled(x, python_loops)
    if compiled is None:
        return _forward(x, h0, c0, w_ih, w_hh, w_mh, b_ih, b_hh, b_mh, w_hr, w_ci, w_cf, w_co, multiplicative,
                        cell_clip, proj_clip, forget_bias, keep_tape, python_loops)
    with torch.autocast("cpu", enabled=False):
        return tuple(compiled.variant_layer_forward(x, h0, c0, w_ih, w_hh, w_mh, b_ih, b_hh, b_mh, w_hr, w_ci, w_cf,
                                                    w_co, multiplicative, cell_clip, proj_clip, forget_bias,
                                                    keep_tape, loops.PROJECTION_CHUNK_BYTES))


@layer_backward.register_kernel("cpu")
def _(d_hs, d_hT, d_cT, x, h0, w_ih, w_hh, w_mh, w_hr, w_ci, w_cf, w_co, has_b_ih, has_b_hh, has_b_mh,
      multiplicative, cell_clip, proj_clip, need_dx, python_loops, hs, *tape):
    compiled = _compiled(x, python_loops)
    if compiled is None:
        return _backward_body(d_hs, d_hT, d_cT, x, h0, w_ih, w_hh, w_mh, w_hr, w_ci, w_cf, w_co, has_b_ih,
                              has_b_hh, has_b_mh, multiplicative, cell_clip, proj_clip, need_dx, python_loops,
                              hs, *tape)
    with torch.autocast("cpu", enabled=False):
        d_hs, d_hT, d_cT = (None if g is None else g.contiguous() for g in (d_hs, d_hT, d_cT))
        return tuple(compiled.variant_layer_backward(d_hs, d_hT, d_cT, x, h0, w_ih, w_hh, w_mh, w_hr, w_ci, w_cf,
                                                     w_co, has_b_ih, has_b_hh, has_b_mh, multiplicative, cell_clip,
                                                     proj_clip, need_dx, hs, list(tape)))


@layer_forward.register_fake
def _(x, h0, c0, w_ih, w_hh, w_mh, b_ih, b_hh, b_mh, w_hr, w_ci, w_cf, w_co, multiplicative, cell_clip,
      proj_clip, forget_bias, keep_tape, python_loops):
    T, B, _ = x.shape
    H, P = c0.shape[-1], h0.shape[-1]
    shapes = VariantTape.shapes(T, B, H, P, multiplicative, w_hr is not None, cell_clip is not None,
                                proj_clip is not None, keep_tape)
    return (x.new_empty(T, B, P), x.new_empty(B, P), x.new_empty(B, H), *(x.new_empty(s) for s in shapes))


@layer_backward.register_fake
def _(d_hs, d_hT, d_cT, x, h0, w_ih, w_hh, w_mh, w_hr, w_ci, w_cf, w_co, has_b_ih, has_b_hh, has_b_mh,
      multiplicative, cell_clip, proj_clip, need_dx, python_loops, hs, *tape):
    H = w_mh.shape[-1]
    new = x.new_empty

    def like(t):
        return new(0) if t is None else torch.empty_like(t)

    return (new(x.shape) if need_dx else new(0), torch.empty_like(h0), new(h0.shape[0], H),
            torch.empty_like(w_ih), torch.empty_like(w_hh), torch.empty_like(w_mh),
            new(5 * H) if has_b_ih else new(0), new(H) if has_b_hh else new(0),
            new(4 * H) if has_b_mh else new(0), like(w_hr), like(w_ci), like(w_cf), like(w_co))


def _setup_context(ctx, inputs, output):
    x, h0, c0, *weights, multiplicative, cell_clip, proj_clip, forget_bias, keep_tape, python_loops = inputs
    hs, _, _, *tape = output
    keep_for_backward(ctx, "variant layer", keep_tape, tape)
    ctx.options = (multiplicative, cell_clip, proj_clip, forget_bias, python_loops)
    ctx.save_for_backward(x, h0, c0, *weights, hs, *tape)


def _backward(ctx, d_hs, d_hT, d_cT, *unused_tape_grads):
    x, h0, c0, *rest = ctx.saved_tensors
    weights, hs, tape = rest[:len(_WEIGHTS)], rest[len(_WEIGHTS)], rest[len(_WEIGHTS) + 1:]
    multiplicative, cell_clip, proj_clip, forget_bias, python_loops = ctx.options
    count = 3 + len(_WEIGHTS) + 6
    if d_hs is None and d_hT is None and d_cT is None:
        return (None,) * count
    inputs = (x, h0, c0, *weights)
    if torch.is_grad_enabled():  # create_graph=True: the gradient itself must be differentiable
        return _differentiable_backward(ctx, (d_hs, d_hT, d_cT), inputs, multiplicative,
                                        dict(cell_clip=cell_clip, proj_clip=proj_clip, forget_bias=forget_bias))
    w = dict(zip(_WEIGHTS, weights))
    need_dx = ctx.needs_input_grad[0]
    grads = layer_backward(d_hs, d_hT, d_cT, x, h0, w["w_ih"], w["w_hh"], w["w_mh"], w["w_hr"], w["w_ci"],
                           w["w_cf"], w["w_co"], w["b_ih"] is not None, w["b_hh"] is not None,
                           w["b_mh"] is not None, multiplicative, cell_clip, proj_clip, need_dx, python_loops, hs,
                           *tape)
    result = [None if t is None or not ctx.needs_input_grad[k] else grad
              for k, (t, grad) in enumerate(zip(inputs, grads))]
    return (*result, None, None, None, None, None, None)


def _differentiable_backward(ctx, output_grads, inputs, multiplicative, runtime):
    """As fused.py's: the plain path recomputes the forward and autograd differentiates it with
    ``create_graph=True`` (second derivatives)."""
    runtime = {name: value for name, value in runtime.items() if value not in (None, 0.0)}

    def layer(x, h0, c0, *weights):
        params = {_CANONICAL[name]: t for name, t in zip(_WEIGHTS, weights) if t is not None}
        return plain_layer(x, h0, c0, params, multiplicative, runtime)

    return gradients_with_graph(layer, inputs, output_grads, ctx.needs_input_grad, len(inputs) + 6)


layer_forward.register_autograd(_backward, setup_context=_setup_context)


def fused_variant_layer(x: Tensor, h0: Tensor, c0: Tensor, params: dict, multiplicative: bool, runtime: dict,
                        python_loops: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """One layer with variants over x (T, B, I) from (h0 (B, P or H), c0 (B, H)): hs, h_T, c_T.
    ``params`` holds canonical names; ``runtime`` the switched-on run-time options. The tape is kept
    only when autograd will need it."""
    weights = [params.get(_CANONICAL[name]) for name in _WEIGHTS]
    keep_tape = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, h0, c0, *weights))
    return layer_forward(x, h0, c0, *weights, multiplicative, runtime.get("cell_clip"), runtime.get("proj_clip"),
                         float(runtime.get("forget_bias", 0.0)), keep_tape, python_loops)[:3]
