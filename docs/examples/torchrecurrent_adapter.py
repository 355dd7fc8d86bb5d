"""Check torchrecurrent's ``MultiplicativeLSTM`` against ``mlstm_spec`` with ``mlstm-conformance``.

The worked example of docs/conformance.md. From this directory::

    mlstm-conformance --impl torchrecurrent_adapter:make_adapter

An adapter takes the suite's NumPy inputs (canonical parameters in RecurrentLayers.jl's layout,
``xs`` of shape (B, T, I) or (T, I), a state ``(h0, c0)`` or None), runs the implementation, and hands
back NumPy arrays. Everything the implementation does differently from the canonical layout is
translated here, and only here:

- torchrecurrent uses the canonical parameter names and shapes, but another order of the gate blocks:
  its ``weight_ih`` / ``bias_ih`` rows are ``m, i, f, z, o`` (canonical: ``m, i, o, f, z``) and its
  ``weight_mh`` / ``bias_mh`` rows are ``i, f, z, o`` (canonical: ``i, o, f, z``);
- its layer wants 3-D input ``(B, T, I)`` with ``batch_first=True`` and a state of shape
  ``(num_layers, B, H)``, so unbatched cases get a batch axis of one;
- a switched-off bias is a buffer of zeros there and an absent key in the canonical mapping;
- it has neither independent recurrence (a vector ``weight_hh``) nor multiplicative integration, so
  ``supports()`` declines those cases and the suite never draws them.
"""

from __future__ import annotations

import numpy as np
import torch
from torchrecurrent import MultiplicativeLSTM

from mlstm_spec import IH_BLOCKS, MH_BLOCKS, block

TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16}


class TorchrecurrentAdapter:
    """torchrecurrent's ``MultiplicativeLSTM`` (stacks included) seen through the suite's protocol."""

    name = "torchrecurrent"
    #: torchrecurrent's block order of weight_ih / bias_ih and of weight_mh / bias_mh
    IH_ORDER = ("m", "i", "f", "z", "o")
    MH_ORDER = ("i", "f", "z", "o")

    def __init__(self, device: str = "cpu"):
        self.device = device
        # torchrecurrent also runs float16, in half precision throughout; its gradients then drift
        # past the suite's float16 tolerance (docs/conformance.md), so the example checks these two.
        self.dtypes = ("float64", "float32")

    def supports(self, options: dict) -> bool:
        return options["integration_mode"] == "addition" and not options["independent_recurrence"]

    # ---- canonical layout <-> torchrecurrent's ----

    def _permute(self, key: str, array: np.ndarray) -> np.ndarray:
        """A canonical array in torchrecurrent's block order."""
        if key in ("weight_ih", "bias_ih"):
            return np.concatenate([block(array, gate, IH_BLOCKS) for gate in self.IH_ORDER])
        if key in ("weight_mh", "bias_mh"):
            return np.concatenate([block(array, gate, MH_BLOCKS) for gate in self.MH_ORDER])
        return array

    def _unpermute(self, key: str, array: np.ndarray) -> np.ndarray:
        """An array in torchrecurrent's block order (a gradient) in the canonical order."""
        if key in ("weight_ih", "bias_ih"):
            return np.concatenate([block(array, gate, self.IH_ORDER) for gate in IH_BLOCKS])
        if key in ("weight_mh", "bias_mh"):
            return np.concatenate([block(array, gate, self.MH_ORDER) for gate in MH_BLOCKS])
        return array

    def _build(self, layers: list) -> MultiplicativeLSTM:
        first = layers[0]
        hidden_size = first["weight_hh"].shape[0]
        model = MultiplicativeLSTM(
            first["weight_ih"].shape[1], hidden_size, num_layers=len(layers), batch_first=True,
            bias="bias_ih" in first, recurrent_bias="bias_hh" in first,
            multiplicative_bias="bias_mh" in first,
            dtype=TORCH_DTYPES[first["weight_ih"].dtype.name], device=self.device,
        )
        with torch.no_grad():
            for cell, params in zip(model.cells, layers):
                for key, value in params.items():
                    getattr(cell, key).copy_(torch.from_numpy(self._permute(key, value)))
        return model

    # ---- running it ----

    def _run(self, params, xs, state, requires_grad: bool):
        layers = params if isinstance(params, list) else [params]
        model = self._build(layers)
        batched = xs.ndim == 3
        x = torch.tensor(xs if batched else xs[None], device=self.device, requires_grad=requires_grad)
        pairs = None if state is None else (state if isinstance(params, list) else [state])
        shape = (len(layers), x.shape[0], layers[0]["weight_hh"].shape[0])
        if pairs is None:
            h0 = torch.zeros(shape, dtype=x.dtype, device=self.device)
            c0 = torch.zeros(shape, dtype=x.dtype, device=self.device)
        else:
            h0 = torch.tensor(np.stack([np.reshape(h, shape[1:]) for h, _ in pairs]), device=self.device)
            c0 = torch.tensor(np.stack([np.reshape(c, shape[1:]) for _, c in pairs]), device=self.device)
        h0.requires_grad_(requires_grad)
        c0.requires_grad_(requires_grad)
        hs, (h_n, c_n) = model(x, (h0, c0))
        return model, layers, batched, x, (h0, c0), hs, (h_n, c_n)

    def forward(self, params, xs, state, *, integration_mode):
        _, layers, batched, _, _, hs, (h_n, c_n) = self._run(params, xs, state, requires_grad=False)
        unbatch = (lambda a: a) if batched else (lambda a: a[0])
        to_numpy = lambda t: unbatch(t.detach().cpu().numpy())  # noqa: E731
        finals = [(to_numpy(h_n[k]), to_numpy(c_n[k])) for k in range(len(layers))]
        return to_numpy(hs), (finals if isinstance(params, list) else finals[0])

    def gradients(self, params, xs, state, d_hs, d_state, *, integration_mode):
        model, layers, batched, x, (h0, c0), hs, (h_n, c_n) = self._run(params, xs, state, requires_grad=True)
        as_tensor = lambda a: torch.tensor(a if batched else a[None], device=self.device)  # noqa: E731
        loss = (hs * as_tensor(d_hs)).sum()
        if d_state is not None:
            d_pairs = d_state if isinstance(params, list) else [d_state]
            for k, (d_h, d_c) in enumerate(d_pairs):
                loss = loss + (h_n[k] * as_tensor(d_h)).sum() + (c_n[k] * as_tensor(d_c)).sum()
        loss.backward()
        unbatch = (lambda a: a) if batched else (lambda a: a[0])
        grads = []
        for k, (cell, canonical) in enumerate(zip(model.cells, layers)):
            layer = {key: self._unpermute(key, getattr(cell, key).grad.cpu().numpy()) for key in canonical}
            layer["h0"] = unbatch(h0.grad[k].cpu().numpy())
            layer["c0"] = unbatch(c0.grad[k].cpu().numpy())
            grads.append(layer)
        grads[0]["x"] = unbatch(x.grad.cpu().numpy())
        return grads if isinstance(params, list) else grads[0]


def make_adapter() -> TorchrecurrentAdapter:
    """The factory ``--impl torchrecurrent_adapter:make_adapter`` calls."""
    return TorchrecurrentAdapter("cuda:0" if torch.cuda.is_available() else "cpu")
