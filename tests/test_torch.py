"""The PyTorch backend: the shared conformance suite on both recurrence paths, plus what is specific to
torch (nn.LSTM's conventions, the LSTM reduction against torch.nn.LSTM itself, torch.compile, autocast,
torch.func, dropout, initialiser, converters, and the errors bad input gets)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import traceback
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from helpers import (assert_gpu_present, conformance_params, device_params, random_params, require_backend,
                     run_conformance)
from hypothesis import given, settings
from hypothesis import strategies as st

bt = require_backend("torch")

import torch  # noqa: E402

from backends.torch import build, fused, loops  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import mlstm_spec  # noqa: E402
from mlstm_spec.conformance import relative_error, tolerance  # noqa: E402
from mlstm_spec.equations import IH_BLOCKS, MH_BLOCKS  # noqa: E402
from mlstm_spec.params import block  # noqa: E402

MODES = ("addition", "multiplicative_integration")


def random_stack(rng, input_size, hidden_size, num_layers, **options):
    sizes = [input_size] + [hidden_size] * (num_layers - 1)
    return [random_params(rng, size, hidden_size, **options) for size in sizes]


def numpy(tensor):
    return tensor.detach().cpu().numpy()


def assert_float64_close(got, want, bound=1e-10):
    """float64 agreement by the suite's norm-wise relative error, held to the issue's float64 target
    (1e-10): far above float64 rounding amplified by the recurrence (~1e-13 at these sizes), far below
    any wrong term (~1e-2) or a float32 computation (~1e-7)."""
    __tracebackhide__ = True
    got = numpy(got) if isinstance(got, torch.Tensor) else got
    want = numpy(want) if isinstance(want, torch.Tensor) else want
    assert got.shape == want.shape, (got.shape, want.shape)
    error, where = relative_error(got, want)
    assert error <= bound, f"relative error {error:.2e} at {where} > {bound:.0e}"


def spec_chain(layers, xs, states, mode):
    """mlstm_spec.forward chained over the layers: xs (B, T, I), states a list of (h, c) or None."""
    out, finals = xs, []
    for layer, params in enumerate(layers):
        out, final = mlstm_spec.forward(params, out, None if states is None else states[layer],
                                        integration_mode=mode)
        finals.append(final)
    return out, finals


options_strategy = st.fixed_dictionaries({
    "bias": st.booleans(), "recurrent_bias": st.booleans(), "multiplicative_bias": st.booleans(),
    "independent_recurrence": st.booleans(),
})


# ---- the shared conformance suite ----

@pytest.mark.parametrize(("device", "dtype"), conformance_params(bt))
def test_conformance(device, dtype):
    """The fused path (the default) against mlstm_spec: outputs, final states and every gradient."""
    run_conformance(bt.ConformanceAdapter, device, dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_conformance_plain_path(dtype):
    """The plain autograd path (used under torch.func and with fused=False) against mlstm_spec too."""
    run_conformance(lambda device: bt.ConformanceAdapter(device, fused=False), "cpu", dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_conformance_python_loops(dtype):
    """The fused layer's Python loops (what runs on GPUs, and on CPUs where the C++ loops cannot be
    compiled) against mlstm_spec too."""
    run_conformance(lambda device: bt.ConformanceAdapter(device, python_loops=True), "cpu", dtype)


# ---- the compiled CPU loops ----

class CountingLoops:
    """The compiled CPU loops, counting the calls of each function."""

    def __init__(self, module):
        self.module, self.calls = module, {"layer_forward": 0, "layer_backward": 0}

    def __getattr__(self, name):
        function = getattr(self.module, name)

        def counted(*args):
            self.calls[name] += 1
            return function(*args)

        return counted


def test_compiled_cpu_loops_in_use(monkeypatch):
    """On CPU the fused layer runs backends/torch/cpu_loops.cpp, forward and backward, and not with
    cpu_loops="python". In CI (which has a compiler) failing to build it is an error; elsewhere it is
    reported as skipped, with the build error."""
    compiled, reason = bt.compiled_cpu_loops()
    if not compiled:
        if os.environ.get("CI"):
            pytest.fail(f"the compiled CPU loops are not in use: {reason}")
        pytest.skip(f"compiled CPU loops not in use: {reason}")
    counting = CountingLoops(build.cpu_loops())
    monkeypatch.setattr(build, "cpu_loops", lambda: counting)
    x = torch.randn(5, 2, 3, requires_grad=True)
    bt.MLSTM(3, 4)(x)[0].sum().backward()
    assert counting.calls == {"layer_forward": 1, "layer_backward": 1}
    bt.MLSTM(3, 4, cpu_loops="python")(x)[0].sum().backward()
    assert counting.calls == {"layer_forward": 1, "layer_backward": 1}


def test_compiled_loops_after_a_call_under_inference_mode():
    """The C++ loops keep scratch between calls; a first call under torch.inference_mode() must not
    turn it into an inference tensor that a later training call cannot write to. A fresh process, so
    that this call is the one that allocates the scratch."""
    if not bt.compiled_cpu_loops()[0]:
        pytest.skip(f"compiled CPU loops not in use: {bt.compiled_cpu_loops()[1]}")
    script = (
        "import torch\n"
        "from backends.torch import MLSTM\n"
        "torch.manual_seed(0)\n"
        "layer = MLSTM(6, 16)\n"
        "x = torch.randn(20, 4, 6)\n"
        "with torch.inference_mode():\n"
        "    first = layer(x)[0].clone()\n"
        "again = layer(x.requires_grad_())[0]\n"
        "again.sum().backward()\n"
        "assert torch.equal(first, again.detach()), (first - again).abs().max()\n"
        "assert x.grad is not None and torch.isfinite(x.grad).all()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_cpu_loops_setting(monkeypatch):
    monkeypatch.setenv(bt.CPU_LOOPS_VARIABLE, "python")
    assert build.build() == {"module": None, "warn": False, "reason": "MLSTM_TORCH_CPU_LOOPS=python"}
    monkeypatch.setenv(bt.CPU_LOOPS_VARIABLE, "fast")
    state = build.build()
    assert state["module"] is None and state["warn"]
    assert "must be 'compiled' or 'python', got 'fast'" in state["reason"]
    with pytest.raises(ValueError, match=r"cpu_loops must be one of \('compiled', 'python'\), got 'c'"):
        bt.MLSTM(3, 4, cpu_loops="c")


def test_building_the_cpu_loops_changes_no_environment_variable(monkeypatch, tmp_path):
    """The C++ build runs in a child process whose own environment gets ninja's directory (the pip
    package's, when no ninja is on PATH); this process's environment is left alone. (The child is
    faked here: it records its environment and fails.)"""
    monkeypatch.delenv(bt.CPU_LOOPS_VARIABLE, raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # an empty cache: the build must run
    monkeypatch.setattr(build.shutil, "which", lambda name: None)  # as where no ninja is on PATH
    children = []

    def child(command, env, **options):
        children.append(env)
        return subprocess.CompletedProcess(command, 1, "", "error: no compiler here (fake)")

    monkeypatch.setattr(build.subprocess, "run", child)
    before = dict(os.environ)
    state = build.build()
    assert dict(os.environ) == before
    assert state["module"] is None and "no compiler here (fake)" in state["reason"]
    (env,) = children
    ninja = pytest.importorskip("ninja")
    assert env["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("independent", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_loops_equal_python_loops(mode, independent, dtype):
    """Beyond the suite's sizes: a batch split across threads (B*H over the per-task grain), a width
    that is not a multiple of the vector width, the projection in several chunks, and the tape."""
    compiled, reason = bt.compiled_cpu_loops()
    if not compiled:
        pytest.skip(f"compiled CPU loops not in use: {reason}")
    rng = np.random.default_rng(7)
    steps, batch, hidden = 6, 20, 300
    # weights of an initialised layer's scale (uniform with variance ~1/fan-in), so that the comparison
    # measures rounding, not the sensitivity of saturated gates to it
    layers = random_stack(rng, 9, hidden, 2, scale=3 ** 0.5 / hidden ** 0.5, independent_recurrence=independent)
    model = bt.MLSTM.from_canonical(layers, integration_mode=mode, dtype=dtype)
    x = torch.tensor(rng.standard_normal((steps, batch, 9)), dtype=dtype)
    weight = torch.tensor(rng.standard_normal((steps, batch, hidden)), dtype=dtype)
    chunk_bytes = 2 * batch * 5 * hidden * x.element_size()  # two steps per chunk
    results = []
    for cpu_loops in ("compiled", "python"):
        model.cpu_loops = cpu_loops
        with mock.patch.object(loops, "PROJECTION_CHUNK_BYTES", chunk_bytes):
            inputs = x.clone().requires_grad_(True)
            out, (h_n, c_n) = model(inputs)
            grads = torch.autograd.grad((out * weight).sum() + c_n.sum(), [inputs, *model.parameters()])
            with torch.no_grad():
                inference = model(x)[0]
        results.append([out, h_n, c_n, inference, *grads])
    bound = tolerance(str(dtype).removeprefix("torch."))
    for got, want in zip(*results):
        error, where = relative_error(numpy(got), numpy(want))
        assert error <= bound, (error, where)


# ---- the fused path against the plain one, beyond the suite's small sizes ----

@settings(max_examples=15)
@given(options=options_strategy, mode=st.sampled_from(MODES), num_layers=st.integers(1, 2),
       batch=st.integers(1, 6), steps=st.integers(1, 24), hidden=st.integers(1, 24),
       chunk_steps=st.sampled_from([1, 2, 5, None]), seed=st.integers(0, 2**31 - 1))
def test_fused_equals_plain(options, mode, num_layers, batch, steps, hidden, chunk_steps, seed):
    """Outputs, final states and all gradients agree in float64 (the same arithmetic in a different
    order), in training and in inference, also when the input projection is computed in chunks of a
    few steps (``chunk_steps``; None: the default chunk, which holds every step at these sizes)."""
    chunk_bytes = loops.PROJECTION_CHUNK_BYTES if chunk_steps is None else chunk_steps * batch * 5 * hidden * 8
    with mock.patch.object(loops, "PROJECTION_CHUNK_BYTES", chunk_bytes):
        _check_fused_equals_plain(options, mode, num_layers, batch, steps, hidden, seed)


def _check_fused_equals_plain(options, mode, num_layers, batch, steps, hidden, seed):
    rng = np.random.default_rng(seed)
    # Weights of an initialised layer's scale. Unscaled uniform(-1, 1) weights let gradients explode
    # (to ~1e6 at hidden=24, 16 steps): any two float64 implementations then differ by ~1e-10 of
    # them, the spec included, and the comparison measures that conditioning, not the code.
    layers = random_stack(rng, 7, hidden, num_layers, scale=3 ** 0.5 / max(hidden, 7) ** 0.5, **options)
    fused = bt.MLSTM.from_canonical(layers, integration_mode=mode)
    plain = bt.MLSTM.from_canonical(layers, integration_mode=mode, fused=False)
    x = torch.tensor(rng.standard_normal((steps, batch, 7)))
    h0 = torch.tensor(rng.uniform(-1, 1, (num_layers, batch, hidden)))
    c0 = torch.tensor(rng.standard_normal((num_layers, batch, hidden)))
    weights = [torch.tensor(rng.standard_normal(shape)) for shape in
               [(steps, batch, hidden), (num_layers, batch, hidden), (num_layers, batch, hidden)]]
    results = []
    for model in (fused, plain):
        inputs = [t.clone().requires_grad_(True) for t in (x, h0, c0)]
        out, (h_n, c_n) = model(inputs[0], (inputs[1], inputs[2]))
        loss = sum((a * w).sum() for a, w in zip((out, h_n, c_n), weights))
        grads = torch.autograd.grad(loss, inputs + list(model.parameters()))
        with torch.no_grad():
            inference = model(x, (h0, c0))
        results.append([out, h_n, c_n, *grads, inference[0], *inference[1]])
    for got, want in zip(*results):
        assert_float64_close(got, want)


def test_fused_gradcheck_against_finite_differences():
    """torch.autograd.gradcheck: the analytic backward against central finite differences (float64),
    for the input, both initial states and every parameter, in both integration modes."""
    rng = np.random.default_rng(0)
    for mode, independent in [("addition", False), ("multiplicative_integration", True)]:
        params = random_params(rng, 3, 2, independent_recurrence=independent)
        model = bt.MLSTM.from_canonical(params, integration_mode=mode)
        names = list(model.layer_parameters(0))
        x = torch.tensor(rng.standard_normal((4, 2, 3)), requires_grad=True)
        h0 = torch.tensor(rng.uniform(-1, 1, (1, 2, 2)), requires_grad=True)
        c0 = torch.tensor(rng.standard_normal((1, 2, 2)), requires_grad=True)
        weights = [p.detach().clone().requires_grad_(True) for p in model.layer_parameters(0).values()]

        def run(x, h0, c0, *weights):
            out, (h_n, c_n) = torch.func.functional_call(
                model, {f"{n}_l0": w for n, w in zip(names, weights)}, (x, (h0, c0)))
            return out, h_n, c_n

        # functional_call keeps the fused path (no functorch transform is active)
        assert torch.autograd.gradcheck(run, (x, h0, c0, *weights))


def test_second_derivatives_through_the_default_layer():
    """Double backward works on the default (fused) layer: gradgradcheck against finite differences of
    the first derivative, for the input, both states and every parameter; the fused layer's gradient
    penalty (a second derivative) equals the plain path's. A first derivative without create_graph
    still runs the analytic backward operator."""
    rng = np.random.default_rng(1)
    params = random_params(rng, 2, 2, independent_recurrence=True)
    model = bt.MLSTM.from_canonical(params, integration_mode="multiplicative_integration")
    names = list(model.layer_parameters(0))
    x = torch.tensor(rng.standard_normal((3, 2, 2)), requires_grad=True)
    h0, c0 = (torch.tensor(rng.uniform(-1, 1, (1, 2, 2)), requires_grad=True) for _ in range(2))
    weights = [p.detach().clone().requires_grad_(True) for p in model.layer_parameters(0).values()]

    def run(x, h0, c0, *weights):
        out, (h_n, c_n) = torch.func.functional_call(
            model, {f"{n}_l0": w for n, w in zip(names, weights)}, (x, (h0, c0)))
        return out, c_n

    assert torch.autograd.gradgradcheck(run, (x, h0, c0, *weights))
    penalties = []
    for use_fused in (True, False):
        layer = bt.MLSTM.from_canonical(params, integration_mode="multiplicative_integration", fused=use_fused)
        (g,) = torch.autograd.grad(layer(x)[0].pow(2).sum(), x, create_graph=True)
        penalties.append(torch.autograd.grad(g.pow(2).sum(), [x, *layer.parameters()]))
    for got, want in zip(*penalties):
        assert_float64_close(got, want)
    calls = []
    with mock.patch.object(fused, "_differentiable_backward", side_effect=lambda *a: calls.append(a)):
        model(x)[0].sum().backward()
    assert not calls


# ---- nn.LSTM's conventions ----

@pytest.mark.parametrize("fused", [True, False])
def test_batch_first_both_ways(fused):
    rng = np.random.default_rng(2)
    layers = random_stack(rng, 3, 4, 2)
    time_major = bt.MLSTM.from_canonical(layers, fused=fused)
    batch_major = bt.MLSTM.from_canonical(layers, batch_first=True, fused=fused)
    x = torch.tensor(rng.standard_normal((5, 3, 3)))  # (T, B, I)
    state = tuple(torch.tensor(rng.standard_normal((2, 3, 4))) for _ in range(2))
    out_t, (h_t, c_t) = time_major(x, state)
    out_b, (h_b, c_b) = batch_major(x.transpose(0, 1), state)
    assert out_t.shape == (5, 3, 4) and out_b.shape == (3, 5, 4)
    assert h_b.shape == c_b.shape == (2, 3, 4)  # states are (num_layers, N, H) either way
    assert torch.equal(out_b, out_t.transpose(0, 1))
    assert torch.equal(h_b, h_t) and torch.equal(c_b, c_t)
    # and against the spec, which is batch-major
    want, finals = spec_chain(layers, numpy(x.transpose(0, 1)),
                              [(numpy(state[0][k]), numpy(state[1][k])) for k in range(2)], "addition")
    assert_float64_close(out_b, want)
    assert_float64_close(h_b[1], finals[1][0])


@pytest.mark.parametrize("fused", [True, False])
def test_unbatched_equals_batch_of_one(fused):
    rng = np.random.default_rng(3)
    model = bt.MLSTM.from_canonical(random_stack(rng, 3, 4, 2), fused=fused)
    x = torch.tensor(rng.standard_normal((6, 3)))  # (L, H_in)
    h0, c0 = (torch.tensor(rng.standard_normal((2, 4))) for _ in range(2))  # (D, H_out)
    out, (h_n, c_n) = model(x, (h0, c0))
    assert out.shape == (6, 4) and h_n.shape == c_n.shape == (2, 4)
    out1, (h1, c1) = model(x.unsqueeze(1), (h0.unsqueeze(1), c0.unsqueeze(1)))
    assert torch.equal(out, out1[:, 0]) and torch.equal(h_n, h1[:, 0]) and torch.equal(c_n, c1[:, 0])
    out0, _ = model(x)  # no state: zeros
    out_z, _ = model(x, (torch.zeros_like(h0), torch.zeros_like(c0)))
    assert torch.equal(out0, out_z)


def test_stack_equals_chained_spec_layers():
    rng = np.random.default_rng(4)
    for mode in MODES:
        layers = random_stack(rng, 5, 3, 3, independent_recurrence=True, bias=False)
        model = bt.MLSTM.from_canonical(layers, integration_mode=mode, batch_first=True)
        assert model.num_layers == 3
        xs = rng.standard_normal((2, 4, 5))
        states = [(rng.uniform(-1, 1, (2, 3)), rng.standard_normal((2, 3))) for _ in range(3)]
        out, (h_n, c_n) = model(torch.tensor(xs), tuple(torch.tensor(np.stack(s)) for s in zip(*states)))
        want, finals = spec_chain(layers, xs, states, mode)
        assert_float64_close(out, want)
        for k in range(3):
            assert_float64_close(h_n[k], finals[k][0])
            assert_float64_close(c_n[k], finals[k][1])


def test_dropout_only_between_layers_and_only_in_training():
    torch.manual_seed(0)
    model = bt.MLSTM(3, 8, num_layers=2, dropout=0.5, dtype=torch.float64)
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    model.eval()
    eval_out, (eval_h, _) = model(x)
    assert torch.equal(model(x)[0], eval_out)  # deterministic in eval mode
    no_dropout = bt.MLSTM.from_canonical(model.to_canonical(), dropout=0.0)
    assert torch.equal(no_dropout(x)[0], eval_out)
    model.train()
    torch.manual_seed(1)
    train_out, (train_h, _) = model(x)
    assert not torch.allclose(train_out, eval_out)  # dropout acts in training
    assert not torch.equal(model(x)[0], train_out)  # and is random
    assert torch.equal(train_h[0], eval_h[0])  # the first layer itself is untouched
    # the same mask, applied by hand between the layers, gives the same output
    layers = model.to_canonical()
    first = bt.MLSTM.from_canonical(layers[0])
    second = bt.MLSTM.from_canonical(layers[1])
    torch.manual_seed(1)
    by_hand = second(F.dropout(first(x)[0], 0.5, training=True))[0]
    assert torch.equal(by_hand, train_out)
    # one layer: nothing to drop between, so training equals eval (and the option warns)
    with pytest.warns(UserWarning, match="dropout"):
        single = bt.MLSTM(3, 8, dropout=0.5)
    x32 = x.float()
    assert torch.equal(single.train()(x32)[0], single.eval()(x32)[0])


def test_state_dict_keys_name_the_canonical_matrices():
    model = bt.MLSTM(3, 4, num_layers=2, bias=False, recurrent_bias=True, multiplicative_bias=True,
                     independent_recurrence=True)
    assert set(model.state_dict()) == {
        f"{name}_l{k}" for k in range(2) for name in ("weight_ih", "weight_hh", "weight_mh", "bias_hh", "bias_mh")
    }
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["weight_ih_l0"] == (20, 3) and shapes["weight_ih_l1"] == (20, 4)
    assert shapes["weight_hh_l1"] == (4,) and shapes["weight_mh_l0"] == (16, 4)
    cell = bt.MLSTMCell(3, 4, recurrent_bias=False)
    assert set(cell.state_dict()) == {"weight_ih", "weight_hh", "weight_mh", "bias_ih", "bias_mh"}
    # a state_dict moves weights between layers built with the same options
    other = bt.MLSTM(3, 4, num_layers=2, bias=False, recurrent_bias=True, multiplicative_bias=True,
                     independent_recurrence=True)
    other.load_state_dict(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))


def test_reset_parameters_draws_glorot_uniform():
    """Each weight is U(-a, a) with a = sqrt(6 / (fan_in + fan_out)) over the whole stacked matrix
    (a vector weight_hh counts as H x 1); biases are zero. Checked from the formula: every value
    within a, the extremes near a, and mean and variance (a^2 / 3) within 6 standard errors."""
    torch.manual_seed(0)
    I, H = 70, 60
    for independent in (False, True):
        model = bt.MLSTM(I, H, num_layers=2, independent_recurrence=independent, dtype=torch.float64)
        for k in range(2):
            params = model.layer_parameters(k)
            for name, param in params.items():
                values = numpy(param).ravel()
                if name.startswith("bias"):
                    assert not values.any(), name
                    continue
                fan_out, fan_in = (param.shape[0], 1) if param.dim() == 1 else tuple(param.shape)
                a = math.sqrt(6 / (fan_in + fan_out))
                n = values.size
                assert np.abs(values).max() <= a
                assert np.abs(values).max() >= a * (1 - 20 / n)  # the max of n uniforms is near a
                assert abs(values.mean()) <= 6 * a / math.sqrt(3 * n)
                # var of U(-a, a) is a^2/3; the sample variance's standard error is a^2 * sqrt(4 / (45 n))
                assert abs(values.var() - a * a / 3) <= 6 * a * a * math.sqrt(4 / (45 * n))
    cell = bt.MLSTMCell(I, H)
    assert np.abs(numpy(cell.weight_mh)).max() <= math.sqrt(6 / (H + 4 * H))


# ---- converters ----

def test_from_canonical_options_must_agree_with_params():
    params = random_params(np.random.default_rng(6), 3, 4, bias=False)
    with pytest.raises(ValueError, match=r"bias=True contradicts params, which imply bias=False"):
        bt.MLSTM.from_canonical(params, bias=True)
    with pytest.raises(ValueError, match="num_layers=2 contradicts params, which imply num_layers=1"):
        bt.MLSTM.from_canonical(params, num_layers=2)
    with pytest.raises(ValueError, match=r"params\['weight_hh'\] must have shape"):
        bt.MLSTM.from_canonical({**params, "weight_hh": np.zeros((4, 3))})
    with pytest.raises(ValueError, match="params holds 2 layers, but MLSTMCell is one layer"):
        bt.MLSTMCell.from_canonical([params, params])
    model = bt.MLSTM.from_canonical(params, dtype=torch.float32, bias=False, batch_first=True)
    assert model.batch_first and not model.bias and model._param_dtype() == torch.float32


def test_cell_equals_spec_cell():
    rng = np.random.default_rng(7)
    for mode in MODES:
        params = random_params(rng, 3, 4, independent_recurrence=mode == "addition")
        cell = bt.MLSTMCell.from_canonical(params, integration_mode=mode)
        x, h, c = rng.standard_normal((2, 3)), rng.uniform(-1, 1, (2, 4)), rng.standard_normal((2, 4))
        h1, c1 = cell(torch.tensor(x), (torch.tensor(h), torch.tensor(c)))
        _, (want_h, want_c) = mlstm_spec.cell(params, x, (h, c), integration_mode=mode)
        assert_float64_close(h1, want_h)
        assert_float64_close(c1, want_c)
        h_u, c_u = cell(torch.tensor(x[0]))  # unbatched, zero state
        _, (want_h, _) = mlstm_spec.cell(params, x[0], None, integration_mode=mode)
        assert h_u.shape == (4,)
        assert_float64_close(h_u, want_h)


# ---- the LSTM reduction (spec-facts.md section 4) against torch.nn.LSTM itself ----

@settings(max_examples=10)
@given(hidden=st.integers(1, 6), inputs=st.integers(1, 5), steps=st.integers(1, 8),
       batch=st.integers(1, 3), independent=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_lstm_reduction_matches_torch_nn_lstm(hidden, inputs, steps, batch, independent, seed):
    """With weight_ih block m = 0 and bias_ih block m = 1, m = weight_hh h + bias_hh and the mLSTM is
    an LSTM with recurrent matrix weight_mh[g] @ weight_hh and bias bias_ih[g] + weight_mh[g] @ bias_hh
    + bias_mh[g]; nn.LSTM orders its gates i, f, g(=z), o."""
    rng = np.random.default_rng(seed)
    params = random_params(rng, inputs, hidden, independent_recurrence=independent)
    block(params["weight_ih"], "m")[:] = 0
    block(params["bias_ih"], "m")[:] = 1
    w_hh = np.diag(params["weight_hh"]) if independent else params["weight_hh"]
    lstm = torch.nn.LSTM(inputs, hidden, dtype=torch.float64)
    order = ("i", "f", "z", "o")
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(torch.tensor(np.concatenate(
            [block(params["weight_ih"], g, IH_BLOCKS) for g in order])))
        lstm.weight_hh_l0.copy_(torch.tensor(np.concatenate(
            [block(params["weight_mh"], g, MH_BLOCKS) @ w_hh for g in order])))
        lstm.bias_ih_l0.copy_(torch.tensor(np.concatenate(
            [block(params["bias_ih"], g, IH_BLOCKS) + block(params["weight_mh"], g, MH_BLOCKS)
             @ params["bias_hh"] + block(params["bias_mh"], g, MH_BLOCKS) for g in order])))
        lstm.bias_hh_l0.zero_()
    model = bt.MLSTM.from_canonical(params)
    x = torch.tensor(rng.standard_normal((steps, batch, inputs)))
    state = tuple(torch.tensor(rng.standard_normal((1, batch, hidden))) for _ in range(2))
    results = []
    for layer in (model, lstm):
        x_ = x.clone().requires_grad_(True)
        out, (h_n, c_n) = layer(x_, state)
        (out.sum() + c_n.sum()).backward()
        results.append((out, h_n, c_n, x_.grad))
    for got, want in zip(*results):
        assert_float64_close(got, want)


# ---- torch machinery: compile, autocast, torch.func, devices, threads ----

@pytest.mark.parametrize("mode", MODES)
def test_custom_operators_pass_opcheck(mode):
    """torch.library.opcheck: schema, fake (meta) kernels, autograd registration and the
    torch.compile-facing checks of the fused forward operator, with and without the tape, and of the
    backward operator it calls."""
    torch.manual_seed(0)
    T, B, I, H = 3, 2, 3, 4
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0, c0 = torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    model = bt.MLSTM(I, H, dtype=torch.float64, independent_recurrence=mode == "addition")
    params = [p.detach() for p in model.layer_parameters(0).values()]
    w_ih, w_hh, w_mh, b_ih, b_hh, b_mh = params
    multiplicative = mode == "multiplicative_integration"
    for keep_tape in (False, True):
        for python_loops in (False, True):
            args = (x, h0, c0, w_ih, w_hh, w_mh, b_ih, None, b_mh, multiplicative, keep_tape, python_loops)
            if keep_tape:
                args = tuple(a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args)
            torch.library.opcheck(fused.layer_forward, args)
    with torch.no_grad():
        outputs = fused.layer_forward(x, h0, c0, w_ih, w_hh, w_mh, b_ih, None, b_mh, multiplicative, True, False)
    d_hs = torch.randn(T, B, H, dtype=torch.float64)
    torch.library.opcheck(fused.layer_backward, (d_hs, None, torch.randn(B, H, dtype=torch.float64), x, h0,
                                                 w_ih, w_hh, w_mh, True, False, True, multiplicative,
                                                 True, False, outputs[0], *outputs[3:]))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's
def test_torch_compile_matches_eager():
    """torch.compile(model) traces the fused operator as one node (no graph break, fullgraph works):
    forward and backward equal eager mode."""
    torch._dynamo.reset()
    rng = np.random.default_rng(8)
    model = bt.MLSTM.from_canonical(random_stack(rng, 3, 4, 2), batch_first=True)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.tensor(rng.standard_normal((2, 5, 3)))
    results = []
    for m in (model, compiled):
        x_ = x.clone().requires_grad_(True)
        out, (h_n, c_n) = m(x_)
        (out.sum() + h_n.sum()).backward()
        results.append((out, h_n, c_n, x_.grad))
    for got, want in zip(*results):
        assert_float64_close(got, want)


def test_autocast_cpu_bfloat16():
    """Under torch.autocast a float32 layer computes from bfloat16-rounded inputs and weights and
    returns bfloat16; the result is within the bfloat16 conformance tolerance of float32, and the
    parameter gradients stay float32."""
    torch.manual_seed(0)
    model = bt.MLSTM(6, 8, num_layers=2)
    x = torch.randn(7, 3, 6)
    want, (want_h, _) = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h_n, c_n) = model(x)
    assert out.dtype == h_n.dtype == c_n.dtype == torch.bfloat16
    tol = tolerance("bfloat16", "cpu")
    assert relative_error(numpy(out.float()), numpy(want))[0] <= tol
    assert relative_error(numpy(h_n.float()), numpy(want_h))[0] <= tol
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


class TestTorchFunc:
    """torch.func: nn.LSTM supports grad, jacrev and vmap(grad), but not plain vmap ("Batching rule not
    implemented for aten::lstm"); MLSTM supports all four (it switches to the plain path inside them)."""

    def setup_method(self):
        rng = np.random.default_rng(9)
        self.model = bt.MLSTM.from_canonical(random_params(rng, 3, 4))
        self.params = {k: v.detach() for k, v in self.model.named_parameters()}
        self.x = torch.tensor(rng.standard_normal((5, 2, 3)))

    def loss(self, params, x):
        return torch.func.functional_call(self.model, params, (x,))[0].pow(2).sum()

    def autograd_grads(self, x):
        self.model.zero_grad()
        self.model(x)[0].pow(2).sum().backward()
        return {k: v.grad for k, v in self.model.named_parameters()}

    def test_grad(self):
        got = torch.func.grad(self.loss)(self.params, self.x)
        want = self.autograd_grads(self.x)
        for name in want:
            assert_float64_close(got[name], want[name])

    def test_vmap(self):
        xs = torch.stack([self.x, 2 * self.x, -self.x])
        got = torch.func.vmap(lambda x: torch.func.functional_call(self.model, self.params, (x,))[0])(xs)
        with torch.no_grad():
            want = torch.stack([self.model(x)[0] for x in xs])
        assert_float64_close(got, want)

    def test_vmap_of_grad(self):
        xs = torch.stack([self.x, 2 * self.x])
        got = torch.func.vmap(torch.func.grad(self.loss), in_dims=(None, 0))(self.params, xs)
        for k, x in enumerate(xs):
            want = self.autograd_grads(x)
            for name in want:
                assert_float64_close(got[name][k], want[name])

    def test_jacrev(self):
        jac = torch.func.jacrev(lambda x: torch.func.functional_call(self.model, self.params, (x,))[0])(self.x)
        assert jac.shape == (5, 2, 4, 5, 2, 3)
        # row (t=4, b=1, h=0) of the Jacobian is the input gradient of that one output
        x = self.x.clone().requires_grad_(True)
        self.model(x)[0][4, 1, 0].backward()
        assert_float64_close(jac[4, 1, 0], x.grad)


@pytest.mark.parametrize("device", device_params(bt))
def test_runs_on_device_and_keeps_it(device):
    assert_gpu_present(device)
    model = bt.MLSTM(3, 4, num_layers=2, device=device)
    x = torch.randn(5, 2, 3, device=device, requires_grad=True)
    out, (h_n, c_n) = model(x)
    out.sum().backward()
    assert out.device == h_n.device == c_n.device == x.grad.device == torch.device(device)


def test_thread_count_untouched():
    before = torch.get_num_threads()
    model = bt.MLSTM(3, 4)
    model(torch.randn(5, 2, 3))[0].sum().backward()
    bt.ConformanceAdapter("cpu")
    assert torch.get_num_threads() == before


# ---- bad input: clear errors, raised before the recurrence starts ----

def raises_before_recurrence(exc_type, match, function, *args):
    """The error has the expected type and message and comes from validation, not from inside the
    recurrence or from torch internals."""
    with pytest.raises(exc_type, match=match) as info:
        function(*args)
    frames = [frame.name for frame in traceback.extract_tb(info.tb)]
    assert not {"_fused_forward", "_plain_layer", "_plain_step"} & set(frames), frames
    return info.value


@pytest.mark.parametrize("fused", [True, False])
def test_bad_input_errors(fused):
    model = bt.MLSTM(4, 3, num_layers=2, fused=fused)
    good_x = torch.randn(5, 2, 4)
    state = (torch.zeros(2, 2, 3), torch.zeros(2, 2, 3))
    raises_before_recurrence(ValueError, r"input must have I=4 features in its last dimension .* got "
                             r"shape \(5, 2, 7\)", model, torch.randn(5, 2, 7))
    raises_before_recurrence(ValueError, r"input must have shape \(L, N, H_in\) or \(L, H_in\) .* got 4 "
                             r"dimensions", model, torch.randn(5, 2, 4, 1))
    raises_before_recurrence(TypeError, r"input must have a floating dtype in .*, got int64",
                             model, torch.ones(5, 2, 4, dtype=torch.int64))
    raises_before_recurrence(TypeError, r"input has dtype float64 but the parameters are float32",
                             model, good_x.double())
    raises_before_recurrence(TypeError, r"input must be a torch.Tensor, got ndarray", model, good_x.numpy())
    raises_before_recurrence(ValueError, r"hx h must have shape \(2, 2, 3\), got \(1, 2, 3\)",
                             model, good_x, (torch.zeros(1, 2, 3), state[1]))
    raises_before_recurrence(ValueError, r"hx c must have shape \(2, 2, 3\), got \(2, 3\)",
                             model, good_x, (state[0], torch.zeros(2, 3)))
    raises_before_recurrence(TypeError, r"hx c has dtype float64 but the parameters are float32",
                             model, good_x, (state[0], state[1].double()))
    raises_before_recurrence(TypeError, r"hx must be a pair \(h, c\)", model, good_x, state[0])
    raises_before_recurrence(TypeError, r"hx h must be a torch.Tensor, got list", model, good_x,
                             ([0.0], state[1]))
    # another device: the meta device stands in for a GPU on a machine without one
    raises_before_recurrence(ValueError, r"hx h is on device meta, but the parameters are on cpu",
                             model, good_x, (state[0].to("meta"), state[1]))
    raises_before_recurrence(ValueError, r"input is on device meta, but the parameters are on cpu",
                             model, good_x.to("meta"))
    raises_before_recurrence(ValueError, r"at least one step", model, torch.randn(0, 2, 4))
    unbatched = torch.randn(5, 4)
    raises_before_recurrence(ValueError, r"hx h must have shape \(2, 3\), got \(2, 2, 3\)",
                             model, unbatched, state)


def test_cell_bad_input_errors():
    cell = bt.MLSTMCell(4, 3)
    raises_before_recurrence(ValueError, r"input must have I=4 features .* got shape \(2, 5\)",
                             cell, torch.randn(2, 5))
    raises_before_recurrence(ValueError, r"input must have shape \(batch, input_size\) or \(input_size,\)",
                             cell, torch.randn(1, 2, 4))
    raises_before_recurrence(ValueError, r"hx h must have shape \(2, 3\), got \(3,\)",
                             cell, torch.randn(2, 4), (torch.zeros(3), torch.zeros(3)))
    raises_before_recurrence(TypeError, r"input must have a floating dtype", cell, torch.ones(2, 4, dtype=torch.int32))


def test_constructor_errors():
    with pytest.raises(ValueError, match="integration_mode must be one of"):
        bt.MLSTM(3, 4, integration_mode="add")
    with pytest.raises(ValueError, match="num_layers must be an int >= 1, got 0"):
        bt.MLSTM(3, 4, num_layers=0)
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\), got 1.5"):
        bt.MLSTM(3, 4, dropout=1.5)
    with pytest.raises(TypeError, match="hidden_size must be a positive int, got float"):
        bt.MLSTM(3, 4.0)
    with pytest.raises(TypeError, match="batch_first must be a bool"):
        bt.MLSTM(3, 4, batch_first="yes")


@pytest.mark.parametrize("fused", [True, False])
def test_non_finite_input_stays_in_its_batch_row(fused):
    """Documented policy: non-finite inputs are not checked; they propagate to their own row only."""
    torch.manual_seed(0)
    model = bt.MLSTM(3, 4, num_layers=2, fused=fused)
    x = torch.randn(6, 3, 3)
    clean, (clean_h, _) = model(x)
    x[2, 1, 0] = float("nan")
    x[4, 2, 1] = float("inf")
    out, (h_n, c_n) = model(x)
    assert torch.isnan(out[2:, 1]).all() and torch.isfinite(out[:2, 1]).all()
    assert not torch.isfinite(out[4:, 2]).all()
    assert torch.equal(out[:, 0], clean[:, 0]) and torch.equal(h_n[:, 0], clean_h[:, 0])


# ---- the benchmark script (run outside the tests; here only at a tiny size, so that it keeps working) ----

def _bench_module():
    import runpy
    import sys

    bench_dir = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, bench_dir)
    try:
        return runpy.run_path(f"{bench_dir}/bench_torch.py", run_name="bench_torch")
    finally:
        sys.path.remove(bench_dir)


def test_benchmark_script_runs(tmp_path, capsys):
    """benchmarks/bench_torch.py times every implementation it lists and writes its report between the
    markers of an existing document, keeping the prose around them."""
    import importlib.util

    bench = _bench_module()
    report = tmp_path / "performance.md"
    report.write_text(f"intro\n\n{bench['BEGIN']}\nold\n{bench['END']}\n\noutro\n")
    results = bench["main"](["--sizes", "2,3,4,5", "--repeats", "1", "--warmup", "0", "--output", str(report)])
    names = {name for (name, _mode) in results[(2, 3, 4, 5)]}
    peer_missing = importlib.util.find_spec("torchrecurrent") is None  # offline machines may lack the peer
    assert names == set(bench["IMPLEMENTATIONS"]) - ({"torchrecurrent"} if peer_missing else set())
    assert all(ms > 0 for ms in results[(2, 3, 4, 5)].values())
    text = report.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert "MLSTM (Python loops)" in text and "MLSTM's CPU loops:" in text



def test_benchmark_of_the_variants_runs(capsys):
    """--variants times every layer of VARIANT_LAYERS against the default layer (here at a tiny size)."""
    bench = _bench_module()
    results = bench["main"](["--variants", "--sizes", "2,3,4,6", "--repeats", "1", "--warmup", "0"])
    assert {name for name, _mode in results[(2, 3, 4, 6)]} == set(bench["VARIANT_LAYERS"])
    assert all(ms > 0 for ms in results[(2, 3, 4, 6)].values())
    assert "every variant (Python loops)" in capsys.readouterr().out


def test_benchmark_in_processes_reports_the_median_and_each_process(capsys):
    """--processes: the table holds the median over the processes of each one's median; each target line
    judges the median of the processes' own ratios (each measured side by side in one process), and
    lists them and how many met the target; the products' choices are listed once, with how many
    processes chose each kind where they differ (the processes' results made up here: 3 processes)."""
    bench = _bench_module()
    size = bench["TARGET_SIZE"]
    step_products = bench["GEMM_KINDS"][0]
    choices = [[[step_products, "32x512 by 512x512 (1 threads)", kind],
                [step_products, "32x512 by 512x2048 (1 threads)", "MKL packed"]]
               for kind in ("MKL packed", "MKL", "MKL packed")]
    made_up = [  # MLSTM, nn.LSTM, torchrecurrent forward times (ms) of three processes
        (100.0, 90.0, 175.0), (110.0, 80.0, 200.0), (130.0, 85.0, 220.0)]
    runs = [{"results": {size: {("MLSTM", "forward"): a, ("nn.LSTM", "forward"): b, ("torchrecurrent", "forward"): c,
                                ("MLSTM", "forward+backward"): 3 * a, ("nn.LSTM", "forward+backward"): 3 * b,
                                ("torchrecurrent", "forward+backward"): 3 * c}},
             "choices": chosen, "load": "load average 0.0"} for (a, b, c), chosen in zip(made_up, choices)]
    bench["main"].__globals__["in_processes"] = lambda argv, processes: runs[:processes]
    bench["main"].__globals__["unavailable"] = lambda device: {}  # as if torchrecurrent were installed
    results = bench["main"](["--sizes", ",".join(map(str, size)), "--processes", "3",
                             "--only", "nn.LSTM,torchrecurrent"])
    assert results[size][("MLSTM", "forward")] == 110.0 and results[size][("nn.LSTM", "forward")] == 85.0
    out = capsys.readouterr().out
    # torchrecurrent / MLSTM per process: 1.75, 1.82, 1.69 -> median 1.75, not met (>= 1.8), met in 1 of 3;
    # the ratio of the median times, 200 / 110 = 1.82, would have said "met"
    assert f"- {size} forward: MLSTM is 1.75x faster than torchrecurrent (target >= 1.8x: NOT met; " \
           "median of the per-process ratios 1.75, 1.82, 1.69, met in 1 of 3)" in out
    # MLSTM / nn.LSTM per process: 1.11, 1.38, 1.53 -> median 1.38, met (<= 1.5) in 2 of 3
    assert "MLSTM takes 1.38x the time of nn.LSTM (target <= 1.5x: met; " \
           "median of the per-process ratios 1.11, 1.38, 1.53, met in 2 of 3)" in out
    assert "Median over 3 processes" in out
    assert (f"{step_products}: 32x512 by 512x512 (1 threads): MKL packed in 2 of 3 processes, MKL in 1 of 3 "
            "processes, 32x512 by 512x2048 (1 threads): MKL packed.") in out


def test_benchmark_in_processes_runs_them(tmp_path):
    """The real thing at a tiny size: two child processes, their medians combined."""
    bench = _bench_module()
    results = bench["main"](["--sizes", "2,3,4,5", "--repeats", "1", "--warmup", "0", "--processes", "2",
                             "--only", "nn.LSTM"])
    assert set(results[(2, 3, 4, 5)]) == {(name, mode) for name in ("MLSTM", "nn.LSTM")
                                          for mode in ("forward", "forward+backward")}
    assert all(ms > 0 for ms in results[(2, 3, 4, 5)].values())


def test_runner_reports_which_cpu_loops_it_checked(tmp_path):
    import json

    from mlstm_spec.conformance import runner

    report = tmp_path / "report.json"
    status = runner.main(["--backends", "torch", "--devices", "cpu", "--dtypes", "float64",
                          "--max-examples", "2", "--seed", "0", "--json", str(report)])
    assert status == 0
    versions = json.loads(report.read_text())["metadata"]["versions"]
    assert versions["backends.torch CPU loops"] == bt.compiled_cpu_loops()[1]
