"""The JAX backend: the shared conformance suite, plus what is specific to JAX (pytrees through jit,
grad, vmap and optax; float64 that stays float64; compile size independent of T; trace-time errors)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from helpers import conformance_params, jaxprs, random_params, require_backend, run_conformance

bj = require_backend("jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import mlstm_spec  # noqa: E402
from hypothesis import settings  # noqa: E402
from mlstm_spec.conformance import relative_error  # noqa: E402
from mlstm_spec.params import block  # noqa: E402

MODES = ("addition", "multiplicative_integration")


@pytest.fixture
def x64():
    """JAX's 64-bit mode for one test, restored afterwards."""
    with jax.enable_x64(True):
        yield


def max_relative_error(actual, expected):
    return relative_error(actual, expected)[0]


# ---- the shared conformance suite ----

@pytest.mark.parametrize(("device", "dtype"), conformance_params(bj))
def test_conformance(device, dtype):
    options = {}
    if dtype in ("bfloat16", "float16"):
        # Half precision runs the float32 program between two casts (see backends.jax), so the
        # float32 run already covers the drawn shapes and options; a third of the examples checks
        # the casts and their rounding, and keeps the number of distinct compilations down.
        options["settings"] = settings(max_examples=max(5, settings().max_examples // 3))
    run_conformance(bj.ConformanceAdapter, device, dtype, **options)


# ---- float64 really is float64 ----

def _float_dtypes_in_jaxpr(closed_jaxpr) -> set[str]:
    """Every floating dtype of every value in a jaxpr, sub-jaxprs (scan bodies, jit) included."""
    found = set()
    for jaxpr in jaxprs(closed_jaxpr.jaxpr):
        for var in list(jaxpr.invars) + list(jaxpr.outvars) + list(jaxpr.constvars):
            aval = getattr(var, "aval", None)
            if aval is not None and jnp.issubdtype(aval.dtype, jnp.floating):
                found.add(aval.dtype.name)
        for eqn in jaxpr.eqns:
            for var in list(eqn.outvars):
                if jnp.issubdtype(var.aval.dtype, jnp.floating):
                    found.add(var.aval.dtype.name)
    return found


def test_float64_stays_float64_end_to_end(x64):
    rng = np.random.default_rng(1)
    params = random_params(rng, 3, 4)
    xs, h0, c0 = rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 4)), rng.standard_normal((2, 4))

    def loss(params, xs, h0, c0):
        hs, (h, c) = bj.mlstm(params, xs, (h0, c0))
        return jnp.sum(hs**3) + jnp.sum(h * c)

    jp = {k: jnp.asarray(v) for k, v in params.items()}
    args = (jp, jnp.asarray(xs), jnp.asarray(h0), jnp.asarray(c0))
    program = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(*args)
    assert _float_dtypes_in_jaxpr(program) == {"float64"}
    hs, (h, c) = bj.mlstm(*args[:2], (args[2], args[3]))
    assert {hs.dtype.name, h.dtype.name, c.dtype.name} == {"float64"}
    want_hs, (want_h, want_c) = mlstm_spec.forward(params, xs, (h0, c0))
    # a float32 computation anywhere gives errors near 1e-7
    assert max_relative_error(hs, want_hs) < 1e-13
    assert max_relative_error(c, want_c) < 1e-13


def test_float64_without_x64_raises_instead_of_downcasting():
    rng = np.random.default_rng(2)
    params = random_params(rng, 3, 4)
    xs = rng.standard_normal((2, 5, 3))
    message = "float64, but JAX's 64-bit mode is off"
    with jax.enable_x64(False):
        with raises(TypeError, message):
            bj.mlstm(params, xs)
        with raises(TypeError, message):
            bj.MLSTM.from_canonical(params)
        with raises(TypeError, message):
            bj.MLSTM(3, 4, dtype=jnp.float64)
        with raises(TypeError, message):
            bj.init(jax.random.key(0), 3, 4, dtype="float64")
        # float32 still works with the mode off
        params32 = {k: v.astype(np.float32) for k, v in params.items()}
        hs, _ = bj.mlstm(params32, xs.astype(np.float32))
        assert hs.dtype == jnp.float32


# ---- functional transformations ----

@pytest.mark.parametrize("mode", MODES)
def test_vmap_over_unbatched_equals_batched(x64, mode):
    rng = np.random.default_rng(3)
    params = {k: jnp.asarray(v) for k, v in random_params(rng, 3, 4).items()}
    xs, h0, c0 = (jnp.asarray(rng.standard_normal(s)) for s in [(3, 6, 3), (3, 4), (3, 4)])
    batched = bj.mlstm(params, xs, (h0, c0), integration_mode=mode)
    mapped = jax.vmap(lambda x, h, c: bj.mlstm(params, x, (h, c), integration_mode=mode))(xs, h0, c0)
    for got, want in zip(jax.tree.leaves(mapped), jax.tree.leaves(batched)):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)
    # the module: its state carries a leading layer axis, so vmap maps it out at axis 1
    model = bj.MLSTM.from_canonical([params, random_params(rng, 4, 4)], integration_mode=mode)
    batched = model(xs)
    mapped = jax.vmap(model, out_axes=(0, (1, 1)))(xs)
    for got, want in zip(jax.tree.leaves(mapped), jax.tree.leaves(batched)):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)
    if mode == "addition":  # and over an ensemble of models: the parameters are the mapped leaves
        other = jax.tree.map(lambda leaf: leaf * 0.5, model)
        ensemble = jax.tree.map(lambda *leaves: jnp.stack(leaves), model, other)
        hs = jax.vmap(lambda m: m(xs)[0])(ensemble)
        np.testing.assert_allclose(hs[1], other(xs)[0], rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(hs[0], batched[0], rtol=1e-13, atol=1e-14)


def test_jit_equals_eager(x64):
    """``jax.disable_jit`` runs the scan as a Python loop of eager operations."""
    rng = np.random.default_rng(4)
    model = bj.MLSTM.from_canonical([random_params(rng, 2, 3), random_params(rng, 3, 3)],
                                    integration_mode="multiplicative_integration")
    xs = jnp.asarray(rng.standard_normal((2, 3, 2)))

    def loss(model, xs):
        hs, (h, c) = model(xs)
        return jnp.sum(jnp.sin(hs)) + jnp.sum(c**2)

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(model, xs)
    with jax.disable_jit():
        eager = jax.value_and_grad(loss, argnums=(0, 1))(model, xs)
    assert jax.tree.structure(compiled) == jax.tree.structure(eager)
    for got, want in zip(jax.tree.leaves(compiled), jax.tree.leaves(eager)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("unroll", [2, 3])
def test_unroll_equals_unroll_1(x64, unroll):
    rng = np.random.default_rng(5)
    params = random_params(rng, 3, 4)
    xs = jnp.asarray(rng.standard_normal((2, 5, 3)))  # T=5: not a multiple of the unroll
    want = bj.mlstm(params, xs, unroll=1)
    got = bj.mlstm(params, xs, unroll=unroll)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-13, atol=1e-14)
    grad = lambda u: jax.grad(lambda p: jnp.sum(bj.mlstm(p, xs, unroll=u)[0] ** 2))(params)  # noqa: E731
    for g, w in zip(jax.tree.leaves(grad(unroll)), jax.tree.leaves(grad(1))):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-13)


def test_grad_through_pytree_and_one_optax_step():
    optax = pytest.importorskip("optax")
    model = bj.MLSTM(3, 5, num_layers=2, key=jax.random.key(7), unroll=2)
    xs = jax.random.normal(jax.random.key(8), (4, 6, 3), jnp.float32)
    target = jax.random.normal(jax.random.key(9), (4, 6, 5), jnp.float32)

    def loss(model):
        hs, _ = model(xs)
        return jnp.mean((hs - target) ** 2)

    optimizer = optax.adam(1e-2)

    @jax.jit
    def train_step(model, opt_state):
        value, grads = jax.value_and_grad(loss)(model)
        updates, opt_state = optimizer.update(grads, opt_state, model)
        return optax.apply_updates(model, updates), opt_state, value, grads

    opt_state = optimizer.init(model)
    new_model, opt_state, before, grads = train_step(model, opt_state)
    assert isinstance(grads, bj.MLSTM)
    assert jax.tree.structure(grads) == jax.tree.structure(model)
    assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))
    assert isinstance(new_model, bj.MLSTM)
    assert jax.tree.structure(new_model) == jax.tree.structure(model)
    assert new_model.integration_mode == "addition" and new_model.unroll == 2
    for old, new in zip(jax.tree.leaves(model), jax.tree.leaves(new_model)):
        assert new.dtype == old.dtype and new.shape == old.shape
        assert bool(jnp.any(old != new))
    for _ in range(5):
        new_model, opt_state, after, _ = train_step(new_model, opt_state)
    assert float(after) < float(before)


def test_cell_steps_equal_the_sequence(x64):
    rng = np.random.default_rng(6)
    params = random_params(rng, 3, 4, independent_recurrence=True)
    xs = rng.standard_normal((2, 5, 3))
    state = (rng.standard_normal((2, 4)), rng.standard_normal((2, 4)))
    hs, final = bj.mlstm(params, xs, state, integration_mode="multiplicative_integration")
    layer = bj.MLSTMCell.from_canonical(params, integration_mode="multiplicative_integration")
    for t in range(5):
        h, state = layer(xs[:, t], state)
        np.testing.assert_allclose(h, hs[:, t], rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(state[1], final[1], rtol=1e-13, atol=1e-14)
    want_h, (_, want_c) = mlstm_spec.cell(params, xs[0, 0])
    h, (_, c) = bj.cell(params, xs[0, 0])
    assert h.shape == (4,)
    np.testing.assert_allclose(c, want_c, rtol=1e-12, atol=1e-14)


def test_stack_state_convention(x64):
    rng = np.random.default_rng(7)
    layers = [random_params(rng, 2, 3), random_params(rng, 3, 3), random_params(rng, 3, 3)]
    xs = rng.standard_normal((4, 5, 2))
    model = bj.MLSTM.from_canonical(layers)
    hs, (h_n, c_n) = model(xs)
    assert hs.shape == (4, 5, 3) and h_n.shape == c_n.shape == (3, 4, 3)
    out, state = xs, None
    for layer, params in enumerate(layers):
        out, (h, c) = mlstm_spec.forward(params, out, None)
        np.testing.assert_allclose(h_n[layer], h, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(c_n[layer], c, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(hs, out, rtol=1e-12, atol=1e-14)
    # unbatched: the state is (L, H); feeding the final state back continues the sequence
    hs1, state = model(xs[0, :2])
    hs2, state = model(xs[0, 2:], state)
    assert state[0].shape == (3, 3)
    np.testing.assert_allclose(jnp.concatenate([hs1, hs2]), hs[0], rtol=1e-12, atol=1e-14)


# ---- the LSTM reduction (spec-facts.md section 4), against an LSTM written here ----

def plain_lstm(xs, w_x, w_h, b, h, c):
    """Gates in order i, o, f, z; xs (B, T, I), w_x (4H, I), w_h (4H, H), b (4H,)."""
    sig = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
    hs = []
    for x in np.moveaxis(xs, 1, 0):
        a = x @ w_x.T + h @ w_h.T + b
        i, o, f, z = np.split(a, 4, axis=1)
        c = sig(f) * c + sig(i) * np.tanh(z)
        h = sig(o) * np.tanh(c)
        hs.append(h)
    return np.stack(hs, axis=1), (h, c)


@pytest.mark.parametrize("independent_recurrence", [False, True])
def test_lstm_reduction(x64, independent_recurrence):
    rng = np.random.default_rng(9)
    hidden = 4
    params = random_params(rng, 3, hidden, independent_recurrence=independent_recurrence)
    params["weight_ih"][:hidden] = 0.0  # block m of weight_ih
    params["bias_ih"][:hidden] = 1.0  # block m of bias_ih: now m = weight_hh h + bias_hh
    w_hh = params["weight_hh"]
    w_hh_matrix = np.diag(w_hh) if independent_recurrence else w_hh
    w_x = np.concatenate([block(params["weight_ih"], g) for g in "iofz"])
    w_h = params["weight_mh"] @ w_hh_matrix
    b = (np.concatenate([block(params["bias_ih"], g) for g in "iofz"])
         + params["weight_mh"] @ params["bias_hh"] + params["bias_mh"])
    xs = rng.standard_normal((2, 6, 3))
    h0, c0 = rng.standard_normal((2, hidden)), rng.standard_normal((2, hidden))
    want_hs, (want_h, want_c) = plain_lstm(xs, w_x, w_h, b, h0, c0)
    hs, (h, c) = bj.mlstm(params, xs, (h0, c0))
    assert max_relative_error(hs, want_hs) < 1e-12
    assert max_relative_error(c, want_c) < 1e-12


# ---- compile size does not grow with T ----

def _lowered_lines(function, *args) -> int:
    """Lines of the StableHLO program XLA compiles; an unrolled time loop would grow with T."""
    return len(jax.jit(function).lower(*args).as_text().splitlines())


def _scan_unrolls(closed_jaxpr) -> list:
    return [eqn.params["unroll"] for jaxpr in jaxprs(closed_jaxpr.jaxpr) for eqn in jaxpr.eqns
            if eqn.primitive.name == "scan"]


@pytest.mark.parametrize("unroll", [1, 4])
def test_program_size_does_not_grow_with_steps(unroll):
    model = bj.MLSTM(3, 4, num_layers=2, unroll=unroll)
    loss = lambda m, x: jnp.sum(m(x)[0])  # noqa: E731
    forward_and_backward = jax.grad(loss, argnums=(0, 1))

    def sizes(steps):
        xs = jnp.zeros((2, steps, 3), jnp.float32)
        return _lowered_lines(lambda m, x: m(x), model, xs), _lowered_lines(forward_and_backward, model, xs)

    short, long = sizes(8), sizes(256)
    assert short == long
    # one scan per layer, unrolled as asked and no more
    assert _scan_unrolls(jax.make_jaxpr(model)(jnp.zeros((2, 8, 3), jnp.float32))) == [unroll, unroll]


# ---- initialisation and canonical round trips ----

def test_init_draws_glorot_uniform_with_the_spec_bounds():
    inputs, hidden = 40, 30
    params = bj.init(jax.random.key(0), inputs, hidden)
    assert sorted(params) == sorted(["weight_ih", "weight_hh", "weight_mh", "bias_ih", "bias_hh", "bias_mh"])
    for name, (fan_out, fan_in) in {"weight_ih": (5 * hidden, inputs), "weight_hh": (hidden, hidden),
                                    "weight_mh": (4 * hidden, hidden)}.items():
        value = np.asarray(params[name])
        assert value.shape == (fan_out, fan_in) and value.dtype == np.float32
        limit = math.sqrt(6 / (fan_in + fan_out))
        assert np.abs(value).max() <= limit
        assert np.abs(value).max() > 0.95 * limit  # fills the range (hundreds of draws)
        assert abs(value.mean()) < 0.1 * limit
    for name in ("bias_ih", "bias_hh", "bias_mh"):
        assert not np.any(np.asarray(params[name]))
    vector = bj.init(jax.random.key(1), inputs, hidden, independent_recurrence=True, bias=False)
    assert vector["weight_hh"].shape == (hidden,) and "bias_ih" not in vector
    assert np.abs(np.asarray(vector["weight_hh"])).max() <= math.sqrt(6 / (1 + hidden))
    again = bj.init(jax.random.key(0), inputs, hidden)
    other = bj.init(jax.random.key(2), inputs, hidden)
    assert np.array_equal(again["weight_ih"], params["weight_ih"])
    assert not np.array_equal(other["weight_ih"], params["weight_ih"])
    # the spec accepts what init draws
    assert mlstm_spec.check_params({k: np.asarray(v) for k, v in params.items()}).hidden_size == hidden


def test_init_orthogonal_and_forget_bias():
    params = bj.init(jax.random.key(3), 6, 4, weight_init="orthogonal", forget_bias_init=3.0)
    w_mh = np.asarray(params["weight_mh"], np.float64)
    for k in range(4):
        gate = w_mh[4 * k : 4 * (k + 1)]
        np.testing.assert_allclose(gate @ gate.T, np.eye(4), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(block(params["bias_ih"], "f")), 3.0)
    assert not np.any(np.asarray(block(params["bias_ih"], "i")))


def test_module_constructor_options():
    model = bj.MLSTM(3, 4, num_layers=2, bias=False, independent_recurrence=True, key=jax.random.key(1))
    assert model.num_layers == 2 and model.input_size == 3 and model.hidden_size == 4
    assert sorted(model.layers[1]) == ["bias_hh", "bias_mh", "weight_hh", "weight_ih", "weight_mh"]
    assert model.layers[0]["weight_ih"].shape == (20, 3) and model.layers[1]["weight_ih"].shape == (20, 4)
    assert model.layers[0]["weight_hh"].shape == (4,)
    # layers draw from different keys
    assert not np.array_equal(model.layers[0]["weight_mh"], model.layers[1]["weight_mh"])
    assert "MLSTM(input_size=3, hidden_size=4, num_layers=2" in repr(model)
    layer = bj.MLSTMCell(3, 4, multiplicative_bias=False, key=jax.random.key(2))
    assert sorted(layer.params) == ["bias_hh", "bias_ih", "weight_hh", "weight_ih", "weight_mh"]
    h, (h_again, c) = jax.jit(lambda cell, x: cell(x))(layer, jnp.ones((2, 3), jnp.float32))
    assert h.shape == c.shape == (2, 4) and bool(jnp.all(h == h_again))
    grads = jax.grad(lambda cell: jnp.sum(cell(jnp.ones(3, jnp.float32))[0]))(layer)
    assert isinstance(grads, bj.MLSTMCell) and sorted(grads.params) == sorted(layer.params)


# ---- bad input: clear errors at trace time ----

@pytest.fixture
def layer():
    rng = np.random.default_rng(11)
    return {k: jnp.asarray(v) for k, v in random_params(rng, 3, 4, dtype="float32").items()}


def raises(error, message):
    """``pytest.raises`` for an exact piece of the message (not a pattern)."""
    return pytest.raises(error, match=re.escape(message))


def _xs(*shape, dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


def _without(params, key):
    return {k: v for k, v in params.items() if k != key}


BAD_CALLS = [
    pytest.param(lambda p: (p, _xs(2, 5, 7)), ValueError,
                 "xs must have I=3 features in its last dimension (from the parameters), got shape (2, 5, 7)",
                 id="feature-size"),
    pytest.param(lambda p: (p, _xs(5)), ValueError,
                 "xs must have shape (B, T, I) or (T, I), got 1 dimensions (5,)", id="rank"),
    pytest.param(lambda p: (p, _xs(2, 0, 3)), ValueError, "xs must have at least one step", id="empty"),
    pytest.param(lambda p: (p, _xs(2, 5, 3, dtype=jnp.float16)), TypeError,
                 "xs has dtype float16 but the parameters are float32", id="dtype-mismatch"),
    pytest.param(lambda p: (p, _xs(2, 5, 3, dtype=jnp.int32)), TypeError,
                 "xs must have a floating dtype in", id="int-dtype"),
    pytest.param(lambda p: (p, [[0.0, 0.0, 0.0]]), TypeError,
                 "xs must be a JAX or NumPy array, got list", id="not-array"),
    pytest.param(lambda p: ({**p, "weight_mh": _xs(16, 5)}, _xs(2, 5, 3)), ValueError,
                 "params['weight_mh'] must have shape (4H,H) = (16, 4) for I=3, H=4 (read from weight_ih "
                 "(20, 3)), got (16, 5)", id="weight-mh-shape"),
    pytest.param(lambda p: ({**p, "weight_ih": _xs(19, 3)}, _xs(2, 5, 3)), ValueError,
                 "params['weight_ih'] must have shape (5H, I)", id="weight-ih-shape"),
    pytest.param(lambda p: (_without(p, "weight_hh"), _xs(2, 5, 3)), ValueError,
                 "params is missing ['weight_hh']", id="missing-key"),
    pytest.param(lambda p: ({**p, "bias_xx": p["bias_hh"]}, _xs(2, 5, 3)), ValueError,
                 "params has unknown keys ['bias_xx']", id="unknown-key"),
    pytest.param(lambda p: ({**p, "bias_hh": p["bias_hh"].astype(jnp.float16)}, _xs(2, 5, 3)), TypeError,
                 "params mixes dtypes", id="mixed-dtypes"),
    pytest.param(lambda p: ({**p, "bias_hh": [0.0] * 4}, _xs(2, 5, 3)), TypeError,
                 "params['bias_hh'] must be a JAX or NumPy array, got list", id="param-not-array"),
    pytest.param(lambda p: ("weights", _xs(2, 5, 3)), TypeError,
                 "params must be a mapping of parameter name to array, got str", id="params-not-mapping"),
]


@pytest.mark.parametrize(("make_call", "error", "message"), BAD_CALLS)
def test_bad_input_errors_name_expected_and_given(layer, make_call, error, message):
    params, xs = make_call(layer)
    with raises(error, message):
        bj.mlstm(params, xs)


def test_bad_state_and_options(layer):
    xs = _xs(2, 5, 3)
    with raises(ValueError, "state h must have shape (2, 4), got (3, 4)"):
        bj.mlstm(layer, xs, (_xs(3, 4), _xs(2, 4)))
    with raises(TypeError, "state must be a pair (h, c) of arrays, got tuple of length 3"):
        bj.mlstm(layer, xs, (_xs(2, 4),) * 3)
    with raises(TypeError, "state c has dtype bfloat16 but the parameters are float32"):
        bj.mlstm(layer, xs, (_xs(2, 4), _xs(2, 4, dtype=jnp.bfloat16)))
    modes = "('addition', 'multiplicative_integration')"
    with raises(ValueError, f"integration_mode must be one of {modes}, got 'add'"):
        bj.mlstm(layer, xs, integration_mode="add")
    with raises(ValueError, "unroll must be an int >= 1 (steps per scan iteration), got 0"):
        bj.mlstm(layer, xs, unroll=0)
    with raises(ValueError, "x must have shape (B, I) or (I,), got 3 dimensions (2, 5, 3)"):
        bj.cell(layer, xs)
    model = bj.MLSTM.from_canonical([layer, {**layer, "weight_ih": _xs(20, 4)}])
    with raises(ValueError, "state h must have shape (2, 2, 4), got (2, 4)"):
        model(xs, (_xs(2, 4), _xs(2, 4)))


def test_errors_are_raised_at_trace_time_under_jit(layer):
    traced = jax.jit(bj.mlstm)
    with raises(ValueError, "got shape (2, 5, 7)"):
        traced(layer, _xs(2, 5, 7))
    model = bj.MLSTM.from_canonical(layer)
    with raises(TypeError, "xs has dtype bfloat16 but the parameters are float32"):
        jax.jit(lambda m, x: m(x))(model, _xs(2, 5, 3, dtype=jnp.bfloat16))


def test_bad_stacks_and_constructor_arguments(layer):
    with raises(ValueError, "params[1] must take input_size = hidden_size of layer 0 (4) "
                            "and have hidden_size 4, got I=3, H=4"):
        bj.MLSTM.from_canonical([layer, layer])
    without_bias = _without(layer, "bias_mh")
    with raises(ValueError, "params[1] has options"):
        bj.MLSTM.from_canonical([layer, {**without_bias, "weight_ih": _xs(20, 4)}])
    with raises(ValueError, "multiplicative_bias=True contradicts params, which imply multiplicative_bias=False"):
        bj.MLSTM.from_canonical(without_bias, multiplicative_bias=True)
    with raises(TypeError, "params must be a canonical mapping, a non-empty list"):
        bj.MLSTM.from_canonical([])
    with raises(ValueError, "hidden_size must be a positive int, got 0"):
        bj.MLSTM(3, 0)
    with raises(ValueError, "num_layers must be an int >= 1, got 0"):
        bj.MLSTM(3, 4, num_layers=0)
    with raises(TypeError, f"dtype must be one of {bj.DTYPES}, got int32"):
        bj.MLSTM(3, 4, dtype=jnp.int32)
    with raises(TypeError, "key must be a JAX PRNG key"):
        bj.init(0, 3, 4)
    with raises(ValueError, "device must be one of"):
        bj.ConformanceAdapter("tpu:7")


def test_x64_mode_is_read_through_the_public_flag(monkeypatch):
    """Issue 19: the 64-bit check reads ``jax.config.jax_enable_x64``, not the internal ``config.read``
    that a newer JAX may drop (simulated here by making it raise)."""

    def removed(name):
        raise AttributeError("jax.config.read was removed")

    monkeypatch.setattr(jax.config, "read", removed, raising=False)
    params = random_params(np.random.default_rng(12), 3, 4)
    with jax.enable_x64(False):
        with raises(TypeError, "float64, but JAX's 64-bit mode is off"):
            bj.mlstm(params, np.zeros((1, 2, 3)))
    with jax.enable_x64(True):
        assert bj.mlstm(params, np.zeros((1, 2, 3)))[0].dtype == jnp.float64


# ---- padding, reverse and shard_map (issue 13) ----

def _padded_case(seed=0, batch=3, steps=6):
    rng = np.random.default_rng(seed)
    layers = [mlstm_spec.init_params(3, 4, rng=rng, dtype=np.float64),
              mlstm_spec.init_params(4, 4, rng=rng, dtype=np.float64)]
    for params in layers:
        params["bias_ih"] = rng.standard_normal(params["bias_ih"].shape)
    return layers, rng.standard_normal((batch, steps, 3)), np.array([steps, 2, 0][:batch])


@pytest.mark.parametrize("reverse", [False, True])
def test_seq_lengths_mask_and_reverse_equal_the_spec_on_the_real_steps(x64, reverse):
    """Each row: the spec on its real steps (reversed for ``reverse``) from the given state; padded steps
    output zeros and keep the state, so a row of length 0 ends where it started."""
    layers, xs, lengths = _padded_case()
    h0, c0 = np.random.default_rng(9).standard_normal((2, 2, 3, 4))
    hs, (h_n, c_n) = bj.mlstm_stack(layers, jnp.asarray(xs), (jnp.asarray(h0), jnp.asarray(c0)),
                                    seq_lengths=jnp.asarray(lengths), reverse=reverse)
    mask = np.arange(xs.shape[1]) < lengths[:, None]
    masked = bj.mlstm_stack(layers, jnp.asarray(xs), (jnp.asarray(h0), jnp.asarray(c0)), mask=jnp.asarray(mask),
                            reverse=reverse)
    for got, want in zip(jax.tree.leaves(masked), jax.tree.leaves((hs, (h_n, c_n)))):
        np.testing.assert_array_equal(got, want)
    for b, n in enumerate(lengths):
        if n == 0:
            np.testing.assert_array_equal(h_n[:, b], h0[:, b])
            np.testing.assert_array_equal(c_n[:, b], c0[:, b])
            assert not np.any(np.asarray(hs[b]))
            continue
        out = xs[b, :n][::-1] if reverse else xs[b, :n]
        for k, params in enumerate(layers):
            out, (h, c) = mlstm_spec.forward(params, out, (h0[k, b], c0[k, b]))
            np.testing.assert_allclose(h_n[k, b], h, rtol=1e-12, atol=1e-13)
            np.testing.assert_allclose(c_n[k, b], c, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(hs[b, :n], out[::-1] if reverse else out, rtol=1e-12, atol=1e-13)
        assert not np.any(np.asarray(hs[b, n:]))
    one, _ = bj.mlstm(layers[0], jnp.asarray(xs[0]), seq_lengths=jnp.asarray(4), reverse=reverse)
    want, _ = mlstm_spec.forward(layers[0], xs[0, :4][::-1] if reverse else xs[0, :4])
    np.testing.assert_allclose(one[:4], want[::-1] if reverse else want, rtol=1e-12, atol=1e-13)


def test_padding_gradients_do_not_reach_padded_steps(x64):
    layers, xs, lengths = _padded_case()
    grad = jax.grad(lambda x: jnp.sum(bj.mlstm(layers[0], x, seq_lengths=jnp.asarray(lengths))[0] ** 2))(
        jnp.asarray(xs))
    mask = np.arange(xs.shape[1]) < lengths[:, None]
    assert not np.any(np.asarray(grad)[~mask]) and np.all(np.any(np.asarray(grad)[mask] != 0, axis=-1))


def test_padding_arguments_are_checked(layer):
    xs = jnp.ones((2, 5, 3), jnp.float32)
    with raises(ValueError, "give mask or seq_lengths, not both"):
        bj.mlstm(layer, xs, mask=jnp.ones((2, 5), bool), seq_lengths=jnp.array([5, 3]))
    with raises(ValueError, "mask must have the shape of xs without its feature axis, (2, 5), got (5, 2)"):
        bj.mlstm(layer, xs, mask=jnp.ones((5, 2), bool))
    with raises(TypeError, "mask must be a bool array (True: a real step), got dtype float32"):
        bj.mlstm(layer, xs, mask=jnp.ones((2, 5), jnp.float32))
    with raises(ValueError, "seq_lengths must have shape (2,) (one length per sequence), got (2, 1)"):
        bj.mlstm(layer, xs, seq_lengths=jnp.ones((2, 1), int))
    with raises(TypeError, "seq_lengths must be an integer array, got dtype float32"):
        bj.mlstm(layer, xs, seq_lengths=jnp.ones((2,), jnp.float32))


SHARD_MAP_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import backends.jax as bj
import mlstm_spec
jax.config.update("jax_enable_x64", True)
assert len(jax.devices()) == 2
mesh = jax.make_mesh((2,), ("batch",))
params = mlstm_spec.init_params(3, 4, rng=0, dtype=np.float64)
xs = np.random.default_rng(1).standard_normal((4, 5, 3))
lengths = np.array([5, 2, 4, 1])
def run(params, xs, lengths):
    hs, (h, c) = bj.mlstm(params, xs, seq_lengths=lengths)
    return hs, h
sharded = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P(), P("batch"), P("batch")),
                                out_specs=(P("batch"), P("batch"))))
batch = NamedSharding(mesh, P("batch"))
hs, h = sharded(params, jax.device_put(xs, batch), jax.device_put(lengths, batch))
assert len(hs.sharding.device_set) == 2
hs, h = np.asarray(hs), np.asarray(h)
for b, n in enumerate(lengths):
    want, (h_want, _) = mlstm_spec.forward(params, xs[b, :n])
    np.testing.assert_allclose(hs[b, :n], want, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(h[b], h_want, rtol=1e-12, atol=1e-13)
print("ok")
"""


def test_state_none_under_shard_map_on_two_cpu_devices():
    """The default zero state under jax.shard_map (issue 13: the scan refused a constant carry), on two
    fake CPU devices in a fresh process (the device count is fixed when JAX starts)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", SHARD_MAP_SCRIPT], capture_output=True, text=True, env=env,
                          cwd=root, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


# ---- the Equinox convention ----

def _scan_like_equinox(cell, xs, hidden):
    """A scan written for equinox.nn.LSTMCell: ``(h, c) = cell(x, (h, c))``, unbatched steps."""

    def step(state, x):
        state = cell(x, state)
        return state, state[0]

    zeros = jnp.zeros((hidden,), xs.dtype)
    return jax.lax.scan(step, (zeros, zeros), xs)


def test_equinox_style_cell_runs_in_a_scan_written_for_eqx_lstm_cell(x64):
    rng = np.random.default_rng(12)
    params = mlstm_spec.init_params(3, 4, rng=rng, dtype=np.float64)
    xs = rng.standard_normal((6, 3))
    cell = bj.EqxMLSTMCell.from_canonical(params)
    (h, c), hs = jax.jit(_scan_like_equinox, static_argnums=2)(cell, jnp.asarray(xs), 4)
    want, (h_want, c_want) = mlstm_spec.forward(params, xs)
    np.testing.assert_allclose(hs, want, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(h, h_want, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(c, c_want, rtol=1e-12, atol=1e-13)
    # the compatible MLSTMCell keeps its own result, h, (h, c)
    h_old, (h_again, c_old) = bj.MLSTMCell.from_canonical(params)(jnp.asarray(xs[0]))
    np.testing.assert_array_equal(h_old, h_again)
    eqx = pytest.importorskip("equinox", reason="equinox is not installed (test extra)")
    (h_eqx, _), _ = _scan_like_equinox(eqx.nn.LSTMCell(3, 4, key=jax.random.key(0)), jnp.asarray(xs), 4)
    assert h_eqx.shape == h.shape  # the same scan drives Equinox's own cell

    class Model(eqx.Module):
        cell: bj.EqxMLSTMCell

        def __call__(self, xs):
            return _scan_like_equinox(self.cell, xs, 4)[1]

    grads = eqx.filter_grad(lambda m: jnp.sum(m(jnp.asarray(xs)) ** 2))(Model(cell))
    assert sorted(grads.cell.params) == sorted(params)
    assert all(np.any(np.asarray(g) != 0) for g in grads.cell.params.values())
