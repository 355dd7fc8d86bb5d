r"""Flax linen layers of the mLSTM, on :mod:`backends.jax`'s functional core (the equations exist once, in
docs/equations.md; :mod:`mlstm_spec.equations` is the reference).

- :class:`MLSTMCell`: an ``nn.RNNCellBase`` cell for ``flax.linen.RNN`` (``seq_lengths``,
  ``reverse``, ``keep_order``) and ``flax.linen.Bidirectional``. Its carry is ``(c, h)``, the order of
  ``flax.linen.LSTMCell``: ``(c, h), h = cell((c, h), x)``.
- :class:`MLSTM`: a stack over whole sequences, ``hs, (h_n, c_n) = model.apply(variables, xs, state)``,
  with the conventions of :class:`backends.jax.MLSTM` (state ``(h, c)`` each ``(L, B, H)``); one
  ``lax.scan`` per layer with the input projection of all steps hoisted out of it.

The parameters are the canonical mapping under their canonical names: a cell's variables are
``{"params": {"weight_ih": ..., "weight_hh": ..., ...}}``, a stack's
``{"params": {"layer_0": {...}, "layer_1": {...}}}``. Initial values are drawn by
:func:`backends.jax.init` (the spec's initialisers, also under ``jax.jit(model.init)``).
``from_canonical`` returns a bound module (call it directly, or ``module, variables = model.unbind()``);
``to_canonical()`` reads a bound module's parameters, or ``to_canonical(variables)`` an unbound one's.

Inputs and carries are cast to the parameters' dtype (``param_dtype``, float32 by default), as Flax's
layers promote their inputs; float16 and bfloat16 compute in float32 and round the results once, as in
:mod:`backends.jax`.

The nnx counterparts are in :mod:`backends.flax_nnx`.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlstm_spec.validation import check_integration_mode

from . import jax as bj
from ._common import LAYER_OPTIONS, STRUCTURAL_OPTIONS, VARIANT_OPTIONS
from .jax import describe_device, devices

__all__ = ["MLSTM", "MLSTMCell", "ConformanceAdapter", "devices", "describe_device", "versions"]


def versions() -> dict:
    return {**bj.versions(), "flax": flax.__version__}


_STRUCTURE = (*STRUCTURAL_OPTIONS, "proj_size", "peepholes")


def _init_options(module) -> dict:
    return dict(bias=module.bias, recurrent_bias=module.recurrent_bias, multiplicative_bias=module.multiplicative_bias,
                independent_recurrence=module.independent_recurrence, weight_init=module.weight_init,
                proj_size=module.proj_size, peepholes=module.peepholes, unit_forget_bias=module.unit_forget_bias,
                forget_bias_init=module.forget_bias_init, dtype=module.param_dtype)


def _declare_layer(module, input_size: int, hidden_size: int, scope_name: str | None = None) -> dict:
    """Declare one layer's canonical parameters on a compact ``module`` (each drawn by
    :func:`backends.jax.init` from its own key) and return them. ``scope_name``: store them as one
    mapping under that name instead of one variable per canonical name."""
    options = _init_options(module)
    if scope_name is not None:
        return module.param(scope_name, lambda key: bj.init(key, input_size, hidden_size, **options))
    names = bj._layer_shapes(input_size, hidden_size, **{k: options[k] for k in _STRUCTURE})
    return {name: module.param(name, lambda key, name=name: bj.init(key, input_size, hidden_size, **options)[name])
            for name in names}


def _canonical_from_variables(variables, owner: str) -> list[dict]:
    if variables is None:
        raise ValueError(f"{owner}.to_canonical() needs a bound module (from_canonical, or module.bind("
                         "variables)) or the variables: to_canonical(variables)")
    params = variables["params"] if "params" in variables else variables
    if "weight_ih" in params:
        layers = [params]
    else:
        layers = [params[f"layer_{k}"] for k in range(len(params))]
    return [{name: np.asarray(value) for name, value in layer.items()} for layer in layers]


def _import(params, options: dict, one_layer: bool, owner: str, extra=()):
    """canonical_import for a linen module: JAX arrays of the same dtype and the module's options."""
    bj._unknown_options(options, [*LAYER_OPTIONS, *VARIANT_OPTIONS, *extra])
    layers, options, runtime = bj._from_canonical(params, options, one_layer=one_layer, owner=owner)
    check_integration_mode(options.get("integration_mode", "addition"))
    return layers, {**options, **runtime}


class MLSTMCell(nn.RNNCellBase):
    """One mLSTM step as a Flax linen cell: ``(c, h), h = cell((c, h), x)`` (``flax.linen.LSTMCell``'s
    carry order), for ``nn.RNN`` and ``nn.Bidirectional``.

    Attributes:
        hidden_size: the number of features ``H`` of the hidden state (the input size is read from x).
        bias, recurrent_bias, multiplicative_bias, independent_recurrence, integration_mode: as for
            :class:`backends.jax.MLSTMCell`.
        weight_init, proj_size, peepholes, unit_forget_bias, forget_bias_init: the initial parameters, as
            for :func:`backends.jax.init` (``proj_size=P``: the carry's ``h`` is P wide, ``c`` H wide).
        cell_clip, proj_clip, forget_bias: the run-time variants of :func:`backends.jax.mlstm`.
        param_dtype: the parameters' dtype; inputs and carry are cast to it.
    """

    hidden_size: int
    bias: bool = True
    recurrent_bias: bool = True
    multiplicative_bias: bool = True
    independent_recurrence: bool = False
    integration_mode: str = "addition"
    weight_init: str = "glorot_uniform"
    proj_size: int = 0
    peepholes: bool = False
    unit_forget_bias: bool = False
    forget_bias_init: float = 0.0
    cell_clip: float | None = None
    proj_clip: float | None = None
    forget_bias: float = 0.0
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, carry, inputs):
        params = _declare_layer(self, inputs.shape[-1], self.hidden_size)
        return bj._cell_in_param_dtype(params, carry, inputs, integration_mode=self.integration_mode,
                                       **bj._runtime_options(self))

    @nn.nowrap
    def initialize_carry(self, rng, input_shape):
        """Zeros ``(c, h)``: ``c`` ``input_shape[:-1] + (H,)``, ``h`` the same with P for H under a
        projection (``rng`` is unused, as in LSTMCell)."""
        batch = tuple(input_shape[:-1])
        return (jnp.zeros(batch + (self.hidden_size,), self.param_dtype),
                jnp.zeros(batch + (self.proj_size or self.hidden_size,), self.param_dtype))

    @property
    def num_feature_axes(self) -> int:
        return 1

    @classmethod
    def from_canonical(cls, params, **options):
        """A bound cell holding one canonical mapping (any backend's arrays, or what
        :func:`mlstm_spec.load` returns), values and dtype exactly; the options must agree with it."""
        (layer,), options = _import(params, options, True, "MLSTMCell")
        options.pop("num_layers")
        hidden = layer["weight_ih"].shape[0] // 5
        module = cls(hidden, param_dtype=layer["weight_ih"].dtype, **options)
        return module.bind({"params": layer})

    def to_canonical(self, variables=None) -> list[dict]:
        """``[mapping]`` of NumPy arrays (a one-layer list, like :class:`MLSTM`)."""
        return _canonical_from_variables(self.variables if variables is None and self.scope else variables,
                                         "MLSTMCell")


class MLSTM(nn.Module):
    r"""A stack of mLSTM layers over whole sequences, as a Flax linen module:
    ``hs, (h_n, c_n) = model.apply(variables, xs, state=None)``.

    Inputs, outputs and state follow :class:`backends.jax.MLSTM`: ``xs`` ``(B, T, I)`` or ``(T, I)``;
    ``state`` ``(h_0, c_0)`` each ``(L, B, H)`` (or ``(L, H)``), ``None`` for zeros; ``hs`` the last
    layer's outputs, ``(h_n, c_n)`` every layer's final state. Attributes as :class:`MLSTMCell`, plus
    ``num_layers`` and ``unroll`` (steps per ``lax.scan`` iteration). With ``proj_size=P``, ``h`` is P
    wide and layer l > 0 reads P features.
    """

    hidden_size: int
    num_layers: int = 1
    bias: bool = True
    recurrent_bias: bool = True
    multiplicative_bias: bool = True
    independent_recurrence: bool = False
    integration_mode: str = "addition"
    unroll: int = 1
    weight_init: str = "glorot_uniform"
    proj_size: int = 0
    peepholes: bool = False
    unit_forget_bias: bool = False
    forget_bias_init: float = 0.0
    cell_clip: float | None = None
    proj_clip: float | None = None
    forget_bias: float = 0.0
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, xs, state=None):
        layers = [_declare_layer(self, xs.shape[-1] if k == 0 else self.proj_size or self.hidden_size,
                                 self.hidden_size, scope_name=f"layer_{k}") for k in range(self.num_layers)]
        return bj._stack_in_param_dtype(layers, xs, state, integration_mode=self.integration_mode, unroll=self.unroll,
                                        **bj._runtime_options(self))

    @classmethod
    def from_canonical(cls, params, *, unroll=1, **options):
        """A bound stack holding canonical parameters (one mapping, a list of them, or what
        :func:`mlstm_spec.load` returns, whose options are used), values and dtype exactly."""
        layers, options = _import(params, options, False, "MLSTM", extra=("num_layers",))
        hidden = layers[0]["weight_ih"].shape[0] // 5
        module = cls(hidden, unroll=bj._check_unroll(unroll), param_dtype=layers[0]["weight_ih"].dtype, **options)
        return module.bind({"params": {f"layer_{k}": layer for k, layer in enumerate(layers)}})

    def to_canonical(self, variables=None) -> list[dict]:
        """One mapping of NumPy arrays per layer, first layer first."""
        return _canonical_from_variables(self.variables if variables is None and self.scope else variables,
                                         "MLSTM")


# ---------------------------------------------------------------------------------------------------
# the conformance adapter
# ---------------------------------------------------------------------------------------------------

@jax.tree_util.register_pytree_node_class
class _Applied:
    """An unbound :class:`MLSTM` (static: its attributes) with its variables (the leaves), so the
    :mod:`backends.jax` adapter's jitted programs and ``jax.vjp`` take it as they take a pytree model."""

    def __init__(self, attributes: tuple, variables):
        self.attributes, self.variables = attributes, variables

    def __call__(self, xs, state):
        return MLSTM(**dict(self.attributes)).apply(self.variables, xs, state)

    def tree_flatten(self):
        return (self.variables,), self.attributes

    @classmethod
    def tree_unflatten(cls, attributes, children):
        return cls(attributes, children[0])


class ConformanceAdapter(bj.ConformanceAdapter):
    """The conformance suite's adapter for the linen :class:`MLSTM`: built through
    :meth:`MLSTM.from_canonical`, run with ``apply`` in the programs of :class:`backends.jax.ConformanceAdapter`
    (64-bit mode on, ``"highest"`` matmul precision on accelerators), gradients by ``jax.vjp``."""

    name = "flax"

    def build(self, layers, integration_mode, **runtime):
        module, variables = MLSTM.from_canonical(layers, integration_mode=integration_mode, **runtime).unbind()
        attributes = tuple((field, getattr(module, field)) for field in _FIELDS)
        return self._put(_Applied(attributes, variables))

    def pullback(self, model, xs, state, d_hs, d_state):
        cotangents = self._put((jnp.asarray(d_hs), d_state))
        _, (d_model, d_xs, (d_h0, d_c0)) = self._run("pullback", model, self._put(jnp.asarray(xs)),
                                                     self._put(state), cotangents)
        grads = _canonical_from_variables(d_model.variables, "MLSTM")
        return grads, np.asarray(d_xs), np.asarray(d_h0), np.asarray(d_c0)


_FIELDS = ("hidden_size", "num_layers", "bias", "recurrent_bias", "multiplicative_bias", "independent_recurrence",
           "integration_mode", "unroll", "proj_size", "peepholes", "cell_clip", "proj_clip", "forget_bias",
           "param_dtype")
