"""The spec's variants (projection, peepholes, cell_clip, proj_clip, forget_bias) in the JAX backend and
its Flax layers, against mlstm_spec.forward / backward in float64: outputs, final states and every
gradient, with padding masks, seq_lengths and reverse; that a variant-free call traces the same program
as before the variants existed; the initialiser's options; canonical and weight-file round trips; and
the errors for bad options."""

from __future__ import annotations

import re
import warnings
from collections import Counter

import numpy as np
import pytest
from helpers import jaxprs, require_backend
from hypothesis import given, settings
from hypothesis import strategies as st
from spec_strategies import VariantCase, cases

bj = require_backend("jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import mlstm_spec  # noqa: E402
from mlstm_spec.conformance.tolerances import relative_error, tolerance  # noqa: E402
from mlstm_spec.equations import clip_gradient  # noqa: E402
from mlstm_spec.params import block  # noqa: E402

#: float64 against the spec, from the one tolerance table (its comment derives the figure).
TOLERANCE = tolerance("float64", "cpu")
ALL_ON = dict(cell_clip=0.4, proj_clip=0.3, forget_bias=-0.5)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def assert_close(got, want, what):
    error, where = relative_error(np.asarray(got), want)
    assert error <= TOLERANCE, f"{what}{list(where)}: relative error {error:.3g} > {TOLERANCE} " \
                               f"(got {np.asarray(got)[where]}, want {np.asarray(want)[where]})"


def variant_case(seed=0, batch=3, steps=5, inputs=3, hidden=5, proj_size=3, peepholes=True, **runtime):
    return VariantCase(batch=batch, steps=steps, input_size=inputs, hidden_size=hidden, dtype="float64",
                       integration_mode="addition", bias=True, recurrent_bias=True, multiplicative_bias=True,
                       independent_recurrence=False, with_state=True, with_d_state=True, weight_scale=1.0,
                       seed=seed, proj_size=proj_size, peepholes=peepholes,
                       **{**dict(cell_clip=None, proj_clip=None, forget_bias=0.0), **runtime})


# ---- the oracle, row by row on the real steps ----

def spec_rows(case: VariantCase, arrays, mask, reverse):
    """``mlstm_spec`` on each row's real steps (``mask`` (B, T); in reverse order for ``reverse``), from
    its own initial state: hs (zeros at padded steps), the final state, and the gradients of
    ``sum(hs * d_hs) + sum(h_T * d_h) + sum(c_T * d_c)`` (parameters summed over rows)."""
    params, xs = arrays.params, arrays.xs
    batched = xs.ndim == 3
    add = (lambda a: a) if batched else (lambda a: a[None])
    xs, mask = add(xs), add(mask)
    B, T, _ = xs.shape
    P, H = case.output_size, case.hidden_size
    zeros = (np.zeros((B, P)), np.zeros((B, H)))
    h0, c0 = zeros if arrays.state is None else map(add, arrays.state)
    d_hT, d_cT = zeros if arrays.d_state is None else map(add, arrays.d_state)
    d_hs = add(arrays.d_hs)
    hs, h_T, c_T = np.zeros((B, T, P)), h0.copy(), c0.copy()
    grads = {name: np.zeros_like(value) for name, value in params.items()}
    d_x, d_h0, d_c0 = np.zeros_like(xs), d_hT.copy(), d_cT.copy()
    for b in range(B):
        steps = np.flatnonzero(mask[b])[::-1 if reverse else 1]
        if not steps.size:
            continue
        options = dict(integration_mode=case.integration_mode, **case.runtime)
        out, (h_T[b], c_T[b]) = mlstm_spec.forward(params, xs[b, steps], (h0[b], c0[b]), **options)
        hs[b, steps] = out
        row = mlstm_spec.backward(params, xs[b, steps], (h0[b], c0[b]), d_hs[b, steps], (d_hT[b], d_cT[b]),
                                  **options)
        for name in params:
            grads[name] += row[name]
        d_x[b, steps], d_h0[b], d_c0[b] = row["x"], row["h0"], row["c0"]
    drop = (lambda a: a) if batched else (lambda a: a[0])
    return (drop(hs), drop(h_T), drop(c_T)), dict(grads, x=drop(d_x), h0=drop(d_h0), c0=drop(d_c0))


@settings(max_examples=min(settings().max_examples, 12))
@given(case=cases(max_size=5, max_steps=5), padding=st.sampled_from(["none", "mask", "seq_lengths"]),
       reverse=st.booleans(), data=st.data())
def test_variants_equal_the_spec_with_padding_and_reverse(case, padding, reverse, data):
    """Drawn shapes and options, any combination of the variants (spec_strategies.cases draws the clip
    bounds inside the range of c and h, so both clipped and unclipped elements occur)."""
    arrays = case.arrays()
    shape = arrays.xs.shape[:-1]  # ([B,] T)
    padding_args = {}
    if padding == "mask":
        mask = np.array(data.draw(st.lists(st.booleans(), min_size=int(np.prod(shape)),
                                           max_size=int(np.prod(shape))), label="mask")).reshape(shape)
        padding_args["mask"] = jnp.asarray(mask)
    elif padding == "seq_lengths":
        lengths = np.array(data.draw(st.lists(st.integers(0, case.steps), min_size=int(np.prod(shape[:-1])),
                                              max_size=int(np.prod(shape[:-1]))), label="seq_lengths"))
        lengths = lengths.reshape(shape[:-1])
        mask = np.arange(case.steps) < lengths[..., None]
        padding_args["seq_lengths"] = jnp.asarray(lengths)
    else:
        mask = np.ones(shape, bool)
    (want_hs, want_h, want_c), want_grads = spec_rows(case, arrays, mask, reverse)
    with jax.enable_x64(True):
        def run(params, xs, state):
            return bj.mlstm(params, xs, state, integration_mode=case.integration_mode, reverse=reverse,
                            **padding_args, **case.runtime)

        params = {name: jnp.asarray(value) for name, value in arrays.params.items()}
        state = None if arrays.state is None else tuple(map(jnp.asarray, arrays.state))
        # one vjp per example (each compiles anew): its primal is the forward; state=None takes the
        # default zero state, whose gradient then is not asked for
        (hs, (h, c)), pullback = jax.vjp(run, params, jnp.asarray(arrays.xs), state)
        zeros = tuple(np.zeros(shape[:-1] + (n,)) for n in (case.output_size, case.hidden_size))
        d_state = zeros if arrays.d_state is None else arrays.d_state
        d_params, d_xs, d_state0 = pullback((jnp.asarray(arrays.d_hs), tuple(map(jnp.asarray, d_state))))
    assert hs.dtype == jnp.float64 and hs.shape == want_hs.shape and c.shape == want_c.shape
    assert_close(hs, want_hs, "hs")
    assert_close(h, want_h, "h_T")
    assert_close(c, want_c, "c_T")
    assert sorted(d_params) == sorted(arrays.params)
    for name, value in d_params.items():
        assert_close(value, want_grads[name], f"d {name}")
    assert_close(d_xs, want_grads["x"], "d xs")
    if state is not None:
        assert_close(d_state0[0], want_grads["h0"], "d h0")
        assert_close(d_state0[1], want_grads["c0"], "d c0")


def test_jit_of_grad_through_the_module_with_every_variant(x64):
    case = variant_case(seed=3, **ALL_ON)
    arrays = case.arrays()
    model = bj.MLSTM.from_canonical(arrays.params, **case.runtime)
    assert (model.cell_clip, model.proj_clip, model.forget_bias, model.proj_size) == (0.4, 0.3, -0.5, 3)
    state = tuple(np.asarray(a)[None] for a in arrays.state)  # the module's (L, B, .) layout
    d_h, d_c = arrays.d_state

    @jax.jit
    def loss_and_grads(model, xs, state):
        def loss(model, xs, state):
            hs, (h_n, c_n) = model(xs, state)
            return jnp.sum(hs * arrays.d_hs) + jnp.sum(h_n[0] * d_h) + jnp.sum(c_n[0] * d_c)
        return jax.grad(loss, argnums=(0, 1, 2))(model, xs, state)

    d_model, d_xs, (d_h0, d_c0) = loss_and_grads(model, jnp.asarray(arrays.xs), state)
    want = mlstm_spec.backward(arrays.params, arrays.xs, arrays.state, arrays.d_hs, arrays.d_state,
                               **case.runtime)
    assert isinstance(d_model, bj.MLSTM) and d_model.cell_clip == 0.4  # static options survive the transform
    for name, value in d_model.layers[0].items():
        assert_close(value, want[name], f"d {name}")
    assert_close(d_xs, want["x"], "d xs")
    assert_close(d_h0[0], want["h0"], "d h0")
    assert_close(d_c0[0], want["c0"], "d c0")


def test_projected_stack_and_cells_equal_the_spec(x64):
    """Layer 1 of a projected stack reads P features; cells (MLSTMCell, EqxMLSTMCell, cell) step as the
    spec's cell does, from a zero state P and H wide when none is given."""
    with pytest.warns(FutureWarning, match="forget_bias_init=1.0"):
        model = bj.MLSTM(3, 5, num_layers=2, proj_size=2, peepholes=True, cell_clip=0.5, forget_bias=1.0,
                         key=jax.random.key(1), dtype=jnp.float64)
    layers = model.to_canonical()
    assert layers[1]["weight_ih"].shape == (25, 2) and layers[1]["weight_hh"].shape == (5, 2)
    assert layers[1]["weight_hr"].shape == (2, 5) and layers[1]["weight_co"].shape == (5,)
    rng = np.random.default_rng(2)
    for layer in layers:  # nonzero biases and peepholes of some weight, so every term matters
        for name in ("bias_ih", "bias_hh", "bias_mh", "weight_ci", "weight_cf", "weight_co"):
            layer[name] = rng.uniform(-1, 1, layer[name].shape)
    model = bj.MLSTM.from_canonical(layers, cell_clip=0.5, forget_bias=1.0)
    xs = rng.standard_normal((2, 4, 3))
    hs, (h_n, c_n) = model(jnp.asarray(xs))
    assert hs.shape == (2, 4, 2) and h_n.shape == (2, 2, 2) and c_n.shape == (2, 2, 5)
    out = xs
    for k, layer in enumerate(layers):
        out, (h, c) = mlstm_spec.forward(layer, out, cell_clip=0.5, forget_bias=1.0)
        assert_close(h_n[k], h, "h_n")
        assert_close(c_n[k], c, "c_n")
    assert_close(hs, out, "hs")
    params = layers[0]
    want_h, (_, want_c) = mlstm_spec.cell(params, xs[:, 0], cell_clip=0.5, forget_bias=1.0)
    x = jnp.asarray(xs[:, 0])
    _, (h, c) = bj.MLSTMCell.from_canonical(params, cell_clip=0.5, forget_bias=1.0)(x)
    h_eqx, c_eqx = bj.EqxMLSTMCell.from_canonical(params, cell_clip=0.5, forget_bias=1.0)(
        x, (jnp.zeros((2, 2)), jnp.zeros((2, 5))))
    for got, want, what in ((h, want_h, "h"), (c, want_c, "c"), (h_eqx, want_h, "eqx h"), (c_eqx, want_c, "eqx c")):
        assert_close(got, want, what)
    h, (_, c) = bj.cell(params, jnp.asarray(xs[0, 0]), cell_clip=0.5, forget_bias=1.0)
    assert h.shape == (2,) and c.shape == (5,)
    assert_close(c, want_c[0], "cell c")


def test_clip_gradient_is_the_specs_at_the_bounds():
    """1 on the closed interval, 0 outside; ``jnp.clip`` would give 1/2 exactly at a bound."""
    values = np.array([-2.0, -1.0, -0.5, 0.0, 1.0, 3.0, np.nan])
    with jax.enable_x64(True):
        clipped = bj._clip(jnp.asarray(values), 1.0)
        grad = jax.grad(lambda v: jnp.sum(bj._clip(v, 1.0)))(jnp.asarray(values[:-1]))
    np.testing.assert_array_equal(clipped, mlstm_spec.equations.clip(values, 1.0))
    np.testing.assert_array_equal(grad, clip_gradient(np.ones(6), values[:-1], 1.0))


# ---- without variants, the program is the one traced before they existed ----

def _scan_body(closed):
    (body,) = [eqn.params["jaxpr"].jaxpr for j in jaxprs(closed.jaxpr) for eqn in j.eqns
               if eqn.primitive.name == "scan"]
    return [eqn.primitive.name for eqn in body.eqns]


def _all_primitives(closed) -> Counter:
    return Counter(eqn.primitive.name for j in jaxprs(closed.jaxpr) for eqn in j.eqns)


#: Recorded from the code before the variants (commit c6b0e4c, jax 0.10.2; the whole jaxpr text was the
#: same then too): the scan body of one layer's forward (addition, every bias), and the primitives of its
#: value_and_grad, sub-programs included.
FORWARD_BODY_BEFORE = [
    "dot_general", "broadcast_in_dim", "add", "slice", "mul", "dot_general", "broadcast_in_dim", "add", "slice",
    "add", "slice", "logistic", "slice", "slice", "slice", "slice", "tanh", "mul", "mul", "add", "tanh", "mul"]
GRADIENT_PRIMITIVES_BEFORE = Counter({
    "add": 5, "add_any": 12, "broadcast_in_dim": 13, "dot_general": 9, "integer_pow": 1, "jit": 2, "logistic": 1,
    "mul": 20, "pad": 7, "reduce_sum": 7, "reshape": 3, "scan": 2, "slice": 7, "squeeze": 2, "stack": 2, "sub": 3,
    "tanh": 2, "transpose": 4})


def _programs(**runtime):
    """The jaxprs of a float32 forward and value_and_grad (64-bit mode off, as JAX starts)."""
    with jax.enable_x64(False):
        params = {k: jnp.asarray(v) for k, v in mlstm_spec.init_params(3, 4, rng=0).items()}
        xs = jnp.ones((2, 5, 3), jnp.float32)
        forward = jax.make_jaxpr(lambda p, x: bj.mlstm(p, x, **runtime))(params, xs)
        loss = lambda p, x: jnp.sum(bj.mlstm(p, x, **runtime)[0] ** 2)  # noqa: E731
        gradient = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(params, xs)
    return forward, gradient


def test_variant_free_program_is_unchanged():
    forward, gradient = _programs()
    assert _scan_body(forward) == FORWARD_BODY_BEFORE
    assert _all_primitives(gradient) == GRADIENT_PRIMITIVES_BEFORE
    # the same program with the run-time options spelt out at their defaults
    assert str(_programs(cell_clip=None, proj_clip=None, forget_bias=0.0)[0]) == str(forward)
    # and a switched-on variant does change it (so the comparison above can fail)
    for runtime in (dict(cell_clip=1.0), dict(forget_bias=1.0)):
        assert _scan_body(_programs(**runtime)[0]) != FORWARD_BODY_BEFORE


# ---- initialisation ----

def test_init_options_are_the_specs():
    key = jax.random.key(4)
    params = bj.init(key, 3, 5, proj_size=2, peepholes=True, unit_forget_bias=True)
    assert {k: v.shape for k, v in params.items()} == {
        "weight_ih": (25, 3), "weight_hh": (5, 2), "weight_mh": (20, 5), "bias_ih": (25,), "bias_hh": (5,),
        "bias_mh": (20,), "weight_hr": (2, 5), "weight_ci": (5,), "weight_cf": (5,), "weight_co": (5,)}
    np.testing.assert_array_equal(block(np.asarray(params["bias_ih"]), "f"), 1.0)
    assert not np.any(block(np.asarray(params["bias_ih"]), "i"))
    assert 0 < np.abs(np.asarray(params["weight_co"])).max() <= np.sqrt(6 / 6)  # the vector glorot rule
    traced = jax.jit(lambda k: bj.init(k, 3, 5, proj_size=2, peepholes=True, unit_forget_bias=True))(key)
    for name in params:
        np.testing.assert_array_equal(traced[name], params[name])
    three = bj.init(key, 3, 5, forget_bias_init=3.0)
    np.testing.assert_array_equal(block(np.asarray(three["bias_ih"]), "f"), 3.0)
    # weight_ih is drawn first, so the variants leave it as a layer without them draws it
    np.testing.assert_array_equal(bj.init(key, 3, 5)["weight_ih"], params["weight_ih"])


def raises(error, message):
    return pytest.raises(error, match=re.escape(message))


def test_constructors_warn_that_forget_bias_changed_meaning():
    """The constructors' forget_bias set the initial forget block before 0.1.0; old code still runs, so
    it is warned, once per call site; the run-time value is what the layer then uses."""
    for make in (lambda: bj.MLSTM(3, 4, forget_bias=2.0), lambda: bj.MLSTMCell(3, 4, forget_bias=2.0)):
        with pytest.warns(FutureWarning, match=re.escape("pass forget_bias_init=2.0 instead")) as caught:
            layer = make()
        assert caught[0].filename == __file__  # points at the caller's line, not at backends/jax.py
        assert layer.forget_bias == 2.0
    params = mlstm_spec.init_params(3, 4, rng=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bj.MLSTM(3, 4)
        bj.MLSTMCell(3, 4, forget_bias_init=2.0)
        bj.MLSTM.from_canonical(params, forget_bias=2.0)
        bj.MLSTMCell.from_canonical(params, forget_bias=2.0)


def test_init_errors_and_the_renamed_keyword():
    key = jax.random.key(0)
    with raises(TypeError, "init(forget_bias=...) is now called forget_bias_init"):
        bj.init(key, 3, 4, forget_bias=1.0)
    with raises(TypeError, "init() got unexpected keyword argument(s) ['units']"):
        bj.init(key, 3, 4, units=4)
    with raises(ValueError, "proj_size must be 0 (no projection) or in 1..hidden_size-1 = 1..3, got 4"):
        jax.jit(lambda k: bj.init(k, 3, 4, proj_size=4))(key)  # checked at trace time, not in the callback
    with raises(ValueError, "proj_size=2 cannot be combined with independent_recurrence=True"):
        bj.MLSTM(3, 4, proj_size=2, independent_recurrence=True)
    with raises(ValueError, "unit_forget_bias=True sets the forget block of bias_ih, which bias=False leaves out"):
        bj.MLSTMCell(3, 4, unit_forget_bias=True, bias=False)


# ---- run-time options: checked, static ----

def test_runtime_option_errors_name_the_argument():
    params = {k: jnp.asarray(v) for k, v in mlstm_spec.init_params(3, 4, rng=0).items()}
    xs = jnp.ones((2, 5, 3), jnp.float32)
    with raises(ValueError, "cell_clip must be None or a finite number > 0, got 0"):
        bj.mlstm(params, xs, cell_clip=0)
    with raises(ValueError, "forget_bias must be a finite number, got nan"):
        bj.mlstm_stack([params], xs, forget_bias=float("nan"))
    with raises(TypeError, "cell_clip must be None or a finite number > 0, got str '1'"):
        bj.cell(params, xs[:, 0], cell_clip="1")
    with raises(ValueError, "proj_clip=1.0 clips the projected output, but the parameters have no projection"):
        bj.mlstm(params, xs, proj_clip=1.0)
    with raises(ValueError, "proj_clip=1.0 clips the projected output"):
        bj.MLSTM(3, 4, proj_clip=1.0)
    with raises(ValueError, "proj_size=2 contradicts params, which imply proj_size=0"):
        bj.MLSTM.from_canonical(params, proj_size=2)
    with raises(ValueError, "peepholes=True contradicts params, which imply peepholes=False"):
        bj.MLSTMCell.from_canonical(params, peepholes=True)
    with raises(ValueError, "cell_clip must be None or a finite number > 0, got -1"):
        bj.MLSTMCell.from_canonical(params, cell_clip=-1)


# ---- canonical parameters and weight files ----

def test_canonical_and_weight_file_round_trips(tmp_path):
    pytest.importorskip("safetensors")
    layers = [mlstm_spec.init_params(3, 5, rng=1, proj_size=2, peepholes=True),
              mlstm_spec.init_params(2, 5, rng=2, proj_size=2, peepholes=True)]
    model = bj.MLSTM.from_canonical(layers, cell_clip=2.0, proj_clip=0.5, forget_bias=1.0)
    for got, want in zip(model.to_canonical(), layers):
        assert sorted(got) == sorted(want)
        assert all(got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes() for k in want)
    path = tmp_path / "variants.safetensors"
    mlstm_spec.save(path, model.to_canonical(), cell_clip=2.0, proj_clip=0.5, forget_bias=1.0)
    weights = mlstm_spec.load(path)
    loaded = bj.MLSTM.from_canonical(weights)  # the file's run-time options are used
    assert (loaded.cell_clip, loaded.proj_clip, loaded.forget_bias) == (2.0, 0.5, 1.0)
    xs = jnp.asarray(np.random.default_rng(3).standard_normal((2, 4, 3)), jnp.float32)
    for got, want in zip(jax.tree.leaves(loaded(xs)), jax.tree.leaves(model(xs))):
        np.testing.assert_array_equal(got, want)
    with raises(ValueError, "cell_clip=1.0 contradicts params, which imply cell_clip=2.0"):
        bj.MLSTM.from_canonical(weights, cell_clip=1.0)
    cell = bj.MLSTMCell.from_canonical(mlstm_spec.load(path).layers[0], peepholes=True, proj_size=2)
    assert cell.to_canonical()[0]["weight_hr"].tobytes() == layers[0]["weight_hr"].tobytes()


def test_variant_constants_do_not_widen_float32_or_half_precision():
    """In 64-bit mode a float32 call with every variant computes in float32 only (no clip bound or
    forget_bias turns a value into float64), and storage dtypes stay what they are."""
    layer = mlstm_spec.init_params(3, 5, rng=5, proj_size=2, peepholes=True)
    xs = np.random.default_rng(6).standard_normal((2, 4, 3)).astype(np.float32)
    with jax.enable_x64(True):
        params = {k: jnp.asarray(v) for k, v in layer.items()}
        loss = lambda p, x: jnp.sum(bj.mlstm(p, x, **ALL_ON)[0])  # noqa: E731
        program = jax.make_jaxpr(jax.value_and_grad(loss))(params, jnp.asarray(xs))
        floats = {v.aval.dtype.name for j in jaxprs(program.jaxpr) for eqn in j.eqns for v in eqn.outvars
                  if jnp.issubdtype(v.aval.dtype, jnp.floating)}
        assert floats == {"float32"}
        for dtype in ("bfloat16", "float16"):
            half = {k: v.astype(dtype) for k, v in params.items()}
            hs, (h, c) = bj.mlstm(half, jnp.asarray(xs, dtype), **ALL_ON)
            assert hs.dtype == h.dtype == c.dtype == jnp.dtype(dtype)
