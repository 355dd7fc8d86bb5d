"""backends.torch.MLSTM as a drop-in for torch.nn.LSTM: the constructor's positional order, the bias
switch, bidirectional layers, PackedSequence, batch 0, deployment (ONNX, torch.jit.trace, .pt2) and the
first-use build of the C++ loops. docs/torch.md is the compatibility table these tests hold to."""

from __future__ import annotations

import inspect
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import random_params, require_backend, run_conformance

bt = require_backend("torch")

import torch  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

import mlstm_spec  # noqa: E402
from backends.torch import build  # noqa: E402
from mlstm_spec.conformance import relative_error  # noqa: E402
from mlstm_spec.conformance.tolerances import tolerance  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def assert_close(got, want, bound=1e-10):
    """float64 agreement by the suite's norm-wise relative error (as in test_torch.py: far above
    float64 rounding through the recurrence, far below any wrong term)."""
    __tracebackhide__ = True
    got = got.detach().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    want = want.detach().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    error, where = relative_error(got, want)
    assert error <= bound, f"relative error {error:.2e} at {where} > {bound:.0e}"


def bidirectional_stack(rng, input_size, hidden, num_layers, **options):
    """Canonical mappings in nn.LSTM's order: layer 0 forward, layer 0 reverse, layer 1 forward, ..."""
    scale = 3 ** 0.5 / hidden ** 0.5
    return [random_params(rng, input_size if k < 2 else 2 * hidden, hidden, scale=scale, **options)
            for k in range(2 * num_layers)]


def spec_bidirectional(layers, xs, mode="addition"):
    """mlstm_spec.forward over each direction of each layer; xs (B, T, I). The reverse direction is the
    spec's forward over the time-reversed sequence, its outputs reversed back."""
    finals = []
    for layer in range(len(layers) // 2):
        forward_hs, forward_final = mlstm_spec.forward(layers[2 * layer], xs, integration_mode=mode)
        reverse_hs, reverse_final = mlstm_spec.forward(layers[2 * layer + 1], xs[:, ::-1], integration_mode=mode)
        xs = np.concatenate([forward_hs, reverse_hs[:, ::-1]], -1)
        finals += [forward_final, reverse_final]
    return xs, finals


# ---- the shared conformance suite on the bidirectional and packed paths ----

@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_conformance_reverse_direction(dtype):
    """The reverse direction of a bidirectional layer, fed the reversed sequence, against mlstm_spec:
    outputs, final states and every gradient (see ConformanceAdapter)."""
    run_conformance(lambda device: bt.ConformanceAdapter(device, direction="reverse"), "cpu", dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_conformance_packed(dtype):
    """The suite's sequences packed together with shorter decoys, in an unsorted batch, against
    mlstm_spec (see ConformanceAdapter)."""
    run_conformance(lambda device: bt.ConformanceAdapter(device, packed=True), "cpu", dtype)


# ---- the constructor ----

def test_constructor_takes_nn_lstm_positional_order():
    """The positional parameters are nn.LSTM's, in its order; every mLSTM option is keyword-only."""
    ours = inspect.signature(bt.MLSTM).parameters
    # nn.LSTM.__init__ takes (*args, **kwargs) and hands them to RNNBase after its `mode`
    theirs = list(inspect.signature(torch.nn.RNNBase.__init__).parameters)[2:]
    assert [n for n, p in ours.items() if p.kind is p.POSITIONAL_OR_KEYWORD] == theirs
    assert all(ours[n].default == inspect.signature(torch.nn.RNNBase.__init__).parameters[n].default
               for n in theirs[2:])
    for name in ("recurrent_bias", "multiplicative_bias", "independent_recurrence", "integration_mode",
                 "fused", "cpu_loops"):
        assert ours[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    model = bt.MLSTM(8, 16, 1, True, True)
    assert model.batch_first
    model = bt.MLSTM(8, 16, 2, True, True, 0.1, True, 0, None, torch.float64)
    assert (model.num_layers, model.batch_first, model.dropout, model.bidirectional) == (2, True, 0.1, True)
    assert model.weight_ih_l0.dtype == torch.float64
    out, (h_n, c_n) = model(torch.randn(3, 5, 8, dtype=torch.float64))
    lstm_out, (lstm_h, lstm_c) = torch.nn.LSTM(8, 16, 2, True, True, 0.1, True, dtype=torch.float64)(
        torch.randn(3, 5, 8, dtype=torch.float64))
    assert out.shape == lstm_out.shape and h_n.shape == lstm_h.shape and c_n.shape == lstm_c.shape
    with pytest.raises(TypeError):
        bt.MLSTM(8, 16, 1, True, False, 0.0, False, 0, None, None, True)  # no 11th positional


def test_bias_false_removes_every_bias_like_nn_lstm():
    """bias=False: no bias at all, as in nn.LSTM; the per-bias flags follow bias unless given."""
    names = lambda module: {n.split("_l")[0] for n, _ in module.named_parameters()}  # noqa: E731
    assert names(bt.MLSTM(3, 4, bias=False)) == {"weight_ih", "weight_hh", "weight_mh"}
    assert names(bt.MLSTMCell(3, 4, bias=False)) == {"weight_ih", "weight_hh", "weight_mh"}
    assert names(bt.MLSTM(3, 4, bias=False, recurrent_bias=True)) == {"weight_ih", "weight_hh", "weight_mh",
                                                                       "bias_hh"}
    assert names(bt.MLSTM(3, 4, multiplicative_bias=False)) == {"weight_ih", "weight_hh", "weight_mh",
                                                                 "bias_ih", "bias_hh"}
    # from_canonical stays exact: the file's biases, whatever the master switch's default would say
    params = random_params(np.random.default_rng(0), 3, 4, bias=False)
    model = bt.MLSTM.from_canonical(params)
    assert names(model) == {"weight_ih", "weight_hh", "weight_mh", "bias_hh", "bias_mh"}
    assert all(np.array_equal(model.to_canonical()[0][k], v) for k, v in params.items())


def test_proj_size_checked_and_flatten_parameters_exists():
    with pytest.raises(ValueError, match=r"proj_size must be 0 \(no projection\) or in 1..hidden_size-1 = "
                                         r"1..3, got -1"):
        bt.MLSTM(3, 4, proj_size=-1)
    with pytest.raises(ValueError, match=r"proj_size must be 0 \(no projection\) or in .*, got 4"):
        bt.MLSTM(3, 4, proj_size=4)
    with pytest.raises(TypeError, match="bidirectional must be a bool"):
        bt.MLSTM(3, 4, bidirectional="yes")
    model = bt.MLSTM(3, 4, proj_size=0)
    x = torch.randn(5, 2, 3)
    before = model(x)[0]
    assert model.flatten_parameters() is None
    assert torch.equal(model(x)[0], before)


# ---- bidirectional ----

@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_bidirectional_against_spec(fused, batch_first):
    """Two layers, both directions: the output is the two directions concatenated per step (the
    second layer reading both), h_n/c_n are ordered layer by layer, forward then reverse, as in
    nn.LSTM; every value is the spec's. Parameter names include all of nn.LSTM's."""
    rng = np.random.default_rng(1)
    layers = bidirectional_stack(rng, 3, 4, 2)
    model = bt.MLSTM.from_canonical(layers, bidirectional=True, batch_first=batch_first, fused=fused)
    lstm_names = {n for n, _ in torch.nn.LSTM(3, 4, 2, bidirectional=True).named_parameters()}
    assert lstm_names < {n for n, _ in model.named_parameters()}
    xs = rng.standard_normal((2, 6, 3))  # (B, T, I)
    x = torch.tensor(xs if batch_first else xs.transpose(1, 0, 2))
    out, (h_n, c_n) = model(x)
    want, finals = spec_bidirectional(layers, xs)
    assert out.shape == ((2, 6, 8) if batch_first else (6, 2, 8)) and h_n.shape == (4, 2, 4)
    assert_close(out if batch_first else out.transpose(0, 1), want)
    for k, (h, c) in enumerate(finals):
        assert_close(h_n[k], h)
        assert_close(c_n[k], c)


def test_bidirectional_canonical_round_trip_and_errors():
    rng = np.random.default_rng(2)
    layers = bidirectional_stack(rng, 3, 4, 2, independent_recurrence=True)
    model = bt.MLSTM.from_canonical(layers, bidirectional=True)
    assert model.num_layers == 2 and model.bidirectional
    assert model.weight_ih_l1_reverse.shape == (20, 8)
    exported = model.to_canonical()
    assert len(exported) == 4
    for got, want in zip(exported, layers):
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match=r"params holds 3 mappings; a stack with 2 directions needs a multiple"):
        bt.MLSTM.from_canonical(layers[:3], bidirectional=True)
    with pytest.raises(ValueError, match=r"params\[2\] \(layer 1, direction 0\) must have I=8 and H=4, got I=4"):
        bt.MLSTM.from_canonical(layers[:2] + [random_params(rng, 4, 4, independent_recurrence=True)] * 2,
                                bidirectional=True)


# ---- packed sequences and batch 0 ----

@pytest.mark.parametrize("fused", [True, False])
def test_packed_equals_each_sequence_alone(fused):
    """An unsorted PackedSequence through a 2-layer bidirectional layer: the output is a PackedSequence
    with the input's batch_sizes and indices; each sequence's outputs and final states (both
    directions, the reverse one over the sequence's true length) equal the layer run on that sequence
    alone, with its own initial state; gradients reach the input."""
    rng = np.random.default_rng(3)
    model = bt.MLSTM.from_canonical(bidirectional_stack(rng, 3, 4, 2), bidirectional=True, fused=fused)
    lengths = [3, 7, 1, 7, 4]
    x = torch.tensor(rng.standard_normal((7, 5, 3)), requires_grad=True)
    h0, c0 = (torch.tensor(rng.standard_normal((4, 5, 4))) for _ in range(2))
    packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
    out, (h_n, c_n) = model(packed, (h0, c0))
    assert isinstance(out, torch.nn.utils.rnn.PackedSequence)
    assert torch.equal(out.batch_sizes, packed.batch_sizes) and torch.equal(out.sorted_indices, packed.sorted_indices)
    padded, out_lengths = pad_packed_sequence(out)
    assert out_lengths.tolist() == lengths
    for b, length in enumerate(lengths):
        alone, (h_alone, c_alone) = model(x[:length, b:b + 1], (h0[:, b:b + 1], c0[:, b:b + 1]))
        assert_close(padded[:length, b], alone[:, 0])
        assert not padded[length:, b].any()
        assert_close(h_n[:, b], h_alone[:, 0])
        assert_close(c_n[:, b], c_alone[:, 0])
    padded.sum().backward()
    assert torch.isfinite(x.grad).all() and not x.grad[lengths[2]:, 2].any()


@pytest.mark.parametrize("bidirectional", [False, True])
def test_batch_of_zero_like_nn_lstm(bidirectional):
    model = bt.MLSTM(3, 4, num_layers=2, bidirectional=bidirectional)
    lstm = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=bidirectional)
    x = torch.randn(5, 0, 3, requires_grad=True)
    got, want = model(x), lstm(x)
    assert got[0].shape == want[0].shape and got[1][0].shape == want[1][0].shape == got[1][1].shape
    got[0].sum().backward()
    assert x.grad.shape == x.shape


# ---- deployment: ONNX, torch.jit.trace, torch.export ----

@pytest.mark.slow  # the exporter itself takes ~20 s (more on a busy machine)
@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch's own exporter internals
def test_onnx_export_of_the_default_layer_runs_in_onnxruntime_at_other_lengths(tmp_path):
    """torch.onnx.export of the default (fused) layer, with a symbolic sequence length; onnxruntime's
    results equal the layer's at the exported length and at two others."""
    for module in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(module, reason=f"{module} is not installed (pip install 'mlstm-spec[test]')")
    import onnxruntime

    torch.manual_seed(0)
    model = bt.MLSTM(3, 4, bidirectional=True).eval()
    path = tmp_path / "mlstm.onnx"
    steps = torch.export.Dim("steps", min=1, max=4096)
    torch.onnx.export(model, (torch.randn(5, 2, 3),), str(path), dynamic_shapes=({0: steps},),
                      input_names=["input"], output_names=["output", "h_n", "c_n"])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for length in (5, 11, 1):
        x = torch.randn(length, 2, 3)
        got = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            out, (h_n, c_n) = model(x)
        for value, want in zip(got, (out, h_n, c_n)):
            assert value.shape == want.shape
            # float32 (ONNX Runtime's kernels sum in another order): the tolerance table's float32 bound
            assert relative_error(value, want.numpy())[0] <= tolerance("float32")


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_jit_trace_of_the_default_layer():
    """torch.jit.trace passes its own check (it reruns the trace and compares) and the traced module
    equals the layer, with gradients."""
    torch.manual_seed(0)
    model = bt.MLSTM(3, 4, num_layers=2, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    traced = torch.jit.trace(model, (x,), check_inputs=[(x * 2,)])
    got, want = traced(x), model(x)
    assert_close(got[0], want[0])
    assert_close(got[1][1], want[1][1])
    x_ = x.clone().requires_grad_(True)
    traced(x_)[0].sum().backward()
    assert x_.grad is not None and torch.isfinite(x_.grad).all()


def test_pt2_file_loads_in_a_process_that_imports_backends_torch(tmp_path):
    """A .pt2 (torch.export.save) of the default layer holds the mlstm operator; another process loads
    and runs it after ``import backends.torch`` and gets the same result."""
    torch.manual_seed(0)
    model = bt.MLSTM(3, 4, dtype=torch.float64).eval()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    path, inputs, expected = tmp_path / "mlstm.pt2", tmp_path / "x.pt", tmp_path / "want.pt"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    torch.save(x, inputs)
    with torch.no_grad():
        torch.save(model(x)[0], expected)
    code = ("import sys, torch, backends.torch\n"
            "program = torch.export.load(sys.argv[1])\n"
            "got = program.module()(torch.load(sys.argv[2]))[0]\n"
            "assert torch.allclose(got, torch.load(sys.argv[3]), rtol=1e-12, atol=0), 'different result'\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code, str(path), str(inputs), str(expected)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# ---- the first-use build of the C++ loops ----

def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def run_build_with_timeout(seconds: float) -> dict:
    """build.build() in a thread; fails (instead of hanging the test run) if it does not return."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(build.build()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"build() still running after {seconds} s (a hang)"
    return result


@pytest.fixture
def empty_build_root(monkeypatch, tmp_path):
    monkeypatch.delenv(bt.CPU_LOOPS_VARIABLE, raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    return tmp_path


def test_stale_build_lock_is_detected_and_the_build_reruns(empty_build_root, monkeypatch, capfd):
    """A build killed half-way leaves its lock (ours, naming a dead process, and torch's own baton
    file). The next build says so once, clears both and builds again instead of waiting forever. (The
    compiler child is faked: it records what it found and fails fast.)"""
    directory = empty_build_root / build.build_name()
    directory.mkdir()
    (directory / build.LOCK_NAME).write_text(f"{dead_pid()} {socket.gethostname()} {time.time() - 5:.0f}\n")
    (directory / "lock").write_text("")  # torch.utils.cpp_extension's FileBaton, left behind
    seen = []

    def child(command, **options):
        seen.append(sorted(p.name for p in directory.iterdir()))
        return subprocess.CompletedProcess(command, 1, "", "error: no compiler here (fake)")

    monkeypatch.setattr(build.subprocess, "run", child)
    state = run_build_with_timeout(30)
    assert seen == [[build.LOCK_NAME]], seen  # torch's stale baton gone, our lock held by this build
    assert state["module"] is None and "no compiler here (fake)" in state["reason"]
    assert not (directory / build.LOCK_NAME).exists()  # released after the failed build
    err = capfd.readouterr().err
    assert err.count("stale build lock") == 1 and "dead" in err
    assert "compiling" in err


def test_build_held_by_a_live_process_times_out_to_the_python_loops(empty_build_root, monkeypatch):
    """A lock held by a process that is alive but not finishing: wait at most LOCK_WAIT_S, then give up
    (the Python loops run), with the reason."""
    directory = empty_build_root / build.build_name()
    directory.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (directory / build.LOCK_NAME).write_text(f"{holder.pid} {socket.gethostname()} {time.time():.0f}\n")
        monkeypatch.setattr(build, "LOCK_WAIT_S", 1.0)
        monkeypatch.setattr(build.subprocess, "run", lambda *a, **k: pytest.fail("built despite the lock"))
        start = time.monotonic()
        state = run_build_with_timeout(30)
        assert time.monotonic() - start < 10
        assert state["module"] is None and state["warn"]
        assert f"another process (pid {holder.pid}) has been building" in state["reason"]
    finally:
        holder.kill()
        holder.wait()


# The end of what torch's build printed on this machine when cpu_loops.cpp had an unbalanced #ifdef:
# the traceback of the ninja call comes before the compiler's lines and also contains "error".
FAILED_BUILD = """Traceback (most recent call last):
  File ".../torch/utils/cpp_extension.py", line 2709, in _run_ninja_build
    subprocess.run(
  File ".../subprocess.py", line 571, in run
    raise CalledProcessError(retcode, process.args,
subprocess.CalledProcessError: Command '['ninja', '-v']' returned non-zero exit status 1.
FAILED: cpu_loops.o
/work/backends/torch/cpu_loops.cpp:636: error: unterminated #ifdef
/work/backends/torch/cpu_loops.cpp:672:3: error: 'AT_DISPATCH_FLOATING_TYPES' was not declared in this scope
RuntimeError: Error building extension 'mlstm_cpu_loops_avx512_2cf336312db7'
"""


@pytest.mark.parametrize("stderr, said", [
    (FAILED_BUILD, "/work/backends/torch/cpu_loops.cpp:636: error: unterminated #ifdef"),
    ("c++: fatal error: no input files\ncompilation terminated.\n", "c++: fatal error: no input files"),
    (FAILED_BUILD.replace(": error:", ":"), "RuntimeError: Error building extension 'mlstm_cpu_loops_avx512_2cf336312db7'"),
    ("error: no compiler found\n", "error: no compiler found"),
    ("ninja: build stopped: subcommand failed.\n", "ninja: build stopped: subcommand failed."),
    ("", "the build exited with status 2"),
], ids=["compiler error", "driver error", "no compiler line", "bare error", "no error line", "nothing printed"])
def test_a_failed_build_says_why(stderr, said):
    """The reason a failed build reports (compiled_cpu_loops(), the warning) is the compiler's first
    error, not the first line of the traceback that mentions one."""
    assert build.build_error(stderr, 2) == said


def test_the_library_appears_only_whole(empty_build_root, monkeypatch):
    """Another process finds the library by its path, without the build lock (pytest-xdist workers, a
    DataLoader's spawned workers): the build must never leave a half-written file there, which that
    process would fail to import ("file too short") and so run the Python loops instead."""
    name = build.build_name()
    directory = empty_build_root / name
    library = directory / f"{name}.so"

    def compile_slowly(name_, flags, where):
        where.mkdir(parents=True, exist_ok=True)
        with open(where / f"{name_}.so", "wb") as out:
            out.write(b"half")
            out.flush()
            assert not library.exists(), "a half-written library is visible where other processes look"
            out.write(b" and the rest")

    monkeypatch.setattr(build, "_compile", compile_slowly)
    build._build_locked(name, [], directory, library)
    assert library.read_bytes() == b"half and the rest"
    assert [p.name for p in empty_build_root.iterdir()] == [name]  # nothing of the build left beside it
    assert not (directory / build.LOCK_NAME).exists()


def test_a_changed_header_rebuilds(monkeypatch, tmp_path):
    """The extension's name hashes the headers the sources include as well as the sources, so that an
    edited declaration is compiled rather than an old library loaded."""
    header = tmp_path / "mkl_routines.h"
    header.write_bytes(build.HEADERS[0].read_bytes())
    monkeypatch.setattr(build, "HEADERS", (header,))
    before = build.build_name()
    header.write_bytes(header.read_bytes() + b"// edited\n")
    assert build.build_name() != before


def test_build_ahead_of_time_command(empty_build_root, monkeypatch):
    """``python -m backends.torch`` is the documented way to build ahead of time (e.g. in a
    Docker image): it runs the build and says what it did. (Here with the compiled loops switched off,
    so that it is fast: the command must still report.)"""
    env = dict(os.environ, MLSTM_TORCH_CPU_LOOPS="python", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "backends.torch"], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)
    assert done.returncode == 1 and "MLSTM_TORCH_CPU_LOOPS=python" in done.stdout + done.stderr


# ---- generation: the path chosen per call ----

def test_path_chosen_per_call(monkeypatch):
    """One step (generation) runs the plain path, a long sequence the fused operator; both equal the
    spec (float64)."""
    from backends.torch import modules

    calls = []
    original = modules.fused_layer
    monkeypatch.setattr(modules, "fused_layer", lambda *a: calls.append(a[0].shape) or original(*a))
    rng = np.random.default_rng(5)
    params = random_params(rng, 3, 4)
    model = bt.MLSTM.from_canonical(params, batch_first=True)
    for steps, fused_calls in ((1, 0), (40, 1)):
        xs = rng.standard_normal((2, steps, 3))
        out, _ = model(torch.tensor(xs))
        assert len(calls) == fused_calls, (steps, calls)
        assert_close(out, mlstm_spec.forward(params, xs)[0])


def test_cell_quick_path_equals_the_spec_and_the_checked_path():
    """MLSTMCell's per-call quick path (a (batch, input_size) tensor of the parameters' dtype) gives
    the spec's step, and the same as the fully checked path (unbatched input, one row at a time)."""
    rng = np.random.default_rng(6)
    for mode in ("addition", "multiplicative_integration"):
        for options in ({}, dict(bias=False, independent_recurrence=True)):
            params = random_params(rng, 3, 4, **options)
            cell = bt.MLSTMCell.from_canonical(params, integration_mode=mode)
            x, h, c = rng.standard_normal((2, 3)), rng.uniform(-1, 1, (2, 4)), rng.standard_normal((2, 4))
            got_h, got_c = cell(torch.tensor(x), (torch.tensor(h), torch.tensor(c)))
            _, (want_h, want_c) = mlstm_spec.cell(params, x, (h, c), integration_mode=mode)
            assert_close(got_h, want_h)
            assert_close(got_c, want_c)
            row_h, _ = cell(torch.tensor(x[1]), (torch.tensor(h[1]), torch.tensor(c[1])))
            assert_close(row_h, got_h[1])
            zeros_h, _ = cell(torch.tensor(x))
            assert_close(zeros_h, mlstm_spec.cell(params, x, integration_mode=mode)[1][0])
