"""Adapters with planted defects: the bugs real mLSTM ports have shipped (see docs/conformance.md).

The suite's power is tested by running it against each of these and asserting that it fails. Each
defect is the spec with one thing wrong, so anything the suite reports comes from that one thing.
"""

from __future__ import annotations

import numpy as np

from .. import reference
from ..equations import IH_BLOCKS, MH_BLOCKS, sigmoid
from ..params import block


class SpecAdapter:
    """The NumPy spec itself, computing in the inputs' dtype (float16 in float32)."""

    name = "mlstm_spec"
    device = "cpu"
    dtypes = ("float64", "float32", "float16")

    def forward(self, params, xs, state, *, integration_mode):
        return reference.forward(params, xs, state, integration_mode=integration_mode)

    def gradients(self, params, xs, state, d_hs, d_state, *, integration_mode):
        return reference.backward(params, xs, state, d_hs, d_state, integration_mode=integration_mode)


def _permute(array, order, blocks):
    return np.concatenate([block(array, name, blocks) for name in order])


class _ParamDefect(SpecAdapter):
    """The spec run on parameters the implementation misreads."""

    def misread(self, params):
        raise NotImplementedError

    def forward(self, params, xs, state, *, integration_mode):
        return super().forward(self.misread(params), xs, state, integration_mode=integration_mode)

    def gradients(self, params, xs, state, d_hs, d_state, *, integration_mode):
        grads = super().gradients(self.misread(params), xs, state, d_hs, d_state,
                                  integration_mode=integration_mode)
        return {k: grads.get(k, np.zeros_like(v)) for k, v in {**params, **grads}.items()}


class IhBlocksPermuted(_ParamDefect):
    """Reads weight_ih / bias_ih in torchrecurrent's block order (m, i, f, z, o)."""

    name = "defect:ih-blocks-permuted"

    def misread(self, params):
        order = ("m", "i", "f", "z", "o")
        return {k: _permute(v, order, IH_BLOCKS) if k in ("weight_ih", "bias_ih") else v
                for k, v in params.items()}


class MhBlocksPermuted(_ParamDefect):
    """Reads only weight_mh / bias_mh in another block order (i, f, z, o)."""

    name = "defect:mh-blocks-permuted"

    def misread(self, params):
        order = ("i", "f", "z", "o")
        return {k: _permute(v, order, MH_BLOCKS) if k in ("weight_mh", "bias_mh") else v
                for k, v in params.items()}


class BiasHhIgnored(_ParamDefect):
    name = "defect:bias-hh-ignored"

    def misread(self, params):
        return {k: v for k, v in params.items() if k != "bias_hh"}


class BiasMhTwice(_ParamDefect):
    name = "defect:bias-mh-added-twice"

    def misread(self, params):
        return {k: v * 2 if k == "bias_mh" else v for k, v in params.items()}


class TransposedWeights(_ParamDefect):
    """Uses ``h @ weight_hh`` instead of ``h @ weight_hh.T`` (only visible for a square matrix)."""

    name = "defect:weight-hh-transposed"

    def misread(self, params):
        return {k: v.T.copy() if k == "weight_hh" else v for k, v in params.items()}


class StateSwapped(SpecAdapter):
    name = "defect:state-returned-as-(c,h)"

    def forward(self, params, xs, state, *, integration_mode):
        hs, (h, c) = super().forward(params, xs, state, integration_mode=integration_mode)
        return hs, (c, h)


class Float64AsFloat32(SpecAdapter):
    """Computes float64 in float32, as JAX does without ``jax_enable_x64``, and casts back."""

    name = "defect:float64-computed-in-float32"

    def forward(self, params, xs, state, *, integration_mode):
        down = lambda a: a.astype(np.float32)  # noqa: E731
        up = lambda a: a.astype(xs.dtype)  # noqa: E731
        state32 = None if state is None else tuple(map(down, state))
        hs, (h, c) = super().forward({k: down(v) for k, v in params.items()}, down(xs), state32,
                                     integration_mode=integration_mode)
        return up(hs), (up(h), up(c))


class StateNotCarried(SpecAdapter):
    """Wrong only when T > 1: the state is reset after the first step."""

    name = "defect:state-reset-after-step-1"

    def forward(self, params, xs, state, *, integration_mode):
        first, _ = super().forward(params, xs[..., :1, :], state, integration_mode=integration_mode)
        if xs.shape[-2] == 1:
            return super().forward(params, xs, state, integration_mode=integration_mode)
        rest, final = super().forward(params, xs[..., 1:, :], None, integration_mode=integration_mode)
        return np.concatenate([first, rest], axis=-2), final


class FinalStateOfRowZero(SpecAdapter):
    """Wrong only when B > 1: every row gets batch row 0's final state."""

    name = "defect:final-state-from-row-0"

    def forward(self, params, xs, state, *, integration_mode):
        hs, (h, c) = super().forward(params, xs, state, integration_mode=integration_mode)
        if xs.ndim == 3:
            h, c = np.broadcast_to(h[:1], h.shape).copy(), np.broadcast_to(c[:1], c.shape).copy()
        return hs, (h, c)


class H0GradientDropped(SpecAdapter):
    name = "defect:h0-gradient-dropped"

    def gradients(self, params, xs, state, d_hs, d_state, *, integration_mode):
        grads = super().gradients(params, xs, state, d_hs, d_state, integration_mode=integration_mode)
        return grads | {"h0": np.zeros_like(grads["h0"])}


class _EquationDefect:
    """A forward pass, written independently of the spec's, with one formula changed.

    Forward-only: the suite must catch these from the outputs alone.
    """

    device = "cpu"
    dtypes = ("float64", "float32")

    def candidate(self, a_z):
        return np.tanh(a_z)

    def output(self, o, c, z):
        return o * np.tanh(c)

    def forward(self, params, xs, state, *, integration_mode):
        get = lambda key, gate, blocks: (  # noqa: E731
            block(params[key], gate, blocks) if key in params else 0.0)
        batched = xs.ndim == 3
        xs_b = xs if batched else xs[None]
        B, H = xs_b.shape[0], params["weight_mh"].shape[1]
        h, c = (np.zeros((B, H), xs.dtype),) * 2 if state is None else (
            np.reshape(state[0], (B, H)), np.reshape(state[1], (B, H)))
        w_hh = params["weight_hh"]
        outputs = []
        for x in np.moveaxis(xs_b, 1, 0):
            proj = lambda gate: x @ block(params["weight_ih"], gate, IH_BLOCKS).T + get("bias_ih", gate, IH_BLOCKS)  # noqa: E731
            m = proj("m") * ((h * w_hh if w_hh.ndim == 1 else h @ w_hh.T) + params.get("bias_hh", 0.0))
            pre = {}
            for gate in MH_BLOCKS:
                q = m @ block(params["weight_mh"], gate, MH_BLOCKS).T + get("bias_mh", gate, MH_BLOCKS)
                pre[gate] = proj(gate) * q if integration_mode != "addition" else proj(gate) + q
            z = self.candidate(pre["z"])
            o = sigmoid(pre["o"])
            c = sigmoid(pre["f"]) * c + sigmoid(pre["i"]) * z
            h = self.output(o, c, z)
            outputs.append(h)
        hs = np.stack(outputs, axis=1)
        return (hs, (h, c)) if batched else (hs[0], (h[0], c[0]))


class SigmoidCandidate(_EquationDefect):
    name = "defect:sigmoid-candidate"

    def candidate(self, a_z):
        return sigmoid(a_z)


class OutputTanhOfCTimesO(_EquationDefect):
    """``h = tanh(c * o)``: the paper's MATLAB form."""

    name = "defect:h=tanh(c*o)"

    def output(self, o, c, z):
        return np.tanh(c * o)


class OutputTanhTanhZ(_EquationDefect):
    """``h = o * tanh(tanh(z))``: RecurrentLayers.jl before 0.3.1, the cell state never used."""

    name = "defect:h=o*tanh(tanh(z))"

    def output(self, o, c, z):
        return o * np.tanh(np.tanh(z))


class CorrectRewrite(_EquationDefect):
    """The independent rewrite with nothing changed: it must *pass*, which shows the equation
    defects above fail for their one change and not for the rewrite."""

    name = "control:independent-rewrite"


DEFECTS = (
    IhBlocksPermuted, MhBlocksPermuted, BiasHhIgnored, BiasMhTwice, SigmoidCandidate,
    OutputTanhOfCTimesO, OutputTanhTanhZ, StateSwapped, TransposedWeights, Float64AsFloat32,
    StateNotCarried, FinalStateOfRowZero, H0GradientDropped,
)
