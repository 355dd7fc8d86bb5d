"""A diagnosis, not just a verdict: which known mLSTM variant an implementation computes.

:data:`VARIANTS` is one table, one entry per variant that published implementations have shipped or
that a port easily gets wrong (gate order, output formula, bias placement, weight layout, state
order, axis order, integration mode, precision), and the misformulations of the spec's own variants
(peepholes, clips, projection, forget bias) that ports of TensorFlow's and Keras's cells fall into.
When an implementation fails, :func:`diagnose` runs its ``forward`` on a few fixed cases chosen so
that every variant gives different numbers (with the spec's variants on only for an adapter that
declares them), computes each variant on the same inputs, and names the variant(s) the
implementation agrees with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .. import reference
from ..equations import IH_BLOCKS, MH_BLOCKS, sigmoid
from ..params import block
from .calls import DEFAULT_TIMEOUT, Caller
from .cases import Case
from .tolerances import relative_error

# ---- the step written out once more, with the formulas a variant may change as hooks ----


def numpy_forward(params, xs, state, integration_mode, *, tanh=np.tanh, matmul=np.matmul,
                  candidate=None, output=None, bias_hh_on_m=False, cell_clip=None, proj_clip=None,
                  forget_bias=0.0, output_of_preactivation=None, o_peephole_reads_previous_c=False,
                  output_reads_unclipped_c=False, proj_clip_before_projection=False):
    """A forward pass written independently of :mod:`mlstm_spec.equations`, computing in the dtype of
    ``xs``, with the spec's variants (a projection and peepholes read from ``params``; ``cell_clip``,
    ``proj_clip``, ``forget_bias`` as the spec takes them).

    ``tanh(a)`` and ``matmul(a, b)`` are the elementary operations; ``candidate(a_z)`` and
    ``output(o, c, z)`` replace ``tanh(a_z)`` and ``o * tanh(c)``; ``bias_hh_on_m`` adds ``bias_hh``
    to ``m`` instead of to ``weight_hh h``. The hooks of the variants' misformulations:
    ``output_of_preactivation(a_o, c)`` replaces ``sigmoid(a_o) * tanh(c)`` (``a_o`` with its
    peephole term); ``o_peephole_reads_previous_c`` gives the output gate's peephole the previous
    cell state; ``output_reads_unclipped_c`` feeds the output gate's peephole and the output the cell
    state before ``cell_clip`` (only the carried state is clipped); ``proj_clip_before_projection``
    clips the output before the projection instead of after it."""
    def gate_bias(key, gate, blocks):
        return block(params[key], gate, blocks) if key in params else 0.0

    def clip(value, bound):
        return value if bound is None else np.minimum(np.maximum(value, -bound), bound)

    batched = xs.ndim == 3
    xs_b = xs if batched else xs[None]
    B, H = xs_b.shape[0], params["weight_mh"].shape[1]
    P = params["weight_hr"].shape[0] if "weight_hr" in params else H
    if state is None:
        h, c = np.zeros((B, P), xs.dtype), np.zeros((B, H), xs.dtype)
    else:
        h, c = np.reshape(state[0], (B, P)), np.reshape(state[1], (B, H))
    w_hh = params["weight_hh"]
    peepholes = "weight_ci" in params
    outputs = []
    for x in np.moveaxis(xs_b, 1, 0):
        def projection(gate):
            return matmul(x, block(params["weight_ih"], gate, IH_BLOCKS).T) + gate_bias("bias_ih", gate, IH_BLOCKS)

        r = h * w_hh if w_hh.ndim == 1 else matmul(h, w_hh.T)
        if bias_hh_on_m:
            m = projection("m") * r + params.get("bias_hh", 0.0)
        else:
            m = projection("m") * (r + params.get("bias_hh", 0.0))
        pre = {}
        for gate in MH_BLOCKS:
            q = matmul(m, block(params["weight_mh"], gate, MH_BLOCKS).T) + gate_bias("bias_mh", gate, MH_BLOCKS)
            pre[gate] = projection(gate) * q if integration_mode != "addition" else projection(gate) + q
        if forget_bias:
            pre["f"] = pre["f"] + forget_bias
        if peepholes:
            pre["i"] = pre["i"] + params["weight_ci"] * c
            pre["f"] = pre["f"] + params["weight_cf"] * c
        z = tanh(pre["z"]) if candidate is None else candidate(pre["z"])
        unclipped = sigmoid(pre["f"]) * c + sigmoid(pre["i"]) * z
        c_previous, c = c, clip(unclipped, cell_clip)
        c_out = unclipped if output_reads_unclipped_c else c
        if peepholes:
            pre["o"] = pre["o"] + params["weight_co"] * (c_previous if o_peephole_reads_previous_c else c_out)
        if output_of_preactivation is not None:
            h = output_of_preactivation(pre["o"], c_out)
        elif output is None:
            h = sigmoid(pre["o"]) * tanh(c_out)
        else:
            h = output(sigmoid(pre["o"]), c_out, z)
        if "weight_hr" in params:
            if proj_clip_before_projection:
                h = matmul(clip(h, proj_clip), params["weight_hr"].T)
            else:
                h = clip(matmul(h, params["weight_hr"].T), proj_clip)
        outputs.append(h)
    hs = np.stack(outputs, axis=1)
    return (hs, (h, c)) if batched else (hs[0], (h[0], c[0]))


# ---- parameter misreadings ----

def permuted(params, ih_order=None, mh_order=None):
    """What an implementation whose gate blocks are in ``ih_order`` / ``mh_order`` computes when it is
    given canonical arrays, as canonical parameters: its gate ``g`` reads the block at the position
    ``g`` has in *its* order."""
    out = dict(params)
    for keys, order, blocks in ((("weight_ih", "bias_ih"), ih_order, IH_BLOCKS),
                                (("weight_mh", "bias_mh"), mh_order, MH_BLOCKS)):
        if order is None:
            continue
        for key in keys:
            if key in params:
                out[key] = np.concatenate([block(params[key], gate, order) for gate in blocks])
    return out


def interleaved(params):
    """Canonical (block-major) rows read as per-unit interleaved rows (row ``5*j + k`` is gate ``k``
    of unit ``j``), as in Krause's Chainer code."""
    out = dict(params)
    for key, blocks in (("weight_ih", 5), ("bias_ih", 5), ("weight_mh", 4), ("bias_mh", 4)):
        if key in params:
            value = params[key]
            H = value.shape[0] // blocks
            # the implementation's gate k of unit j is canonical row j*blocks + k
            out[key] = value.reshape((H, blocks) + value.shape[1:]).swapaxes(0, 1).reshape(value.shape)
    return out


def without(*keys):
    return lambda params: {k: v for k, v in params.items() if k not in keys}


# ---- the table ----

@dataclass(frozen=True)
class Variant:
    key: str
    title: str  # what the implementation computes, in a few words
    seen_in: str  # where it has been published, or why a port gets it
    forward: Callable  # (params, xs, state, integration_mode) -> hs, (h_T, c_T), like mlstm_spec.forward
    #: The spec's variants (cases.VARIANT_OPTIONS) this misformulation is about: it is computed only for
    #: an adapter that declares them all, and named only if a diagnostic case with them on was run.
    needs: frozenset = frozenset()
    #: Whether ``forward`` takes the cases with variants too (their parameters, and the run-time
    #: options as keyword arguments); the others are computed on the cases without variants only.
    with_variants: bool = False


def _misread(misread):
    return lambda params, xs, state, mode: reference.forward(misread(params), xs, state, integration_mode=mode)


def _other_mode(params, xs, state, mode):
    other = "multiplicative_integration" if mode == "addition" else "addition"
    return reference.forward(params, xs, state, integration_mode=other)


def _state_c_h(params, xs, state, mode):
    hs, (h, c) = reference.forward(params, xs, None if state is None else (state[1], state[0]),
                                   integration_mode=mode)
    return hs, (c, h)


def _batch_time_swapped(params, xs, state, mode):
    if xs.ndim != 3 or state is not None:
        return None  # only defined where the implementation's shapes still fit
    hs, (h, c) = reference.forward(params, np.swapaxes(xs, 0, 1), None, integration_mode=mode)
    return np.swapaxes(hs, 0, 1), (h, c)


def _float32(params, xs, state, mode, **runtime):
    down = lambda a: np.asarray(a, np.float32)  # noqa: E731
    hs, (h, c) = reference.forward({k: down(v) for k, v in params.items()}, down(xs),
                                   None if state is None else tuple(map(down, state)), integration_mode=mode,
                                   **runtime)
    return hs.astype(xs.dtype), (h.astype(xs.dtype), c.astype(xs.dtype))


def _equation(**hooks):
    return lambda params, xs, state, mode: numpy_forward(params, xs, state, mode, **hooks)


def _variant_equation(**hooks):
    return lambda params, xs, state, mode, **runtime: numpy_forward(params, xs, state, mode, **hooks, **runtime)


def _variant_misread(misread):
    """The spec on what an implementation makes of ``(params, runtime)``: ``misread`` returns both."""
    def forward(params, xs, state, mode, **runtime):
        params, runtime = misread(dict(params), dict(runtime))
        return reference.forward(params, xs, state, integration_mode=mode, **runtime)
    return forward


def _peepholes_i_f_swapped(params, runtime):
    if "weight_ci" in params:
        params["weight_ci"], params["weight_cf"] = params["weight_cf"], params["weight_ci"]
    return params, runtime


def _forget_bias_in_bias_ih(params, runtime):
    forget_bias = runtime.pop("forget_bias", 0.0)
    if forget_bias:
        H = params["weight_mh"].shape[1]
        bias = np.array(params.get("bias_ih", np.zeros(5 * H, params["weight_ih"].dtype)))
        start = IH_BLOCKS.index("f") * H
        bias[start:start + H] += forget_bias
        params["bias_ih"] = bias
    return params, runtime


def _tf012_forward(params, xs, state, mode, **runtime):
    """The TF 0.12 cell's output from the output gate's pre-activation ``a`` (its peephole term
    included): ``tanh(c * a)`` without peepholes, ``sigmoid(a) * tanh(c * a)`` with them."""
    if "weight_ci" in params:
        output = lambda a, c: sigmoid(a) * np.tanh(c * a)  # noqa: E731
    else:
        output = lambda a, c: np.tanh(c * a)  # noqa: E731
    return numpy_forward(params, xs, state, mode, output_of_preactivation=output, **runtime)


TORCHRECURRENT_IH = ("m", "i", "f", "z", "o")
TORCHRECURRENT_MH = ("i", "f", "z", "o")

VARIANTS = (
    Variant("torchrecurrent-gate-order",
            "gate blocks in torchrecurrent's order: weight_ih m, i, f, z, o and weight_mh i, f, z, o",
            "torchrecurrent 0.2.5 (same names and shapes as the canonical layout)",
            _misread(lambda p: permuted(p, TORCHRECURRENT_IH, TORCHRECURRENT_MH))),
    Variant("ih-gate-order-mifzo",
            "weight_ih / bias_ih blocks in the order m, i, f, z, o (weight_mh as canonical)",
            "a port from torchrecurrent that translated weight_mh only",
            _misread(lambda p: permuted(p, ih_order=TORCHRECURRENT_IH))),
    Variant("mh-gate-order-ifzo",
            "weight_mh / bias_mh blocks in the order i, f, z, o (weight_ih as canonical)",
            "a port from torchrecurrent that translated weight_ih only",
            _misread(lambda p: permuted(p, mh_order=TORCHRECURRENT_MH))),
    Variant("interleaved-rows",
            "rows interleaved per hidden unit (row 5j+k is gate k of unit j) instead of one block per gate",
            "Krause's Chainer mLSTM", _misread(interleaved)),
    Variant("weight-hh-transposed", "weight_hh used transposed (h @ weight_hh instead of h @ weight_hh.T)",
            "a row-major / column-major mix-up", _misread(lambda p: {**p, "weight_hh": p["weight_hh"].T})),
    Variant("output-o-tanh-tanh-z", "h = o * tanh(tanh(z)): the cell state never reaches the output",
            "RecurrentLayers.jl <= 0.3.0 (fixed in 0.3.1), LuxRecurrentLayers.jl 0.1.2",
            _equation(output=lambda o, c, z: o * np.tanh(np.tanh(z)))),
    Variant("output-tanh-c-times-o", "h = tanh(c * o)",
            "the paper's MATLAB code (A. Tamamori's TF 0.12 cell has no sigmoid on o: tf012-output)",
            _equation(output=lambda o, c, z: np.tanh(c * o))),
    Variant("candidate-sigmoid", "z = sigmoid(a_z) (a sigmoid where the candidate has tanh)",
            "a gate loop applying one activation to every block", _equation(candidate=sigmoid)),
    Variant("bias-ih-missing", "bias_ih never added", "a dropped bias", _misread(without("bias_ih"))),
    Variant("bias-hh-missing", "bias_hh never added", "a dropped bias", _misread(without("bias_hh"))),
    Variant("bias-mh-missing", "bias_mh never added", "a dropped bias", _misread(without("bias_mh"))),
    Variant("bias-hh-on-m", "bias_hh added to m = p_m * (weight_hh h) instead of to weight_hh h",
            "a misplaced bias", _equation(bias_hh_on_m=True)),
    Variant("other-integration-mode",
            "the other integration mode (gates p + q where p * q was asked, or the reverse)",
            "integration_mode ignored or inverted", _other_mode),
    Variant("state-order-c-h", "state tuples in the order (c, h), read and returned",
            "OpenAI's sentiment mLSTM keeps [c, h]", _state_c_h),
    Variant("batch-time-swapped", "input read as (T, B, I) where it is (B, T, I)",
            "time-major code (nn.LSTM's default) given batch-major input", _batch_time_swapped),
    Variant("float64-computed-in-float32", "float64 computed in float32 and cast back",
            "JAX without jax_enable_x64", _float32, with_variants=True),
    Variant("forget-bias-1", "forget_bias = 1 added to the forget gate's pre-activation at run time",
            "TensorFlow's LSTM cells and the TF 0.12 MultiplicativeLSTMCell, whose forget_bias defaults to 1.0",
            lambda params, xs, state, mode: reference.forward(params, xs, state, integration_mode=mode,
                                                              forget_bias=1.0)),
    # ---- misformulations of the spec's variants (docs/equations.md, "Variants") ----
    Variant("tf012-output",
            "the TF 0.12 cell's output from the output gate's pre-activation a_o: tanh(c * a_o), no sigmoid; "
            "with peepholes sigmoid(a_o + w_co * c) * tanh(c * (a_o + w_co * c))",
            "a port of A. Tamamori's TF 0.12 MultiplicativeLSTMCell that keeps its output formula", _tf012_forward,
            with_variants=True),
    Variant("peephole-o-reads-previous-c", "the output gate's peephole reads the previous cell state, not the new one",
            "all three peephole terms added in one pass over the gates, before the cell update",
            _variant_equation(o_peephole_reads_previous_c=True), frozenset({"peepholes"}), True),
    Variant("peephole-i-f-swapped", "the input gate reads weight_cf and the forget gate weight_ci",
            "TensorFlow's LSTMCell creates w_f_diag before w_i_diag: peepholes taken in creation order",
            _variant_misread(_peepholes_i_f_swapped), frozenset({"peepholes"}), True),
    Variant("cell-clip-after-output",
            "cell_clip applied only to the carried state, after the output (and o's peephole) read c unclipped",
            "the clip placed where the state is stored, at the end of the step",
            _variant_equation(output_reads_unclipped_c=True), frozenset({"cell_clip"}), True),
    Variant("proj-clip-before-projection", "proj_clip applied to o * tanh(c) before the projection, not to h",
            "the clip left in the cell when the projection is a separate layer after it",
            _variant_equation(proj_clip_before_projection=True), frozenset({"proj_clip"}), True),
    Variant("proj-clip-ignored", "proj_clip accepted and never applied",
            "a projection built on torch.nn.LSTM's proj_size, which has no clip",
            _variant_misread(lambda params, runtime: (params, {**runtime, "proj_clip": None})),
            frozenset({"proj_clip"}), True),
    Variant("forget-bias-ignored", "the run-time forget_bias accepted and never added",
            "ports from Keras or torch, which have no run-time forget bias (Keras's unit_forget_bias "
            "only initialises the bias)",
            _variant_misread(lambda params, runtime: (params, {**runtime, "forget_bias": 0.0})),
            frozenset({"forget_bias"}), True),
    Variant("forget-bias-inside-product",
            "forget_bias added to bias_ih's f block, inside p_f * q_f: right under addition, wrong under "
            "multiplicative integration",
            "the run-time forget bias folded into the bias vector, where Keras's unit_forget_bias puts its 1",
            _variant_misread(_forget_bias_in_bias_ih), frozenset({"forget_bias"}), True),
)

#: Agreement needed to name a variant, by dtype: far below the differences between variants (of
#: order 1e-2 and more on the diagnostic cases) and above an implementation's own rounding.
MATCH_TOLERANCE = {"float64": 1e-8, "float32": 1e-4}
#: float64 computed in float32 differs from float64 by ~1e-7: matched at float32's level.
_LOOSE = {"float64-computed-in-float32": 1e-5}

#: The diagnostic cases: every variant differs from the spec and from the others on them (all biases
#: on, a given state, H != I, B != T, both integration modes, one case without a state for the
#: batch/time variant), and they are short (T = 2), so that an implementation failing only on long
#: sequences can still be diagnosed.
DIAGNOSTIC_CASES = (
    Case(batch=3, steps=2, input_size=3, hidden_size=5, seed=11),
    Case(batch=2, steps=2, input_size=4, hidden_size=3, integration_mode="multiplicative_integration", seed=12),
    Case(batch=3, steps=2, input_size=2, hidden_size=4, with_state=False, seed=13),
)
#: The diagnostic cases with the spec's variants on, one group of variants each, so that an adapter
#: declaring only some of them gets the cases of those (a case is run only for an adapter that
#: declares all its variants, as in the suite). Each differs from the spec for the misformulations of
#: its variants: a given state for the peepholes; a cell clip that clips some values and not all (the
#: bound cases.with_clips chooses); a proj_clip that clips some of o * tanh(c) and some of h (chosen
#: by hand: with_clips's bound, 0.97, leaves o * tanh(c) unclipped, so clipping it before the
#: projection would look like not clipping at all); a forget bias under multiplicative integration.
VARIANT_DIAGNOSTIC_CASES = (
    Case(batch=2, steps=2, input_size=3, hidden_size=4, peepholes=True, seed=14),
    Case(batch=2, steps=2, input_size=3, hidden_size=4, integration_mode="multiplicative_integration",
         cell_clip=0.613, seed=15),
    Case(batch=3, steps=2, input_size=2, hidden_size=5, proj_size=3, proj_clip=0.52, seed=16),
    Case(batch=3, steps=2, input_size=4, hidden_size=3, integration_mode="multiplicative_integration",
         forget_bias=1.0, seed=17),
)


@dataclass
class Diagnosis:
    matches: list  # keys of the variants the implementation agrees with
    errors: dict  # variant key -> worst relative error against the implementation (spec: "spec")
    cases_run: int
    note: str = ""  # why nothing could be said, when nothing could

    def describe(self) -> str:
        if self.note:
            return f"no diagnosis: {self.note}"
        by_key = {v.key: v for v in VARIANTS}
        if self.matches:
            named = "; ".join(f"{by_key[k].title} [{k}; seen in {by_key[k].seen_in}] "
                              f"(agrees to {self.errors[k]:.1e})" for k in self.matches)
            return f"the implementation computes a known variant: {named}"
        ranked = sorted((e, k) for k, e in self.errors.items() if k != "spec")
        closest = ", ".join(f"{k} {e:.1e}" for e, k in ranked[:2])
        compared = sum(k != "spec" for k in self.errors)
        return (f"none of the {compared} known variants matches (error against the spec "
                f"{self.errors.get('spec', float('nan')):.1e}; closest: {closest})")

    def as_dict(self) -> dict:
        return {"matches": list(self.matches), "errors": dict(self.errors), "cases_run": self.cases_run,
                "note": self.note, "text": self.describe()}


def _worst(got, want) -> float:
    """The worst relative error of (hs, (h, c)) against another; inf where the shapes differ."""
    hs, (h, c) = got
    w_hs, (w_h, w_c) = want
    pairs = ((hs, w_hs), (h, w_h), (c, w_c))
    if any(np.shape(a) != np.shape(b) for a, b in pairs):
        return float("inf")
    return max(relative_error(a, b)[0] for a, b in pairs)


def diagnose(adapter, *, dtype: str | None = None, timeout: float | None = DEFAULT_TIMEOUT,
             variants=VARIANTS) -> Diagnosis:
    """Which variant of :data:`VARIANTS` the adapter's ``forward`` computes, on :data:`DIAGNOSTIC_CASES`
    and, for the spec's variants the adapter declares (as the suite reads them), on those of
    :data:`VARIANT_DIAGNOSTIC_CASES` (in float64 when the adapter offers it, else float32)."""
    from .suite import adapter_dtypes, declared_variants, supports

    offered = adapter_dtypes(adapter)
    dtype = dtype or next((d for d in ("float64", "float32") if d in offered), None)
    if dtype not in MATCH_TOLERANCE:
        return Diagnosis([], {}, 0, "the diagnosis needs float64 or float32, which the adapter does not offer")
    declared = declared_variants(adapter, dtype)
    computed = [v for v in variants if v.needs <= declared]
    shown = set()  # keys of the variants computed on a case with all the spec's variants they need
    caller = Caller(timeout)
    errors: dict = {}
    ran = 0
    try:
        for case in DIAGNOSTIC_CASES + VARIANT_DIAGNOSTIC_CASES:
            case = Case(**{**case.__dict__, "dtype": dtype})
            if not supports(adapter, case.options, declared):
                continue
            arrays, runtime = case.arrays(), case.runtime_on
            call = caller(adapter.forward, arrays.params, arrays.xs, arrays.state,
                          integration_mode=case.integration_mode, **runtime)
            if not call.ok or not isinstance(call.value, (list, tuple)) or len(call.value) != 2:
                continue
            wide = lambda a: np.asarray(a, np.float64)  # noqa: E731
            params = {k: wide(v) for k, v in arrays.params.items()}
            xs, state = wide(arrays.xs), None if arrays.state is None else tuple(map(wide, arrays.state))
            try:
                got = (wide(call.value[0]), tuple(wide(a) for a in call.value[1]))
            except (TypeError, ValueError):  # results that are not two arrays and a pair: nothing to compare
                continue
            if len(got[1]) != 2:
                continue
            errors["spec"] = max(errors.get("spec", 0.0), _worst(got, reference.forward(
                params, xs, state, integration_mode=case.integration_mode, **runtime)))
            ran += 1
            for variant in computed:
                if variant.with_variants:
                    want = variant.forward(params, xs, state, case.integration_mode, **runtime)
                elif case.variants:
                    continue
                else:
                    want = variant.forward(params, xs, state, case.integration_mode)
                if want is None:
                    continue
                errors[variant.key] = max(errors.get(variant.key, 0.0), _worst(got, want))
                if variant.needs <= case.variants:
                    shown.add(variant.key)
    finally:
        caller.close()
    if not ran:
        return Diagnosis([], errors, 0, "forward() gave no usable result on any diagnostic case")
    # a misformulation of a variant no case ran with is the spec on the cases run: not a candidate
    errors = {k: e for k, e in errors.items() if k == "spec" or k in shown}
    matches = [v.key for v in computed
               if errors.get(v.key, np.inf) <= _LOOSE.get(v.key, MATCH_TOLERANCE[dtype])]
    if errors.get("spec", np.inf) <= MATCH_TOLERANCE[dtype]:
        matches = []  # it agrees with the spec on these cases: the failure is elsewhere
        note = "forward() agrees with the spec on the diagnostic cases; the failure lies elsewhere"
        return Diagnosis(matches, errors, ran, note)
    return Diagnosis(matches, errors, ran)
