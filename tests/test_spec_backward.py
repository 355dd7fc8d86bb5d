"""``mlstm_spec.backward``: the hand-written back-propagation through time, against finite differences.

The loss whose gradient ``backward`` returns is the scalar

    L = sum(d_hs * hs) + sum(d_h_T * h_T) + sum(d_c_T * c_T)

so every entry of every returned gradient is checked against a central finite difference of ``L``
computed with ``mlstm_spec.forward`` in float64.

Step and stencil. A four-point central difference with step e has truncation error ~ e^4 |L^(5)|
and rounding error ~ eps |L| / e. No single step serves every drawn case: e = 1e-4 is best for most
(worst ~2e-10 over 60 cases), but with weights of scale 2 and multiplicative integration, L can be
so curved that e = 1e-4 is off by 2e-6 and, at the zero state without biases (where the gain from
h0 reaches ~1e3 per step), even e = 1e-6 is off by 4e-6; e = 1e-5 fixed left worst 3e-9 on 152 cases
but still failed there. So each entry is differentiated at shrinking steps (1e-4, 1e-5, ...) until
two agree, and the estimate with the smallest gap to the next is used; its error is at most about
that gap. A growing gap ends the search only once the estimates have come within CONVERGED (relative)
of each other: before that, truncation still dominates. In the hardest case drawn (T=6, weights of
scale 2, multiplicative integration, no biases, zero state; d_h0 ~ 2e5) the gaps grow from step 1e-4
to 1e-6 before the estimates converge at 1e-7, and stopping at the first growth picked an estimate
off by 140%. Without any stopping on growth, tiny steps give spurious agreement instead (two steps
below the loss's resolution return the same value), which cost 1e-8 of accuracy on easy cases.

Variants. Clipping is not differentiable at its bounds; a drawn case whose clipped values come
within CLIP_MARGIN (spec_strategies) of a bound is skipped (``assume``), since a difference across
the bound measures the kink. What the gradient is exactly at a bound is pinned by its own test below.

The error metric is the project's norm-wise one (``tolerances.relative_error``), per gradient array.
The worst seen is printed (run with ``-s`` or ``-rP``) and recorded as the
``worst_fd_relative_error`` property (``--junitxml``).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import assume, given

import mlstm_spec
from mlstm_spec.conformance.tolerances import FLOOR, relative_error, tolerance
from spec_strategies import (
    BIAS_OPTIONS, CLIP_MARGIN, MODES, VARIANTS, VariantCase as Case, assert_close, cases,
    distance_to_clip_bounds, variant_case, zero_state,
)

FD_STEPS = (1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10)
AGREEMENT = 1e-9
CONVERGED = 1e-6
FD_TARGET = 1e-6  # the target for the worst relative error in float64


def loss(params, xs, state, d_hs, d_state, integration_mode, runtime=None):
    hs, (h_T, c_T) = mlstm_spec.forward(params, xs, state, integration_mode=integration_mode,
                                        **(runtime or {}))
    value = np.sum(d_hs * hs)
    if d_state is not None:
        value += np.sum(d_state[0] * h_T) + np.sum(d_state[1] * c_T)
    return value


def numerical_gradient(evaluate, array):
    """d evaluate() / d array, entry by entry, perturbing ``array`` in place (see the module docstring)."""
    gradient = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        gradient[index] = numerical_derivative(evaluate, array, index)
    return gradient


def numerical_derivative(evaluate, array, index):
    """Four-point central differences at shrinking steps; returns the estimate that agrees best with
    the next smaller step. Stops once two steps agree to AGREEMENT, or once the gap grows after the
    estimates had come within CONVERGED of each other (rounding has taken over from truncation)."""
    original = array[index]

    def four_point(step):
        values = []
        for multiple in (2, 1, -1, -2):
            array[index] = original + multiple * step
            values.append(evaluate())
        array[index] = original
        return (-values[0] + 8 * values[1] - 8 * values[2] + values[3]) / (12 * step)

    previous = four_point(FD_STEPS[0])
    best, best_gap = previous, np.inf
    for step in FD_STEPS[1:]:
        estimate = four_point(step)
        gap = abs(estimate - previous)
        scale = max(abs(estimate), FLOOR)
        if gap >= best_gap and best_gap <= CONVERGED * scale:
            break  # the estimates had converged; now rounding takes over
        if gap < best_gap:
            best, best_gap = previous, gap
        if gap <= AGREEMENT * scale:
            break
        previous = estimate
    return best


def finite_difference_errors(case: Case) -> dict:
    """Relative error of each analytic gradient of ``case`` against finite differences."""
    a = case.arrays()
    mode = case.integration_mode
    analytic = mlstm_spec.backward(a.params, a.xs, a.state, a.d_hs, a.d_state, integration_mode=mode,
                                   **case.runtime)
    targets = dict(a.params, x=a.xs)
    if a.state is None:  # state=None stands for zeros; its gradient is still returned: check it there
        a.state = zero_state(case)
    targets.update(h0=a.state[0], c0=a.state[1])
    expected_keys = set(a.params) | {"x", "h0", "c0"}
    assert set(analytic) == expected_keys, f"backward returned {sorted(analytic)} [{case}]"

    def evaluate():
        return loss(a.params, a.xs, a.state, a.d_hs, a.d_state, mode, case.runtime)

    errors = {}
    for name, array in targets.items():
        numeric = numerical_gradient(evaluate, array)
        assert analytic[name].shape == numeric.shape, f"grads[{name!r}] shape [{case}]"
        errors[name] = relative_error(analytic[name], numeric)
    return errors


class WorstSeen:
    """The worst finite-difference error seen by a test, with where it was seen."""

    def __init__(self):
        self.error, self.where, self.count = 0.0, "none", 0

    def check(self, case: Case):
        __tracebackhide__ = True
        errors = finite_difference_errors(case)
        self.count += 1
        name, (error, at) = max(errors.items(), key=lambda item: item[1][0])
        if error >= self.error:
            self.error, self.where = error, f"grads[{name!r}]{list(at)} of {case}"
        failing = {k: f"{e:.3g} at {list(i)}" for k, (e, i) in errors.items() if not e <= FD_TARGET}
        assert not failing, f"analytic gradients differ from finite differences: {failing} [{case}]"

    def report(self, label, record_property):
        record_property(f"worst_fd_relative_error[{label}]", self.error)
        print(f"\nworst finite-difference relative error over {self.count} {label}: "
              f"{self.error:.3g} (target {FD_TARGET:g}) at {self.where}")


def test_backward_matches_finite_differences_on_drawn_cases(record_property):
    worst = WorstSeen()

    @given(case=cases())
    def check(case):
        assume(distance_to_clip_bounds(case, case.arrays()) > CLIP_MARGIN)
        worst.check(case)

    check()
    worst.report("drawn cases", record_property)
    assert worst.count > 0


BIAS_COMBINATIONS = list(itertools.product((False, True), repeat=3))


def test_backward_matches_finite_differences_for_every_option_combination(record_property):
    """Every bias-flag combination x both integration modes x both recurrences, at fixed shapes
    (the drawn test above covers shapes but need not meet all 32 combinations)."""
    worst = WorstSeen()
    for seed, (flags, mode, independent) in enumerate(
        itertools.product(BIAS_COMBINATIONS, MODES, (False, True))
    ):
        worst.check(Case(batch=2 if seed % 4 else None, steps=3, input_size=3, hidden_size=2,
                         integration_mode=mode, independent_recurrence=independent, seed=seed,
                         **dict(zip(BIAS_OPTIONS, flags))))
    worst.report("option combinations", record_property)
    assert worst.count == 32


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda name: name.replace(" ", "_"))
def test_backward_matches_finite_differences_for_each_variant(variant, mode, record_property):
    worst = WorstSeen()
    worst.check(variant_case(mode, VARIANTS[variant]))
    worst.report(f"{variant} ({mode})", record_property)


@pytest.mark.parametrize("option", ["cell_clip", "proj_clip"])
def test_the_gradient_passes_a_clip_exactly_at_its_bound_and_stops_beyond_it(option):
    """At T=1 the loss ``L = c_T[0, 0]`` (cell_clip) or ``h_T[0, 0]`` (proj_clip) reads one clipped
    value v. With the bound set to exactly ``|v|`` the value is kept and its gradient passes (the
    closed interval, as TensorFlow and torch define the derivative of a clip), so every gradient is
    bit for bit the unclipped one; one float below ``|v|``, v is clipped to a constant and every
    gradient is zero."""
    case = Case(batch=2, steps=1, input_size=3, hidden_size=3, integration_mode="multiplicative_integration",
                proj_size=2, peepholes=True, forget_bias=0.5, seed=3)
    a = case.arrays()
    d_h, d_c = np.zeros_like(a.state[0]), np.zeros_like(a.state[1])
    (d_h if option == "proj_clip" else d_c)[0, 0] = 1.0
    d_hs = np.zeros_like(a.d_hs)
    run = lambda **clip: mlstm_spec.backward(a.params, a.xs, a.state, d_hs, (d_h, d_c),  # noqa: E731
                                             integration_mode=case.integration_mode, forget_bias=0.5, **clip)
    hs, (_, c_T) = mlstm_spec.forward(a.params, a.xs, a.state, integration_mode=case.integration_mode,
                                      forget_bias=0.5)
    value = (hs[0, -1, 0] if option == "proj_clip" else c_T[0, 0])
    unclipped = run()
    at_bound = run(**{option: abs(float(value))})
    beyond = run(**{option: float(np.nextafter(abs(value), 0))})
    assert np.any(unclipped["x"] != 0)
    for name in unclipped:
        np.testing.assert_array_equal(at_bound[name], unclipped[name], err_msg=f"{name} at the bound")
        np.testing.assert_array_equal(beyond[name], 0.0, err_msg=f"{name} beyond the bound")


# ---- the shape of the result ----

@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("flags", BIAS_COMBINATIONS, ids=lambda f: "".join("01"[b] for b in f))
def test_gradients_have_one_entry_per_parameter_and_input(flags, batched):
    case = Case(batch=3 if batched else None, steps=4, input_size=2, hidden_size=5,
                **dict(zip(BIAS_OPTIONS, flags)))
    a = case.arrays()
    grads = mlstm_spec.backward(a.params, a.xs, a.state, a.d_hs, a.d_state)
    present = {"weight_ih", "weight_hh", "weight_mh"} | {
        key for key, on in zip(("bias_ih", "bias_hh", "bias_mh"), flags) if on
    }
    assert set(grads) == present | {"x", "h0", "c0"}
    for name in present:
        assert grads[name].shape == a.params[name].shape, name
    assert grads["x"].shape == a.xs.shape
    state_shape = (3, 5) if batched else (5,)
    assert grads["h0"].shape == grads["c0"].shape == state_shape


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_variant_parameters_get_gradients_and_h0_is_projection_wide(batched):
    case = Case(batch=3 if batched else None, steps=4, input_size=2, hidden_size=5, proj_size=2,
                peepholes=True)
    a = case.arrays()
    grads = mlstm_spec.backward(a.params, a.xs, a.state, a.d_hs, a.d_state, cell_clip=1.0, proj_clip=0.5)
    variant_keys = {"weight_hr", "weight_ci", "weight_cf", "weight_co"}
    assert variant_keys <= set(a.params)
    assert set(grads) == set(a.params) | {"x", "h0", "c0"}
    for name in a.params:
        assert grads[name].shape == a.params[name].shape, name
    batch = (3,) if batched else ()
    assert grads["h0"].shape == batch + (2,) and grads["c0"].shape == batch + (5,)
    for name in variant_keys:
        assert np.all(grads[name] != 0), f"grads[{name!r}] has zeros: {grads[name]}"


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_gradients_keep_the_input_dtype_and_match_float64(dtype):
    case = Case(batch=2, steps=5, input_size=3, hidden_size=4, dtype=dtype, seed=3)
    a = case.arrays()
    grads = mlstm_spec.backward(a.params, a.xs, a.state, a.d_hs, a.d_state)
    as64 = lambda tree: {k: v.astype(np.float64) for k, v in tree.items()}  # noqa: E731
    pair64 = lambda pair: tuple(v.astype(np.float64) for v in pair)  # noqa: E731
    reference = mlstm_spec.backward(as64(a.params), a.xs.astype(np.float64), pair64(a.state),
                                    a.d_hs.astype(np.float64), pair64(a.d_state))
    for name, value in grads.items():
        assert value.dtype == np.dtype(dtype), f"grads[{name!r}] is {value.dtype}, not {dtype}"
        assert np.all(np.isfinite(value)), name
        assert_close(value, reference[name], tolerance(dtype), f"grads[{name!r}]", case)


# ---- how d_state and state=None are read ----

def test_none_state_and_none_d_state_mean_zeros():
    a = Case(batch=2, steps=3, input_size=2, hidden_size=3, seed=5).arrays()
    zeros = (np.zeros((2, 3)), np.zeros((2, 3)))
    implicit = mlstm_spec.backward(a.params, a.xs, None, a.d_hs, None)
    explicit = mlstm_spec.backward(a.params, a.xs, zeros, a.d_hs, zeros)
    for name in explicit:
        np.testing.assert_array_equal(implicit[name], explicit[name], err_msg=name)


def test_gradients_are_linear_in_the_output_gradients():
    """backward is a vector-Jacobian product: linear in (d_hs, d_state) jointly."""
    a = Case(batch=2, steps=4, input_size=3, hidden_size=3, seed=11,
             integration_mode="multiplicative_integration").arrays()
    b = Case(batch=2, steps=4, input_size=3, hidden_size=3, seed=12).arrays()
    mode = "multiplicative_integration"
    run = lambda d_hs, d_state: mlstm_spec.backward(  # noqa: E731
        a.params, a.xs, a.state, d_hs, d_state, integration_mode=mode)
    first, second = run(a.d_hs, a.d_state), run(b.d_hs, b.d_state)
    both = run(2 * a.d_hs - b.d_hs, tuple(2 * u - v for u, v in zip(a.d_state, b.d_state)))
    for name in both:
        assert_close(both[name], 2 * first[name] - second[name], 1e-12, f"grads[{name!r}]")


def test_final_state_gradient_alone_reaches_every_input():
    """With d_hs = 0 only d_state drives the gradients; d_c_T flows back through c to every step."""
    a = Case(batch=2, steps=4, input_size=3, hidden_size=3, seed=2).arrays()
    grads = mlstm_spec.backward(a.params, a.xs, a.state, np.zeros_like(a.d_hs),
                                (np.zeros((2, 3)), a.d_state[1]))
    assert np.all(np.abs(grads["x"]).max(axis=-1) > 0), "some step got no gradient from d_c_T"
    assert np.all(grads["c0"] != 0)


def test_backward_leaves_its_inputs_unchanged():
    a = Case(batch=2, steps=3, input_size=2, hidden_size=3, seed=4).arrays()
    copies = [{k: v.copy() for k, v in a.params.items()}, a.xs.copy(),
              tuple(s.copy() for s in a.state), a.d_hs.copy(), tuple(s.copy() for s in a.d_state)]
    mlstm_spec.backward(a.params, a.xs, a.state, a.d_hs, a.d_state)
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], copies[0][name], err_msg=name)
    np.testing.assert_array_equal(a.xs, copies[1])
    for now, before in zip(a.state + (a.d_hs,) + a.d_state, copies[2] + (copies[3],) + copies[4]):
        np.testing.assert_array_equal(now, before)
