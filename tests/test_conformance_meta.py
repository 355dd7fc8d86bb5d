"""The suite's own machinery: an honest report (every check evaluated on its own, nothing that did
not run counted as a pass), distinct failures kept apart, adapters that exit, interrupt or hang, the
per-case tolerances, the diagnosis of known variants, and the one-call pytest helper.

All adapters here are the NumPy spec with something wrong; each test takes well under a second or
two (small example counts, no large tier unless it is what is tested).
"""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import Phase

from mlstm_spec import reference
from mlstm_spec.conformance import (VARIANTS, Case, ConformanceError, assert_conforms, check, defects,
                                    diagnose, reproduce)
from mlstm_spec.conformance.calls import Caller
from mlstm_spec.conformance.cases import (VARIANT_OPTIONS, perturbed_reference, reference_forward, reference_gradients,
                                         rounded_reference)
from mlstm_spec.conformance.diagnosis import DIAGNOSTIC_CASES, VARIANT_DIAGNOSTIC_CASES
from mlstm_spec.conformance.runner import suite_settings
from spec_strategies import LUCKY_SPEC_CASE
from mlstm_spec.conformance.tolerances import SENSITIVITY_SHARE, SHARPNESS, case_tolerance, spec_error, tolerance

#: 8 examples, not shrunk (these tests are about what is reported, not about the smallest example)
EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
FEW = suite_settings("default", 8)
FEW = FEW.__class__(FEW, phases=[p for p in FEW.phases if p is not Phase.shrink])


def run(adapter, dtype="float64", settings=FEW, **options):
    return {r.check: r for r in check(adapter, dtype, settings=settings, seed=1, large=(), **options)}


def exec_reproducer(code: str) -> ConformanceError:
    """Run a reproducer with ADAPTER bound to the class it names; return what it raises."""
    with pytest.raises(ConformanceError) as raised:
        exec(code, {"ADAPTER": exec_reproducer.adapter})
    return raised.value


# ---- every check on its own; nothing unrun counted as a pass ----

class AllWrong:
    """Outputs off by one, final state all NaN, gradients() always raising."""

    name = "all-wrong"

    def forward(self, params, xs, state, *, integration_mode):
        hs, (h, c) = reference.forward(params, xs, state, integration_mode=integration_mode)
        return hs + 1, (np.full_like(h, np.nan), np.full_like(c, np.nan))

    def gradients(self, params, xs, state, d_hs, d_state, *, integration_mode):
        raise RuntimeError("no gradients today")


def test_the_all_wrong_adapter_fails_all_three_checks_each_with_a_reproducer():
    results = run(AllWrong())
    assert {name: r.status for name, r in results.items()} == dict.fromkeys(results, "fail")
    assert results["outputs"].worst_error > 0.1
    assert results["final_state"].worst_error == np.inf  # NaN where a number belongs
    assert "gradients() raised RuntimeError: no gradients today" in results["gradients"].message
    for result in results.values():
        assert result.examples > 0 and re.search(r"reproduce\(ADAPTER, Case\(", result.reproducer)


def test_a_wrong_shape_in_one_check_does_not_stop_the_others():
    class BadOutputShape(defects.SpecAdapter):
        name = "bad-hs-shape"

        def forward(self, params, xs, state, *, integration_mode):
            hs, final = super().forward(params, xs, state, integration_mode=integration_mode)
            return hs[..., :1, :], final  # only the first step

    results = run(BadOutputShape())
    assert results["outputs"].status == "fail" and "has shape" in results["outputs"].message
    # checked in every example run (Hypothesis stops drawing once it has a failure)
    assert results["final_state"].status == "pass"
    assert results["final_state"].examples == results["outputs"].examples == results["gradients"].examples >= 2
    assert results["gradients"].status == "pass"


def test_a_check_that_never_ran_is_not_run_not_passed():
    class ForwardOnly:
        name = "forward-only"

        def forward(self, params, xs, state, *, integration_mode):
            return reference.forward(params, xs, state, integration_mode=integration_mode)

    results = run(ForwardOnly())
    assert results["gradients"].status == "skip" and results["gradients"].examples == 0
    assert results["gradients"].message == "not run: the adapter has no gradients()"
    assert results["outputs"].status == "pass"


def test_an_error_raised_once_outside_the_adapter_is_reported_with_what_and_where(monkeypatch):
    """Hypothesis reports an example that failed once and then passed as a FlakyFailure group; the
    report names what its member raised and where, not only "1 sub-exception"."""
    import mlstm_spec.conformance.suite as suite

    calls = [0]
    reference_gradients = suite.reference_gradients

    def spurious_once(*args, **kwargs):  # as NumPy's "invalid value encountered in matmul" under -W error
        calls[0] += 1
        if calls[0] == 3:
            raise FloatingPointError("invalid value encountered in matmul")
        return reference_gradients(*args, **kwargs)

    monkeypatch.setattr(suite, "reference_gradients", spurious_once)
    results = run(defects.SpecAdapter())
    message = results["suite"].message
    assert results["suite"].status == "fail" and "FlakyFailure" in message
    assert "FloatingPointError: invalid value encountered in matmul (at " in message
    assert "in spurious_once)" in message


@pytest.mark.parametrize("message, passes", [("invalid value encountered in matmul", True),
                                             ("overflow encountered in exp", False)])
def test_only_numpys_warning_about_a_product_is_ignored_in_the_references(monkeypatch, message, passes):
    """Under ``-W error``, as a user's pytest may run the suite: the spurious matmul warning of NumPy's
    OpenBLAS (cases.SPURIOUS_PRODUCT_WARNING) does not break the run; any other warning still does."""
    import warnings

    import mlstm_spec.conformance.suite as suite

    reference_gradients = suite.reference_gradients

    def warning(*args, **kwargs):
        warnings.warn(message, RuntimeWarning)
        return reference_gradients(*args, **kwargs)

    monkeypatch.setattr(suite, "reference_gradients", warning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results = run(defects.SpecAdapter())
    assert all(r.status == "pass" for r in results.values()) is passes
    if not passes:
        assert results["suite"].status == "fail" and f"RuntimeWarning: {message}" in results["suite"].message


# ---- distinct failures ----

def test_two_distinct_failures_are_reported_with_two_reproducers_that_reproduce_them(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from broken_adapters import TwoBugs  # raises for T >= 3, wrong outputs for H >= 2

    results = run(TwoBugs(), settings=suite_settings("default", 15))
    failures = results["outputs"].failures
    assert sorted(f["kind"] for f in failures) == ["mismatch", "raised ValueError"]
    cases = {f["kind"]: eval(re.search(r"(Case\(.*\))\)", f["reproducer"]).group(1), {"Case": Case})
             for f in failures}
    assert cases["raised ValueError"].steps == 3  # each shrunk to (near) its own smallest example
    assert cases["mismatch"].hidden_size == 2 and cases["mismatch"].steps <= 2
    exec_reproducer.adapter = TwoBugs()
    messages = [str(exec_reproducer(f["reproducer"])) for f in failures]
    assert any("raised ValueError" in m for m in messages) and any("but should be" in m for m in messages)


# ---- adapters that exit, interrupt or hang ----

@pytest.mark.parametrize("exception", [SystemExit(0), KeyboardInterrupt()], ids=["sys.exit(0)", "KeyboardInterrupt"])
def test_an_adapter_that_exits_or_interrupts_fails_the_check_it_was_called_for(exception):
    class Exiting(defects.SpecAdapter):
        name = "exiting"

        def forward(self, params, xs, state, *, integration_mode):
            raise exception

    results = run(Exiting())
    for name in ("outputs", "final_state"):
        assert results[name].status == "fail"
        assert f"raised {type(exception).__name__}" in results[name].message
    assert results["gradients"].status == "pass"  # a separate call, still made


def test_a_hanging_call_times_out_and_the_adapter_is_not_called_again():
    release = threading.Event()
    calls = []

    class Hanging(defects.SpecAdapter):
        name = "hanging"

        def forward(self, params, xs, state, *, integration_mode):
            calls.append(1)
            release.wait(30)
            return super().forward(params, xs, state, integration_mode=integration_mode)

    try:
        results = run(Hanging(), timeout=0.3)
    finally:
        release.set()  # let the abandoned worker thread finish
    assert len(calls) == 1
    assert results["outputs"].status == "fail" and "did not return" in results["outputs"].message
    assert results["gradients"].status == "skip" and "not called again" in results["gradients"].message
    assert results["outputs"].reproducer


def test_the_caller_reports_what_left_the_call():
    caller = Caller(timeout=5)
    assert caller(lambda: 3).value == 3
    exited = caller(sys.exit, 0)
    assert isinstance(exited.exception, SystemExit) and not exited.ok
    assert caller(lambda: 4).value == 4  # the worker survives an exit
    caller.close()


# ---- per-case tolerances ----

def test_a_case_tolerance_follows_the_spec_own_error_between_floor_and_ceiling():
    k, floor = SHARPNESS["float32"]
    assert case_tolerance("float32", "cpu", 0.0) == floor
    assert case_tolerance("float32", "cpu", 1e-6) == pytest.approx(k * 1e-6)
    assert case_tolerance("float32", "cpu", 1.0) == tolerance("float32")
    assert case_tolerance("float64", "cpu", 1e-6) == tolerance("float64")  # fixed in float64


def test_the_rounded_reference_is_what_the_spec_computes_in_that_dtype():
    case = Case(batch=2, steps=4, input_size=3, hidden_size=3, dtype="float16", seed=4)
    arrays = case.arrays()
    hs, _, _ = rounded_reference(arrays, case.integration_mode, "float16", gradients=False)
    # the spec's cell, step by step in float16, is what the reference rounds like
    h, c, steps = arrays.state[0], arrays.state[1], []
    for t in range(case.steps):
        _, (h, c) = reference.forward(arrays.params, arrays.xs[:, t:t + 1], (h, c),
                                      integration_mode=case.integration_mode)
        steps.append(h)
    np.testing.assert_array_equal(hs, np.stack(steps, axis=1).astype(np.float64))
    exact, _ = reference_forward(arrays, case.integration_mode)
    assert 0 < np.abs(hs - exact).max() < 1e-2


def test_the_tolerance_follows_the_sensitivity_where_the_spec_rounds_luckily():
    """On LUCKY_SPEC_CASE the spec's own float32 error on the final state is below 2e-5, while moving every
    value it is given by up to one float32 rounding unit moves the float64 results by over 1e-4: the
    error the tolerance scales with is the share of the sensitivity, so the tolerance is the ceiling."""
    from mlstm_spec.conformance.suite import _tensor_errors

    case = LUCKY_SPEC_CASE
    arrays, mode, runtime = case.arrays(), case.integration_mode, case.runtime
    want = reference_forward(arrays, mode, **runtime)
    want_grads = reference_gradients(arrays, mode, **runtime)
    own = _tensor_errors(rounded_reference(arrays, mode, "float32", True, **runtime), want, 1, want_grads)
    moved = _tensor_errors(perturbed_reference(arrays, mode, "float32", True, case.seed, **runtime), want, 1,
                           want_grads)
    assert own["final_state"] < 2e-5 and moved["final_state"] > 1e-4
    assert spec_error(own["final_state"], moved["final_state"]) == SENSITIVITY_SHARE * moved["final_state"]
    assert case_tolerance("float32", "cpu", spec_error(own["final_state"], moved["final_state"])) == tolerance("float32")
    # and where the spec's own error is the larger, it stays the one
    assert spec_error(1e-5, 1e-5) == 1e-5


def test_perturbed_reference_moves_by_rounding_units_only():
    """float64 inputs moved by up to one unit of the dtype's rounding: the results move, by far less than
    the dtype's tolerance on a well-conditioned case, and the same seed moves them the same way."""
    case = Case(batch=3, steps=4, input_size=5, hidden_size=6, dtype="float32", seed=2)
    arrays = case.arrays()
    exact, _ = reference_forward(arrays, case.integration_mode)
    moved, _, _ = perturbed_reference(arrays, case.integration_mode, "float32", False, case.seed)
    again, _, _ = perturbed_reference(arrays, case.integration_mode, "float32", False, case.seed)
    np.testing.assert_array_equal(moved, again)
    assert 0 < np.abs(moved - exact).max() / np.abs(exact).max() < 1e-5


# ---- the diagnosis ----

class VariantAdapter:
    """An implementation that computes one variant of the table, declaring the spec's variants
    ``declared`` (the suite's attribute)."""

    dtypes = ("float64",)

    def __init__(self, variant, declared=frozenset()):
        self.variant, self.name, self.variants = variant, f"variant:{variant.key}", frozenset(declared)

    def forward(self, params, xs, state, *, integration_mode, **runtime):
        if self.variant.with_variants:
            out = self.variant.forward(params, xs, state, integration_mode, **runtime)
        else:
            out = self.variant.forward(params, xs, state, integration_mode)
        if out is None:
            raise ValueError("the input does not fit this implementation's layout")
        return out


def _declarations():
    """Each entry with no variants declared, and each that takes variants also with all of them and
    with only those it needs (a clip of the projection needs the projection)."""
    for variant in VARIANTS:
        needed = variant.needs | ({"proj_size"} if "proj_clip" in variant.needs else set())
        choices = {"none": frozenset(needed)} if not needed else {"its own": frozenset(needed)}
        if variant.with_variants:
            choices["all"] = frozenset(VARIANT_OPTIONS)
        for label, declared in choices.items():
            yield pytest.param(variant, declared, id=f"{variant.key}-declaring-{label}")


@pytest.mark.parametrize("variant, declared", list(_declarations()))
def test_the_diagnosis_names_each_known_variant_and_only_it(variant, declared):
    found = diagnose(VariantAdapter(variant, declared))
    assert found.matches == [variant.key], found.describe()
    assert variant.title in found.describe()


class InterleavedRows(defects.SpecAdapter):
    """Reads weight_ih / weight_mh and their biases unit by unit (row 5j+k: gate k of unit j), written
    with explicit loops, independently of diagnosis.interleaved."""

    name = "interleaved"

    def forward(self, params, xs, state, *, integration_mode):
        read = dict(params)
        for key, gates in (("weight_ih", 5), ("bias_ih", 5), ("weight_mh", 4), ("bias_mh", 4)):
            if key in params:
                H = params[key].shape[0] // gates
                read[key] = np.stack([params[key][j * gates + k] for k in range(gates) for j in range(H)])
        return super().forward(read, xs, state, integration_mode=integration_mode)


class TimeMajor(defects.SpecAdapter):
    """Takes the first axis for time, one mlstm_spec.cell step per row of it (no state given)."""

    name = "time-major"

    def forward(self, params, xs, state, *, integration_mode):
        if xs.ndim != 3 or state is not None:
            raise ValueError("time-major: give (T, B, I) and no state")
        hs, carried = [], None
        for x in xs:  # "time" = xs's first axis
            h, carried = reference.cell(params, x, carried, integration_mode=integration_mode)
            hs.append(h)
        return np.stack(hs, axis=0), carried


class StateCH(defects.SpecAdapter):
    name = "state-(c,h)"

    def forward(self, params, xs, state, *, integration_mode):
        c0, h0 = (None, None) if state is None else state
        hs, (h, c) = super().forward(params, xs, None if state is None else (h0, c0),
                                     integration_mode=integration_mode)
        return hs, (c, h)


@pytest.mark.parametrize("adapter, key", [
    (defects.IhBlocksPermuted(), "ih-gate-order-mifzo"),
    (defects.MhBlocksPermuted(), "mh-gate-order-ifzo"),
    (defects.TransposedWeights(), "weight-hh-transposed"),
    (defects.OutputTanhTanhZ(), "output-o-tanh-tanh-z"),
    (defects.OutputTanhOfCTimesO(), "output-tanh-c-times-o"),
    (defects.SigmoidCandidate(), "candidate-sigmoid"),
    (defects.BiasHhIgnored(), "bias-hh-missing"),
    (defects.Float64AsFloat32(), "float64-computed-in-float32"),
    (InterleavedRows(), "interleaved-rows"),
    (TimeMajor(), "batch-time-swapped"),
    (StateCH(), "state-order-c-h"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_the_diagnosis_names_implementations_written_independently_of_its_table(adapter, key):
    """The variants of the table are what such implementations compute (the real torchrecurrent is
    checked in test_runner.py): each of these, written on its own, is named."""
    assert diagnose(adapter).matches == [key]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("defect, key", [
    (defects.PeepholeOutputReadsPreviousCell, "peephole-o-reads-previous-c"),
    (defects.PeepholeInputForgetSwapped, "peephole-i-f-swapped"),
    (defects.CellClipAfterOutput, "cell-clip-after-output"),
    (defects.ProjClipBeforeProjection, "proj-clip-before-projection"),
    (defects.ProjClipIgnored, "proj-clip-ignored"),
    (defects.ForgetBiasIgnored, "forget-bias-ignored"),
    (defects.ForgetBiasInsideProduct, "forget-bias-inside-product"),
    (defects.Tf012Output, "tf012-output"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_the_diagnosis_names_each_planted_variant_defect(defect, key, dtype):
    """The planted defects are written independently of the table (defects.variant_forward): each is
    named, and named alone, in float64 and in float32, on every diagnostic case."""
    found = diagnose(defect(), dtype=dtype)
    assert found.matches == [key], found.describe()
    assert found.cases_run == len(DIAGNOSTIC_CASES) + len(VARIANT_DIAGNOSTIC_CASES)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("adapter", [defects.SpecAdapter(), defects.CorrectVariantRewrite(),
                                     defects.WeightHrGradientDropped()], ids=lambda a: a.name)
def test_the_diagnosis_names_nothing_for_a_correct_forward_with_every_variant(adapter, dtype):
    found = diagnose(adapter, dtype=dtype)
    assert found.cases_run == len(DIAGNOSTIC_CASES) + len(VARIANT_DIAGNOSTIC_CASES)
    assert found.matches == [] and "agrees with the spec" in found.describe()


def test_the_variant_cases_run_only_for_the_variants_an_adapter_declares():
    class PeepholesOnly(defects.PeepholeOutputReadsPreviousCell):
        variants = frozenset({"peepholes"})

    found = diagnose(PeepholesOnly())
    assert found.matches == ["peephole-o-reads-previous-c"]
    assert found.cases_run == len(DIAGNOSTIC_CASES) + 1
    assert "forget-bias-ignored" not in found.errors and "cell-clip-after-output" not in found.errors

    class AdditionOnly(defects.PeepholeOutputReadsPreviousCell):  # every variant, but declines some cases
        def supports(self, options):
            return options["integration_mode"] == "addition" and options["num_layers"] == 1

    found = diagnose(AdditionOnly())
    assert found.matches == ["peephole-o-reads-previous-c"]
    # the clip and forget-bias cases are under multiplicative integration: nothing said about those
    assert "forget-bias-ignored" not in found.errors and "cell-clip-after-output" not in found.errors
    assert "proj-clip-ignored" in found.errors

    class NoVariants(defects.ForgetBiasIgnored):
        variants = frozenset()

    found = diagnose(NoVariants())  # its defect needs a forget bias, which no case it is given has
    assert found.cases_run == len(DIAGNOSTIC_CASES) and found.matches == []
    assert "agrees with the spec" in found.describe()
    assert not {v.key for v in VARIANTS if v.needs} & set(found.errors)


def test_the_diagnosis_of_a_correct_forward_says_the_failure_is_elsewhere():
    found = diagnose(defects.H0GradientDropped())
    assert found.matches == [] and "agrees with the spec" in found.describe()
    unknown = diagnose(defects.TimeChunkRestartsState())  # correct at these sizes too
    assert unknown.matches == []


def test_the_diagnosis_names_no_variant_for_an_unknown_bug():
    class Unknown(defects.SpecAdapter):
        name = "unknown"

        def forward(self, params, xs, state, *, integration_mode):
            hs, (h, c) = super().forward(params, xs, state, integration_mode=integration_mode)
            return hs * 0.9, (h * 0.9, c)

    found = diagnose(Unknown())
    assert found.matches == [] and "none of the" in found.describe()


# ---- the pytest helper ----

def test_assert_conforms_fails_with_the_report_reproducer_and_diagnosis():
    with pytest.raises(ConformanceError) as raised:
        assert_conforms(defects.IhBlocksPermuted(), ["float64"], max_examples=5, seed=2, large=())
    text = str(raised.value)
    assert "defect:ih-blocks-permuted" in text and "FAIL" in text
    assert "Reproduce with:" in text and "reproduce(ADAPTER, Case(" in text
    assert "DIAGNOSIS" in text and "ih-gate-order-mifzo" in text
    assert "seed 2" in text


def test_assert_conforms_names_a_variant_misformulation_in_its_diagnosis():
    with pytest.raises(ConformanceError) as raised:
        assert_conforms(defects.ForgetBiasIgnored(), ["float32"], max_examples=12, seed=0, large=())
    text = str(raised.value)
    assert "DIAGNOSIS: defect:forget-bias-ignored on cpu (float64)" in text  # float64 offered
    assert "the run-time forget_bias accepted and never added [forget-bias-ignored;" in text


def test_assert_conforms_returns_the_report_when_everything_passes():
    report = assert_conforms(defects.SpecAdapter(), ["float32"], max_examples=3, seed=2, large=())
    assert report.exit_status == 0 and {r.status for r in report.results} == {"pass"}


def test_reproduce_names_every_failing_check():
    case = Case(batch=2, steps=2, input_size=1, hidden_size=1, seed=3)
    with pytest.raises(ConformanceError) as raised:
        reproduce(AllWrong(), case)
    text = str(raised.value)
    assert text.count("\n") == 2 and all(f"{name}:" in text for name in ("outputs", "final_state", "gradients"))
