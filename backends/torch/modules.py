"""The torch modules: :class:`MLSTMCell` and :class:`MLSTM`, used like ``torch.nn.LSTMCell`` and
``torch.nn.LSTM``. The equations are in docs/equations.md (and :mod:`mlstm_spec.equations`)."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from backends._common import (
    VARIANT_OPTIONS,
    InputChecks,
    as_numpy,
    canonical_import,
    check_layer_options,
    init_layers,
    layer_info,
    present_params,
    set_layer_options,
    work_dtype,
)
from mlstm_spec.equations import PEEPHOLE_WEIGHTS, RUNTIME_DEFAULTS
from mlstm_spec.io import WeightFile
from mlstm_spec.validation import LayerInfo, check_runtime_options, dtype_name, expected_shapes

from . import build
from . import cuda_graph as graphs
from .fused import fused_layer
from .plain import functorch_active, plain_layer, plain_step, scan_layer, variant_step
from .variants import fused_variant_layer

CHECKS = InputChecks(is_array=lambda v: isinstance(v, Tensor), array_name="a torch.Tensor",
                     backend="backends.torch", variants=VARIANT_OPTIONS)
CPU_LOOPS = ("compiled", "python")


class _MLSTMBase(nn.Module):
    """What the cell and the layer share: options, per-layer parameters, initialiser, converters."""

    input_size: int
    hidden_size: int
    num_layers: int

    _directions = 1

    def _init_options(self, input_size, hidden_size, num_layers, bias, recurrent_bias,
                      multiplicative_bias, independent_recurrence, integration_mode, dropout, *, proj_size=0,
                      peepholes=False, unit_forget_bias=False, forget_bias_init=0.0, cell_clip=None,
                      proj_clip=None, forget_bias=0.0):
        # torch's `bias` is nn.LSTM's master switch: the two other biases follow it unless given
        recurrent_bias = bias if recurrent_bias is None else recurrent_bias
        multiplicative_bias = bias if multiplicative_bias is None else multiplicative_bias
        check_layer_options(input_size, hidden_size, num_layers=num_layers, dropout=dropout,
                            integration_mode=integration_mode, bias=bias, recurrent_bias=recurrent_bias,
                            multiplicative_bias=multiplicative_bias,
                            independent_recurrence=independent_recurrence)
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        set_layer_options(self, bias=bias, recurrent_bias=recurrent_bias,
                          multiplicative_bias=multiplicative_bias,
                          independent_recurrence=independent_recurrence,
                          integration_mode=integration_mode)
        self._init_variants(proj_size, peepholes, unit_forget_bias, forget_bias_init, cell_clip, proj_clip,
                            forget_bias)

    def _init_variants(self, proj_size, peepholes, unit_forget_bias, forget_bias_init, cell_clip, proj_clip,
                       forget_bias):
        """The spec's variants (docs/equations.md, Variants), checked and stored."""
        if isinstance(proj_size, bool) or not isinstance(proj_size, (int, np.integer)):
            raise TypeError(f"proj_size must be an int (0 for no projection), got {type(proj_size).__name__} "
                            f"{proj_size!r}")
        if not 0 <= proj_size < self.hidden_size:
            raise ValueError(f"proj_size must be 0 (no projection) or in 1..hidden_size-1 = "
                             f"1..{self.hidden_size - 1}, got {proj_size}")
        if proj_size and self.independent_recurrence:
            raise ValueError(f"proj_size={proj_size} cannot be combined with independent_recurrence=True: the "
                             "vector weight_hh multiplies h element-wise, which needs h to be hidden_size wide")
        for name, value in (("peepholes", peepholes), ("unit_forget_bias", unit_forget_bias)):
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
        self.proj_size = int(proj_size)
        self.peepholes = bool(peepholes)
        self.unit_forget_bias = bool(unit_forget_bias)
        self.forget_bias_init = forget_bias_init  # checked by mlstm_spec.init_params in reset_parameters
        checked = check_runtime_options(cell_clip=cell_clip, proj_clip=proj_clip, forget_bias=forget_bias)
        if checked["proj_clip"] is not None and not self.proj_size:
            raise ValueError(f"proj_clip={proj_clip!r} clips the projected output, which needs a projection; "
                             "give proj_size > 0, or leave proj_clip=None")
        # the run-time variants switched on: what the paths receive (empty: the variant-free code runs)
        self._runtime = {name: value for name, value in checked.items() if value != RUNTIME_DEFAULTS[name]}
        self._variant_free = not (self.proj_size or self.peepholes or self._runtime)

    @property
    def cell_clip(self) -> Optional[float]:
        """``c_t`` is clipped to ``[-cell_clip, cell_clip]`` (None: not clipped); set at construction."""
        return self._runtime.get("cell_clip")

    @property
    def proj_clip(self) -> Optional[float]:
        """The projected ``h_t`` is clipped to ``[-proj_clip, proj_clip]`` (None: not clipped)."""
        return self._runtime.get("proj_clip")

    @property
    def forget_bias(self) -> float:
        """The constant added to the forget gate's pre-activation at every step (0.0: none)."""
        return self._runtime.get("forget_bias", 0.0)

    @property
    def output_size(self) -> int:
        """The width of ``h`` (and of each direction's output): ``proj_size`` with a projection, else
        ``hidden_size``."""
        return self.proj_size or self.hidden_size

    def _register_layer(self, layer: int, suffix: str, factory_kwargs):
        info = self._info(layer)
        shapes = expected_shapes(info.input_size, info.hidden_size, info.independent_recurrence, info.proj_size)
        for name in _present(info):
            self.register_parameter(name + suffix, nn.Parameter(torch.empty(shapes[name], **factory_kwargs)))

    def _info(self, layer: int, dtype: str = "float32") -> LayerInfo:
        """The options of canonical layer ``layer`` (counted in nn.LSTM's order over the directions)."""
        output_size = self.proj_size or self.hidden_size
        input_size = self.input_size if layer < self._directions else self._directions * output_size
        info = layer_info(input_size, self.hidden_size, dtype,
                          bias=self.bias, recurrent_bias=self.recurrent_bias,
                          multiplicative_bias=self.multiplicative_bias,
                          independent_recurrence=self.independent_recurrence)
        return dataclasses.replace(info, proj_size=self.proj_size, peepholes=self.peepholes)

    @property
    def _canonical_count(self) -> int:
        return self.num_layers * self._directions

    def _suffix(self, layer: int) -> str:
        raise NotImplementedError

    def layer_parameters(self, layer: int = 0) -> dict:
        """The parameters of layer ``layer`` under their canonical names (``weight_ih``, ...). In a
        bidirectional layer, ``layer`` counts in nn.LSTM's order: ``2k`` is layer ``k`` forward, ``2k + 1``
        its reverse direction."""
        if not 0 <= layer < self._canonical_count:
            raise IndexError(f"layer must be in [0, {self._canonical_count}), got {layer}")
        suffix = self._suffix(layer)
        return {name: getattr(self, name + suffix) for name in _present(self._info(layer))}

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw the weights as :func:`mlstm_spec.init_params` does (RecurrentLayers.jl's rule: Glorot
        uniform over each whole stacked matrix; biases zero; the forget block of ``bias_ih`` at
        ``forget_bias_init``, or 1 with ``unit_forget_bias``), from a seed drawn from torch's global
        random generator (seed it with ``torch.manual_seed``)."""
        # the seed from the CPU generator, also inside a `with torch.device("meta"):` block
        generator = np.random.default_rng(int(torch.randint(0, 2**62, (), device="cpu").item()))
        for layer in range(self._canonical_count):
            (values,) = init_layers(self._info(layer).input_size, self.hidden_size, rng=generator,
                                    dtype="float64", bias=self.bias, recurrent_bias=self.recurrent_bias,
                                    multiplicative_bias=self.multiplicative_bias,
                                    independent_recurrence=self.independent_recurrence,
                                    **self._init_variant_options())
            for name, param in self.layer_parameters(layer).items():
                param.copy_(torch.from_numpy(values[name]))

    def _init_variant_options(self) -> dict:
        """The variant options of mlstm_spec.init_params that differ from its defaults (none: the draws of
        a variant-free layer are those it had before the variants existed)."""
        options = dict(proj_size=self.proj_size, peepholes=self.peepholes, unit_forget_bias=self.unit_forget_bias,
                       forget_bias_init=self.forget_bias_init)
        defaults = dict(proj_size=0, peepholes=False, unit_forget_bias=False, forget_bias_init=0.0)
        return {name: value for name, value in options.items() if value != defaults[name]}

    def _param_dtype(self) -> torch.dtype:
        return self.layer_parameters(0)["weight_ih"].dtype

    def _param_device(self) -> torch.device:
        return self.layer_parameters(0)["weight_ih"].device

    # ---- canonical parameters ----

    @classmethod
    def from_canonical(cls, params, *, device=None, dtype=None, **options):
        """Build the module from canonical parameters, copying values exactly.

        Args:
            params: one canonical mapping (``weight_ih``, ``weight_hh``, ``weight_mh`` and the biases
                switched on; see :mod:`mlstm_spec`), a list of them, first layer first (a stack;
                :class:`MLSTMCell` takes exactly one), or what :func:`mlstm_spec.load` returns (whose
                options are used). Values may be any backend's arrays (float16, float32, float64 or
                bfloat16). With ``bidirectional=True``: two mappings per layer, in nn.LSTM's order
                (layer 0 forward, layer 0 reverse, layer 1 forward, ...), as :meth:`to_canonical`
                returns them; a bidirectional weight file (``mlstm_spec.load``, ``directions`` 2)
                builds a bidirectional layer without being told.
            device: where to put the parameters (default: CPU).
            dtype: convert the values to this dtype (an explicit cast); default: keep theirs.
            **options: the remaining constructor options (``integration_mode``, ``batch_first``,
                ``dropout``, ``bidirectional``, ``fused``, ``cpu_loops``, ``cuda_graph``). The bias flags,
                ``independent_recurrence`` and ``num_layers`` are read from ``params``; giving them is
                allowed only when they agree.
        """
        single = cls is MLSTMCell
        if single or "bidirectional" in options:
            directions = 2 if options.get("bidirectional") else 1
        else:  # a weight file says how many directions it holds
            directions = getattr(params, "directions", 1) if isinstance(params, WeightFile) else 1
        layers, infos, options = canonical_import(params, options, one_layer=single, owner=cls.__name__,
                                                  backend="backends.torch", directions=directions,
                                                  variants=VARIANT_OPTIONS)
        if single:
            del options["num_layers"]
        first = infos[0]
        module = cls(first.input_size, first.hidden_size, device=device,
                     dtype=dtype if dtype is not None else getattr(torch, first.dtype), **options)
        with torch.no_grad():
            for layer, values in enumerate(layers):
                target = module.layer_parameters(layer)
                for name, value in values.items():
                    target[name].copy_(to_tensor(value))
        return module

    def to_canonical(self) -> list[dict]:
        """The parameters as canonical mappings of NumPy arrays, one per layer (bfloat16 as
        ``ml_dtypes.bfloat16``), that :meth:`from_canonical` and :mod:`mlstm_spec` accept. A
        bidirectional layer gives two mappings per layer in nn.LSTM's order (forward, reverse); each is a
        canonical layer (the reverse one runs over the reversed sequence)."""
        return [{name: as_numpy(param) for name, param in self.layer_parameters(layer).items()}
                for layer in range(self._canonical_count)]

    def __prepare_scriptable__(self):
        # torch.jit.script calls this (on every submodule) before compiling; without it the failure is
        # TorchScript's "Unknown type annotation" about this class's attributes
        raise RuntimeError(
            f"torch.jit.script cannot compile {type(self).__name__}: its forward dispatches between custom "
            "operators and plain Python paths that TorchScript does not support. Use torch.jit.trace(model, "
            "example_inputs) (fixed sequence length), torch.export.export (any length) or "
            "torch.compile instead (docs/torch.md)")

    # ---- input checks ----

    def _checked_dtypes(self, input: Tensor) -> tuple[Optional[torch.dtype], torch.dtype, LayerInfo]:
        """(autocast dtype or None, the dtype the inputs must have, the layer-0 info for the checks)."""
        device = self._param_device()
        cast = _autocast_dtype(device.type, self._param_dtype())
        dtype = cast or self._param_dtype()
        return cast, dtype, self._info(0, dtype_name(dtype))

    def _check_input(self, input: Tensor, shape, info: LayerInfo, cast) -> None:
        if cast is not None:  # autocast: any floating input, computed in the autocast dtype
            CHECKS.dtype(input, "input")
        CHECKS.sequence(input, info, "input", shape=shape, dtype=info.dtype if cast is not None else None)
        _check_device(input, self._param_device(), "input")

    def _check_hx(self, hx, batch_shape, info: LayerInfo, cast) -> None:
        if isinstance(hx, (tuple, list)) and len(hx) == 2 and cast is not None:
            for name, value in zip(("h", "c"), hx):
                CHECKS.dtype(value, f"hx {name}")
        CHECKS.state(hx, batch_shape, info, "hx", dtype=info.dtype if cast is not None else None)
        for name, value in zip(("h", "c"), hx):
            _check_device(value, self._param_device(), f"hx {name}")


def _present(info: LayerInfo) -> list[str]:
    """The canonical names of a layer's parameters: those of present_params, then the variants'."""
    names = present_params(info)
    if info.proj_size:
        names.append("weight_hr")
    if info.peepholes:
        names.extend(PEEPHOLE_WEIGHTS)
    return names


def to_tensor(array: np.ndarray) -> Tensor:
    """A tensor holding exactly the values of a NumPy array (bfloat16 as ``ml_dtypes.bfloat16``)."""
    if not array.flags.writeable:  # e.g. JAX's to_canonical(); torch.from_numpy warns on those
        array = array.copy()
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


class MLSTMCell(_MLSTMBase):
    r"""A multiplicative LSTM (mLSTM) cell (Krause et al., 2016), as RecurrentLayers.jl computes it: one
    step of the equations in docs/equations.md (:func:`mlstm_spec.cell`).

    Args:
        input_size: The number of expected features in the input ``x``.
        hidden_size: The number of features in the hidden state ``h`` (and cell state ``c``).
        bias: If ``False``, the cell has no biases at all (as in :class:`torch.nn.LSTMCell`); the two
            flags below follow it unless given. ``bias`` itself switches ``bias_ih``. Default: ``True``
        device, dtype: of the parameters.
        recurrent_bias: (keyword-only) ``bias_hh`` on or off. Default: the value of ``bias``
        multiplicative_bias: (keyword-only) ``bias_mh`` on or off. Default: the value of ``bias``
        independent_recurrence: (keyword-only) If ``True``, ``weight_hh`` is a vector of
            ``hidden_size`` applied element-wise. Default: ``False``
        integration_mode: (keyword-only) ``"addition"`` or ``"multiplicative_integration"``.
            Default: ``"addition"``
        proj_size, peepholes, cell_clip, proj_clip, forget_bias, unit_forget_bias, forget_bias_init:
            (keyword-only) the spec's variants, as for :class:`MLSTM` (parameters ``weight_hr``,
            ``weight_ci``, ``weight_cf``, ``weight_co``); with ``proj_size > 0``, ``h`` is
            ``proj_size`` wide. Off by default.

    Inputs: input, (h_0, c_0)
        - **input** of shape ``(batch, input_size)`` or ``(input_size,)``.
        - **h_0**, **c_0** of shape ``(batch, hidden_size)`` or ``(hidden_size,)``; zeros if not
          given. They must have the parameters' dtype and device (dtypes, autocast and non-finite
          values as for :class:`MLSTM`).

    Outputs: (h_1, c_1)
        - **h_1**, **c_1** of shape ``(batch, hidden_size)`` or ``(hidden_size,)``.

    Attributes:
        weight_ih: ``(5*hidden_size, input_size)``, row blocks in the order ``m, i, o, f, z``.
        weight_hh: ``(hidden_size, hidden_size)``, or ``(hidden_size,)`` with independent recurrence.
        weight_mh: ``(4*hidden_size, hidden_size)``, row blocks ``i, o, f, z``.
        bias_ih: ``(5*hidden_size)``, blocks ``m, i, o, f, z``; present when ``bias=True``.
        bias_hh: ``(hidden_size)``; present when ``recurrent_bias=True``.
        bias_mh: ``(4*hidden_size)``, blocks ``i, o, f, z``; present when ``multiplicative_bias=True``.

    The names, shapes and block orders are the canonical ones (RecurrentLayers.jl's), so
    :meth:`to_canonical` is a plain copy. Weights start Glorot-uniform, biases zero
    (:meth:`reset_parameters`). Non-finite inputs are not checked: they propagate to the outputs of
    their own batch row only.

    Examples::

        >>> cell = MLSTMCell(10, 20)
        >>> x = torch.randn(6, 3, 10)
        >>> h, c = torch.zeros(3, 20), torch.zeros(3, 20)
        >>> for t in range(6):
        ...     h, c = cell(x[t], (h, c))
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 recurrent_bias: Optional[bool] = None, multiplicative_bias: Optional[bool] = None,
                 independent_recurrence: bool = False, integration_mode: str = "addition", proj_size: int = 0,
                 peepholes: bool = False, cell_clip: Optional[float] = None, proj_clip: Optional[float] = None,
                 forget_bias: float = 0.0, unit_forget_bias: bool = False, forget_bias_init: float = 0.0):
        super().__init__()
        self._init_options(input_size, hidden_size, 1, bias, recurrent_bias, multiplicative_bias,
                           independent_recurrence, integration_mode, 0.0, proj_size=proj_size,
                           peepholes=peepholes, unit_forget_bias=unit_forget_bias,
                           forget_bias_init=forget_bias_init, cell_clip=cell_clip, proj_clip=proj_clip,
                           forget_bias=forget_bias)
        self._register_layer(0, "", dict(device=device, dtype=dtype))
        self.reset_parameters()

    def _suffix(self, layer: int) -> str:
        return ""

    def _plain_call(self, input, hx) -> bool:
        """Whether this call needs none of the general path's work: a (batch, input_size) tensor and
        states of the parameters' float32/float64 dtype and device, outside autocast. Anything else
        goes through the full checks (and their error messages). One step at batch 1 is what text
        generation runs, where nn.LSTMCell's per-call cost is the yardstick."""
        weight = self._parameters["weight_ih"]
        if not (type(input) is Tensor and input.dim() == 2 and input.shape[1] == self.input_size
                and input.shape[0] > 0 and input.dtype == weight.dtype and input.device == weight.device
                and input.dtype in (torch.float32, torch.float64)
                and not torch.is_autocast_enabled(input.device.type)):
            return False
        if hx is None:
            return True
        if type(hx) not in (tuple, list) or len(hx) != 2:
            return False
        shape = (input.shape[0], self.hidden_size)
        return all(type(s) is Tensor and s.shape == shape and s.dtype == input.dtype and s.device == input.device
                   for s in hx)

    def extra_repr(self) -> str:
        return _extra_repr(self)

    def forward(self, input: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
        if self._variant_free and self._plain_call(input, hx):  # the common case, in a few attribute reads
            params = self._parameters
            h, c = (input.new_zeros(input.shape[0], self.hidden_size),) * 2 if hx is None else hx
            step = compiled_step(input, h, c, params)
            if step is not None:
                return step(input, h, c, params["weight_ih"], params["weight_hh"], params["weight_mh"],
                            params.get("bias_ih"), params.get("bias_hh"), params.get("bias_mh"), self.multiplicative)
            p = F.linear(input, params["weight_ih"], params.get("bias_ih"))
            return plain_step(p, h, c, params["weight_hh"], params["weight_mh"], params.get("bias_hh"),
                              params.get("bias_mh"), self.multiplicative)
        CHECKS.array(input, "input")
        if input.dim() not in (1, 2):
            raise ValueError(f"input must have shape (batch, input_size) or (input_size,), got "
                             f"{input.dim()} dimensions {tuple(input.shape)}")
        batched = input.dim() == 2
        cast, dtype, info = self._checked_dtypes(input)
        # check_sequence reads a 2-d shape as (steps, features): the same checks a cell needs
        shape = tuple(input.shape) if batched else (1,) + tuple(input.shape)
        if batched and shape == (0, self.input_size):  # batch 0 is accepted, as by nn.LSTMCell
            shape = (1, shape[1])
        self._check_input(input, shape, info, cast)
        batch = (input.shape[0],) if batched else ()
        if hx is None:
            h = input.new_zeros(batch + (self.output_size,), dtype=dtype)
            c = input.new_zeros(batch + (self.hidden_size,), dtype=dtype)
        else:
            self._check_hx(hx, batch, info, cast)
            h, c = hx
        work = getattr(torch, work_dtype(dtype_name(dtype)))
        input, h, c = _to_work(input, cast, work), _to_work(h, cast, work), _to_work(c, cast, work)
        params = {k: _to_work(v, cast, work) for k, v in self.layer_parameters(0).items()}
        with _no_autocast(cast, self._param_device().type):
            p = F.linear(input, params["weight_ih"], params.get("bias_ih"))
            if self._variant_free:
                h, c = plain_step(p, h, c, params["weight_hh"], params["weight_mh"], params.get("bias_hh"),
                                  params.get("bias_mh"), self.multiplicative)
            else:
                h, c = variant_step(p, h, c, params, self.multiplicative, **self._runtime)
        return h.to(dtype), c.to(dtype)


class MLSTM(_MLSTMBase):
    r"""A multi-layer multiplicative LSTM (mLSTM, Krause et al., 2016) over an input sequence, used
    like :class:`torch.nn.LSTM`.

    Each layer computes, for each element of the input sequence, the step of docs/equations.md
    (RecurrentLayers.jl's formulation, :func:`mlstm_spec.forward`). In a multilayer mLSTM, the input
    :math:`x^{(l)}_t` of layer :math:`l \ge 1` is the hidden state :math:`h^{(l-1)}_t` of the previous
    layer, multiplied by dropout :math:`\delta^{(l-1)}_t` (a Bernoulli variable that is 0 with
    probability :attr:`dropout`) in training mode.

    Args:
        input_size: The number of expected features in the input `x`.
        hidden_size: The number of features in the hidden state `h` (and cell state `c`).
        num_layers: Number of recurrent layers stacked. Default: 1
        bias: If ``False``, the layers have no biases at all (as in :class:`torch.nn.LSTM`); the two
            bias flags below follow it unless given. ``bias`` itself switches ``bias_ih``.
            Default: ``True``
        batch_first: If ``True``, input and output are `(batch, seq, feature)` instead of
            `(seq, batch, feature)`; the states are not affected. Default: ``False``
        dropout: If non-zero, a `Dropout` layer on the outputs of each layer except the last, with
            this probability, in training mode only. Default: 0
        bidirectional: If ``True``, each layer also runs over the reversed sequence (parameters
            ``..._reverse``) and its output is the two directions' concatenated. Default: ``False``
        proj_size: If ``> 0`` (and ``< hidden_size``), each layer projects its output to this size with
            ``weight_hr_l[k]``, as :class:`torch.nn.LSTM` does: ``h`` (the output, ``h_n`` and the
            recurrence's input) is ``proj_size`` wide, ``c`` stays ``hidden_size`` wide. Default: 0
        device, dtype: of the parameters.

    Keyword-only (mLSTM options):
        recurrent_bias: ``bias_hh`` on or off. Default: the value of ``bias``
        multiplicative_bias: ``bias_mh`` on or off. Default: the value of ``bias``
        independent_recurrence: If ``True``, ``weight_hh`` is a vector applied element-wise.
            Default: ``False``
        integration_mode: ``"addition"`` or ``"multiplicative_integration"``. Default: ``"addition"``
        fused: If ``True`` (default), run the recurrence as one fused operator per layer with an
            analytic backward (see :mod:`backends.torch`) where that is the faster path; ``False``
            always uses ordinary differentiable operations. Under ``torch.func`` transforms,
            ``torch.jit.trace`` and ONNX export the plain path is used either way, and a second
            derivative through the fused operator is computed through the plain path.
        cpu_loops: ``"compiled"`` (default): on CPU the fused operator runs its time loops in C++
            where they could be built (:func:`~backends.torch.compiled_cpu_loops`); ``"python"``:
            in Python, as on GPUs (same results, slower).
        cuda_graph: If ``True``, calls on CUDA that record no gradient (under ``torch.no_grad()`` or
            ``torch.inference_mode()``) are captured in a CUDA graph once per signature (shapes,
            dtypes, device, mode, parameter addresses) and replayed after: one launch instead of
            about ten per step (:mod:`backends.torch.cuda_graph`). Other calls run as usual.
            Default: ``False`` (not yet measured on a GPU; see docs/performance-torch.md)
        peepholes: If ``True``, diagonal peephole weights ``weight_ci_l[k]``, ``weight_cf_l[k]``,
            ``weight_co_l[k]`` (each ``(hidden_size)``) let the input and forget gates see the previous
            cell state and the output gate the new one. Default: ``False``
        cell_clip: ``None`` or a finite number > 0: the cell state is clipped to that range at every
            step. Default: ``None``
        proj_clip: ``None`` or a finite number > 0: the projected output is clipped to that range
            (needs ``proj_size > 0``). Default: ``None``
        forget_bias: a constant added to the forget gate's pre-activation at every step (TensorFlow's
            ``forget_bias``; not a parameter). Default: 0
        unit_forget_bias, forget_bias_init: the initial value of the forget block of ``bias_ih``:
            1 (Keras's ``unit_forget_bias=True``) or ``forget_bias_init`` (a trained parameter, unlike
            ``forget_bias``). Default: ``False``, 0

        ``proj_size``, ``peepholes``, ``cell_clip``, ``proj_clip`` and ``forget_bias`` are the spec's
        variants (docs/equations.md, Variants), all off by default; a layer without them runs exactly
        the computation of a layer from before they existed. With any of them the fused path runs a
        second operator (``backends/torch/variants.py``), whose loops are compiled C++ on CPU and Python
        elsewhere (and with ``cpu_loops="python"``), as the variant-free layer's; ``fused=False`` runs
        the plain path as usual.

    Inputs: input, (h_0, c_0)
        * **input**: tensor of shape :math:`(L, H_{in})` for unbatched input,
          :math:`(L, N, H_{in})` when ``batch_first=False`` or :math:`(N, L, H_{in})` when
          ``batch_first=True``, or a :class:`torch.nn.utils.rnn.PackedSequence` (then the output is
          one too, and each sequence's final state is taken at its own length). A batch of 0 is
          accepted.
        * **h_0**: tensor of shape :math:`(D * \text{num\_layers}, H_{out})` for unbatched input or
          :math:`(D * \text{num\_layers}, N, H_{out})`: the initial hidden state of each layer (and
          direction). Defaults to zeros.
        * **c_0**: the same shape with :math:`H_{cell}`: the initial cell state of each layer. Defaults
          to zeros.

        where:

        .. math::
            \begin{aligned}
                N ={} & \text{batch size} \\
                L ={} & \text{sequence length} \\
                D ={} & 2 \text{ if bidirectional else } 1 \\
                H_{in} ={} & \text{input\_size} \\
                H_{out} ={} & \text{proj\_size if } \text{proj\_size} > 0 \text{ otherwise hidden\_size} \\
                H_{cell} ={} & \text{hidden\_size}
            \end{aligned}

        All must have the parameters' dtype and device: nothing is cast silently. Under
        ``torch.autocast`` (and a float16/bfloat16/float32 layer), input, states and weights are
        rounded to the autocast dtype and the outputs have that dtype. float16 and bfloat16 layers
        compute the recurrence in float32 and round the outputs (and gradients) once, as
        :mod:`mlstm_spec` computes float16: rounding every intermediate would compound over the
        steps. Non-finite values are not checked (a check would force a device synchronisation):
        they propagate, and only to the outputs of their own batch row.

    Outputs: output, (h_n, c_n)
        * **output**: tensor of shape :math:`(L, D * H_{out})` for unbatched input,
          :math:`(L, N, D * H_{out})` when ``batch_first=False`` or :math:`(N, L, D * H_{out})` when
          ``batch_first=True``: :math:`h_t` of the last layer for each `t` (both directions
          concatenated); a PackedSequence for packed input.
        * **h_n**: tensor of shape :math:`(D * \text{num\_layers}, H_{out})` or
          :math:`(D * \text{num\_layers}, N, H_{out})`: the final hidden state of each layer and
          direction (the reverse direction's final state is the one after its step over `t = 0`).
        * **c_n**: the same shape with :math:`H_{cell}`: the final cell state of each layer and direction.

    Attributes:
        weight_ih_l[k]: the input-hidden weights of layer `k`, ``(5*hidden_size, input_size)`` for
            `k = 0`, otherwise ``(5*hidden_size, D*H_out)``; row blocks ``m, i, o, f, z``.
        weight_hh_l[k]: the hidden-hidden weights of layer `k`, ``(hidden_size, H_out)``, or
            ``(hidden_size,)`` with ``independent_recurrence=True``.
        weight_mh_l[k]: the multiplicative-hidden weights of layer `k`, ``(4*hidden_size,
            hidden_size)``; row blocks ``i, o, f, z``.
        bias_ih_l[k]: ``(5*hidden_size)``, blocks ``m, i, o, f, z``; only when ``bias=True``.
        bias_hh_l[k]: ``(hidden_size)``; only when ``recurrent_bias=True``.
        bias_mh_l[k]: ``(4*hidden_size)``, blocks ``i, o, f, z``; only when
            ``multiplicative_bias=True``.
        weight_hr_l[k]: the projection, ``(proj_size, hidden_size)``; only when ``proj_size > 0``.
        weight_ci_l[k], weight_cf_l[k], weight_co_l[k]: the peepholes of the input, forget and output
            gates, each ``(hidden_size)``; only when ``peepholes=True``.

    The reverse direction's parameters carry the suffix ``_l[k]_reverse``, as in nn.LSTM.
    Without the ``_l[k]`` suffix these are the canonical names, shapes and block orders
    (RecurrentLayers.jl's; note that torchrecurrent uses the same names with the blocks in another
    order), so :meth:`to_canonical` is a plain copy and ``state_dict`` keys say which canonical matrix
    each is. A switched-off bias is absent, not zero. Weights start Glorot-uniform over each whole
    stacked matrix and biases at zero (:meth:`reset_parameters`).

    Examples::

        >>> rnn = MLSTM(10, 20, num_layers=2)
        >>> input = torch.randn(5, 3, 10)
        >>> h0, c0 = torch.randn(2, 3, 20), torch.randn(2, 3, 20)
        >>> output, (hn, cn) = rnn(input, (h0, c0))
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None, *, recurrent_bias: Optional[bool] = None,
                 multiplicative_bias: Optional[bool] = None, independent_recurrence: bool = False,
                 integration_mode: str = "addition", fused: bool = True, cpu_loops: str = "compiled",
                 cuda_graph: bool = False, peepholes: bool = False, cell_clip: Optional[float] = None,
                 proj_clip: Optional[float] = None, forget_bias: float = 0.0, unit_forget_bias: bool = False,
                 forget_bias_init: float = 0.0):
        super().__init__()
        for name, value in (("batch_first", batch_first), ("bidirectional", bidirectional)):
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
        self._directions = 2 if bidirectional else 1
        self._init_options(input_size, hidden_size, num_layers, bias, recurrent_bias, multiplicative_bias,
                           independent_recurrence, integration_mode, dropout, proj_size=proj_size,
                           peepholes=peepholes, unit_forget_bias=unit_forget_bias,
                           forget_bias_init=forget_bias_init, cell_clip=cell_clip, proj_clip=proj_clip,
                           forget_bias=forget_bias)
        if cpu_loops not in CPU_LOOPS:
            raise ValueError(f"cpu_loops must be one of {CPU_LOOPS}, got {cpu_loops!r}")
        if not isinstance(cuda_graph, (bool, np.bool_)):
            raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__} {cuda_graph!r}")
        self.cuda_graph = bool(cuda_graph)
        self.cuda_graphs = graphs.GraphCache()  # this layer's captured calls
        self.batch_first = bool(batch_first)
        self.bidirectional = bool(bidirectional)
        self.dropout = float(dropout)
        self.fused = bool(fused)
        self.cpu_loops = cpu_loops
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                f"dropout={dropout} has no effect with num_layers=1: dropout is applied between layers",
                stacklevel=2,
            )
        for layer in range(self._canonical_count):
            self._register_layer(layer, self._suffix(layer), dict(device=device, dtype=dtype))
        self.reset_parameters()

    def _suffix(self, layer: int) -> str:
        return f"_l{layer // self._directions}" + ("_reverse" if layer % self._directions else "")

    def flatten_parameters(self) -> None:
        """Does nothing; exists because code written for nn.LSTM calls it (e.g. after ``.cuda()``).
        nn.LSTM packs its weights into one cuDNN buffer there; this layer uses no cuDNN RNN kernel, so
        there is nothing to pack."""

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """The parameters of each layer and direction, in nn.LSTM's order."""
        return [list(self.layer_parameters(layer).values()) for layer in range(self._canonical_count)]

    def extra_repr(self) -> str:
        s = _extra_repr(self)
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if not self.fused:
            s += ", fused=False"
        if self.cpu_loops != "compiled":
            s += f", cpu_loops={self.cpu_loops!r}"
        if self.cuda_graph:
            s += ", cuda_graph=True"
        return s

    def _apply(self, fn, *args, **kwargs):
        # .to(), .half(), .cuda(), ...: the parameters move, and the graphs recorded their addresses
        if hasattr(self, "cuda_graphs"):
            self.cuda_graphs.clear()
        return super()._apply(fn, *args, **kwargs)

    def forward(self, input: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        if self.cuda_graph and isinstance(input, Tensor) and (hx is None or _tensor_pair(hx)):
            tensors = (input, *((None, None) if hx is None else hx))
            parameters = list(self.parameters())
            if graphs.graph_eligible(tensors, parameters) and not functorch_active():
                device_type = input.device.type
                key = (self.training, torch.is_inference_mode_enabled(), torch.is_autocast_enabled(device_type),
                       torch.get_autocast_dtype(device_type), graphs.parameter_key(parameters))
                return self.cuda_graphs.run(self._forward_tensors, tensors, key)
        return self._forward(input, hx)

    def _forward_tensors(self, input: Tensor, h0: Optional[Tensor], c0: Optional[Tensor]):
        return self._forward(input, None if h0 is None else (h0, c0))

    def _forward(self, input, hx: Optional[tuple[Tensor, Tensor]] = None):
        packed = isinstance(input, PackedSequence)
        if packed:
            CHECKS.array(input.data, "input.data")
            if input.data.dim() != 2:
                raise ValueError(f"a PackedSequence input must hold data of shape (sum of lengths, H_in), got "
                                 f"{tuple(input.data.shape)}")
            # the packed order: sequences sorted by decreasing length
            input_tm, lengths = pad_packed_sequence(PackedSequence(input.data, input.batch_sizes))
            batch_sizes = [int(b) for b in input.batch_sizes]
            batched = True
        else:
            CHECKS.array(input, "input")
            layout = "(N, L, H_in)" if self.batch_first else "(L, N, H_in)"
            if input.dim() not in (2, 3):
                raise ValueError(f"input must have shape {layout} or (L, H_in) (unbatched), got "
                                 f"{input.dim()} dimensions {tuple(input.shape)}")
            batched = input.dim() == 3
            input_tm = input.transpose(0, 1) if batched and self.batch_first else input
            lengths = batch_sizes = None
        cast, dtype, info = self._checked_dtypes(input_tm)
        shape = tuple(input_tm.shape)
        # batch 0 is accepted, as by nn.LSTM (a wrong width is still reported with the shape given)
        if batched and shape[1] == 0 and shape[0] > 0 and shape[2] == self.input_size:
            shape = (shape[0], 1, shape[2])
        self._check_input(input_tm, shape, info, cast)
        if not batched:
            input_tm = input_tm.unsqueeze(1)
        batch = input_tm.shape[1]
        count = self._canonical_count
        if hx is None:
            h0 = input_tm.new_zeros(count, batch, self.output_size, dtype=dtype)
            c0 = h0 if self.proj_size == 0 else input_tm.new_zeros(count, batch, self.hidden_size, dtype=dtype)
        else:
            self._check_hx(hx, (count, batch) if batched else (count,), info, cast)
            h0, c0 = (s if batched else s.unsqueeze(1) for s in hx)
            if packed and input.sorted_indices is not None:
                h0, c0 = (s.index_select(1, input.sorted_indices) for s in (h0, c0))
        work = getattr(torch, work_dtype(dtype_name(dtype)))
        x, h0, c0 = _to_work(input_tm, cast, work), _to_work(h0, cast, work), _to_work(c0, cast, work)

        path = self._path(x)
        reverse_index = _reverse_index(lengths, x) if self.bidirectional and packed else None
        layer_input, h_n, c_n = x, [], []
        with _no_autocast(cast, self._param_device().type):
            for layer in range(self.num_layers):
                outputs = []
                for direction in range(self._directions):
                    k = layer * self._directions + direction
                    params = {n: _to_work(v, cast, work) for n, v in self.layer_parameters(k).items()}
                    xs = layer_input if direction == 0 else _reverse(layer_input, reverse_index)
                    hs, h_T, c_T = self._run(path, xs, h0[k], c0[k], params, batch_sizes)
                    outputs.append(hs if direction == 0 else _reverse(hs, reverse_index))
                    h_n.append(h_T)
                    c_n.append(c_T)
                layer_input = outputs[0] if len(outputs) == 1 else torch.cat(outputs, -1)
                if layer < self.num_layers - 1 and self.dropout > 0 and self.training:
                    layer_input = F.dropout(layer_input, self.dropout, training=True)
        output = layer_input.to(dtype)
        h_n, c_n = torch.stack(h_n).to(dtype), torch.stack(c_n).to(dtype)
        if packed:
            data = pack_padded_sequence(output, lengths, enforce_sorted=True).data
            if input.unsorted_indices is not None:
                h_n, c_n = (s.index_select(1, input.unsorted_indices) for s in (h_n, c_n))
            return PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices), (h_n, c_n)
        if not batched:
            return output.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n)

    def _path(self, x: Tensor) -> str:
        """Which implementation runs this call: "fused", "plain" or "scan" (plain steps in one
        ``scan``, whose length stays symbolic in an exported graph)."""
        if torch.onnx.is_in_onnx_export():
            if torch.jit.is_tracing():  # the TorchScript-based exporter (dynamo=False) cannot trace a scan
                _warn_fixed_length_export(x.shape[0])
                return "plain"
            return "scan"
        if (not self.fused or functorch_active() or torch.jit.is_tracing() or x.shape[1] == 0
                or plain_is_cheaper(x.shape[0], x.shape[1], self.hidden_size, x.device.type)):
            return "plain"
        return "fused"

    def _run(self, path: str, x: Tensor, h0: Tensor, c0: Tensor, params: dict, batch_sizes):
        """One direction of one layer over x (T, B, I); with ``batch_sizes`` (packed input, sorted by
        decreasing length) each sequence stops at its own length: the steps run in segments over the
        sequences still going, and a finished sequence keeps its final state."""
        if batch_sizes is None or batch_sizes[0] == batch_sizes[-1]:
            return self._run_segment(path, x, h0, c0, params)
        batch = x.shape[1]
        h, c, outputs, start = h0, c0, [], 0
        for stop in range(1, len(batch_sizes) + 1):
            if stop < len(batch_sizes) and batch_sizes[stop] == batch_sizes[start]:
                continue
            active = batch_sizes[start]
            hs, h_T, c_T = self._run_segment(path, x[start:stop, :active], h[:active], c[:active], params)
            outputs.append(F.pad(hs, (0, 0, 0, batch - active)))
            h, c = torch.cat([h_T, h[active:]]), torch.cat([c_T, c[active:]])
            start = stop
        return torch.cat(outputs), h, c

    def _run_segment(self, path, x, h0, c0, params):
        if not self._variant_free:
            if path == "fused":
                return fused_variant_layer(x.contiguous(), h0, c0, params, self.multiplicative, self._runtime,
                                           self.cpu_loops == "python")
            if path == "scan":
                return scan_layer(x, h0, c0, params, self.multiplicative, self._runtime)
            return plain_layer(x, h0, c0, params, self.multiplicative, self._runtime)
        if path == "plain" and x.shape[0] == 1 and self.fused and self.cpu_loops == "compiled":
            step = compiled_step(x, h0, c0, params)
            if step is not None:  # one step without autograd (generation): the cell's C++ kernel
                h, c = step(x[0], h0, c0, params["weight_ih"], params["weight_hh"], params["weight_mh"],
                            params.get("bias_ih"), params.get("bias_hh"), params.get("bias_mh"), self.multiplicative)
                return h.unsqueeze(0), h, c  # h_n is stacked (copied) from h by the caller
        if path == "fused":
            return fused_layer(x.contiguous(), h0, c0, params, self.multiplicative, self.cpu_loops == "python")
        if path == "scan":
            return scan_layer(x, h0, c0, params, self.multiplicative)
        return plain_layer(x, h0, c0, params, self.multiplicative)


def _warn_fixed_length_export(steps: int) -> None:
    warnings.warn(
        f"torch.onnx.export(..., dynamo=False) records the mLSTM's time loop unrolled: the exported model "
        f"takes sequences of exactly {steps} steps (ONNX Runtime refuses other lengths). The default "
        "exporter (dynamo=True) writes the loop as an ONNX Scan that takes any length.",
        UserWarning, stacklevel=4)


def plain_is_cheaper(steps: int, batch: int, hidden: int, device_type: str) -> bool:
    """Whether the plain path beats the fused operator on a call of this size. The fused operator pays
    a fixed cost per call that grows with H^2 (transposed copies of weight_hh and weight_mh, packed for
    the per-step products) and saves a fixed cost per step (Python's per-operation overhead): a single
    step, or a few steps of a small batch at a large H (generation), are cheaper without it. Measured on
    CPU (benchmarks/bench_torch.py --generation): at B=1, H=512 the fused layer is slower up to ~16
    steps; at B=32, H=64 from 2 steps on it is faster."""
    return steps == 1 or steps * batch <= hidden // 32


def compiled_step(x: Tensor, h: Tensor, c: Tensor, params: dict):
    """The compiled one-step kernel (``cpu_step.cpp``) when it may run this step, else None (then the
    plain step runs). It may when nothing records a gradient (``torch.no_grad()``,
    ``torch.inference_mode()``, or no tensor requiring one), on CPU in float32/float64, outside
    ``torch.compile``, ``torch.jit.trace``, ONNX export and ``torch.func`` transforms (which must see
    torch operations), and where the C++ loops could be built. It computes what the plain step does
    (the tests hold it to 1e-12 in float64) without its per-operation overhead: one step at batch 1 is
    what text generation runs, where nn.LSTMCell's per-call cost is the yardstick."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or type(x) is not Tensor:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or h.requires_grad or c.requires_grad
                                    or any(p.requires_grad for p in params.values())):
        return None
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or functorch_active() or torch.onnx.is_in_onnx_export():
        return None
    loops = build.cpu_loops()
    return None if loops is None else loops.cell_step


def _reverse_index(lengths: Tensor, x: Tensor) -> Tensor:
    """(T, B) time indices that reverse each sequence within its own length (padding stays in place)."""
    steps = torch.arange(x.shape[0]).unsqueeze(1)
    lengths = lengths.unsqueeze(0)
    return torch.where(steps < lengths, lengths - 1 - steps, steps).to(x.device)


def _reverse(x: Tensor, index: Optional[Tensor]) -> Tensor:
    """x (T, B, F) reversed in time: all of it, or each sequence within its length (``index``)."""
    if index is None:
        return x.flip(0)
    return x.gather(0, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _tensor_pair(hx) -> bool:
    return isinstance(hx, (tuple, list)) and len(hx) == 2 and all(isinstance(s, Tensor) for s in hx)


def _extra_repr(module) -> str:
    s = f"{module.input_size}, {module.hidden_size}"
    if module.proj_size:
        s += f", proj_size={module.proj_size}"
    for flag in ("bias", "recurrent_bias", "multiplicative_bias"):
        if not getattr(module, flag):
            s += f", {flag}=False"
    if module.independent_recurrence:
        s += ", independent_recurrence=True"
    if module.integration_mode != "addition":
        s += f", integration_mode={module.integration_mode!r}"
    if module.peepholes:
        s += ", peepholes=True"
    for name, value in module._runtime.items():
        s += f", {name}={value!r}"
    return s


def _to_work(value: Tensor, cast: Optional[torch.dtype], work: torch.dtype) -> Tensor:
    """Under autocast, round to the autocast dtype first (as autocast rounds a matmul's inputs);
    then move to the compute dtype. A no-op for float32/float64 outside autocast."""
    if cast is not None:
        value = value.to(cast)
    return value.to(work)


class _no_autocast:
    """Disable autocast inside the recurrence after the inputs were cast to its dtype."""

    def __init__(self, cast, device_type):
        self.context = torch.autocast(device_type, enabled=False) if cast is not None else None

    def __enter__(self):
        if self.context is not None:
            self.context.__enter__()

    def __exit__(self, *exc):
        if self.context is not None:
            self.context.__exit__(*exc)


def _check_device(value: Tensor, device: torch.device, argument: str):
    if value.device != device:
        raise ValueError(
            f"{argument} is on device {value.device}, but the parameters are on {device}; "
            f"move it with .to({str(device)!r})"
        )


def _autocast_dtype(device_type: str, param_dtype: torch.dtype) -> Optional[torch.dtype]:
    """The dtype torch.autocast asks for on this device type, or None when autocast is off (or the
    layer is float64, which autocast leaves alone as it does for every op)."""
    if param_dtype == torch.float64:
        return None
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        return None
    return None
