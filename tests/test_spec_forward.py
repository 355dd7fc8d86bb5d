"""``mlstm_spec.cell`` / ``forward``: properties, the pinned block order, the LSTM reduction, dtypes and
numerical stability.

Expected values never come from ``mlstm_spec`` itself: they come from a one-step mLSTM written below
from spec-facts.md section 1 (block orders spelled out here) with the variants of issue 17 as
TensorFlow's LSTM cell defines them, from a textbook LSTM (spec-facts.md section 4), or from ``forward``
run in another way (cell by cell, split in time, row by row).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import warnings

import numpy as np
import pytest
from hypothesis import assume, given, strategies as st
from hypothesis.extra import numpy as hnp

import mlstm_spec
from mlstm_spec import equations
from mlstm_spec.conformance.tolerances import tolerance
from spec_strategies import MODES, VARIANTS, VariantCase as Case, assert_close, cases, variant_case, zero_state

# The block orders as spec-facts.md section 1 states them (RecurrentLayers.jl 0.3.4 code).
FACTS_IH_ORDER = ("m", "i", "o", "f", "z")
FACTS_MH_ORDER = ("i", "o", "f", "z")

# "Equal" in float64 for the same computation grouped differently (cell by cell, split in time, row by
# row): only the summation order of BLAS dot products differs, observed <= 4e-15. 1e-12 leaves room
# and is still 1e4 below any float32 computation.
SAME_COMPUTATION = 1e-12


def facts_blocks(array, order):
    size = array.shape[0] // len(order)
    return {name: array[k * size:(k + 1) * size] for k, name in enumerate(order)}


def facts_step(params, x, h, c, integration_mode, cell_clip=None, proj_clip=None, forget_bias=0.0):
    """One mLSTM step exactly as spec-facts.md section 1 writes it, batched over the leading axis,
    with the variants as issue 17 and TensorFlow's LSTMCell define them: peepholes add w_ci * c_prev
    to i's and w_cf * c_prev to f's pre-activation and w_co * c_new to o's; forget_bias is added to
    f's; the new cell state is clipped (and carried clipped); the output is projected, then clipped."""
    hidden = c.shape[-1]
    zeros = lambda n: np.zeros(n * hidden)  # noqa: E731  (an absent bias adds nothing)
    w_ih = facts_blocks(params["weight_ih"], FACTS_IH_ORDER)
    b_ih = facts_blocks(params.get("bias_ih", zeros(5)), FACTS_IH_ORDER)
    p = {g: x @ w_ih[g].T + b_ih[g] for g in FACTS_IH_ORDER}
    w_hh = params["weight_hh"]
    r = (h * w_hh if w_hh.ndim == 1 else h @ w_hh.T) + params.get("bias_hh", zeros(1))
    m = p["m"] * r
    w_mh = facts_blocks(params["weight_mh"], FACTS_MH_ORDER)
    b_mh = facts_blocks(params.get("bias_mh", zeros(4)), FACTS_MH_ORDER)
    q = {g: m @ w_mh[g].T + b_mh[g] for g in FACTS_MH_ORDER}
    combine = np.add if integration_mode == "addition" else np.multiply
    a = {g: combine(p[g], q[g]) for g in FACTS_MH_ORDER}
    peephole = {g: params.get(f"weight_c{g}", zeros(1)) for g in "ifo"}
    logistic = lambda v: 0.5 * (1.0 + np.tanh(0.5 * v))  # noqa: E731  (an identity; not the spec's form)
    i = logistic(a["i"] + peephole["i"] * c)
    f = logistic(a["f"] + peephole["f"] * c + forget_bias)
    z = np.tanh(a["z"])
    c_new = f * c + i * z
    if cell_clip is not None:
        c_new = np.minimum(np.maximum(c_new, -cell_clip), cell_clip)
    o = logistic(a["o"] + peephole["o"] * c_new)
    h_new = o * np.tanh(c_new)
    if "weight_hr" in params:
        h_new = h_new @ params["weight_hr"].T
        if proj_clip is not None:
            h_new = np.minimum(np.maximum(h_new, -proj_clip), proj_clip)
    return h_new, c_new


# ---- against the facts, step by step ----

@given(case=cases())
def test_forward_matches_the_equations_of_the_facts(case):
    a = case.arrays()
    hs, (h_T, c_T) = mlstm_spec.forward(a.params, a.xs, a.state, integration_mode=case.integration_mode,
                                        **case.runtime)
    h, c = a.state if a.state is not None else zero_state(case)
    for t in range(case.steps):
        h, c = facts_step(a.params, a.xs[..., t, :], h, c, case.integration_mode, **case.runtime)
        assert_close(hs[..., t, :], h, SAME_COMPUTATION, f"hs[..., {t}, :]", case)
    assert_close(h_T, h, SAME_COMPUTATION, "h_T", case)
    assert_close(c_T, c, SAME_COMPUTATION, "c_T", case)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda name: name.replace(" ", "_"))
def test_each_variant_matches_the_equations_of_the_facts(variant, mode):
    """Each variant alone and all together, on cases where every clip acts (the drawn test above meets
    them in random combinations)."""
    case = variant_case(mode, VARIANTS[variant])
    a = case.arrays()
    hs, (h_T, c_T) = mlstm_spec.forward(a.params, a.xs, a.state, integration_mode=mode, **case.runtime)
    h, c = a.state
    for t in range(case.steps):
        h, c = facts_step(a.params, a.xs[..., t, :], h, c, mode, **case.runtime)
        assert_close(hs[..., t, :], h, SAME_COMPUTATION, f"hs[..., {t}, :]", case)
    assert_close(h_T, h, SAME_COMPUTATION, "h_T", case)
    assert_close(c_T, c, SAME_COMPUTATION, "c_T", case)


def test_the_forget_bias_is_added_after_the_product_under_multiplicative_integration():
    """The run-time forget_bias offsets f's pre-activation whatever the mode; a forget block of bias_ih
    (what unit_forget_bias sets) only scales it under multiplicative integration. With weight_ih zero
    and bias_ih's f block 0, p_f = 0 so a_f = p_f * q_f = 0 and f = 1/2 exactly, unless forget_bias
    shifts it: f = sigmoid(forget_bias). With h0 = 0 and no bias_hh, z = 0, so c_1 = f * c0."""
    H, I = 3, 2
    params = {"weight_ih": np.zeros((5 * H, I)), "weight_hh": np.eye(H), "weight_mh": np.ones((4 * H, H)),
              "bias_ih": np.zeros(5 * H), "bias_mh": np.ones(4 * H)}
    state = (np.zeros((1, H)), np.array([[1.0, -2.0, 0.5]]))
    x = np.ones((1, I))
    for forget_bias in (0.0, 2.0, -1.0):
        _, (_, c) = mlstm_spec.cell(params, x, state, integration_mode="multiplicative_integration",
                                    forget_bias=forget_bias)
        np.testing.assert_allclose(c, state[1] / (1 + np.exp(-forget_bias)), rtol=1e-15)


# ---- forward run in other ways ----

@given(case=cases())
def test_forward_equals_repeated_cell(case):
    a = case.arrays()
    mode = case.integration_mode
    hs, (h_T, c_T) = mlstm_spec.forward(a.params, a.xs, a.state, integration_mode=mode, **case.runtime)
    state = a.state
    for t in range(case.steps):
        h, state = mlstm_spec.cell(a.params, a.xs[..., t, :], state, integration_mode=mode, **case.runtime)
        assert h.shape == hs[..., t, :].shape
        assert_close(h, hs[..., t, :], SAME_COMPUTATION, f"cell h at t={t}", case)
        np.testing.assert_array_equal(state[0], h)  # the cell returns h twice: output and state
    assert_close(state[0], h_T, SAME_COMPUTATION, "h_T", case)
    assert_close(state[1], c_T, SAME_COMPUTATION, "c_T", case)


@given(case=cases(max_steps=8).filter(lambda c: c.steps > 1), data=st.data())
def test_running_t_then_the_rest_from_the_carried_state_equals_running_all(case, data):
    split = data.draw(st.integers(1, case.steps - 1), label="split")
    a = case.arrays()
    mode, runtime = case.integration_mode, case.runtime
    hs, (h_T, c_T) = mlstm_spec.forward(a.params, a.xs, a.state, integration_mode=mode, **runtime)
    head, carried = mlstm_spec.forward(a.params, a.xs[..., :split, :], a.state, integration_mode=mode,
                                       **runtime)
    tail, (h_2, c_2) = mlstm_spec.forward(a.params, a.xs[..., split:, :], carried, integration_mode=mode,
                                          **runtime)
    assert_close(np.concatenate([head, tail], axis=-2), hs, SAME_COMPUTATION, "hs", case)
    assert_close(h_2, h_T, SAME_COMPUTATION, "h_T", case)
    assert_close(c_2, c_T, SAME_COMPUTATION, "c_T", case)


@given(case=cases(batched=True))
def test_each_batch_row_equals_running_that_row_alone(case):
    a = case.arrays()
    mode = case.integration_mode
    hs, (h_T, c_T) = mlstm_spec.forward(a.params, a.xs, a.state, integration_mode=mode, **case.runtime)
    for row in range(case.batch):
        state = None if a.state is None else (a.state[0][row], a.state[1][row])
        alone, (h, c) = mlstm_spec.forward(a.params, a.xs[row], state, integration_mode=mode, **case.runtime)
        assert_close(alone, hs[row], SAME_COMPUTATION, f"hs[{row}]", case)
        assert_close(h, h_T[row], SAME_COMPUTATION, f"h_T[{row}]", case)
        assert_close(c, c_T[row], SAME_COMPUTATION, f"c_T[{row}]", case)


@given(case=cases(batched=False))
def test_unbatched_equals_a_batch_of_one(case):
    a = case.arrays()
    mode = case.integration_mode
    hs, (h_T, c_T) = mlstm_spec.forward(a.params, a.xs, a.state, integration_mode=mode, **case.runtime)
    state = None if a.state is None else (a.state[0][None], a.state[1][None])
    batch_hs, (batch_h, batch_c) = mlstm_spec.forward(a.params, a.xs[None], state, integration_mode=mode,
                                                      **case.runtime)
    assert hs.shape == (case.steps, case.output_size) and batch_hs.shape == (1,) + hs.shape
    assert h_T.shape == (case.output_size,) and c_T.shape == (case.hidden_size,)
    assert_close(hs, batch_hs[0], SAME_COMPUTATION, "hs", case)
    assert_close(h_T, batch_h[0], SAME_COMPUTATION, "h_T", case)
    assert_close(c_T, batch_c[0], SAME_COMPUTATION, "c_T", case)


def test_none_state_means_zeros_and_the_final_h_is_the_last_output():
    a = Case(batch=3, steps=4, input_size=2, hidden_size=5, seed=1).arrays()
    hs, (h_T, c_T) = mlstm_spec.forward(a.params, a.xs)
    zeros = np.zeros((3, 5))
    hs_z, (h_z, c_z) = mlstm_spec.forward(a.params, a.xs, (zeros, zeros))
    np.testing.assert_array_equal(hs, hs_z)
    np.testing.assert_array_equal(c_T, c_z)
    np.testing.assert_array_equal(h_T, hs[:, -1])
    h, (h_1, c_1) = mlstm_spec.cell(a.params, a.xs[:, 0])
    np.testing.assert_array_equal(h, h_1)
    assert h.shape == c_1.shape == (3, 5)


def test_inputs_are_not_modified():
    a = Case(batch=2, steps=3, input_size=2, hidden_size=3, seed=4).arrays()
    params = {k: v.copy() for k, v in a.params.items()}
    xs, state = a.xs.copy(), tuple(s.copy() for s in a.state)
    mlstm_spec.forward(a.params, a.xs, a.state, integration_mode="multiplicative_integration")
    mlstm_spec.cell(a.params, a.xs[:, 0], a.state)
    for name in params:
        np.testing.assert_array_equal(a.params[name], params[name], err_msg=name)
    np.testing.assert_array_equal(a.xs, xs)
    np.testing.assert_array_equal(a.state[0], state[0])
    np.testing.assert_array_equal(a.state[1], state[1])


# ---- the block order, pinned one block at a time ----

def _one_block_params(rng, name, order, k, I, H):
    """Parameters where only block k of ``name`` is non-zero, on a background that treats every gate
    alike (so the background itself cannot depend on the block order) and makes every gate visible:
    z != 0 (so i matters) and m != 0 (so weight_mh matters)."""
    params = {
        "weight_ih": np.zeros((5 * H, I)), "weight_hh": np.zeros((H, H)),
        "weight_mh": np.zeros((4 * H, H)), "bias_ih": np.zeros(5 * H),
        "bias_hh": rng.uniform(0.5, 1.5, H) * rng.choice([-1, 1], H),
        "bias_mh": np.zeros(4 * H),
    }
    if name in ("weight_ih", "bias_ih"):
        params["weight_mh"] = np.tile(rng.uniform(-1, 1, (H, H)), (4, 1))  # same for every gate
        params["bias_mh"] = np.tile(rng.uniform(0.5, 1.5, H), 4)
    else:
        params["bias_ih"] = np.tile(rng.uniform(0.5, 1.5, H), 5)  # p_m != 0, so m != 0; z != 0
    block_shape = (H,) + params[name].shape[1:]
    value = rng.uniform(1, 2, block_shape) * rng.choice([-1, 1], block_shape)
    params[name][k * H:(k + 1) * H] = value
    return params, value


@pytest.mark.parametrize("name, order", [
    ("weight_ih", FACTS_IH_ORDER), ("bias_ih", FACTS_IH_ORDER),
    ("weight_mh", FACTS_MH_ORDER), ("bias_mh", FACTS_MH_ORDER),
], ids=["weight_ih", "bias_ih", "weight_mh", "bias_mh"])
def test_each_block_drives_exactly_the_gate_the_facts_name(name, order):
    rng = np.random.default_rng(42)
    I, H, B = 3, 4, 2
    x = rng.uniform(0.5, 1.5, (B, I))
    state = (rng.uniform(-0.9, 0.9, (B, H)), rng.uniform(-2, 2, (B, H)))
    for k, gate in enumerate(order):
        params, value = _one_block_params(rng, name, order, k, I, H)
        h, (_, c) = mlstm_spec.cell(params, x, state)

        def driving(g):
            """The facts' step when the block values sit in the block of gate g."""
            moved = dict(params)
            moved[name] = np.zeros_like(params[name])
            j = order.index(g)
            moved[name][j * H:(j + 1) * H] = value
            return facts_step(moved, x, *state, "addition")

        expected_h, expected_c = driving(gate)
        assert_close(h, expected_h, SAME_COMPUTATION, f"h with only {name} block {k} ({gate}) set")
        assert_close(c, expected_c, SAME_COMPUTATION, f"c with only {name} block {k} ({gate}) set")
        for other in order:
            if other != gate:  # the test can tell the gates apart: any other assignment differs
                other_h, other_c = driving(other)
                gap = max(np.abs(other_h - h).max(), np.abs(other_c - c).max())
                assert gap > 1e-3, f"{name} block {k}: gates {gate} and {other} look alike ({gap})"


def test_output_uses_the_cell_state_not_tanh_of_the_candidate():
    """Regression for RecurrentLayers.jl < 0.3.1, whose output was o * tanh(tanh(z)) (c never used):
    here h depends on c0, and equals o * tanh(c') exactly when the forget gate is saturated open."""
    H, I = 3, 2
    f_row = FACTS_IH_ORDER.index("f")
    params = {"weight_ih": np.zeros((5 * H, I)), "weight_hh": np.zeros((H, H)),
              "weight_mh": np.zeros((4 * H, H)), "bias_ih": np.zeros(5 * H)}
    params["bias_ih"][f_row * H:(f_row + 1) * H] = 40.0  # f = 1 in float64; i = o = 1/2, z = 0
    x = np.ones((1, I))
    c0 = np.array([[0.3, -1.2, 2.0]])
    h, (_, c) = mlstm_spec.cell(params, x, (np.zeros((1, H)), c0))
    np.testing.assert_allclose(c, c0, rtol=1e-15)
    np.testing.assert_allclose(h, 0.5 * np.tanh(c0), rtol=1e-15)


# ---- the reduction to a plain LSTM (spec-facts.md section 4) ----

def textbook_lstm(xs, h0, c0, weight_x, weight_h, bias):
    """A plain LSTM, gates stacked (i, f, g, o): i = sigma(W_i x + U_i h + b_i), ..., c = f c + i g,
    h = o tanh(c). xs (B, T, I); weight_x (4H, I); weight_h (4H, H); bias (4H,)."""
    logistic = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731  (moderate inputs only)
    h, c = h0, c0
    outputs = []
    for t in range(xs.shape[1]):
        gates = xs[:, t] @ weight_x.T + h @ weight_h.T + bias
        i, f, g, o = np.split(gates, 4, axis=-1)
        c = logistic(f) * c + logistic(i) * np.tanh(g)
        h = logistic(o) * np.tanh(c)
        outputs.append(h)
    return np.stack(outputs, axis=1), (h, c)


@given(case=cases(batched=True, modes=("addition",), variants=False)
       .map(lambda c: dataclasses.replace(c, bias=True)))
def test_with_block_m_of_the_input_zero_and_its_bias_one_the_mlstm_is_an_lstm(case):
    a = case.arrays()
    params = dict(a.params)
    H = case.hidden_size
    m_rows = slice(FACTS_IH_ORDER.index("m") * H, (FACTS_IH_ORDER.index("m") + 1) * H)
    params["weight_ih"] = params["weight_ih"].copy()
    params["bias_ih"] = params["bias_ih"].copy()
    params["weight_ih"][m_rows] = 0.0
    params["bias_ih"][m_rows] = 1.0
    # m = weight_hh h + bias_hh, so gate g sees recurrent matrix weight_mh[g] @ weight_hh and bias
    # bias_ih[g] + weight_mh[g] @ bias_hh + bias_mh[g].
    w_ih = facts_blocks(params["weight_ih"], FACTS_IH_ORDER)
    b_ih = facts_blocks(params["bias_ih"], FACTS_IH_ORDER)
    w_mh = facts_blocks(params["weight_mh"], FACTS_MH_ORDER)
    b_mh = facts_blocks(params.get("bias_mh", np.zeros(4 * H)), FACTS_MH_ORDER)
    w_hh = params["weight_hh"]
    w_hh_matrix = np.diag(w_hh) if w_hh.ndim == 1 else w_hh
    b_hh = params.get("bias_hh", np.zeros(H))
    lstm_order = {"i": "i", "f": "f", "g": "z", "o": "o"}  # textbook gate -> mLSTM block name
    weight_x = np.concatenate([w_ih[lstm_order[g]] for g in "ifgo"])
    weight_h = np.concatenate([w_mh[lstm_order[g]] @ w_hh_matrix for g in "ifgo"])
    bias = np.concatenate([b_ih[lstm_order[g]] + w_mh[lstm_order[g]] @ b_hh + b_mh[lstm_order[g]]
                           for g in "ifgo"])
    h0, c0 = a.state if a.state is not None else zero_state(case)
    expected_hs, (expected_h, expected_c) = textbook_lstm(a.xs, h0, c0, weight_x, weight_h, bias)
    hs, (h_T, c_T) = mlstm_spec.forward(params, a.xs, a.state)
    assert_close(hs, expected_hs, SAME_COMPUTATION, "hs", case)
    assert_close(h_T, expected_h, SAME_COMPUTATION, "h_T", case)
    assert_close(c_T, expected_c, SAME_COMPUTATION, "c_T", case)


# ---- bounds, dtypes, stability ----

def _bounded(shape, low, high):
    return hnp.arrays(np.float64, shape,
                      elements=st.floats(low, high, allow_nan=False, allow_subnormal=False))


@given(case=cases(weight_scales=(0.2,), variants=False), data=st.data())
def test_h_stays_strictly_inside_minus_one_one(case, data):
    """With |x| <= 1, weights and biases <= 0.2, |h0| < 1, |c0| <= 2 and sizes, T <= 6, every gate
    pre-activation is below 4 in size and |c| <= 8, so o < 1 and |tanh(c)| < 1 are representable:
    h must then lie strictly inside (-1, 1)."""
    a = case.arrays()
    xs = data.draw(_bounded(a.xs.shape, -1, 1), label="xs")
    state_shape = a.xs.shape[:-2] + (case.hidden_size,)
    state = (data.draw(_bounded(state_shape, -0.999, 0.999), label="h0"),
             data.draw(_bounded(state_shape, -2, 2), label="c0"))
    hs, (h_T, _) = mlstm_spec.forward(a.params, xs, state, integration_mode=case.integration_mode)
    assert np.all(np.abs(hs) < 1), f"max |h| = {np.abs(hs).max()!r} [{case}]"


@contextlib.contextmanager
def _no_floating_point_trouble():
    """Warnings become errors, and NumPy raises on overflow, invalid operations and division by zero.
    (Underflow is left alone: exp(-1e4) = 0 is the correct, harmless result.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            yield


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@given(case=cases(), data=st.data())
def test_inputs_up_to_1e4_give_no_warning_and_no_nan(dtype, mode, case, data):
    a = dataclasses.replace(case, dtype=dtype, integration_mode=mode).arrays()
    xs = data.draw(hnp.arrays(dtype, a.xs.shape, elements=st.floats(
        -1e4, 1e4, width=int(dtype[-2:]), allow_subnormal=False) | st.sampled_from([-1e4, 1e4])),
        label="xs")
    if dtype == "float32" and mode == "multiplicative_integration":
        # Here the gradient can truly exceed float32: each step back multiplies it by ~|p_m| |p_gates|
        # (~1e8 at inputs of 1e4 with unsaturated gates), and six steps pass 3.4e38. Overflow is then
        # the right answer; the promise holds where the exact (float64) gradient fits in float32.
        exact = mlstm_spec.backward(*_as_float64(a.params, xs, a.state, a.d_hs, a.d_state),
                                    integration_mode=mode, **case.runtime)
        assume(max(np.abs(g).max() for g in exact.values()) < np.finfo(np.float32).max / 1e3)
    with _no_floating_point_trouble():
        hs, (h_T, c_T) = mlstm_spec.forward(a.params, xs, a.state, integration_mode=mode, **case.runtime)
        grads = mlstm_spec.backward(a.params, xs, a.state, a.d_hs, a.d_state, integration_mode=mode,
                                    **case.runtime)
    for what, value in [("hs", hs), ("h_T", h_T), ("c_T", c_T)] + list(grads.items()):
        assert value.dtype == np.dtype(dtype), what
        assert np.all(np.isfinite(value)), f"{what} is not finite [{case}]"
    assert np.all(np.abs(hs) <= output_bound(case, a.params))


def output_bound(case, params):
    """|h| <= 1 (a gate times a tanh); projected, |h| <= the largest absolute row sum of weight_hr,
    or proj_clip; clipped cell states stay within cell_clip (checked by the caller)."""
    if "weight_hr" not in params:
        return 1
    bound = np.abs(params["weight_hr"].astype(np.float64)).sum(axis=1).max()
    return bound if case.proj_clip is None else min(bound, case.proj_clip)


def _as_float64(params, xs, state, d_hs, d_state):
    def cast(value):
        if value is None:
            return None
        if isinstance(value, dict):
            return {k: cast(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return type(value)(cast(v) for v in value)
        return np.asarray(value, dtype=np.float64)

    return cast(params), cast(xs), cast(state), cast(d_hs), cast(d_state)


@pytest.mark.parametrize("mode", MODES)
@given(case=cases(dtype="float16"), data=st.data())
def test_float16_stays_finite_for_any_finite_input(mode, case, data):
    """Up to float16's largest finite value 65504: nothing overflows and nothing is NaN."""
    a = dataclasses.replace(case, integration_mode=mode).arrays()
    big = st.floats(-65504, 65504, width=16, allow_subnormal=False) | st.sampled_from([-65504.0, 65504.0])
    xs = data.draw(hnp.arrays(np.float16, a.xs.shape, elements=big), label="xs")
    batch_shape = a.xs.shape[:-2]
    state = (data.draw(hnp.arrays(np.float16, batch_shape + (case.output_size,),
                                  elements=st.floats(-1, 1, width=16)), label="h0"),
             data.draw(hnp.arrays(np.float16, batch_shape + (case.hidden_size,),
                                  elements=st.floats(-100, 100, width=16)), label="c0"))
    with _no_floating_point_trouble():
        hs, (h_T, c_T) = mlstm_spec.forward(a.params, xs, state, integration_mode=mode, **case.runtime)
        h_1, (_, c_1) = mlstm_spec.cell(a.params, xs[..., 0, :], state, integration_mode=mode, **case.runtime)
    for what, value in [("hs", hs), ("h_T", h_T), ("c_T", c_T), ("cell h", h_1), ("cell c", c_1)]:
        assert value.dtype == np.float16, f"{what} is {value.dtype}"
        assert np.all(np.isfinite(value)), f"{what} is not finite [{case}]"
    assert np.all(np.abs(hs) <= output_bound(case, a.params))
    if case.cell_clip is not None:
        assert np.all(np.abs(c_T) <= np.float16(case.cell_clip))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@given(case=cases())
def test_lower_precision_keeps_its_dtype_and_agrees_with_float64(dtype, case):
    """The spec in float16/float32 against itself in float64 on the same (rounded) inputs, within the
    project's tolerance for that dtype."""
    low = dataclasses.replace(case, dtype=dtype).arrays()
    as64 = lambda v: None if v is None else (  # noqa: E731
        tuple(s.astype(np.float64) for s in v) if isinstance(v, tuple) else v.astype(np.float64))
    params64 = {k: v.astype(np.float64) for k, v in low.params.items()}
    mode = case.integration_mode
    with _no_floating_point_trouble():
        hs, (h_T, c_T) = mlstm_spec.forward(low.params, low.xs, low.state, integration_mode=mode,
                                            **case.runtime)
        h_1, (_, c_1) = mlstm_spec.cell(low.params, low.xs[..., 0, :], low.state, integration_mode=mode,
                                        **case.runtime)
    ref_hs, (ref_h, ref_c) = mlstm_spec.forward(params64, as64(low.xs), as64(low.state),
                                                integration_mode=mode, **case.runtime)
    for what, value, ref in [("hs", hs, ref_hs), ("h_T", h_T, ref_h), ("c_T", c_T, ref_c),
                             ("cell h", h_1, ref_hs[..., 0, :])]:
        assert value.dtype == np.dtype(dtype), f"{what} is {value.dtype}, not {dtype}"
        assert_close(value, ref, tolerance(dtype), what, case)
    assert c_1.dtype == np.dtype(dtype)


def test_a_nan_in_one_batch_row_stays_in_that_row():
    a = Case(batch=3, steps=4, input_size=2, hidden_size=3, seed=8).arrays()
    xs = a.xs.copy()
    xs[1, 2, 0] = np.nan
    hs, (h_T, c_T) = mlstm_spec.forward(a.params, xs, a.state)
    clean, (clean_h, clean_c) = mlstm_spec.forward(a.params, a.xs, a.state)
    assert np.all(np.isnan(hs[1, 2:])) and np.all(np.isnan(c_T[1])), "NaN must propagate, not vanish"
    np.testing.assert_array_equal(hs[1, :2], clean[1, :2])
    for row in (0, 2):
        np.testing.assert_array_equal(hs[row], clean[row])
        np.testing.assert_array_equal(c_T[row], clean_c[row])
    grads = mlstm_spec.backward(a.params, xs, a.state, a.d_hs, a.d_state)
    clean_grads = mlstm_spec.backward(a.params, a.xs, a.state, a.d_hs, a.d_state)
    for row in (0, 2):
        np.testing.assert_array_equal(grads["x"][row], clean_grads["x"][row])
        np.testing.assert_array_equal(grads["h0"][row], clean_grads["h0"][row])


# ---- vectorised: the only Python loop is over time ----

def test_the_only_python_loops_of_the_equations_run_over_time():
    """Batch rows and units are handled by array operations; a ``for`` statement in
    mlstm_spec/equations.py may only walk the steps (``range(T)`` or ``reversed(range(T))``)."""
    tree = ast.parse(inspect.getsource(equations))
    loops = [node for node in ast.walk(tree) if isinstance(node, (ast.For, ast.While, ast.AsyncFor))]
    assert loops, "expected the time loops"
    for loop in loops:
        assert isinstance(loop, ast.For), f"line {loop.lineno}: a while loop"
        source = ast.unparse(loop.iter)
        assert source in ("range(T)", "reversed(range(T))"), f"line {loop.lineno}: loops over {source}"


# ---- the logistic function ----

def test_sigmoid_is_the_logistic_function_without_overflow():
    a = np.linspace(-30, 30, 601)  # exp(30) is far from overflow, so the plain formula is exact here
    np.testing.assert_allclose(mlstm_spec.sigmoid(a), 1 / (1 + np.exp(-a)), rtol=1e-15, atol=0)
    np.testing.assert_allclose(mlstm_spec.sigmoid(-a), 1 - mlstm_spec.sigmoid(a), rtol=0, atol=1e-15)
    for dtype, largest in [("float16", 65504.0), ("float32", 1e4), ("float64", 1e4)]:
        extremes = np.array([-largest, -1e3, 0.0, 1e3, largest], dtype=dtype)
        with _no_floating_point_trouble():
            value = mlstm_spec.sigmoid(extremes)
        assert value.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(value, np.array([0, 0, 0.5, 1, 1], dtype=dtype))


@pytest.mark.parametrize("bias, recurrent_bias, multiplicative_bias, learns", [
    (True, True, True, True),      # the defaults: biases present (zero), bias_hh and bias_mh get gradients
    (False, False, True, True),    # bias_mh alone: q_z = bias_mh, so d a_z / d bias_mh = p_z
    (True, False, False, False),   # bias_ih alone is inside the product with q = 0: nothing moves
    (False, False, False, False),  # no bias at all
])
def test_multiplicative_integration_from_zero_state_and_zero_biases_stays_at_zero(
        bias, recurrent_bias, multiplicative_bias, learns):
    """What docs/equations.md says of the defaults under multiplicative integration: with the biases at
    their initial zeros and a zero initial state, r = 0, so m = 0 and every gate pre-activation
    p * q is 0: every output is exactly 0. Only bias_hh and bias_mh can then receive a gradient, so
    without both the layer cannot leave that point (under addition it can: a = p + q = p)."""
    rng = np.random.default_rng(5)
    params = mlstm_spec.init_params(3, 4, rng=rng, dtype=np.float64, bias=bias, recurrent_bias=recurrent_bias,
                                    multiplicative_bias=multiplicative_bias)
    xs = rng.standard_normal((2, 5, 3))
    zeros = np.zeros((2, 4))
    hs, _ = mlstm_spec.forward(params, xs, integration_mode="multiplicative_integration")
    np.testing.assert_array_equal(hs, 0.0)
    d_hs = rng.standard_normal(hs.shape)
    grads = mlstm_spec.backward(params, xs, (zeros, zeros), d_hs, integration_mode="multiplicative_integration")
    moved = {name for name in params if np.any(grads[name] != 0)}
    assert moved == ({"bias_hh", "bias_mh"} & set(params) if learns else set())
    hs_addition, _ = mlstm_spec.forward(params, xs)
    assert np.all(np.abs(hs_addition[:, 0]) > 0)
