"""The compiled forward without a tape (inference) splits the batch into one slice of rows per thread,
each running the whole recurrence for its rows (``sliced_layer_forward`` in ``cpu_loops.cpp``), where a
thread ahead of another computes some of that slice's input projections for it. These tests force that
path (more than one torch thread, enough rows) and hold it to the spec; its speed is shown by
``benchmarks/bench_torch.py``, not here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from helpers import compiled_torch_loops, random_params, require_backend

bt = require_backend("torch")

import torch  # noqa: E402

from backends.torch import loops  # noqa: E402

import mlstm_spec  # noqa: E402
from mlstm_spec.conformance import relative_error, tolerance  # noqa: E402

MODES = ("addition", "multiplicative_integration")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled():
    return compiled_torch_loops()


@pytest.fixture(autouse=True)
def slicing_on(monkeypatch):
    """Slicing as by default, whatever the environment of the test run says."""
    monkeypatch.delenv("MLSTM_TORCH_FORWARD_SLICES", raising=False)


@pytest.fixture
def threads():
    """Sets torch's thread count for one test (the slices follow it), and restores it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_slices_follow_threads_and_rows(compiled, threads, monkeypatch):
    threads(3)
    assert compiled.forward_slices(26, False) == 3  # 9, 9 and 8 rows
    assert compiled.forward_slices(20, False) == 2  # at least 8 rows a slice
    assert compiled.forward_slices(7, False) == 1
    assert compiled.forward_slices(26, True) == 1  # a tape keeping every projection keeps the loop
    monkeypatch.setenv("MLSTM_TORCH_FORWARD_SLICES", "off")  # read at every call
    assert compiled.forward_slices(26, False) == 1
    monkeypatch.delenv("MLSTM_TORCH_FORWARD_SLICES")
    assert compiled.forward_slices(26, False) == 3
    threads(1)
    assert compiled.forward_slices(64, False) == 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("options", [dict(), dict(independent_recurrence=True),
                                     dict(bias=False, recurrent_bias=False, multiplicative_bias=True)],
                         ids=["all biases", "independent", "only bias_mh"])
@pytest.mark.parametrize("chunk_steps", [2, None], ids=["chunks of 2 steps", "default chunk"])
def test_sliced_forward_equals_spec_float64(compiled, threads, mode, options, chunk_steps):
    """Uneven slices (26 rows on 3 threads), a width that is not a multiple of the vector width,
    given initial states, the projection in several chunks; outputs and both final states."""
    threads(3)
    rng = np.random.default_rng(11)
    steps, batch, inputs, hidden = 7, 26, 5, 37
    assert compiled.forward_slices(batch, False) == 3
    params = random_params(rng, inputs, hidden, scale=3 ** 0.5 / hidden ** 0.5, **options)
    model = bt.MLSTM.from_canonical([params], integration_mode=mode, dtype=torch.float64)
    x = rng.standard_normal((batch, steps, inputs))
    h0, c0 = rng.uniform(-1, 1, (batch, hidden)), rng.standard_normal((batch, hidden))
    chunk_bytes = (loops.PROJECTION_CHUNK_BYTES if chunk_steps is None
                   else chunk_steps * batch * 5 * hidden * 8)
    with mock.patch.object(loops, "PROJECTION_CHUNK_BYTES", chunk_bytes), torch.no_grad():
        out, (h_n, c_n) = model(torch.tensor(x).transpose(0, 1),
                                (torch.tensor(h0)[None], torch.tensor(c0)[None]))
    want_hs, (want_h, want_c) = mlstm_spec.forward(params, x, (h0, c0), integration_mode=mode)
    bound = tolerance("float64")
    for got, want in ((out.transpose(0, 1), want_hs), (h_n[0], want_h), (c_n[0], want_c)):
        error, where = relative_error(got.numpy(), want)
        assert error <= bound, f"relative error {error:.2e} at {where} > {bound:.0e}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gemm", ["packed", "plain", "onednn"])
@pytest.mark.parametrize("chunk_steps", [2, None], ids=["chunks of 2 steps", "default chunk"])
def test_sliced_forward_float32_equals_the_step_parallel_loop_and_spec(compiled, threads, monkeypatch, mode,
                                                                       gemm, chunk_steps):
    """float32: the sliced path against the spec (float64 on the same rounded inputs) within the
    float32 tolerance, and against the loop it replaces (one thread); with MKL's packed weights, plain
    MKL and oneDNN, the projection in one chunk and in several (packed from two chunks on, plain for the
    shorter last one). Every weight random at an initialised layer's scale, so that a wrong product
    (a weight packed untransposed, say) shows in either mode."""
    if gemm == "onednn" and not compiled.onednn_products():
        pytest.skip("this torch has no oneDNN linear operator (mkldnn::_linear_pointwise)")
    monkeypatch.setenv("MLSTM_TORCH_STEP_GEMM", gemm)
    rng = np.random.default_rng(5)
    steps, batch, inputs, hidden = 9, 33, 24, 40
    params = random_params(rng, inputs, hidden, dtype="float32", scale=3 ** 0.5 / hidden ** 0.5)
    model = bt.MLSTM.from_canonical([params], integration_mode=mode, dtype=torch.float32)
    x = torch.tensor(rng.standard_normal((steps, batch, inputs)), dtype=torch.float32)
    chunk_bytes = (loops.PROJECTION_CHUNK_BYTES if chunk_steps is None
                   else chunk_steps * batch * 5 * hidden * 4)
    results = {}
    for count in (2, 1):
        threads(count)
        assert compiled.forward_slices(batch, False) == count
        with mock.patch.object(loops, "PROJECTION_CHUNK_BYTES", chunk_bytes), torch.no_grad():
            results[count] = model(x)
    params = {name: value.astype(np.float64) for name, value in model.to_canonical()[0].items()}
    want_hs, (want_h, want_c) = mlstm_spec.forward(params, x.double().transpose(0, 1).numpy(),
                                                   integration_mode=mode)
    out, (h_n, c_n) = results[2]
    bound = tolerance("float32")
    for got, want in ((out.transpose(0, 1), want_hs), (h_n[0], want_h), (c_n[0], want_c)):
        error, where = relative_error(got.double().numpy(), want)
        assert error <= bound, f"relative error {error:.2e} at {where} > {bound:.0e}"
    for got, want in zip((results[2][0], *results[2][1]), (results[1][0], *results[1][1])):
        error, where = relative_error(got.double().numpy(), want.double().numpy())
        assert error <= bound, f"sliced vs step-parallel: {error:.2e} at {where}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("options", [dict(), dict(independent_recurrence=True),
                                     dict(bias=False, recurrent_bias=False, multiplicative_bias=True)],
                         ids=["all biases", "independent", "only bias_mh"])
def test_a_training_forward_under_addition_runs_sliced_and_its_tape_gives_the_plain_gradients(compiled, threads,
                                                                                              mode, options):
    """Under addition the forward that keeps a tape for the backward runs sliced too, each slice writing its
    rows of the tape: the outputs and every gradient (input, initial states, weights) equal the plain path's
    (autograd over torch operations) in float64, with uneven slices (17 and 16 rows) and the projection in
    several chunks. Under multiplicative integration, whose tape keeps every step's whole projection, the
    step-parallel loop runs instead: the record of the last sliced call (an inference call of 16 rows, made
    just before) stays as it was."""
    threads(2)
    torch.manual_seed(4)
    steps, batch, inputs, hidden = 13, 33, 24, 40
    x, h0, c0 = (torch.randn(*shape, dtype=torch.float64) for shape in
                 ((steps, batch, inputs), (1, batch, hidden), (1, batch, hidden)))
    fused = bt.MLSTM(inputs, hidden, dtype=torch.float64, integration_mode=mode, **options)
    plain = bt.MLSTM(inputs, hidden, dtype=torch.float64, integration_mode=mode, fused=False, **options)
    plain.load_state_dict(fused.state_dict())
    with torch.no_grad():
        fused(x[:, :16])
    assert [rows for rows, _, _ in compiled.last_sliced_forward()] == [8, 8]
    results = []
    for layer in (fused, plain):
        given = [t.clone().requires_grad_(True) for t in (x, h0, c0)]
        with mock.patch.object(loops, "PROJECTION_CHUNK_BYTES", 3 * batch * 5 * hidden * 8):
            out, (h_n, c_n) = layer(given[0], (given[1], given[2]))
        (out.square().sum() + 0.3 * h_n.sum() - c_n.sum()).backward()
        results.append([out, h_n, c_n, *(t.grad for t in given), *(p.grad for p in layer.parameters())])
    for index, (got, want) in enumerate(zip(*results)):
        error, where = relative_error(got.detach().numpy(), want.detach().numpy())
        assert error <= tolerance("float64"), f"result {index}: relative error {error:.2e} at {where}"
    sliced = [rows for rows, _, _ in compiled.last_sliced_forward()]
    assert sliced == ([17, 16] if mode == "addition" else [8, 8])


# The one thread of torch's inter-op pool is kept busy by a TorchScript task while the layer runs, so
# the task the layer launches for its second slice cannot start: the calling thread runs slice 0, then
# slice 1. Which thread is ahead of which is then known, and so is what each slice's thread computes
# for the other: the caller, on its chunks 0 and 1, finds slice 1 not started and computes slice 1's
# projections of chunks 0 and 1 (the most it may hold ahead); slice 1 then finds them done.
_BUSY_POOL_SCRIPT = """
import json, sys, time, torch
torch.set_num_interop_threads(1)
torch.set_num_threads(2)
from unittest import mock
from backends.torch import MLSTM, build, loops

@torch.jit.script
def busy(x: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        x = torch.tanh(x @ x)
    return x

@torch.jit.script
def occupy(n: int) -> torch.jit.Future[torch.Tensor]:
    # The task's tensor is made here, not passed from Python: a tensor known to Python needs the GIL
    # when the task releases it, and a Python thread blocked in torch.jit.wait holds the GIL.
    return torch.jit.fork(busy, torch.full([128, 128], 1.0 / 128), n)

compiled = build.cpu_loops()
torch.manual_seed(0)
steps, batch, inputs, hidden = 30, 16, 8, 16
layer = MLSTM(inputs, hidden)
x = torch.randn(steps, batch, inputs)
three_steps = 3 * batch * 5 * hidden * 4  # the projection in chunks of 3 steps: 10 chunks
with mock.patch.object(loops, "PROJECTION_CHUNK_BYTES", three_steps), torch.no_grad():
    layer(x)  # measures the products' kinds, outside what is compared
    free = layer(x)
    pending = occupy(4000)
    blocked = layer(x)
    record = compiled.last_sliced_forward()
    busy_throughout = not pending.done()
    while not pending.done():  # sleeping, so without the GIL
        time.sleep(0.01)
same = all(torch.equal(a, b) for a, b in zip((free[0], *free[1]), (blocked[0], *blocked[1])))
print(json.dumps(dict(record=[(rows, by_others) for rows, by_others, _ in record], same=same,
                      busy_throughout=busy_throughout, help=compiled.forward_help())))
"""


@pytest.mark.parametrize("setting", [None, "off"], ids=["helping", "MLSTM_TORCH_FORWARD_HELP=off"])
def test_a_thread_ahead_computes_another_slices_projections_with_the_same_values(compiled, setting, tmp_path):
    env = {key: value for key, value in os.environ.items()
           if key not in ("MLSTM_TORCH_FORWARD_HELP", "MLSTM_TORCH_FORWARD_SLICES")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if setting:
        env["MLSTM_TORCH_FORWARD_HELP"] = setting
    script = tmp_path / "busy_pool.py"  # a file: TorchScript reads the functions' source
    script.write_text(_BUSY_POOL_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["busy_throughout"], "the pool's task ended before the layer's call: nothing was tested"
    assert result["help"] is (setting is None)
    # per slice: (rows, how many of its chunks' projections another slice's thread computed)
    assert result["record"] == ([[8, 0], [8, 2]] if setting is None else [[8, 0], [8, 0]])
    assert result["same"], "the outputs with the pool busy differ from those with it free"


def test_packed_weights_reused_memory_never_carries_another_layers_weights(compiled, threads, monkeypatch):
    """MKL's packed weights live in memory kept from call to call (PackedBuffer): every call must pack its
    own weights into it. Layers of the same shape, called in turn, each give their own plain path's values."""
    monkeypatch.setenv("MLSTM_TORCH_STEP_GEMM", "packed")
    threads(2)
    torch.manual_seed(3)
    steps, batch, inputs, hidden = 12, 16, 24, 32
    layers = [bt.MLSTM(inputs, hidden) for _ in range(2)]
    x = torch.randn(steps, batch, inputs)
    with torch.no_grad():
        for layer in (*layers, layers[0], layers[1], layers[0]):
            plain = bt.MLSTM(inputs, hidden, fused=False)
            plain.load_state_dict(layer.state_dict())
            got, want = layer(x)[0], plain(x)[0]
            error, where = relative_error(got.double().numpy(), want.double().numpy())
            assert error <= tolerance("float32"), f"{error:.2e} at {where}"
