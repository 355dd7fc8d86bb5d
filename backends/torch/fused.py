"""The fused recurrence as one custom operator per direction of differentiation, in the ``mlstm``
operator namespace:

- ``mlstm::layer_forward``: one layer's whole time loop; returns ``hs, h_T, c_T`` and the :class:`Tape`;
- ``mlstm::layer_backward``: its analytic back-propagation through time, registered as the forward's
  autograd formula.

Each has one body per device kind: the Python loops of ``loops.py`` are the default (every device), and
the compiled C++ loops (``cpu_loops.cpp``, built by ``build.py``) are registered as the CPU kernel, which
hands float16/bfloat16, ``python_loops=True`` and a machine without a compiler back to the Python loops.
A GPU kernel is one more ``register_kernel("cuda")`` here. Being custom operators, they are one opaque
node to ``torch.compile`` and to autograd; ``register_fake`` gives their output shapes from the tape's
schema.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import build, loops
from .plain import plain_layer
from .tape import Tape

NAMESPACE = "mlstm"
# torch.compile's on-disk caches know an operator by its name and schema, not by its Python body: change
# the version when what the operators compute or return changes without a change of schema.
_VERSION = 3
_GRADIENTS = ("x", "h0", "c0", "w_ih", "w_hh", "w_mh", "b_ih", "b_hh", "b_mh")
_TAPE_ARGS = ", ".join(f"Tensor {name}" for name in Tape._fields)
_FORWARD_SCHEMA = ("(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor w_mh, Tensor? b_ih, "
                   "Tensor? b_hh, Tensor? b_mh, bool multiplicative, bool keep_tape, bool python_loops) -> ("
                   + ", ".join(["Tensor"] * (3 + len(Tape._fields))) + ")")
_BACKWARD_SCHEMA = ("(Tensor? d_hs, Tensor? d_hT, Tensor? d_cT, Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, "
                    "Tensor w_mh, bool has_b_ih, bool has_b_hh, bool has_b_mh, bool multiplicative, "
                    f"bool need_dx, bool python_loops, Tensor hs, {_TAPE_ARGS}) -> ("
                    + ", ".join(["Tensor"] * len(_GRADIENTS)) + ")")


def _compiled(x: Tensor, python_loops: bool):
    """The compiled CPU loops for this call, or None (then the Python loops run)."""
    if python_loops or x.dtype not in (torch.float32, torch.float64):
        return None
    return build.cpu_loops()


def _python_forward(x, h0, c0, w_ih, w_hh, w_mh, b_ih, b_hh, b_mh, multiplicative, keep_tape, python_loops):
    with torch.autocast(x.device.type, enabled=False):
        hs, h_T, c_T, tape = loops.forward_loop(x, h0, c0, w_ih, w_hh, w_mh, b_ih, b_hh, b_mh, multiplicative,
                                                keep_tape, loops.PROJECTION_CHUNK_BYTES)
    return (hs, h_T, c_T, *tape)


def _python_backward(d_hs, d_hT, d_cT, x, h0, w_ih, w_hh, w_mh, has_b_ih, has_b_hh, has_b_mh, multiplicative,
                     need_dx, python_loops, hs, *tape):
    with torch.autocast(x.device.type, enabled=False):
        d_hs, d_hT, d_cT = (None if g is None else g.contiguous() for g in (d_hs, d_hT, d_cT))
        return loops.backward_loop(d_hs, d_hT, d_cT, x, h0, w_ih, w_hh, w_mh, has_b_ih, has_b_hh, has_b_mh,
                                   multiplicative, need_dx, hs, Tape(*tape))


layer_forward = torch.library.custom_op(f"{NAMESPACE}::layer_forward_v{_VERSION}", _python_forward,
                                        mutates_args=(), schema=_FORWARD_SCHEMA)
layer_backward = torch.library.custom_op(f"{NAMESPACE}::layer_backward_v{_VERSION}", _python_backward,
                                         mutates_args=(), schema=_BACKWARD_SCHEMA)


@layer_forward.register_kernel("cpu")
def _(x, h0, c0, w_ih, w_hh, w_mh, b_ih, b_hh, b_mh, multiplicative, keep_tape, python_loops):
    compiled = _compiled(x, python_loops)
    if compiled is None:
        return _python_forward(x, h0, c0, w_ih, w_hh, w_mh, b_ih, b_hh, b_mh, multiplicative, keep_tape,
                               python_loops)
    with torch.autocast("cpu", enabled=False):
        return tuple(compiled.layer_forward(x, h0, c0, w_ih, w_hh, w_mh, b_ih, b_hh, b_mh, multiplicative,
                                            keep_tape, loops.PROJECTION_CHUNK_BYTES))


@layer_forward.register_fake
def _(x, h0, c0, w_ih, w_hh, w_mh, b_ih, b_hh, b_mh, multiplicative, keep_tape, python_loops):
    T, B, _ = x.shape
    H = h0.shape[-1]
    shapes = Tape.shapes(T, B, H, multiplicative) if keep_tape else Tape(*[(0,)] * len(Tape._fields))
    return (x.new_empty(T, B, H), x.new_empty(B, H), x.new_empty(B, H), *(x.new_empty(s) for s in shapes))


@layer_backward.register_kernel("cpu")
def _(d_hs, d_hT, d_cT, x, h0, w_ih, w_hh, w_mh, has_b_ih, has_b_hh, has_b_mh, multiplicative, need_dx,
      python_loops, hs, *tape):
    compiled = _compiled(x, python_loops)
    if compiled is None:
        return _python_backward(d_hs, d_hT, d_cT, x, h0, w_ih, w_hh, w_mh, has_b_ih, has_b_hh, has_b_mh,
                                multiplicative, need_dx, python_loops, hs, *tape)
    with torch.autocast("cpu", enabled=False):
        d_hs, d_hT, d_cT = (None if g is None else g.contiguous() for g in (d_hs, d_hT, d_cT))
        return tuple(compiled.layer_backward(d_hs, d_hT, d_cT, x, h0, w_ih, w_hh, w_mh, has_b_ih, has_b_hh,
                                             has_b_mh, multiplicative, need_dx, hs, *tape))


@layer_backward.register_fake
def _(d_hs, d_hT, d_cT, x, h0, w_ih, w_hh, w_mh, has_b_ih, has_b_hh, has_b_mh, multiplicative, need_dx,
      python_loops, hs, *tape):
    H = h0.shape[-1]
    new = x.new_empty
    return (new(x.shape) if need_dx else new(0), torch.empty_like(h0), torch.empty_like(h0),
            torch.empty_like(w_ih), torch.empty_like(w_hh), torch.empty_like(w_mh),
            new(5 * H) if has_b_ih else new(0), new(H) if has_b_hh else new(0),
            new(4 * H) if has_b_mh else new(0))


def keep_for_backward(ctx, operator: str, keep_tape: bool, tape) -> None:
    """What every layer operator's autograd set-up does first: refuse a call that kept no tape, and mark
    the tape as outputs without gradients (absent output gradients stay None)."""
    if not keep_tape:
        raise RuntimeError(f"the mLSTM {operator} operator was called with keep_tape=False on inputs that "
                           "require grad; it cannot be differentiated then")
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*tape)


def _setup_context(ctx, inputs, output):
    x, h0, c0, w_ih, w_hh, w_mh, b_ih, b_hh, b_mh, multiplicative, keep_tape, python_loops = inputs
    hs, _, _, *tape = output
    keep_for_backward(ctx, "layer", keep_tape, tape)
    ctx.flags = (b_ih is not None, b_hh is not None, b_mh is not None, multiplicative, python_loops)
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, w_mh, b_ih, b_hh, b_mh, hs, *tape)


def _backward(ctx, d_hs, d_hT, d_cT, *unused_tape_grads):
    x, h0, c0, w_ih, w_hh, w_mh, b_ih, b_hh, b_mh, hs, *tape = ctx.saved_tensors
    has_b_ih, has_b_hh, has_b_mh, multiplicative, python_loops = ctx.flags
    if d_hs is None and d_hT is None and d_cT is None:
        return (None,) * 12
    if torch.is_grad_enabled():  # create_graph=True: the gradient itself must be differentiable
        return _differentiable_backward(ctx, (d_hs, d_hT, d_cT), (x, h0, c0, w_ih, w_hh, w_mh, b_ih, b_hh, b_mh),
                                        multiplicative)
    need_dx = ctx.needs_input_grad[0]
    grads = dict(zip(_GRADIENTS, layer_backward(d_hs, d_hT, d_cT, x, h0, w_ih, w_hh, w_mh, has_b_ih, has_b_hh,
                                                has_b_mh, multiplicative, need_dx, python_loops, hs, *tape)))
    return (grads["x"] if need_dx else None, grads["h0"], grads["c0"], grads["w_ih"], grads["w_hh"],
            grads["w_mh"], grads["b_ih"] if has_b_ih else None, grads["b_hh"] if has_b_hh else None,
            grads["b_mh"] if has_b_mh else None, None, None, None)


def _differentiable_backward(ctx, output_grads, inputs, multiplicative):
    """The backward as ordinary differentiable operations: the plain path recomputes the forward from
    the saved inputs and is differentiated with its graph kept. This runs only when a graph of the
    gradient is asked for (gradient penalties, meta-learning); otherwise the analytic backward runs."""
    names = ("weight_ih", "weight_hh", "weight_mh", "bias_ih", "bias_hh", "bias_mh")

    def layer(x, h0, c0, *weights):
        params = {name: t for name, t in zip(names, weights) if t is not None}
        return plain_layer(x, h0, c0, params, multiplicative)

    return gradients_with_graph(layer, inputs, output_grads, ctx.needs_input_grad, 12)


def gradients_with_graph(function, inputs, output_grads, needs_input_grad, size: int) -> tuple:
    """The vector-Jacobian product of ``function(*inputs)`` (a tuple of tensors) with ``output_grads``
    (None: that output unused), differentiable itself, for each input that is not None and whose
    ``needs_input_grad`` is set, in a tuple of ``size`` entries (None elsewhere), as an operator's
    registered backward returns them.

    ``torch.func.vjp`` rather than ``torch.autograd.grad`` on the recomputed outputs: the saved inputs
    keep their own history, and when h0 was computed from the same weights (a state carried over from
    an earlier call, a packed sequence's later batches) autograd.grad would follow that history too and
    return the weights' total derivative, which the outer backward then adds a second time."""
    wanted = [k for k, t in enumerate(inputs) if t is not None and needs_input_grad[k]]

    def of_wanted(*chosen):
        arguments = list(inputs)
        for k, value in zip(wanted, chosen):
            arguments[k] = value
        return tuple(function(*arguments))

    outputs, pullback = torch.func.vjp(of_wanted, *(inputs[k] for k in wanted))
    cotangents = tuple(torch.zeros_like(out) if grad is None else grad for out, grad in zip(outputs, output_grads))
    result = [None] * size
    for k, grad in zip(wanted, pullback(cotangents)):
        result[k] = grad
    return tuple(result)


layer_forward.register_autograd(_backward, setup_context=_setup_context)


def fused_layer(x: Tensor, h0: Tensor, c0: Tensor, params: dict, multiplicative: bool, python_loops: bool
                ) -> tuple[Tensor, Tensor, Tensor]:
    """One layer over x (T, B, I) contiguous from (h0, c0) (B, H): hs, h_T, c_T. The tape is kept only
    when autograd will need it."""
    keep_tape = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, h0, c0, *params.values()))
    return layer_forward(x, h0, c0, params["weight_ih"], params["weight_hh"], params["weight_mh"],
                         params.get("bias_ih"), params.get("bias_hh"), params.get("bias_mh"), multiplicative,
                         keep_tape, python_loops)[:3]

