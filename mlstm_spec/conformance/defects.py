"""Adapters with planted defects: the bugs real mLSTM ports have shipped (see docs/conformance.md).

The suite's power is tested by running it against each of these and asserting that it fails. Each
defect is the spec with one thing wrong, so anything the suite reports comes from that one thing.
"""

from __future__ import annotations

import numpy as np

from .. import reference
from ..equations import IH_BLOCKS, MH_BLOCKS, sigmoid
from ..params import block
from .cases import VARIANT_OPTIONS
from .diagnosis import numpy_forward, permuted


class SpecAdapter:
    """The NumPy spec itself, computing in the inputs' dtype (float16 in float32), with every variant."""

    name = "mlstm_spec"
    device = "cpu"
    dtypes = ("float64", "float32", "float16")
    variants = frozenset(VARIANT_OPTIONS)

    def forward(self, params, xs, state, *, integration_mode, **runtime):
        return reference.forward(params, xs, state, integration_mode=integration_mode, **runtime)

    def gradients(self, params, xs, state, d_hs, d_state, *, integration_mode, **runtime):
        return reference.backward(params, xs, state, d_hs, d_state, integration_mode=integration_mode, **runtime)


class _Defect(SpecAdapter):
    """A bug in the formulation without variants: the suite draws none for it (so its examples are
    those drawn before the variants existed)."""

    variants = frozenset()


class _ParamDefect(_Defect):
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
        return permuted(params, ih_order=("m", "i", "f", "z", "o"))


class MhBlocksPermuted(_ParamDefect):
    """Reads only weight_mh / bias_mh in another block order (i, f, z, o)."""

    name = "defect:mh-blocks-permuted"

    def misread(self, params):
        return permuted(params, mh_order=("i", "f", "z", "o"))


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


class StateSwapped(_Defect):
    name = "defect:state-returned-as-(c,h)"

    def forward(self, params, xs, state, *, integration_mode):
        hs, (h, c) = super().forward(params, xs, state, integration_mode=integration_mode)
        return hs, (c, h)


class Float64AsFloat32(_Defect):
    """Computes float64 in float32, as JAX does without ``jax_enable_x64``, and casts back."""

    name = "defect:float64-computed-in-float32"

    def forward(self, params, xs, state, *, integration_mode):
        down = lambda a: a.astype(np.float32)  # noqa: E731
        up = lambda a: a.astype(xs.dtype)  # noqa: E731
        state32 = None if state is None else tuple(map(down, state))
        hs, (h, c) = super().forward({k: down(v) for k, v in params.items()}, down(xs), state32,
                                     integration_mode=integration_mode)
        return up(hs), (up(h), up(c))


class StateNotCarried(_Defect):
    """Wrong only when T > 1: the state is reset after the first step."""

    name = "defect:state-reset-after-step-1"

    def forward(self, params, xs, state, *, integration_mode):
        first, _ = super().forward(params, xs[..., :1, :], state, integration_mode=integration_mode)
        if xs.shape[-2] == 1:
            return super().forward(params, xs, state, integration_mode=integration_mode)
        rest, final = super().forward(params, xs[..., 1:, :], None, integration_mode=integration_mode)
        return np.concatenate([first, rest], axis=-2), final


class FinalStateOfRowZero(_Defect):
    """Wrong only when B > 1: every row gets batch row 0's final state."""

    name = "defect:final-state-from-row-0"

    def forward(self, params, xs, state, *, integration_mode):
        hs, (h, c) = super().forward(params, xs, state, integration_mode=integration_mode)
        if xs.ndim == 3:
            h, c = np.broadcast_to(h[:1], h.shape).copy(), np.broadcast_to(c[:1], c.shape).copy()
        return hs, (h, c)


class H0GradientDropped(_Defect):
    name = "defect:h0-gradient-dropped"

    def gradients(self, params, xs, state, d_hs, d_state, *, integration_mode):
        grads = super().gradients(params, xs, state, d_hs, d_state, integration_mode=integration_mode)
        return grads | {"h0": np.zeros_like(grads["h0"])}


class _EquationDefect:
    """A forward pass, written independently of the spec's (:func:`.diagnosis.numpy_forward`), with
    one formula changed. Forward-only: the suite must catch these from the outputs alone."""

    device = "cpu"
    dtypes = ("float64", "float32")
    hooks: dict = {}

    def forward(self, params, xs, state, *, integration_mode):
        return numpy_forward(params, xs, state, integration_mode, **self.hooks)


class SigmoidCandidate(_EquationDefect):
    name = "defect:sigmoid-candidate"
    hooks = {"candidate": sigmoid}


class OutputTanhOfCTimesO(_EquationDefect):
    """``h = tanh(c * o)``: the paper's MATLAB form."""

    name = "defect:h=tanh(c*o)"
    hooks = {"output": lambda o, c, z: np.tanh(c * o)}


class OutputTanhTanhZ(_EquationDefect):
    """``h = o * tanh(tanh(z))``: RecurrentLayers.jl before 0.3.1, the cell state never used."""

    name = "defect:h=o*tanh(tanh(z))"
    hooks = {"output": lambda o, c, z: o * np.tanh(np.tanh(z))}


class CorrectRewrite(_EquationDefect):
    """The independent rewrite with nothing changed: it must *pass*, which shows the equation
    defects above fail for their one change and not for the rewrite."""

    name = "control:independent-rewrite"


# ---- defects that only show at realistic sizes: the bugs of optimised kernels ----
#
# Each is the spec with one bug at a boundary that optimised code vectorises or tiles on, so it is
# invisible in every case of the small tier (B <= 3, T <= 6, I, H <= 5) and shows only in the large
# tier. The boundaries are those of common CPU and GPU kernels: 16 hidden units per vector, 32 input
# features per tile, 32 steps per time chunk, 8 rows per batch tile, 64 steps of backward.

HIDDEN_VECTOR = 16
INPUT_TILE = 32
TIME_CHUNK = 32
BATCH_TILE = 8
BACKWARD_WINDOW = 64


class HiddenTailGatesSwapped(_ParamDefect):
    """The vector tail of the hidden units: when H > 16 is not a multiple of 16, the last H % 16 units
    (the tail loop after the 16-wide vectors) read the output gate's rows for the forget gate and the
    reverse."""

    name = "defect:hidden-tail-f-o-swapped"

    def misread(self, params):
        H = params["weight_mh"].shape[1]
        tail = H % HIDDEN_VECTOR
        if H <= HIDDEN_VECTOR or not tail:
            return params
        units = np.arange(H - tail, H)
        out = dict(params)
        for key, blocks in (("weight_ih", IH_BLOCKS), ("bias_ih", IH_BLOCKS), ("weight_mh", MH_BLOCKS),
                            ("bias_mh", MH_BLOCKS)):
            if key in params:
                o_rows, f_rows = (blocks.index(g) * H + units for g in ("o", "f"))
                value = params[key].copy()
                value[o_rows], value[f_rows] = params[key][f_rows], params[key][o_rows]
                out[key] = value
        return out


class InputTileDropped(_ParamDefect):
    """A tile of the input features: when I > 32 is not a multiple of 32, the last partial tile of
    the input projection (features 32 * (I // 32) and on) is never added."""

    name = "defect:input-partial-tile-dropped"

    def misread(self, params):
        I = params["weight_ih"].shape[1]
        if I <= INPUT_TILE or not I % INPUT_TILE:
            return params
        weight = params["weight_ih"].copy()
        weight[:, I - I % INPUT_TILE:] = 0
        return {**params, "weight_ih": weight}


class TimeChunkRestartsState(_Defect):
    """A chunk of time steps: the forward pass runs in chunks of 32 steps and starts every chunk from
    the initial state instead of the previous chunk's final state (visible when T > 32)."""

    name = "defect:time-chunk-restarts-state"

    def forward(self, params, xs, state, *, integration_mode):
        T = xs.shape[-2]
        chunks, final = [], None
        for start in range(0, T, TIME_CHUNK):
            hs, final = super().forward(params, xs[..., start:start + TIME_CHUNK, :], state,
                                        integration_mode=integration_mode)
            chunks.append(hs)
        return np.concatenate(chunks, axis=-2), final


class BatchTailTileShifted(_Defect):
    """A tile of the batch: rows are processed in tiles of 8, and in a partial last tile (B > 8, not a
    multiple of 8) each row reads the input of the row before it (an off-by-one tile offset)."""

    name = "defect:batch-tail-tile-reads-previous-row"

    @staticmethod
    def _misread(xs):
        if xs.ndim != 3 or xs.shape[0] <= BATCH_TILE or not xs.shape[0] % BATCH_TILE:
            return xs
        B = xs.shape[0]
        rows = np.arange(B)
        tail = rows >= B - B % BATCH_TILE
        return xs[np.where(tail, rows - 1, rows)]

    def forward(self, params, xs, state, *, integration_mode):
        return super().forward(params, self._misread(xs), state, integration_mode=integration_mode)

    def gradients(self, params, xs, state, d_hs, d_state, *, integration_mode):
        return super().gradients(params, self._misread(xs), state, d_hs, d_state,
                                 integration_mode=integration_mode)


class BackwardTruncated(_Defect):
    """A backward pass truncated over long sequences: it runs in windows of 64 steps from the end and
    drops the gradient carried from one window into the one before (visible when T > 64)."""

    name = "defect:backward-truncated-at-64-steps"

    def gradients(self, params, xs, state, d_hs, d_state, *, integration_mode):
        T = xs.shape[-2]
        if T <= BACKWARD_WINDOW:
            return super().gradients(params, xs, state, d_hs, d_state, integration_mode=integration_mode)
        starts = list(range(T - BACKWARD_WINDOW, 0, -BACKWARD_WINDOW)) + [0]
        bounds = list(zip(starts, [T] + starts[:-1]))  # (start, end), last window first
        # the state entering each window, from one forward pass
        entering, current = {}, state
        for start, end in reversed(bounds):
            entering[start] = current
            _, current = super().forward(params, xs[..., start:end, :], current, integration_mode=integration_mode)
        total, d_xs = {}, {}
        for start, end in bounds:
            carried = d_state if end == T else None  # the defect: nothing carried between windows
            grads = super().gradients(params, xs[..., start:end, :], entering[start], d_hs[..., start:end, :],
                                      carried, integration_mode=integration_mode)
            d_xs[start] = grads.pop("x")
            for key, value in grads.items():
                if key not in ("h0", "c0"):
                    total[key] = total.get(key, 0) + value
            if start == 0:
                total["h0"], total["c0"] = grads["h0"], grads["c0"]
        total["x"] = np.concatenate([d_xs[start] for start in sorted(d_xs)], axis=-2)
        return total


# ---- defects only in float32: a few hundred ulps, invisible to a fixed float32 tolerance ----

def _round_mantissa(a, bits: int):
    """``a`` (float32) rounded to ``bits`` explicit mantissa bits, ties to even (TF32: 10)."""
    drop = 23 - bits
    raw = np.asarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    half = (1 << (drop - 1)) - 1
    raw = (raw + half + ((raw >> drop) & 1)) & ~np.uint64((1 << drop) - 1) & np.uint64(0xFFFFFFFF)
    return raw.astype(np.uint32).view(np.float32)


APPROXIMATE_TANH_ERROR = 5e-5  # relative; about 420 float32 ulps


def approximate_tanh(a):
    """tanh with a relative error of up to 5e-5 in float32 (exact in float64), as a fast-math
    approximation has: smooth, largest near 0."""
    exact = np.tanh(a)
    if a.dtype != np.float32:
        return exact
    return (exact * (1 + APPROXIMATE_TANH_ERROR * np.cos(3 * a))).astype(np.float32)


def tf32_matmul(a, b):
    """A float32 matrix product whose inputs are first rounded to TF32's 10-bit mantissa (as GPU
    tensor cores do with TF32 on); exact in float64."""
    if a.dtype != np.float32:
        return a @ b
    return _round_mantissa(a, 10) @ _round_mantissa(b, 10)


class _Float32KernelDefect(_EquationDefect, _Defect):
    """Exact in float64; in float32 the independent forward with one fast operation. Its gradients are
    the spec's (an exact backward formula, as such kernels have), so only the forward checks can
    catch it."""

    dtypes = ("float64", "float32")

    def forward(self, params, xs, state, *, integration_mode):
        return numpy_forward(params, xs, state, integration_mode, **self.hooks)


class ApproximateTanhFloat32(_Float32KernelDefect):
    name = "defect:float32-approximate-tanh"
    hooks = {"tanh": approximate_tanh}


class TF32Matmul(_Float32KernelDefect):
    name = "defect:float32-matmul-in-tf32"
    hooks = {"matmul": tf32_matmul}


# ---- defects in the variants: the spec's variants computed with one thing wrong ----

def variant_forward(params, xs, state, integration_mode, *, cell_clip=None, proj_clip=None, forget_bias=0.0,
                    bug: str = ""):
    """A forward pass with the variants (projection, peepholes, clips, forget bias), written
    independently of :mod:`mlstm_spec.equations` gate by gate, with the one change ``bug`` names
    (see :data:`VARIANT_BUGS`; ``""``: none)."""
    assert bug in ("",) + tuple(VARIANT_BUGS), bug
    batched = xs.ndim == 3
    xs_b = xs if batched else xs[None]
    B, H = xs_b.shape[0], params["weight_mh"].shape[1]
    P = params["weight_hr"].shape[0] if "weight_hr" in params else H
    h, c = (np.zeros((B, P), xs.dtype), np.zeros((B, H), xs.dtype)) if state is None else (
        np.reshape(state[0], (B, P)), np.reshape(state[1], (B, H)))
    w_hh, peepholes = params["weight_hh"], "weight_ci" in params

    def gate_bias(key, gate, blocks):
        return block(params[key], gate, blocks) if key in params else 0.0

    def clip(value, bound):
        return value if bound is None else np.minimum(np.maximum(value, -bound), bound)

    outputs = []
    for x in np.moveaxis(xs_b, 1, 0):
        def projection(gate):
            return x @ block(params["weight_ih"], gate, IH_BLOCKS).T + gate_bias("bias_ih", gate, IH_BLOCKS)

        r = (h * w_hh if w_hh.ndim == 1 else h @ w_hh.T) + params.get("bias_hh", 0.0)
        m = projection("m") * r
        pre = {}
        for gate in MH_BLOCKS:
            q = m @ block(params["weight_mh"], gate, MH_BLOCKS).T + gate_bias("bias_mh", gate, MH_BLOCKS)
            p = projection(gate)
            if gate == "f" and bug == "forget-bias-inside-product":
                p = p + forget_bias
            pre[gate] = p * q if integration_mode != "addition" else p + q
        if bug not in ("forget-bias-inside-product", "forget-bias-ignored"):
            pre["f"] = pre["f"] + forget_bias
        if peepholes:
            w_i, w_f = params["weight_ci"], params["weight_cf"]
            if bug == "peephole-i-f-swapped":
                w_i, w_f = w_f, w_i
            pre["i"], pre["f"] = pre["i"] + w_i * c, pre["f"] + w_f * c
        raw = sigmoid(pre["f"]) * c + sigmoid(pre["i"]) * np.tanh(pre["z"])
        c_new = clip(raw, cell_clip)
        if peepholes:
            pre["o"] = pre["o"] + params["weight_co"] * (c if bug == "peephole-o-reads-previous-c" else c_new)
        if bug == "tf012-output":  # the gate's pre-activation, peephole included, inside the tanh
            k = np.tanh(c_new * pre["o"]) * (sigmoid(pre["o"]) if peepholes else 1.0)
        else:
            k = sigmoid(pre["o"]) * np.tanh(raw if bug == "cell-clip-after-output" else c_new)
        if bug == "proj-clip-ignored":
            proj_clip = None
        if "weight_hr" in params:
            if bug == "proj-clip-before-projection":
                h = clip(k, proj_clip) @ params["weight_hr"].T
            else:
                h = clip(k @ params["weight_hr"].T, proj_clip)
        else:
            h = k
        c = c_new
        outputs.append(h)
    hs = np.stack(outputs, axis=1)
    return (hs, (h, c)) if batched else (hs[0], (h[0], c[0]))


#: The bugs of :func:`variant_forward`, each as a port of a TensorFlow or Keras cell gets it wrong.
VARIANT_BUGS = {
    "peephole-o-reads-previous-c": "the output gate's peephole reads the previous cell state, not the new one",
    "peephole-i-f-swapped": "the input gate reads weight_cf and the forget gate weight_ci",
    "cell-clip-after-output": "the output reads the cell state before the clip (only the carried state is clipped)",
    "proj-clip-before-projection": "proj_clip clips o * tanh(c) before the projection instead of its result",
    "forget-bias-inside-product": "forget_bias added to the input projection p_f inside the product p_f * q_f "
                                  "(the same as the spec under addition, wrong under multiplicative integration)",
    "forget-bias-ignored": "the run-time forget_bias is accepted and never added",
    "proj-clip-ignored": "proj_clip is accepted and never applied",
    "tf012-output": "the TF 0.12 MultiplicativeLSTMCell's output, tanh(c * a_o) (a_o the output gate's "
                    "pre-activation), with peepholes sigmoid(a_o) * tanh(c * a_o)",
}


class _VariantDefect:
    """The forward pass with the variants, one formula changed (forward-only, like _EquationDefect)."""

    device = "cpu"
    dtypes = ("float64", "float32")
    variants = frozenset(VARIANT_OPTIONS)
    bug = ""

    def forward(self, params, xs, state, *, integration_mode, **runtime):
        return variant_forward(params, xs, state, integration_mode, bug=self.bug, **runtime)


class PeepholeOutputReadsPreviousCell(_VariantDefect):
    name = "defect:peephole-o-reads-previous-c"
    bug = "peephole-o-reads-previous-c"


class PeepholeInputForgetSwapped(_VariantDefect):
    name = "defect:peephole-i-f-swapped"
    bug = "peephole-i-f-swapped"


class CellClipAfterOutput(_VariantDefect):
    name = "defect:cell-clip-after-output"
    bug = "cell-clip-after-output"


class ProjClipBeforeProjection(_VariantDefect):
    name = "defect:proj-clip-before-projection"
    bug = "proj-clip-before-projection"


class ForgetBiasInsideProduct(_VariantDefect):
    name = "defect:forget-bias-inside-product"
    bug = "forget-bias-inside-product"


class ForgetBiasIgnored(_VariantDefect):
    name = "defect:forget-bias-ignored"
    bug = "forget-bias-ignored"


class ProjClipIgnored(_VariantDefect):
    name = "defect:proj-clip-ignored"
    bug = "proj-clip-ignored"


class Tf012Output(_VariantDefect):
    """The TF 0.12 cell's output formula: wrong with or without the variants (a small-tier defect),
    with its own form when the peepholes are on."""

    name = "defect:tf012-output"
    bug = "tf012-output"


class WeightHrGradientDropped(SpecAdapter):
    """The projection's weight gets no gradient (a backward written before the projection was)."""

    name = "defect:weight-hr-gradient-dropped"

    def gradients(self, params, xs, state, d_hs, d_state, *, integration_mode, **runtime):
        grads = super().gradients(params, xs, state, d_hs, d_state, integration_mode=integration_mode, **runtime)
        return grads | ({"weight_hr": np.zeros_like(grads["weight_hr"])} if "weight_hr" in grads else {})


class CorrectVariantRewrite(_VariantDefect):
    """:func:`variant_forward` with nothing changed: it must *pass*, which shows the variant defects
    fail for their one change and not for the rewrite."""

    name = "control:independent-variant-rewrite"


#: Defects the small tier alone catches.
SMALL_DEFECTS = (
    IhBlocksPermuted, MhBlocksPermuted, BiasHhIgnored, BiasMhTwice, SigmoidCandidate,
    OutputTanhOfCTimesO, OutputTanhTanhZ, StateSwapped, TransposedWeights, Float64AsFloat32,
    StateNotCarried, FinalStateOfRowZero, H0GradientDropped, Tf012Output,
)
#: Defects only the large tier can catch (invisible at the small tier's sizes).
SIZE_DEFECTS = (HiddenTailGatesSwapped, InputTileDropped, TimeChunkRestartsState, BatchTailTileShifted,
                BackwardTruncated)
#: Defects only a per-case float32 tolerance can catch.
FLOAT32_DEFECTS = (ApproximateTanhFloat32, TF32Matmul)
#: Defects in the spec's variants (only examples with the variant on can catch them).
VARIANT_DEFECTS = (PeepholeOutputReadsPreviousCell, PeepholeInputForgetSwapped, CellClipAfterOutput,
                   ProjClipBeforeProjection, ForgetBiasInsideProduct, WeightHrGradientDropped, ForgetBiasIgnored,
                   ProjClipIgnored)
DEFECTS = SMALL_DEFECTS + SIZE_DEFECTS + FLOAT32_DEFECTS + VARIANT_DEFECTS
