"""The Keras layers: :class:`MLSTMCell` (one step, for ``keras.layers.RNN``) and :class:`MLSTM` (a layer
used like ``keras.layers.LSTM``, running the fused recurrence of ``recurrence.py`` by default)."""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
import keras

from backends._common import (
    DTYPES,
    LAYER_OPTIONS,
    VARIANT_OPTIONS,
    as_numpy,
    canonical_import,
    check_layer_options,
    layer_info,
    present_params,
    set_layer_options,
    work_dtype,
)
from mlstm_spec.equations import BIAS_FLAGS, IH_BLOCKS, PEEPHOLE_WEIGHTS
from mlstm_spec.validation import (LayerInfo, check_runtime_options, check_sequence, check_state, dtype_name,
                                   expected_shapes)

from .recurrence import FusedConfig, StepVariants, fused_function, step, transposed

try:  # the mix-in through which keras.layers.RNN makes, shares and resets a cell's dropout masks
    from keras.src.layers.rnn.dropout_rnn_cell import DropoutRNNCell
except ImportError:  # pragma: no cover - moved in a later Keras
    from keras.layers import DropoutRNNCell

_FUSED_CHOICES = ("auto", True, False)
_WEIGHTS = ("weight_ih", "weight_hh", "weight_mh")
_BIASES = tuple(BIAS_FLAGS)  # bias_ih, bias_hh, bias_mh
_VARIANT_WEIGHTS = ("weight_hr",) + PEEPHOLE_WEIGHTS  # present with num_proj / use_peepholes
#: The constructor arguments of the spec's variants, with their defaults (all off).
VARIANT_ARGUMENTS = dict(num_proj=None, use_peepholes=False, cell_clip=None, proj_clip=None, forget_bias=0.0)


def _vector_initializer(initializer):
    """Draw a vector (H,) as an (H, 1) matrix, so fan-based initializers see fan_in=1, fan_out=H
    (Flux's rule; Keras would read a vector as fan_in = fan_out = H)."""

    def draw(shape, dtype=None):
        return tf.reshape(initializer((shape[0], 1), dtype=dtype), shape)

    return draw


def _unit_forget_bias(initializer):
    """``initializer`` for ``bias_ih`` with its forget block set to one (Keras's ``unit_forget_bias``;
    the spec's ``init_params(unit_forget_bias=True)``)."""

    def draw(shape, dtype=None):
        values = initializer(shape, dtype=dtype)
        size, f = shape[0] // len(IH_BLOCKS), IH_BLOCKS.index("f")
        return tf.concat([values[: f * size], tf.ones((size,), values.dtype), values[(f + 1) * size:]], axis=0)

    return draw


# keras.layers.LSTM's (and torch.nn.LSTM's) arguments that mean something else here: the error says what.
_NOT_HERE = {
    "use_cudnn": "MLSTM has no cuDNN kernel; use_fused='auto' | True | False chooses its fused path or the "
                 "generic loop, as use_cudnn does for LSTM",
    "implementation": "use use_fused='auto' | True | False to choose the fused path or the generic loop",
    "hidden_size": "Keras layers take the hidden size as units (MLSTM(units))",
    "input_size": "the input size is inferred from the input when the layer is built",
    "batch_first": "Keras layers take batch-major input (B, T, I) only",
    "num_layers": "an MLSTM is one layer: stack layers, all but the last with return_sequences=True",
    "bidirectional": "wrap the layer in keras.layers.Bidirectional",
    "time_major": "Keras layers take batch-major input (B, T, I) only",
    "proj_size": "Keras layers take the projection size as num_proj (TensorFlow's LSTMCell name)",
    "peepholes": "use use_peepholes=True (TensorFlow's LSTMCell name)",
    "forget_bias_init": "the forget block of bias_ih starts at bias_initializer's value, or at one with "
                        "unit_forget_bias=True (forget_bias is a constant added at every step)",
}
_FIXED_ACTIVATIONS = {"activation": "tanh", "recurrent_activation": "sigmoid"}


def _keras_arguments(owner, kwargs, flags, use_bias):
    """Check keras.layers.LSTM's arguments that MLSTM only accepts where they mean the same thing, and
    return the bias flags with ``use_bias`` applied (False: no bias at all, as for LSTM)."""
    for name, hint in _NOT_HERE.items():
        if name in kwargs:
            raise TypeError(f"{owner} got an unexpected keyword argument {name!r}: {hint}")
    for name, fixed in _FIXED_ACTIVATIONS.items():
        if name in kwargs:
            value = kwargs.pop(name)
            if keras.activations.get(value) is not keras.activations.get(fixed):
                raise ValueError(
                    f"{name} must be {fixed!r} (the mLSTM's equations fix tanh on the candidate and cell, "
                    f"sigmoid on the gates; see docs/equations.md), got {value!r}"
                )
    if use_bias is None:
        return flags
    if not isinstance(use_bias, (bool, np.bool_)):
        raise TypeError(f"use_bias must be a bool, got {type(use_bias).__name__} {use_bias!r}")
    if use_bias:
        return flags
    if any(flags.values()) and not all(flags.values()):
        raise ValueError(
            f"use_bias=False switches off all three biases, but {flags} were given; pass either use_bias "
            "or bias=, recurrent_bias=, multiplicative_bias="
        )
    return dict.fromkeys(flags, False)


def _check_rate(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_variants(units, independent_recurrence, num_proj, use_peepholes, cell_clip, proj_clip,
                    forget_bias) -> dict:
    """The variant arguments, checked; returns them with the run-time ones as Python floats."""
    if num_proj is not None:
        if isinstance(num_proj, (bool, np.bool_)) or not isinstance(num_proj, (int, np.integer)):
            raise TypeError(f"num_proj must be None (no projection) or an int, got {type(num_proj).__name__} "
                            f"{num_proj!r}")
        if not 1 <= num_proj < units:
            raise ValueError(f"num_proj must be None (no projection) or an int in 1..units-1 = 1..{units - 1} "
                             f"(the projection makes h narrower than the cell state), got {num_proj}")
        if independent_recurrence:
            raise ValueError(f"num_proj={num_proj} cannot be combined with independent_recurrence=True: the "
                             "vector weight_hh multiplies h element-wise, which needs h to be units wide")
        num_proj = int(num_proj)
    if not isinstance(use_peepholes, (bool, np.bool_)):
        raise TypeError(f"use_peepholes must be a bool, got {type(use_peepholes).__name__} {use_peepholes!r}")
    runtime = check_runtime_options(None, cell_clip=cell_clip, proj_clip=proj_clip, forget_bias=forget_bias)
    if runtime["proj_clip"] is not None and num_proj is None:
        raise ValueError(f"proj_clip={proj_clip!r} clips the projected output, which needs a projection: pass "
                         "num_proj too, or leave proj_clip=None")
    return dict(num_proj=num_proj, use_peepholes=bool(use_peepholes), **runtime)


def _options_info(cell, input_size, dtype) -> LayerInfo:
    return dataclasses.replace(layer_info(input_size, cell.units, dtype, **cell.options),
                               proj_size=cell.num_proj or 0, peepholes=cell.use_peepholes)


@keras.saving.register_keras_serializable(package="mlstm")
class MLSTMCell(keras.layers.Layer, DropoutRNNCell):
    """Cell of the Multiplicative LSTM (one step of docs/equations.md), for ``keras.layers.RNN``.

    Use it like ``keras.layers.LSTMCell``: ``keras.layers.RNN(MLSTMCell(64))`` gives masking,
    ``go_backwards``, ``stateful`` and ``keras.layers.Bidirectional`` through Keras's generic loop.
    :class:`MLSTM` computes the same function much faster over whole sequences.

    Args:
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
        unit_forget_bias: start the forget block of ``bias_ih`` at one (after ``bias_initializer``),
            as ``keras.layers.LSTM`` and ``mlstm_spec.init_params(unit_forget_bias=True)`` do; needs
            ``bias=True``. Default False (RecurrentLayers.jl's initial values; LSTM's default is True).
        use_bias: ``False`` is ``bias=recurrent_bias=multiplicative_bias=False`` (no bias at all, as
            for ``keras.layers.LSTM``); ``True`` or None leaves the three flags as given.
        dropout: fraction of the input features dropped during training, one mask (B, I) per call
            shared by every step, as ``keras.layers.LSTM``.
        recurrent_dropout: fraction of the previous output ``h`` dropped during training, one mask
            (B, H) per call ((B, P) with a projection). ``h`` enters a step only through ``weight_hh``
            (``r = W_hh h + b_hh``, the factor that multiplies the input to form ``m``, from which every
            gate reads the past), so this drops the whole recurrent input of the step.
        seed: seed of the dropout masks.
        num_proj: the projection's size P (``1 <= P < units``), as TensorFlow's ``LSTMCell``; the
            weight ``weight_hr`` (P, H) maps each step's output down to P, so ``h`` (the output and the
            first half of the state) is P wide and ``weight_hh`` (H, P). None (default): no projection.
            Not with ``independent_recurrence``.
        use_peepholes: the diagonal peephole weights ``weight_ci``, ``weight_cf``, ``weight_co`` (each
            (H,)): the input and forget gates see the previous cell state, the output gate the new one
            (TensorFlow's ``use_peepholes``). Default False.
        cell_clip: None (default) or a bound > 0: the cell state is clipped to ``[-cell_clip, cell_clip]``.
        proj_clip: None (default) or a bound > 0 for the projected output (needs ``num_proj``).
        forget_bias: a constant added to the forget gate's pre-activation at every step (TensorFlow's
            run-time ``forget_bias``), default 0.0. Unlike ``unit_forget_bias``, which only sets the
            initial value of a trained bias, it is not a weight and never changes.
        projection_initializer, projection_regularizer, projection_constraint: for ``weight_hr``
            (default ``"glorot_uniform"``, no regulariser, no constraint).
        peephole_initializer, peephole_regularizer, peephole_constraint: for the three peephole
            vectors, each drawn as an (H, 1) matrix like a vector ``weight_hh``.
        activation, recurrent_activation: accepted only as ``"tanh"`` and ``"sigmoid"``
            (``keras.layers.LSTM``'s defaults), which the mLSTM's equations fix.
        kernel_regularizer, recurrent_regularizer, multiplicative_regularizer, bias_regularizer: as for
            ``keras.layers.LSTM``, per weight as above.
        kernel_constraint, recurrent_constraint, multiplicative_constraint, bias_constraint: likewise.
        **kwargs: Keras layer arguments (``name``, ``dtype``, ``trainable``).

    Call arguments:
        inputs: (B, I), one step.
        states: ``[h, c]``, each (B, H) (h (B, P) with a projection).

    Returns:
        ``h, [h, c]``: the output (B, H) (or (B, P)) and the new state.

    Weights (canonical names, shapes and block order, so ``to_canonical`` is a plain copy):
        weight_ih: (5H, I), row blocks ``m, i, o, f, z``.
        weight_hh: (H, H), or (H,) under independent recurrence.
        weight_mh: (4H, H), row blocks ``i, o, f, z``.
        bias_ih: (5H,) blocks ``m, i, o, f, z``; bias_hh: (H,); bias_mh: (4H,) blocks ``i, o, f, z``
            (each only when its option is on).
        weight_hr: (P, H), with ``num_proj``; ``weight_hh`` is then (H, P).
        weight_ci, weight_cf, weight_co: (H,) each, with ``use_peepholes``.
    """

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
        unit_forget_bias=False,
        use_bias=None,
        dropout=0.0,
        recurrent_dropout=0.0,
        seed=None,
        num_proj=None,
        use_peepholes=False,
        cell_clip=None,
        proj_clip=None,
        forget_bias=0.0,
        projection_initializer="glorot_uniform",
        peephole_initializer="glorot_uniform",
        projection_regularizer=None,
        peephole_regularizer=None,
        projection_constraint=None,
        peephole_constraint=None,
        **kwargs,
    ):
        flags = _keras_arguments(type(self).__name__, kwargs, dict(
            bias=bias, recurrent_bias=recurrent_bias, multiplicative_bias=multiplicative_bias), use_bias)
        bias, recurrent_bias, multiplicative_bias = flags["bias"], flags["recurrent_bias"], flags["multiplicative_bias"]
        check_layer_options(None, units, integration_mode=integration_mode, bias=bias,
                            recurrent_bias=recurrent_bias, multiplicative_bias=multiplicative_bias,
                            independent_recurrence=independent_recurrence)
        if not isinstance(unit_forget_bias, (bool, np.bool_)):
            raise TypeError(f"unit_forget_bias must be a bool, got {type(unit_forget_bias).__name__} "
                            f"{unit_forget_bias!r}")
        if unit_forget_bias and not bias:
            raise ValueError("unit_forget_bias=True sets the forget block of bias_ih, which bias=False "
                             "(or use_bias=False) removes")
        variants = _check_variants(units, independent_recurrence, num_proj, use_peepholes, cell_clip, proj_clip,
                                   forget_bias)
        self.dropout = _check_rate("dropout", dropout)
        self.recurrent_dropout = _check_rate("recurrent_dropout", recurrent_dropout)
        super().__init__(**kwargs)
        self.num_proj, self.use_peepholes = variants["num_proj"], variants["use_peepholes"]
        self.cell_clip, self.proj_clip = variants["cell_clip"], variants["proj_clip"]
        self.forget_bias = variants["forget_bias"]
        self.unit_forget_bias = bool(unit_forget_bias)
        self.seed = seed
        if self.dropout or self.recurrent_dropout:
            self.seed_generator = keras.random.SeedGenerator(seed)
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
            "weight_hr": keras.initializers.get(projection_initializer),
            "peephole": keras.initializers.get(peephole_initializer),
        }
        self.regularizers = {
            "weight_ih": keras.regularizers.get(kernel_regularizer),
            "weight_hh": keras.regularizers.get(recurrent_regularizer),
            "weight_mh": keras.regularizers.get(multiplicative_regularizer),
            "bias": keras.regularizers.get(bias_regularizer),
            "weight_hr": keras.regularizers.get(projection_regularizer),
            "peephole": keras.regularizers.get(peephole_regularizer),
        }
        self.constraints = {
            "weight_ih": keras.constraints.get(kernel_constraint),
            "weight_hh": keras.constraints.get(recurrent_constraint),
            "weight_mh": keras.constraints.get(multiplicative_constraint),
            "bias": keras.constraints.get(bias_constraint),
            "weight_hr": keras.constraints.get(projection_constraint),
            "peephole": keras.constraints.get(peephole_constraint),
        }
        width = self.num_proj or self.units  # of h: the output and the first half of the state
        self.state_size = [width, self.units]
        self.output_size = width
        self.input_size = None

    @property
    def options(self) -> dict:
        """The layer options, by the names every backend uses."""
        return dict(bias=self.bias, recurrent_bias=self.recurrent_bias,
                    multiplicative_bias=self.multiplicative_bias,
                    independent_recurrence=self.independent_recurrence,
                    integration_mode=self.integration_mode)

    @property
    def variants(self) -> dict:
        """The variant arguments that are switched on, by their names here."""
        return {name: getattr(self, name) for name, default in VARIANT_ARGUMENTS.items()
                if getattr(self, name) != default}

    @property
    def param_names(self) -> list[str]:
        """Canonical names of this cell's weights: canonical order, then the variants' weights."""
        names = present_params(_options_info(self, 1, "float32"))
        names += ["weight_hr"] if self.num_proj else []
        return names + (list(PEEPHOLE_WEIGHTS) if self.use_peepholes else [])

    def build(self, input_shape):
        input_size = input_shape[-1]
        if input_size is None:
            raise ValueError(
                "inputs must have a known feature size I in their last dimension, got shape "
                f"{tuple(input_shape)}"
            )
        self.input_size = int(input_size)
        H, I = self.units, self.input_size
        shapes = expected_shapes(I, H, self.independent_recurrence, self.num_proj or 0)
        for name in self.param_names:
            kind = "bias" if name.startswith("bias") else "peephole" if name in PEEPHOLE_WEIGHTS else name
            initializer = self.initializers[kind]
            if name == "weight_hh" and self.independent_recurrence or kind == "peephole":
                initializer = _vector_initializer(initializer)
            if name == "bias_ih" and self.unit_forget_bias:
                initializer = _unit_forget_bias(initializer)
            variable = self.add_weight(
                shape=shapes[name], name=name, initializer=initializer,
                regularizer=self.regularizers[kind], constraint=self.constraints[kind],
            )
            setattr(self, name, variable)
        for name in _BIASES + _VARIANT_WEIGHTS:
            if name not in self.param_names:
                setattr(self, name, None)

    def weights_in(self, dtype) -> dict:
        """Every weight as a tensor of ``dtype``, absent biases and variant weights as None.

        Under a mixed policy the float32 variables are first rounded to the compute dtype (as Keras's
        autocasting rounds them), then widened to ``dtype`` when that is wider.
        """
        return {name: None if getattr(self, name) is None
                else tf.cast(tf.cast(getattr(self, name).value, self.compute_dtype), dtype)
                for name in _WEIGHTS + _BIASES + _VARIANT_WEIGHTS}

    def step_variants(self, w) -> StepVariants | None:
        """The variants of a step, from :meth:`weights_in`'s ``w``; None when none is switched on."""
        if not self.variants:
            return None
        w_hr = w["weight_hr"]
        return StepVariants(None if w_hr is None else tf.transpose(w_hr), w["weight_ci"], w["weight_cf"],
                            w["weight_co"], self.cell_clip, self.proj_clip, self.forget_bias)

    def call(self, inputs, states, training=False):
        if inputs.shape[-1] is not None and inputs.shape[-1] != self.input_size:
            raise ValueError(
                f"inputs must have I={self.input_size} features in their last dimension (the cell was "
                f"built for that size), got shape {tuple(inputs.shape)}"
            )
        work = work_dtype(self.compute_dtype)
        keep = None
        if training and self.dropout:
            inputs = inputs * self.get_dropout_mask(inputs)
        if training and self.recurrent_dropout:
            keep = tf.cast(self.get_recurrent_dropout_mask(states[0]), work)
        inputs, h, c = (tf.cast(t, work) for t in (inputs, states[0], states[1]))
        w = self.weights_in(work)
        p = tf.matmul(inputs, w["weight_ih"], transpose_b=True)
        if w["bias_ih"] is not None:
            p = p + w["bias_ih"]
        h, c, _ = step(p[:, : self.units], p[:, self.units :], h, c, transposed(w["weight_hh"]),
                        tf.transpose(w["weight_mh"]), w["bias_hh"], w["bias_mh"], self.multiplicative, keep,
                        self.step_variants(w))
        h, c = tf.cast(h, self.compute_dtype), tf.cast(c, self.compute_dtype)
        return h, [h, c]

    def get_initial_state(self, batch_size=None):
        return [tf.zeros((batch_size, width), dtype=self.compute_dtype) for width in self.state_size]

    def get_config(self):
        config = dict(units=self.units, **self.options, unit_forget_bias=self.unit_forget_bias,
                      dropout=self.dropout, recurrent_dropout=self.recurrent_dropout, seed=self.seed,
                      **{name: getattr(self, name) for name in VARIANT_ARGUMENTS})
        for kind, arg in (("weight_ih", "kernel"), ("weight_hh", "recurrent"),
                          ("weight_mh", "multiplicative"), ("bias", "bias"), ("weight_hr", "projection"),
                          ("peephole", "peephole")):
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
    """Multiplicative LSTM layer (Krause et al. 2016), used like ``keras.layers.LSTM``: the step of
    docs/equations.md over a sequence.

    Args:
        units: hidden size H, and the options ``bias``, ``recurrent_bias``, ``multiplicative_bias``,
            ``independent_recurrence``, ``integration_mode`` and the initializers, regularizers and
            constraints: as for :class:`MLSTMCell`, and ``unit_forget_bias``, ``use_bias``, ``dropout``,
            ``recurrent_dropout``, ``seed``, ``activation``, ``recurrent_activation``: as for
            :class:`MLSTMCell`. The fused path applies both dropouts as the generic loop does
            (the same masks, given the seed).
        num_proj: the projection size P (the spec's variants, as for :class:`MLSTMCell`, all off by
            default; so are ``use_peepholes``, ``cell_clip``, ``proj_clip``, ``forget_bias`` and the
            ``projection_*`` and ``peephole_*`` initializers, regularizers and constraints). With
            ``num_proj=P`` the outputs and ``h_T`` are P wide, ``c_T`` stays H wide.
        return_sequences: return the output of every step (B, T, H) instead of the last (B, H).
        return_state: also return the final state ``h_T, c_T`` (each (B, H)), as ``keras.layers.LSTM``.
        go_backwards: process the sequence in reverse and return the reversed output sequence.
        stateful: the final state of batch row k is the initial state of row k in the next call
            (needs a fixed batch size; ``reset_state()`` clears it).
        unroll: as for ``keras.layers.LSTM``: one copy of the step per time step instead of a graph
            loop (needs a known T; for short sequences). The unrolled graph has no loop, so a model
            converts to TFLite with a dynamic batch size (docs/keras.md).
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
        initial_state: ``[h_0, c_0]``, each (B, H) (h_0 (B, P) with a projection); zeros when omitted.
        mask: (B, T) booleans; a masked step keeps the state and repeats the previous output.
        training: dropout and recurrent_dropout act only when True (``fit`` sets it).

    Returns:
        The last output (B, H), or every output (B, T, H) with ``return_sequences``; with
        ``return_state``, ``[output, h_T, c_T]`` like ``keras.layers.LSTM``. (P instead of H for the
        outputs and ``h_T`` with a projection.)

    Dtypes: as every Keras layer, the layer casts floating inputs and initial states to its compute
    dtype (a float64 NumPy array given to a float32 layer is rounded to float32); other dtypes raise
    TypeError. Under a mixed policy
    (``dtype="mixed_float16"``) the variables are float32 and the compute dtype float16: inputs and
    initial states in either dtype are cast to float16 and the weights are rounded to float16 (Keras's
    mixed-precision mechanism); then the recurrence computes in float32 and returns float16 results,
    because rounding every step's intermediates to float16 would compound over the steps (mlstm_spec,
    and the torch and JAX backends, compute float16 the same way). ``"mixed_bfloat16"`` likewise.

    Non-finite inputs are propagated, not checked (a check would need a device synchronisation); a NaN
    in one batch row never reaches the outputs of another row.
    Weights: those of :class:`MLSTMCell`, read through the layer (``layer.weight_ih``, ...).

    Example::

        layer = MLSTM(128, return_sequences=True)
        hs = layer(np.zeros((4, 10, 32), "float32"))                    # (4, 10, 128)
        same = MLSTM.from_canonical(layer.to_canonical(), return_sequences=True)
    """

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
        unit_forget_bias=False,
        use_bias=None,
        dropout=0.0,
        recurrent_dropout=0.0,
        seed=None,
        num_proj=None,
        use_peepholes=False,
        cell_clip=None,
        proj_clip=None,
        forget_bias=0.0,
        projection_initializer="glorot_uniform",
        peephole_initializer="glorot_uniform",
        projection_regularizer=None,
        peephole_regularizer=None,
        projection_constraint=None,
        peephole_constraint=None,
        return_sequences=False,
        return_state=False,
        go_backwards=False,
        stateful=False,
        unroll=False,
        use_fused="auto",
        jit_compile=False,
        **kwargs,
    ):
        _keras_arguments(type(self).__name__, kwargs, {}, None)
        numeric = isinstance(use_fused, (int, float)) and not isinstance(use_fused, bool)
        if numeric or use_fused not in _FUSED_CHOICES:
            raise ValueError(f"use_fused must be one of {_FUSED_CHOICES}, got {use_fused!r}")
        if not isinstance(jit_compile, (bool, np.bool_)):
            raise TypeError(f"jit_compile must be a bool, got {type(jit_compile).__name__} {jit_compile!r}")
        if not isinstance(unroll, (bool, np.bool_)):
            raise TypeError(f"unroll must be a bool, got {type(unroll).__name__} {unroll!r}")
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
            unit_forget_bias=unit_forget_bias,
            use_bias=use_bias,
            dropout=dropout,
            recurrent_dropout=recurrent_dropout,
            seed=seed,
            num_proj=num_proj,
            use_peepholes=use_peepholes,
            cell_clip=cell_clip,
            proj_clip=proj_clip,
            forget_bias=forget_bias,
            projection_initializer=projection_initializer,
            peephole_initializer=peephole_initializer,
            projection_regularizer=projection_regularizer,
            peephole_regularizer=peephole_regularizer,
            projection_constraint=projection_constraint,
            peephole_constraint=peephole_constraint,
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
            unroll=bool(unroll),
            **kwargs,
        )
        self.use_fused = use_fused
        self.jit_compile = bool(jit_compile)
        self.input_spec = keras.InputSpec(ndim=3)  # (B, T, I); build adds I

    # ---- options and weights, read from the cell ----

    @property
    def units(self) -> int:
        return self.cell.units

    @property
    def options(self) -> dict:
        return self.cell.options

    # The weights (weight_ih, ..., bias_mh, and the variants' weight_hr, ...), the option flags and the
    # variant arguments live on the cell; they are exposed here as read-only properties, defined below
    # the class.

    # ---- input checks: rank and feature size by the InputSpec, the rest once Keras has converted ----

    def build(self, sequences_shape, initial_state_shape=None):
        super().build(sequences_shape, initial_state_shape)
        self.input_spec = keras.InputSpec(ndim=3, axes={-1: self.cell.input_size})

    def call(self, sequences, initial_state=None, mask=None, training=False):
        self._check_call(sequences, initial_state, mask)
        return super().call(sequences, initial_state=initial_state, mask=mask, training=training)

    def _check_call(self, sequences, initial_state, mask):
        """What the InputSpec (rank, feature size) does not check: dtypes after Keras's conversion,
        empty sequences, the state's and the mask's shapes."""
        shape = tuple(sequences.shape)
        input_size = self.cell.input_size
        info = _options_info(self.cell, input_size, self.compute_dtype)
        check_sequence(shape, dtype_name(sequences.dtype), info, "sequences", DTYPES)
        if initial_state is not None:
            batch = shape[0]

            def shape_of(v):
                got = tuple(v.shape)
                if got and (got[0] is None or batch is None):  # a dynamic batch size matches any
                    got = (batch,) + got[1:]
                return got

            check_state(initial_state, (batch,), info, "initial_state", DTYPES,
                        shape_of=shape_of, dtype_of=lambda v: dtype_name(v.dtype))
        if mask is not None and not isinstance(mask, (list, tuple)) and hasattr(mask, "shape"):
            want = shape[:2]
            got = tuple(mask.shape)
            if len(got) != 2 or any(g is not None and w is not None and g != w for g, w in zip(got, want)):
                raise ValueError(f"mask must have shape (B, T) = {want} like sequences, got {got}")

    # ---- the fused path ----

    def fused_unavailable_reason(self) -> str | None:
        """Why the fused path cannot run this layer, or None when it can.

        It covers every option of :class:`MLSTMCell` (the spec's variants included), masks,
        ``go_backwards``, ``stateful`` and mixed precision; only a cell whose step was overridden (a
        subclass redefining ``call``) needs the generic loop, because the fused path would not run that
        step.
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
        config = FusedConfig(
            independent=cell.independent_recurrence, multiplicative=cell.multiplicative,
            bias=cell.bias, recurrent_bias=cell.recurrent_bias,
            multiplicative_bias=cell.multiplicative_bias, masked=mask is not None,
            go_backwards=bool(self.go_backwards), zero_output_for_mask=bool(self.zero_output_for_mask),
            return_sequences=bool(self.return_sequences), jit_compile=self.jit_compile,
            unroll=bool(self.unroll), projection=cell.num_proj is not None, peepholes=cell.use_peepholes,
            cell_clip=cell.cell_clip, proj_clip=cell.proj_clip, forget_bias=cell.forget_bias,
        )
        work = work_dtype(self.compute_dtype)
        w = cell.weights_in(work)
        if training and cell.dropout:  # the masks keras.layers.RNN.call has drawn for this call
            sequences = sequences * cell.get_dropout_mask(sequences[:, 0, :])[:, None, :]
        keep = (cell.get_recurrent_dropout_mask(initial_state[0])
                if training and cell.recurrent_dropout else None)
        config = config._replace(recurrent_dropout=keep is not None)
        args = [tf.cast(t, work) for t in (sequences, initial_state[0], initial_state[1])]
        if mask is not None:
            args.append(tf.cast(mask, tf.bool))
        if keep is not None:
            args.append(tf.cast(keep, work))
        args += [w[name] for name in _WEIGHTS + _BIASES + _VARIANT_WEIGHTS if w[name] is not None]
        compiled, plain = fused_function(config, work)
        # Called eagerly, the compiled function runs the loop as a graph. Inside a graph being built
        # (tf.function, model.fit) the plain body is traced in place instead: a nested function call
        # would hand the shapes its gradient needs across the call boundary as values, and an enclosing
        # XLA compilation would then treat every input as a compile-time constant and recompile for each
        # new batch. A layer that asks for XLA marks the traced ops for XLA compilation (inside an XLA
        # compilation they are compiled with it anyway).
        if not tf.inside_function():
            results = compiled(*args)
        elif self.jit_compile:
            with tf.xla.experimental.jit_scope():
                results = plain(*args)
        else:
            results = plain(*args)
        last, outputs, h, c = (tf.cast(t, self.compute_dtype) for t in results)
        return last, outputs, [h, c]

    # ---- serialisation and canonical parameters ----

    def get_config(self):
        config = self.cell.get_config()
        for key in ("name", "trainable", "dtype"):
            config.pop(key, None)
        base = super().get_config()
        del base["cell"]
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
            **options: any constructor argument. The bias flags, ``independent_recurrence``,
                ``num_proj`` (from ``weight_hr``) and ``use_peepholes`` (from ``weight_ci``, ...) are read
                from ``params`` (passing a contradicting value raises ValueError); ``units`` is read from
                the shapes. A weight file's run-time options (``cell_clip``, ``proj_clip``,
                ``forget_bias``) are used like its ``integration_mode``. ``dtype`` defaults to the
                parameters' dtype, or to the global policy when that is a mixed one.

        The values are copied exactly: the variable dtype must hold the parameters' dtype without
        rounding (float16 parameters into a ``mixed_float16`` layer's float32 variables are fine;
        float64 parameters into a float32 layer raise TypeError).
        """
        layer_params, info, options = _canonical_options(cls, params, options)
        layer = cls(info.hidden_size, **options)
        layer.cell.build((None, info.input_size))
        layer.input_spec = keras.InputSpec(ndim=3, axes={-1: info.input_size})
        _assign(layer.cell, layer_params)
        return layer

    def to_canonical(self) -> list[dict]:
        """``[mapping]``: the weights as NumPy arrays (variable dtype) under their canonical names."""
        return _to_canonical(self.cell)


def _cell_property(name):
    return property(lambda self: getattr(self.cell, name),
                    doc=f"The cell's ``{name}`` (see :class:`MLSTMCell`).")


for _name in _WEIGHTS + _BIASES + _VARIANT_WEIGHTS + tuple(LAYER_OPTIONS) + tuple(VARIANT_ARGUMENTS):
    setattr(MLSTM, _name, _cell_property(_name))
del _name


def _canonical_options(cls, params, options):
    """Check ``params`` for one layer (backends._common.canonical_import) and merge what it implies into
    ``options``; ``units`` is read from the shapes."""
    units = options.pop("units", None)
    layers, infos, options = canonical_import(params, options, one_layer=True, owner=cls.__name__,
                                              backend="backends.tensorflow", variants=frozenset(VARIANT_OPTIONS))
    del options["num_layers"]
    info = infos[0]
    if units is not None and units != info.hidden_size:
        raise ValueError(f"units={units!r} contradicts params, which imply units={info.hidden_size} (from the shapes)")
    # The structural variants by their Keras names (a canonical name given by the caller and not implied
    # by params stays in options, and the constructor says which name to use).
    for name, keras_name, implied, source in (
            ("proj_size", "num_proj", info.proj_size or None, "weight_hr, or its absence"),
            ("peepholes", "use_peepholes", info.peepholes, "weight_ci, weight_cf, weight_co")):
        if implied:
            options.pop(name)
        if keras_name in options and options[keras_name] != implied:
            raise ValueError(f"{keras_name}={options[keras_name]!r} contradicts params, which imply "
                             f"{keras_name}={implied!r} (from {source})")
        options[keras_name] = implied
    if options.get("dtype") is None:
        policy = keras.config.dtype_policy()
        mixed = policy.compute_dtype != policy.variable_dtype
        options["dtype"] = policy.name if mixed else info.dtype
    return layers[0], info, options


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
