"""backends.torch.MLSTM used as a demanding nn.LSTM user would, with the variants on: a 2-layer layer with
a projection, peepholes, both clips and a forget bias, and a variant-free one, each bidirectional or not
and batch-first or not, through PackedSequence, batch 0, copies, dtypes, autocast, torch.func, double
backward, torch.jit, torch.export and ONNX. Each check compares with nn.LSTM's behaviour for the same call
(shapes, dtypes, kind of error) and with the layer's own eager output. docs/torch.md is the table these
tests hold to."""

from __future__ import annotations

import copy
import io
import itertools
import pickle
import subprocess
import sys

import numpy as np
import pytest
from helpers import require_backend

bt = require_backend("torch")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence  # noqa: E402

import mlstm_spec  # noqa: E402
from mlstm_spec.conformance.tolerances import relative_error, tolerance  # noqa: E402

INPUT, HIDDEN, PROJ, LAYERS = 4, 6, 3, 2
#: every variant at once, at values that bite on these sizes (the clips bind, the forget bias moves f)
VARIANTS = dict(peepholes=True, cell_clip=0.7, proj_clip=0.5, forget_bias=1.0)
RUNTIME = dict(cell_clip=0.7, proj_clip=0.5, forget_bias=1.0)
CONFIGS = [pytest.param(variants, bidirectional, batch_first,
                        id=f"{'variants' if variants else 'plain'}-{'bi' if bidirectional else 'uni'}-"
                           f"{'batch_first' if batch_first else 'time_first'}")
           for variants, bidirectional, batch_first in itertools.product([True, False], [True, False], [True, False])]


def make(variants, bidirectional, batch_first, dtype=torch.float64, seed=0, **options):
    """The layer under test, built positionally as nn.LSTM code builds it."""
    torch.manual_seed(seed)
    return bt.MLSTM(INPUT, HIDDEN, LAYERS, True, batch_first, 0.0, bidirectional, PROJ if variants else 0,
                    dtype=dtype, **(VARIANTS if variants else {}), **options)


def lstm_like(variants, bidirectional, batch_first, dtype=torch.float64):
    """nn.LSTM with the same positional arguments (no mLSTM options)."""
    return nn.LSTM(INPUT, HIDDEN, LAYERS, True, batch_first, 0.0, bidirectional, PROJ if variants else 0,
                   dtype=dtype)


def sequence(batch_first, steps=5, batch=3, dtype=torch.float64, seed=1):
    x = torch.randn(steps, batch, INPUT, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    return x.transpose(0, 1).contiguous() if batch_first else x


def assert_close(got, want, dtype="float64"):
    """Agreement within the conformance table's bound for ``dtype`` (norm-wise relative error)."""
    __tracebackhide__ = True
    got, want = (t.detach().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in (got, want))
    assert got.shape == want.shape, (got.shape, want.shape)
    error, where = relative_error(got, want)
    assert error <= tolerance(dtype), f"relative error {error:.2e} at {where} > {tolerance(dtype):.0e}"


def outputs_of(result):
    output, (h_n, c_n) = result
    return output, h_n, c_n


# ---- what already worked: held so that it keeps working with the variants on ----

@pytest.mark.parametrize("variants, bidirectional, batch_first", CONFIGS)
def test_packed_unsorted_equals_each_sequence_alone(variants, bidirectional, batch_first):
    """An unsorted PackedSequence (enforce_sorted=False) with initial states: the output is a
    PackedSequence with the input's indices; each sequence's outputs and final states equal the layer on
    that sequence alone from its own initial state (the eager layer, float64)."""
    model = make(variants, bidirectional, batch_first)
    lengths = [3, 5, 2]
    x = sequence(True, steps=5, batch=3)  # (N, L, I): pack_padded_sequence's batch_first layout
    directions = 2 if bidirectional else 1
    h0 = torch.randn(directions * LAYERS, 3, model.output_size, dtype=torch.float64)
    c0 = torch.randn(directions * LAYERS, 3, HIDDEN, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor(lengths), batch_first=True, enforce_sorted=False)
    out, (h_n, c_n) = model(packed, (h0, c0))
    assert isinstance(out, PackedSequence) and torch.equal(out.unsorted_indices, packed.unsorted_indices)
    padded, _ = pad_packed_sequence(out, batch_first=True)
    for b, length in enumerate(lengths):
        alone = x[b:b + 1, :length] if batch_first else x[b:b + 1, :length].transpose(0, 1)
        y, h, c = outputs_of(model(alone, (h0[:, b:b + 1].contiguous(), c0[:, b:b + 1].contiguous())))
        assert_close(padded[b, :length], y[0] if batch_first else y[:, 0])
        assert_close(h_n[:, b], h[:, 0])
        assert_close(c_n[:, b], c[:, 0])


@pytest.mark.parametrize("variants, bidirectional, batch_first", CONFIGS)
def test_batch_of_zero_has_nn_lstm_shapes(variants, bidirectional, batch_first):
    model, lstm = make(variants, bidirectional, batch_first), lstm_like(variants, bidirectional, batch_first)
    x = sequence(batch_first, batch=0).requires_grad_(True)
    got, want = outputs_of(model(x)), outputs_of(lstm(x))
    assert [t.shape for t in got] == [t.shape for t in want]
    got[0].sum().backward()
    assert x.grad.shape == x.shape
    wrong = torch.zeros((0, 5, INPUT + 1) if batch_first else (5, 0, INPUT + 1), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"I=4 features.*got shape \(5, 0, 5\)"):  # the shape given
        model(wrong)


def test_bidirectional_projection_and_variants_equal_the_spec():
    """Both directions of both layers, with the projection and every variant and given initial states:
    each direction is mlstm_spec.forward (the reverse one over the reversed sequence), layer 1 reading
    both directions' projected outputs."""
    model = make(True, True, True)
    x = sequence(True)
    h0 = torch.randn(2 * LAYERS, 3, PROJ, dtype=torch.float64)
    c0 = torch.randn(2 * LAYERS, 3, HIDDEN, dtype=torch.float64)
    output, h_n, c_n = outputs_of(model(x, (h0, c0)))
    canonical, xs = model.to_canonical(), x.numpy()
    for layer in range(LAYERS):
        directions = []
        for direction in range(2):
            k = 2 * layer + direction
            inputs = xs if direction == 0 else np.ascontiguousarray(xs[:, ::-1])
            hs, (h_T, c_T) = mlstm_spec.forward(canonical[k], inputs, (h0[k].numpy(), c0[k].numpy()), **RUNTIME)
            directions.append(hs if direction == 0 else hs[:, ::-1])
            assert_close(h_n[k], h_T)
            assert_close(c_n[k], c_T)
        xs = np.concatenate(directions, -1)
    assert_close(output, xs)


@pytest.mark.parametrize("variants, bidirectional, batch_first", CONFIGS)
def test_double_backward_equals_the_plain_path(variants, bidirectional, batch_first):
    """A gradient penalty (create_graph=True) through the default (fused) layer: the gradients and the
    second-order gradients equal those of fused=False."""
    results = []
    for fused in (True, False):
        model = make(variants, bidirectional, batch_first, fused=fused)
        x = sequence(batch_first).requires_grad_(True)
        y, h, c = outputs_of(model(x))
        params = list(model.parameters())
        grads = torch.autograd.grad(y.pow(2).sum() + h.sum() + c.pow(2).sum(), [x] + params, create_graph=True)
        penalty = sum(g.pow(2).sum() for g in grads)
        results.append(list(grads) + list(torch.autograd.grad(penalty, [x] + params)))
    for got, want in zip(*results):
        assert_close(got, want)


@pytest.mark.parametrize("variants, bidirectional, batch_first", CONFIGS)
def test_copies_and_dtype_casts(variants, bidirectional, batch_first):
    """deepcopy, pickle and torch.save/torch.load give the same outputs bit for bit; .float() and
    .bfloat16() layers return their dtype and equal the float64 layer on the same rounded weights and
    inputs within that dtype's bound."""
    model = make(variants, bidirectional, batch_first)
    x = sequence(batch_first)
    want = outputs_of(model(x))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False)):
        for got, expected in zip(outputs_of(other(x)), want):
            assert torch.equal(got, expected)
    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
        cast = copy.deepcopy(model).to(dtype)
        rounded = copy.deepcopy(cast).double()  # the float64 layer on the cast weights
        got = outputs_of(cast(x.to(dtype)))
        assert all(t.dtype == dtype for t in got)
        for value, expected in zip(got, outputs_of(rounded(x.to(dtype).double()))):
            assert_close(value, expected, name)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN:UserWarning")
@pytest.mark.parametrize("variants, bidirectional, batch_first", CONFIGS)
def test_autocast_bfloat16_like_nn_lstm(variants, bidirectional, batch_first):
    """Under torch.autocast("cpu", bfloat16) a float32 layer returns bfloat16 output and h_n, as
    nn.LSTM does, equal to the float64 layer on the bfloat16-rounded weights and input within the
    bfloat16 bound; the parameters' gradients stay float32."""
    model = make(variants, bidirectional, batch_first, dtype=torch.float32)
    lstm = lstm_like(variants, bidirectional, batch_first, dtype=torch.float32)
    x = sequence(batch_first, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = outputs_of(model(x))
        want_dtypes = [t.dtype for t in outputs_of(lstm(x))]
    assert [t.dtype for t in got[:2]] == want_dtypes[:2] == [torch.bfloat16] * 2
    rounded = copy.deepcopy(model).bfloat16().double()
    for value, expected in zip(got, outputs_of(rounded(x.bfloat16().double()))):
        assert_close(value, expected, "bfloat16")
    got[0].float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("variants, bidirectional, batch_first", CONFIGS)
def test_state_dict_has_nn_lstm_names_and_round_trips(variants, bidirectional, batch_first):
    """Every nn.LSTM key is there (weight_hr_l{k} with nn.LSTM's shape); the others are the mLSTM's own
    matrices and the peepholes; a fresh layer loading the state_dict computes the same, and a layer
    with other variants refuses it."""
    model = make(variants, bidirectional, batch_first)
    state, lstm_state = model.state_dict(), lstm_like(variants, bidirectional, batch_first).state_dict()
    assert set(lstm_state) <= set(state)
    own = {"weight_mh", "bias_mh"} | ({"weight_ci", "weight_cf", "weight_co"} if variants else set())
    assert {key.split("_l")[0] for key in set(state) - set(lstm_state)} == own
    for key in (k for k in lstm_state if k.startswith("weight_hr")):
        assert state[key].shape == lstm_state[key].shape
    fresh = make(variants, bidirectional, batch_first, seed=5)
    x = sequence(batch_first)
    assert not torch.equal(fresh(x)[0], model(x)[0])
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x)[0], model(x)[0])
    with pytest.raises(RuntimeError, match="size mismatch|Missing key|Unexpected key"):
        make(not variants, bidirectional, batch_first).load_state_dict(state)


@pytest.mark.parametrize("variants, bidirectional, batch_first", CONFIGS)
def test_functional_call_vmap_and_grad_over_parameters(variants, bidirectional, batch_first):
    """torch.func over the parameters (ensembles, meta-learning): functional_call equals the layer,
    vmap over two parameter sets equals each layer, torch.func.grad equals autograd. (nn.LSTM has
    functional_call and grad but no vmap: "Batching rule not implemented for aten::lstm".)"""
    model = make(variants, bidirectional, batch_first)
    x = sequence(batch_first)
    params = {k: v.detach() for k, v in model.named_parameters()}
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        for p in scaled.parameters():
            p.mul_(0.9)
    assert_close(torch.func.functional_call(model, params, (x,))[0], model(x)[0])
    stacked = {k: torch.stack([v, 0.9 * v]) for k, v in params.items()}
    ensemble = torch.func.vmap(lambda p: torch.func.functional_call(model, p, (x,))[0])(stacked)
    assert_close(ensemble[0], model(x)[0])
    assert_close(ensemble[1], scaled(x)[0])
    grads = torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,))[0].pow(2).sum())(params)
    model(x)[0].pow(2).sum().backward()
    for name, param in model.named_parameters():
        assert_close(grads[name], param.grad)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("variants, bidirectional, batch_first", CONFIGS)
def test_jit_trace_equals_eager_at_the_traced_length(variants, bidirectional, batch_first):
    """torch.jit.trace passes its own check; the trace equals the layer on a new input of the traced
    length, and refuses another length with an error (nn.LSTM's trace takes any length: its loop is one
    aten::lstm node; this layer's trace is its unrolled steps, as docs/torch.md says)."""
    model = make(variants, bidirectional, batch_first)
    traced = torch.jit.trace(model, (sequence(batch_first),))
    x = sequence(batch_first, seed=7)
    for got, want in zip(outputs_of(traced(x)), outputs_of(model(x))):
        assert_close(got, want)
    with pytest.raises(RuntimeError, match="Expected 5 elements"):
        traced(sequence(batch_first, steps=8))


# ---- what did not work, fixed in backends/torch/modules.py ----

@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_jit_script_refused_with_an_error_that_names_the_alternatives():
    """nn.LSTM compiles with torch.jit.script; MLSTM cannot (custom operators, Python dispatch). The
    error says so and names what works, for the layer, the cell and a model that holds a layer
    (TorchScript's own error was "Unknown type annotation: 'int'")."""
    torch.jit.script(lstm_like(True, True, True))  # what a user switching from nn.LSTM had

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = make(True, True, True)

        def forward(self, x):
            return self.rnn(x)[0]

    for module in (make(True, True, True), bt.MLSTMCell(INPUT, HIDDEN), Tagger()):
        with pytest.raises(RuntimeError, match=r"torch\.jit\.script cannot compile .*torch\.jit\.trace.*torch\.export"):
            torch.jit.script(module)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("variants, bidirectional, batch_first", [CONFIGS[0], CONFIGS[7]])
def test_onnx_torchscript_exporter_at_the_exported_length(variants, bidirectional, batch_first, tmp_path):
    """torch.onnx.export(dynamo=False), the exporter older code calls: the model exports (it failed with
    "Detected that you are using FX to torch.jit.trace a dynamo-optimized function"), with a warning
    that the graph takes the exported length only; ONNX Runtime equals the layer at that length and
    another batch size, and refuses another length."""
    for module in ("onnx", "onnxruntime"):
        pytest.importorskip(module, reason=f"{module} is not installed (pip install 'mlstm-spec[test]')")
    import onnxruntime

    model = make(variants, bidirectional, batch_first, dtype=torch.float32).eval()
    path = tmp_path / "mlstm.onnx"
    batch_axis = 0 if batch_first else 1
    with pytest.warns(UserWarning, match="exactly 5 steps"):
        torch.onnx.export(model, (sequence(batch_first, dtype=torch.float32),), str(path), dynamo=False,
                          input_names=["input"], output_names=["output", "h_n", "c_n"],
                          dynamic_axes={"input": {batch_axis: "batch"}, "output": {batch_axis: "batch"},
                                        "h_n": {1: "batch"}, "c_n": {1: "batch"}})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (3, 7):
        x = sequence(batch_first, batch=batch, dtype=torch.float32, seed=batch)
        with torch.no_grad():
            want = outputs_of(model(x))
        for got, expected in zip(session.run(None, {"input": x.numpy()}), want):
            assert_close(got, expected, "float32")  # another order of float32 sums: float32's bound
    with pytest.raises(Exception, match="invalid dimensions"):  # the time axis was exported fixed
        session.run(None, {"input": sequence(batch_first, steps=8, dtype=torch.float32).numpy()})


@pytest.mark.parametrize("variants", [True, False], ids=["variants", "plain"])
def test_cell_takes_a_batch_of_zero_like_nn_lstm_cell(variants):
    """nn.LSTMCell takes a (0, input_size) input, with or without states, and returns (0, H) states; the
    cell refused it ("input must have at least one step and one batch row")."""
    cell = bt.MLSTMCell(INPUT, HIDDEN, proj_size=PROJ if variants else 0, **(VARIANTS if variants else {}))
    lstm_cell = nn.LSTMCell(INPUT, HIDDEN)
    x = torch.randn(0, INPUT, requires_grad=True)
    h, c = cell(x)
    want_h, want_c = lstm_cell(x)
    assert h.shape == (0, PROJ) if variants else h.shape == want_h.shape
    assert c.shape == want_c.shape
    h, c = cell(x, (h, c))
    (h.sum() + c.sum()).backward()
    assert x.grad.shape == x.shape
    with pytest.raises(ValueError, match="hx h must have shape"):
        cell(x, (torch.zeros(1, cell.output_size), torch.zeros(1, HIDDEN)))
    with pytest.raises(ValueError, match=r"I=4 features.*got shape \(0, 5\)"):  # the shape given
        cell(torch.zeros(0, INPUT + 1))


@pytest.mark.parametrize("variants, bidirectional, batch_first", [CONFIGS[0], CONFIGS[7]])
def test_built_on_the_meta_device_then_materialised(variants, bidirectional, batch_first):
    """Large-model code builds modules without memory (`with torch.device("meta")` or device="meta"),
    then calls to_empty() and reset_parameters(), which works with nn.LSTM. The layer raised "Tensor.item()
    cannot be called on meta tensors"; now its parameters have their shapes on the meta device, and after
    to_empty(device="cpu") and reset_parameters() under a seed it equals the layer built on CPU from
    that seed, as does one built with device="cpu" inside the meta block."""
    with torch.device("meta"):
        lstm_like(variants, bidirectional, batch_first)  # what nn.LSTM code does
        in_context = make(variants, bidirectional, batch_first)
        on_cpu = make(variants, bidirectional, batch_first, device="cpu", seed=3)
    by_argument = make(variants, bidirectional, batch_first, device="meta")
    reference = make(variants, bidirectional, batch_first, seed=3)
    x = sequence(batch_first)
    for got, want in zip(outputs_of(on_cpu(x)), outputs_of(reference(x))):
        assert torch.equal(got, want)
    for model in (in_context, by_argument):
        assert all(p.is_meta for p in model.parameters())
        assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
        model.to_empty(device="cpu")
        torch.manual_seed(3)
        model.reset_parameters()
        for got, want in zip(outputs_of(model(x)), outputs_of(reference(x))):
            assert torch.equal(got, want)


# ---- the slower deployment paths, with every variant on ----

@pytest.mark.slow  # the exporter takes ~20 s
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
def test_onnx_export_with_variants_runs_at_other_lengths(tmp_path):
    """The default exporter on the bidirectional batch-first layer with every variant: ONNX Runtime
    equals the layer at the exported length and at two others."""
    for module in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(module, reason=f"{module} is not installed (pip install 'mlstm-spec[test]')")
    import onnxruntime

    model = make(True, True, True, dtype=torch.float32).eval()
    path = tmp_path / "mlstm.onnx"
    steps = torch.export.Dim("steps", min=1, max=4096)
    torch.onnx.export(model, (sequence(True, dtype=torch.float32),), str(path), dynamic_shapes=({1: steps},),
                      input_names=["input"], output_names=["output", "h_n", "c_n"])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for length in (5, 9, 1):
        x = sequence(True, steps=length, dtype=torch.float32, seed=length)
        with torch.no_grad():
            want = outputs_of(model(x))
        for got, expected in zip(session.run(None, {"input": x.numpy()}), want):
            assert_close(got, expected, "float32")


@pytest.mark.slow  # a fresh interpreter importing torch, and an export: ~10 s
def test_pt2_with_variants_loads_in_a_fresh_process(tmp_path):
    """torch.export with a dynamic length and batch, saved; a new process that imports backends.torch
    loads it and gets the layer's outputs bit for bit at another length and batch."""
    model = make(True, True, True).eval()
    steps, batch = torch.export.Dim("steps", min=2, max=64), torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(model, (sequence(True),), dynamic_shapes=({0: batch, 1: steps},))
    x = sequence(True, steps=9, batch=4, seed=3)
    torch.export.save(program, str(tmp_path / "mlstm.pt2"))
    torch.save((x, outputs_of(model(x))), tmp_path / "expected.pt")
    script = (f"import torch, backends.torch\n"
              f"program = torch.export.load({str(tmp_path / 'mlstm.pt2')!r})\n"
              f"x, want = torch.load({str(tmp_path / 'expected.pt')!r})\n"
              f"output, (h_n, c_n) = program.module()(x)\n"
              f"assert all(torch.equal(g, w) for g, w in zip((output, h_n, c_n), want)), 'differs'\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow  # compiling forward and backward: ~10-30 s
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's
def test_compile_fullgraph_with_variants_forward_and_backward():
    """torch.compile(fullgraph=True) of the bidirectional layer with every variant, called at two
    lengths: outputs and gradients equal eager mode's. (nn.LSTM itself does not compile with
    fullgraph=True: "Dynamo does not support RNN, GRU, or LSTM".)"""
    torch._dynamo.reset()
    model = make(True, True, True)
    compiled = torch.compile(model, fullgraph=True)
    for steps in (5, 8):
        results = []
        for module in (compiled, model):
            model.zero_grad()
            x = sequence(True, steps=steps).requires_grad_(True)
            y, h, c = outputs_of(module(x))
            (y.pow(2).sum() + h.sum() + c.sum()).backward()
            results.append([y, h, c, x.grad] + [p.grad.clone() for p in model.parameters()])
        for got, want in zip(*results):
            assert_close(got, want)


# ---- double backward through an initial state computed from the same weights ----


@pytest.mark.parametrize("variants", [True, False], ids=["variants", "plain"])
@pytest.mark.parametrize("chain", ["packed", "carried_state"])
def test_create_graph_gradients_when_the_initial_state_depends_on_the_weights(chain, variants):
    """Gradients taken with create_graph=True (gradient penalty), and the second-order ones, through a
    PackedSequence of unequal lengths or a state carried from the layer's previous call: the default
    layer must equal fused=False."""
    results = []
    for fused in (True, False):
        model = make(variants, False, False, fused=fused)
        x = sequence(False).requires_grad_(True)
        if chain == "packed":
            out, (h, c) = model(pack_padded_sequence(x, torch.tensor([5, 2, 4]), enforce_sorted=False))
            y = out.data
        else:
            first, state = model(x[:2])
            rest, (h, c) = model(x[2:], state)
            y = torch.cat([first, rest])
        params = list(model.parameters())
        grads = torch.autograd.grad(y.pow(2).sum() + h.sum() + c.sum(), [x] + params, create_graph=True)
        results.append(list(grads) + list(torch.autograd.grad(sum(g.pow(2).sum() for g in grads), [x] + params)))
    for got, want in zip(*results):
        assert_close(got, want)
