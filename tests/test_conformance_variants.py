"""The suite and the spec's variants (projection, peepholes, cell_clip, proj_clip, forget_bias): the
cases carry them (and without them are exactly the cases of before), they are drawn only for adapters
that declare them and passed to adapters only when on, the clips clip some values and none within
rounding of the bound, and the report says per row which variants were checked.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mlstm_spec import reference
from mlstm_spec.conformance import LARGE_SHAPES, Case, check, defects
from mlstm_spec.conformance.cases import (VARIANT_OPTIONS, clipped_values, large_case, reference_forward,
                                          to_dtype)
from mlstm_spec.conformance.report import Report, plain_text
from mlstm_spec.conformance.runner import suite_settings
from mlstm_spec.conformance.suite import NOT_COMPUTED, cases, declared_variants
from mlstm_spec.conformance.tolerances import CLIP_MARGIN
from mlstm_spec.params import init_params

FEW = suite_settings("default", 12)


# ---- without variants, the arrays of before ----

def arrays_before_the_variants(case):
    """Case.arrays() as it was before the variants (commit c6b0e4c), kept here to compare against."""
    rng = np.random.default_rng(case.seed)
    batch = () if case.batch is None else (case.batch,)
    layers, size = [], case.input_size
    for _ in range(case.num_layers):
        p = init_params(size, case.hidden_size, rng=rng, dtype=np.float64, bias=case.bias,
                        recurrent_bias=case.recurrent_bias, multiplicative_bias=case.multiplicative_bias,
                        independent_recurrence=case.independent_recurrence)
        root = lambda k, v: np.sqrt(v.shape[1]) if case.scale_by_fan_in and k.startswith("weight_") \
            and v.ndim > 1 else 1.0  # noqa: E731
        layers.append({k: rng.uniform(-1, 1, v.shape) * case.weight_scale / root(k, v) for k, v in p.items()})
        size = case.hidden_size
    xs = rng.standard_normal(batch + (case.steps, case.input_size))
    shape = batch + (case.hidden_size,)
    states = [(rng.uniform(-1, 1, shape), rng.standard_normal(shape)) for _ in range(case.num_layers)]
    d_hs = rng.standard_normal(batch + (case.steps, case.hidden_size))
    d_states = [(rng.uniform(-1, 1, shape), rng.standard_normal(shape)) for _ in range(case.num_layers)]
    cast = lambda a: to_dtype(a, case.dtype)  # noqa: E731
    return [{k: cast(v) for k, v in p.items()} for p in layers], cast(xs), states, cast(d_hs), d_states


def _leaves(tree):
    if isinstance(tree, dict):
        return [v for k in sorted(tree) for v in _leaves(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [v for item in tree for v in _leaves(item)]
    return [] if tree is None else [np.asarray(tree)]


@settings(max_examples=40, deadline=None)
@given(case=cases("float64", max_layers=3), dtype=st.sampled_from(["float64", "float32", "float16"]),
       fan_in=st.booleans())
def test_without_variants_the_arrays_are_those_of_before(case, dtype, fan_in):
    case = dataclasses.replace(case, dtype=dtype, scale_by_fan_in=fan_in, with_state=True, with_d_state=True)
    assert case.variants == frozenset()
    a = case.arrays()
    layers, xs, states, d_hs, d_states = arrays_before_the_variants(case)
    cast = lambda pairs: [tuple(to_dtype(x, dtype) for x in pair) for pair in pairs]  # noqa: E731
    before = [layers if case.num_layers > 1 else layers[0], xs, cast(states), d_hs, cast(d_states)]
    now = [a.params, a.xs, a.state if case.num_layers > 1 else [a.state], a.d_hs,
           a.d_state if case.num_layers > 1 else [a.d_state]]
    for old, new in zip(before, now):
        for x, y in zip(_leaves(old), _leaves(new), strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(x, y)


def test_a_case_without_variants_prints_as_before_and_one_with_them_prints_them():
    plain = Case(batch=2, steps=3, input_size=1, hidden_size=4, seed=5)
    assert repr(plain) == (
        "Case(batch=2, steps=3, input_size=1, hidden_size=4, dtype='float64', integration_mode='addition', "
        "bias=True, recurrent_bias=True, multiplicative_bias=True, independent_recurrence=False, num_layers=1, "
        "with_state=True, with_d_state=True, weight_scale=1.0, seed=5, scale_by_fan_in=False)")
    varied = dataclasses.replace(plain, proj_size=2, cell_clip=0.75, forget_bias=1.0)
    assert repr(varied).endswith("scale_by_fan_in=False, proj_size=2, cell_clip=0.75, forget_bias=1.0)")
    assert eval(repr(varied), {"Case": Case}) == varied and eval(repr(plain), {"Case": Case}) == plain


def test_a_projected_stack_has_p_wide_outputs_states_and_layer_inputs():
    case = Case(batch=2, steps=3, input_size=4, hidden_size=5, num_layers=2, proj_size=3, peepholes=True)
    a = case.arrays()
    first, second = a.params
    assert first["weight_ih"].shape == (25, 4) and second["weight_ih"].shape == (25, 3)
    assert first["weight_hr"].shape == (3, 5) and first["weight_hh"].shape == (5, 3)
    assert {first[k].shape for k in ("weight_ci", "weight_cf", "weight_co")} == {(5,)}
    assert [s.shape for s in a.state[1]] == [(2, 3), (2, 5)] and a.d_hs.shape == (2, 3, 3)
    hs, finals = reference_forward(a, case.integration_mode, **case.runtime)
    assert hs.shape == (2, 3, 3) and finals[1][0].shape == (2, 3)


def test_peephole_terms_matter_at_every_size():
    for shape in (s for s in LARGE_SHAPES["thorough"] if s.peepholes):
        case = large_case(shape, "float64", np.random.default_rng(0), VARIANT_OPTIONS)
        a = case.arrays()
        hs, _ = reference_forward(a, case.integration_mode, **case.runtime)
        peepholes_off = lambda p: {k: v * 0 if k in ("weight_ci", "weight_cf", "weight_co") else v  # noqa: E731
                                   for k, v in p.items()}
        zeroed = dataclasses.replace(a, params=[peepholes_off(p) for p in a.params] if case.num_layers > 1
                                     else peepholes_off(a.params))
        without, _ = reference_forward(zeroed, case.integration_mode, **case.runtime)
        assert np.abs(hs - without).max() > 0.05 * np.abs(hs).max(), shape


# ---- clips that clip, away from the bound ----

def assert_clips_some_away_from_the_bound(case):
    values = clipped_values(case)
    for name in ("cell_clip", "proj_clip"):
        bound = getattr(case, name)
        if bound is None:
            continue
        clipped = values[name] > bound
        assert clipped.any(), f"{name}={bound} clips nothing in {case!r}"
        assert not clipped.all() or values[name].size == 1, f"{name}={bound} clips everything in {case!r}"
        margin = CLIP_MARGIN[case.dtype] * values[name].max()
        assert np.abs(values[name] - bound).min() > margin, f"a value within {margin:.1e} of {name}={bound}"
        assert float(to_dtype(np.float64(bound), case.dtype)) == bound  # representable in the dtype


@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_drawn_clips_clip_some_values_and_none_near_the_bound(dtype):
    seen = {"cell_clip": 0, "proj_clip": 0}

    @settings(max_examples=200, deadline=None, database=None, derandomize=True)
    @given(case=cases(dtype, variants=VARIANT_OPTIONS))
    def drawn(case):
        assert_clips_some_away_from_the_bound(case)
        for name in seen:
            seen[name] += getattr(case, name) is not None

    drawn()
    # (a clip is left off where every value it would act on is below 0.01: nothing to clip)
    assert seen["cell_clip"] >= 20 and seen["proj_clip"] >= 3, seen


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_large_tier_variant_shapes_straddle_the_boundaries_and_clip(dtype):
    shapes = LARGE_SHAPES["default"]
    boundaries = (8, 16, 32, 64, 128)
    projected = [s for s in shapes if s.proj_size]
    assert any(s.proj_size < b < s.hidden_size for s in projected for b in boundaries)
    assert any(s.num_layers > 1 for s in projected)
    assert any(s.peepholes and s.cell_clip and s.steps > 64 for s in shapes)
    assert sum(not s.variants for s in shapes) >= 2  # the plain formulation keeps large shapes too
    for index, shape in enumerate(shapes):
        case = large_case(shape, dtype, np.random.default_rng([1, index]), VARIANT_OPTIONS)
        plain = large_case(shape, dtype, np.random.default_rng([1, index]))
        assert case.variants == shape.variants and plain.variants == frozenset()
        assert (plain.seed, plain.integration_mode) == (case.seed, case.integration_mode)
        if shape.cell_clip or shape.proj_clip:
            assert_clips_some_away_from_the_bound(case)


# ---- which adapters get variants, and how they are called ----

class Recording(defects.SpecAdapter):
    """The spec, recording the keyword arguments of every call and the variants of every case."""

    name = "recording"

    def __init__(self, variants=None):
        if variants is not None:
            self.variants = frozenset(variants)
        self.calls = []

    def forward(self, params, xs, state, *, integration_mode, **runtime):
        self.calls.append((runtime, "weight_hr" in params, "weight_ci" in params))
        return super().forward(params, xs, state, integration_mode=integration_mode, **runtime)

    def gradients(self, params, xs, state, d_hs, d_state, *, integration_mode, **runtime):
        self.calls.append((runtime, "weight_hr" in params, "weight_ci" in params))
        return super().gradients(params, xs, state, d_hs, d_state, integration_mode=integration_mode, **runtime)


def test_an_adapter_gets_only_the_variants_it_declares_and_runtime_options_only_when_on():
    adapter = Recording({"peepholes", "forget_bias"})
    results = check(adapter, "float64", settings=FEW, seed=3)
    assert {r.status for r in results} == {"pass"}
    assert all(set(kwargs) <= {"forget_bias"} and not projected for kwargs, projected, _ in adapter.calls)
    assert all(kwargs.get("forget_bias", 1.0) != 0.0 for kwargs, _, _ in adapter.calls)
    assert any(kwargs for kwargs, _, _ in adapter.calls) and any(peep for _, _, peep in adapter.calls)
    assert any(not kwargs and not peep for kwargs, _, peep in adapter.calls)  # plain cases are drawn too
    counts = results[0].variants
    assert counts["peepholes"] > 0 and counts["forget_bias"] > 0
    assert {counts[v] for v in ("proj_size", "cell_clip", "proj_clip")} == {NOT_COMPUTED}


class OldOutsideAdapter:
    """An outside adapter written before the variants: no ``variants``, no ``**runtime``."""

    name = "old-outside"

    def forward(self, params, xs, state, *, integration_mode):
        assert set(params) <= {"weight_ih", "weight_hh", "weight_mh", "bias_ih", "bias_hh", "bias_mh"}
        return reference.forward(params, xs, state, integration_mode=integration_mode)


class IgnoresTheVariantKeys(OldOutsideAdapter):
    name = "old-outside-with-supports"

    def supports(self, options):
        return options["num_layers"] == 1


class GenericWithSupports(IgnoresTheVariantKeys):
    """Takes any keyword options (passing them nowhere) and a supports() that ignores the variant keys."""

    name = "generic-with-supports"

    def forward(self, params, xs, state, *, integration_mode, **options):
        return super().forward(params, xs, state, integration_mode=integration_mode)


class PeepholesBySupports(defects.SpecAdapter):
    """An outside adapter that declares peepholes through ``supports()`` alone."""

    name = "peepholes-by-supports"
    variants = None

    def supports(self, options):
        return options["num_layers"] == 1 and not options["proj_size"] and options["cell_clip"] is None \
            and options["proj_clip"] is None and not options["forget_bias"]


def test_declared_variants_come_from_variants_or_supports_and_old_adapters_get_none():
    assert declared_variants(defects.SpecAdapter()) == frozenset(VARIANT_OPTIONS)
    assert declared_variants(OldOutsideAdapter()) == frozenset()
    assert declared_variants(IgnoresTheVariantKeys()) == frozenset()
    assert declared_variants(GenericWithSupports()) == frozenset()
    assert declared_variants(PeepholesBySupports()) == {"peepholes"}

    class OldSubclassOfTheSpec(defects.SpecAdapter):  # inherits variants, overrides forward the old way
        def forward(self, params, xs, state, *, integration_mode):
            return super().forward(params, xs, state, integration_mode=integration_mode)

    assert declared_variants(OldSubclassOfTheSpec()) == frozenset()
    for adapter in (OldOutsideAdapter(), IgnoresTheVariantKeys(), GenericWithSupports()):
        results = check(adapter, "float64", settings=FEW, seed=3)
        assert {r.status for r in results} - {"skip"} == {"pass"}, [r.message for r in results]
        assert results[0].variants == dict.fromkeys(VARIANT_OPTIONS, NOT_COMPUTED)


def test_the_report_says_which_variants_each_row_checked_and_never_passes_an_undeclared_one():
    spec = check(defects.SpecAdapter(), "float64", settings=suite_settings("default"), seed=0)
    old = check(OldOutsideAdapter(), "float64", settings=FEW, seed=0, large=())
    assert all(isinstance(n, int) and n > 0 for n in spec[0].variants.values()), spec[0].variants
    text = plain_text(Report(spec + old))
    assert "variants checked (examples): proj_size" in text
    assert (f"variants {', '.join(VARIANT_OPTIONS)}: not run (adapter does not compute it)" in text)
    assert text.count("not run (adapter does not compute it)") == 1  # the old adapter's row only


def test_a_project_backend_declaring_no_variants_shows_them_all_as_not_run():
    import fourth_backend  # written on backends._common.AdapterBase, like the torch, JAX and Keras adapters

    results = check(fourth_backend.ConformanceAdapter("cpu"), "float64", settings=FEW, seed=0, large=())
    assert {r.status for r in results} == {"pass"}
    assert all(r.variants == dict.fromkeys(VARIANT_OPTIONS, NOT_COMPUTED) for r in results)


def test_stacked_projections_and_run_time_options_pass_through_the_backend_adapter_protocol():
    """The path the torch, JAX and Keras adapters take (backends._common.AdapterBase: states stacked
    over the layers, run-time options handed to build), with the spec as the kernel: every variant,
    stacks included, passes."""
    from backends._common import AdapterBase

    class SpecOnAdapterBase(AdapterBase):
        name = "spec-on-adapter-base"
        dtypes = ("float64",)
        variants = frozenset(VARIANT_OPTIONS)

        def build(self, layers, integration_mode, **runtime):
            return layers, dict(integration_mode=integration_mode, **runtime)

        def run(self, model, xs, state):
            layers, options = model
            out, finals = xs, []
            for k, params in enumerate(layers):
                out, final = reference.forward(params, out, None if state is None else (state[0][k], state[1][k]),
                                               **options)
                finals.append(final)
            return out, np.stack([h for h, _ in finals]), np.stack([c for _, c in finals])

        def pullback(self, model, xs, state, d_hs, d_state):
            layers, options = model
            inputs, out = [], xs
            for k, params in enumerate(layers):
                inputs.append(out)
                out, _ = reference.forward(params, out, (state[0][k], state[1][k]), **options)
            grads, d_h0, d_c0 = [None] * len(layers), [None] * len(layers), [None] * len(layers)
            for k in reversed(range(len(layers))):
                g = reference.backward(layers[k], inputs[k], (state[0][k], state[1][k]), d_hs,
                                       (d_state[0][k], d_state[1][k]), **options)
                d_hs, d_h0[k], d_c0[k] = g.pop("x"), g.pop("h0"), g.pop("c0")
                grads[k] = g
            return grads, d_hs, np.stack(d_h0), np.stack(d_c0)

    results = check(SpecOnAdapterBase(), "float64", settings=FEW, seed=2)
    assert {r.status for r in results} == {"pass"}, [r.message for r in results]
    assert results[0].examples_by_tier["large"] == len(LARGE_SHAPES["default"])  # the projected stack ran
    assert all(n > 0 for n in results[0].variants.values()), results[0].variants


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_spec_row_checks_every_variant_below_float64(dtype):
    results = check(defects.SpecAdapter(), dtype, settings=suite_settings("default"), seed=0)
    assert {r.status for r in results} == {"pass"}, [r.message for r in results if r.status != "pass"]
    assert all(isinstance(n, int) and n > 0 for n in results[0].variants.values()), results[0].variants
