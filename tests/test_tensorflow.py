"""The TensorFlow / Keras backend: the shared conformance suite on both recurrence paths, plus what is
specific to Keras (keras.layers.LSTM's conventions, the LSTM reduction against keras.layers.LSTM
itself, eager / tf.function / XLA, masking, the cell inside keras.layers.RNN and Bidirectional,
saving to .keras and SavedModel, stateful layers, mixed precision, and the errors bad input gets)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import (assert_gpu_present, conformance_params, device_params, random_params, require_backend,
                     run_conformance)
from hypothesis import settings

btf = require_backend("tensorflow")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import mlstm_spec  # noqa: E402
from mlstm_spec.conformance import relative_error, tolerance  # noqa: E402
from mlstm_spec.params import block  # noqa: E402

MODES = ("addition", "multiplicative_integration")
F64_TOL = tolerance("float64")


def assert_close(got, want, tol=F64_TOL, what=""):
    """Norm-wise relative error of the suite (tolerances.relative_error) within ``tol``."""
    __tracebackhide__ = True
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, but should be {want.shape}"
    error, index = relative_error(got, want)
    assert error <= tol, f"{what}[{index}]: relative error {error:.2e} > {tol:.0e}"


def outputs_and_gradients(layer, x, initial_state=None, mask=None, call=None):
    """Sequences, final state and the gradient of a fixed random loss with respect to every weight,
    the input and the initial state (float64)."""
    rng = np.random.default_rng(123)
    x = tf.constant(x)
    watched = [x] + ([] if initial_state is None else [tf.constant(s) for s in initial_state])
    with tf.GradientTape() as tape:
        tape.watch(watched)
        state = None if initial_state is None else watched[1:]
        result = (call or layer)(x, initial_state=state, mask=mask) if mask is not None else \
            (call or layer)(x, initial_state=state)
        loss = sum(tf.reduce_sum(r * rng.standard_normal(r.shape)) for r in result)
    grads = tape.gradient(loss, layer.trainable_weights + watched)
    return [r.numpy() for r in result] + [g.numpy() for g in grads]


def prefix_layer(params, mode="addition", **options):
    return btf.MLSTM.from_canonical(params, integration_mode=mode, return_sequences=True,
                                    return_state=True, **options)


# ---- the shared conformance suite ----

@pytest.mark.parametrize(("device", "dtype"), conformance_params(btf))
def test_conformance(device, dtype):
    """The fused path (the default) against mlstm_spec: outputs, final states and every gradient, in
    layers of the parameters' dtype (float16 and bfloat16 variables, computed in float32)."""
    run_conformance(btf.ConformanceAdapter, device, dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_conformance_generic_loop(dtype):
    """The generic keras.layers.RNN loop over MLSTMCell (use_fused=False) against mlstm_spec too.
    (In float16 this loop carries the state between steps in float16, as Keras's RNN does; it stays
    well inside the float16 tolerance.)"""
    run_conformance(lambda device: btf.ConformanceAdapter(device, use_fused=False), "cpu", dtype,
                    settings=settings(max_examples=12))


# ---- execution modes and paths agree ----

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("independent", [False, True])
def test_eager_tf_function_and_xla_agree(mode, independent):
    """Outputs, final state and all gradients agree in float64 across: the fused path called eagerly,
    inside tf.function, compiled by XLA (jit_compile=True on the layer, and tf.function(jit_compile=True)
    around it), and the generic per-step loop run eagerly. The same arithmetic in a different order:
    within the float64 tolerance, while any wrong term gives errors of order 1e-2."""
    rng = np.random.default_rng(7)
    params = random_params(rng, 3, 5, independent_recurrence=independent)
    x = rng.standard_normal((4, 9, 3))
    state = (rng.uniform(-1, 1, (4, 5)), rng.standard_normal((4, 5)))
    fused = prefix_layer(params, mode)
    results = {
        "eager": outputs_and_gradients(fused, x, state),
        "tf.function": outputs_and_gradients(fused, x, state, call=tf.function(fused)),
        "tf.function(jit_compile=True)": outputs_and_gradients(
            fused, x, state, call=tf.function(fused, jit_compile=True)),
    }
    xla = prefix_layer(params, mode, jit_compile=True)
    results["layer jit_compile=True"] = outputs_and_gradients(xla, x, state)
    generic = prefix_layer(params, mode, use_fused=False)
    results["generic loop, eager"] = outputs_and_gradients(generic, x, state)
    want_hs, (want_h, want_c) = mlstm_spec.forward(params, x, state, integration_mode=mode)
    for name, got in results.items():
        assert_close(got[0], want_hs, what=f"{name} hs")
        assert_close(got[2], want_c, what=f"{name} c_T")
        for k, (a, b) in enumerate(zip(got, results["eager"])):
            assert_close(a, b, what=f"{name} vs eager, result {k}")


@pytest.mark.parametrize("masked", [False, True])
def test_unroll_equals_the_graph_loop(masked):
    """unroll=True (one step copy per time step, autodiff) gives the outputs, final state and every
    gradient of the fused loop, with and without a mask and backwards (float64)."""
    rng = np.random.default_rng(31)
    params = random_params(rng, 3, 4)
    x = rng.standard_normal((3, 5, 3))
    state = (rng.uniform(-1, 1, (3, 4)), rng.standard_normal((3, 4)))
    mask = tf.constant(rng.random((3, 5)) < 0.7) if masked else None
    for go_backwards in (False, True):
        results = [outputs_and_gradients(prefix_layer(params, unroll=unroll, go_backwards=go_backwards),
                                          x, state, mask=mask) for unroll in (False, True)]
        for k, (a, b) in enumerate(zip(*results)):
            assert_close(b, a, what=f"unrolled result {k} (go_backwards={go_backwards})")


def test_second_derivatives_of_fused_path_match_generic_loop():
    """The hand-written backward pass is built from differentiable ops: a Hessian-vector product
    through the fused path equals the one through the generic (autodiff) loop."""
    rng = np.random.default_rng(3)
    params = random_params(rng, 2, 3)
    x = tf.constant(rng.standard_normal((2, 4, 2)))
    direction = tf.constant(rng.standard_normal((2, 4, 2)))
    results = []
    for use_fused in ("auto", False):
        layer = prefix_layer(params, use_fused=use_fused)
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                hs, h, c = layer(x)
                loss = tf.reduce_sum(hs ** 2) + tf.reduce_sum(c ** 3)
            (g,) = inner.gradient(loss, [x])
            directional = tf.reduce_sum(g * direction)
        results.append(outer.gradient(directional, [x] + layer.trainable_weights))
    for a, b in zip(*results):
        assert_close(a.numpy(), b.numpy(), what="Hessian-vector product")


@pytest.mark.parametrize("layer_jit_compile", [False, True])
def test_xla_program_does_not_depend_on_input_values(layer_jit_compile):
    """Inside an XLA-compiled training step, the compiled program is the same for any input values:
    otherwise XLA would treat the inputs as compile-time constants and recompile for every batch
    (what a nested function call around the fused path used to cause)."""
    layer = btf.MLSTM(3, return_sequences=True, jit_compile=layer_jit_compile)
    layer(tf.zeros((2, 4, 2)))

    @tf.function(jit_compile=True)
    def train_step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x) ** 2)
        return tape.gradient(loss, layer.trainable_weights)

    first = train_step.experimental_get_compiler_ir(tf.ones((2, 4, 2)))(stage="hlo")
    layer.cell.weight_mh.assign(layer.cell.weight_mh * 2)
    second = train_step.experimental_get_compiler_ir(tf.zeros((2, 4, 2)))(stage="hlo")
    assert first == second


# ---- keras.layers.LSTM's conventions ----

@pytest.mark.parametrize("return_sequences", [False, True])
@pytest.mark.parametrize("return_state", [False, True])
def test_return_structure_like_keras_lstm(return_sequences, return_state):
    """Same structure and shapes as keras.layers.LSTM: output (B, H) or (B, T, H), then h_T and c_T."""
    x = np.random.default_rng(0).standard_normal((3, 5, 4)).astype("float32")
    ours = btf.MLSTM(6, return_sequences=return_sequences, return_state=return_state)(x)
    theirs = keras.layers.LSTM(6, return_sequences=return_sequences, return_state=return_state)(x)
    if not return_state:
        ours, theirs = [ours], [theirs]
    assert [tuple(t.shape) for t in ours] == [tuple(t.shape) for t in theirs]
    if return_state:
        last = ours[0][:, -1] if return_sequences else ours[0]
        np.testing.assert_array_equal(last.numpy(), ours[1].numpy())  # the output is h_T


@pytest.mark.parametrize(("independent", "recurrent_bias", "multiplicative_bias"),
                         [(False, True, True), (True, True, False), (False, False, True)])
def test_lstm_reduction_matches_keras_lstm(independent, recurrent_bias, multiplicative_bias):
    """spec-facts §4: with weight_ih block m zero and bias_ih block m one, m = W_hh h + b_hh and the
    mLSTM is an LSTM with recurrent matrix W_mh[g] W_hh and bias b_ih[g] + W_mh[g] b_hh + b_mh[g].
    keras.layers.LSTM (gate order i, f, c, o; kernel (I, 4H), recurrent_kernel (H, 4H)) is the oracle."""
    rng = np.random.default_rng(11)
    I, H, B, T = 3, 4, 2, 7
    params = random_params(rng, I, H, independent_recurrence=independent,
                           recurrent_bias=recurrent_bias, multiplicative_bias=multiplicative_bias)
    block(params["weight_ih"], "m")[:] = 0.0
    block(params["bias_ih"], "m")[:] = 1.0
    w_hh = np.diag(params["weight_hh"]) if independent else params["weight_hh"]
    b_hh = params.get("bias_hh", np.zeros(H))
    b_mh = params.get("bias_mh", np.zeros(4 * H))
    keras_order = ("i", "f", "z", "o")  # keras's i, f, c, o; our candidate z is its c
    kernel = np.concatenate([block(params["weight_ih"], g).T for g in keras_order], axis=1)
    recurrent = np.concatenate(
        [(block(params["weight_mh"], g, mlstm_spec.MH_BLOCKS) @ w_hh).T for g in keras_order], axis=1)
    mh = mlstm_spec.MH_BLOCKS
    bias = np.concatenate([block(params["bias_ih"], g) + block(params["weight_mh"], g, mh) @ b_hh
                           + block(b_mh, g, mh) for g in keras_order])
    lstm = keras.layers.LSTM(H, return_sequences=True, return_state=True, dtype="float64")
    lstm.build((None, None, I))
    lstm.set_weights([kernel, recurrent, bias])
    x = rng.standard_normal((B, T, I))
    state = [rng.uniform(-1, 1, (B, H)), rng.standard_normal((B, H))]
    want = lstm(x, initial_state=state)
    for use_fused in ("auto", False):
        got = prefix_layer(params, use_fused=use_fused)(x, initial_state=state)
        for name, a, b in zip(("hs", "h_T", "c_T"), got, want):
            assert_close(a.numpy(), b.numpy(), what=f"{name} (use_fused={use_fused})")


# ---- masking ----

def right_padded(rng, lengths, T, I):
    x = rng.standard_normal((len(lengths), T, I))
    mask = np.arange(T)[None, :] < np.asarray(lengths)[:, None]
    x[~mask] = 99.0  # padding that would change everything if it leaked in
    return x, mask


@pytest.mark.parametrize("use_fused", ["auto", False])
@pytest.mark.parametrize("go_backwards", [False, True])
def test_masking_equals_running_the_prefix(use_fused, go_backwards):
    """For a right-padded batch, each row's outputs at its valid steps and its final state equal
    running that row's unpadded prefix alone; a padded step repeats the previous output (Keras)."""
    rng = np.random.default_rng(5)
    params = random_params(rng, 3, 4)
    lengths = [6, 3, 1]
    x, mask = right_padded(rng, lengths, 6, 3)
    state = (rng.uniform(-1, 1, (3, 4)), rng.standard_normal((3, 4)))
    layer = prefix_layer(params, use_fused=use_fused, go_backwards=go_backwards)
    hs, h, c = (t.numpy() for t in layer(x, initial_state=list(state), mask=mask))
    for row, length in enumerate(lengths):
        prefix = x[row:row + 1, :length]
        if go_backwards:  # the reversed prefix, after the (masked) padding
            prefix = prefix[:, ::-1]
        want_hs, (want_h, want_c) = mlstm_spec.forward(
            params, prefix, (state[0][row:row + 1], state[1][row:row + 1]))
        assert_close(h[row], want_h[0], what=f"h_T row {row}")
        assert_close(c[row], want_c[0], what=f"c_T row {row}")
        valid = hs[row, -length:] if go_backwards else hs[row, :length]
        assert_close(valid, want_hs[0], what=f"outputs row {row}")
        padded = hs[row, : 6 - length] if go_backwards else hs[row, length:]
        # padding before any valid step outputs zeros; after one, it repeats the last valid output
        last_valid = hs[row, length - 1]
        expected = np.zeros_like(padded) if go_backwards else np.broadcast_to(last_valid, padded.shape)
        np.testing.assert_array_equal(padded, expected)


@pytest.mark.parametrize("zero_output_for_mask", [False, True])
def test_fused_masking_equals_generic_masking(zero_output_for_mask):
    """Any mask (not only right padding): the fused path's outputs, states and gradients equal the
    generic keras.layers.RNN loop's, which defines Keras's masking semantics."""
    rng = np.random.default_rng(8)
    params = random_params(rng, 2, 3, independent_recurrence=True)
    x = rng.standard_normal((4, 7, 2))
    mask = rng.random((4, 7)) < 0.6
    mask[0] = False  # a fully masked row keeps its initial state
    state = (rng.uniform(-1, 1, (4, 3)), rng.standard_normal((4, 3)))
    results = []
    for use_fused in ("auto", False):
        layer = prefix_layer(params, "multiplicative_integration", use_fused=use_fused,
                             zero_output_for_mask=zero_output_for_mask)
        results.append(outputs_and_gradients(layer, x, state, mask=tf.constant(mask)))
    for k, (a, b) in enumerate(zip(*results)):
        assert_close(a, b, what=f"result {k}")
    np.testing.assert_array_equal(results[0][1][0], state[0][0])


def test_masking_layer_propagates_the_mask():
    """keras.layers.Masking in front: the same as passing the mask explicitly."""
    rng = np.random.default_rng(9)
    params = random_params(rng, 3, 4, dtype="float32")
    x, mask = right_padded(rng, [5, 2], 5, 3)
    x[~mask] = 0.0
    x = x.astype("float32")
    layer = btf.MLSTM.from_canonical(params, return_sequences=True)
    model = keras.Sequential([keras.Input((5, 3)), keras.layers.Masking(0.0), layer])
    np.testing.assert_array_equal(model(x).numpy(), layer(x, mask=mask).numpy())


# ---- the cell in keras.layers.RNN, go_backwards, Bidirectional ----

@pytest.mark.parametrize("go_backwards", [False, True])
def test_cell_in_keras_rnn_equals_layer(go_backwards):
    """keras.layers.RNN(MLSTMCell) computes what MLSTM computes (float64), for both directions."""
    rng = np.random.default_rng(12)
    params = random_params(rng, 3, 4, multiplicative_bias=False)
    x = rng.standard_normal((2, 6, 3))
    cell = btf.MLSTMCell.from_canonical(params, integration_mode="multiplicative_integration")
    rnn = keras.layers.RNN(cell, return_sequences=True, return_state=True, go_backwards=go_backwards,
                           dtype="float64")
    layer = prefix_layer(params, "multiplicative_integration", go_backwards=go_backwards)
    for a, b in zip(rnn(x), layer(x)):
        assert_close(a.numpy(), b.numpy())
    want_hs, _ = mlstm_spec.forward(params, x[:, ::-1] if go_backwards else x,
                                    integration_mode="multiplicative_integration")
    assert_close(layer(x)[0].numpy(), want_hs)  # reversed processing, reversed output order


@pytest.mark.parametrize("kind", ["MLSTM", "RNN(MLSTMCell)"])
def test_bidirectional(kind):
    """Bidirectional: forward outputs concatenated with the backward layer's outputs (re-aligned in
    time), each equal to the spec run forwards or on the reversed sequence."""
    rng = np.random.default_rng(13)
    forward_params, backward_params = random_params(rng, 3, 4), random_params(rng, 3, 4)
    if kind == "MLSTM":
        inner = btf.MLSTM(4, return_sequences=True, dtype="float64")
    else:
        inner = keras.layers.RNN(btf.MLSTMCell(4, dtype="float64"), return_sequences=True, dtype="float64")
    bidirectional = keras.layers.Bidirectional(inner, dtype="float64")
    x = rng.standard_normal((2, 5, 3))
    bidirectional(x)
    for sub, params in ((bidirectional.forward_layer, forward_params),
                        (bidirectional.backward_layer, backward_params)):
        for name in sub.cell.param_names:
            getattr(sub.cell, name).assign(params[name])
    got = bidirectional(x).numpy()
    want_forward, _ = mlstm_spec.forward(forward_params, x)
    want_backward, _ = mlstm_spec.forward(backward_params, x[:, ::-1])
    assert_close(got, np.concatenate([want_forward, want_backward[:, ::-1]], axis=-1))


# ---- stateful ----

@pytest.mark.parametrize("use_fused", ["auto", False])
def test_stateful_carries_state_across_calls(use_fused):
    rng = np.random.default_rng(14)
    params = random_params(rng, 3, 4)
    x = rng.standard_normal((2, 7, 3))
    layer = btf.MLSTM.from_canonical(params, stateful=True, return_sequences=True, use_fused=use_fused)
    first, second = layer(x[:, :4]).numpy(), layer(x[:, 4:]).numpy()
    want, _ = mlstm_spec.forward(params, x)
    assert_close(np.concatenate([first, second], axis=1), want)
    layer.reset_state()
    np.testing.assert_array_equal(layer(x[:, :4]).numpy(), first)


def test_static_shapes_in_a_graph_like_keras_lstm():
    """Traced with a known time axis and a dynamic batch, the fused path's outputs keep T and H in their
    static shapes, as keras.layers.LSTM's do (a lost T broke TimeDistributed after the layer)."""
    for options in (dict(return_sequences=True, return_state=True), dict(return_state=True)):
        ours, theirs = (tf.function(layer).get_concrete_function(tf.TensorSpec((None, 7, 6))).outputs
                        for layer in (btf.MLSTM(5, **options), keras.layers.LSTM(5, **options)))
        assert [t.shape.as_list() for t in ours] == [t.shape.as_list() for t in theirs], options
    assert ours[0].shape.as_list() == [None, 5]


@pytest.mark.parametrize("batch", [4, 7, 8], ids=["B<T", "B=T", "B>T"])
def test_time_distributed_after_the_layer_in_fit_and_predict(batch):
    """TimeDistributed(Dense) after a return_sequences layer, T = 7: predict gives (B, T, 3) equal to
    applying the layers one after the other, and fit trains (the targets are (B, T, 3)), whether the
    batch is smaller than, equal to or larger than T."""
    rng = np.random.default_rng(30)
    x = rng.standard_normal((batch, 7, 6)).astype("float32")
    keras.utils.set_random_seed(1)
    recurrent, dense = btf.MLSTM(5, return_sequences=True), keras.layers.Dense(3)
    model = keras.Sequential([keras.Input((7, 6)), recurrent, keras.layers.TimeDistributed(dense)])
    model.compile(optimizer="sgd", loss="mse")
    predicted = model.predict(x, batch_size=batch, verbose=0)
    assert predicted.shape == (batch, 7, 3)
    assert_close(predicted, dense(recurrent(x)).numpy(), tol=tolerance("float32"), what="predict")
    history = model.fit(x, np.zeros((batch, 7, 3), "float32"), batch_size=batch, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


# ---- saving and loading ----

def small_model(params, mode, **options):
    inputs = keras.Input((6, 3), dtype="float32")
    hs, h, c = btf.MLSTM.from_canonical(params, integration_mode=mode, return_sequences=True,
                                        return_state=True, **options)(inputs)
    return keras.Model(inputs, [hs, h, c])


@pytest.mark.parametrize(("mode", "options"), [
    ("addition", {}),
    ("multiplicative_integration", dict(independent_recurrence=True)),
    ("addition", dict(recurrent_bias=False, multiplicative_bias=False, jit_compile=True)),
])
def test_keras_file_round_trip_is_bit_identical(tmp_path, mode, options):
    rng = np.random.default_rng(15)
    options = dict(options)  # the parametrize value is shared between runs: do not change it
    flags = {k: options.pop(k) for k in list(options) if k != "jit_compile"}
    params = random_params(rng, 3, 4, dtype="float32", **flags)
    model = small_model(params, mode, **options)
    x = rng.standard_normal((2, 6, 3)).astype("float32")
    before = [t.numpy() for t in model(x)]
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    after = [t.numpy() for t in loaded(x)]
    for a, b in zip(before, after):
        assert np.array_equal(a, b)
    layer = loaded.layers[-1]
    assert isinstance(layer, btf.MLSTM) and layer.integration_mode == mode
    for name, value in params.items():
        np.testing.assert_array_equal(layer.to_canonical()[0][name], value)


def test_saved_model_export_is_bit_identical(tmp_path):
    """model.export(...) writes a TensorFlow SavedModel; its serving endpoint, loaded back with
    tf.saved_model.load, gives the same bits as the model in memory."""
    rng = np.random.default_rng(16)
    params = random_params(rng, 3, 4, dtype="float32")
    model = small_model(params, "addition")
    x = rng.standard_normal((2, 6, 3)).astype("float32")
    before = [t.numpy() for t in model(x)]
    model.export(str(tmp_path / "saved"), verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    after = loaded.serve(tf.constant(x))
    after = [t.numpy() for t in (after if isinstance(after, (list, tuple)) else after.values())]
    assert len(after) == 3
    for a, b in zip(before, after):
        assert np.array_equal(a, b)


def test_get_config_round_trip():
    layer = btf.MLSTM(
        5, independent_recurrence=True, integration_mode="multiplicative_integration", bias=False,
        kernel_initializer="orthogonal", bias_initializer="ones", recurrent_regularizer="l2",
        return_sequences=True, go_backwards=True, use_fused=False, jit_compile=True, name="m",
    )
    config = layer.get_config()
    clone = btf.MLSTM.from_config(config)
    assert clone.get_config() == config
    assert (clone.independent_recurrence, clone.integration_mode, clone.bias) == (
        True, "multiplicative_integration", False)
    revived = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(revived) is btf.MLSTM and revived.get_config() == config
    cell = btf.MLSTMCell(3, recurrent_bias=False)
    assert btf.MLSTMCell.from_config(cell.get_config()).get_config() == cell.get_config()


# Run in a child process: a TFLite interpreter that crashes kills that process, not the test worker.
TFLITE_SCRIPT = r"""
import json, sys
import numpy as np, keras, tensorflow as tf
from backends.tensorflow import MLSTM

def stacked(batch, **options):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((7, 6), batch_size=batch),
                             MLSTM(5, return_sequences=True, **options), MLSTM(4, **options)])

x = np.random.default_rng(0).standard_normal((3, 7, 6)).astype("float32")
for name, batch, options in json.loads(sys.argv[1]):
    print("BEGIN", name, flush=True)
    model = stacked(batch, **options)
    want = model(x[:batch or 3]).numpy()
    try:
        flat = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    except Exception as error:  # the converter refusing is allowed where the test says so
        print("RESULT", json.dumps([name, "refused", type(error).__name__ + ": " + str(error)[:300]]), flush=True)
        continue
    interpreter = tf.lite.Interpreter(model_content=flat)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, want.shape[:1] + x.shape[1:])
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, x[:len(want)])
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    print("RESULT", json.dumps([name, "ran", got.tolist(), want.tolist()]), flush=True)
"""


@pytest.mark.slow  # about 40 s: four TFLite conversions in a fresh process
def test_tflite_stacked_model_converts_and_matches_or_is_refused():
    """A stacked model (return_sequences into a second layer) converted to TFLite: with a fixed batch
    size (also with every variant of the spec on) and with unroll=True (dynamic batch) the interpreter's
    outputs equal the model's; with a dynamic batch size and a graph loop the converter may refuse (TFLite needs
    static loop buffers there) but nothing may crash. Run in a child process so a crash is a failure
    here, naming the configuration, rather than a dead worker."""
    configs = [("fused, fixed batch", 2, {}), ("unrolled, dynamic batch", None, dict(unroll=True)),
               ("fused, dynamic batch", None, {}),
               ("projected and peepholed, fused, fixed batch", 2,
                dict(num_proj=3, use_peepholes=True, cell_clip=0.5, proj_clip=0.2, forget_bias=1.0))]
    must_run = {name for name, batch, options in configs if batch or options.get("unroll")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", TFLITE_SCRIPT, json.dumps(configs)], env=env, cwd=root,
                            capture_output=True, text=True, timeout=600)
    begun = [line.split(" ", 1)[1] for line in result.stdout.splitlines() if line.startswith("BEGIN ")]
    assert result.returncode == 0, (f"the child process ended with {result.returncode} while converting or "
                                    f"running {begun[-1] if begun else '(nothing)'}: {result.stderr[-2000:]}")
    results = {r[0]: r[1:] for r in (json.loads(line.split(" ", 1)[1]) for line in result.stdout.splitlines()
                                     if line.startswith("RESULT "))}
    assert set(results) == {name for name, _, _ in configs}
    for name, (outcome, *details) in results.items():
        if outcome == "refused":
            assert name not in must_run, f"{name}: the converter refused: {details[0]}"
            continue
        got, want = (np.asarray(v) for v in details)
        assert_close(got, want, tol=tolerance("float32"), what=f"TFLite {name}")


# ---- canonical parameters ----

def test_from_canonical_takes_what_mlstm_spec_load_returns(tmp_path):
    """MLSTM.from_canonical(mlstm_spec.load(path)): the weights, their dtype and the file's
    integration_mode (which the tensors cannot show) are used; to_canonical gives the file back."""
    pytest.importorskip("safetensors", reason="mlstm_spec.save needs safetensors (the io extra)")
    rng = np.random.default_rng(37)
    params = random_params(rng, 3, 4, dtype="float32", independent_recurrence=True)
    mlstm_spec.save(tmp_path / "w.safetensors", params, integration_mode="multiplicative_integration")
    layer = btf.MLSTM.from_canonical(mlstm_spec.load(tmp_path / "w.safetensors"), return_sequences=True)
    assert (layer.integration_mode, layer.independent_recurrence, layer.variable_dtype) == (
        "multiplicative_integration", True, "float32")
    for name, value in params.items():
        np.testing.assert_array_equal(layer.to_canonical()[0][name], value)
    x = rng.standard_normal((2, 5, 3)).astype("float32")
    want, _ = mlstm_spec.forward(params, x, integration_mode="multiplicative_integration")
    assert_close(layer(x).numpy(), want, tol=tolerance("float32"))
    with pytest.raises(ValueError, match=r"integration_mode='addition' contradicts params"):
        btf.MLSTM.from_canonical(mlstm_spec.load(tmp_path / "w.safetensors"), integration_mode="addition")


def test_from_canonical_into_mixed_precision_holds_float16_exactly():
    rng = np.random.default_rng(18)
    params = random_params(rng, 2, 3, dtype="float16")
    layer = btf.MLSTM.from_canonical(params, dtype="mixed_float16")
    assert (layer.compute_dtype, layer.variable_dtype) == ("float16", "float32")
    for name, value in layer.to_canonical()[0].items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value.astype(np.float16), params[name])


def test_default_initialisers_are_glorot_uniform_over_whole_matrices():
    """glorot_uniform over each stacked matrix: U(-a, a), a = sqrt(6 / (rows + cols)); the vector
    weight_hh is drawn as an (H, 1) matrix, a = sqrt(6 / (H + 1)) -- wider than Keras's own reading
    of a vector (fan_in = fan_out = H, a = sqrt(6 / 2H)). Biases start at zero."""
    keras.utils.set_random_seed(0)
    I, H = 64, 256
    layer = btf.MLSTM(H, independent_recurrence=True)
    layer(np.zeros((1, 1, I), "float32"))
    limits = {"weight_ih": np.sqrt(6 / (5 * H + I)), "weight_hh": np.sqrt(6 / (H + 1)),
              "weight_mh": np.sqrt(6 / (4 * H + H))}
    weights = layer.to_canonical()[0]
    for name, limit in limits.items():
        biggest = np.abs(weights[name]).max()
        assert 0.97 * limit < biggest <= limit, (name, biggest, limit)
    assert np.abs(weights["weight_hh"]).max() > 1.2 * np.sqrt(6 / (2 * H))
    for name in ("bias_ih", "bias_hh", "bias_mh"):
        assert not weights[name].any()


# ---- mixed precision, non-finite values, devices ----

def test_mixed_float16_global_policy():
    """Under the global mixed_float16 policy: float32 variables, float16 compute and outputs, float32
    inputs accepted (Keras casts them); results within the float16 tolerance of the spec."""
    rng = np.random.default_rng(19)
    params = random_params(rng, 3, 4, dtype="float16")
    x = rng.standard_normal((2, 5, 3)).astype("float16")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        layer = btf.MLSTM.from_canonical(params, return_sequences=True)
        assert (layer.compute_dtype, layer.variable_dtype) == ("float16", "float32")
        from_float32 = layer(x.astype("float32"))
        from_float16 = layer(x)
    finally:
        keras.config.set_dtype_policy(previous)
    assert from_float16.dtype == tf.float16
    np.testing.assert_array_equal(from_float32.numpy(), from_float16.numpy())
    want, _ = mlstm_spec.forward({k: v.astype("float64") for k, v in params.items()}, x.astype("float64"))
    assert_close(from_float16.numpy(), want, tol=tolerance("float16"))


def test_devices_lists_cpu_first():
    found = btf.devices()
    assert found[0] == "cpu"
    assert found[1:] == [f"gpu:{k}" for k in range(len(tf.config.list_physical_devices("GPU")))]


@pytest.mark.parametrize("device", device_params(btf))
def test_runs_on_device(device):
    assert_gpu_present(device)
    rng = np.random.default_rng(21)
    params = random_params(rng, 3, 4, dtype="float32")
    with tf.device(btf.tf_device(device)):
        hs = prefix_layer(params)(rng.standard_normal((2, 5, 3)).astype("float32"))[0]
    assert btf.tf_device(device).strip("/").upper() in hs.device.upper()


# ---- training in Keras ----

@pytest.mark.parametrize("jit_compile", [False, True])
def test_model_fit_reduces_the_loss(jit_compile):
    """model.fit through the fused path (and with the whole train step compiled by XLA): the loss of
    a small sequence-regression task falls."""
    rng = np.random.default_rng(22)
    x = rng.standard_normal((64, 8, 3)).astype("float32")
    y = np.cumsum(x[..., :1], axis=1)[:, -1] * 0.3
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 3)), btf.MLSTM(16), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse", jit_compile=jit_compile)
    history = model.fit(x, y, epochs=15, batch_size=16, verbose=0).history["loss"]
    assert history[-1] < 0.5 * history[0], history


# ---- keras.layers.LSTM's arguments: dropout, seed, unit_forget_bias, use_bias, the rest ----

def dropout_layer(params, **options):
    return btf.MLSTM.from_canonical(params, return_sequences=True, return_state=True, dropout=0.3,
                                    recurrent_dropout=0.4, seed=5, **options)


def test_dropout_in_the_step_is_the_spec_on_masked_input_and_masked_h():
    """One training step of the cell: the input times its dropout mask, and h times the recurrent
    mask where h enters (only weight_hh), so the step equals mlstm_spec.cell on (x * d_x, (h * d_h, c)).
    The masks hold zeros and 1 / (1 - rate)."""
    rng = np.random.default_rng(32)
    params = random_params(rng, 6, 8)
    x, h, c = rng.standard_normal((5, 6)), rng.uniform(-1, 1, (5, 8)), rng.standard_normal((5, 8))
    cell = btf.MLSTMCell.from_canonical(params, dropout=0.3, recurrent_dropout=0.4, seed=5)
    got_h, (_, got_c) = cell(tf.constant(x), [tf.constant(h), tf.constant(c)], training=True)
    d_x, d_h = cell.get_dropout_mask(x).numpy(), cell.get_recurrent_dropout_mask(h).numpy()
    assert set(np.unique(d_x.round(9))) == {0.0, round(1 / 0.7, 9)}
    assert set(np.unique(d_h.round(9))) == {0.0, round(1 / 0.6, 9)}
    want_h, (_, want_c) = mlstm_spec.cell(params, x * d_x, (h * d_h, c))
    assert_close(got_h.numpy(), want_h, what="h")
    assert_close(got_c.numpy(), want_c, what="c")
    cell.reset_dropout_mask()
    cell.reset_recurrent_dropout_mask()
    untouched, _ = cell(tf.constant(x), [tf.constant(h), tf.constant(c)], training=False)
    assert_close(untouched.numpy(), mlstm_spec.cell(params, x, (h, c))[0], what="inference h")


@pytest.mark.parametrize("masked", [False, True])
def test_fused_dropout_equals_the_generic_loop(masked):
    """In training, the fused path (its hand-written backward included) and the generic loop over the
    cell draw the same masks from the same seed and give the same outputs, states and gradients; at
    inference neither drops anything."""
    rng = np.random.default_rng(33)
    params = random_params(rng, 3, 4)
    x = rng.standard_normal((3, 6, 3))
    state = (rng.uniform(-1, 1, (3, 4)), rng.standard_normal((3, 4)))
    mask = tf.constant(rng.random((3, 6)) < 0.7) if masked else None
    results = []
    for use_fused in ("auto", False):
        layer = dropout_layer(params, use_fused=use_fused)
        call = lambda x, **kw: layer(x, training=True, **kw)  # noqa: E731
        results.append(outputs_and_gradients(layer, x, state, mask=mask, call=call))
    for k, (a, b) in enumerate(zip(*results)):
        assert_close(a, b, what=f"result {k}")
    inference = dropout_layer(params)(x, initial_state=list(state), mask=mask)[0].numpy()
    want = prefix_layer(params)(x, initial_state=list(state), mask=mask)[0].numpy()
    np.testing.assert_array_equal(inference, want)
    assert relative_error(results[0][0], want)[0] > 1e-2  # training did drop


def test_seed_makes_dropout_reproducible():
    rng = np.random.default_rng(34)
    params = random_params(rng, 3, 4, dtype="float32")
    x = rng.standard_normal((2, 5, 3)).astype("float32")
    first, again = (dropout_layer(params)(x, training=True)[0].numpy() for _ in range(2))
    np.testing.assert_array_equal(first, again)
    other = btf.MLSTM.from_canonical(params, return_sequences=True, dropout=0.3, recurrent_dropout=0.4,
                                     seed=6)(x, training=True).numpy()
    assert not np.array_equal(first, other)


def test_fit_with_dropout_reduces_the_loss():
    rng = np.random.default_rng(35)
    x = rng.standard_normal((64, 8, 3)).astype("float32")
    y = np.cumsum(x[..., :1], axis=1)[:, -1] * 0.3
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 3)), btf.MLSTM(16, dropout=0.1, recurrent_dropout=0.1, seed=0),
                              keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    history = model.fit(x, y, epochs=15, batch_size=16, verbose=0).history["loss"]
    assert history[-1] < 0.5 * history[0], history


def test_unit_forget_bias_sets_the_forget_block_of_bias_ih():
    layer = btf.MLSTM(4, unit_forget_bias=True, bias_initializer=keras.initializers.Constant(0.5))
    layer(np.zeros((1, 2, 3), "float32"))
    weights = layer.to_canonical()[0]
    np.testing.assert_array_equal(block(weights["bias_ih"], "f"), np.ones(4))
    for gate in ("m", "i", "o", "z"):
        np.testing.assert_array_equal(block(weights["bias_ih"], gate), np.full(4, 0.5))
    np.testing.assert_array_equal(weights["bias_mh"], np.full(16, 0.5))  # only bias_ih's forget block
    with pytest.raises(ValueError, match=r"unit_forget_bias=True sets the forget block of bias_ih"):
        btf.MLSTM(4, unit_forget_bias=True, bias=False)


def test_use_bias_false_means_no_bias():
    layer = btf.MLSTM(4, use_bias=False)
    layer(np.zeros((1, 2, 3), "float32"))
    assert sorted(layer.to_canonical()[0]) == ["weight_hh", "weight_ih", "weight_mh"]
    assert (layer.bias, layer.recurrent_bias, layer.multiplicative_bias) == (False, False, False)
    assert btf.MLSTM(4, use_bias=True).cell.param_names == btf.MLSTM(4).cell.param_names
    with pytest.raises(ValueError, match=r"use_bias=False switches off all three biases.*bias=, recurrent_bias="):
        btf.MLSTM(4, use_bias=False, recurrent_bias=False)
    with pytest.raises(TypeError, match=r"use_bias must be a bool"):
        btf.MLSTM(4, use_bias="no")


@pytest.mark.parametrize(("argument", "value", "error", "pattern"), [
    ("use_cudnn", False, TypeError, r"MLSTM got an unexpected keyword argument 'use_cudnn': .*use_fused="),
    ("implementation", 2, TypeError, r"'implementation': use use_fused="),
    ("hidden_size", 4, TypeError, r"'hidden_size': Keras layers take the hidden size as units"),
    ("num_layers", 2, TypeError, r"'num_layers': an MLSTM is one layer: stack layers"),
    ("batch_first", True, TypeError, r"'batch_first': Keras layers take batch-major input"),
    ("bidirectional", True, TypeError, r"'bidirectional': wrap the layer in keras.layers.Bidirectional"),
    ("activation", "relu", ValueError, r"activation must be 'tanh' \(the mLSTM's equations fix"),
    ("recurrent_activation", "hard_sigmoid", ValueError, r"recurrent_activation must be 'sigmoid'"),
    ("dropout", 1.0, ValueError, r"dropout must be a number in \[0, 1\), got 1.0"),
    ("recurrent_dropout", -0.1, ValueError, r"recurrent_dropout must be a number in \[0, 1\), got -0.1"),
])
def test_keras_lstm_arguments_that_differ_say_what_to_use(argument, value, error, pattern):
    with pytest.raises(error, match=pattern):
        btf.MLSTM(4, **{argument: value})


def test_lstm_defaults_for_activations_are_accepted():
    layer = btf.MLSTM(4, activation="tanh", recurrent_activation=keras.activations.sigmoid)
    assert layer(np.zeros((1, 2, 3), "float32")).shape == (1, 4)


def test_get_config_keeps_the_keras_lstm_arguments():
    layer = btf.MLSTM(5, dropout=0.2, recurrent_dropout=0.1, seed=3, unit_forget_bias=True, unroll=True)
    clone = btf.MLSTM.from_config(layer.get_config())
    assert (clone.cell.dropout, clone.cell.recurrent_dropout, clone.cell.seed, clone.cell.unit_forget_bias,
            clone.unroll) == (0.2, 0.1, 3, True, True)


# ---- use_fused ----

class DoubledCell(btf.MLSTMCell):
    """A cell whose step differs from MLSTMCell's: the fused path cannot run it."""

    def call(self, inputs, states, training=False):
        h, (h, c) = super().call(inputs, states, training=training)
        return 2 * h, [h, c]


def test_use_fused_true_fails_loudly_and_auto_falls_back():
    rng = np.random.default_rng(23)
    params = random_params(rng, 2, 3)
    x = rng.standard_normal((1, 4, 2))
    auto = prefix_layer(params)
    auto.cell.__class__ = DoubledCell  # as a subclass overriding the step would be
    assert "DoubledCell.call" in auto.fused_unavailable_reason()
    want, _ = mlstm_spec.forward(params, x)
    assert_close(auto(x)[0].numpy(), 2 * want)  # the overridden step ran
    strict = prefix_layer(params, use_fused=True)
    assert strict.fused_unavailable_reason() is None
    assert_close(strict(x)[0].numpy(), want)
    strict.cell.__class__ = DoubledCell
    with pytest.raises(ValueError, match="use_fused=True, but the fused path cannot run this layer"):
        strict(x)


# ---- bad input ----

def test_bad_call_input_errors():
    """Rank and feature size are the layer's InputSpec (Keras's own messages); the rest is checked in
    call(), after Keras has converted the inputs."""
    rng = np.random.default_rng(24)
    layer = btf.MLSTM.from_canonical(random_params(rng, 3, 4, dtype="float32"), return_state=True)
    x = np.zeros((2, 5, 3), "float32")
    cases = [
        (ValueError, r"expected ndim=3, found ndim=2", dict(args=(x[0],))),
        (ValueError, r"expected axis -1 of input shape to have value 3, but received input with shape "
                     r"\(2, 5, 4\)", dict(args=(np.zeros((2, 5, 4), "float32"),))),
        (TypeError, r"sequences must have a floating dtype .* got int32", dict(args=(x.astype("int32"),))),
        (ValueError, r"sequences must have at least one step", dict(args=(np.zeros((2, 0, 3), "float32"),))),
        (TypeError, r"initial_state must be a pair \(h, c\) of arrays, got EagerTensor",
         dict(args=(x,), initial_state=np.zeros((2, 4), "float32"))),
        (ValueError, r"initial_state c must have shape \(2, 4\), got \(2, 5\)",
         dict(args=(x,), initial_state=[np.zeros((2, 4), "float32"), np.zeros((2, 5), "float32")])),
        (ValueError, r"mask must have shape \(B, T\) = \(2, 5\) like sequences, got \(2, 4\)",
         dict(args=(x,), mask=np.ones((2, 4), bool))),
    ]
    for error, pattern, call in cases:
        kwargs = {k: v for k, v in call.items() if k != "args"}
        with pytest.raises(error, match=pattern):
            layer(*call["args"], **kwargs)
    with pytest.raises(ValueError, match=r"inputs must have I=3 features"):
        layer.cell(np.zeros((2, 4), "float32"), [np.zeros((2, 4), "float32")] * 2)


def test_float64_input_is_cast_like_keras_lstm():
    """Keras layers convert floating inputs and states to their compute dtype: so does MLSTM."""
    rng = np.random.default_rng(26)
    layer = btf.MLSTM.from_canonical(random_params(rng, 3, 4, dtype="float32"), return_sequences=True)
    x = rng.standard_normal((2, 5, 3))
    state = [rng.standard_normal((2, 4)), rng.standard_normal((2, 4))]
    got = layer(x, initial_state=state)
    want = layer(x.astype("float32"), initial_state=[s.astype("float32") for s in state])
    assert got.dtype == tf.float32
    np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_bad_parameter_and_option_errors():
    rng = np.random.default_rng(25)
    params = random_params(rng, 3, 4)
    with pytest.raises(ValueError, match=r"params\['weight_mh'\] must have shape \(4H,H\) = \(16, 4\).*"
                                         r"got \(16, 3\)"):
        btf.MLSTM.from_canonical({**params, "weight_mh": np.zeros((16, 3))})
    with pytest.raises(ValueError, match=r"params is missing \['weight_hh'\]"):
        btf.MLSTM.from_canonical({k: v for k, v in params.items() if k != "weight_hh"})
    with pytest.raises(TypeError, match=r"params mixes dtypes"):
        btf.MLSTM.from_canonical({**params, "bias_hh": params["bias_hh"].astype("float32")})
    with pytest.raises(ValueError, match=r"params holds 2 layers, but MLSTM is one layer"):
        btf.MLSTM.from_canonical([params, random_params(rng, 4, 4)])
    with pytest.raises(ValueError, match=r"bias=False contradicts params, which imply bias=True"):
        btf.MLSTM.from_canonical(params, bias=False)
    with pytest.raises(ValueError, match=r"units=5 contradicts params, which imply units=4"):
        btf.MLSTM.from_canonical(params, units=5)
    with pytest.raises(TypeError, match=r"params\['weight_ih'\] has dtype float64, which the layer's "
                                        r"float32 variables cannot hold exactly"):
        btf.MLSTM.from_canonical(params, dtype="float32")
    with pytest.raises(ValueError, match=r"use_fused must be one of"):
        btf.MLSTM(4, use_fused="yes")
    with pytest.raises(TypeError, match=r"jit_compile must be a bool"):
        btf.MLSTM(4, jit_compile="auto")
    with pytest.raises(ValueError, match=r"integration_mode must be one of"):
        btf.MLSTM(4, integration_mode="mul")
    with pytest.raises(ValueError, match=r"hidden_size must be a positive int, got 0"):
        btf.MLSTM(0)
    with pytest.raises(TypeError, match=r"bias must be a bool, got str"):
        btf.MLSTM(4, bias="no")
    with pytest.raises(TypeError, match=r"unroll must be a bool, got str"):
        btf.MLSTM(4, unroll="yes")
    with pytest.raises(ValueError, match=r"Cannot unroll a RNN if the time dimension is undefined"):
        tf.function(btf.MLSTM(4, unroll=True)).get_concrete_function(tf.TensorSpec((None, None, 3)))
    with pytest.raises(ValueError, match=r"not built yet"):
        btf.MLSTM(4).to_canonical()


@pytest.mark.slow  # about 30 s: a small fit, saving, a TFLite conversion, in a fresh process
def test_keras_page_code_runs(tmp_path):
    """docs/keras.md: its Python blocks, run in order in one child process (as a user pastes them),
    print what each ``print(...)  # -> expected`` line says."""
    pytest.importorskip("safetensors", reason="the page saves a weight file (the io extra)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "keras.md")) as page:
        blocks = re.findall(r"```python\n(.+?)\n```", page.read(), re.S)
    code = "\n".join(blocks)
    expected = re.findall(r"^print\(.*\)\s+# -> (.*)$", code, re.M)
    assert len(blocks) >= 5 and len(expected) == code.count("print("), "every print needs a # -> comment"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    # the page's prints are marked, to tell them from what TensorFlow prints to stdout (the TFLite converter)
    marked = re.sub(r"^print\(", 'print("@page", ', code, flags=re.M)
    result = subprocess.run([sys.executable, "-c", marked], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = [line[len("@page "):].strip() for line in result.stdout.splitlines() if line.startswith("@page ")]
    assert printed == [e.strip() for e in expected]


def test_import_needs_the_tensorflow_keras_backend():
    """With Keras on another backend, importing backends.tensorflow says what to set."""
    code = "import backends.tensorflow"
    env = dict(os.environ, KERAS_BACKEND="numpy")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "KERAS_BACKEND=tensorflow" in result.stderr
