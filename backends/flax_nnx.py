r"""Flax nnx modules of the mLSTM, on :mod:`backends.jax`'s functional core (the equations exist once, in
docs/equations.md; :mod:`mlstm_spec.equations` is the reference).

- :class:`MLSTMCell`: an ``nnx.RNNCellBase`` cell for ``nnx.RNN`` (``seq_lengths``, ``reverse``,
  ``keep_order``) and ``nnx.Bidirectional``; its carry is ``(c, h)``, the order of ``nnx.LSTMCell``.
- :class:`MLSTM`: a stack over whole sequences, ``hs, (h_n, c_n) = model(xs, state=None)``, with the
  conventions of :class:`backends.jax.MLSTM`.

Every weight is an ``nnx.Param`` attribute under its canonical name (``cell.weight_ih``; a stack's
``model.layers[l].weight_ih``), so ``nnx.Optimizer(model, tx, wrt=nnx.Param)``, ``nnx.grad`` and
``nnx.state(model, nnx.Param)`` see them. Initial values are drawn by :func:`backends.jax.init` (the
spec's initialisers) from ``rngs.params()``. Inputs and carries are cast to the parameters' dtype.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlstm_spec.equations import PARAM_SHAPES, VARIANT_PARAM_SHAPES
from mlstm_spec.validation import check_integration_mode

from . import jax as bj
from ._common import LAYER_OPTIONS, VARIANT_OPTIONS, check_layer_options
from .jax import describe_device, devices

__all__ = ["MLSTM", "MLSTMCell", "ConformanceAdapter", "devices", "describe_device", "versions"]

_NAMES = (*PARAM_SHAPES, *VARIANT_PARAM_SHAPES)


def versions() -> dict:
    return {**bj.versions(), "flax": flax.__version__}


def _rngs_or_default(rngs):
    return nnx.Rngs(0) if rngs is None else rngs


class _Layer(nnx.Module):
    """One layer's canonical parameters, each an ``nnx.Param`` under its canonical name."""

    def __init__(self, params: dict):
        for name, value in params.items():
            setattr(self, name, nnx.Param(jnp.asarray(value)))

    def canonical(self) -> dict:
        """The canonical mapping of the current values (arrays, or tracers under a transform)."""
        return {name: getattr(self, name)[...] for name in _NAMES if hasattr(self, name)}


def _draw(in_features, hidden_features, rngs, options) -> dict:
    return bj.init(_rngs_or_default(rngs).params(), in_features, hidden_features, **options)


def _set_runtime(module, params: dict, cell_clip, proj_clip, forget_bias) -> None:
    """Store the run-time variants (checked against the parameters) as static attributes."""
    runtime = bj._check_runtime(bj.CHECKS.params(params), cell_clip, proj_clip, forget_bias)
    module.cell_clip, module.proj_clip, module.forget_bias = runtime.values()


class MLSTMCell(nnx.RNNCellBase):
    """One mLSTM step as an nnx cell: ``(c, h), h = cell((c, h), x)`` (``nnx.LSTMCell``'s carry order).

    Args:
        in_features, hidden_features: the sizes ``I`` and ``H``.
        bias, recurrent_bias, multiplicative_bias, independent_recurrence, integration_mode: as for
            :class:`backends.jax.MLSTMCell`.
        weight_init, proj_size, peepholes, unit_forget_bias, forget_bias_init: the initial parameters, as
            for :func:`backends.jax.init` (``proj_size=P``: the carry's ``h`` is P wide, ``c`` H wide).
        cell_clip, proj_clip, forget_bias: the run-time variants of :func:`backends.jax.mlstm`.
        param_dtype: the parameters' dtype.
        rngs: ``nnx.Rngs``; the weights are drawn from ``rngs.params()`` (``None``: ``nnx.Rngs(0)``).
    """

    def __init__(self, in_features, hidden_features, *, bias=True, recurrent_bias=True, multiplicative_bias=True,
                 independent_recurrence=False, integration_mode="addition", weight_init="glorot_uniform",
                 proj_size=0, peepholes=False, unit_forget_bias=False, forget_bias_init=0.0, cell_clip=None,
                 proj_clip=None, forget_bias=0.0, param_dtype=jnp.float32, rngs=None, _canonical=None):
        check_layer_options(in_features, hidden_features, integration_mode=integration_mode)
        self.in_features, self.hidden_features = in_features, hidden_features
        self.integration_mode = integration_mode
        if _canonical is None:  # from_canonical passes the parameters instead
            _canonical = _draw(in_features, hidden_features, rngs, dict(
                bias=bias, recurrent_bias=recurrent_bias, multiplicative_bias=multiplicative_bias,
                independent_recurrence=independent_recurrence, weight_init=weight_init, proj_size=proj_size,
                peepholes=peepholes, unit_forget_bias=unit_forget_bias, forget_bias_init=forget_bias_init,
                dtype=param_dtype))
        _set_runtime(self, _canonical, cell_clip, proj_clip, forget_bias)
        self.layer = _Layer(_canonical)

    def __call__(self, carry, inputs):
        return bj._cell_in_param_dtype(self.layer.canonical(), carry, inputs, integration_mode=self.integration_mode,
                                       **bj._runtime_options(self))

    def initialize_carry(self, input_shape, rngs=None, carry_init=None):
        """Zeros ``(c, h)``: ``c`` ``input_shape[:-1] + (H,)``, ``h`` the same with P for H under a
        projection (``rngs`` is unused)."""
        if carry_init is not None:
            raise ValueError("carry_init is not supported: the mLSTM's initial carry is zeros or given "
                             "explicitly (initial_carry=)")
        batch, dtype = tuple(input_shape[:-1]), self.layer.weight_ih[...].dtype
        output = self.layer.weight_hr[...].shape[0] if hasattr(self.layer, "weight_hr") else self.hidden_features
        return jnp.zeros(batch + (self.hidden_features,), dtype), jnp.zeros(batch + (output,), dtype)

    @property
    def num_feature_axes(self) -> int:
        return 1

    @classmethod
    def from_canonical(cls, params, **options):
        """A cell holding one canonical mapping (any backend's arrays, or what :func:`mlstm_spec.load`
        returns), values and dtype exactly; the options must agree with it."""
        bj._unknown_options(options, [*LAYER_OPTIONS, *VARIANT_OPTIONS])
        (layer,), options, runtime = bj._from_canonical(params, options, one_layer=True, owner="MLSTMCell")
        integration_mode = options.get("integration_mode", "addition")
        return cls(layer["weight_ih"].shape[1], layer["weight_ih"].shape[0] // 5, integration_mode=integration_mode,
                   _canonical=layer, **runtime)

    def to_canonical(self) -> list[dict]:
        """``[mapping]`` of NumPy arrays (a one-layer list, like :class:`MLSTM`)."""
        return [{name: np.asarray(value) for name, value in self.layer.canonical().items()}]


class MLSTM(nnx.Module):
    r"""A stack of mLSTM layers over whole sequences as an nnx module:
    ``hs, (h_n, c_n) = model(xs, state=None)``, with the inputs, outputs and state of
    :class:`backends.jax.MLSTM` (state ``(h, c)`` each ``(L, B, H)``).

    Args:
        in_features, hidden_features, num_layers: the sizes ``I``, ``H`` and ``L``.
        unroll: steps per ``lax.scan`` iteration.
        the others: as for :class:`MLSTMCell`.
    """

    def __init__(self, in_features, hidden_features, *, num_layers=1, bias=True, recurrent_bias=True,
                 multiplicative_bias=True, independent_recurrence=False, integration_mode="addition", unroll=1,
                 weight_init="glorot_uniform", proj_size=0, peepholes=False, unit_forget_bias=False,
                 forget_bias_init=0.0, cell_clip=None, proj_clip=None, forget_bias=0.0,
                 param_dtype=jnp.float32, rngs=None, _canonical=None):
        check_layer_options(in_features, hidden_features, num_layers=num_layers, integration_mode=integration_mode)
        if _canonical is None:  # from_canonical passes the parameters instead
            rngs = _rngs_or_default(rngs)
            options = dict(bias=bias, recurrent_bias=recurrent_bias, multiplicative_bias=multiplicative_bias,
                           independent_recurrence=independent_recurrence, weight_init=weight_init,
                           proj_size=proj_size, peepholes=peepholes, unit_forget_bias=unit_forget_bias,
                           forget_bias_init=forget_bias_init, dtype=param_dtype)
            output = proj_size or hidden_features
            _canonical = [_draw(in_features if k == 0 else output, hidden_features, rngs, options)
                          for k in range(num_layers)]
        _set_runtime(self, _canonical[0], cell_clip, proj_clip, forget_bias)
        self.integration_mode, self.unroll = integration_mode, bj._check_unroll(unroll)
        self.layers = nnx.List([_Layer(layer) for layer in _canonical])

    def __call__(self, xs, state=None):
        return bj._stack_in_param_dtype([layer.canonical() for layer in self.layers], xs, state,
                                        integration_mode=self.integration_mode, unroll=self.unroll,
                                        **bj._runtime_options(self))

    @classmethod
    def from_canonical(cls, params, *, unroll=1, **options):
        """A stack holding canonical parameters (one mapping, a list of them, or what
        :func:`mlstm_spec.load` returns, whose options are used), values and dtype exactly."""
        bj._unknown_options(options, [*LAYER_OPTIONS, "num_layers", *VARIANT_OPTIONS])
        layers, options, runtime = bj._from_canonical(params, options)
        integration_mode = options.get("integration_mode", "addition")
        check_integration_mode(integration_mode)
        first = layers[0]["weight_ih"]
        return cls(first.shape[1], first.shape[0] // 5, num_layers=len(layers), integration_mode=integration_mode,
                   unroll=unroll, _canonical=layers, **runtime)

    def to_canonical(self) -> list[dict]:
        """One mapping of NumPy arrays per layer, first layer first."""
        return [{name: np.asarray(value) for name, value in layer.canonical().items()} for layer in self.layers]

    @property
    def num_layers(self) -> int:
        return len(self.layers)


# ---------------------------------------------------------------------------------------------------
# the conformance adapter
# ---------------------------------------------------------------------------------------------------

@jax.tree_util.register_pytree_node_class
class _Split:
    """An nnx :class:`MLSTM` as ``nnx.split`` gives it: the graph definition (static) and its ``nnx.Param``
    state (the leaves), so :class:`backends.jax.ConformanceAdapter`'s jitted programs take it."""

    def __init__(self, graphdef, state):
        self.graphdef, self.state = graphdef, state

    def __call__(self, xs, state):
        return nnx.merge(self.graphdef, self.state)(xs, state)

    def tree_flatten(self):
        return (self.state,), self.graphdef

    @classmethod
    def tree_unflatten(cls, graphdef, children):
        return cls(graphdef, children[0])


class ConformanceAdapter(bj.ConformanceAdapter):
    """The conformance suite's adapter for the nnx :class:`MLSTM`: built through
    :meth:`MLSTM.from_canonical`, split into graph and ``nnx.Param`` state, run and differentiated with the
    programs of :class:`backends.jax.ConformanceAdapter`; the gradients are read back through
    ``nnx.merge``, so they are those the ``nnx.Param`` leaves receive."""

    name = "flax_nnx"

    def build(self, layers, integration_mode, **runtime):
        graphdef, state = nnx.split(MLSTM.from_canonical(layers, integration_mode=integration_mode, **runtime))
        return self._put(_Split(graphdef, state))

    def pullback(self, model, xs, state, d_hs, d_state):
        cotangents = self._put((jnp.asarray(d_hs), d_state))
        _, (d_model, d_xs, (d_h0, d_c0)) = self._run("pullback", model, self._put(jnp.asarray(xs)),
                                                     self._put(state), cotangents)
        grads = nnx.merge(d_model.graphdef, d_model.state).to_canonical()
        return grads, np.asarray(d_xs), np.asarray(d_h0), np.asarray(d_c0)
