"""The spec's variants (issue 17) in the Keras backend: ``num_proj``, ``use_peepholes``, ``cell_clip``,
``proj_clip`` and ``forget_bias`` on the fused path, the generic loop, ``unroll=True``, masks and dropout,
against ``mlstm_spec.forward`` / ``backward``; with every variant off, the graph holds none of their ops;
configuration, ``.keras`` files, canonical parameters and weight files carry them; bad arguments are
refused with the argument named. (TFLite conversion of a projected, peepholed model: in
``tests/test_tensorflow.py``, the TFLite test.)"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from helpers import random_params, require_backend
from hypothesis import HealthCheck, assume, given, settings

btf = require_backend("tensorflow")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import mlstm_spec  # noqa: E402
from mlstm_spec.conformance import relative_error, tolerance  # noqa: E402
from mlstm_spec.params import block  # noqa: E402
from spec_strategies import MODES, VARIANTS, cases, distance_to_clip_bounds, variant_case  # noqa: E402

F64_TOL = tolerance("float64")
PATHS = {"fused": dict(), "generic loop": dict(use_fused=False), "unrolled": dict(unroll=True)}
# Every variant switched on, at values that act on the drawn values (|c| ~ 1, |h| ~ 0.5).
ALL_ON = dict(cell_clip=0.6, proj_clip=0.25, forget_bias=-0.5)


def assert_close(got, want, tol=F64_TOL, what=""):
    __tracebackhide__ = True
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, but should be {want.shape}"
    error, index = relative_error(got, want)
    assert error <= tol, f"{what}[{index}]: relative error {error:.2e} > {tol:.0e}"


def run_layer(layer, x, state, d_hs, d_state, mask=None, training=False):
    """``hs, h_T, c_T`` and the gradients of ``sum(hs d_hs) + sum(h_T d_h) + sum(c_T d_c)`` with respect to
    every weight (by canonical name), ``x``, ``h0`` and ``c0``."""
    x, h0, c0 = (tf.constant(a) for a in (x, *state))
    with tf.GradientTape() as tape:
        tape.watch([x, h0, c0])
        kwargs = {} if mask is None else dict(mask=tf.constant(mask))
        hs, h, c = layer(x, initial_state=[h0, c0], training=training, **kwargs)
        loss = (tf.reduce_sum(hs * d_hs) + tf.reduce_sum(h * d_state[0]) + tf.reduce_sum(c * d_state[1]))
    names = layer.cell.param_names
    grads = tape.gradient(loss, [getattr(layer.cell, n) for n in names] + [x, h0, c0])
    values = [g.numpy() for g in grads]
    return (hs.numpy(), h.numpy(), c.numpy()), dict(zip(names + ["x", "h0", "c0"], values))


def assert_matches_spec(params, x, state, d_hs, d_state, mode, runtime, what, **options):
    """The layer (``options`` choose the path) against mlstm_spec.forward / backward: outputs, final
    state and every gradient, within the float64 tolerance."""
    layer = btf.MLSTM.from_canonical(params, integration_mode=mode, return_sequences=True, return_state=True,
                                     **runtime, **options)
    (hs, h, c), grads = run_layer(layer, x, state, d_hs, d_state)
    want_hs, (want_h, want_c) = mlstm_spec.forward(params, x, state, integration_mode=mode, **runtime)
    want = mlstm_spec.backward(params, x, state, d_hs, d_state, integration_mode=mode, **runtime)
    for name, got, expected in (("hs", hs, want_hs), ("h_T", h, want_h), ("c_T", c, want_c)):
        assert_close(got, expected, what=f"{what}: {name}")
    assert sorted(grads) == sorted(want)
    for name, expected in want.items():
        assert_close(grads[name], expected, what=f"{what}: d {name}")


def full_arrays(case):
    """A batched case's arrays, with zeros for a state or final-state gradient it leaves out."""
    a = case.arrays()
    assert a.xs.ndim == 3, "Keras layers take batches"
    zeros = [np.zeros((case.batch, case.output_size)), np.zeros((case.batch, case.hidden_size))]
    return a.params, a.xs, list(a.state or zeros), a.d_hs, list(a.d_state or zeros)


# ---- against the spec ----

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda name: name.replace(" ", "_"))
def test_each_variant_matches_the_spec(variant, mode):
    """Each variant alone and all together (spec_strategies.VARIANTS: clips that act, away from their
    bounds) on the fused path with its hand-written backward; all together also on the generic loop over
    the cell and the unrolled step copies (which the drawn and masked tests below meet too)."""
    case = variant_case(mode, VARIANTS[variant])
    params, x, state, d_hs, d_state = full_arrays(case)
    for path, options in PATHS.items():
        if path == "fused" or variant == "all":
            assert_matches_spec(params, x, state, d_hs, d_state, mode, case.runtime, f"{variant}, {path}",
                                **options)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(max_size=5, max_steps=5, batched=True))
def test_drawn_cases_match_the_spec(case):
    """Hypothesis-drawn sizes, options and variant combinations, fused path and generic loop."""
    params, x, state, d_hs, d_state = full_arrays(case)
    assume(distance_to_clip_bounds(case, case.arrays()) > 1e-9)  # rounding could decide the side of a kink
    for path in ("fused", "generic loop"):
        assert_matches_spec(params, x, state, d_hs, d_state, case.integration_mode, case.runtime, path,
                            **PATHS[path])


@pytest.mark.parametrize("go_backwards", [False, True])
def test_masked_variants_equal_the_generic_loop_and_unrolled(go_backwards):
    """With a mask (and backwards), the fused loop, the unrolled copies and Keras's generic loop over the
    cell give the same outputs, states and gradients with every variant on; a fully masked row keeps its
    initial state, P and H wide."""
    rng = np.random.default_rng(40)
    params = random_params(rng, 3, 5, proj_size=2, peepholes=True)
    x = rng.standard_normal((4, 6, 3))
    state = [rng.uniform(-1, 1, (4, 2)), rng.standard_normal((4, 5))]
    d_hs, d_state = rng.standard_normal((4, 6, 2)), [rng.standard_normal((4, 2)), rng.standard_normal((4, 5))]
    mask = rng.random((4, 6)) < 0.6
    mask[0] = False
    results = {}
    for path, options in PATHS.items():
        layer = btf.MLSTM.from_canonical(params, return_sequences=True, return_state=True, go_backwards=go_backwards,
                                         **ALL_ON, **options)
        results[path] = run_layer(layer, x, state, d_hs, d_state, mask=mask)
    (hs, h, c), grads = results["generic loop"]
    np.testing.assert_array_equal(h[0], state[0][0])
    np.testing.assert_array_equal(c[0], state[1][0])
    for path in ("fused", "unrolled"):
        got_outputs, got_grads = results[path]
        for name, a, b in zip(("hs", "h_T", "c_T"), got_outputs, (hs, h, c)):
            assert_close(a, b, what=f"{path}: {name}")
        for name, value in grads.items():
            assert_close(got_grads[name], value, what=f"{path}: d {name}")


def test_second_derivatives_with_variants_match_the_generic_loop():
    """The variants' hand-written backward pass is built from differentiable ops: a Hessian-vector
    product through the fused path equals the one through the generic (autodiff) loop."""
    rng = np.random.default_rng(48)
    params = random_params(rng, 2, 3, proj_size=2, peepholes=True)
    x = tf.constant(rng.standard_normal((2, 3, 2)))
    direction = tf.constant(rng.standard_normal((2, 3, 2)))
    results = []
    for use_fused in ("auto", False):
        layer = btf.MLSTM.from_canonical(params, return_sequences=True, return_state=True, use_fused=use_fused,
                                         **ALL_ON)
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


def test_variants_under_xla_and_mixed_precision():
    """jit_compile=True (the fused path with its backward, compiled by XLA) matches the spec in float64;
    under mixed_float16 the layer returns float16 within the float16 tolerance of the spec."""
    rng = np.random.default_rng(49)
    case = variant_case("multiplicative_integration", VARIANTS["all"])
    params, x, state, d_hs, d_state = full_arrays(case)
    assert_matches_spec(params, x, state, d_hs, d_state, case.integration_mode, case.runtime, "XLA",
                        jit_compile=True)
    half = random_params(rng, 3, 4, dtype="float16", proj_size=2, peepholes=True)
    x = rng.standard_normal((2, 5, 3)).astype("float16")
    layer = btf.MLSTM.from_canonical(half, dtype="mixed_float16", return_sequences=True, **ALL_ON)
    got = layer(x)
    assert got.dtype == tf.float16
    want, _ = mlstm_spec.forward({k: v.astype("float64") for k, v in half.items()}, x.astype("float64"), **ALL_ON)
    assert_close(got.numpy(), want, tol=tolerance("float16"), what="mixed_float16 hs")


def test_one_cell_step_is_the_spec_cell():
    """MLSTMCell, called on one step with every variant, is mlstm_spec.cell; its state is [h (B, P), c (B, H)]."""
    rng = np.random.default_rng(41)
    params = random_params(rng, 3, 4, proj_size=3, peepholes=True)
    cell = btf.MLSTMCell.from_canonical(params, integration_mode="multiplicative_integration", **ALL_ON)
    assert cell.state_size == [3, 4] and cell.output_size == 3
    x, h, c = rng.standard_normal((2, 3)), rng.uniform(-1, 1, (2, 3)), rng.standard_normal((2, 4))
    got_h, (_, got_c) = cell(tf.constant(x), [tf.constant(h), tf.constant(c)])
    want_h, (_, want_c) = mlstm_spec.cell(params, x, (h, c), integration_mode="multiplicative_integration",
                                          **ALL_ON)
    assert_close(got_h.numpy(), want_h, what="h")
    assert_close(got_c.numpy(), want_c, what="c")
    assert [tuple(s.shape) for s in cell.get_initial_state(2)] == [(2, 3), (2, 4)]


# ---- with every variant off ----

def loop_body_ops(layer, masked):
    """The op types, counted, in the while-loop bodies of the layer's inference graph (T = 4, I = 3);
    constants and reads of the weights left out."""
    specs = [tf.TensorSpec((2, 4, 3), layer.compute_dtype)] + ([tf.TensorSpec((2, 4), tf.bool)] if masked else [])
    function = tf.function(lambda x, *mask: layer(x, mask=mask[0] if mask else None))
    graph = function.get_concrete_function(*specs).graph.as_graph_def()
    bodies = [f for f in graph.library.function if "body" in f.signature.name]
    assert bodies, "no while-loop body in the graph"
    return Counter(node.op for body in bodies for node in body.node_def
                   if node.op not in ("Const", "ReadVariableOp"))


# What each variant adds to one step, written from the equations (docs/equations.md, Variants): the
# forget bias one addition; peepholes three products and three additions; the projection one matrix
# product; each clip a minimum and a maximum (tf.clip_by_value).
ADDED_OPS = {
    "forget_bias": (dict(forget_bias=1.0), {"AddV2": 1}),
    "peepholes": (dict(use_peepholes=True), {"Mul": 3, "AddV2": 3}),
    "projection": (dict(num_proj=2), {"MatMul": 1}),
    "cell_clip": (dict(cell_clip=1.0), {"Minimum": 1, "Maximum": 1}),
    "proj_clip": (dict(num_proj=2, proj_clip=1.0), {"MatMul": 1, "Minimum": 1, "Maximum": 1}),
}


@pytest.mark.parametrize("variant", ADDED_OPS)
def test_a_variant_off_traces_none_of_its_ops(variant):
    """The loop body of a layer with the variant on holds exactly the variant's ops more than the
    variant-free one (both through the same masked graph loop): so with it off, none of them is
    traced, not even as an addition of zero."""
    options, added = ADDED_OPS[variant]
    keras.utils.set_random_seed(0)
    off, on = btf.MLSTM(4), btf.MLSTM(4, **options)
    for layer in (off, on):
        layer(np.zeros((2, 4, 3), "float32"))
    difference = loop_body_ops(on, masked=True)
    difference.subtract(loop_body_ops(off, masked=True))
    assert {op: n for op, n in difference.items() if n} == added


def test_variants_off_graph_has_no_clip_and_keeps_the_hand_written_backward():
    """Unmasked, the variant-free layer and a layer with variants both run their loop with a
    hand-written backward pass (a custom gradient, traced as IdentityN); the first holds no clip."""
    layer = btf.MLSTM(4)
    layer(np.zeros((2, 4, 3), "float32"))
    ops = loop_body_ops(layer, masked=False)
    assert not {"ClipByValue", "Minimum", "Maximum"} & set(ops)
    clipped = btf.MLSTM(4, cell_clip=1.0)
    clipped(np.zeros((2, 4, 3), "float32"))
    custom = [any(op.type == "IdentityN" for op in tf.function(layer).get_concrete_function(
        tf.TensorSpec((2, 4, 3))).graph.get_operations()) for layer in (layer, clipped)]
    assert custom == [True, True]


def test_neutral_variants_change_no_bit_of_the_outputs():
    """Variants switched on at values that change nothing (zero peephole weights, a clip far above every
    value) give the variant-free layer's outputs bit for bit: the variant path computes the rest of the
    step with the same operations in the same order."""
    rng = np.random.default_rng(42)
    params = random_params(rng, 3, 4)
    x = rng.standard_normal((3, 6, 3))
    zeros = {name: np.zeros(4) for name in ("weight_ci", "weight_cf", "weight_co")}
    for options in (dict(), dict(use_fused=False)):
        off = btf.MLSTM.from_canonical(params, return_sequences=True, return_state=True, **options)(x)
        on = btf.MLSTM.from_canonical({**params, **zeros}, return_sequences=True, return_state=True,
                                      cell_clip=1e30, **options)(x)
        for a, b in zip(off, on):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


# ---- shapes, dropout, forget_bias ----

def test_projection_shapes_like_keras_lstm_with_known_time():
    """With num_proj=P the outputs and h_T are P wide, c_T H wide, and a traced graph keeps T in the
    static shape of the outputs."""
    layer = btf.MLSTM(5, num_proj=2, use_peepholes=True, return_sequences=True, return_state=True)
    outputs = tf.function(layer).get_concrete_function(tf.TensorSpec((None, 7, 6))).outputs
    assert [t.shape.as_list() for t in outputs] == [[None, 7, 2], [None, 2], [None, 5]]
    last, h, c = btf.MLSTM(5, num_proj=2, return_state=True)(np.zeros((3, 4, 6), "float32"))
    assert (last.shape, h.shape, c.shape) == ((3, 2), (3, 2), (3, 5))
    with pytest.raises(ValueError, match=r"initial_state h must have shape \(3, 2\) \(h is P wide"):
        layer(np.zeros((3, 7, 6), "float32"), initial_state=[np.zeros((3, 5), "float32")] * 2)


@pytest.mark.parametrize("use_fused", ["auto", False])
def test_stateful_projected_layer_carries_h_p_wide(use_fused):
    """stateful=True with a projection: the carried state is (B, P) and (B, H), and two calls over the
    halves of a sequence give the spec's outputs over the whole."""
    rng = np.random.default_rng(50)
    params = random_params(rng, 3, 4, proj_size=2, peepholes=True)
    x = rng.standard_normal((2, 7, 3))
    layer = btf.MLSTM.from_canonical(params, stateful=True, return_sequences=True, use_fused=use_fused, **ALL_ON)
    first, second = layer(x[:, :4]).numpy(), layer(x[:, 4:]).numpy()
    assert [tuple(s.shape) for s in layer.states] == [(2, 2), (2, 4)]
    want, _ = mlstm_spec.forward(params, x, **ALL_ON)
    assert_close(np.concatenate([first, second], axis=1), want)


@pytest.mark.parametrize("masked", [False, True])
def test_recurrent_dropout_acts_on_the_projected_h(masked):
    """In training, the recurrent mask is (B, P); the fused path and the generic loop draw the same masks
    from the seed and give the same outputs, states and gradients; a step equals the spec cell on
    (x * d_x, (h * d_h, c))."""
    rng = np.random.default_rng(43)
    params = random_params(rng, 3, 5, proj_size=2, peepholes=True)
    x = rng.standard_normal((3, 6, 3))
    state = [rng.uniform(-1, 1, (3, 2)), rng.standard_normal((3, 5))]
    d_hs, d_state = rng.standard_normal((3, 6, 2)), [rng.standard_normal((3, 2)), rng.standard_normal((3, 5))]
    mask = rng.random((3, 6)) < 0.7 if masked else None
    results = []
    for options in (dict(), dict(use_fused=False)):
        layer = btf.MLSTM.from_canonical(params, return_sequences=True, return_state=True, dropout=0.3,
                                         recurrent_dropout=0.4, seed=5, **ALL_ON, **options)
        results.append(run_layer(layer, x, state, d_hs, d_state, mask=mask, training=True))
    for name, a, b in zip(("hs", "h_T", "c_T"), results[0][0], results[1][0]):
        assert_close(a, b, what=name)
    for name, value in results[1][1].items():
        assert_close(results[0][1][name], value, what=f"d {name}")
    inference, _ = mlstm_spec.forward(params, x, state, **ALL_ON)
    assert relative_error(results[0][0][0], inference)[0] > 1e-2  # training did drop
    cell = btf.MLSTMCell.from_canonical(params, dropout=0.3, recurrent_dropout=0.4, seed=5, **ALL_ON)
    h, c = state[0], state[1]
    got_h, _ = cell(tf.constant(x[:, 0]), [tf.constant(h), tf.constant(c)], training=True)
    d_x, d_h = cell.get_dropout_mask(x[:, 0]).numpy(), cell.get_recurrent_dropout_mask(h).numpy()
    assert d_h.shape == (3, 2)
    want_h, _ = mlstm_spec.cell(params, x[:, 0] * d_x, (h * d_h, c), **ALL_ON)
    assert_close(got_h.numpy(), want_h, what="one training step")


def test_forget_bias_is_a_constant_not_a_weight():
    """forget_bias=b computes what the same layer computes with b added to the forget block of bias_ih,
    and adds no weight; unit_forget_bias only sets that block's initial value."""
    rng = np.random.default_rng(44)
    params = random_params(rng, 3, 4)
    shifted = {**params, "bias_ih": params["bias_ih"].copy()}
    block(shifted["bias_ih"], "f")[:] += 1.5
    x = rng.standard_normal((2, 5, 3))
    with_constant = btf.MLSTM.from_canonical(params, return_sequences=True, forget_bias=1.5)
    assert_close(with_constant(x).numpy(), btf.MLSTM.from_canonical(shifted, return_sequences=True)(x).numpy())
    assert len(with_constant.trainable_weights) == len(params)
    initial = btf.MLSTM(4, unit_forget_bias=True, forget_bias=2.0)
    initial(np.zeros((1, 2, 3), "float32"))
    np.testing.assert_array_equal(block(initial.to_canonical()[0]["bias_ih"], "f"), np.ones(4))
    assert initial.forget_bias == 2.0


# ---- configuration, files, canonical parameters ----

def variant_layer(params, **options):
    return btf.MLSTM.from_canonical(params, return_sequences=True, return_state=True, **ALL_ON, **options)


def test_config_and_keras_file_round_trip(tmp_path):
    """get_config / from_config keep every variant argument; a model saved to .keras loads back with
    the same weights and gives the same bits."""
    layer = btf.MLSTM(5, num_proj=3, use_peepholes=True, cell_clip=2.0, proj_clip=0.5, forget_bias=1.0,
                      projection_initializer="orthogonal", peephole_initializer="zeros",
                      peephole_regularizer="l2", return_sequences=True)
    config = layer.get_config()
    clone = btf.MLSTM.from_config(config)
    assert clone.get_config() == config
    assert (clone.num_proj, clone.use_peepholes, clone.cell_clip, clone.proj_clip, clone.forget_bias) == (
        3, True, 2.0, 0.5, 1.0)
    rng = np.random.default_rng(45)
    params = random_params(rng, 3, 4, dtype="float32", proj_size=2, peepholes=True)
    inputs = keras.Input((6, 3))
    model = keras.Model(inputs, variant_layer(params)(inputs))
    x = rng.standard_normal((2, 6, 3)).astype("float32")
    before = [t.numpy() for t in model(x)]
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    for a, b in zip(before, loaded(x)):
        np.testing.assert_array_equal(a, b.numpy())
    layer = loaded.layers[-1]
    assert (layer.num_proj, layer.use_peepholes, layer.cell_clip) == (2, True, ALL_ON["cell_clip"])
    for name, value in params.items():
        np.testing.assert_array_equal(layer.to_canonical()[0][name], value)


def test_canonical_parameters_and_weight_file_round_trip(tmp_path):
    """from_canonical reads num_proj and use_peepholes from the parameters, to_canonical returns them
    exactly; mlstm_spec.save(path, layer) records the run-time variants, and from_canonical(load(path))
    rebuilds the layer with them."""
    pytest.importorskip("safetensors", reason="mlstm_spec.save needs safetensors (the io extra)")
    rng = np.random.default_rng(46)
    params = random_params(rng, 3, 4, dtype="float32", proj_size=3, peepholes=True)
    layer = variant_layer(params)
    assert (layer.num_proj, layer.use_peepholes) == (3, True)
    assert sorted(layer.to_canonical()[0]) == sorted(params)
    for name, value in params.items():
        got = layer.to_canonical()[0][name]
        assert got.dtype == value.dtype and got.tobytes() == value.tobytes(), name
    path = mlstm_spec.save(tmp_path / "w.safetensors", layer)
    loaded = mlstm_spec.load(path)
    assert {k: loaded.options.get(k) for k in ALL_ON} == ALL_ON
    again = btf.MLSTM.from_canonical(loaded, return_sequences=True, return_state=True)
    x = rng.standard_normal((2, 5, 3)).astype("float32")
    for a, b in zip(layer(x), again(x)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(ValueError, match=r"cell_clip=1.0 contradicts params, which imply cell_clip=0.6"):
        btf.MLSTM.from_canonical(loaded, cell_clip=1.0)


def test_from_canonical_refuses_contradicting_variant_arguments():
    rng = np.random.default_rng(47)
    projected = random_params(rng, 3, 4, proj_size=2)
    with pytest.raises(ValueError, match=r"num_proj=3 contradicts params, which imply num_proj=2 "
                                         r"\(from weight_hr, or its absence\)"):
        btf.MLSTM.from_canonical(projected, num_proj=3)
    with pytest.raises(ValueError, match=r"num_proj=2 contradicts params, which imply num_proj=None"):
        btf.MLSTM.from_canonical(random_params(rng, 3, 4), num_proj=2)
    with pytest.raises(ValueError, match=r"use_peepholes=False contradicts params, which imply use_peepholes=True"):
        btf.MLSTM.from_canonical(random_params(rng, 3, 4, peepholes=True), use_peepholes=False)
    assert btf.MLSTM.from_canonical(projected, num_proj=2).num_proj == 2
    with pytest.raises(TypeError, match=r"'proj_size': Keras layers take the projection size as num_proj"):
        btf.MLSTM.from_canonical(random_params(rng, 3, 4), proj_size=2)


@pytest.mark.parametrize(("options", "error", "pattern"), [
    (dict(num_proj=4), ValueError, r"num_proj must be None \(no projection\) or an int in 1..units-1 = 1..3"),
    (dict(num_proj=0), ValueError, r"num_proj must be None .* got 0"),
    (dict(num_proj=2.0), TypeError, r"num_proj must be None \(no projection\) or an int, got float"),
    (dict(num_proj=2, independent_recurrence=True), ValueError, r"num_proj=2 cannot be combined with "
                                                                r"independent_recurrence=True"),
    (dict(use_peepholes="yes"), TypeError, r"use_peepholes must be a bool, got str"),
    (dict(cell_clip=0.0), ValueError, r"cell_clip must be None or a finite number > 0, got 0.0"),
    (dict(cell_clip=float("inf")), ValueError, r"cell_clip must be None or a finite number > 0, got inf"),
    (dict(cell_clip="1"), TypeError, r"cell_clip must be None or a finite number > 0, got str"),
    (dict(num_proj=2, proj_clip=-1.0), ValueError, r"proj_clip must be None or a finite number > 0, got -1.0"),
    (dict(proj_clip=1.0), ValueError, r"proj_clip=1.0 clips the projected output, which needs a projection: "
                                      r"pass num_proj"),
    (dict(forget_bias=float("nan")), ValueError, r"forget_bias must be a finite number, got nan"),
    (dict(forget_bias=None), TypeError, r"forget_bias must be a finite number, got NoneType"),
    (dict(peepholes=True), TypeError, r"'peepholes': use use_peepholes=True"),
    (dict(forget_bias_init=1.0), TypeError, r"'forget_bias_init': the forget block of bias_ih starts at"),
])
def test_bad_variant_arguments_are_refused(options, error, pattern):
    with pytest.raises(error, match=pattern):
        btf.MLSTM(4, **options)
    if "peepholes" not in options and "forget_bias_init" not in options:
        with pytest.raises(error, match=pattern):
            btf.MLSTMCell(4, **options)


def test_conformance_adapter_computes_every_variant():
    """The adapter declares every variant and builds with the run-time ones."""
    adapter = btf.ConformanceAdapter("cpu")
    assert adapter.supports(dict(proj_size=2, peepholes=True, cell_clip=1.0, proj_clip=1.0, forget_bias=1.0))
    case = variant_case("addition", VARIANTS["all"])
    params, x, state, d_hs, d_state = full_arrays(case)
    hs, (h, c) = adapter.forward(params, x, state, integration_mode="addition", **case.runtime)
    want_hs, (want_h, want_c) = mlstm_spec.forward(params, x, state, **case.runtime)
    assert_close(hs, want_hs, what="hs")
    assert_close(c, want_c, what="c_T")
    grads = adapter.gradients(params, x, state, d_hs, d_state, integration_mode="addition", **case.runtime)
    for name, value in mlstm_spec.backward(params, x, state, d_hs, d_state, **case.runtime).items():
        assert_close(grads[name], value, what=f"d {name}")
