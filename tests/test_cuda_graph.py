"""The torch layer's CUDA-graph path: ``MLSTM(..., cuda_graph=True)`` and ``backends/torch/cuda_graph.py``.

On a GPU: the conformance suite through the graph path, and replays against the eager layer. On the
CPU: everything but the CUDA calls themselves, with a stand-in for the graph that does what a replay
does (recompute on the captured input buffers, write into the captured output tensors); and that the
option changes nothing where it does not apply.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

from helpers import assert_gpu_present, conformance_params, device_params, require_backend, run_conformance

bt = require_backend("torch")

import torch  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from backends.torch import cuda_graph  # noqa: E402
from mlstm_spec.conformance.tolerances import relative_error, tolerance  # noqa: E402


class ReplayOnCPU(cuda_graph.CapturedCall):
    """CapturedCall with the CUDA calls replaced: "recording" runs the function once on the input
    buffers; a "replay" runs it again on them and writes into the recorded output tensors."""

    def _warm_up(self, function):
        pass

    def _record(self, function):
        outputs = function(*self.inputs)
        call = self

        class Graph:
            def replay(self):
                for old, new in zip(tree_flatten(outputs)[0], tree_flatten(function(*call.inputs))[0]):
                    old.copy_(new)

        return Graph(), outputs


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    monkeypatch.setattr(cuda_graph, "CapturedCall", ReplayOnCPU)
    monkeypatch.setattr(cuda_graph, "on_cuda", lambda tensors: True)


def pair(seed):
    """A layer with cuda_graph=True and an eager twin with the same weights, both running the Python
    loops that run on GPUs."""
    torch.manual_seed(seed)
    graphed = bt.MLSTM(3, 4, num_layers=2, cpu_loops="python", cuda_graph=True)
    eager = bt.MLSTM(3, 4, num_layers=2, cpu_loops="python")
    eager.load_state_dict(graphed.state_dict())
    return graphed, eager


def assert_same(got, want):
    for a, b in zip(tree_flatten(got)[0], tree_flatten(want)[0]):
        assert torch.equal(a, b), (a, b)


def test_replays_see_new_values_and_leave_earlier_results_alone(graphs_on_cpu):
    graphed, eager = pair(0)
    x1, x2 = torch.randn(5, 2, 3), torch.randn(5, 2, 3)
    with torch.no_grad():
        first = graphed(x1)
        second = graphed(x2)
        assert graphed.cuda_graphs.captures == 1  # one signature: captured once, replayed after
        assert_same(second, eager(x2))
        assert_same(first, eager(x1))  # the second replay did not overwrite the first call's results
        state = (torch.randn(2, 2, 4), torch.randn(2, 2, 4))
        assert_same(graphed(x1, state), eager(x1, state))
        assert graphed.cuda_graphs.captures == 2  # a given state is another signature
        x3 = torch.randn(7, 2, 3)
        assert_same(graphed(x3), eager(x3))
        assert graphed.cuda_graphs.captures == 3


def test_calls_that_record_gradients_run_eagerly(graphs_on_cpu):
    graphed, eager = pair(1)
    x = torch.randn(4, 2, 3)
    out, _ = graphed(x)
    assert out.requires_grad and graphed.cuda_graphs.captures == 0
    with torch.inference_mode():
        assert_same(graphed(x), eager(x))
    assert graphed.cuda_graphs.captures == 1


def test_in_place_updates_are_seen_and_moved_parameters_drop_the_graphs(graphs_on_cpu):
    graphed, eager = pair(2)
    x = torch.randn(4, 2, 3)
    with torch.no_grad():
        graphed(x)
        for p, q in zip(graphed.parameters(), eager.parameters()):  # an optimiser step: same addresses
            p.add_(0.5)
            q.add_(0.5)
        assert_same(graphed(x), eager(x))
        assert graphed.cuda_graphs.captures == 1
        graphed.double()
        assert len(graphed.cuda_graphs) == 0
        assert_same(graphed(x.double()), eager.double()(x.double()))


def test_graph_cache_keeps_the_most_recently_used():
    cache = cuda_graph.GraphCache(max_graphs=3, capture=ReplayOnCPU)
    twice = lambda a: (a * 2,)  # noqa: E731

    def call(n):
        (out,) = cache.run(twice, (torch.full((n,), float(n)),))
        assert torch.equal(out, torch.full((n,), 2.0 * n))

    for n in (1, 2, 3, 1, 4):  # 1 used again after 3, so 2 is the least recently used when 4 comes
        call(n)
    assert len(cache) == 3 and cache.captures == 4
    call(1)
    assert cache.captures == 4  # kept
    call(2)
    assert cache.captures == 5  # was dropped, captured again


def test_copies_of_a_layer_start_without_graphs(graphs_on_cpu):
    graphed, eager = pair(3)
    x = torch.randn(4, 2, 3)
    with torch.no_grad():
        graphed(x)
        for twin in (copy.deepcopy(graphed), pickle.loads(pickle.dumps(graphed))):
            assert len(twin.cuda_graphs) == 0 and twin.cuda_graph
            assert_same(twin(x), eager(x))


def test_on_cpu_the_option_changes_nothing():
    graphed, eager = pair(4)
    x = torch.randn(4, 2, 3)
    with torch.no_grad():
        assert_same(graphed(x), eager(x))
    assert graphed.cuda_graphs.captures == 0
    assert "cuda_graph=True" in repr(graphed)
    with pytest.raises(TypeError, match="cuda_graph must be a bool, got str 'yes'"):
        bt.MLSTM(3, 4, cuda_graph="yes")


# ---- on a GPU ----

class GraphedAdapter(bt.ConformanceAdapter):
    """The torch adapter with the layer's CUDA-graph path on: its forward checks run under
    torch.no_grad(), so each replays a captured graph (the gradient checks run eagerly)."""

    name = "torch (CUDA graphs)"

    def build(self, layers, integration_mode):
        model = super().build(layers, integration_mode)
        model.cuda_graph = True
        return model


@pytest.mark.parametrize(("device", "dtype"), [p for p in conformance_params(bt)
                                               if p.values[0] != "cpu"])
def test_conformance_through_cuda_graphs(device, dtype):
    run_conformance(GraphedAdapter, device, dtype)


@pytest.mark.parametrize("device", [p for p in device_params(bt) if p.values[0] != "cpu"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_replays_match_the_eager_layer_on_gpu(device, dtype):
    assert_gpu_present(device)
    graphed, eager = (m.to(device=device, dtype=getattr(torch, dtype)) for m in pair(5))
    with torch.no_grad(), bt.full_float32():
        for T in (3, 3, 9, 3):
            x = torch.randn(T, 2, 3, device=device, dtype=getattr(torch, dtype))
            for got, want in zip(tree_flatten(graphed(x))[0], tree_flatten(eager(x))[0]):
                error, where = relative_error(got.cpu().numpy(), want.cpu().numpy())
                assert error <= tolerance(dtype, device), f"T={T}: {error:.2e} at {where}"
    assert graphed.cuda_graphs.captures == 2 and len(graphed.cuda_graphs) == 2
