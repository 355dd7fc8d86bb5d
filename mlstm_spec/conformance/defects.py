"""Adapters with planted defects: the bugs real mLSTM ports have shipped (see docs/conformance.md).

The suite's power is tested by running it against each of these and asserting that it fails. Each
defect is the spec with one thing wrong, so anything the suite reports comes from that one thing.
"""

from __future__ import annotations

import numpy as np

from .. import reference
from ..equations import IH_BLOCKS, MH_BLOCKS, sigmoid
from ..params import block
from .diagnosis import numpy_forward, permuted


class SpecAdapter:
    """The NumPy spec itself, computing in the inputs' dtype (float16 in float32)."""

    name = "mlstm_spec"
    device = "cpu"
    dtypes = ("float64", "float32", "float16")

    def forward(self, params, xs, state, *, integration_mode):
        return reference.forward(params, xs, state, integration_mode=integration_mode)

    def gradients(self, params, xs, state, d_hs, d_state, *, integration_mode):
        return reference.backward(params, xs, state, d_hs, d_state, integration_mode=integration_mode)


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


class TimeChunkRestartsState(SpecAdapter):
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


class BatchTailTileShifted(SpecAdapter):
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


class BackwardTruncated(SpecAdapter):
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


class _Float32KernelDefect(_EquationDefect, SpecAdapter):
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


#: Defects the small tier alone catches.
SMALL_DEFECTS = (
    IhBlocksPermuted, MhBlocksPermuted, BiasHhIgnored, BiasMhTwice, SigmoidCandidate,
    OutputTanhOfCTimesO, OutputTanhTanhZ, StateSwapped, TransposedWeights, Float64AsFloat32,
    StateNotCarried, FinalStateOfRowZero, H0GradientDropped,
)
#: Defects only the large tier can catch (invisible at the small tier's sizes).
SIZE_DEFECTS = (HiddenTailGatesSwapped, InputTileDropped, TimeChunkRestartsState, BatchTailTileShifted,
                BackwardTruncated)
#: Defects only a per-case float32 tolerance can catch.
FLOAT32_DEFECTS = (ApproximateTanhFloat32, TF32Matmul)
DEFECTS = SMALL_DEFECTS + SIZE_DEFECTS + FLOAT32_DEFECTS
