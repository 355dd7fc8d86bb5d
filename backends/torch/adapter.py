"""Devices, and the conformance adapter of the torch backend (on :class:`backends._common.AdapterBase`)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from backends._common import DTYPES, AdapterBase, as_numpy

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
    layer's Python loops on CPU."""

    name = "torch"

    def __init__(self, device: str = "cpu", *, fused: bool = True, python_loops: bool = False):
        super().__init__(device)
        self.fused, self.python_loops = fused, python_loops
        self.torch_device = torch.device(self.device)
        cpu = self.torch_device.type == "cpu"
        self.dtypes = tuple(d for d in DTYPES if d != "float16" or not cpu or _cpu_float16_works())

    def precision(self):
        return full_float32()

    def build(self, layers, integration_mode):
        return MLSTM.from_canonical(layers, integration_mode=integration_mode, batch_first=True,
                                    device=self.torch_device, fused=self.fused,
                                    cpu_loops="python" if self.python_loops else "compiled")

    def _tensor(self, array, requires_grad=False):
        return to_tensor(np.asarray(array)).to(self.torch_device).requires_grad_(requires_grad)

    def run(self, model, xs, state):
        with torch.no_grad():
            state = None if state is None else tuple(self._tensor(s) for s in state)
            out, (h_n, c_n) = model(self._tensor(xs), state)
        return as_numpy(out), as_numpy(h_n), as_numpy(c_n)

    def pullback(self, model, xs, state, d_hs, d_state):
        x, h0, c0 = (self._tensor(a, True) for a in (xs, *state))
        out, (h_n, c_n) = model(x, (h0, c0))
        loss = sum((value * self._tensor(weight)).sum()
                   for value, weight in ((out, d_hs), (h_n, d_state[0]), (c_n, d_state[1])))
        named = [(k, name, p) for k in range(model.num_layers) for name, p in model.layer_parameters(k).items()]
        grads = torch.autograd.grad(loss, [x, h0, c0] + [p for _, _, p in named])
        per_layer = [{} for _ in range(model.num_layers)]
        for (k, name, _), grad in zip(named, grads[3:]):
            per_layer[k][name] = as_numpy(grad)
        return per_layer, as_numpy(grads[0]), as_numpy(grads[1]), as_numpy(grads[2])
