"""What the fused forward keeps for its backward: one named schema for the Python loops, the C++ loops
(which return and take the fields in this order) and the operator's fake implementation."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Tape(NamedTuple):
    """The intermediates of a layer's forward over T steps, time-major (T, B, ...). Besides these the
    backward reads the forward's inputs and its outputs ``hs``. Inference (no tape kept) gives
    zero-size tensors in every field."""

    #: the input projection W_ih x + b_ih: only block m, (T, B, H), under addition; all five blocks,
    #: (T, B, 5H), under multiplicative integration
    p: Tensor
    #: the recurrent factor W_hh h_{t-1} + b_hh, (T, B, H)
    r: Tensor
    #: the multiplicative state p_m * r, (T, B, H)
    m: Tensor
    #: the forget gate, (T, B, H)
    f: Tensor
    #: the derivatives of the gates (i, o, f, z) by their pre-activations, times the factor that does
    #: not depend on the incoming gradient: (z i(1-i), tanh(c) o(1-o), c_{t-1} f(1-f), i(1-z^2)), (T, B, 4H)
    K: Tensor
    #: dc/dh through h = o tanh(c): o (1 - tanh(c)^2), (T, B, H)
    dh_to_dc: Tensor
    #: W_mh m + b_mh under multiplicative integration, (T, B, 4H); zero-size under addition
    q: Tensor

    @staticmethod
    def shapes(steps: int, batch: int, hidden: int, multiplicative: bool) -> "Tape":
        """The shape of every field when the tape is kept."""
        T, B, H = steps, batch, hidden
        return Tape(p=(T, B, 5 * H if multiplicative else H), r=(T, B, H), m=(T, B, H), f=(T, B, H),
                    K=(T, B, 4 * H), dh_to_dc=(T, B, H), q=(T, B, 4 * H) if multiplicative else (0,))
