"""The mLSTM for TensorFlow / Keras 3: ``MLSTMCell``, the layer ``MLSTM``, and the conformance adapter.

``MLSTMCell`` is a Keras RNN cell (one step), usable inside ``keras.layers.RNN`` like
``keras.layers.LSTMCell``. ``MLSTM`` is a layer used like ``keras.layers.LSTM``; by default it runs a
fused path (the input projection of the whole sequence as one matrix product, the recurrence as one
graph loop with a hand-written backward pass) and falls back to the generic ``keras.layers.RNN`` loop
over the cell only when the fused path cannot express the configuration.

Keras must run on the TensorFlow backend (``KERAS_BACKEND=tensorflow``); importing this module with
another Keras backend raises ImportError.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

if "tensorflow" not in sys.modules:
    # TensorFlow's C++ start-up chatter (oneDNN, absl) buries users' output; a user's own setting wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402
import keras

from mlstm_spec.equations import BIAS_FLAGS
from mlstm_spec.validation import (
    LayerInfo,
    check_sequence,
    check_state,
    dtype_name,
)

from ._common import LAYER_OPTIONS, canonical_stack, check_layer_options, present_params, set_layer_options

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        "backends.tensorflow needs Keras on the TensorFlow backend, but Keras is running on "
        f"{keras.backend.backend()!r}; set the environment variable KERAS_BACKEND=tensorflow before "
        "Keras is first imported (or use backends.torch / backends.jax for those frameworks)"
    )

__all__ = ["MLSTMCell", "MLSTM", "devices", "ConformanceAdapter"]

#: Floating dtypes a layer computes in (bfloat16 through Keras's ``mixed_bfloat16`` policy).
_LAYER_DTYPES = ("float16", "bfloat16", "float32", "float64")
_FUSED_CHOICES = ("auto", True, False)
_WEIGHTS = ("weight_ih", "weight_hh", "weight_mh")
_BIASES = tuple(BIAS_FLAGS)  # bias_ih, bias_hh, bias_mh


def devices() -> list[str]:
    """Devices TensorFlow sees: ``["cpu"]`` plus ``"gpu:K"`` for every visible GPU."""
    gpus = tf.config.list_physical_devices("GPU")
    return ["cpu"] + [f"gpu:{k}" for k in range(len(gpus))]


def _tf_device(device: str) -> str:
    """``"cpu"`` -> ``"/CPU:0"``, ``"gpu:1"`` -> ``"/GPU:1"``."""
    kind, _, index = str(device).lower().partition(":")
    if kind not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu:K' (see devices()), got {device!r}")
    return f"/{kind.upper()}:{index or 0}"


# ---------------------------------------------------------------------------------------------------
# The equations on tensors, all in one dtype (see _work_dtype). ``w_hh_t`` and ``w_mh_t``
# are the transposes of the canonical matrices, made once outside the loop (so a step is
# ``h @ w_hh_t``): on CPU a small product with a transposed operand (``transpose_b=True``) runs about
# 2.5x slower. A vector ``w_hh`` is independent recurrence. The input projection arrives as two
# tensors, ``p_m`` (block m, H wide) and ``p_g`` (blocks i, o, f, z, 4H wide), and gate blocks are
# taken with equal ``tf.split``s: no slice needs H as a number, so one trace serves every layer size
# and XLA sees only static shapes.
# ---------------------------------------------------------------------------------------------------

def _step(p_m, p_g, h, c, w_hh_t, w_mh_t, b_hh, b_mh, multiplicative):
    """One step from the input projection and the state ``(h, c)``; returns the new ``h, c`` and
    ``q`` (which the fused backward pass keeps instead of recomputing it).

    ``b_mh`` may be None when the caller has already added it to ``p_g`` (additive integration only).
    """
    r = h * w_hh_t if w_hh_t.shape.rank == 1 else tf.matmul(h, w_hh_t)
    if b_hh is not None:
        r = r + b_hh
    q = tf.matmul(p_m * r, w_mh_t)
    if b_mh is not None:
        q = q + b_mh
    a = p_g * q if multiplicative else p_g + q
    i, o, f, a_z = tf.split(a, 4, axis=-1)
    c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(a_z)
    return tf.sigmoid(o) * tf.tanh(c), c, q


def _work_dtype(compute_dtype: str) -> str:
    """The dtype the recurrence runs in: float16 and bfloat16 (mixed precision) are computed in
    float32 and the results rounded once, as mlstm_spec and the torch and JAX backends do. Rounding
    every intermediate instead compounds over the steps, and derivative factors such as
    1 - tanh(c)^2 lose most of their digits when taken from activations rounded near saturation."""
    return "float32" if compute_dtype in ("float16", "bfloat16") else compute_dtype


def _transposed(w_hh):
    """``w_hh`` transposed; a vector (independent recurrence) is returned as it is."""
    return w_hh if w_hh.shape.rank == 1 else tf.transpose(w_hh)


def _reader(sequence, steps=None):
    """A TensorArray holding ``sequence`` (T, ...) for reading one step at a time inside a loop.

    Reading through a TensorArray (not ``sequence[t]``) keeps the autodiff of the masked loop linear
    in T: the gradient of a slice of a loop-invariant tensor would be a full-size tensor per step.
    """
    steps = tf.shape(sequence)[0] if steps is None else steps
    return tf.TensorArray(sequence.dtype, size=steps, clear_after_read=False).unstack(sequence)


def _writer(like, steps):
    return tf.TensorArray(like.dtype, size=steps, element_shape=like.shape)


@functools.lru_cache(maxsize=None)
def _recurrence(independent: bool, multiplicative: bool, has_b_hh: bool, has_b_mh: bool):
    """The unmasked recurrence over a precomputed projection, with a hand-written backward pass.

    ``recurrence(p_m, p_g, h0, c0, w_hh, w_mh, *biases) -> (hs, c_T)`` with ``p_m`` (T, B, H) and
    ``p_g`` (T, B, 4H) time-major, ``biases`` being ``b_hh`` and/or ``b_mh`` as flagged (``b_mh`` only
    when it is not folded into ``p_g``). The forward loop stores ``h_t``, ``c_t`` and
    ``q_t = W_mh m_t + b_mh`` (the largest product). The backward pass recomputes every other
    intermediate for all steps at once (one large product for ``r``, no sequential dependency), runs
    one reverse loop with two matrix products per step, and forms the weight gradients afterwards as
    one matrix product each -- where autodiff of the loop would store every intermediate and do one
    small weight-gradient product per step.
    """

    @tf.custom_gradient
    def recurrence(p_m, p_g, h0, c0, w_hh, w_mh, *biases):
        biases = list(biases)
        b_hh = biases.pop(0) if has_b_hh else None
        b_mh = biases.pop(0) if has_b_mh else None
        steps = tf.shape(p_m)[0]
        m_steps, g_steps = _reader(p_m), _reader(p_g)
        w_hh_t, w_mh_t = _transposed(w_hh), tf.transpose(w_mh)

        def body(t, h, c, hs, cs, qs):
            h, c, q = _step(m_steps.read(t), g_steps.read(t), h, c, w_hh_t, w_mh_t, b_hh, b_mh,
                            multiplicative)
            return t + 1, h, c, hs.write(t, h), cs.write(t, c), qs.write(t, q)

        _, _, c_last, hs, cs, qs = tf.while_loop(
            lambda t, *_: t < steps, body,
            (0, h0, c0, _writer(h0, steps), _writer(c0, steps), _writer(p_g[0], steps)),
            maximum_iterations=steps,
        )
        hs, cs, q = hs.stack(), cs.stack(), qs.stack()

        def grad(d_hs, d_c_last):
            d_hs = tf.zeros_like(hs) if d_hs is None else d_hs
            d_c_last = tf.zeros_like(c0) if d_c_last is None else d_c_last
            # Sizes come from the shapes of tensors the backward graph receives, never from the
            # forward's own size tensors: under XLA, a size passed between the two graphs is a value
            # that must be a compile-time constant, which would make XLA recompile for every input.
            steps = tf.shape(p_m)[0]
            # Every other intermediate of every step, recomputed at once from the stored h, c and q.
            h_prev = tf.concat([h0[None], hs[:-1]], axis=0)
            c_prev = tf.concat([c0[None], cs[:-1]], axis=0)
            r = h_prev * w_hh if independent else tf.einsum("tbk,jk->tbj", h_prev, w_hh)
            if b_hh is not None:
                r = r + b_hh
            m = p_m * r
            a = p_g * q if multiplicative else p_g + q
            a_i, a_o, a_f, a_z = tf.split(a, 4, axis=-1)
            i, o, f, z = tf.sigmoid(a_i), tf.sigmoid(a_o), tf.sigmoid(a_f), tf.tanh(a_z)
            tanh_c = tf.tanh(cs)
            # In the loop: d_c += d_h * dc_dh;  d_a = concat(d_c, d_h, d_c, d_c) * da_dhc (blocks i, o, f, z)
            dc_dh = o * (1 - tanh_c * tanh_c)
            da_dhc = tf.concat(
                [z * i * (1 - i), tanh_c * o * (1 - o), c_prev * f * (1 - f), i * (1 - z * z)], axis=-1
            )
            d_hs_steps, dc_dh_steps, da_dhc_steps, p_m_steps, f_steps = (
                _reader(x, steps) for x in (d_hs, dc_dh, da_dhc, p_m, f))
            p_g_steps = _reader(p_g, steps) if multiplicative else None

            def back(k, d_h, d_c, d_as, d_ms):
                t = steps - 1 - k
                d_h = d_h + d_hs_steps.read(t)
                d_c = d_c + d_h * dc_dh_steps.read(t)
                d_a = tf.concat([d_c, d_h, d_c, d_c], axis=-1) * da_dhc_steps.read(t)
                d_q = d_a * p_g_steps.read(t) if multiplicative else d_a
                d_m = tf.matmul(d_q, w_mh)
                d_r = d_m * p_m_steps.read(t)
                d_h = d_r * w_hh if independent else tf.matmul(d_r, w_hh)
                return k + 1, d_h, d_c * f_steps.read(t), d_as.write(t, d_a), d_ms.write(t, d_m)

            _, d_h0, d_c0, d_as, d_ms = tf.while_loop(
                lambda k, *_: k < steps, back,
                (0, tf.zeros_like(h0), d_c_last, _writer(p_g[0], steps), _writer(h0, steps)),
                maximum_iterations=steps,
            )
            d_a, d_m = d_as.stack(), d_ms.stack()
            d_q = d_a * p_g if multiplicative else d_a
            d_p_g = d_a * q if multiplicative else d_a
            d_r = d_m * p_m
            d_w_mh = tf.einsum("tbj,tbk->jk", d_q, m)
            d_w_hh = (tf.reduce_sum(d_r * h_prev, axis=(0, 1)) if independent
                      else tf.einsum("tbj,tbk->jk", d_r, h_prev))
            d_biases = []
            if has_b_hh:
                d_biases.append(tf.reduce_sum(d_r, axis=(0, 1)))
            if has_b_mh:
                d_biases.append(tf.reduce_sum(d_q, axis=(0, 1)))
            return (d_m * r, d_p_g, d_h0, d_c0, d_w_hh, d_w_mh, *d_biases)

        return (hs, c_last), grad

    return recurrence


def _masked_loop(p_m, p_g, h0, c0, mask, w_hh, w_mh, b_hh, b_mh, multiplicative, zero_output_for_mask):
    """The recurrence with a (T, B) boolean mask, differentiated by TensorFlow's autodiff.

    A masked step keeps the state; its output is the previous output (zeros before the first valid
    step), or zeros with ``zero_output_for_mask`` -- the semantics of ``keras.layers.RNN``.
    """
    steps = tf.shape(p_m)[0]
    w_hh_t, w_mh_t = _transposed(w_hh), tf.transpose(w_mh)
    m_steps, g_steps, keep_steps = _reader(p_m), _reader(p_g), _reader(mask)
    zeros = tf.zeros_like(h0)

    def body(t, h, c, out, outs):
        h_new, c_new, _ = _step(m_steps.read(t), g_steps.read(t), h, c, w_hh_t, w_mh_t, b_hh, b_mh,
                                multiplicative)
        keep = keep_steps.read(t)[:, None]
        out = tf.where(keep, h_new, zeros if zero_output_for_mask else out)
        return t + 1, tf.where(keep, h_new, h), tf.where(keep, c_new, c), out, outs.write(t, out)

    _, h, c, _, outs = tf.while_loop(
        lambda t, *_: t < steps, body, (0, h0, c0, zeros, _writer(h0, steps)), maximum_iterations=steps
    )
    return outs.stack(), h, c


@tf.autograph.experimental.do_not_convert
def _in_xla_context() -> bool:
    """Whether the graph being built is compiled by an enclosing XLA compilation (a
    ``tf.function(jit_compile=True)``, or ``model.compile(jit_compile=True)``)."""
    try:
        from tensorflow.python.framework import ops
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # a TensorFlow that moved its internals: assume not
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph()))


class _FusedConfig(NamedTuple):
    """Everything that changes the traced graph of the fused path (one tf.function per value)."""

    independent: bool
    multiplicative: bool
    bias: bool
    recurrent_bias: bool
    multiplicative_bias: bool
    masked: bool
    go_backwards: bool
    zero_output_for_mask: bool
    return_sequences: bool
    jit_compile: bool


class _FusedBody:
    """The whole fused layer body for one configuration, as a plain callable.

    Called as ``body(xs, h0, c0, [mask], w_ih, w_hh, w_mh, [b_ih], [b_hh], [b_mh])`` with only the
    bracketed arguments that the configuration switches on, it returns
    ``(last_output, outputs, h_T, c_T)``; outputs are (B, T, H) with ``return_sequences``, else
    (B, 1, H). (An object rather than a closure: TensorFlow counts retraces per function code, and
    one closure per configuration would look like one function retracing.)
    """

    def __init__(self, config: _FusedConfig):
        self.config = config

    def __call__(self, *args):
        config = self.config
        args = list(args)
        xs, h0, c0 = args[:3]
        mask = args.pop(3) if config.masked else None
        w_ih, w_hh, w_mh = args[3:6]
        biases = iter(args[6:])
        b_ih, b_hh, b_mh = (next(biases) if flag else None
                            for flag in (config.bias, config.recurrent_bias, config.multiplicative_bias))
        x_steps = tf.transpose(xs, [1, 0, 2])  # time-major (T, B, I): each step is contiguous
        if config.masked:
            mask = tf.transpose(mask, [1, 0])
        if config.go_backwards:
            x_steps = tf.reverse(x_steps, [0])
            if config.masked:
                mask = tf.reverse(mask, [0])
        steps, batch = tf.shape(x_steps)[0], tf.shape(x_steps)[1]
        x_rows = tf.reshape(x_steps, [steps * batch, -1])
        # The projection of the whole sequence: block m and the four gate blocks as two products.
        w_blocks = tf.split(w_ih, 5, axis=0)
        p_m = tf.matmul(x_rows, w_blocks[0], transpose_b=True)
        p_g = tf.matmul(x_rows, tf.concat(w_blocks[1:], axis=0), transpose_b=True)
        b_m = b_g = None
        if config.bias:
            b_blocks = tf.split(b_ih, 5, axis=0)
            b_m, b_g = b_blocks[0], tf.concat(b_blocks[1:], axis=0)
        # With additive integration bias_mh adds to the gate blocks just like bias_ih: fold it into
        # the projection, so the loop does one addition less per step.
        fold_b_mh = config.multiplicative_bias and not config.multiplicative
        if fold_b_mh:
            b_g = b_mh if b_g is None else b_g + b_mh
        if b_m is not None:
            p_m = tf.nn.bias_add(p_m, b_m)
        if b_g is not None:
            p_g = tf.nn.bias_add(p_g, b_g)
        p_m = tf.reshape(p_m, [steps, batch, -1])
        p_g = tf.reshape(p_g, [steps, batch, -1])
        b_mh_inside = None if fold_b_mh else b_mh
        if config.masked:
            outs, h, c = _masked_loop(p_m, p_g, h0, c0, mask, w_hh, w_mh, b_hh, b_mh_inside,
                                      config.multiplicative, config.zero_output_for_mask)
        else:
            recurrence = _recurrence(config.independent, config.multiplicative,
                                     config.recurrent_bias, b_mh_inside is not None)
            inside = [b for b in (b_hh, b_mh_inside) if b is not None]
            outs, c = recurrence(p_m, p_g, h0, c0, w_hh, w_mh, *inside)
            h = outs[-1]
        last = outs[-1]
        outputs = tf.transpose(outs, [1, 0, 2]) if config.return_sequences else last[:, None, :]
        return last, outputs, h, c



@functools.lru_cache(maxsize=None)
def _fused_function(config: _FusedConfig, dtype: str):
    """``(compiled, plain)``: the fused body for ``config`` as a cached ``tf.function`` (XLA-compiled
    with ``config.jit_compile``), and as the plain callable. The compiled function's signature leaves
    every size dynamic, so there is exactly one trace per configuration and dtype, whatever the batch
    size, sequence length or layer size.
    """
    matrix, vector = tf.TensorSpec([None, None], dtype), tf.TensorSpec([None], dtype)
    signature = [tf.TensorSpec([None, None, None], dtype), matrix, matrix]
    if config.masked:
        signature.append(tf.TensorSpec([None, None], tf.bool))
    signature += [matrix, vector if config.independent else matrix, matrix]
    signature += [vector for flag in (config.bias, config.recurrent_bias, config.multiplicative_bias) if flag]
    plain = _FusedBody(config)
    return tf.function(plain, input_signature=signature, jit_compile=config.jit_compile), plain


# ---------------------------------------------------------------------------------------------------
# Keras layers
# ---------------------------------------------------------------------------------------------------

_DOC_EQUATIONS = r"""
    For each element in the input sequence the layer computes

    .. math::
        \begin{array}{ll}
        p_t = W_{ih} x_t + b_{ih}  &\text{blocks } p_m, p_i, p_o, p_f, p_z \\
        r_t = W_{hh} h_{t-1} + b_{hh}  &(W_{hh} \odot h_{t-1} + b_{hh} \text{ under independent recurrence})\\
        m_t = p_m \odot r_t \\
        q_t = W_{mh} m_t + b_{mh}  &\text{blocks } q_i, q_o, q_f, q_z \\
        i_t = \sigma(p_i \oplus q_i), \quad o_t = \sigma(p_o \oplus q_o), \quad
        f_t = \sigma(p_f \oplus q_f), \quad z_t = \tanh(p_z \oplus q_z) \\
        c_t = f_t \odot c_{t-1} + i_t \odot z_t \\
        h_t = o_t \odot \tanh(c_t)
        \end{array}

    where :math:`x_t` is the input at time t, :math:`h_t`, :math:`c_t` the hidden and cell state,
    :math:`m_t` the multiplicative state, :math:`i_t, o_t, f_t` the input, output and forget gates,
    :math:`z_t` the candidate, :math:`\sigma` the logistic sigmoid, :math:`\odot` the element-wise
    product, and :math:`\oplus` is :math:`+` for ``integration_mode="addition"`` and :math:`\odot` for
    ``"multiplicative_integration"``. A switched-off bias is absent (not a zero vector). This is
    RecurrentLayers.jl's ``MultiplicativeLSTMCell`` (see ``mlstm_spec.equations``).
"""

_DOC_OPTIONS = """
        units: hidden size H (positive int), like ``keras.layers.LSTM``'s ``units``.
        bias: learn ``bias_ih`` (5H,). Default True.
        recurrent_bias: learn ``bias_hh`` (H,). Default True.
        multiplicative_bias: learn ``bias_mh`` (4H,). Default True.
        independent_recurrence: ``weight_hh`` is a vector (H,) applied element-wise. Default False.
        integration_mode: ``"addition"`` (default) or ``"multiplicative_integration"``.
        kernel_initializer, recurrent_initializer, multiplicative_initializer: initializers of
            ``weight_ih``, ``weight_hh`` and ``weight_mh``. Default ``"glorot_uniform"`` over each
            whole stacked matrix, as RecurrentLayers.jl draws them; the vector ``weight_hh`` is drawn as
            an (H, 1) matrix (``U(-a, a)``, ``a = sqrt(6 / (H + 1))``).
        bias_initializer: initializer of every bias. Default ``"zeros"``.
        kernel_regularizer, recurrent_regularizer, multiplicative_regularizer, bias_regularizer,
        kernel_constraint, recurrent_constraint, multiplicative_constraint, bias_constraint:
            as for ``keras.layers.LSTM``, per weight as above.
"""

_DOC_WEIGHTS = """
    Weights (canonical names, shapes and block order, so ``to_canonical`` is a plain copy):
        weight_ih: (5H, I), row blocks ``m, i, o, f, z``.
        weight_hh: (H, H), or (H,) under independent recurrence.
        weight_mh: (4H, H), row blocks ``i, o, f, z``.
        bias_ih: (5H,) blocks ``m, i, o, f, z``; bias_hh: (H,); bias_mh: (4H,) blocks ``i, o, f, z``
            (each only when its option is on).
"""


def _vector_initializer(initializer):
    """Draw a vector (H,) as an (H, 1) matrix, so fan-based initializers see fan_in=1, fan_out=H
    (Flux's rule; Keras would read a vector as fan_in = fan_out = H)."""

    def draw(shape, dtype=None):
        return tf.reshape(initializer((shape[0], 1), dtype=dtype), shape)

    return draw


def _options_info(cell, input_size, dtype) -> LayerInfo:
    return LayerInfo(input_size=input_size, hidden_size=cell.units, dtype=dtype,
                     **{k: getattr(cell, k) for k in ("bias", "recurrent_bias", "multiplicative_bias",
                                                      "independent_recurrence")})


@keras.saving.register_keras_serializable(package="mlstm")
class MLSTMCell(keras.layers.Layer):
    __doc__ = (
        """Cell of the Multiplicative LSTM (one step), for ``keras.layers.RNN``.

    Use it like ``keras.layers.LSTMCell``: ``keras.layers.RNN(MLSTMCell(64))`` gives masking,
    ``go_backwards``, ``stateful`` and ``keras.layers.Bidirectional`` through Keras's generic loop.
    :class:`MLSTM` computes the same function much faster over whole sequences.
"""
        + _DOC_EQUATIONS
        + """
    Args:"""
        + _DOC_OPTIONS
        + """        **kwargs: Keras layer arguments (``name``, ``dtype``, ``trainable``).

    Call arguments:
        inputs: (B, I), one step.
        states: ``[h, c]``, each (B, H).

    Returns:
        ``h, [h, c]``: the output (B, H) and the new state.
"""
        + _DOC_WEIGHTS
    )

    def __init__(
        self,
        units,
        *,
        bias=True,
        recurrent_bias=True,
        multiplicative_bias=True,
        independent_recurrence=False,
        integration_mode="addition",
        kernel_initializer="glorot_uniform",
        recurrent_initializer="glorot_uniform",
        multiplicative_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        recurrent_regularizer=None,
        multiplicative_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        recurrent_constraint=None,
        multiplicative_constraint=None,
        bias_constraint=None,
        **kwargs,
    ):
        check_layer_options(None, units, integration_mode=integration_mode, bias=bias,
                            recurrent_bias=recurrent_bias, multiplicative_bias=multiplicative_bias,
                            independent_recurrence=independent_recurrence)
        super().__init__(**kwargs)
        self.units = int(units)
        set_layer_options(self, bias=bias, recurrent_bias=recurrent_bias,
                          multiplicative_bias=multiplicative_bias,
                          independent_recurrence=independent_recurrence,
                          integration_mode=integration_mode)
        self.initializers = {
            "weight_ih": keras.initializers.get(kernel_initializer),
            "weight_hh": keras.initializers.get(recurrent_initializer),
            "weight_mh": keras.initializers.get(multiplicative_initializer),
            "bias": keras.initializers.get(bias_initializer),
        }
        self.regularizers = {
            "weight_ih": keras.regularizers.get(kernel_regularizer),
            "weight_hh": keras.regularizers.get(recurrent_regularizer),
            "weight_mh": keras.regularizers.get(multiplicative_regularizer),
            "bias": keras.regularizers.get(bias_regularizer),
        }
        self.constraints = {
            "weight_ih": keras.constraints.get(kernel_constraint),
            "weight_hh": keras.constraints.get(recurrent_constraint),
            "weight_mh": keras.constraints.get(multiplicative_constraint),
            "bias": keras.constraints.get(bias_constraint),
        }
        self.state_size = [self.units, self.units]
        self.output_size = self.units
        self.input_size = None

    @property
    def options(self) -> dict:
        """The layer options, by the names every backend uses."""
        return dict(bias=self.bias, recurrent_bias=self.recurrent_bias,
                    multiplicative_bias=self.multiplicative_bias,
                    independent_recurrence=self.independent_recurrence,
                    integration_mode=self.integration_mode)

    @property
    def param_names(self) -> list[str]:
        """Canonical names of this cell's weights, in canonical order."""
        return present_params(_options_info(self, 1, "float32"))

    def build(self, input_shape):
        input_size = input_shape[-1]
        if input_size is None:
            raise ValueError(
                "inputs must have a known feature size I in their last dimension, got shape "
                f"{tuple(input_shape)}"
            )
        self.input_size = int(input_size)
        H, I = self.units, self.input_size
        shapes = {"weight_ih": (5 * H, I), "weight_hh": (H,) if self.independent_recurrence else (H, H),
                  "weight_mh": (4 * H, H), "bias_ih": (5 * H,), "bias_hh": (H,), "bias_mh": (4 * H,)}
        for name in self.param_names:
            kind = "bias" if name.startswith("bias") else name
            initializer = self.initializers[kind]
            if name == "weight_hh" and self.independent_recurrence:
                initializer = _vector_initializer(initializer)
            variable = self.add_weight(
                shape=shapes[name], name=name, initializer=initializer,
                regularizer=self.regularizers[kind], constraint=self.constraints[kind],
            )
            setattr(self, name, variable)
        for name in _BIASES:
            if name not in self.param_names:
                setattr(self, name, None)

    def weights_in(self, dtype) -> dict:
        """Every weight as a tensor of ``dtype``, absent biases as None.

        Under a mixed policy the float32 variables are first rounded to the compute dtype (as Keras's
        autocasting rounds them), then widened to ``dtype`` when that is wider.
        """
        return {name: None if getattr(self, name) is None
                else tf.cast(tf.cast(getattr(self, name).value, self.compute_dtype), dtype)
                for name in _WEIGHTS + _BIASES}

    def call(self, inputs, states):
        if inputs.shape[-1] is not None and inputs.shape[-1] != self.input_size:
            raise ValueError(
                f"inputs must have I={self.input_size} features in their last dimension (the cell was "
                f"built for that size), got shape {tuple(inputs.shape)}"
            )
        work = _work_dtype(self.compute_dtype)
        inputs, h, c = (tf.cast(t, work) for t in (inputs, states[0], states[1]))
        w = self.weights_in(work)
        p = tf.matmul(inputs, w["weight_ih"], transpose_b=True)
        if w["bias_ih"] is not None:
            p = p + w["bias_ih"]
        h, c, _ = _step(p[:, : self.units], p[:, self.units :], h, c, _transposed(w["weight_hh"]),
                        tf.transpose(w["weight_mh"]), w["bias_hh"], w["bias_mh"], self.multiplicative)
        h, c = tf.cast(h, self.compute_dtype), tf.cast(c, self.compute_dtype)
        return h, [h, c]

    def get_initial_state(self, batch_size=None):
        return [tf.zeros((batch_size, self.units), dtype=self.compute_dtype) for _ in range(2)]

    def get_config(self):
        config = dict(units=self.units, **self.options)
        for kind, arg in (("weight_ih", "kernel"), ("weight_hh", "recurrent"),
                          ("weight_mh", "multiplicative"), ("bias", "bias")):
            config[f"{arg}_initializer"] = keras.initializers.serialize(self.initializers[kind])
            config[f"{arg}_regularizer"] = keras.regularizers.serialize(self.regularizers[kind])
            config[f"{arg}_constraint"] = keras.constraints.serialize(self.constraints[kind])
        return {**super().get_config(), **config}

    @classmethod
    def from_canonical(cls, params, **options):
        """A built cell holding exactly the values of one canonical mapping (see
        :meth:`MLSTM.from_canonical`)."""
        layer_params, info, options = _canonical_options(cls, params, options)
        cell = cls(info.hidden_size, **options)
        cell.build((None, info.input_size))
        _assign(cell, layer_params)
        return cell

    def to_canonical(self) -> list[dict]:
        """``[mapping]``: this cell's weights as NumPy arrays under their canonical names."""
        return _to_canonical(self)


@keras.saving.register_keras_serializable(package="mlstm")
class MLSTM(keras.layers.RNN):
    __doc__ = (
        """Multiplicative LSTM layer (Krause et al. 2016), used like ``keras.layers.LSTM``.
"""
        + _DOC_EQUATIONS
        + """
    Args:"""
        + _DOC_OPTIONS
        + """        return_sequences: return the output of every step (B, T, H) instead of the last (B, H).
        return_state: also return the final state ``h_T, c_T`` (each (B, H)), as ``keras.layers.LSTM``.
        go_backwards: process the sequence in reverse and return the reversed output sequence.
        stateful: the final state of batch row k is the initial state of row k in the next call
            (needs a fixed batch size; ``reset_state()`` clears it).
        use_fused: ``"auto"`` (default) runs the fused path -- the input projection of the whole
            sequence as one matrix product, then one graph loop (a cached ``tf.function``) with a
            hand-written backward pass -- whenever it can express the configuration, and Keras's
            generic ``RNN`` loop over :class:`MLSTMCell` otherwise. ``True`` requires the fused path and
            raises ValueError when it cannot be used; ``False`` always runs the generic loop.
            Both compute the same function.
        jit_compile: compile the fused path with XLA. Default False, as Keras leaves XLA off on CPU:
            there the fused graph loop is as fast or faster (docs/performance.md). Inside a model
            compiled with ``jit_compile=True`` the fused path is compiled with the model either way.
        zero_output_for_mask: as for ``keras.layers.RNN`` (``Bidirectional`` sets it).
        **kwargs: Keras layer arguments (``name``, ``dtype``, ``trainable``, ``activity_regularizer``).

    Call arguments:
        sequences: (B, T, I), batch-major. Keras layers take batched input only: add a batch axis of
            one (``x[None]``) for a single sequence.
        initial_state: ``[h_0, c_0]``, each (B, H); zeros when omitted.
        mask: (B, T) booleans; a masked step keeps the state and repeats the previous output.
        training: accepted for Keras; the layer has no training-only behaviour.

    Returns:
        The last output (B, H), or every output (B, T, H) with ``return_sequences``; with
        ``return_state``, ``[output, h_T, c_T]`` like ``keras.layers.LSTM``.

    Dtypes: the input dtype must equal the layer's compute dtype -- a float64 array given to a float32
    layer raises TypeError instead of being rounded silently. Under a mixed policy
    (``dtype="mixed_float16"``) the variables are float32 and the compute dtype float16: inputs and
    initial states in either dtype are cast to float16 and the weights are rounded to float16 (Keras's
    mixed-precision mechanism); then the recurrence computes in float32 and returns float16 results,
    because rounding every step's intermediates to float16 would compound over the steps (mlstm_spec,
    and the torch and JAX backends, compute float16 the same way). ``"mixed_bfloat16"`` likewise.

    Non-finite inputs are propagated, not checked (a check would need a device synchronisation); a NaN
    in one batch row never reaches the outputs of another row.
"""
        + _DOC_WEIGHTS
        + """
    Example::

        layer = MLSTM(128, return_sequences=True)
        hs = layer(np.zeros((4, 10, 32), "float32"))                    # (4, 10, 128)
        same = MLSTM.from_canonical(layer.to_canonical(), return_sequences=True)
"""
    )

    def __init__(
        self,
        units,
        *,
        bias=True,
        recurrent_bias=True,
        multiplicative_bias=True,
        independent_recurrence=False,
        integration_mode="addition",
        kernel_initializer="glorot_uniform",
        recurrent_initializer="glorot_uniform",
        multiplicative_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        recurrent_regularizer=None,
        multiplicative_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        recurrent_constraint=None,
        multiplicative_constraint=None,
        bias_constraint=None,
        return_sequences=False,
        return_state=False,
        go_backwards=False,
        stateful=False,
        use_fused="auto",
        jit_compile=False,
        **kwargs,
    ):
        numeric = isinstance(use_fused, (int, float)) and not isinstance(use_fused, bool)
        if numeric or use_fused not in _FUSED_CHOICES:
            raise ValueError(f"use_fused must be one of {_FUSED_CHOICES}, got {use_fused!r}")
        if not isinstance(jit_compile, (bool, np.bool_)):
            raise TypeError(f"jit_compile must be a bool, got {type(jit_compile).__name__} {jit_compile!r}")
        if kwargs.pop("unroll", False):
            raise ValueError("unroll=True is not supported by MLSTM: the fused graph loop replaces it")
        cell = MLSTMCell(
            units,
            bias=bias,
            recurrent_bias=recurrent_bias,
            multiplicative_bias=multiplicative_bias,
            independent_recurrence=independent_recurrence,
            integration_mode=integration_mode,
            kernel_initializer=kernel_initializer,
            recurrent_initializer=recurrent_initializer,
            multiplicative_initializer=multiplicative_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            recurrent_regularizer=recurrent_regularizer,
            multiplicative_regularizer=multiplicative_regularizer,
            bias_regularizer=bias_regularizer,
            kernel_constraint=kernel_constraint,
            recurrent_constraint=recurrent_constraint,
            multiplicative_constraint=multiplicative_constraint,
            bias_constraint=bias_constraint,
            dtype=kwargs.get("dtype"),
            trainable=kwargs.get("trainable", True),
            name="mlstm_cell",
        )
        super().__init__(
            cell,
            return_sequences=return_sequences,
            return_state=return_state,
            go_backwards=go_backwards,
            stateful=stateful,
            unroll=False,
            **kwargs,
        )
        self.use_fused = use_fused
        self.jit_compile = bool(jit_compile)

    # ---- options and weights, read from the cell ----

    @property
    def units(self) -> int:
        return self.cell.units

    @property
    def options(self) -> dict:
        return self.cell.options

    # The weights (weight_ih, ..., bias_mh) and the option flags live on the cell; they are exposed
    # here as read-only properties, defined below the class.

    # ---- input checks, before Keras converts anything ----

    def __call__(self, *args, **kwargs):
        sequences = args[0] if args else kwargs.get("sequences")
        initial_state = args[1] if len(args) > 1 else kwargs.get("initial_state")
        self._check_call(sequences, initial_state, kwargs.get("mask"))
        return super().__call__(*args, **kwargs)

    def _accepted_dtype(self, value) -> str:
        """The dtype name of ``value``; under a mixed policy the variable dtype counts as the compute
        dtype, because Keras casts it (that is the framework's mixed-precision mechanism)."""
        name = dtype_name(value.dtype)
        policy = self.dtype_policy
        if policy.compute_dtype != policy.variable_dtype and name == policy.variable_dtype:
            return policy.compute_dtype
        return name

    def _check_call(self, sequences, initial_state, mask):
        if not hasattr(sequences, "shape") or not hasattr(sequences, "dtype"):
            raise TypeError(
                f"sequences must be an array or tensor of shape (B, T, I), got {type(sequences).__name__}"
            )
        shape = tuple(sequences.shape)
        if len(shape) != 3:
            raise ValueError(
                "sequences must have shape (B, T, I) (Keras layers take batched input only; add a batch "
                f"axis of one with x[None] for a single sequence), got {len(shape)} dimensions {shape}"
            )
        input_size = self.cell.input_size if self.cell.built else shape[-1]
        if input_size is None:
            raise ValueError(f"sequences must have a known feature size I, got shape {shape}")
        info = _options_info(self.cell, input_size, self.compute_dtype)
        check_sequence(shape, self._accepted_dtype(sequences), info, "sequences", _LAYER_DTYPES)
        if initial_state is not None:
            batch = shape[0]

            def shape_of(v):
                got = tuple(v.shape)
                if got and (got[0] is None or batch is None):  # a dynamic batch size matches any
                    got = (batch,) + got[1:]
                return got

            check_state(initial_state, (batch,), info, "initial_state", _LAYER_DTYPES,
                        shape_of=shape_of, dtype_of=self._accepted_dtype)
        if mask is not None and not isinstance(mask, (list, tuple)) and hasattr(mask, "shape"):
            want = shape[:2]
            got = tuple(mask.shape)
            if len(got) != 2 or any(g is not None and w is not None and g != w for g, w in zip(got, want)):
                raise ValueError(f"mask must have shape (B, T) = {want} like sequences, got {got}")

    # ---- the fused path ----

    def fused_unavailable_reason(self) -> str | None:
        """Why the fused path cannot run this layer, or None when it can.

        It covers every option of :class:`MLSTMCell`, masks, ``go_backwards``, ``stateful`` and mixed
        precision; only a cell whose step was overridden (a subclass redefining ``call``) needs the
        generic loop, because the fused path would not run that step.
        """
        if type(self.cell).call is not MLSTMCell.call:
            return f"the cell's step was overridden by {type(self.cell).__name__}.call"
        return None

    # Not converted by autograph: every branch here is on Python values, and converting the call
    # through a conditional expression below once dispatched to the wrong converted function.
    @tf.autograph.experimental.do_not_convert
    def inner_loop(self, sequences, initial_state, mask, training=False):
        if isinstance(mask, (list, tuple)):
            mask = mask[0]
        reason = None if self.use_fused is False else self.fused_unavailable_reason()
        if self.use_fused is True and reason is not None:
            raise ValueError(
                f"use_fused=True, but the fused path cannot run this layer: {reason}. "
                "Pass use_fused='auto' to fall back to the generic keras.layers.RNN loop."
            )
        if self.use_fused is False or reason is not None:
            return super().inner_loop(sequences, initial_state, mask=mask, training=training)
        cell = self.cell
        config = _FusedConfig(
            independent=cell.independent_recurrence, multiplicative=cell.multiplicative,
            bias=cell.bias, recurrent_bias=cell.recurrent_bias,
            multiplicative_bias=cell.multiplicative_bias, masked=mask is not None,
            go_backwards=bool(self.go_backwards), zero_output_for_mask=bool(self.zero_output_for_mask),
            return_sequences=bool(self.return_sequences), jit_compile=self.jit_compile,
        )
        work = _work_dtype(self.compute_dtype)
        w = cell.weights_in(work)
        args = [tf.cast(t, work) for t in (sequences, initial_state[0], initial_state[1])]
        if mask is not None:
            args.append(tf.cast(mask, tf.bool))
        args += [w[name] for name in _WEIGHTS + _BIASES if w[name] is not None]
        compiled, plain = _fused_function(config, work)
        # Called eagerly, the compiled function runs the loop as a graph. Inside a graph being built
        # (tf.function, model.fit) the plain body is traced in place instead -- unless the layer asks
        # for XLA and nothing around it compiles with XLA: a nested function call hands the shapes its
        # gradient needs across the call boundary as values, and an enclosing XLA compilation would
        # then treat every input as a compile-time constant and recompile for each new batch.
        inline = tf.inside_function() and (not self.jit_compile or _in_xla_context())
        results = (plain if inline else compiled)(*args)
        last, outputs, h, c = (tf.cast(t, self.compute_dtype) for t in results)
        return last, outputs, [h, c]

    # ---- serialisation and canonical parameters ----

    def get_config(self):
        config = self.cell.get_config()
        for key in ("name", "trainable", "dtype"):
            config.pop(key, None)
        base = super().get_config()
        del base["cell"]
        base.pop("unroll", None)
        return {**base, **config, "use_fused": self.use_fused, "jit_compile": self.jit_compile}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    @classmethod
    def from_canonical(cls, params, **options):
        """A layer holding exactly the values of a canonical parameter mapping.

        Args:
            params: one canonical mapping (``mlstm_spec.init_params``'s output), or a list holding
                one. A Keras ``MLSTM`` is one layer: for a stack, build one layer per mapping and
                chain them with ``return_sequences=True`` (a longer list raises ValueError).
            **options: any constructor argument. The bias flags and ``independent_recurrence`` are read
                from ``params`` (passing a contradicting value raises ValueError); ``units`` is read from
                the shapes. ``dtype`` defaults to the parameters' dtype, or to the global policy when
                that is a mixed one.

        The values are copied exactly: the variable dtype must hold the parameters' dtype without
        rounding (float16 parameters into a ``mixed_float16`` layer's float32 variables are fine;
        float64 parameters into a float32 layer raise TypeError).
        """
        layer_params, info, options = _canonical_options(cls, params, options)
        layer = cls(info.hidden_size, **options)
        layer.cell.build((None, info.input_size))
        _assign(layer.cell, layer_params)
        return layer

    def to_canonical(self) -> list[dict]:
        """``[mapping]``: the weights as NumPy arrays (variable dtype) under their canonical names."""
        return _to_canonical(self.cell)


def _cell_property(name):
    return property(lambda self: getattr(self.cell, name),
                    doc=f"The cell's ``{name}`` (see :class:`MLSTMCell`).")


for _name in _WEIGHTS + _BIASES + tuple(LAYER_OPTIONS):
    setattr(MLSTM, _name, _cell_property(_name))
del _name


def _canonical_options(cls, params, options):
    """Validate ``params`` for one layer and merge what it implies into ``options``."""
    if isinstance(params, Sequence) and not isinstance(params, (str, bytes, Mapping)) and len(params) > 1:
        raise ValueError(
            f"params is a stack of {len(params)} layers, but {cls.__name__} is one layer; build one per "
            "mapping ([MLSTM.from_canonical(p, return_sequences=True) for p in params]) and chain them"
        )
    single = params[0] if isinstance(params, (list, tuple)) and len(params) == 1 else params
    layer_params = ({k: np.asarray(v) for k, v in single.items()} if isinstance(single, Mapping)
                    else single)
    dtypes = ({k: v.dtype.name for k, v in layer_params.items() if hasattr(v, "dtype")}
              if isinstance(layer_params, Mapping) else {})
    bfloat16 = "bfloat16" in dtypes.values()
    if bfloat16 and set(dtypes.values()) != {"bfloat16"}:
        raise TypeError(f"params mixes dtypes {dtypes}; all parameters must share one dtype")
    # bfloat16 (ml_dtypes) is checked as float32, which holds it exactly, and assigned as it is.
    checked = {k: v.astype(np.float32) for k, v in layer_params.items()} if bfloat16 else params
    _, infos = canonical_stack(checked)
    info = infos[0]
    options = dict(options)
    for flag, value in info.options.items():
        if flag in options and bool(options[flag]) != value:
            raise ValueError(
                f"{flag}={options[flag]!r} contradicts params, which imply {flag}={value} "
                f"(keys present: {sorted(layer_params)})"
            )
        options[flag] = value
    if "units" in options and options.pop("units") != info.hidden_size:
        raise ValueError(f"units contradicts params, which have H={info.hidden_size}")
    if options.get("dtype") is None:
        policy = keras.config.dtype_policy()
        mixed = policy.compute_dtype != policy.variable_dtype
        options["dtype"] = policy.name if mixed else "bfloat16" if bfloat16 else info.dtype
    return layer_params, info, options


def _assign(cell, params):
    for name in cell.param_names:
        variable, value = getattr(cell, name), params[name]
        target = np.dtype(tf.as_dtype(variable.dtype).as_numpy_dtype)
        if not np.can_cast(value.dtype, target, casting="safe"):
            raise TypeError(
                f"params[{name!r}] has dtype {value.dtype.name}, which the layer's {target.name} "
                f"variables cannot hold exactly; pass dtype={value.dtype.name!r} (or a mixed policy)"
            )
        variable.assign(value.astype(target))


def _to_canonical(cell) -> list[dict]:
    if not cell.built:
        raise ValueError("the layer is not built yet: call it on an input first, or use from_canonical")
    return [{name: np.array(getattr(cell, name).value.numpy()) for name in cell.param_names}]


# ---------------------------------------------------------------------------------------------------
# Conformance adapter
# ---------------------------------------------------------------------------------------------------

class ConformanceAdapter:
    """The :mod:`mlstm_spec.conformance` adapter: the public layer, NumPy in and out.

    Builds the layer through :meth:`MLSTM.from_canonical` on every call (the compiled fused function is
    cached across calls by configuration). ``"float16"`` and ``"bfloat16"`` mean Keras mixed
    precision: float16 parameters and inputs run in a ``mixed_float16`` layer (float32 variables
    holding the float16 values exactly, float16 compute dtype) and the results come back as float16;
    likewise bfloat16 with ``mixed_bfloat16``. Unbatched (T, I) inputs
    get a batch axis of one, because Keras layers take batched input only. Stacks are not supported
    (a Keras ``MLSTM`` is one layer).
    """

    name = "tensorflow"
    dtypes = ("float64", "float32", "float16", "bfloat16")

    def __init__(self, device: str = "cpu", *, use_fused="auto", jit_compile=False):
        self.device = device
        self._tf_device = _tf_device(device)
        self.use_fused = use_fused
        self.jit_compile = jit_compile
        if self._tf_device.startswith("/GPU"):
            # float32 must mean float32: no TensorFloat-32 matrix products on Ampere and later.
            tf.config.experimental.enable_tensor_float_32_execution(False)

    def supports(self, options) -> bool:
        return options["num_layers"] == 1

    def _layer(self, params, integration_mode):
        dtype = next(iter(params.values())).dtype.name
        return MLSTM.from_canonical(
            params, integration_mode=integration_mode, return_sequences=True, return_state=True,
            use_fused=self.use_fused, jit_compile=self.jit_compile,
            dtype=f"mixed_{dtype}" if dtype in ("float16", "bfloat16") else dtype,
        )

    @staticmethod
    def _batched(xs, state):
        if xs.ndim == 3:
            return xs, state, False
        return xs[None], None if state is None else tuple(s[None] for s in state), True

    def forward(self, params, xs, state, *, integration_mode):
        xs, state, unbatched = self._batched(xs, state)
        dtype = xs.dtype
        with tf.device(self._tf_device):
            layer = self._layer(params, integration_mode)
            initial = None if state is None else [tf.constant(s) for s in state]
            hs, h, c = layer(tf.constant(xs), initial_state=initial)
        hs, h, c = (np.asarray(t.numpy(), dtype=dtype) for t in (hs, h, c))
        if unbatched:
            hs, h, c = hs[0], h[0], c[0]
        return hs, (h, c)

    def gradients(self, params, xs, state, d_hs, d_state, *, integration_mode):
        xs, state, unbatched = self._batched(xs, state)
        if unbatched:
            d_hs = d_hs[None]
            d_state = None if d_state is None else tuple(s[None] for s in d_state)
        dtype = xs.dtype
        batch, hidden = xs.shape[0], d_hs.shape[-1]
        if state is None:  # explicit zeros, so their gradients can be taken
            state = (np.zeros((batch, hidden), dtype), np.zeros((batch, hidden), dtype))
        with tf.device(self._tf_device):
            layer = self._layer(params, integration_mode)
            x, h0, c0 = (tf.constant(a) for a in (xs, *state))
            with tf.GradientTape() as tape:
                tape.watch([x, h0, c0])
                hs, h, c = layer(x, initial_state=[h0, c0])
                # The loss is linear in the outputs, so its gradient is exactly (d_hs, d_h_T, d_c_T);
                # it is summed in float32 at least so that float16 cannot overflow.
                wide = np.float64 if dtype == np.float64 else np.float32
                pairs = [(hs, d_hs)] + ([] if d_state is None else [(h, d_state[0]), (c, d_state[1])])
                loss = sum(tf.reduce_sum(tf.cast(out, wide) * tf.constant(np.asarray(d, wide)))
                           for out, d in pairs)
            names = layer.cell.param_names
            variables = [getattr(layer.cell, n) for n in names]
            grads = tape.gradient(loss, variables + [x, h0, c0])
        out = {k: np.asarray(g.numpy(), dtype=dtype) for k, g in zip(names + ["x", "h0", "c0"], grads)}
        if unbatched:
            out.update(x=out["x"][0], h0=out["h0"][0], c0=out["c0"][0])
        return out
