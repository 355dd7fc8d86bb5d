"""The one-step C++ kernel (``cpu_step.cpp``) that MLSTMCell, and MLSTM on a one-step sequence, run when
nothing records a gradient: it must compute what the plain step computes, and step aside wherever
autograd or a tracer must see torch operations. Its speed is shown by
``benchmarks/bench_torch.py --generation``, not here."""

from __future__ import annotations

import pytest
from helpers import require_backend

bt = require_backend("torch")

import torch  # noqa: E402

from backends.torch import modules  # noqa: E402
from mlstm_spec.conformance import relative_error  # noqa: E402

# float64: the kernel and the plain step differ only in rounding (another BLAS call, SLEEF's tanh and
# exp against MKL's), ~1e-16 relative per step; 1e-12 leaves room for that and none for a wrong term.
BOUND = 1e-12

OPTIONS = {
    "addition": dict(),
    "multiplicative": dict(integration_mode="multiplicative_integration"),
    "no biases": dict(bias=False),
    "independent": dict(independent_recurrence=True),
    "multiplicative, only bias_mh": dict(integration_mode="multiplicative_integration", bias=False,
                                         multiplicative_bias=True),
}


@pytest.fixture(scope="module", autouse=True)
def compiled():
    built, reason = bt.compiled_cpu_loops()
    if not built:
        pytest.skip(f"the C++ loops (and the one-step kernel with them) are not built here: {reason}")


def assert_close(got, want):
    __tracebackhide__ = True
    assert got.shape == want.shape and got.dtype == want.dtype
    error, where = relative_error(got.detach().numpy(), want.detach().numpy())
    assert error <= BOUND, f"relative error {error:.2e} at {where} > {BOUND:.0e}"


def reference_step(cell, x, state):
    """The plain step, run with autograd recording (the parameters require grad), detached."""
    with torch.enable_grad():
        h, c = cell(x, state)
    assert h.grad_fn is not None  # the plain path ran
    return h.detach(), c.detach()


@pytest.fixture
def no_plain_step(monkeypatch):
    """Fails a test in which the plain step runs where the kernel should."""
    def refuse(*args, **kwargs):
        raise AssertionError("the plain step ran instead of the compiled one")

    monkeypatch.setattr(modules, "plain_step", refuse)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
@pytest.mark.parametrize("batch", [1, 3])
def test_cell_kernel_equals_the_plain_step(options, batch, mode):
    torch.manual_seed(0)
    cell = bt.MLSTMCell(5, 7, dtype=torch.float64, **options)
    with torch.no_grad():
        for p in cell.parameters():  # biases away from their zero start, so that each one counts
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(batch, 5, dtype=torch.float64)
    state = (torch.randn(batch, 7, dtype=torch.float64), torch.randn(batch, 7, dtype=torch.float64))
    want = reference_step(cell, x, state)
    with mode():
        got = cell(x, state)
        zero_state = cell(x)
    for g, w in zip(got, want):
        assert_close(g, w)
        assert not g.requires_grad
    for g, w in zip(zero_state, reference_step(cell, x, None)):
        assert_close(g, w)


def test_cell_kernel_runs_without_autograd_only(no_plain_step):
    torch.manual_seed(1)
    cell = bt.MLSTMCell(4, 6, dtype=torch.float64)
    x = torch.randn(1, 4, dtype=torch.float64)
    with torch.no_grad():
        cell(x)  # the kernel (no_plain_step fails the test otherwise)
    cell.requires_grad_(False)
    cell(x)  # nothing requires a gradient: the kernel too
    with pytest.raises(AssertionError, match="the plain step ran"):
        cell(x.requires_grad_())  # the input requires one: the plain step, for autograd


def test_cell_gradients_unchanged_beside_the_kernel():
    torch.manual_seed(2)
    cell = bt.MLSTMCell(4, 6, dtype=torch.float64)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    state = (torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64))
    with torch.no_grad():
        values = cell(x, state)
    h, c = cell(x, state)
    for g, w in zip((h, c), values):
        assert_close(g, w)
    (h.sum() + c.sum()).backward()
    grads = [x.grad] + [p.grad for p in cell.parameters()]
    # against the plain step written out from torch operations
    want_x = x.detach().clone().requires_grad_()
    params = {name: p.detach().clone().requires_grad_() for name, p in cell.named_parameters()}
    p = torch.nn.functional.linear(want_x, params["weight_ih"], params["bias_ih"])
    h2, c2 = modules.plain_step(p, *state, params["weight_hh"], params["weight_mh"], params["bias_hh"],
                                params["bias_mh"], False)
    (h2.sum() + c2.sum()).backward()
    for got, want in zip(grads, [want_x.grad] + [q.grad for q in params.values()]):
        assert_close(got, want)


def test_a_weight_changed_in_place_between_calls_is_used():
    torch.manual_seed(3)
    cell = bt.MLSTMCell(4, 6, dtype=torch.float64)
    x = torch.randn(1, 4, dtype=torch.float64)
    state = (torch.randn(1, 6, dtype=torch.float64), torch.randn(1, 6, dtype=torch.float64))  # h = 0 hides W_hh
    with torch.no_grad():
        before = cell(x, state)[0]
        for name in ("weight_ih", "weight_hh", "weight_mh", "bias_ih", "bias_hh", "bias_mh"):
            getattr(cell, name).add_(0.25)  # in place: the same tensor, a new _version
            after = cell(x, state)[0]
            assert not torch.equal(after, before), name
            assert_close(after, reference_step(cell, x, state)[0])
            before = after


def test_float32_and_non_contiguous_inputs():
    torch.manual_seed(4)
    cell = bt.MLSTMCell(5, 8)
    xs = torch.randn(3, 4, 5)[:, 1]  # a strided (3, 5) view
    state = tuple(torch.randn(8, 3).t() for _ in range(2))  # transposed views
    with torch.no_grad():
        h, c = cell(xs, state)
    want = reference_step(cell, xs, state)
    assert h.dtype == torch.float32
    assert torch.allclose(h, want[0], rtol=1e-5, atol=1e-6) and torch.allclose(c, want[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_layer_on_one_step_equals_its_plain_path(bidirectional, batch_first, monkeypatch):
    torch.manual_seed(5)
    layer = bt.MLSTM(3, 5, num_layers=2, bidirectional=bidirectional, batch_first=batch_first, dtype=torch.float64)
    plain = bt.MLSTM.from_canonical(layer.to_canonical(), bidirectional=bidirectional, batch_first=batch_first,
                                    fused=False)
    x = torch.randn((2, 1, 3) if batch_first else (1, 2, 3), dtype=torch.float64)  # one step, batch 2
    count = 4 if bidirectional else 2
    state = (torch.randn(count, 2, 5, dtype=torch.float64), torch.randn(count, 2, 5, dtype=torch.float64))
    with monkeypatch.context() as patch, torch.no_grad():
        def refuse(*args, **kwargs):
            raise AssertionError("the plain layer ran instead of the compiled step")

        patch.setattr(modules, "plain_layer", refuse)
        got_output, (got_h, got_c) = layer(x, state)
    with torch.no_grad():
        want_output, (want_h, want_c) = plain(x, state)  # fused=False: the plain path, as asked
    for got, want in ((got_output, want_output), (got_h, want_h), (got_c, want_c)):
        assert_close(got, want)


@pytest.mark.parametrize("options", [dict(integration_mode="multiplicative_integration"),
                                     dict(peepholes=True, cell_clip=0.9, proj_size=6, proj_clip=0.4)],
                         ids=["multiplicative", "variants"])
@pytest.mark.parametrize("kind", ["packed", "plain", "onednn"])
def test_every_kind_of_product_computes_the_layer(kind, options, monkeypatch):
    """The products run on an MKL-packed weight, on plain MKL or on oneDNN, whichever measured faster
    for the shape (cpu_loops.cpp); MLSTM_TORCH_STEP_GEMM fixes the kind, and the choices report it.
    Either must give the layer's float32 results, forward and backward, against the same layer in
    float64 (MKL's double products there). Every parameter random: at default initialisation the biases
    are zero, and under multiplicative integration every h would then be exactly 0."""
    from backends.torch import build
    from mlstm_spec.conformance.tolerances import tolerance

    loops = build.cpu_loops()
    if kind == "onednn" and not loops.onednn_products():
        pytest.skip("this torch has no oneDNN linear operator (mkldnn::_linear_pointwise)")
    torch.manual_seed(6)
    inputs = 5 if options.get("integration_mode") else 7  # so that each case's products have their own shapes
    wide = bt.MLSTM(inputs, 8, batch_first=True, dtype=torch.float64, **options)
    with torch.no_grad():
        for parameter in wide.parameters():
            parameter.uniform_(-0.5, 0.5)
    narrow = bt.MLSTM.from_canonical(wide.to_canonical(), batch_first=True, dtype=torch.float32, **options)
    x = torch.randn(4, 6, inputs, dtype=torch.float64)
    results = {}
    for name, model in (("float64", wide), (kind, narrow)):
        if name == kind:
            monkeypatch.setenv("MLSTM_TORCH_STEP_GEMM", kind)
        given = x.to(model.weight_ih_l0.dtype).clone().requires_grad_()
        output, (h_n, c_n) = model(given)
        (output.sum() + c_n.sum()).backward()
        results[name] = [output, h_n, c_n, given.grad] + [p.grad for p in model.parameters()]
    bound = tolerance("float32", "cpu")
    for got, want in zip(results[kind], results["float64"]):
        error, where = relative_error(got.detach().double().numpy(), want.detach().numpy())
        assert error <= bound, f"relative error {error:.2e} at {where} > {bound:.0e}"
    threads = torch.get_num_threads()
    steps = {(rows, n, k): chosen for rows, n, k, count, chosen in loops.step_gemm_choices() if count == threads}
    assert steps.get((4, 32, 8)) == kind, "a = m W_mh^T, (4 x 8) by (8 x 32), did not run as fixed"
    sequences = {(n, k): chosen for n, k, count, chosen in loops.sequence_gemm_choices() if count == threads}
    assert sequences.get((40, inputs)) == ("onednn" if kind == "onednn" else "mkl"), "x W_ih^T did not run as fixed"
    gradients = {(n, k): chosen for n, k, count, chosen in loops.gradient_gemm_choices() if count == threads}
    assert gradients.get((40, inputs)) == ("onednn" if kind == "onednn" else "mkl"), "d W_ih did not run as fixed"


@pytest.mark.parametrize("options", [{}, dict(proj_size=6)], ids=["default", "projection"])
def test_weight_gradients_on_onednn_add_up_over_several_chunks(options, monkeypatch, two_threads):
    """On oneDNN the weight gradients are summed over chunks of 1024 rows (cpu_loops.cpp,
    weight_gradient): 1200 rows here, so two chunks, the second a partial one. Each chunk is transposed
    first, its columns split across the two threads (transpose_into: 120 columns of d_p, 64 per piece)."""
    from backends.torch import build
    from mlstm_spec.conformance.tolerances import tolerance

    loops = build.cpu_loops()
    if not loops.onednn_products():
        pytest.skip("this torch has no oneDNN linear operator (mkldnn::_linear_pointwise)")
    torch.manual_seed(9)
    wide = bt.MLSTM(5, 24, dtype=torch.float64, **options)
    narrow = bt.MLSTM.from_canonical(wide.to_canonical(), dtype=torch.float32, **options)
    x = torch.randn(30, 40, 5, dtype=torch.float64)  # T * B = 1200 rows
    grads = {}
    for name, model in (("float64", wide), ("onednn", narrow)):
        if name == "onednn":
            monkeypatch.setenv("MLSTM_TORCH_STEP_GEMM", "onednn")
        model(x.to(model.weight_ih_l0.dtype))[0].sum().backward()
        grads[name] = {key: p.grad for key, p in model.named_parameters() if key.startswith("weight")}
    bound = tolerance("float32", "cpu")
    for key, want in grads["float64"].items():
        error, where = relative_error(grads["onednn"][key].double().numpy(), want.numpy())
        assert error <= bound, f"{key}: relative error {error:.2e} at {where} > {bound:.0e}"
    chosen = {(n, k): kind for n, k, threads, kind in loops.gradient_gemm_choices()
              if threads == torch.get_num_threads()}
    assert chosen.get((120, 5)) == "onednn"


def test_the_measured_choices_are_reported(monkeypatch):
    monkeypatch.delenv("MLSTM_TORCH_STEP_GEMM", raising=False)
    from backends.torch import build

    model = bt.MLSTM(3, 24, num_layers=1)  # a hidden size no other test uses: shapes not measured yet
    with torch.no_grad():
        model(torch.randn(5, 7, 3))
    choices = {(rows, n, k): kind for rows, n, k, threads, kind in build.cpu_loops().step_gemm_choices()
               if threads == torch.get_num_threads()}
    # r = h W_hh^T: (7 x 24) by (24 x 24); a = m W_mh^T: (7 x 24) by (24 x 96)
    kinds = ("packed", "plain", "onednn")
    assert choices.get((7, 24, 24)) in kinds and choices.get((7, 96, 24)) in kinds


# ---- the element-wise passes on torch's OpenMP threads (build.openmp) ------------------------------------


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_the_loops_join_torchs_own_openmp_runtime(two_threads):
    """Where build.openmp() allows it, the extension's at::parallel_for runs on torch's threads; in every
    case the process maps one OpenMP runtime at most (a second would compete with torch's threads)."""
    from backends.torch import build

    runtimes = build.openmp_runtimes_loaded()
    assert len(runtimes) <= 1, f"more than one OpenMP runtime in the process: {runtimes}"
    flags, why = build.openmp()
    threads = build.cpu_loops().parallel_for_threads(2)
    if not flags:
        assert threads == 1
        pytest.skip(f"the C++ loops are built without OpenMP here: {why}")
    assert threads == 2, "built with OpenMP, yet at::parallel_for ran on one thread"


VARIANTS = dict(proj_size=24, peepholes=True, cell_clip=0.9, proj_clip=0.4, forget_bias=0.5)


@pytest.mark.parametrize("options", [dict(), dict(integration_mode="multiplicative_integration"), VARIANTS,
                                     dict(VARIANTS, integration_mode="multiplicative_integration")],
                         ids=["addition", "multiplicative", "variants", "variants, multiplicative"])
def test_rows_split_across_threads_compute_the_layer(options, two_threads):
    """A batch large enough for the per-step passes to split their rows across two threads (more than
    4096 / H rows: here 300 rows of H = 32, so two pieces of 150), training forward and backward, against
    the same layer's Python loops in float64: a piece that wrote or read another's rows would differ
    by O(1)."""
    from backends.torch import build

    if build.cpu_loops().parallel_for_threads(2) < 2:
        pytest.skip(f"the C++ loops are built without OpenMP here: {build.openmp()[1]}")
    torch.manual_seed(3)
    compiled = bt.MLSTM(5, 32, num_layers=2, dtype=torch.float64, **options)
    with torch.no_grad():  # every parameter, biases too: under multiplicative integration zero biases
        for parameter in compiled.parameters():  # and a zero state would keep every h at exactly 0
            parameter.uniform_(-0.5, 0.5)
    python = bt.MLSTM(5, 32, num_layers=2, dtype=torch.float64, cpu_loops="python", **options)
    python.load_state_dict(compiled.state_dict())
    x = torch.randn(4, 300, 5, dtype=torch.float64)
    state = (torch.randn(2, 300, compiled.proj_size or 32, dtype=torch.float64),
             torch.randn(2, 300, 32, dtype=torch.float64))
    results = {}
    for name, model in (("compiled", compiled), ("python", python)):
        given = x.clone().requires_grad_(True)
        output, (h, c) = model(given, state)
        (output.square().sum() + h.sum() + c.sum()).backward()
        results[name] = [output, h, c, given.grad, *(p.grad for p in model.parameters())]
    for got, want in zip(results["compiled"], results["python"]):
        assert_close(got, want)
