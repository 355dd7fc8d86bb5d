"""Devices, and the conformance adapter of the torch backend (on :class:`backends._common.AdapterBase`)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.utils.rnn as nn_rnn

from backends._common import DTYPES, VARIANT_OPTIONS, AdapterBase, as_numpy

from .build import compiled_cpu_loops
from .modules import MLSTM, to_tensor


def devices() -> list[str]:
    """The devices torch sees: ``["cpu"]`` plus ``"cuda:k"`` for every visible GPU."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{k}" for k in range(torch.cuda.device_count())]
    return found


def describe_device(device: str) -> str:
    """The GPU's model for a CUDA device; the device name otherwise."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return device


def versions() -> dict:
    """What a report should name: torch's version and which CPU loops the fused layer runs."""
    return {"torch": torch.__version__, "backends.torch CPU loops": compiled_cpu_loops()[1]}


def _precision_flags() -> list:
    """(object, attribute, value for full float32) of every setting that lets float32 run as TF32: the
    ``fp32_precision`` API where torch has it (mixing it with the legacy flags raises there), else the
    legacy ``allow_tf32`` flags."""
    backends = torch.backends
    if hasattr(backends.cuda.matmul, "fp32_precision"):
        return [(backends.cuda.matmul, "fp32_precision", "ieee"),
                (backends.cudnn.conv, "fp32_precision", "ieee"),
                (backends.cudnn.rnn, "fp32_precision", "ieee")]
    return [(backends.cuda.matmul, "allow_tf32", False), (backends.cudnn, "allow_tf32", False)]


@contextlib.contextmanager
def full_float32():
    """Within the block float32 matrix products are float32 (no TF32); every setting is restored."""
    flags = _precision_flags()
    saved = [getattr(owner, name) for owner, name, _ in flags]
    try:
        for owner, name, value in flags:
            setattr(owner, name, value)
        yield
    finally:
        for (owner, name, _), value in zip(flags, saved):
            setattr(owner, name, value)


def _cpu_float16_works() -> bool:
    try:
        a = torch.ones(2, 2, dtype=torch.float16)
        return bool(torch.addmm(a[0], a, a).sum().item() == 12)
    except RuntimeError:
        return False


class ConformanceAdapter(AdapterBase):
    """The conformance suite's adapter for :class:`MLSTM` on one device: the layer built through
    :meth:`MLSTM.from_canonical` with ``batch_first=True``, every call under :func:`full_float32`
    (restored afterwards). ``fused=False`` checks the plain path, ``python_loops=True`` the fused
    layer's Python loops on CPU.

    Two more configurations check what nn.LSTM users rely on, against the same spec:

    - ``direction="reverse"``: the reverse direction of a one-layer bidirectional layer (both directions
      get the suite's parameters) is fed the time-reversed sequence; its half of the output, reversed
      back, and its final state must be the spec's forward over the suite's sequence.
    - ``packed=True``: the suite's sequences go in as a :class:`~torch.nn.utils.rnn.PackedSequence`
      together with as many shorter decoy sequences (random values, unsorted), so that the steps run in
      segments over the sequences still going; the suite's rows of the output and final states must be
      the spec's.
    """

    name = "torch"
    variants = frozenset(VARIANT_OPTIONS)

    def __init__(self, device: str = "cpu", *, fused: bool = True, python_loops: bool = False,
                 direction: str = "forward", packed: bool = False):
        super().__init__(device)
        if direction not in ("forward", "reverse"):
            raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
        self.fused, self.python_loops, self.direction, self.packed = fused, python_loops, direction, bool(packed)
        self.torch_device = torch.device(self.device)
        cpu = self.torch_device.type == "cpu"
        self.dtypes = tuple(d for d in DTYPES if d != "float16" or not cpu or _cpu_float16_works())
        if direction == "reverse":
            self.max_layers = 1  # a second bidirectional layer takes both directions' outputs (2H)
        if packed:
            self.batched_only = True

    def precision(self):
        return full_float32()

    def build(self, layers, integration_mode, **runtime):
        options = dict(integration_mode=integration_mode, batch_first=True, device=self.torch_device,
                       fused=self.fused, cpu_loops="python" if self.python_loops else "compiled", **runtime)
        if self.direction == "reverse":
            return MLSTM.from_canonical([layers[0], layers[0]], bidirectional=True, **options)
        return MLSTM.from_canonical(layers, **options)

    def _tensor(self, array, requires_grad=False):
        return to_tensor(np.asarray(array)).to(self.torch_device).requires_grad_(requires_grad)

    def _call(self, model, x, state):
        """The model on the suite's x (B, T, I) and state ((L, B, H) pairs): hs, h_n, c_n of the
        configuration's direction, for the suite's rows."""
        if self.direction == "reverse":
            state = None if state is None else tuple(torch.cat([s, s]) for s in state)
            out, (h_n, c_n) = model(x.flip(-2), state)
            return out[..., model.output_size:].flip(-2), h_n[1:], c_n[1:]
        if not self.packed:
            return self._plain_call(model, x, state)
        B, T = x.shape[0], x.shape[1]
        # decoys both shorter and longer (the first) than the suite's sequences, which are padded with
        # random values: a layer that ran the suite's rows past their length would change their states
        decoy_lengths = [T + 2] + [1 + (b * 7 + 3) % (T + 2) for b in range(1, B)]
        random = torch.randn(2 * B, T + 2, x.shape[2], generator=torch.Generator().manual_seed(0),
                             dtype=torch.float64).to(x.dtype).to(x.device)
        rows = torch.cat([torch.cat([x, random[:B, T:]], 1), random[B:]])
        order = torch.randperm(2 * B, generator=torch.Generator().manual_seed(T))  # row j of the batch
        lengths = torch.tensor([T] * B + decoy_lengths)[order]
        if state is not None:
            state = tuple(torch.cat([s, torch.zeros_like(s)], 1)[:, order] for s in state)
        packed = nn_rnn.pack_padded_sequence(rows[order], lengths, batch_first=True, enforce_sorted=False)
        out, (h_n, c_n) = model(packed, state)
        out = nn_rnn.pad_packed_sequence(out, batch_first=True, total_length=T + 2)[0]
        where = torch.argsort(order)[:B]  # the suite's rows
        return out[where, :T], h_n[:, where], c_n[:, where]

    @staticmethod
    def _plain_call(model, x, state):
        out, (h_n, c_n) = model(x, state)
        return out, h_n, c_n

    def run(self, model, xs, state):
        with torch.no_grad():
            state = None if state is None else tuple(self._tensor(s) for s in state)
            out, h_n, c_n = self._call(model, self._tensor(xs), state)
        return as_numpy(out), as_numpy(h_n), as_numpy(c_n)

    def pullback(self, model, xs, state, d_hs, d_state):
        x, h0, c0 = (self._tensor(a, True) for a in (xs, *state))
        out, h_n, c_n = self._call(model, x, (h0, c0))
        loss = sum((value * self._tensor(weight)).sum()
                   for value, weight in ((out, d_hs), (h_n, d_state[0]), (c_n, d_state[1])))
        if self.direction == "reverse":
            named = [(0, name, p) for name, p in model.layer_parameters(1).items()]
        else:
            named = [(k, name, p) for k in range(model.num_layers) for name, p in model.layer_parameters(k).items()]
        grads = torch.autograd.grad(loss, [x, h0, c0] + [p for _, _, p in named])
        per_layer = [{} for _ in range(len(d_state[0]))]
        for (k, name, _), grad in zip(named, grads[3:]):
            per_layer[k][name] = as_numpy(grad)
        return per_layer, as_numpy(grads[0]), as_numpy(grads[1]), as_numpy(grads[2])
