"""CUDA-graph replay of a layer's inference calls: capture once per call signature, replay after.

On a GPU the fused layer's time loop is Python code that launches about ten small kernels per step
(about a thousand for T = 100), each costing the CPU several microseconds, which at moderate sizes is
more than the GPU spends on a step's arithmetic. A CUDA graph records those launches once and
replays them with a single call.

A replay runs exactly the recorded kernels on the recorded memory. A graph therefore serves only calls
with the same shapes, dtypes, devices and modes, and parameters at the same addresses; these form the
key of :class:`GraphCache` (an optimiser's in-place update keeps the addresses, so replays see the new
values). Values may change freely: each call copies its tensors into the graph's input buffers,
replays, and returns copies of the graph's output buffers, so results of earlier calls are never
overwritten.

Only calls that record no autograd graph are captured (under ``torch.no_grad()`` or
``torch.inference_mode()``, or with nothing requiring a gradient): see :func:`graph_eligible`.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

#: Graphs a layer keeps (least recently used dropped first); each holds its own memory pool.
MAX_GRAPHS = 8
#: Eager calls on a side stream before capture: lazy initialisation (cuBLAS handles and workspaces,
#: allocator blocks) must not happen inside the capture.
WARMUP_CALLS = 2


def _signature(value: Optional[Tensor]):
    # no strides: a call's tensors are copied into the graph's own contiguous buffers
    return None if value is None else (tuple(value.shape), value.dtype, value.device)


def parameter_key(parameters: Sequence[Tensor]) -> tuple:
    """Addresses, shapes, strides and dtypes of the parameters: what a graph has baked in."""
    return tuple((p.data_ptr(), tuple(p.stride())) + _signature(p) for p in parameters)


def on_cuda(tensors: Sequence[Tensor]) -> bool:
    return all(t.is_cuda for t in tensors)


def graph_eligible(tensors: Sequence[Optional[Tensor]], parameters: Sequence[Tensor]) -> bool:
    """Whether a call with these tensors can replay a graph: all on CUDA, no autograd graph to record,
    not inside ``torch.compile`` tracing or another graph's capture."""
    present = [t for t in tensors if t is not None]
    if not present or not on_cuda(present):
        return False
    if torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in [*present, *parameters]):
        return False
    return True


class CapturedCall:
    """``function(*tensors)`` captured in one CUDA graph, with the graph's input and output buffers."""

    def __init__(self, function: Callable, tensors: Sequence[Optional[Tensor]]):
        self.inputs = [None if t is None else t.detach().clone(memory_format=torch.contiguous_format)
                       for t in tensors]
        self._warm_up(function)
        self.graph, self.outputs = self._record(function)

    def _warm_up(self, function: Callable) -> None:
        device = next(t for t in self.inputs if t is not None).device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                function(*self.inputs)
        torch.cuda.current_stream(device).wait_stream(side)

    def _record(self, function: Callable):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = function(*self.inputs)
        return graph, outputs

    def __call__(self, tensors: Sequence[Optional[Tensor]]):
        for buffer, value in zip(self.inputs, tensors):
            if buffer is not None:
                buffer.copy_(value)
        self.graph.replay()
        return tree_map(lambda out: out.clone() if isinstance(out, Tensor) else out, self.outputs)


class GraphCache:
    """One layer's captured calls, keyed by the tensors' shapes, strides, dtypes and devices plus
    whatever else the caller says the launches depend on (``key``)."""

    def __init__(self, max_graphs: int = MAX_GRAPHS, capture: Optional[Callable] = None):
        self.max_graphs = max_graphs
        self.capture = capture  # None: CapturedCall
        self.captures = 0  # graphs captured so far (a capture after eviction counts again)
        self._graphs: collections.OrderedDict = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._graphs)

    def __getstate__(self) -> dict:
        # a copy of a layer (pickling, copy.deepcopy) starts with no graphs: they hold the original's
        # parameter addresses and CUDA objects that cannot be copied
        return {"max_graphs": self.max_graphs, "capture": self.capture, "captures": 0,
                "_graphs": collections.OrderedDict()}

    def clear(self) -> None:
        """Drop every graph (and with it the GPU memory it holds)."""
        self._graphs.clear()

    def run(self, function: Callable, tensors: Sequence[Optional[Tensor]], key=()):
        """``function(*tensors)``, replayed from the graph for this signature (captured first if new)."""
        full_key = (tuple(_signature(t) for t in tensors), key)
        captured = self._graphs.get(full_key)
        if captured is None:
            captured = (self.capture or CapturedCall)(function, tensors)
            self.captures += 1
            self._graphs[full_key] = captured
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(full_key)
        return captured(tensors)
