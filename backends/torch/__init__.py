"""The PyTorch backend of the mLSTM: :class:`MLSTMCell` and :class:`MLSTM`, used like ``torch.nn.LSTMCell``
and ``torch.nn.LSTM``; the equations are in docs/equations.md.

The recurrence has two implementations that compute the same function:

- the **fused** path (default): one custom operator per layer (``fused.py``) runs the whole time loop
  (the input projection hoisted out of it, one matrix product per chunk of steps; then per step two
  matrix products and in-place element-wise work into preallocated buffers), and its registered
  backward is the analytic back-propagation through time of :func:`mlstm_spec.equations.run_backward`,
  with every weight gradient formed as one matrix product over all steps at the end. It is one opaque
  node to ``torch.compile`` and to autograd. On CPU (float32 and float64) its loops run in C++
  (``cpu_loops.cpp``, compiled on first use, see :func:`compiled_cpu_loops`); elsewhere, and where no
  compiler is found, the same loops run in Python (``loops.py``).
- the **plain** path (``plain.py``): the same equations as ordinary differentiable torch operations, one
  step at a time. It is used under ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``, ...) and
  ``torch.jit.trace``, when the layer is built with ``fused=False``, where it is cheaper (one step, as
  in generation), by :class:`MLSTMCell`, and inside the fused operator's backward when a graph of the
  gradient is asked for (second derivatives); during ONNX export its steps run as one ``scan``.

docs/torch.md is the nn.LSTM compatibility table (bidirectional, PackedSequence, export, first use).

float16 and bfloat16 layers compute in float32 and round their results once. Importing this package
changes no global torch setting (threads, TF32, default dtype); the conformance adapter turns TF32 off
around each of its calls only, and restores it.

Files: ``modules.py`` (the layers), ``fused.py`` (the operators), ``tape.py`` (what the forward keeps for
the backward), ``loops.py`` (the Python loops), ``cpu_loops.cpp`` + ``build.py`` (the C++ loops),
``plain.py`` (the plain path), ``variants.py`` (the fused operators of a layer with the spec's variants:
projection, peepholes, clipping, forget bias; Python loops), ``cuda_graph.py`` (CUDA-graph replay, ``MLSTM(..., cuda_graph=True)``),
``adapter.py`` (devices and the conformance adapter).
"""

from .adapter import ConformanceAdapter, describe_device, devices, full_float32, versions
from .build import CPU_LOOPS_VARIABLE, compiled_cpu_loops
from .modules import MLSTM, MLSTMCell

__all__ = ["CPU_LOOPS_VARIABLE", "MLSTM", "ConformanceAdapter", "MLSTMCell", "compiled_cpu_loops",
           "describe_device", "devices", "full_float32", "versions"]
