"""The plain path: the same equations as ordinary differentiable torch operations, one step at a time.

It runs under ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``, ...), in layers built with
``fused=False`` (second derivatives) and in :class:`~backends.torch.MLSTMCell`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def plain_step(p: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, w_mh: Tensor, b_hh: Optional[Tensor],
               b_mh: Optional[Tensor], multiplicative: bool) -> tuple[Tensor, Tensor]:
    """One step from the input projection ``p`` (..., 5H); any leading batch shape."""
    H = h.shape[-1]
    p_m, p_g = p[..., :H], p[..., H:]
    if w_hh.dim() == 2 and h.dim() == 2 and b_hh is not None:
        r = torch.addmm(b_hh, h, w_hh.t())  # one operation instead of two: per-call cost counts here
    else:
        r = h * w_hh if w_hh.dim() == 1 else torch.matmul(h, w_hh.t())
        if b_hh is not None:
            r = r + b_hh
    q = F.linear(p_m * r, w_mh, b_mh)
    a = p_g * q if multiplicative else p_g + q
    i, o, f = torch.sigmoid(a[..., : 3 * H]).split(H, dim=-1)
    z = torch.tanh(a[..., 3 * H:])
    c = torch.addcmul(f * c, i, z)
    return o * torch.tanh(c), c


#: The canonical names of the structural variants' parameters (mlstm_spec.equations.VARIANT_PARAM_SHAPES).
VARIANT_PARAMS = ("weight_hr", "weight_ci", "weight_cf", "weight_co")


def variant_step(p: Tensor, h: Tensor, c: Tensor, params: dict, multiplicative: bool, *, cell_clip=None,
                 proj_clip=None, forget_bias=0.0) -> tuple[Tensor, Tensor]:
    """:func:`plain_step` with the spec's variants (docs/equations.md, Variants): a projection
    (``weight_hr``: h is P wide), peepholes (``weight_ci``, ``weight_cf``, ``weight_co``), ``cell_clip``,
    ``proj_clip`` and ``forget_bias``, each off when absent or at its default. ``params`` holds the
    canonical names."""
    H = c.shape[-1]
    w_hh = params["weight_hh"]
    p_m, p_g = p[..., :H], p[..., H:]
    r = h * w_hh if w_hh.dim() == 1 else torch.matmul(h, w_hh.t())
    if params.get("bias_hh") is not None:
        r = r + params["bias_hh"]
    q = F.linear(p_m * r, params["weight_mh"], params.get("bias_mh"))
    a = p_g * q if multiplicative else p_g + q
    a_i, a_o, a_f, a_z = a.split(H, dim=-1)
    peepholes = params.get("weight_ci") is not None
    if peepholes:
        a_i = a_i + params["weight_ci"] * c
        a_f = a_f + params["weight_cf"] * c
    if forget_bias:
        a_f = a_f + forget_bias
    c = torch.addcmul(torch.sigmoid(a_f) * c, torch.sigmoid(a_i), torch.tanh(a_z))
    if cell_clip is not None:
        c = c.clamp(-cell_clip, cell_clip)
    if peepholes:
        a_o = a_o + params["weight_co"] * c
    h = torch.sigmoid(a_o) * torch.tanh(c)
    if params.get("weight_hr") is not None:
        h = F.linear(h, params["weight_hr"])
        if proj_clip is not None:
            h = h.clamp(-proj_clip, proj_clip)
    return h, c


def has_variants(params: dict, runtime: Optional[dict]) -> bool:
    """Whether a layer's canonical ``params`` or its switched-on run-time options use a variant."""
    return bool(runtime) or any(name in params for name in VARIANT_PARAMS)


def plain_layer(x: Tensor, h0: Tensor, c0: Tensor, params: dict, multiplicative: bool,
                runtime: Optional[dict] = None) -> tuple[Tensor, Tensor, Tensor]:
    """x (T, B, I) -> hs (T, B, H), h_T, c_T; autograd does the backward. ``runtime``: the switched-on
    run-time variants (``cell_clip``, ``proj_clip``, ``forget_bias``), if any.

    The steps' projections come from ``unbind``, whose backward stacks the T gradients once; indexing
    ``p[t]`` instead makes every step's backward materialise a zero-filled gradient of the whole
    projection (measured 3.4x slower forward+backward at B=32, T=128, I=64, H=256)."""
    p = F.linear(x, params["weight_ih"], params.get("bias_ih"))
    h, c, outputs = h0, c0, []
    if has_variants(params, runtime):
        for p_t in p.unbind(0):
            h, c = variant_step(p_t, h, c, params, multiplicative, **(runtime or {}))
            outputs.append(h)
        return torch.stack(outputs), h, c
    for p_t in p.unbind(0):
        h, c = plain_step(p_t, h, c, params["weight_hh"], params["weight_mh"], params.get("bias_hh"),
                          params.get("bias_mh"), multiplicative)
        outputs.append(h)
    return torch.stack(outputs), h, c


def functorch_active() -> bool:
    """True inside torch.func.grad / vmap / jacrev ..., where custom operators need extra rules."""
    return bool(torch._C._are_functorch_transforms_active())


def scan_layer(x: Tensor, h0: Tensor, c0: Tensor, params: dict, multiplicative: bool,
               runtime: Optional[dict] = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`plain_layer` with its time loop as one ``scan`` (a higher-order operator that
    ``torch.export`` keeps and the ONNX exporter writes as an ONNX ``Scan``), so that an exported graph
    takes any sequence length instead of the length it was traced with."""
    from torch._higher_order_ops.scan import scan

    p = F.linear(x, params["weight_ih"], params.get("bias_ih"))
    w_hh, w_mh, b_hh, b_mh = params["weight_hh"], params["weight_mh"], params.get("bias_hh"), params.get("bias_mh")

    variants = has_variants(params, runtime)

    def step(carry, p_t):
        if variants:
            h, c = variant_step(p_t, carry[0], carry[1], params, multiplicative, **(runtime or {}))
        else:
            h, c = plain_step(p_t, carry[0], carry[1], w_hh, w_mh, b_hh, b_mh, multiplicative)
        return (h, c), h.clone()

    (h, c), hs = scan(step, (h0.clone(), c0.clone()), p)
    return hs, h, c
