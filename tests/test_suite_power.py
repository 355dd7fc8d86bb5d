"""The suite's power: every planted defect in mlstm_spec.conformance.defects is reported as failing by
the runner's default settings, and the controls pass.

The settings are the runner's own (``runner.suite_settings("default")``: the default profile's
example count, no database) with a fixed seed, exactly what ``mlstm-conformance --seed 0`` runs,
so CI sees the same examples every time. Each defect must fail the check its bug shows up in, and
for the defects that are wrong only for some shapes, the smallest failing example Hypothesis
reports must be the smallest shape that shows them.
"""

from __future__ import annotations

import re

import pytest

from mlstm_spec.conformance import Case, check, defects
from mlstm_spec.conformance.runner import suite_settings

SEED = 0
SETTINGS = suite_settings("default")

#: the check each defect must fail (the issue's list; a new defect must be added here)
EXPECTED_CHECK = {
    "IhBlocksPermuted": "outputs",
    "MhBlocksPermuted": "outputs",
    "BiasHhIgnored": "outputs",
    "BiasMhTwice": "outputs",
    "SigmoidCandidate": "outputs",
    "OutputTanhOfCTimesO": "outputs",
    "OutputTanhTanhZ": "outputs",
    "StateSwapped": "final_state",
    "TransposedWeights": "outputs",
    "Float64AsFloat32": "outputs",
    "StateNotCarried": "outputs",
    "FinalStateOfRowZero": "final_state",
    "H0GradientDropped": "gradients",
}

#: what the smallest failing example must look like for defects that hide in some shapes/options
SMALLEST_CASE = {
    "StateNotCarried": lambda case: case.steps == 2,
    "FinalStateOfRowZero": lambda case: case.batch == 2,
    "TransposedWeights": lambda case: case.hidden_size == 2 and not case.independent_recurrence,
    "BiasHhIgnored": lambda case: case.recurrent_bias,
    "BiasMhTwice": lambda case: case.multiplicative_bias,
}

#: float64 computed in float32 is, in float32, no defect at all
ONLY_FLOAT64 = {"Float64AsFloat32"}


def defect_params():
    for defect in defects.DEFECTS:
        for dtype in ("float64", "float32"):
            if dtype == "float64" or defect.__name__ not in ONLY_FLOAT64:
                yield pytest.param(defect, dtype, id=f"{defect.__name__}-{dtype}")


def failing_case(result) -> Case:
    match = re.search(r"reproduce\(ADAPTER, (Case\(.*?\))\)", result.reproducer)
    assert match, f"no reproducer in {result}"
    return eval(match.group(1), {"Case": Case})


def test_every_defect_of_the_issue_is_planted():
    assert {d.__name__ for d in defects.DEFECTS} == set(EXPECTED_CHECK)
    assert len({d.name for d in defects.DEFECTS}) == len(defects.DEFECTS)


@pytest.mark.parametrize("defect, dtype", list(defect_params()))
def test_default_run_reports_the_defect(defect, dtype):
    results = {r.check: r for r in check(defect(), dtype, settings=SETTINGS, seed=SEED)}
    failed = [name for name, r in results.items() if r.status == "fail"]
    assert failed, f"{defect.name} passed every check in {dtype}: {results}"
    expected = results[EXPECTED_CHECK[defect.__name__]]
    assert expected.status == "fail", f"{defect.name} should fail {expected.check}; failed {failed}"
    assert expected.worst_error > expected.tolerance
    # One reproducer: the smallest failing example, on the check it fails first (which may be another
    # one: permuted weight_mh blocks with m = 0 leave the outputs right and only the gradients wrong).
    (shrunk,) = [r for r in results.values() if r.reproducer]
    assert shrunk.status == "fail"
    case = failing_case(shrunk)
    assert case.dtype == dtype
    if defect.__name__ in SMALLEST_CASE:
        assert SMALLEST_CASE[defect.__name__](case), f"smallest failing example of {defect.name}: {case}"


def test_float64_computed_in_float32_is_invisible_in_float32():
    """The control for the one defect checked in float64 only: it is really about float64."""
    results = check(defects.Float64AsFloat32(), "float32", settings=SETTINGS, seed=SEED)
    assert {r.status for r in results} == {"pass"}


@pytest.mark.parametrize("control, dtype", [
    (defects.SpecAdapter, "float64"), (defects.SpecAdapter, "float32"), (defects.SpecAdapter, "float16"),
    (defects.CorrectRewrite, "float64"), (defects.CorrectRewrite, "float32"),
])
def test_controls_pass(control, dtype):
    results = check(control(), dtype, settings=SETTINGS, seed=SEED)
    ran = [r for r in results if r.status != "skip"]
    assert ran and all(r.status == "pass" for r in ran), results
    assert all(r.examples == SETTINGS.max_examples for r in ran)


def test_a_case_whose_exact_answer_overflows_the_dtype_is_not_held_against_the_implementation():
    # The exact d_h0 here is about 1.0e5, beyond float16's largest finite value 65504: every float16
    # implementation (the spec's own float16 path included) returns inf, so the case checks nothing.
    from mlstm_spec.conformance import Case, reproduce
    from mlstm_spec.conformance.cases import reference_gradients
    from mlstm_spec.conformance.defects import SpecAdapter

    case = Case(batch=None, steps=5, input_size=3, hidden_size=5, dtype="float16",
                integration_mode="multiplicative_integration", bias=True, recurrent_bias=False,
                multiplicative_bias=False, with_state=False, weight_scale=2.0, seed=0)
    exact = reference_gradients(case.arrays(), case.integration_mode)
    assert abs(exact["h0"]).max() > 65504
    with pytest.raises(ValueError, match="exceed the range of float16"):
        reproduce(SpecAdapter(), case)
    # the same shapes in float32 are representable and checked as usual
    reproduce(SpecAdapter(), Case(**{**case.__dict__, "dtype": "float32"}))
