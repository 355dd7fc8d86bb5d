r"""PyTorch backend of the mLSTM: :class:`MLSTMCell` and :class:`MLSTM`, used like ``torch.nn.LSTMCell``
and ``torch.nn.LSTM``.

The recurrence has two implementations that compute the same function:

- the **fused** path (default): one custom operator per layer, ``mlstm_torch::layer_forward_v2``, runs the
  whole time loop (the input projection hoisted out of it, one matrix product per chunk of steps; then
  per step two matrix products and in-place element-wise work written into preallocated buffers), and its
  registered backward, ``mlstm_torch::layer_backward_v2``, is the analytic back-propagation through time
  of :func:`mlstm_spec.equations.run_backward`, with every weight gradient formed as one matrix product
  over all steps at the end. Being a ``torch.library`` custom operator, it is one opaque node to
  ``torch.compile`` (no graph break, no unrolled loop to compile) and to autograd. On CPU (float32 and
  float64) its two time loops run in C++ (``_torch_cpu.cpp``, compiled on first use, see
  :func:`compiled_cpu_loops`); elsewhere, and where no compiler is found, the same loops run in Python.
- the **plain** path: the same equations as ordinary differentiable torch operations, one step at a
  time. It is used under ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``, ...), when the layer
  is built with ``fused=False`` (needed for second derivatives: the fused backward is not itself
  differentiable and says so if asked), and by :class:`MLSTMCell`.

float16 and bfloat16 layers compute in float32 and round their results once. Importing this module
changes no global torch setting (threads, TF32, default dtype); only :class:`ConformanceAdapter` on a
GPU turns TF32 off, so that its float32 checks mean float32.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backends._common import canonical_stack, check_layer_options, present_params, set_layer_options
from mlstm_spec.validation import LayerInfo, check_dtype, check_sequence, check_state

__all__ = ["MLSTM", "ConformanceAdapter", "MLSTMCell", "compiled_cpu_loops", "devices", "python_cpu_loops"]

#: dtypes the layers compute in.
TORCH_DTYPES = ("float16", "bfloat16", "float32", "float64")


# ------------------------------------------------------------------------------------------------
# Compiled CPU loops: backends/_torch_cpu.cpp, built on first use
# ------------------------------------------------------------------------------------------------

#: Set to "python" to keep the fused layer's time loops in Python on CPU (they are compiled otherwise).
CPU_LOOPS_VARIABLE = "MLSTM_TORCH_CPU_LOOPS"
_CPU_SOURCE = Path(__file__).with_name("_torch_cpu.cpp")
# torch.backends.cpu.get_cpu_capability() -> compiler flags for ATen's vector types at that level
_CAPABILITY_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw",
               "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT"],
}
_cpu_loops_state: dict = {}  # filled once: "ok", "warn", and "reason" (what was built, or why not)
_cpu_loops_lock = threading.Lock()
_python_loops_forced = False  # set by python_cpu_loops()


def compiled_cpu_loops() -> tuple[bool, str]:
    """Whether the fused layer runs its time loops in compiled C++ on CPU, and what was built or why
    not. The first call compiles ``backends/_torch_cpu.cpp`` with ``torch.utils.cpp_extension`` (about
    10 s, once per machine and torch version; cached in ``TORCH_EXTENSIONS_DIR``). Where that cannot be
    done (no C++ compiler, or ``MLSTM_TORCH_CPU_LOOPS=python``), the same loops run in Python, which
    gives the same results more slowly; a warning says so once."""
    if not _cpu_loops_state:
        with _cpu_loops_lock:
            if not _cpu_loops_state:
                state = _build_cpu_loops()
                if not state["ok"] and state["warn"]:
                    warnings.warn(f"backends.torch: {state['reason']}; the fused layer runs its time loops "
                                  "in Python on CPU (same results, slower)", RuntimeWarning, stacklevel=3)
                _cpu_loops_state.update(state)
    return _cpu_loops_state["ok"], _cpu_loops_state["reason"]


def _build_cpu_loops() -> dict:
    choice = os.environ.get(CPU_LOOPS_VARIABLE, "compiled")
    if choice not in ("compiled", "python"):
        return {"ok": False, "warn": True, "reason": f"{CPU_LOOPS_VARIABLE} must be 'compiled' or "
                f"'python', got {choice!r}"}
    if choice == "python":
        return {"ok": False, "warn": False, "reason": f"{CPU_LOOPS_VARIABLE}=python"}
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _CAPABILITY_FLAGS.get(capability, _CAPABILITY_FLAGS["DEFAULT"])
    # cpp_extension warns (through logging) that "c++" is not "g++", also where c++ is g++
    build_log = logging.getLogger("torch.utils.cpp_extension")
    level = build_log.level
    build_log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension

        if shutil.which("ninja") is None:  # torch builds with ninja; the pip package puts one in the venv
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cpp_extension.load(name=f"mlstm_torch_cpu_{capability.lower()}", sources=[str(_CPU_SOURCE)],
                               extra_cflags=["-O3", *flags], is_python_module=False, verbose=False)
    except Exception as error:  # noqa: BLE001 - any build failure means: use the Python loops
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return {"ok": False, "warn": True, "reason": f"could not compile {_CPU_SOURCE.name} "
                f"({type(error).__name__}: {first_line[:300]})"}
    finally:
        build_log.setLevel(level)
    return {"ok": True, "warn": False, "reason": f"compiled {_CPU_SOURCE.name} for {capability}"}


@contextlib.contextmanager
def python_cpu_loops():
    """Within this block the fused layer runs its CPU time loops in Python: the reference the tests
    hold the compiled loops to, and the code that runs on GPUs. (A process-wide switch, so that it
    also reaches the backward, which autograd may run on another thread.)"""
    global _python_loops_forced
    previous, _python_loops_forced = _python_loops_forced, True
    try:
        yield
    finally:
        _python_loops_forced = previous


def _compiled_loops_for(x: Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and not _python_loops_forced and compiled_cpu_loops()[0])


# ------------------------------------------------------------------------------------------------
# The fused recurrence: forward and analytic backward on time-major, validated tensors
# ------------------------------------------------------------------------------------------------

def _fused_forward(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, w_mh: Tensor,
                   b_ih: Optional[Tensor], b_hh: Optional[Tensor], b_mh: Optional[Tensor],
                   multiplicative: bool, keep_tape: bool):
    if _compiled_loops_for(x):
        return tuple(torch.ops.mlstm_cpu.layer_forward(x, h0, c0, w_ih, w_hh, w_mh, b_ih, b_hh, b_mh,
                                                       multiplicative, keep_tape, _PROJECTION_CHUNK_BYTES))
    return _fused_forward_python(x, h0, c0, w_ih, w_hh, w_mh, b_ih, b_hh, b_mh, multiplicative, keep_tape)


def _fused_forward_python(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, w_mh: Tensor,
                          b_ih: Optional[Tensor], b_hh: Optional[Tensor], b_mh: Optional[Tensor],
                          multiplicative: bool, keep_tape: bool):
    """x (T, B, I) contiguous, h0/c0 (B, H). Returns hs (T, B, H), h_T, c_T and the tape for the
    backward: the input projection (p_m (T, B, H) under addition, all of p (T, B, 5H) under
    multiplicative integration); r, m (T, B, H); the forget gate f (T, B, H); K (T, B, 4H) and dh_to_dc (T, B, H), the factors of the backward that do not depend on the
    incoming gradient (see _fused_backward), formed here while their inputs are in cache; q (T, B, 4H)
    under multiplicative integration (else empty). Without ``keep_tape`` (inference) the
    intermediates live in per-step scratch buffers and the tape is returned as empty tensors."""
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
    # Chunks of ~4 MB that one reused buffer holds, instead of one (T, B, 5H) array written to and read
    # back from main memory: 10-30% faster forward at the benchmark sizes (docs/performance-torch.md).
    chunk = T if keep_all_p else max(1, min(T, _PROJECTION_CHUNK_BYTES // (B * 5 * H * x.element_size())))
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
        return (hs, h_T, c_T) + tuple(new(0) for _ in range(7))
    p_tape = p_buffer if keep_all_p else p_m_tape
    return hs, h_T, c_T, p_tape, r_all, m_all, f_tape, K, dh_to_dc, q_all


_PROJECTION_CHUNK_BYTES = 4 << 20


def _fused_backward(d_hs: Optional[Tensor], d_hT: Optional[Tensor], d_cT: Optional[Tensor],
                    x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, w_mh: Tensor,
                    has_b_ih: bool, has_b_hh: bool, has_b_mh: bool, multiplicative: bool, need_dx: bool,
                    hs: Tensor, p: Tensor, r_all: Tensor, m_all: Tensor, f: Tensor, K: Tensor,
                    dh_to_dc: Tensor, q_all: Tensor):
    args = (d_hs, d_hT, d_cT, x, h0, w_ih, w_hh, w_mh, has_b_ih, has_b_hh, has_b_mh, multiplicative, need_dx,
            hs, p, r_all, m_all, f, K, dh_to_dc, q_all)
    if _compiled_loops_for(x):
        return tuple(torch.ops.mlstm_cpu.layer_backward(*args))
    return _fused_backward_python(*args)


def _fused_backward_python(d_hs: Optional[Tensor], d_hT: Optional[Tensor], d_cT: Optional[Tensor],
                           x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, w_mh: Tensor,
                           has_b_ih: bool, has_b_hh: bool, has_b_mh: bool, multiplicative: bool,
                           need_dx: bool, hs: Tensor, p: Tensor, r_all: Tensor, m_all: Tensor, f: Tensor,
                           K: Tensor, dh_to_dc: Tensor, q_all: Tensor):
    """Back-propagation through time (the math of mlstm_spec.equations.run_backward).

    With D = (d_c, d_h, d_c, d_c) for the gate blocks (i, o, f, z), the gradient of the gate
    pre-activations is d_a = D * K, K saved by the forward; the loop does per step two matrix
    products and a few element-wise products, and every weight gradient is one matrix product over
    all T*B rows at the end."""
    T, B, I = x.shape
    H = h0.shape[-1]
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


# torch.compile's on-disk caches know an operator by its name and schema, not by its Python body: the
# version in the names changes whenever what the operators return changes, so no stale cache is used.
_OP_VERSION = 2


@torch.library.custom_op(f"mlstm_torch::layer_forward_v{_OP_VERSION}", mutates_args=())
def _layer_forward_op(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, w_mh: Tensor,
                      b_ih: Optional[Tensor], b_hh: Optional[Tensor], b_mh: Optional[Tensor],
                      multiplicative: bool, keep_tape: bool
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    with torch.autocast(x.device.type, enabled=False):
        return _fused_forward(x, h0, c0, w_ih, w_hh, w_mh, b_ih, b_hh, b_mh, multiplicative, keep_tape)


@_layer_forward_op.register_fake
def _(x, h0, c0, w_ih, w_hh, w_mh, b_ih, b_hh, b_mh, multiplicative, keep_tape):
    T, B, _ = x.shape
    H = h0.shape[-1]
    new = x.new_empty
    if not keep_tape:
        return (new(T, B, H), new(B, H), new(B, H)) + tuple(new(0) for _ in range(7))
    return (new(T, B, H), new(B, H), new(B, H), new(T, B, 5 * H if multiplicative else H), new(T, B, H),
            new(T, B, H), new(T, B, H), new(T, B, 4 * H), new(T, B, H),
            new(T, B, 4 * H) if multiplicative else new(0))


@torch.library.custom_op(f"mlstm_torch::layer_backward_v{_OP_VERSION}", mutates_args=())
def _layer_backward_op(d_hs: Optional[Tensor], d_hT: Optional[Tensor], d_cT: Optional[Tensor],
                       x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, w_mh: Tensor,
                       has_b_ih: bool, has_b_hh: bool, has_b_mh: bool, multiplicative: bool,
                       need_dx: bool, hs: Tensor, p: Tensor, r_all: Tensor, m_all: Tensor,
                       f: Tensor, K: Tensor, dh_to_dc: Tensor, q_all: Tensor
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    with torch.autocast(x.device.type, enabled=False):
        d_hs, d_hT, d_cT = (None if g is None else g.contiguous() for g in (d_hs, d_hT, d_cT))
        return _fused_backward(d_hs, d_hT, d_cT, x, h0, w_ih, w_hh, w_mh, has_b_ih, has_b_hh,
                               has_b_mh, multiplicative, need_dx, hs, p, r_all, m_all, f, K,
                               dh_to_dc, q_all)


@_layer_backward_op.register_fake
def _(d_hs, d_hT, d_cT, x, h0, w_ih, w_hh, w_mh, has_b_ih, has_b_hh, has_b_mh, multiplicative,
      need_dx, hs, p, r_all, m_all, f, K, dh_to_dc, q_all):
    H = h0.shape[-1]
    new = x.new_empty
    return (new(x.shape) if need_dx else new(0), torch.empty_like(h0), torch.empty_like(h0),
            torch.empty_like(w_ih), torch.empty_like(w_hh), torch.empty_like(w_mh),
            new(5 * H) if has_b_ih else new(0), new(H) if has_b_hh else new(0),
            new(4 * H) if has_b_mh else new(0))


def _setup_context(ctx, inputs, output):
    x, h0, c0, w_ih, w_hh, w_mh, b_ih, b_hh, b_mh, multiplicative, keep_tape = inputs
    hs, _, _, *tape = output
    if not keep_tape:
        raise RuntimeError("the mLSTM layer operator was called with keep_tape=False on inputs that "
                           "require grad; it cannot be differentiated then")
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*tape)
    ctx.flags = (b_ih is not None, b_hh is not None, b_mh is not None, multiplicative)
    ctx.save_for_backward(x, h0, w_ih, w_hh, w_mh, hs, *tape)


def _backward(ctx, d_hs, d_hT, d_cT, *unused_tape_grads):
    x, h0, w_ih, w_hh, w_mh, hs, *tape = ctx.saved_tensors
    has_b_ih, has_b_hh, has_b_mh, multiplicative = ctx.flags
    if d_hs is None and d_hT is None and d_cT is None:
        return (None,) * 11
    grads = _layer_backward_op(d_hs, d_hT, d_cT, x, h0, w_ih, w_hh, w_mh, has_b_ih, has_b_hh,
                               has_b_mh, multiplicative, ctx.needs_input_grad[0], hs, *tape)
    d_x, d_h0, d_c0, d_w_ih, d_w_hh, d_w_mh, d_b_ih, d_b_hh, d_b_mh = grads
    return (d_x if ctx.needs_input_grad[0] else None, d_h0, d_c0, d_w_ih, d_w_hh, d_w_mh,
            d_b_ih if has_b_ih else None, d_b_hh if has_b_hh else None,
            d_b_mh if has_b_mh else None, None, None)


_layer_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# The plain path: ordinary differentiable operations, one step at a time
# ------------------------------------------------------------------------------------------------

def _plain_step(p: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, w_mh: Tensor, b_hh: Optional[Tensor],
                b_mh: Optional[Tensor], multiplicative: bool) -> tuple[Tensor, Tensor]:
    """One step from the input projection ``p`` (..., 5H); any leading batch shape."""
    H = h.shape[-1]
    p_m, p_g = p[..., :H], p[..., H:]
    r = h * w_hh if w_hh.dim() == 1 else torch.matmul(h, w_hh.t())
    if b_hh is not None:
        r = r + b_hh
    q = F.linear(p_m * r, w_mh, b_mh)
    a = p_g * q if multiplicative else p_g + q
    i, o, f = torch.sigmoid(a[..., : 3 * H]).split(H, dim=-1)
    z = torch.tanh(a[..., 3 * H:])
    c = f * c + i * z
    return o * torch.tanh(c), c


def _plain_layer(x, h0, c0, w_ih, w_hh, w_mh, b_ih, b_hh, b_mh, multiplicative):
    """x (T, B, I) -> hs (T, B, H), h_T, c_T; autograd does the backward.

    The steps' projections come from ``unbind``, whose backward stacks the T gradients once; indexing
    ``p[t]`` instead makes every step's backward materialise a zero-filled gradient of the whole
    projection (measured 3.4x slower forward+backward at B=32, T=128, I=64, H=256)."""
    p = F.linear(x, w_ih, b_ih)
    h, c, outputs = h0, c0, []
    for p_t in p.unbind(0):
        h, c = _plain_step(p_t, h, c, w_hh, w_mh, b_hh, b_mh, multiplicative)
        outputs.append(h)
    return torch.stack(outputs), h, c


def _functorch_active() -> bool:
    """True inside torch.func.grad / vmap / jacrev ..., where custom operators need extra rules."""
    return bool(torch._C._are_functorch_transforms_active())


# ------------------------------------------------------------------------------------------------
# Validation helpers (messages phrased by mlstm_spec.validation, as in every backend)
# ------------------------------------------------------------------------------------------------

def _dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_tensor(value, argument):
    if not isinstance(value, Tensor):
        raise TypeError(f"{argument} must be a torch.Tensor, got {type(value).__name__}")


def _check_device(value: Tensor, device: torch.device, argument: str):
    if value.device != device:
        raise ValueError(
            f"{argument} is on device {value.device}, but the parameters are on {device}; "
            f"move it with .to({str(device)!r})"
        )


def _autocast_dtype(device_type: str, param_dtype: torch.dtype) -> Optional[torch.dtype]:
    """The dtype torch.autocast asks for on this device type, or None when autocast is off (or the
    layer is float64, which autocast leaves alone as it does for every op)."""
    if param_dtype == torch.float64:
        return None
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        return None
    return None


# ------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------

class _MLSTMBase(nn.Module):
    """What the cell and the layer share: options, per-layer parameters, initialiser, converters."""

    input_size: int
    hidden_size: int
    num_layers: int

    def _init_options(self, input_size, hidden_size, num_layers, bias, recurrent_bias,
                      multiplicative_bias, independent_recurrence, integration_mode, dropout):
        check_layer_options(input_size, hidden_size, num_layers=num_layers, dropout=dropout,
                            integration_mode=integration_mode, bias=bias, recurrent_bias=recurrent_bias,
                            multiplicative_bias=multiplicative_bias,
                            independent_recurrence=independent_recurrence)
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        set_layer_options(self, bias=bias, recurrent_bias=recurrent_bias,
                          multiplicative_bias=multiplicative_bias,
                          independent_recurrence=independent_recurrence,
                          integration_mode=integration_mode)

    def _register_layer(self, layer: int, suffix: str, factory_kwargs):
        H = self.hidden_size
        in_size = self.input_size if layer == 0 else H
        shapes = {
            "weight_ih": (5 * H, in_size),
            "weight_hh": (H,) if self.independent_recurrence else (H, H),
            "weight_mh": (4 * H, H),
            "bias_ih": (5 * H,),
            "bias_hh": (H,),
            "bias_mh": (4 * H,),
        }
        for name in present_params(self._info(layer)):
            self.register_parameter(name + suffix, nn.Parameter(torch.empty(shapes[name], **factory_kwargs)))

    def _info(self, layer: int, dtype: str = "float32") -> LayerInfo:
        return LayerInfo(
            input_size=self.input_size if layer == 0 else self.hidden_size,
            hidden_size=self.hidden_size, bias=self.bias, recurrent_bias=self.recurrent_bias,
            multiplicative_bias=self.multiplicative_bias,
            independent_recurrence=self.independent_recurrence, dtype=dtype,
        )

    def _suffix(self, layer: int) -> str:
        raise NotImplementedError

    def layer_parameters(self, layer: int = 0) -> dict:
        """The parameters of layer ``layer`` under their canonical names (``weight_ih``, ...)."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer must be in [0, {self.num_layers}), got {layer}")
        suffix = self._suffix(layer)
        return {name: getattr(self, name + suffix) for name in present_params(self._info(layer))}

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw the weights like RecurrentLayers.jl: Glorot uniform ``U(-a, a)``,
        ``a = sqrt(6 / (fan_in + fan_out))`` over each whole stacked matrix (a vector ``weight_hh``
        counts as an H x 1 matrix: ``a = sqrt(6 / (1 + H))``); biases zero. Uses torch's global
        random generator (seed it with ``torch.manual_seed``)."""
        for layer in range(self.num_layers):
            for name, param in self.layer_parameters(layer).items():
                if name.startswith("bias"):
                    param.zero_()
                else:
                    fan_out, fan_in = (param.shape[0], 1) if param.dim() == 1 else param.shape
                    bound = math.sqrt(6.0 / (fan_in + fan_out))
                    param.uniform_(-bound, bound)

    def _param_dtype(self) -> torch.dtype:
        return self.layer_parameters(0)["weight_ih"].dtype

    def _param_device(self) -> torch.device:
        return self.layer_parameters(0)["weight_ih"].device

    # ---- canonical parameters ----

    @classmethod
    def from_canonical(cls, params, *, device=None, dtype=None, **options):
        """Build the module from canonical parameters, copying values exactly.

        Args:
            params: one canonical mapping (``weight_ih``, ``weight_hh``, ``weight_mh`` and the biases
                switched on; see :mod:`mlstm_spec`), or a list of them, first layer first (a stack;
                :class:`MLSTMCell` takes exactly one). Values may be NumPy arrays (float16, float32,
                float64, or ``ml_dtypes.bfloat16``) or torch tensors.
            device: where to put the parameters (default: CPU).
            dtype: convert the values to this dtype (an explicit cast); default: keep theirs.
            **options: the remaining constructor options (``integration_mode``, ``batch_first``,
                ``dropout``, ``fused``). The bias flags and ``independent_recurrence`` are read from
                ``params``; giving them is allowed only when they agree.
        """
        layers = _as_numpy_layers(params)
        if cls is MLSTMCell and len(layers) != 1:
            raise ValueError(f"MLSTMCell.from_canonical takes one layer's parameters, got {len(layers)} layers")
        bfloat16 = [k for p in layers for k, v in p.items() if v.dtype.name == "bfloat16"]
        checked = [{k: v.astype(np.float32) if v.dtype.name == "bfloat16" else v for k, v in p.items()}
                   for p in layers]
        checked, infos = canonical_stack(checked)
        if bfloat16 and len(bfloat16) != sum(len(p) for p in layers):
            raise TypeError("params mixes bfloat16 with other dtypes; all parameters must share one dtype")
        source_dtype = torch.bfloat16 if bfloat16 else getattr(torch, infos[0].dtype)
        first = infos[0]
        for flag, value in first.options.items():
            if flag in options and bool(options[flag]) != value:
                raise ValueError(
                    f"{flag}={options[flag]!r} disagrees with params, which say {flag}={value} "
                    "(read from the keys present and the shape of weight_hh)"
                )
            options[flag] = value
        if cls is not MLSTMCell:
            if "num_layers" in options and options["num_layers"] != len(layers):
                raise ValueError(f"num_layers={options['num_layers']} disagrees with params, which hold "
                                 f"{len(layers)} layer(s)")
            options["num_layers"] = len(layers)
        module = cls(first.input_size, first.hidden_size, device=device,
                     dtype=dtype if dtype is not None else source_dtype, **options)
        with torch.no_grad():
            for layer, p in enumerate(layers):
                target = module.layer_parameters(layer)
                for name, value in p.items():
                    target[name].copy_(_to_tensor(value))
        return module

    def to_canonical(self) -> list[dict]:
        """The parameters as canonical mappings of NumPy arrays, one per layer (bfloat16 as
        ``ml_dtypes.bfloat16``), that :meth:`from_canonical` and :mod:`mlstm_spec` accept."""
        return [{name: _to_numpy(param) for name, param in self.layer_parameters(layer).items()}
                for layer in range(self.num_layers)]


def _as_numpy_layers(params) -> list[dict]:
    if isinstance(params, Mapping):
        layers = [params]
    elif isinstance(params, Sequence) and not isinstance(params, (str, bytes)):
        layers = list(params)
    else:
        raise TypeError("params must be a canonical mapping or a non-empty list of them (one per layer), "
                        f"got {type(params).__name__}")
    out = []
    for p in layers:
        if not isinstance(p, Mapping):
            raise TypeError(f"each layer of params must be a mapping, got {type(p).__name__}")
        out.append({k: _to_numpy(v) if isinstance(v, Tensor) else np.asarray(v) for k, v in p.items()})
    return out


def _to_tensor(array: np.ndarray) -> Tensor:
    if not array.flags.writeable:  # e.g. JAX's to_canonical(); torch.from_numpy warns on those
        array = array.copy()
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def _to_numpy(tensor: Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        try:
            import ml_dtypes
        except ImportError:  # exact: every bfloat16 is a float32
            return tensor.float().numpy()
        return tensor.float().numpy().astype(ml_dtypes.bfloat16)
    return tensor.numpy().copy()


class MLSTMCell(_MLSTMBase):
    r"""A multiplicative LSTM (mLSTM) cell (Krause et al., 2016), as RecurrentLayers.jl computes it.

    .. math::

        \begin{array}{ll}
        p = W_{ih} x + b_{ih} & \text{blocks } p_m, p_i, p_o, p_f, p_z \\
        r = W_{hh} h + b_{hh} & (W_{hh} \odot h + b_{hh} \text{ with independent recurrence}) \\
        m = p_m \odot r \\
        q = W_{mh} m + b_{mh} & \text{blocks } q_i, q_o, q_f, q_z \\
        i = \sigma(p_i \oplus q_i) \quad o = \sigma(p_o \oplus q_o) \quad f = \sigma(p_f \oplus q_f) \\
        z = \tanh(p_z \oplus q_z) \\
        c' = f \odot c + i \odot z \\
        h' = o \odot \tanh(c')
        \end{array}

    where :math:`\sigma` is the sigmoid, :math:`\odot` the element-wise product and :math:`\oplus` is
    :math:`+` (``integration_mode="addition"``) or :math:`\odot`
    (``integration_mode="multiplicative_integration"``). A switched-off bias is not added.

    Args:
        input_size: The number of expected features in the input ``x``.
        hidden_size: The number of features in the hidden state ``h`` (and cell state ``c``).
        bias: If ``False``, there is no ``bias_ih``. Default: ``True``
        recurrent_bias: If ``False``, there is no ``bias_hh``. Default: ``True``
        multiplicative_bias: If ``False``, there is no ``bias_mh``. Default: ``True``
        independent_recurrence: If ``True``, ``weight_hh`` is a vector of ``hidden_size`` applied
            element-wise. Default: ``False``
        integration_mode: ``"addition"`` or ``"multiplicative_integration"``. Default: ``"addition"``
        device, dtype: of the parameters.

    Inputs: input, (h_0, c_0)
        - **input** of shape ``(batch, input_size)`` or ``(input_size,)``.
        - **h_0**, **c_0** of shape ``(batch, hidden_size)`` or ``(hidden_size,)``; zeros if not
          given. They must have the parameters' dtype and device (dtypes, autocast and non-finite
          values as for :class:`MLSTM`).

    Outputs: (h_1, c_1)
        - **h_1**, **c_1** of shape ``(batch, hidden_size)`` or ``(hidden_size,)``.

    Attributes:
        weight_ih: ``(5*hidden_size, input_size)``, row blocks in the order ``m, i, o, f, z``.
        weight_hh: ``(hidden_size, hidden_size)``, or ``(hidden_size,)`` with independent recurrence.
        weight_mh: ``(4*hidden_size, hidden_size)``, row blocks ``i, o, f, z``.
        bias_ih: ``(5*hidden_size)``, blocks ``m, i, o, f, z``; present when ``bias=True``.
        bias_hh: ``(hidden_size)``; present when ``recurrent_bias=True``.
        bias_mh: ``(4*hidden_size)``, blocks ``i, o, f, z``; present when ``multiplicative_bias=True``.

    The names, shapes and block orders are the canonical ones (RecurrentLayers.jl's), so
    :meth:`to_canonical` is a plain copy. Weights start Glorot-uniform, biases zero
    (:meth:`reset_parameters`). Non-finite inputs are not checked: they propagate to the outputs of
    their own batch row only.

    Examples::

        >>> cell = MLSTMCell(10, 20)
        >>> x = torch.randn(6, 3, 10)
        >>> h, c = torch.zeros(3, 20), torch.zeros(3, 20)
        >>> for t in range(6):
        ...     h, c = cell(x[t], (h, c))
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, recurrent_bias: bool = True,
                 multiplicative_bias: bool = True, independent_recurrence: bool = False,
                 integration_mode: str = "addition", device=None, dtype=None):
        super().__init__()
        self._init_options(input_size, hidden_size, 1, bias, recurrent_bias, multiplicative_bias,
                           independent_recurrence, integration_mode, 0.0)
        self._register_layer(0, "", dict(device=device, dtype=dtype))
        self.reset_parameters()

    def _suffix(self, layer: int) -> str:
        return ""

    def extra_repr(self) -> str:
        return _extra_repr(self)

    def forward(self, input: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
        device = self._param_device()
        params = self.layer_parameters(0)
        _check_tensor(input, "input")
        if input.dim() not in (1, 2):
            raise ValueError(f"input must have shape (batch, input_size) or (input_size,), got "
                             f"{input.dim()} dimensions {tuple(input.shape)}")
        batched = input.dim() == 2
        cast = _autocast_dtype(device.type, self._param_dtype())
        dtype = _dtype_str(cast or self._param_dtype())
        info = self._info(0, dtype)
        # check_sequence reads a 2-d shape as (steps, features): the same checks a cell needs
        _check_input(input, tuple(input.shape) if batched else (1,) + tuple(input.shape), info, device,
                     cast, "input")
        batch = (input.shape[0],) if batched else ()
        if hx is None:
            h = c = input.new_zeros(batch + (self.hidden_size,), dtype=cast or self._param_dtype())
        else:
            _check_hx(hx, batch, info, device, cast, "hx")
            h, c = hx
        out_dtype = cast or self._param_dtype()
        work = _compute_dtype(out_dtype)
        input, h, c = _to_work(input, cast, work), _to_work(h, cast, work), _to_work(c, cast, work)
        params = {k: _to_work(v, cast, work) for k, v in params.items()}
        with _no_autocast(cast, device.type):
            p = F.linear(input, params["weight_ih"], params.get("bias_ih"))
            h, c = _plain_step(p, h, c, params["weight_hh"], params["weight_mh"], params.get("bias_hh"),
                               params.get("bias_mh"), self.multiplicative)
        return h.to(out_dtype), c.to(out_dtype)


class MLSTM(_MLSTMBase):
    r"""A multi-layer multiplicative LSTM (mLSTM, Krause et al., 2016) over an input sequence, used
    like :class:`torch.nn.LSTM`.

    For each element in the input sequence, each layer computes (RecurrentLayers.jl's formulation):

    .. math::

        \begin{array}{ll}
        p_t = W_{ih} x_t + b_{ih} & \text{blocks } p_{m,t}, p_{i,t}, p_{o,t}, p_{f,t}, p_{z,t} \\
        r_t = W_{hh} h_{t-1} + b_{hh} & (W_{hh} \odot h_{t-1} + b_{hh} \text{ with independent recurrence}) \\
        m_t = p_{m,t} \odot r_t \\
        q_t = W_{mh} m_t + b_{mh} & \text{blocks } q_{i,t}, q_{o,t}, q_{f,t}, q_{z,t} \\
        i_t = \sigma(p_{i,t} \oplus q_{i,t}) \\
        o_t = \sigma(p_{o,t} \oplus q_{o,t}) \\
        f_t = \sigma(p_{f,t} \oplus q_{f,t}) \\
        z_t = \tanh(p_{z,t} \oplus q_{z,t}) \\
        c_t = f_t \odot c_{t-1} + i_t \odot z_t \\
        h_t = o_t \odot \tanh(c_t)
        \end{array}

    where :math:`h_t` is the hidden state at time `t`, :math:`c_t` the cell state, :math:`x_t` the
    input, :math:`m_t` the multiplicative intermediate state, :math:`i_t, o_t, f_t` the input, output
    and forget gates, :math:`z_t` the candidate (the paper's :math:`\hat h_t`), :math:`\sigma` the
    sigmoid, :math:`\odot` the element-wise product, and :math:`\oplus` is :math:`+`
    (``integration_mode="addition"``) or :math:`\odot` (``"multiplicative_integration"``). A
    switched-off bias is not added. In a multilayer mLSTM, the input :math:`x^{(l)}_t` of layer
    :math:`l \ge 1` is the hidden state :math:`h^{(l-1)}_t` of the previous layer, multiplied by
    dropout :math:`\delta^{(l-1)}_t` (a Bernoulli variable that is 0 with probability
    :attr:`dropout`) in training mode.

    Args:
        input_size: The number of expected features in the input `x`.
        hidden_size: The number of features in the hidden state `h` (and cell state `c`).
        num_layers: Number of recurrent layers stacked. Default: 1
        bias: If ``False``, the layers have no ``bias_ih``. Default: ``True``
        recurrent_bias: If ``False``, no ``bias_hh``. Default: ``True``
        multiplicative_bias: If ``False``, no ``bias_mh``. Default: ``True``
        independent_recurrence: If ``True``, ``weight_hh`` is a vector applied element-wise.
            Default: ``False``
        integration_mode: ``"addition"`` or ``"multiplicative_integration"``. Default: ``"addition"``
        batch_first: If ``True``, input and output are `(batch, seq, feature)` instead of
            `(seq, batch, feature)`; the states are not affected. Default: ``False``
        dropout: If non-zero, a `Dropout` layer on the outputs of each layer except the last, with
            this probability, in training mode only. Default: 0
        device, dtype: of the parameters.
        fused: If ``True`` (default), run the recurrence as one fused operator per layer with an
            analytic backward (see the module docstring); ``False`` uses ordinary differentiable
            operations, which allow second derivatives. Under ``torch.func`` transforms the plain
            path is used either way.

    Inputs: input, (h_0, c_0)
        * **input**: tensor of shape :math:`(L, H_{in})` for unbatched input,
          :math:`(L, N, H_{in})` when ``batch_first=False`` or :math:`(N, L, H_{in})` when
          ``batch_first=True``.
        * **h_0**: tensor of shape :math:`(D, H_{out})` for unbatched input or
          :math:`(D, N, H_{out})`: the initial hidden state of each layer. Defaults to zeros.
        * **c_0**: tensor of shape :math:`(D, H_{out})` for unbatched input or
          :math:`(D, N, H_{out})`: the initial cell state of each layer. Defaults to zeros.

        where:

        .. math::
            \begin{aligned}
                N ={} & \text{batch size} \\
                L ={} & \text{sequence length} \\
                D ={} & \text{num\_layers} \\
                H_{in} ={} & \text{input\_size} \\
                H_{out} ={} & \text{hidden\_size}
            \end{aligned}

        All must have the parameters' dtype and device: nothing is cast silently. Under
        ``torch.autocast`` (and a float16/bfloat16/float32 layer), input, states and weights are
        rounded to the autocast dtype and the outputs have that dtype. float16 and bfloat16 layers
        compute the recurrence in float32 and round the outputs (and gradients) once, as
        :mod:`mlstm_spec` computes float16: rounding every intermediate would compound over the
        steps. Non-finite values are not checked (a check would force a device synchronisation):
        they propagate, and only to the outputs of their own batch row.

    Outputs: output, (h_n, c_n)
        * **output**: tensor of shape :math:`(L, H_{out})` for unbatched input,
          :math:`(L, N, H_{out})` when ``batch_first=False`` or :math:`(N, L, H_{out})` when
          ``batch_first=True``: :math:`h_t` of the last layer for each `t`.
        * **h_n**: tensor of shape :math:`(D, H_{out})` or :math:`(D, N, H_{out})`: the final hidden
          state of each layer.
        * **c_n**: tensor of shape :math:`(D, H_{out})` or :math:`(D, N, H_{out})`: the final cell
          state of each layer.

    Attributes:
        weight_ih_l[k]: the input-hidden weights of layer `k`, ``(5*hidden_size, input_size)`` for
            `k = 0`, otherwise ``(5*hidden_size, hidden_size)``; row blocks ``m, i, o, f, z``.
        weight_hh_l[k]: the hidden-hidden weights of layer `k`, ``(hidden_size, hidden_size)``, or
            ``(hidden_size,)`` with ``independent_recurrence=True``.
        weight_mh_l[k]: the multiplicative-hidden weights of layer `k`, ``(4*hidden_size,
            hidden_size)``; row blocks ``i, o, f, z``.
        bias_ih_l[k]: ``(5*hidden_size)``, blocks ``m, i, o, f, z``; only when ``bias=True``.
        bias_hh_l[k]: ``(hidden_size)``; only when ``recurrent_bias=True``.
        bias_mh_l[k]: ``(4*hidden_size)``, blocks ``i, o, f, z``; only when
            ``multiplicative_bias=True``.

    Without the ``_l[k]`` suffix these are the canonical names, shapes and block orders
    (RecurrentLayers.jl's; note that torchrecurrent uses the same names with the blocks in another
    order), so :meth:`to_canonical` is a plain copy and ``state_dict`` keys say which canonical matrix
    each is. A switched-off bias is absent, not zero. Weights start Glorot-uniform over each whole
    stacked matrix and biases at zero (:meth:`reset_parameters`).

    Examples::

        >>> rnn = MLSTM(10, 20, num_layers=2)
        >>> input = torch.randn(5, 3, 10)
        >>> h0, c0 = torch.randn(2, 3, 20), torch.randn(2, 3, 20)
        >>> output, (hn, cn) = rnn(input, (h0, c0))
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 recurrent_bias: bool = True, multiplicative_bias: bool = True,
                 independent_recurrence: bool = False, integration_mode: str = "addition",
                 batch_first: bool = False, dropout: float = 0.0, device=None, dtype=None, *,
                 fused: bool = True):
        super().__init__()
        self._init_options(input_size, hidden_size, num_layers, bias, recurrent_bias, multiplicative_bias,
                           independent_recurrence, integration_mode, dropout)
        if not isinstance(batch_first, (bool, np.bool_)):
            raise TypeError(f"batch_first must be a bool, got {type(batch_first).__name__} {batch_first!r}")
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.fused = bool(fused)
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                f"dropout={dropout} has no effect with num_layers=1: dropout is applied between layers",
                stacklevel=2,
            )
        for layer in range(self.num_layers):
            self._register_layer(layer, self._suffix(layer), dict(device=device, dtype=dtype))
        self.reset_parameters()

    def _suffix(self, layer: int) -> str:
        return f"_l{layer}"

    def extra_repr(self) -> str:
        s = _extra_repr(self)
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if not self.fused:
            s += ", fused=False"
        return s

    def forward(self, input: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        device = self._param_device()
        _check_tensor(input, "input")
        layout = "(N, L, H_in)" if self.batch_first else "(L, N, H_in)"
        if input.dim() not in (2, 3):
            raise ValueError(f"input must have shape {layout} or (L, H_in) (unbatched), got "
                             f"{input.dim()} dimensions {tuple(input.shape)}")
        batched = input.dim() == 3
        cast = _autocast_dtype(device.type, self._param_dtype())
        dtype = cast or self._param_dtype()
        info = self._info(0, _dtype_str(dtype))
        _check_input(input, tuple(input.shape), info, device, cast, "input")
        if batched and self.batch_first:
            input = input.transpose(0, 1)
        if not batched:
            input = input.unsqueeze(1)
        batch = input.shape[1]
        state_batch = (self.num_layers, batch) if batched else (self.num_layers,)
        if hx is None:
            h0 = c0 = input.new_zeros(self.num_layers, batch, self.hidden_size, dtype=dtype)
        else:
            _check_hx(hx, state_batch, info, device, cast, "hx")
            h0, c0 = (s if batched else s.unsqueeze(1) for s in hx)
        work = _compute_dtype(dtype)
        input, h0, c0 = _to_work(input, cast, work), _to_work(h0, cast, work), _to_work(c0, cast, work)

        use_fused = self.fused and not _functorch_active()
        layer_input = input.contiguous() if use_fused else input
        h_n, c_n = [], []
        with _no_autocast(cast, device.type):
            for layer in range(self.num_layers):
                params = {k: _to_work(v, cast, work) for k, v in self.layer_parameters(layer).items()}
                args = (layer_input, h0[layer], c0[layer], params["weight_ih"], params["weight_hh"],
                        params["weight_mh"], params.get("bias_ih"), params.get("bias_hh"),
                        params.get("bias_mh"), self.multiplicative)
                if use_fused:
                    keep_tape = torch.is_grad_enabled() and (
                        layer_input.requires_grad or h0.requires_grad or c0.requires_grad
                        or any(p.requires_grad for p in params.values()))
                    hs, h_T, c_T = _layer_forward_op(*args, keep_tape)[:3]
                else:
                    hs, h_T, c_T = _plain_layer(*args)
                h_n.append(h_T)
                c_n.append(c_T)
                layer_input = hs
                if layer < self.num_layers - 1 and self.dropout > 0 and self.training:
                    layer_input = F.dropout(layer_input, self.dropout, training=True)
        output = layer_input.to(dtype)
        h_n, c_n = torch.stack(h_n).to(dtype), torch.stack(c_n).to(dtype)
        if not batched:
            return output.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n)


def _extra_repr(module) -> str:
    s = f"{module.input_size}, {module.hidden_size}"
    for flag in ("bias", "recurrent_bias", "multiplicative_bias"):
        if not getattr(module, flag):
            s += f", {flag}=False"
    if module.independent_recurrence:
        s += ", independent_recurrence=True"
    if module.integration_mode != "addition":
        s += f", integration_mode={module.integration_mode!r}"
    return s


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16 and bfloat16 are computed in float32 and rounded once at the end (as mlstm_spec
    computes float16): rounding every intermediate of the recurrence would compound over the steps."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _to_work(value: Tensor, cast: Optional[torch.dtype], work: torch.dtype) -> Tensor:
    """Under autocast, round to the autocast dtype first (as autocast rounds a matmul's inputs);
    then move to the compute dtype. A no-op for float32/float64 outside autocast."""
    if cast is not None:
        value = value.to(cast)
    return value.to(work)


class _no_autocast:
    """Disable autocast inside the recurrence after the inputs were cast to its dtype."""

    def __init__(self, cast, device_type):
        self.context = torch.autocast(device_type, enabled=False) if cast is not None else None

    def __enter__(self):
        if self.context is not None:
            self.context.__enter__()

    def __exit__(self, *exc):
        if self.context is not None:
            self.context.__exit__(*exc)


def _check_input(input: Tensor, shape, info: LayerInfo, device, cast, argument):
    if cast is not None:  # autocast: any floating input, computed in the autocast dtype
        check_dtype(_dtype_str(input.dtype), argument, TORCH_DTYPES)
        check_sequence(shape, info.dtype, info, argument, TORCH_DTYPES)
    else:
        check_sequence(shape, _dtype_str(input.dtype), info, argument, TORCH_DTYPES)
    _check_device(input, device, argument)


def _check_hx(hx, batch_shape, info: LayerInfo, device, cast, argument):
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        check_state(hx, batch_shape, info, argument)  # raises the shared "must be a pair" error
    for name, value in zip(("h", "c"), hx):
        _check_tensor(value, f"{argument} {name}")
        if cast is not None:
            check_dtype(_dtype_str(value.dtype), f"{argument} {name}", TORCH_DTYPES)
    dtype_of = (lambda v: info.dtype) if cast is not None else (lambda v: _dtype_str(v.dtype))
    check_state(tuple(hx), batch_shape, info, argument, TORCH_DTYPES,
                shape_of=lambda v: tuple(v.shape), dtype_of=dtype_of)
    for name, value in zip(("h", "c"), hx):
        _check_device(value, device, f"{argument} {name}")


# ------------------------------------------------------------------------------------------------
# Devices and the conformance adapter
# ------------------------------------------------------------------------------------------------

def devices() -> list[str]:
    """The devices torch sees: ``["cpu"]`` plus ``"cuda:k"`` for every visible GPU."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{k}" for k in range(torch.cuda.device_count())]
    return found


def _cpu_float16_works() -> bool:
    try:
        a = torch.ones(2, 2, dtype=torch.float16)
        return bool(torch.addmm(a[0], a, a).sum().item() == 12)
    except RuntimeError:
        return False


class ConformanceAdapter:
    """The conformance suite's adapter (see :mod:`mlstm_spec.conformance.suite`) for :class:`MLSTM`
    on one device. It builds the layer through :meth:`MLSTM.from_canonical` with ``batch_first=True``
    and converts the suite's states ((h, c) for one layer, a list of pairs for a stack) to and from
    ``nn.LSTM``'s ``(num_layers, N, H)``. On a GPU it turns TF32 off so float32 means float32."""

    name = "torch"

    def __init__(self, device: str = "cpu", *, fused: bool = True, python_loops: bool = False):
        self.device = str(device)
        self.fused = fused
        self.python_loops = python_loops  # on CPU: the fused layer's Python loops, not the compiled ones
        self.torch_device = torch.device(self.device)
        dtypes = ["float64", "float32", "bfloat16"]
        if self.torch_device.type != "cpu" or _cpu_float16_works():
            dtypes.append("float16")
        self.dtypes = tuple(dtypes)
        if self.torch_device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False

    def supports(self, options) -> bool:
        return options.get("dtype", "float64") in self.dtypes

    def _tensor(self, array, requires_grad=False):
        return _to_tensor(np.asarray(array)).to(self.torch_device).requires_grad_(requires_grad)

    def _model(self, params, integration_mode):
        return MLSTM.from_canonical(params, integration_mode=integration_mode, batch_first=True,
                                    device=self.torch_device, fused=self.fused)

    def _state(self, state, layers, batch_shape, dtype, requires_grad):
        if state is None:
            zeros = torch.zeros((layers,) + batch_shape, dtype=dtype, device=self.torch_device)
            return zeros.clone().requires_grad_(requires_grad), zeros.clone().requires_grad_(requires_grad)
        pairs = [state] if layers == 1 else state
        h = torch.stack([self._tensor(pair[0]) for pair in pairs])
        c = torch.stack([self._tensor(pair[1]) for pair in pairs])
        return h.requires_grad_(requires_grad), c.requires_grad_(requires_grad)

    def _run(self, params, xs, state, integration_mode, requires_grad):
        model = self._model(params, integration_mode)
        x = self._tensor(xs, requires_grad)
        batch_shape = tuple(x.shape[:1]) if x.dim() == 3 else ()
        h0, c0 = self._state(state, model.num_layers, batch_shape + (model.hidden_size,), x.dtype,
                             requires_grad)
        out, (h_n, c_n) = model(x, (h0, c0))
        return model, x, h0, c0, out, h_n, c_n

    def _loops(self):
        return python_cpu_loops() if self.python_loops else contextlib.nullcontext()

    def forward(self, params, xs, state, *, integration_mode):
        with torch.no_grad(), self._loops():
            model, _, _, _, out, h_n, c_n = self._run(params, xs, state, integration_mode, False)
        final = [(_to_numpy(h_n[k]), _to_numpy(c_n[k])) for k in range(model.num_layers)]
        return _to_numpy(out), final[0] if model.num_layers == 1 else final

    def gradients(self, params, xs, state, d_hs, d_state, *, integration_mode):
        with self._loops():
            model, x, h0, c0, out, h_n, c_n = self._run(params, xs, state, integration_mode, True)
            layers = model.num_layers
            loss = (out * self._tensor(d_hs)).sum()
            if d_state is not None:
                d_h, d_c = self._state(d_state, layers, (), x.dtype, False)
                loss = loss + (h_n * d_h).sum() + (c_n * d_c).sum()
            named = [(k, name, p) for k in range(layers) for name, p in model.layer_parameters(k).items()]
            grads = torch.autograd.grad(loss, [x, h0, c0] + [p for _, _, p in named])
        d_x, d_h0, d_c0 = grads[:3]
        result = [{"h0": _to_numpy(d_h0[k]), "c0": _to_numpy(d_c0[k])} for k in range(layers)]
        for (k, name, _), g in zip(named, grads[3:]):
            result[k][name] = _to_numpy(g)
        result[0]["x"] = _to_numpy(d_x)
        return result[0] if layers == 1 else result
