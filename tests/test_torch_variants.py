"""The spec's variants (docs/equations.md, Variants) in the torch layers: a projection (nn.LSTM's
``proj_size``), peepholes, ``cell_clip``, ``proj_clip`` and ``forget_bias``, on every path (plain, the
fused operator, its reverse direction and packed sequences, MLSTMCell), against ``mlstm_spec``; and the
variant-free layer computing exactly what it computed before the variants existed."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from helpers import require_backend
from hypothesis import HealthCheck, example, given, reject, settings
from spec_strategies import LUCKY_SPEC_CASE, VARIANTS, assert_close, cases, clips_something, variant_case

bt = require_backend("torch")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import mlstm_spec  # noqa: E402
from backends.torch import build, fused, loops, plain, variants  # noqa: E402
from backends.torch.adapter import ConformanceAdapter  # noqa: E402
from mlstm_spec.conformance.calls import Caller  # noqa: E402
from mlstm_spec.conformance.cases import Case, with_clips  # noqa: E402
from mlstm_spec.conformance.suite import _Unrepresentable as Unrepresentable, evaluate_case  # noqa: E402
from mlstm_spec.conformance.tolerances import TOLERANCES  # noqa: E402

MODES = ("addition", "multiplicative_integration")
# The adapter configurations: the fused operator (its C++ loops on CPU where they are compiled; its
# Python loops with python_loops), the plain path, the reverse direction of a bidirectional layer, and
# packed sequences.
CONFIGURATIONS = {
    "fused": dict(),
    "python_loops": dict(python_loops=True),
    "plain": dict(fused=False),
    "reverse": dict(direction="reverse"),
    "packed": dict(packed=True),
}


def check_against_spec(case, adapter, bound):
    """Outputs, final state and every gradient of ``adapter`` on ``case`` against mlstm_spec (float64)."""
    a = case.arrays()
    runtime = case.runtime
    mode = case.integration_mode
    hs, (h_T, c_T) = adapter.forward(a.params, a.xs, a.state, integration_mode=mode, **runtime)
    spec_params = {k: v.astype(np.float64) for k, v in a.params.items()}
    as64 = (lambda v: None if v is None else tuple(s.astype(np.float64) for s in v))  # noqa: E731
    want_hs, (want_h, want_c) = mlstm_spec.forward(spec_params, a.xs.astype(np.float64), as64(a.state),
                                                   integration_mode=mode, **runtime)
    for got, want, what in ((hs, want_hs, "hs"), (h_T, want_h, "h_T"), (c_T, want_c, "c_T")):
        assert got.dtype == a.xs.dtype, what
        assert_close(got, want, bound, what, case)
    grads = adapter.gradients(a.params, a.xs, a.state, a.d_hs, a.d_state, integration_mode=mode, **runtime)
    want = mlstm_spec.backward(spec_params, a.xs.astype(np.float64), as64(a.state), a.d_hs.astype(np.float64),
                               as64(a.d_state), integration_mode=mode, **runtime)
    assert set(grads) == set(want)
    for name in want:
        assert_close(grads[name], want[name], bound, f"d {name}", case)


@pytest.mark.parametrize("configuration", ["fused", "plain", "reverse", "packed"])
@given(case=cases(max_size=19, max_steps=5))
def test_every_path_equals_the_spec_float64(configuration, case):
    """Drawn shapes (H up to 19: past every vector width), options and variants, in float64."""
    check_against_spec(case, ConformanceAdapter(**CONFIGURATIONS[configuration]), TOLERANCES[("float64", "cpu")])


@pytest.mark.parametrize("configuration", ["fused", "plain"])
@given(case=cases(max_size=19, max_steps=5, dtype="float32"))
@example(case=LUCKY_SPEC_CASE)  # failed both paths while the tolerance followed only the spec's own error
def test_every_path_equals_the_spec_float32(configuration, case):
    """float32 against the spec, judged as the conformance suite judges a case: each check's tolerance is
    k times the spec's own float32 rounding error on this very case (tolerances.py; a fixed 1e-3 is too
    tight for a weight scale of 2 under multiplicative integration), and the clip bounds are placed as
    the suite places them (``with_clips``: a value within float32 rounding of a bound may be clipped on
    one side and not the other, which changes a gradient by O(1), not by rounding)."""
    case = with_clips(case, cell=case.cell_clip is not None, proj=case.proj_clip is not None)
    adapter = ConformanceAdapter(**CONFIGURATIONS[configuration])
    try:
        outcomes = evaluate_case(adapter, case, Caller(None), gradients=True)
    except Unrepresentable:
        reject()
    failed = {name: outcome.message for name, outcome in outcomes.items() if outcome.status != "pass"}
    assert not failed, failed


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_on_the_fused_path(variant, mode):
    """Each variant alone and all together, at a case where every clip acts: the fused operator (forced,
    whatever its cost rule says) and the plain path against the spec."""
    case = variant_case(mode, VARIANTS[variant])
    for configuration in ("fused", "python_loops", "plain"):
        check_against_spec(case, ConformanceAdapter(**CONFIGURATIONS[configuration]),
                           TOLERANCES[("float64", "cpu")])


@pytest.mark.parametrize("configuration", ["fused", "python_loops", "plain"])
def test_clip_gradient_passes_at_the_bound(configuration):
    """A cell state exactly at +-cell_clip passes its gradient (the spec's closed interval). With every
    weight and bias zero each gate is 0.5 and z = 0, so c_t = c_{t-1} / 2: from c_0 = (1, 0.2, -1) and
    cell_clip = 0.5, c_1 sits on both bounds, and d c_2 / d c_0 = 1/4 in every entry."""
    params = {name: np.zeros_like(value) for name, value in mlstm_spec.init_params(2, 3, dtype=np.float64).items()}
    xs = np.ones((1, 2, 2))
    state = (np.zeros((1, 3)), np.array([[1.0, 0.2, -1.0]]))
    d_state = (np.zeros((1, 3)), np.ones((1, 3)))
    adapter = ConformanceAdapter(**CONFIGURATIONS[configuration])
    grads = adapter.gradients(params, xs, state, np.zeros((1, 2, 3)), d_state, integration_mode="addition",
                              cell_clip=0.5)
    assert np.array_equal(grads["c0"], np.full((1, 3), 0.25))
    want = mlstm_spec.backward(params, xs, state, np.zeros((1, 2, 3)), d_state, cell_clip=0.5)
    assert np.array_equal(want["c0"], grads["c0"])


def operator_inputs(case):
    """The fused operator's arguments for ``case`` (time-major), every tensor float64 and requiring grad."""
    a = case.arrays()
    tensor = lambda v: torch.tensor(v, dtype=torch.float64, requires_grad=True)  # noqa: E731
    x = tensor(np.swapaxes(a.xs, 0, 1))
    h0, c0 = (tensor(s) for s in a.state) if a.state is not None else (
        tensor(np.zeros((case.batch, case.output_size))), tensor(np.zeros((case.batch, case.hidden_size))))
    params = {name: tensor(value) for name, value in a.params.items()}
    return x, h0, c0, params


@pytest.mark.parametrize("body", ["compiled", "python"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_operator_gradcheck(variant, mode, body, request):
    """torch.autograd.gradcheck of the fused operator's analytic backward (float64 finite differences),
    every input and parameter, in each of its bodies (the C++ loops alone: the Python loops fail if
    they run); the case keeps every clipped value 1e-3 from its bound."""
    if body == "compiled":
        request.getfixturevalue("compiled_only")
    case = variant_case(mode, dict(VARIANTS[variant], with_state=True))
    x, h0, c0, params = operator_inputs(case)
    names = list(params)
    runtime = {k: v for k, v in case.runtime.items() if v not in (None, 0.0)}

    def layer(x, h0, c0, *weights):
        return variants.fused_variant_layer(x, h0, c0, dict(zip(names, weights)), mode != "addition", runtime,
                                            python_loops=body == "python")

    assert torch.autograd.gradcheck(layer, (x, h0, c0, *params.values()), fast_mode=True)


def test_double_backward_through_the_fused_operator():
    """create_graph=True through the fused operator (its backward then runs the plain path): gradgradcheck
    with every variant on, and the second derivative equal to the plain path's."""
    case = variant_case("multiplicative_integration", dict(VARIANTS["all"], with_state=True))
    x, h0, c0, params = operator_inputs(case)
    names = list(params)
    runtime = {k: v for k, v in case.runtime.items() if v not in (None, 0.0)}

    def fused_layer(x, *weights):
        return variants.fused_variant_layer(x, h0, c0, dict(zip(names, weights)), True, runtime)

    # the input and the variants' own weights (the others as constants): a few seconds, not ten
    varied = [name for name in names if name in plain.VARIANT_PARAMS]
    fixed = {name: value.detach() for name, value in params.items() if name not in varied}

    def fused_in_varied(x, *weights):
        return variants.fused_variant_layer(x, h0, c0, dict(fixed, **dict(zip(varied, weights))), True, runtime)

    assert torch.autograd.gradgradcheck(fused_in_varied, (x, *(params[name] for name in varied)), fast_mode=True)
    penalties = []
    for layer in (fused_layer, lambda x, *w: plain.plain_layer(x, h0, c0, dict(zip(names, w)), True, runtime)):
        hs = layer(x, *params.values())[0]
        (d_x,) = torch.autograd.grad(hs.square().sum(), x, create_graph=True)
        penalties.append(torch.autograd.grad(d_x.square().sum(), list(params.values())))
    for name, got, want in zip(names, *penalties):
        assert_close(got.numpy(), want.numpy(), TOLERANCES[("float64", "cpu")], f"d2 {name}")


# ---- the C++ loops (cpu_loops.cpp: variant_layer_forward / variant_layer_backward) ----

@pytest.fixture
def compiled_only(monkeypatch):
    """The operator's C++ loops and nothing else: skipped where they are not compiled, and the Python
    loops fail if they run (so a fallback cannot pass for the C++ loops)."""
    compiled, reason = build.compiled_cpu_loops()
    if not compiled:
        pytest.skip(f"compiled CPU loops not in use: {reason}")

    def refuse(*args, **kwargs):
        raise AssertionError("the Python variant loops ran where the C++ loops should have")

    monkeypatch.setattr(variants, "forward_loop", refuse)
    monkeypatch.setattr(variants, "backward_loop", refuse)


def operator_run(x, h0, c0, params, multiplicative, runtime, d_hs, d_hT, d_cT, python_loops):
    """The operator's hs, h_T, c_T and the gradients of sum(hs d_hs) + sum(h_T d_hT) + sum(c_T d_cT)
    (d_hT, d_cT None: not in the sum) for x, h0, c0 and every parameter, as a dict of arrays."""
    inputs = {"x": x, "h0": h0, "c0": c0, **params}
    hs, h_T, c_T = variants.fused_variant_layer(x, h0, c0, params, multiplicative, runtime,
                                                python_loops=python_loops)
    loss = (hs * d_hs).sum()
    for value, weight in ((h_T, d_hT), (c_T, d_cT)):
        if weight is not None:
            loss = loss + (value * weight).sum()
    grads = torch.autograd.grad(loss, list(inputs.values()))
    result = {"hs": hs, "h_T": h_T, "c_T": c_T}
    result.update({f"d {name}": grad for name, grad in zip(inputs, grads)})
    return {name: value.detach().numpy() for name, value in result.items()}


# the fixture only patches the module for the whole test: nothing to reset between examples
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
@given(case=cases(max_size=40, max_steps=5, batched=True))
def test_compiled_loops_equal_the_spec_float64(compiled_only, case):
    """The C++ loops alone against mlstm_spec in float64, over drawn shapes (H, P, I and B up to 40: past
    every vector width, with and without a tail), options and combinations of the variants: outputs,
    final states and every gradient at the table's float64 tolerance."""
    check_operator_against_spec(case)


def check_operator_against_spec(case):
    """The fused variant operator (its default body: the C++ loops on CPU) on ``case`` against
    mlstm_spec in float64: hs, h_T, c_T and the gradients of x, h0, c0 and every parameter."""
    a = case.arrays()
    x, h0, c0, params = operator_inputs(case)
    state = (h0.detach().numpy(), c0.detach().numpy())
    d_hs = torch.from_numpy(np.swapaxes(a.d_hs, 0, 1).copy())
    d_hT, d_cT = (None, None) if a.d_state is None else (torch.from_numpy(s) for s in a.d_state)
    got = operator_run(x, h0, c0, params, case.integration_mode != "addition", case.runtime, d_hs, d_hT, d_cT,
                       python_loops=False)
    mode, runtime = case.integration_mode, case.runtime
    want_hs, (want_h, want_c) = mlstm_spec.forward(a.params, a.xs, state, integration_mode=mode, **runtime)
    want = {"hs": np.swapaxes(want_hs, 0, 1), "h_T": want_h, "c_T": want_c}
    grads = mlstm_spec.backward(a.params, a.xs, state, a.d_hs, a.d_state, integration_mode=mode, **runtime)
    want.update({f"d {name}": value for name, value in grads.items()})
    want["d x"] = np.swapaxes(want["d x"], 0, 1)
    assert set(got) == set(want)
    for name in want:
        assert_close(got[name], want[name], TOLERANCES[("float64", "cpu")], name, case)


def variant_combinations():
    """Every combination of the variants (a projection excludes independent recurrence; proj_clip needs
    a projection): (projection, peepholes, cell_clip, proj_clip, forget_bias, independent)."""
    for projection, peepholes, cell_clip, proj_clip, forget_bias, independent in itertools.product((False, True),
                                                                                                   repeat=6):
        if (proj_clip and not projection) or (projection and independent):
            continue
        yield projection, peepholes, cell_clip, proj_clip, forget_bias, independent


@pytest.mark.parametrize("mode", MODES)
def test_compiled_loops_equal_the_spec_in_every_combination(compiled_only, mode):
    """Every combination of the variants (the drawn test meets a random few per run), at H = 19 and
    P = 7 (past the float64 vector width, with a tail in each), clips where they act, against the spec."""
    for k, (projection, peepholes, cell_clip, proj_clip, forget_bias, independent) in enumerate(
            variant_combinations()):
        case = Case(batch=3, steps=4, input_size=5, hidden_size=19, integration_mode=mode,
                    independent_recurrence=independent, with_state=True, with_d_state=True, seed=k,
                    proj_size=7 if projection else 0, peepholes=peepholes, cell_clip=0.4 if cell_clip else None,
                    proj_clip=0.3 if proj_clip else None, forget_bias=1.0 if forget_bias else 0.0)
        assert clips_something(case), case
        check_operator_against_spec(case)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_loops_equal_python_loops(compiled_only, monkeypatch, dtype, mode):
    """C++ loops against the operator's Python loops beyond the suite's sizes: a batch split across
    threads (B*H over the per-task grain), widths that are not multiples of the vector width, and an
    inference forward whose input projection runs in chunks of two steps. Clip bounds at the 70th
    percentile of the unclipped values, so that both clips act. float64, every combination of the
    variants, to 1e-12 (the same arithmetic in a different order); float32, each variant alone and
    all together, at the table's tolerance. Those run on the batch of 64 rows that threads share; the
    other combinations on 5 rows (threads on a busy machine cost ~0.1 s a call)."""
    rng = np.random.default_rng(11)
    T, I, H, P = 4, 9, 70, 21
    combinations = list(variant_combinations())
    if dtype == torch.float32:
        combinations = [c for c in combinations if sum(c) <= 1 or c == (True, True, True, True, True, False)]

    def uniform(*shape, scale=1.0):
        return torch.tensor(rng.uniform(-scale, scale, shape), dtype=dtype)

    for projection, peepholes, cell_clip, proj_clip, forget_bias, independent in combinations:
        many = sum((projection, peepholes, cell_clip, proj_clip, forget_bias, independent)) <= 1 or (
            projection and peepholes and cell_clip and proj_clip and forget_bias)
        B = 64 if many else 5
        x = uniform(T, B, I, scale=2.0)
        chunk_bytes = 2 * B * 5 * H * x.element_size()
        out = P if projection else H
        # an initialised layer's scale (variance ~1/fan-in): the comparison measures rounding, not how
        # saturated gates amplify it
        params = dict(weight_ih=uniform(5 * H, I, scale=I ** -0.5), bias_ih=uniform(5 * H, scale=0.5),
                      weight_hh=uniform(H) if independent else uniform(H, out, scale=out ** -0.5),
                      bias_hh=uniform(H, scale=0.5), weight_mh=uniform(4 * H, H, scale=H ** -0.5),
                      bias_mh=uniform(4 * H, scale=0.5))
        if projection:
            params["weight_hr"] = uniform(P, H, scale=H ** -0.5)
        if peepholes:
            params.update(weight_ci=uniform(H), weight_cf=uniform(H), weight_co=uniform(H))
        h0, c0, d_hT, d_cT = uniform(B, out), uniform(B, H), uniform(B, out), uniform(B, H)
        d_hs = uniform(T, B, out)
        runtime = {"forget_bias": 1.0} if forget_bias else {}
        if cell_clip or proj_clip:
            with torch.no_grad():
                hs, _, _, *tape = variants.layer_forward(x, h0, c0, *(params.get(variants._CANONICAL[w]) for w in
                                                                      variants._WEIGHTS),
                                                         mode != "addition", None, None, 0.0, True, False)
            cs = variants.VariantTape(*tape).cs
            if cell_clip:
                runtime["cell_clip"] = float(cs[1:].abs().quantile(0.7))
            if proj_clip:
                runtime["proj_clip"] = float(hs.abs().flatten().quantile(0.7))
        results = []
        for python_loops in (False, True):
            if python_loops:
                monkeypatch.undo()  # the Python loops back (compiled_only refuses them)
            leaves = [t.clone().requires_grad_() for t in (x, h0, c0)]
            weights = {name: value.clone().requires_grad_() for name, value in params.items()}
            result = operator_run(*leaves, weights, mode != "addition", runtime, d_hs, d_hT, d_cT, python_loops)
            monkeypatch.setattr(loops, "PROJECTION_CHUNK_BYTES", chunk_bytes)
            with torch.no_grad():
                result["inference hs"] = variants.fused_variant_layer(x, h0, c0, params, mode != "addition",
                                                                      runtime, python_loops)[0].numpy()
            results.append(result)
        bound = 1e-12 if dtype == torch.float64 else TOLERANCES[("float32", "cpu")]
        combination = dict(projection=projection, peepholes=peepholes, independent=independent, **runtime)
        for name in results[1]:
            assert_close(results[0][name], results[1][name], bound, name, combination)


@pytest.mark.parametrize("python_loops", [False, True])
def test_inference_keeps_no_tape(python_loops):
    """Under no_grad the operator is asked for no tape, and returns none (every VariantTape field
    empty) in each body; with a gradient to come the same call keeps it. The outputs are the same."""
    case = variant_case("multiplicative_integration", dict(VARIANTS["all"], with_state=True))
    x, h0, c0, params = operator_inputs(case)
    calls = []
    original = variants.layer_forward

    def spy(*args):
        result = original(*args)
        calls.append(result)
        return result

    variants.layer_forward, saved = spy, variants.layer_forward
    try:
        with torch.no_grad():
            inference = variants.fused_variant_layer(x, h0, c0, params, True, case.runtime, python_loops)
        training = variants.fused_variant_layer(x, h0, c0, params, True, case.runtime, python_loops)
    finally:
        variants.layer_forward = saved
    inference_tape, training_tape = (variants.VariantTape(*result[3:]) for result in calls)
    assert all(field.numel() == 0 for field in inference_tape), [f.shape for f in inference_tape]
    assert all(field.numel() > 0 for field in training_tape)  # every variant is on: every field is used
    for got, want in zip(inference, training):
        assert torch.equal(got, want.detach())
    with pytest.raises(RuntimeError, match="keep_tape=False on inputs that require grad"):
        variants.layer_forward(x, h0, c0, *(params.get(variants._CANONICAL[w]) for w in variants._WEIGHTS), True,
                               None, None, 0.0, False, python_loops)


@pytest.mark.parametrize("python_loops", [False, True])
@pytest.mark.parametrize("clip", ["cell_clip", "proj_clip"])
def test_values_on_the_clip_bound_pass_their_gradient(clip, python_loops):
    """With the bound set to the largest value the clip acts on (taken from this very body's
    unclipped run, so that value sits exactly on it), nothing is clipped: the spec's closed interval
    passes the gradient (factor 1) there, so outputs and every gradient equal those without the clip."""
    case = Case(batch=2, steps=4, input_size=3, hidden_size=5, proj_size=2, peepholes=True, with_state=True,
                integration_mode="addition", seed=0)
    x, h0, c0, params = operator_inputs(case)
    weights = [params.get(variants._CANONICAL[w]) for w in variants._WEIGHTS]
    with torch.no_grad():
        hs, _, _, *tape = variants.layer_forward(x, h0, c0, *weights, False, None, None, 0.0, True, python_loops)
    values = variants.VariantTape(*tape).cs[1:] if clip == "cell_clip" else hs
    bound = float(values.abs().max())
    rng = np.random.default_rng(0)
    d_hs = torch.tensor(rng.standard_normal(hs.shape))
    d_hT, d_cT = torch.tensor(rng.standard_normal(h0.shape)), torch.tensor(rng.standard_normal(c0.shape))
    on_bound, unclipped = (operator_run(x, h0, c0, params, False, runtime, d_hs, d_hT, d_cT, python_loops)
                           for runtime in ({clip: bound}, {}))
    for name in unclipped:
        assert np.array_equal(on_bound[name], unclipped[name]), name


@pytest.mark.parametrize("python_loops", [False, True])
def test_variant_operators_pass_opcheck(python_loops):
    """torch.library.opcheck of both variant operators in each body (every variant on, multiplicative
    integration): schema, fake kernels (the tape's shapes, empty without keep_tape), autograd
    registration, no output aliasing an input or another output (the C++ loops' scratch)."""
    case = variant_case("multiplicative_integration", dict(VARIANTS["all"], with_state=True))
    x, h0, c0, params = operator_inputs(case)
    weights = [params.get(variants._CANONICAL[w]) for w in variants._WEIGHTS]
    options = (True, case.cell_clip, case.proj_clip, case.forget_bias)
    for keep_tape in (False, True):
        args = (x, h0, c0, *weights, *options, keep_tape, python_loops)
        if not keep_tape:
            args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(variants.layer_forward, args)
    detached = [t.detach() for t in (x, h0, c0, *weights)]
    with torch.no_grad():
        outputs = variants.layer_forward(*detached, *options, True, python_loops)
    d_hs = torch.randn(outputs[0].shape, dtype=torch.float64)
    x, h0, _, w_ih, w_hh, w_mh, _, _, _, w_hr, w_ci, w_cf, w_co = detached
    torch.library.opcheck(variants.layer_backward, (d_hs, None, torch.randn(c0.shape, dtype=torch.float64), x, h0,
                                                    w_ih, w_hh, w_mh, w_hr, w_ci, w_cf, w_co, True, True, True,
                                                    True, case.cell_clip, case.proj_clip, True, python_loops,
                                                    outputs[0], *outputs[3:]))


@pytest.mark.parametrize("cpu_loops", ["compiled", "python"])
def test_layer_cpu_loops_option_chooses_the_body(cpu_loops, monkeypatch):
    """MLSTM(cpu_loops=...) with variants: "compiled" runs the C++ loops (the Python loops are never
    called, forward or backward), "python" the Python loops (both called)."""
    compiled, reason = build.compiled_cpu_loops()
    if not compiled:
        pytest.skip(f"compiled CPU loops not in use: {reason}")
    ran = []
    for name in ("forward_loop", "backward_loop"):
        original = getattr(variants, name)
        monkeypatch.setattr(variants, name, lambda *a, _f=original, _n=name, **k: ran.append(_n) or _f(*a, **k))
    torch.manual_seed(0)
    model = bt.MLSTM(3, 6, proj_size=2, peepholes=True, cell_clip=0.5, forget_bias=1.0, cpu_loops=cpu_loops)
    x = torch.randn(8, 4, 3, requires_grad=True)  # 8 steps of 4 rows: the fused path (not plain's one step)
    model(x)[0].sum().backward()
    assert ran == ([] if cpu_loops == "compiled" else ["forward_loop", "backward_loop"])


def test_half_dtypes_run_the_python_loops():
    """bfloat16 is not a type of the C++ loops: the CPU kernel hands it to the Python loops (the
    same values as python_loops=True), rather than failing."""
    case = variant_case("addition", dict(VARIANTS["all"], with_state=True))
    x, h0, c0, params = operator_inputs(case)
    x, h0, c0 = (t.detach().bfloat16() for t in (x, h0, c0))
    params = {name: value.detach().bfloat16() for name, value in params.items()}
    with torch.no_grad():
        got, want = (variants.fused_variant_layer(x, h0, c0, params, False, case.runtime, python_loops)
                     for python_loops in (False, True))
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16 and torch.equal(g, w)


# ---- the variant-free layer is unchanged ----

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cpu_loops", ["compiled", "python"])
def test_variant_free_layer_runs_the_operators_of_before_bit_for_bit(cpu_loops, mode):
    """A layer without variants (also one given the run-time options at their defaults) gives bit for bit
    what the variant-free operator (fused.fused_layer, which the variants left alone) and the plain
    path give, forward and backward."""
    torch.manual_seed(0)
    model = bt.MLSTM(5, 19, 2, integration_mode=mode, cpu_loops=cpu_loops)
    explicit = bt.MLSTM.from_canonical(model.to_canonical(), integration_mode=mode, cpu_loops=cpu_loops,
                                       cell_clip=None, proj_clip=None, forget_bias=0.0)
    x = torch.randn(7, 3, 5, requires_grad=True)
    for layer in (model, explicit):
        out, (h_n, c_n) = layer(x)
        (d_x,) = torch.autograd.grad(out.sum() + h_n.sum() + c_n.sum(), x)
        h, c, grads = [], [], []
        layer_input = x
        for k in range(2):
            params = layer.layer_parameters(k)
            zeros = torch.zeros(3, 19)
            hs, h_T, c_T = fused.fused_layer(layer_input, zeros, zeros, params, mode != "addition",
                                             cpu_loops == "python")
            h.append(h_T)
            c.append(c_T)
            layer_input = hs
        (want_d_x,) = torch.autograd.grad(layer_input.sum() + sum(h).sum() + sum(c).sum(), x)
        assert torch.equal(out, layer_input) and torch.equal(h_n, torch.stack(h)) and torch.equal(c_n, torch.stack(c))
        assert torch.equal(d_x, want_d_x)
    plain_model = bt.MLSTM.from_canonical(model.to_canonical(), integration_mode=mode, fused=False)
    params = plain_model.layer_parameters(0)
    zeros = torch.zeros(3, 19)
    single = bt.MLSTM.from_canonical(model.to_canonical()[:1], integration_mode=mode, fused=False)
    assert torch.equal(single(x)[0], plain.plain_layer(x, zeros, zeros, params, mode != "addition")[0])


def test_variant_free_cell_unchanged():
    """MLSTMCell without variants is the step of plain.plain_step, bit for bit."""
    torch.manual_seed(0)
    cell = bt.MLSTMCell(4, 6)
    x, h, c = torch.randn(3, 4), torch.randn(3, 6), torch.randn(3, 6)
    p = torch.nn.functional.linear(x, cell.weight_ih, cell.bias_ih)
    want = plain.plain_step(p, h, c, cell.weight_hh, cell.weight_mh, cell.bias_hh, cell.bias_mh, False)
    for got, expected in zip(cell(x, (h, c)), want):
        assert torch.equal(got, expected)


# ---- the layers' interface ----

@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN:UserWarning")
def test_projection_has_nn_lstm_names_and_shapes():
    """proj_size as nn.LSTM's: parameter names weight_hr_l{k}(_reverse) of shape (P, H), output
    (L, N, D*P), h_n (num_layers*D, N, P), c_n (num_layers*D, N, H), the next layer's input D*P."""
    args = (6, 8, 2)
    kwargs = dict(bidirectional=True, proj_size=3)
    model, lstm = bt.MLSTM(*args, **kwargs), nn.LSTM(*args, **kwargs)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    lstm_shapes = {name: tuple(p.shape) for name, p in lstm.named_parameters()}
    for name in ("weight_hr_l0", "weight_hr_l0_reverse", "weight_hr_l1", "weight_hr_l1_reverse"):
        assert shapes[name] == lstm_shapes[name] == (3, 8)
    assert shapes["weight_ih_l1"] == (5 * 8, 2 * 3)
    assert shapes["weight_hh_l0"] == (8, 3)
    x = torch.randn(5, 2, 6)
    out, (h_n, c_n) = model(x)
    want_out, (want_h, want_c) = lstm(x)
    assert out.shape == want_out.shape == (5, 2, 6)
    assert h_n.shape == want_h.shape == (4, 2, 3)
    assert c_n.shape == want_c.shape == (4, 2, 8)
    assert "proj_size=3" in repr(model)
    again = bt.MLSTM.from_canonical(model.to_canonical(), bidirectional=True)  # layer 1 reads 2P inputs
    assert again.proj_size == 3 and torch.equal(again(x)[0], out)


def test_peephole_parameters_and_repr():
    """Peephole weights are named weight_ci_l{k}, weight_cf_l{k}, weight_co_l{k} (H,); the run-time
    options are read-only attributes (they are part of what a weight file records)."""
    model = bt.MLSTM(3, 4, 2, peepholes=True, cell_clip=2.0, forget_bias=1.0)
    names = {name for name, _ in model.named_parameters()}
    assert {f"weight_c{g}_l{k}" for g in "ifo" for k in range(2)} <= names
    assert model.weight_ci_l1.shape == (4,)
    assert model.cell_clip == 2.0 and model.proj_clip is None and model.forget_bias == 1.0
    assert "peepholes=True, cell_clip=2.0, forget_bias=1.0" in repr(model)
    with pytest.raises(AttributeError):
        model.cell_clip = 3.0


@pytest.mark.parametrize("cls", [bt.MLSTM, bt.MLSTMCell])
@pytest.mark.parametrize("options, error, message", [
    (dict(cell_clip=-1.0), ValueError, "cell_clip must be None or a finite number > 0, got -1.0"),
    (dict(cell_clip=math.inf), ValueError, "cell_clip must be None or a finite number > 0, got inf"),
    (dict(cell_clip="1"), TypeError, "cell_clip must be None or a finite number > 0, got str '1'"),
    (dict(forget_bias=math.nan), ValueError, "forget_bias must be a finite number, got nan"),
    (dict(proj_clip=1.0), ValueError, "proj_clip=1.0 clips the projected output, which needs a projection"),
    (dict(proj_size=4), ValueError, r"proj_size must be 0 \(no projection\) or in 1..hidden_size-1 = 1..3"),
    (dict(proj_size=2.0), TypeError, "proj_size must be an int"),
    (dict(proj_size=2, independent_recurrence=True), ValueError, "cannot be combined with independent_recurrence"),
    (dict(peepholes="yes"), TypeError, "peepholes must be a bool, got str 'yes'"),
    (dict(unit_forget_bias=True, bias=False), ValueError, "unit_forget_bias=True sets the forget block"),
])
def test_bad_variant_options_are_named(cls, options, error, message):
    with pytest.raises(error, match=message):
        cls(3, 4, **options)


@pytest.mark.parametrize("options, value", [(dict(unit_forget_bias=True), 1.0), (dict(forget_bias_init=3.0), 3.0)])
def test_forget_bias_initialisers(options, value):
    """unit_forget_bias / forget_bias_init set the forget block (the fourth of m, i, o, f, z) of every
    bias_ih and nothing else."""
    model = bt.MLSTM(3, 4, 2, bidirectional=True, **options)
    for k in range(4):
        blocks = model.layer_parameters(k)["bias_ih"].detach().view(5, 4)
        assert torch.equal(blocks[3], torch.full((4,), value))
        assert not blocks[[0, 1, 2, 4]].any()


def test_cell_with_variants_equals_the_spec():
    """MLSTMCell with every variant against mlstm_spec.cell, batched and unbatched, state given or not."""
    for mode in MODES:
        case = variant_case(mode, VARIANTS["all"])
        a = case.arrays()
        cell = bt.MLSTMCell.from_canonical(a.params, integration_mode=mode, **{
            k: v for k, v in case.runtime.items() if v not in (None, 0.0)})
        assert cell.proj_size == 2 and cell.peepholes
        x = a.xs[:, 0]
        for xs, state in ((x, None), (x, (a.state[0], a.state[1])), (x[0], (a.state[0][0], a.state[1][0]))):
            want_h, (_, want_c) = mlstm_spec.cell(a.params, xs, state, integration_mode=mode, **case.runtime)
            hx = None if state is None else tuple(torch.from_numpy(s) for s in state)
            h, c = cell(torch.from_numpy(xs), hx)
            assert_close(h.detach().numpy(), want_h, TOLERANCES[("float64", "cpu")], "h")
            assert_close(c.detach().numpy(), want_c, TOLERANCES[("float64", "cpu")], "c")


def test_save_load_round_trip_of_a_projected_peepholed_stack(tmp_path):
    """mlstm_spec.save / load (format 2) and from_canonical give back the same parameters bit for bit,
    the run-time options, and the same outputs."""
    torch.manual_seed(0)
    model = bt.MLSTM(3, 5, 2, proj_size=2, peepholes=True, cell_clip=1.5, proj_clip=0.7, forget_bias=0.5,
                     integration_mode="multiplicative_integration", dtype=torch.float64)
    path = mlstm_spec.save(tmp_path / "model.safetensors", model, cell_clip=model.cell_clip,
                           proj_clip=model.proj_clip, forget_bias=model.forget_bias)
    loaded = bt.MLSTM.from_canonical(mlstm_spec.load(path))
    assert (loaded.proj_size, loaded.peepholes, loaded.cell_clip, loaded.proj_clip, loaded.forget_bias,
            loaded.integration_mode) == (2, True, 1.5, 0.7, 0.5, "multiplicative_integration")
    for got, want in zip(loaded.to_canonical(), model.to_canonical()):
        assert got.keys() == want.keys()
        assert all(got[k].tobytes() == want[k].tobytes() for k in want)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    assert torch.equal(loaded(x)[0], model(x)[0])


def test_onnx_scan_path_takes_the_variants():
    """The scan that ONNX export runs (plain steps in one scan) computes the variants as the plain path."""
    pytest.importorskip("torch._higher_order_ops.scan", reason="this torch has no scan operator")
    case = variant_case("addition", VARIANTS["all"])
    x, h0, c0, params = operator_inputs(case)
    runtime = {k: v for k, v in case.runtime.items() if v not in (None, 0.0)}
    with torch.no_grad():
        got = plain.scan_layer(x, h0, c0, params, False, runtime)
        want = plain.plain_layer(x, h0, c0, params, False, runtime)
    for g, w in zip(got, want):
        assert_close(g.numpy(), w.numpy(), TOLERANCES[("float64", "cpu")], "scan")


@pytest.mark.slow  # the exporter itself takes ~20 s
@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch's own exporter internals
def test_onnx_export_with_variants_runs_in_onnxruntime(tmp_path):
    """A bidirectional layer with a projection, peepholes and both clips, exported with a symbolic
    sequence length: onnxruntime's results equal the layer's at another length."""
    for module in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(module, reason=f"{module} is not installed (pip install 'mlstm-spec[test]')")
    import onnxruntime

    from mlstm_spec.conformance import relative_error

    torch.manual_seed(0)
    model = bt.MLSTM(3, 5, bidirectional=True, proj_size=2, peepholes=True, cell_clip=0.5, proj_clip=0.2,
                     forget_bias=1.0).eval()
    path = tmp_path / "mlstm.onnx"
    steps = torch.export.Dim("steps", min=1, max=4096)
    torch.onnx.export(model, (torch.randn(5, 2, 3),), str(path), dynamic_shapes=({0: steps},),
                      input_names=["input"], output_names=["output", "h_n", "c_n"])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(8, 2, 3)
    got = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        want = model(x)
    for value, expected in zip(got, (want[0], *want[1])):
        assert value.shape == expected.shape
        assert relative_error(value, expected.numpy())[0] <= 1e-5  # float32, as the variant-free export test


def test_projected_stack_chains_the_spec_layers():
    """Two projected, peepholed layers with clips: the output is the spec's layers chained (layer 1 reads
    layer 0's P-wide outputs), and the fused and plain paths give the same gradients."""
    rng = np.random.default_rng(3)
    options = dict(proj_size=2, peepholes=True, dtype=np.float64)
    layers = [mlstm_spec.init_params(3, 5, rng=rng, **options), mlstm_spec.init_params(2, 5, rng=rng, **options)]
    layers = [{name: 3 * value for name, value in params.items()} for params in layers]  # so that the clips act
    runtime = dict(cell_clip=1.0, proj_clip=0.8, forget_bias=0.5)
    xs = rng.standard_normal((2, 6, 3))
    for clip in ("cell_clip", "proj_clip"):  # each clip changes each layer's outputs
        inputs = xs
        for params in layers:
            with_clip, without = (mlstm_spec.forward(params, inputs, None, **dict(runtime, **off))[0]
                                  for off in ({}, {clip: None}))
            assert not np.allclose(with_clip, without)
            inputs = with_clip
    hs, states = ConformanceAdapter().forward(layers, xs, None, integration_mode="addition", **runtime)
    want = xs
    for k, params in enumerate(layers):
        want, (want_h, want_c) = mlstm_spec.forward(params, want, None, **runtime)
        assert_close(states[k][0], want_h, TOLERANCES[("float64", "cpu")], f"h_n[{k}]")
        assert_close(states[k][1], want_c, TOLERANCES[("float64", "cpu")], f"c_n[{k}]")
    assert_close(hs, want, TOLERANCES[("float64", "cpu")], "hs")
    d_hs = rng.standard_normal(hs.shape)
    fused_grads, plain_grads = (adapter.gradients(layers, xs, None, d_hs, None, integration_mode="addition",
                                                  **runtime)
                                for adapter in (ConformanceAdapter(), ConformanceAdapter(fused=False)))
    for k in range(2):
        for name in plain_grads[k]:
            assert_close(fused_grads[k][name], plain_grads[k][name], TOLERANCES[("float64", "cpu")], f"d {name}")
