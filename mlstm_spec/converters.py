"""Converters between the canonical parameters and the layouts of other published mLSTM implementations.

A converter exists only where the other formulation is the same function with the parameters moved,
so that every value is copied bit for bit (row blocks reordered, matrices transposed) and nothing is
computed. Where the formulations differ (another output formula, another gate non-linearity,
weight normalisation, a projection), the converter refuses with a ``ValueError`` saying why:
:func:`explain` gives that reason for every known layout, and :data:`LAYOUTS` lists them.

==========================  ===========================================================  =========
layout                      what maps                                                    function
==========================  ===========================================================  =========
``torchrecurrent``          torchrecurrent 0.2.5 ``MultiplicativeLSTM(Cell)``: same       :func:`from_torchrecurrent`,
                            names and shapes, blocks ``m,i,f,z,o`` / ``i,f,z,o``           :func:`to_torchrecurrent`
``paper``                   Krause et al. 2016 eqs. 18-22, no biases, with ``tanh``       :func:`from_paper`,
                            candidate and ``h = o * tanh(c)``                             :func:`to_paper`
``openai``                  OpenAI's sentiment-neuron mLSTM (TF), without weight norm     :func:`from_openai`,
                                                                                         :func:`to_openai`
``nvidia``                  NVIDIA sentiment-discovery / apex ``mLSTMCell``, without      :func:`from_nvidia`,
                            weight norm or projection                                     :func:`to_nvidia`
``keras_titu1994``,         refused: see :func:`explain`
``tamamori``,
``krause_chainer``,
``lux_recurrent_layers``
``tamamori`` (TF 0.12)      its variables, with ``allow_formula_change=True`` only: the   :func:`from_tf012`,
                            weights move exactly, the function does not (see below)      :func:`to_tf012`
==========================  ===========================================================  =========

Block orders are the only real trap: torchrecurrent uses the same parameter *names* and shapes as
the canonical layout but orders the gate blocks ``m, i, f, z, o`` (input projection) and
``i, f, z, o`` (multiplicative projection) where RecurrentLayers.jl has ``m, i, o, f, z`` and
``i, o, f, z``; loading one into the other without reordering runs, silently, a different network.

None of these layouts knows ``integration_mode="multiplicative_integration"``: they all add the two
projections, so converting to them refuses that mode, and converted parameters are for ``"addition"``.
None of the exact layouts has a projection or peepholes either: converting parameters with
``weight_hr`` or peephole weights to them is refused. Run-time options (``cell_clip``, ``proj_clip``,
``forget_bias``) are not parameters and are not converted: use the values the model was run with.

The TF 0.12 ``MultiplicativeLSTMCell`` (A. Tamamori's, the ``tamamori`` layout) has TensorFlow's
``use_peepholes``, ``cell_clip``, ``num_proj``, ``proj_clip`` and ``forget_bias``, but computes another
function: a linear candidate and ``h = tanh(c * o)`` (with peepholes
``sigmoid(o + w_o * c) * tanh(c * (o + w_o * c))``). :func:`from_tf012` reads its variables and refuses,
naming the formula the checkpoint was trained with; ``allow_formula_change=True`` copies the weights to
their canonical places anyway (bit for bit), for a model that is *meant* to compute something else from
then on, e.g. to start training from them. :func:`to_tf012` is the inverse.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .equations import BIAS_FLAGS, IH_BLOCKS, MH_BLOCKS, PEEPHOLE_WEIGHTS
from .validation import LayerInfo, check_integration_mode, check_params

__all__ = [
    "LAYOUTS", "TORCHRECURRENT_IH_BLOCKS", "TORCHRECURRENT_MH_BLOCKS", "PAPER_NAMES", "convert_from",
    "explain", "from_nvidia", "from_openai", "from_paper", "from_tf012", "from_torchrecurrent", "to_nvidia",
    "to_openai", "to_paper", "to_tf012", "to_torchrecurrent", "to_torchrecurrent_module", "TF012_NAMES",
    "TF012_GATE_BLOCKS",
]

#: torchrecurrent 0.2.5's row blocks of ``weight_ih`` / ``bias_ih`` (read from its ``forward``).
TORCHRECURRENT_IH_BLOCKS = ("m", "i", "f", "z", "o")
#: torchrecurrent 0.2.5's row blocks of ``weight_mh`` / ``bias_mh``.
TORCHRECURRENT_MH_BLOCKS = ("i", "f", "z", "o")
#: OpenAI's and NVIDIA's gate order (their ``u`` / ``g`` candidate is the canonical ``z``).
LSTM_GATE_BLOCKS = ("i", "f", "z", "o")

#: The paper's matrices (eqs. 18-22), in the order :func:`from_paper` takes them, and where each goes:
#: (canonical tensor, block). ``W_hx`` / ``W_hm`` produce the candidate ``ĥ`` (canonical ``z``).
PAPER_NAMES = {
    "W_mx": ("weight_ih", "m"), "W_mh": ("weight_hh", None),
    "W_hx": ("weight_ih", "z"), "W_hm": ("weight_mh", "z"),
    "W_ix": ("weight_ih", "i"), "W_im": ("weight_mh", "i"),
    "W_ox": ("weight_ih", "o"), "W_om": ("weight_mh", "o"),
    "W_fx": ("weight_ih", "f"), "W_fm": ("weight_mh", "f"),
}

LAYOUTS = {
    "torchrecurrent": (True, (
        "torchrecurrent 0.2.5 computes the same function with the same parameter names and shapes; only "
        "the row blocks are ordered differently (weight_ih/bias_ih m,i,f,z,o; weight_mh/bias_mh "
        "i,f,z,o). It has no independent recurrence (weight_hh is always H x H) and no multiplicative "
        "integration, and a switched-off bias is a buffer of zeros rather than absent.")),
    "paper": (True, (
        "Krause et al. 2016 eqs. 18-22 without biases, with the tanh candidate and h = o * tanh(c) "
        "(the form of Krause's Chainer code) is RecurrentLayers.jl with every bias switched off. The "
        "paper's LSTM section and Krause's MATLAB code use a linear candidate and h = tanh(c * o) "
        "instead: a different function, which no choice of parameters reproduces (variant='linear' is "
        "refused).")),
    "openai": (True, (
        "OpenAI's sentiment-neuron mLSTM (TensorFlow) computes m = (x wmx) * (h wmh), "
        "z = x wx + m wh + b with gates i,f,o,u and h = o * tanh(c): the canonical function with "
        "bias_mh = b and no other bias. Its released model is weight-normalised (rnn_wn=True): the "
        "stored direction v and gain g define the weight g * v / ||v|| per output column, a computed "
        "value, so those parameters are refused unless fold_weight_norm=True accepts a conversion that "
        "rounds (and that no longer trains as a weight-normalised model). Its state is stacked [c, h], "
        "the reverse of the canonical (h, c).")),
    "nvidia": (True, (
        "NVIDIA sentiment-discovery's mLSTM (apex RNN mLSTMCell) computes m = (W_mih x) * (W_mhh h) "
        "and gates W_ih x + b_ih + W_hh m + b_hh in the order i,f,g,o with h = o * tanh(c): the "
        "canonical function with bias_ih = [0; b_ih] and bias_mh = b_hh. Weight-normalised parameters "
        "(a _g/_v pair) and an output projection (output_size != hidden_size, w_ho) have no canonical "
        "counterpart and are refused.")),
    "keras_titu1994": (False, (
        "titu1994's Keras 2 multiplicative LSTM uses hard_sigmoid as its default recurrent activation, "
        "a piecewise-linear function that no parameter change turns into the logistic sigmoid; its "
        "recurrent kernel is H x 5H (block order i,f,c,o,m) applied in a different arrangement, with "
        "biases on the input side only. It is a different function from RecurrentLayers.jl's cell.")),
    "tamamori": (False, (
        "A. Tamamori's TensorFlow (0.12) MultiplicativeLSTMCell computes m from one matrix over [x; h] "
        "(both factors see x and h, unlike the paper's eq. 18), then the gates i,j,f,o from one matrix "
        "over [x; m] with a linear candidate j, and h = tanh(c * o) with no sigmoid on o; with peepholes "
        "h = sigmoid(o + w_o * c) * tanh(c * (o + w_o * c)). No parameters of the canonical cell "
        "reproduce that function. from_tf012 / to_tf012 move its variables with "
        "allow_formula_change=True, for a model meant to compute the canonical function from then on.")),
    "krause_chainer": (False, (
        "Krause's Chainer training code interleaves the gate blocks per unit (a,i,f,o), adds a forget "
        "bias of 3 inside a single 4H gate bias, and weight-normalises every matrix: the stored "
        "parameters are directions and gains whose product is a computed (rounded) value. Fold the "
        "weight normalisation and de-interleave yourself, then use from_paper for the weights; the "
        "4H gate bias maps to bias_mh.")),
    "lux_recurrent_layers": (False, (
        "LuxRecurrentLayers.jl 0.1.2 (and RecurrentLayers.jl before 0.3.1) output "
        "h = o * tanh(tanh(z)): the cell state never reaches the output. Their parameters have the "
        "canonical names and shapes, but the function differs, so copying them would silently change "
        "the network.")),
}


def explain(layout: str) -> str:
    """Why ``layout`` does or does not map exactly onto the canonical parameters."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    mappable, reason = LAYOUTS[layout]
    return ("maps exactly: " if mappable else "cannot map exactly: ") + reason


def convert_from(layout: str, *args, **kwargs):
    """``from_<layout>(*args, **kwargs)`` for a layout that maps; a ``ValueError`` with the reason for
    one that does not (see :func:`explain`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    mappable, _ = LAYOUTS[layout]
    if not mappable:
        raise ValueError(f"{layout} {explain(layout)}")
    return globals()[f"from_{layout}"](*args, **kwargs)


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------

def _reorder(array: np.ndarray, source: tuple, target: tuple) -> np.ndarray:
    """Row blocks of ``array`` from order ``source`` to order ``target`` (a copy; values untouched)."""
    size = array.shape[0] // len(source)
    blocks = {name: array[k * size:(k + 1) * size] for k, name in enumerate(source)}
    return np.concatenate([blocks[name] for name in target], axis=0)


def _to_numpy(value, argument: str) -> np.ndarray:
    """A NumPy copy of a NumPy array or a torch tensor (any device), with its dtype unchanged."""
    if isinstance(value, np.ndarray):
        return value.copy()
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        if str(value.dtype) == "torch.bfloat16":
            raise TypeError(f"{argument} is bfloat16, which NumPy cannot hold; convert to float32 first (exact)")
        return value.detach().cpu().numpy().copy()
    raise TypeError(f"{argument} must be a numpy.ndarray or a torch.Tensor, got {type(value).__name__}")


def _stack(params, argument="params") -> list[dict]:
    if isinstance(params, Mapping):
        return [params]
    if isinstance(params, (list, tuple)) and params:
        return list(params)
    raise TypeError(
        f"{argument} must be a canonical mapping or a non-empty list of them, got {type(params).__name__}"
    )


def _require_addition(integration_mode, layout):
    if check_integration_mode(integration_mode):
        raise ValueError(
            f"integration_mode='multiplicative_integration' cannot map to {layout}, which always adds the "
            "input and multiplicative projections"
        )


def _dense_recurrence(params, info: LayerInfo, layout, expand_independent, argument):
    """weight_hh as a matrix: an independent-recurrence vector becomes its diagonal matrix on request."""
    w_hh = params["weight_hh"]
    if not info.independent_recurrence:
        return w_hh.copy()
    if not expand_independent:
        raise ValueError(
            f"{argument}['weight_hh'] is a vector (independent recurrence), which {layout} does not have; "
            "pass expand_independent=True to store it as the diagonal matrix np.diag(weight_hh) -- the "
            "same function, but training there will fill the off-diagonal entries"
        )
    return np.diag(w_hh)


def _require_no_variants(info: LayerInfo, layout, argument):
    """The exact layouts have neither a projection nor peepholes: refuse rather than drop them."""
    found = [what for what, on in (("a projection (weight_hr)", info.proj_size),
                                   ("peepholes (weight_ci, weight_cf, weight_co)", info.peepholes)) if on]
    if found:
        raise ValueError(
            f"{argument} has {' and '.join(found)}, which {layout} does not have; dropping them would "
            "change the function"
        )


def _require_zero(value, argument, why):
    if np.any(value != 0):
        raise ValueError(f"{argument} is nonzero, but {why}; dropping it would change the function")


# ---------------------------------------------------------------------------------------------------
# torchrecurrent
# ---------------------------------------------------------------------------------------------------

def _torchrecurrent_layers(source):
    """[(tensors: name -> value, switched-on bias names or None when unknown)] per layer."""
    if hasattr(source, "named_parameters") and hasattr(source, "state_dict"):
        cells = list(source.cells) if hasattr(source, "cells") else [source]
        out = []
        for cell in cells:
            state = cell.state_dict()
            trainable = {name for name, _ in cell.named_parameters()}
            out.append((state, {name for name in BIAS_FLAGS if name in trainable}))
        return out
    if not isinstance(source, Mapping):
        raise TypeError(
            "source must be a torchrecurrent MultiplicativeLSTM / MultiplicativeLSTMCell or its state_dict, "
            f"got {type(source).__name__}"
        )
    if "weight_ih" in source:  # a cell's state_dict
        return [(dict(source), None)]
    layers = {}
    for key, value in source.items():
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "cells" or not parts[1].isdecimal():
            raise ValueError(f"source has key {key!r}; expected 'cells.<k>.<name>' or a cell's names")
        layers.setdefault(int(parts[1]), {})[parts[2]] = value
    if sorted(layers) != list(range(len(layers))) or not layers:
        raise ValueError(f"source's layers must be cells.0 .. cells.{len(layers) - 1}, got {sorted(layers)}")
    return [(layers[k], None) for k in range(len(layers))]


def from_torchrecurrent(source, *, bias=None, recurrent_bias=None, multiplicative_bias=None) -> list[dict]:
    """Canonical parameters (a list, one mapping per layer) from torchrecurrent 0.2.5.

    Args:
        source: a ``torchrecurrent.MultiplicativeLSTM`` or ``MultiplicativeLSTMCell``, or the
            ``state_dict()`` of either (keys ``cells.<k>.<name>`` or ``<name>``), of tensors or arrays.
        bias, recurrent_bias, multiplicative_bias: which biases the canonical layers keep. torchrecurrent
            stores a switched-off bias as a buffer of zeros, so a ``state_dict`` cannot tell; from a
            module they are read from its trainable parameters, from a ``state_dict`` they default to
            True (a zero bias kept is the same function). ``False`` for a nonzero bias is an error.

    The values are copied bit for bit; only the row blocks move (``m,i,f,z,o`` -> ``m,i,o,f,z`` and
    ``i,f,z,o`` -> ``i,o,f,z``). torchrecurrent has no multiplicative integration: use the result with
    ``integration_mode="addition"``.
    """
    requested = dict(bias=bias, recurrent_bias=recurrent_bias, multiplicative_bias=multiplicative_bias)
    out = []
    for index, (tensors, trainable_biases) in enumerate(_torchrecurrent_layers(source)):
        where = f"source layer {index}"
        expected = {"weight_ih", "weight_hh", "weight_mh", "bias_ih", "bias_hh", "bias_mh"}
        unknown = sorted(set(tensors) - expected)
        missing = sorted({"weight_ih", "weight_hh", "weight_mh"} - set(tensors))
        if unknown or missing:
            raise ValueError(f"{where}: unexpected tensors {unknown}, missing {missing}")
        arrays = {name: _to_numpy(value, f"{where} {name}") for name, value in tensors.items()}
        layer = {
            "weight_ih": _reorder(arrays["weight_ih"], TORCHRECURRENT_IH_BLOCKS, IH_BLOCKS),
            "weight_hh": arrays["weight_hh"],
            "weight_mh": _reorder(arrays["weight_mh"], TORCHRECURRENT_MH_BLOCKS, MH_BLOCKS),
        }
        for name, flag in BIAS_FLAGS.items():
            keep = requested[flag]
            if keep is None:
                keep = name in arrays if trainable_biases is None else name in trainable_biases
            if name not in arrays:
                if keep:
                    raise ValueError(f"{where}: {flag}=True but source has no {name}")
                continue
            if not keep:
                _require_zero(arrays[name], f"{where} {name}", f"{flag}=False")
                continue
            order = {"bias_ih": (TORCHRECURRENT_IH_BLOCKS, IH_BLOCKS),
                     "bias_mh": (TORCHRECURRENT_MH_BLOCKS, MH_BLOCKS)}.get(name)
            layer[name] = _reorder(arrays[name], *order) if order else arrays[name]
        check_params(layer, argument=where)
        out.append(layer)
    return out


def to_torchrecurrent(params, *, integration_mode="addition", expand_independent=False,
                      cell=False) -> dict:
    """A torchrecurrent 0.2.5 ``state_dict`` (of NumPy arrays) for canonical parameters.

    Args:
        params: one canonical mapping or a list of them.
        integration_mode: must be ``"addition"`` (torchrecurrent has no other).
        expand_independent: store an independent-recurrence vector as its diagonal matrix (refused
            otherwise: torchrecurrent's ``weight_hh`` is always ``H x H``).
        cell: keys for a ``MultiplicativeLSTMCell`` (``weight_ih``...; one layer only) instead of a
            ``MultiplicativeLSTM`` (``cells.<k>.weight_ih``...).

    Switched-off biases are written as zeros: torchrecurrent keeps them as zero buffers, which its
    ``load_state_dict`` expects. Build the module with the same bias flags
    (:func:`to_torchrecurrent_module` does both), then
    ``module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})``.
    """
    _require_addition(integration_mode, "torchrecurrent")
    layers = _stack(params)
    if cell and len(layers) != 1:
        raise ValueError(f"cell=True needs exactly one layer, got {len(layers)}")
    state = {}
    for index, layer in enumerate(layers):
        argument = "params" if len(layers) == 1 else f"params[{index}]"
        info = check_params(layer, argument=argument)
        _require_no_variants(info, "torchrecurrent", argument)
        prefix = "" if cell else f"cells.{index}."
        hidden = info.hidden_size
        zeros = {"bias_ih": 5 * hidden, "bias_hh": hidden, "bias_mh": 4 * hidden}
        state[prefix + "weight_ih"] = _reorder(layer["weight_ih"], IH_BLOCKS, TORCHRECURRENT_IH_BLOCKS)
        state[prefix + "weight_hh"] = _dense_recurrence(layer, info, "torchrecurrent", expand_independent, argument)
        state[prefix + "weight_mh"] = _reorder(layer["weight_mh"], MH_BLOCKS, TORCHRECURRENT_MH_BLOCKS)
        for name in BIAS_FLAGS:
            value = layer.get(name, np.zeros(zeros[name], dtype=info.dtype))
            if name == "bias_ih":
                value = _reorder(value, IH_BLOCKS, TORCHRECURRENT_IH_BLOCKS)
            elif name == "bias_mh":
                value = _reorder(value, MH_BLOCKS, TORCHRECURRENT_MH_BLOCKS)
            state[prefix + name] = value.copy()
    return state


def to_torchrecurrent_module(params, *, integration_mode="addition", expand_independent=False,
                             batch_first=False, cell=False):
    """A ``torchrecurrent.MultiplicativeLSTM`` (or ``MultiplicativeLSTMCell`` with ``cell=True``) holding
    the canonical parameters, with the matching bias flags and dtype. Needs torch and torchrecurrent."""
    import torch
    import torchrecurrent

    layers = _stack(params)
    info = check_params(layers[0], argument="params" if len(layers) == 1 else "params[0]")
    state = to_torchrecurrent(layers, integration_mode=integration_mode,
                              expand_independent=expand_independent, cell=cell)
    flags = {flag: getattr(info, flag) for flag in BIAS_FLAGS.values()}
    dtype = getattr(torch, info.dtype)
    if cell:
        module = torchrecurrent.MultiplicativeLSTMCell(info.input_size, info.hidden_size, dtype=dtype, **flags)
    else:
        module = torchrecurrent.MultiplicativeLSTM(info.input_size, info.hidden_size, num_layers=len(layers),
                                                   batch_first=batch_first, dtype=dtype, **flags)
    module.load_state_dict({key: torch.from_numpy(value) for key, value in state.items()})
    return module


# ---------------------------------------------------------------------------------------------------
# the paper (Krause et al. 2016, eqs. 18-22)
# ---------------------------------------------------------------------------------------------------

def from_paper(W_mx, W_mh, W_hx, W_hm, W_ix, W_im, W_ox, W_om, W_fx, W_fm, *, variant="tanh") -> dict:
    """Canonical parameters (all biases off) from the paper's ten matrices.

    The paper writes ``m = (W_mx x) ⊙ (W_mh h)``, ``ĥ = W_hx x + W_hm m`` and
    ``g = σ(W_gx x + W_gm m)`` for ``g`` in ``i, o, f``, with column vectors, so each ``W_*x`` is
    ``(H, I)`` and each ``W_*m`` / ``W_mh`` is ``(H, H)``.

    Args:
        variant: ``"tanh"`` -- ``c = f ⊙ c + i ⊙ tanh(ĥ)``, ``h = o ⊙ tanh(c)``, the form of Krause's
            Chainer code, which is RecurrentLayers.jl's cell without biases: maps exactly.
            ``"linear"`` -- the paper's LSTM section / MATLAB form (linear ``ĥ``, ``h = tanh(c ⊙ o)``):
            a different function, refused with a ``ValueError``.
    """
    if variant == "linear":
        raise ValueError(
            "variant='linear' (a linear candidate and h = tanh(c * o), the paper's LSTM section and "
            "Krause's MATLAB code) cannot map exactly: RecurrentLayers.jl's cell applies tanh to the "
            "candidate and computes h = o * tanh(c), and no choice of parameters turns one into the other"
        )
    if variant != "tanh":
        raise ValueError(f"variant must be 'tanh' or 'linear', got {variant!r}")
    given = dict(W_mx=W_mx, W_mh=W_mh, W_hx=W_hx, W_hm=W_hm, W_ix=W_ix, W_im=W_im, W_ox=W_ox, W_om=W_om,
                 W_fx=W_fx, W_fm=W_fm)
    arrays = {name: _to_numpy(value, name) for name, value in given.items()}
    hidden, inputs = arrays["W_mx"].shape if arrays["W_mx"].ndim == 2 else (None, None)
    for name, array in arrays.items():
        want = (hidden, inputs) if name.endswith("x") else (hidden, hidden)
        if hidden is None or array.shape != want:
            raise ValueError(
                f"{name} must have shape {want} ((H, I) for W_*x, (H, H) for W_mh and W_*m, with H and I "
                f"read from W_mx {arrays['W_mx'].shape}), got {array.shape}"
            )
    blocks = {"weight_ih": {}, "weight_mh": {}}
    for name, (target, block_name) in PAPER_NAMES.items():
        if block_name is not None:
            blocks[target][block_name] = arrays[name]
    params = {
        "weight_ih": np.concatenate([blocks["weight_ih"][b] for b in IH_BLOCKS], axis=0),
        "weight_hh": arrays["W_mh"],
        "weight_mh": np.concatenate([blocks["weight_mh"][b] for b in MH_BLOCKS], axis=0),
    }
    check_params(params, argument="the paper's matrices")
    return params


def to_paper(params, *, integration_mode="addition", expand_independent=False) -> dict:
    """The paper's ten matrices (see :func:`from_paper`, ``variant="tanh"``) from one canonical layer.

    The paper has no biases: a present bias must be all zeros (it is then dropped, which changes
    nothing), otherwise this raises. An independent-recurrence vector becomes a diagonal ``W_mh`` only
    with ``expand_independent=True``.
    """
    _require_addition(integration_mode, "the paper's equations")
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be one canonical mapping, got {type(params).__name__}")
    info = check_params(params)
    _require_no_variants(info, "the paper's equations", "params")
    for name in BIAS_FLAGS:
        if name in params:
            _require_zero(params[name], f"params[{name!r}]", "the paper's equations have no biases")
    hidden = info.hidden_size
    out = {}
    for name, (source, block_name) in PAPER_NAMES.items():
        if block_name is None:
            out[name] = _dense_recurrence(params, info, "the paper's equations", expand_independent, "params")
            continue
        order = IH_BLOCKS if source == "weight_ih" else MH_BLOCKS
        k = order.index(block_name)
        out[name] = params[source][k * hidden:(k + 1) * hidden].copy()
    return out


# ---------------------------------------------------------------------------------------------------
# OpenAI's sentiment-neuron mLSTM (TensorFlow, row-vector convention: x @ w)
# ---------------------------------------------------------------------------------------------------

def from_openai(wx, wh, wmx, wmh, b, *, gx=None, gh=None, gmx=None, gmh=None, fold_weight_norm=False) -> dict:
    """Canonical parameters from OpenAI's mLSTM variables (``encoder.py``'s ``mlstm``).

    Shapes (TensorFlow, ``x @ w``): ``wx (I, 4H)``, ``wh (H, 4H)`` (applied to ``m``), ``wmx (I, H)``,
    ``wmh (H, H)``, ``b (4H,)``; gate columns ``i, f, o, u``. The result has ``bias_mh = b`` and no
    other bias. Weight-normalisation gains ``gx, gh, gmx, gmh`` make the effective weights computed
    values (``w / ||w||_column * g``): they are refused unless ``fold_weight_norm=True``, which folds
    them in float64 and rounds back (a conversion that is not bit-exact and no longer trains as a
    weight-normalised model). OpenAI stacks its state as ``[c, h]``; the canonical order is ``(h, c)``.
    """
    arrays = {name: _to_numpy(v, name) for name, v in dict(wx=wx, wh=wh, wmx=wmx, wmh=wmh, b=b).items()}
    gains = {name: g for name, g in dict(wx=gx, wh=gh, wmx=gmx, wmh=gmh).items() if g is not None}
    if gains and not fold_weight_norm:
        raise ValueError(
            f"weight-normalisation gains given for {sorted(gains)}: the effective weights g * v / ||v|| "
            "are computed values, so they cannot map exactly; pass fold_weight_norm=True to accept a "
            "rounded conversion"
        )
    hidden = arrays["wmh"].shape[0] if arrays["wmh"].ndim == 2 else 0
    inputs = arrays["wmx"].shape[0] if arrays["wmx"].ndim == 2 else 0
    want = dict(wx=(inputs, 4 * hidden), wh=(hidden, 4 * hidden), wmx=(inputs, hidden), wmh=(hidden, hidden),
                b=(4 * hidden,))
    wrong = {name: arrays[name].shape for name in want if arrays[name].shape != want[name]}
    if wrong or not hidden or not inputs:
        raise ValueError(
            f"OpenAI's variables must have shapes {want} (I, H read from wmx {arrays['wmx'].shape} and wmh "
            f"{arrays['wmh'].shape}); these differ: {wrong}"
        )
    for name, gain in gains.items():
        v = arrays[name]
        g = _to_numpy(gain, f"g{name[1:]}")
        if g.shape != (v.shape[1],):
            raise ValueError(
                f"g{name[1:]} must have shape {(v.shape[1],)} (one gain per column of {name}), got {g.shape}"
            )
        norms = np.sqrt(np.sum(v.astype(np.float64) ** 2, axis=0))
        arrays[name] = (v.astype(np.float64) / norms * g.astype(np.float64)).astype(v.dtype)
    openai_order = ("i", "f", "o", "z")
    params = {
        "weight_ih": np.concatenate([arrays["wmx"].T, _reorder(arrays["wx"].T, openai_order, MH_BLOCKS)]),
        "weight_hh": arrays["wmh"].T.copy(),
        "weight_mh": _reorder(arrays["wh"].T, openai_order, MH_BLOCKS),
        "bias_mh": _reorder(arrays["b"], openai_order, MH_BLOCKS),
    }
    check_params(params, argument="OpenAI's variables")
    return {name: np.ascontiguousarray(value) for name, value in params.items()}


def to_openai(params, *, integration_mode="addition", expand_independent=False) -> dict:
    """OpenAI's variables ``wx, wh, wmx, wmh, b`` (see :func:`from_openai`) from one canonical layer.

    OpenAI has one gate bias: ``bias_mh`` becomes ``b``; ``bias_hh`` must be absent or zero, and
    ``bias_ih`` may be present only if it is zero (adding two biases into one would round).
    """
    _require_addition(integration_mode, "OpenAI's mLSTM")
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be one canonical mapping, got {type(params).__name__}")
    info = check_params(params)
    _require_no_variants(info, "OpenAI's mLSTM", "params")
    for name, why in (("bias_hh", "OpenAI's m has no bias"),
                      ("bias_ih", "OpenAI's mLSTM has a single gate bias, which takes bias_mh")):
        if name in params:
            _require_zero(params[name], f"params[{name!r}]", why)
    hidden = info.hidden_size
    openai_order = ("i", "f", "o", "z")
    b = params.get("bias_mh", np.zeros(4 * hidden, dtype=info.dtype))
    return {
        "wx": np.ascontiguousarray(_reorder(params["weight_ih"][hidden:], MH_BLOCKS, openai_order).T),
        "wh": np.ascontiguousarray(_reorder(params["weight_mh"], MH_BLOCKS, openai_order).T),
        "wmx": np.ascontiguousarray(params["weight_ih"][:hidden].T),
        "wmh": np.ascontiguousarray(
            _dense_recurrence(params, info, "OpenAI's mLSTM", expand_independent, "params").T),
        "b": _reorder(b, MH_BLOCKS, openai_order),
    }


# ---------------------------------------------------------------------------------------------------
# NVIDIA sentiment-discovery / apex RNN mLSTMCell (PyTorch, F.linear convention: W x)
# ---------------------------------------------------------------------------------------------------

def from_nvidia(w_ih, w_hh, w_mih, w_mhh, b_ih=None, b_hh=None) -> dict:
    """Canonical parameters from NVIDIA's ``mLSTMCell`` (``w_ih (4H, I)``, ``w_hh (4H, H)`` applied to
    ``m``, ``w_mih (H, I)``, ``w_mhh (H, H)``, optional ``b_ih``, ``b_hh`` ``(4H,)``; gates ``i, f, g, o``).

    ``b_ih`` becomes the gate blocks of ``bias_ih`` (its ``m`` block is zero: NVIDIA's ``m`` has no
    bias) and ``b_hh`` becomes ``bias_mh``. Weight-normalised (``_g``/``_v``) parameters or an output
    projection (``w_ho``) have no counterpart: pass the plain weights of a model without them.
    """
    arrays = {name: _to_numpy(v, name) for name, v in dict(w_ih=w_ih, w_hh=w_hh, w_mih=w_mih, w_mhh=w_mhh).items()}
    hidden = arrays["w_mhh"].shape[0] if arrays["w_mhh"].ndim == 2 else 0
    inputs = arrays["w_mih"].shape[1] if arrays["w_mih"].ndim == 2 else 0
    shapes_ok = (arrays["w_ih"].shape == (4 * hidden, inputs) and arrays["w_hh"].shape == (4 * hidden, hidden)
                 and arrays["w_mih"].shape == (hidden, inputs) and arrays["w_mhh"].shape == (hidden, hidden))
    if not shapes_ok:
        raise ValueError(
            f"w_ih must be (4H, I) and w_hh (4H, H) with H, I from w_mhh {arrays['w_mhh'].shape} and w_mih "
            f"{arrays['w_mih'].shape} (an output projection, output_size != hidden_size, has no canonical "
            f"counterpart) and w_mih (H, I); got w_ih {arrays['w_ih'].shape}, w_hh {arrays['w_hh'].shape}"
        )
    params = {
        "weight_ih": np.concatenate([arrays["w_mih"], _reorder(arrays["w_ih"], LSTM_GATE_BLOCKS, MH_BLOCKS)]),
        "weight_hh": arrays["w_mhh"],
        "weight_mh": _reorder(arrays["w_hh"], LSTM_GATE_BLOCKS, MH_BLOCKS),
    }
    if b_ih is not None:
        gate_bias = _reorder(_to_numpy(b_ih, "b_ih"), LSTM_GATE_BLOCKS, MH_BLOCKS)
        params["bias_ih"] = np.concatenate([np.zeros(hidden, dtype=gate_bias.dtype), gate_bias])
    if b_hh is not None:
        params["bias_mh"] = _reorder(_to_numpy(b_hh, "b_hh"), LSTM_GATE_BLOCKS, MH_BLOCKS)
    check_params(params, argument="NVIDIA's parameters")
    return params


def to_nvidia(params, *, integration_mode="addition", expand_independent=False) -> dict:
    """NVIDIA's ``w_ih, w_hh, w_mih, w_mhh`` and, when present, ``b_ih, b_hh`` from one canonical layer.

    NVIDIA's ``m`` has no bias: ``bias_hh`` and the ``m`` block of ``bias_ih`` must be absent or zero.
    """
    _require_addition(integration_mode, "NVIDIA's mLSTM")
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be one canonical mapping, got {type(params).__name__}")
    info = check_params(params)
    _require_no_variants(info, "NVIDIA's mLSTM", "params")
    hidden = info.hidden_size
    if "bias_hh" in params:
        _require_zero(params["bias_hh"], "params['bias_hh']", "NVIDIA's m has no bias")
    out = {
        "w_ih": _reorder(params["weight_ih"][hidden:], MH_BLOCKS, LSTM_GATE_BLOCKS),
        "w_hh": _reorder(params["weight_mh"], MH_BLOCKS, LSTM_GATE_BLOCKS),
        "w_mih": params["weight_ih"][:hidden].copy(),
        "w_mhh": _dense_recurrence(params, info, "NVIDIA's mLSTM", expand_independent, "params"),
    }
    if "bias_ih" in params:
        _require_zero(params["bias_ih"][:hidden], "the m block of params['bias_ih']", "NVIDIA's m has no bias")
        out["b_ih"] = _reorder(params["bias_ih"][hidden:], MH_BLOCKS, LSTM_GATE_BLOCKS)
    if "bias_mh" in params:
        out["b_hh"] = _reorder(params["bias_mh"], MH_BLOCKS, LSTM_GATE_BLOCKS)
    return out


# ---------------------------------------------------------------------------------------------------
# TF 0.12 MultiplicativeLSTMCell (A. Tamamori's; TensorFlow, row-vector convention: [x, h] @ matrix)
# ---------------------------------------------------------------------------------------------------

#: Its variables by role, as named under the cell's variable scope (``<scope>/<name>``). The matrices
#: are TensorFlow's ``_linear`` over concatenated inputs: ``[x, h] @ Matrix + Bias``.
TF012_NAMES = {
    "multiplicative_matrix": "Multipli_Weight/Linear/Matrix",  # (I + P, 2H): [x, h] -> both factors of m
    "multiplicative_bias": "Multipli_Weight/Linear/Bias",  # (2H,)
    "gate_matrix": "LSTM_Weight/Linear/Matrix",  # (I + H, 4H): [x, m] -> i, j, f, o
    "gate_bias": "LSTM_Weight/Linear/Bias",  # (4H,)
    "weight_ci": "W_I_diag",  # (H,), with use_peepholes
    "weight_cf": "W_F_diag",
    "weight_co": "W_O_diag",
    "projection": "W_P",  # (H, P), with num_proj
}
#: Its gate columns ``i, j, f, o`` in canonical names (its ``j`` is the candidate ``z``).
TF012_GATE_BLOCKS = ("i", "z", "f", "o")
_TF012_REQUIRED = ("multiplicative_matrix", "multiplicative_bias", "gate_matrix", "gate_bias")
_TF012_PEEPHOLES = dict(zip(PEEPHOLE_WEIGHTS, ("weight_ci", "weight_cf", "weight_co")))


def _tf012_formula(peepholes: bool, projection: bool) -> str:
    output = ("h = sigmoid(o + w_o * c) * tanh(c * (o + w_o * c))" if peepholes
              else "h = tanh(c * o) (no sigmoid on o)")
    cell = ("c = sigmoid(f + forget_bias + w_f * c_prev) * c_prev + sigmoid(i + w_i * c_prev) * j"
            if peepholes else "c = sigmoid(f + forget_bias) * c_prev + sigmoid(i) * j")
    return (f"m = ([x, h] A + a)[:H] * ([x, h] A + a)[H:]; {cell} with a linear candidate j; "
            f"c clipped to cell_clip; {output}" + ("; h = clip(h W_P, proj_clip)" if projection else ""))


_CANONICAL_FORMULA = ("c = sigmoid(f) * c_prev + sigmoid(i) * tanh(z), h = sigmoid(o) * tanh(c) (with "
                      "peepholes sigmoid(o + w_co * c) * tanh(c))")


def _formula_refusal(peepholes, projection, where) -> str:
    return (
        f"{where} is for the TF 0.12 MultiplicativeLSTMCell, which computes {_tf012_formula(peepholes, projection)}. "
        f"mlstm_spec computes {_CANONICAL_FORMULA}: a different function, which no choice of parameters "
        "reproduces. Pass allow_formula_change=True to move the weights to their places anyway (bit for "
        "bit), e.g. to start training from them, knowing that the network's outputs change."
    )


def _tf012_variables(variables, scope):
    """{role: array} from a mapping of TensorFlow variable names (``:0`` suffixes allowed) to arrays."""
    if not isinstance(variables, Mapping):
        raise TypeError(
            "variables must be a mapping of TensorFlow variable name to array (e.g. from "
            f"tf.train.load_checkpoint), got {type(variables).__name__}"
        )
    names = {str(key)[:-2] if str(key).endswith(":0") else str(key): key for key in variables}
    if scope is not None:
        prefix = scope.rstrip("/") + "/"
        names = {name[len(prefix):]: key for name, key in names.items() if name.startswith(prefix)}
    found = {}
    for role, suffix in TF012_NAMES.items():
        matches = [name for name in names if name == suffix or name.endswith("/" + suffix)]
        if len(matches) > 1:
            raise ValueError(
                f"variables hold {len(matches)} candidates for {suffix} ({sorted(matches)}): pass scope= "
                "to choose one cell (e.g. scope='rnn/multi_rnn_cell/cell_0/MultiplicativeLSTMCell')"
            )
        if matches:
            found[role] = _to_numpy(variables[names[matches[0]]], matches[0])
    missing = [TF012_NAMES[role] for role in _TF012_REQUIRED if role not in found]
    if missing:
        raise ValueError(
            f"variables{'' if scope is None else f' under scope {scope!r}'} have no {missing}; the TF 0.12 "
            f"MultiplicativeLSTMCell always has {[TF012_NAMES[r] for r in _TF012_REQUIRED]}"
        )
    return found


def from_tf012(variables, *, scope=None, allow_formula_change=False) -> dict:
    """Canonical parameters from the variables of the TF 0.12 ``MultiplicativeLSTMCell``.

    Args:
        variables: a mapping of TensorFlow variable name to array or tensor, e.g.
            ``{name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}``. Names are
            matched by their ending (:data:`TF012_NAMES`), so any enclosing scope works.
        scope: the cell's scope, to pick one cell out of a checkpoint holding several.
        allow_formula_change: the cell computes another function than the canonical one (see
            :data:`LAYOUTS` ``["tamamori"]``), so by default this raises a ``ValueError`` that names the
            formula the checkpoint was trained with. ``True`` moves the weights anyway.

    Shapes (row-vector convention): ``Multipli_Weight`` matrix ``(I + P, 2H)`` and bias ``(2H,)``,
    ``LSTM_Weight`` matrix ``(I + H, 4H)`` (gate columns ``i, j, f, o``) and bias ``(4H,)``, peepholes
    ``W_I_diag``, ``W_F_diag``, ``W_O_diag`` ``(H,)``, projection ``W_P`` ``(H, P)`` (``P = H`` without
    one). The two factors of ``m`` are the column halves of ``[x, h] @ Matrix + Bias``; the canonical
    ``m = (W x + b) * (W h + b)`` holds the first factor's ``x`` rows and the second's ``h`` rows, so
    the other two blocks must be zero (refused otherwise, whatever ``allow_formula_change`` says).

    The result has ``bias_ih`` (its ``m`` block from the first half of the ``Multipli_Weight`` bias,
    its gate blocks from the ``LSTM_Weight`` bias), ``bias_hh`` (the second half) and no ``bias_mh``,
    plus ``weight_hr = W_P.T`` and the peephole weights when present. Values are copied bit for bit.
    The cell's ``forget_bias`` (1.0 by default there), ``cell_clip`` and ``proj_clip`` are constructor
    arguments, not variables: pass them to ``forward`` yourself.
    """
    found = _tf012_variables(variables, scope)
    gate_matrix, mult_matrix = found["gate_matrix"], found["multiplicative_matrix"]
    if gate_matrix.ndim != 2 or gate_matrix.shape[1] % 4 or not gate_matrix.shape[1]:
        raise ValueError(f"{TF012_NAMES['gate_matrix']} must be (I + H, 4H), got {gate_matrix.shape}")
    hidden = gate_matrix.shape[1] // 4
    inputs = gate_matrix.shape[0] - hidden
    projected = "projection" in found
    out_size = mult_matrix.shape[0] - inputs if mult_matrix.ndim == 2 else 0
    peepholes = [role for role in _TF012_PEEPHOLES.values() if role in found]
    want = {
        "gate_matrix": (inputs + hidden, 4 * hidden),
        "gate_bias": (4 * hidden,),
        "multiplicative_matrix": (inputs + out_size, 2 * hidden),
        "multiplicative_bias": (2 * hidden,),
        **{role: (hidden,) for role in peepholes},
        **({"projection": (hidden, out_size)} if projected else {}),
    }
    wrong = {TF012_NAMES[role]: found[role].shape for role, shape in want.items() if found[role].shape != shape}
    if inputs < 1 or out_size < 1 or wrong or (not projected and out_size != hidden):
        raise ValueError(
            f"the TF 0.12 variables must have shapes {dict((TF012_NAMES[r], s) for r, s in want.items())} "
            f"(H = {hidden} and I = {inputs} read from {TF012_NAMES['gate_matrix']} {gate_matrix.shape}, "
            f"P = {out_size} from {TF012_NAMES['multiplicative_matrix']}; P = H without {TF012_NAMES['projection']}); "
            f"these differ: {wrong}"
        )
    if peepholes and len(peepholes) != len(_TF012_PEEPHOLES):
        raise ValueError(f"the variables have {[TF012_NAMES[r] for r in peepholes]} but not all three peepholes")
    cross = {"h rows of the first factor": mult_matrix[inputs:, :hidden],
             "x rows of the second factor": mult_matrix[:inputs, hidden:]}
    cross = [f"the {what} (max |value| {np.abs(block).max():.3g})" for what, block in cross.items()
             if np.any(block != 0)]
    cross_text = (
        f"In {TF012_NAMES['multiplicative_matrix']}, {' and '.join(cross)} of m are nonzero: this cell's m "
        "lets both factors see x and h, the canonical m = (W x + b) * (W h + b) does not, and no canonical "
        "parameter can hold those blocks."
    ) if cross else ""
    if not allow_formula_change:
        raise ValueError(f"{_formula_refusal(bool(peepholes), projected, 'this checkpoint')} {cross_text}".rstrip())
    if cross:
        raise ValueError(cross_text)
    columns = dict(zip(TF012_GATE_BLOCKS, np.split(gate_matrix, 4, axis=1)))
    gate_bias = dict(zip(TF012_GATE_BLOCKS, np.split(found["gate_bias"], 4)))
    mult_bias = found["multiplicative_bias"]
    params = {
        "weight_ih": np.concatenate([mult_matrix[:inputs, :hidden].T]
                                    + [columns[g][:inputs].T for g in MH_BLOCKS]),
        "weight_hh": np.ascontiguousarray(mult_matrix[inputs:, hidden:].T),
        "weight_mh": np.concatenate([columns[g][inputs:].T for g in MH_BLOCKS]),
        "bias_ih": np.concatenate([mult_bias[:hidden]] + [gate_bias[g] for g in MH_BLOCKS]),
        "bias_hh": mult_bias[hidden:].copy(),
    }
    if projected:
        params["weight_hr"] = np.ascontiguousarray(found["projection"].T)
    for name, role in _TF012_PEEPHOLES.items():
        if role in found:
            params[name] = found[role]
    check_params(params, argument="the TF 0.12 variables")
    return params


def to_tf012(params, *, scope="rnn/MultiplicativeLSTMCell", integration_mode="addition",
             allow_formula_change=False, expand_independent=False) -> dict:
    """The TF 0.12 ``MultiplicativeLSTMCell``'s variables (``f"{scope}/{name}"`` -> array) for one
    canonical layer: the inverse of :func:`from_tf012`.

    Refused unless ``allow_formula_change=True``: that cell computes another function with these
    weights. Its ``m`` matrix gets zero cross blocks; its single gate bias takes the gate blocks of
    ``bias_ih``, or ``bias_mh`` when those are zero (both nonzero would have to be added, which rounds:
    refused). Absent biases are written as zeros (the cell always has them).
    """
    _require_addition(integration_mode, "the TF 0.12 MultiplicativeLSTMCell")
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be one canonical mapping, got {type(params).__name__}")
    info = check_params(params)
    if not allow_formula_change:
        raise ValueError(_formula_refusal(info.peepholes, bool(info.proj_size), "to_tf012"))
    hidden, inputs, out_size = info.hidden_size, info.input_size, info.output_size
    dtype = np.dtype(info.dtype)
    zeros = lambda n: np.zeros(n, dtype=dtype)  # noqa: E731
    w_ih = dict(zip(IH_BLOCKS, np.split(params["weight_ih"], len(IH_BLOCKS))))
    w_mh = dict(zip(MH_BLOCKS, np.split(params["weight_mh"], len(MH_BLOCKS))))
    b_ih = dict(zip(IH_BLOCKS, np.split(params.get("bias_ih", zeros(5 * hidden)), len(IH_BLOCKS))))
    gate_bias = np.concatenate([b_ih[g] for g in MH_BLOCKS])
    if "bias_mh" in params and np.any(params["bias_mh"] != 0):
        _require_zero(gate_bias, "the gate blocks of params['bias_ih']",
                      "the TF 0.12 cell has one gate bias, which then takes bias_mh")
        gate_bias = params["bias_mh"]
    gate_bias = dict(zip(MH_BLOCKS, np.split(gate_bias, len(MH_BLOCKS))))
    mult_matrix = np.zeros((inputs + out_size, 2 * hidden), dtype=dtype)
    mult_matrix[:inputs, :hidden] = w_ih["m"].T
    mult_matrix[inputs:, hidden:] = _dense_recurrence(params, info, "the TF 0.12 cell", expand_independent,
                                                      "params").T
    out = {
        TF012_NAMES["multiplicative_matrix"]: mult_matrix,
        TF012_NAMES["multiplicative_bias"]: np.concatenate([b_ih["m"], params.get("bias_hh", zeros(hidden))]),
        TF012_NAMES["gate_matrix"]: np.concatenate(
            [np.concatenate([w_ih[g].T for g in TF012_GATE_BLOCKS], axis=1),
             np.concatenate([w_mh[g].T for g in TF012_GATE_BLOCKS], axis=1)]),
        TF012_NAMES["gate_bias"]: np.concatenate([gate_bias[g] for g in TF012_GATE_BLOCKS]),
    }
    if info.proj_size:
        out[TF012_NAMES["projection"]] = np.ascontiguousarray(params["weight_hr"].T)
    for name, role in _TF012_PEEPHOLES.items():
        if name in params:
            out[TF012_NAMES[role]] = params[name].copy()
    prefix = scope.rstrip("/") + "/" if scope else ""
    return {prefix + name: value for name, value in out.items()}
