"""``init_params`` (Glorot default, orthogonal and forget-bias options, the projection and peephole
variants), the layout helpers, and the promise that ``import mlstm_spec`` loads no deep-learning
framework."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlstm_spec

# spec-facts.md section 1, written out here so the tests do not read the code's own constants.
FACTS_IH_ORDER = ("m", "i", "o", "f", "z")
FACTS_MH_ORDER = ("i", "o", "f", "z")
WEIGHTS = ("weight_ih", "weight_hh", "weight_mh")
BIAS_KEYS = {"bias": "bias_ih", "recurrent_bias": "bias_hh", "multiplicative_bias": "bias_mh"}
REPO = Path(__file__).resolve().parents[1]


def rows(array, order, gate):
    size = array.shape[0] // len(order)
    k = order.index(gate)
    return array[k * size:(k + 1) * size]


def assert_same_params(first, second):
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


# ---- what init_params returns ----

def test_defaults_follow_recurrent_layers_jl():
    params = mlstm_spec.init_params(3, 4, rng=0)
    assert set(params) == set(WEIGHTS) | set(BIAS_KEYS.values())
    shapes = {"weight_ih": (20, 3), "weight_hh": (4, 4), "weight_mh": (16, 4),
              "bias_ih": (20,), "bias_hh": (4,), "bias_mh": (16,)}
    assert {k: v.shape for k, v in params.items()} == shapes
    assert all(v.dtype == np.float32 for v in params.values())  # Flux draws Float32 by default
    for name in BIAS_KEYS.values():
        np.testing.assert_array_equal(params[name], 0, err_msg=f"{name} must start at zero")
    # glorot_uniform and no forget-gate offset are the defaults, not merely available
    assert_same_params(params, mlstm_spec.init_params(3, 4, rng=0, weight_init="glorot_uniform",
                                                      forget_bias_init=0.0, unit_forget_bias=False,
                                                      proj_size=0, peepholes=False))


@pytest.mark.parametrize("flags", list(itertools.product((False, True), repeat=3)),
                         ids=lambda f: "".join("01"[b] for b in f))
def test_each_bias_flag_adds_or_leaves_out_its_key(flags):
    options = dict(zip(BIAS_KEYS, flags))
    params = mlstm_spec.init_params(2, 3, rng=1, **options)
    expected = set(WEIGHTS) | {BIAS_KEYS[flag] for flag, on in options.items() if on}
    assert set(params) == expected
    info = mlstm_spec.check_params(params)
    assert info.options == options | {"independent_recurrence": False}


def test_independent_recurrence_makes_weight_hh_a_vector():
    params = mlstm_spec.init_params(2, 5, rng=1, independent_recurrence=True)
    assert params["weight_hh"].shape == (5,)
    assert mlstm_spec.check_params(params).independent_recurrence


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, "float64"])
def test_the_requested_dtype_is_used_for_every_array(dtype):
    params = mlstm_spec.init_params(2, 3, rng=0, dtype=dtype)
    assert {v.dtype for v in params.values()} == {np.dtype(dtype)}


def test_an_int_seed_is_reproducible_and_a_generator_is_used_as_given():
    assert_same_params(mlstm_spec.init_params(4, 3, rng=7), mlstm_spec.init_params(4, 3, rng=7))
    assert_same_params(mlstm_spec.init_params(4, 3, rng=7),
                       mlstm_spec.init_params(4, 3, rng=np.random.default_rng(7)))
    assert not np.array_equal(mlstm_spec.init_params(4, 3, rng=7)["weight_ih"],
                              mlstm_spec.init_params(4, 3, rng=8)["weight_ih"])
    generator = np.random.default_rng(3)
    first, second = (mlstm_spec.init_params(4, 3, rng=generator) for _ in range(2))
    assert not np.array_equal(first["weight_ih"], second["weight_ih"]), "the generator must advance"
    unseeded = [mlstm_spec.init_params(4, 3)["weight_mh"] for _ in range(2)]
    assert not np.array_equal(*unseeded), "rng=None must draw fresh values"


# ---- Glorot uniform over each whole stacked matrix ----

def glorot_limit(fan_in, fan_out):
    return np.sqrt(6.0 / (fan_in + fan_out))


@pytest.mark.parametrize("independent", [False, True], ids=["matrix_hh", "vector_hh"])
def test_glorot_bounds_cover_each_whole_stacked_matrix(independent):
    I, H = 40, 30 if not independent else 300
    params = mlstm_spec.init_params(I, H, rng=2, dtype=np.float64, independent_recurrence=independent)
    limits = {
        "weight_ih": glorot_limit(I, 5 * H),  # fan_out = 5H: the stacked matrix, not one block
        "weight_mh": glorot_limit(H, 4 * H),
        "weight_hh": glorot_limit(1, H) if independent else glorot_limit(H, H),  # a vector is H x 1
    }
    for name, limit in limits.items():
        values = params[name]
        # A per-block draw would use the larger sqrt(6 / (fan_in + H)) and break the first bound;
        # a too-small scale would break the second; the variance of U(-a, a) is a^2 / 3.
        assert np.abs(values).max() <= limit, f"{name} exceeds the Glorot bound {limit}"
        assert np.abs(values).max() >= 0.95 * limit, f"{name} stays far inside {limit}"
        assert abs(values.var() / (limit**2 / 3) - 1) < 0.15, f"{name} is not uniform on the bound"
        assert abs(values.mean()) < 0.1 * limit


def test_glorot_uniform_helper_uses_the_vector_rule():
    rng = np.random.default_rng(0)
    vector = mlstm_spec.glorot_uniform(rng, (500,))
    assert vector.shape == (500,)
    assert np.abs(vector).max() <= glorot_limit(1, 500)
    assert np.abs(vector).max() >= 0.95 * glorot_limit(1, 500)


# ---- the documented options: orthogonal weights, forget-gate bias ----

@pytest.mark.parametrize("I, H", [(3, 5), (7, 4), (4, 4)])
def test_orthogonal_option_draws_each_gate_block_orthogonal(I, H):
    params = mlstm_spec.init_params(I, H, rng=5, dtype=np.float64, weight_init="orthogonal")
    blocks = [rows(params["weight_ih"], FACTS_IH_ORDER, g) for g in FACTS_IH_ORDER]
    blocks += [rows(params["weight_mh"], FACTS_MH_ORDER, g) for g in FACTS_MH_ORDER]
    blocks += [params["weight_hh"]]
    for block in blocks:
        small = min(block.shape)
        gram = block.T @ block if block.shape[0] >= block.shape[1] else block @ block.T
        np.testing.assert_allclose(gram, np.eye(small), atol=1e-12)
    for name in BIAS_KEYS.values():
        np.testing.assert_array_equal(params[name], 0)
    vector = mlstm_spec.init_params(I, H, rng=5, weight_init="orthogonal", independent_recurrence=True)
    np.testing.assert_array_equal(np.abs(vector["weight_hh"]), 1)  # the diagonal of an orthogonal matrix


@pytest.mark.parametrize("options, value", [(dict(forget_bias_init=3.0), 3.0),
                                            (dict(unit_forget_bias=True), 1.0)],
                         ids=["forget_bias_init", "unit_forget_bias"])
def test_initial_forget_bias_sets_only_the_forget_block_of_bias_ih(options, value):
    plain = mlstm_spec.init_params(3, 4, rng=9, dtype=np.float64)
    offset = mlstm_spec.init_params(3, 4, rng=9, dtype=np.float64, **options)
    for name in WEIGHTS:
        np.testing.assert_array_equal(offset[name], plain[name], err_msg=name)
    for gate in FACTS_IH_ORDER:
        np.testing.assert_array_equal(rows(offset["bias_ih"], FACTS_IH_ORDER, gate),
                                      value if gate == "f" else 0.0, err_msg=gate)
    np.testing.assert_array_equal(offset["bias_mh"], 0)
    np.testing.assert_array_equal(offset["bias_hh"], 0)


# ---- the variants' parameters ----

@pytest.mark.parametrize("weight_init", ["glorot_uniform", "orthogonal"])
def test_proj_size_adds_weight_hr_and_narrows_weight_hh(weight_init):
    I, H, P = 3, 6, 2
    params = mlstm_spec.init_params(I, H, rng=4, dtype=np.float64, proj_size=P, weight_init=weight_init)
    assert params["weight_hr"].shape == (P, H) and params["weight_hh"].shape == (H, P)
    assert params["weight_mh"].shape == (4 * H, H), "m is H wide whatever P is"
    info = mlstm_spec.check_params(params)
    assert (info.proj_size, info.output_size, info.hidden_size) == (P, P, H)
    plain = mlstm_spec.init_params(I, H, rng=4, dtype=np.float64, weight_init=weight_init)
    np.testing.assert_array_equal(params["weight_ih"], plain["weight_ih"])  # drawn first, unchanged
    if weight_init == "orthogonal":
        np.testing.assert_allclose(params["weight_hr"] @ params["weight_hr"].T, np.eye(P), atol=1e-12)
    else:
        limit = glorot_limit(H, P)
        assert np.abs(params["weight_hr"]).max() <= limit


def test_peepholes_add_three_vectors_drawn_after_the_weights():
    I, H = 3, 400
    params = mlstm_spec.init_params(I, H, rng=6, dtype=np.float64, peepholes=True)
    plain = mlstm_spec.init_params(I, H, rng=6, dtype=np.float64)
    assert set(params) == set(plain) | {"weight_ci", "weight_cf", "weight_co"}
    for name in plain:  # the variants come after every draw of the plain layer
        np.testing.assert_array_equal(params[name], plain[name], err_msg=name)
    limit = glorot_limit(1, H)  # the vector rule: an H x 1 matrix
    for name in ("weight_ci", "weight_cf", "weight_co"):
        assert params[name].shape == (H,)
        assert 0.9 * limit <= np.abs(params[name]).max() <= limit, name
    assert not np.array_equal(params["weight_ci"], params["weight_cf"])
    assert mlstm_spec.check_params(params).peepholes


def test_layer_options_name_the_variants_only_when_they_are_on():
    plain = mlstm_spec.check_params(mlstm_spec.init_params(3, 4, rng=0))
    assert set(plain.options) == {"bias", "recurrent_bias", "multiplicative_bias", "independent_recurrence"}
    params = mlstm_spec.init_params(3, 4, rng=0, proj_size=3, peepholes=True, bias=False)
    options = mlstm_spec.check_params(params).options
    assert options == dict(bias=False, recurrent_bias=True, multiplicative_bias=True,
                           independent_recurrence=False, proj_size=3, peepholes=True)
    again = mlstm_spec.init_params(3, 4, rng=1, **options)
    assert {k: v.shape for k, v in again.items()} == {k: v.shape for k, v in params.items()}


def test_a_stack_with_a_projection_feeds_p_wide_outputs_to_the_next_layer():
    first = mlstm_spec.init_params(3, 5, rng=0, proj_size=2)
    second = mlstm_spec.init_params(2, 5, rng=1, proj_size=2)
    infos = mlstm_spec.check_stack([first, second])
    assert [info.input_size for info in infos] == [3, 2]
    with pytest.raises(ValueError, match=r"params\[1\] must take input_size = proj_size of layer 0 \(2\)"):
        mlstm_spec.check_stack([first, mlstm_spec.init_params(5, 5, rng=1, proj_size=2)])


def test_block_helper_selects_the_rows_of_a_gate():
    weight_ih = np.arange(5 * 2 * 3).reshape(10, 3)
    np.testing.assert_array_equal(mlstm_spec.block(weight_ih, "f"), weight_ih[6:8])
    bias_mh = np.arange(8)
    np.testing.assert_array_equal(mlstm_spec.block(bias_mh, "z", mlstm_spec.MH_BLOCKS), bias_mh[6:8])


# ---- layouts ----

def test_time_major_and_batch_major_are_inverse_transpositions():
    xs = np.arange(2 * 3 * 4, dtype=float).reshape(2, 3, 4)
    time_major = mlstm_spec.to_time_major(xs)
    assert time_major.shape == (3, 2, 4)
    for b, t in itertools.product(range(2), range(3)):
        np.testing.assert_array_equal(time_major[t, b], xs[b, t])
    np.testing.assert_array_equal(mlstm_spec.to_batch_major(time_major), xs)
    np.testing.assert_array_equal(mlstm_spec.to_time_major(xs[:, :, 0]), xs[:, :, 0].T)


def julia_array(shape):
    """A Julia-shaped array filled by logical index: value 100*i + 10*t + b at Julia [i, t, b]
    (zero-based here), as a Julia program would write it element by element."""
    out = np.empty(shape)
    for index in np.ndindex(shape):
        out[index] = sum(v * 10 ** (2 - k) for k, v in enumerate(index))
    return out


def test_julia_feature_first_arrays_map_to_batch_major_by_logical_index():
    I, T, B = 3, 4, 2
    julia = julia_array((I, T, B))
    numpy = mlstm_spec.from_julia_sequence(julia)
    assert numpy.shape == (B, T, I)
    for i, t, b in itertools.product(range(I), range(T), range(B)):
        assert numpy[b, t, i] == julia[i, t, b]
    # Julia keeps (I, T, B) column-major: its memory is the C-order memory of NumPy's (B, T, I).
    np.testing.assert_array_equal(julia.ravel(order="F"), numpy.ravel(order="C"))
    assert numpy.flags.c_contiguous
    np.testing.assert_array_equal(mlstm_spec.to_julia_sequence(numpy), julia)
    # unbatched (I, T) -> (T, I), and a Julia state (H, B) -> (B, H)
    np.testing.assert_array_equal(mlstm_spec.from_julia_sequence(julia[:, :, 0]), numpy[0])
    state = julia_array((5, B))
    np.testing.assert_array_equal(mlstm_spec.from_julia_sequence(state), state.T)


def test_forward_on_converted_layouts_agrees():
    params = mlstm_spec.init_params(3, 2, rng=0, dtype=np.float64)
    xs = np.random.default_rng(1).standard_normal((2, 5, 3))
    hs, _ = mlstm_spec.forward(params, xs)
    round_trip = mlstm_spec.to_batch_major(mlstm_spec.to_time_major(xs))
    from_time_major, _ = mlstm_spec.forward(params, round_trip)
    from_julia, _ = mlstm_spec.forward(
        params, mlstm_spec.from_julia_sequence(mlstm_spec.to_julia_sequence(xs)))
    np.testing.assert_array_equal(from_time_major, hs)
    np.testing.assert_array_equal(from_julia, hs)


# ---- imports ----

FRAMEWORKS = ("torch", "jax", "jaxlib", "tensorflow", "keras", "tf_keras", "flax", "equinox", "optax",
              "torchrecurrent", "triton", "cupy")


def imported_after(statement):
    code = (f"import sys; {statement}; "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_import_mlstm_spec_loads_no_deep_learning_framework():
    loaded = imported_after("import mlstm_spec")
    assert "mlstm_spec" in loaded and "numpy" in loaded
    assert not loaded & set(FRAMEWORKS), f"import mlstm_spec imported {sorted(loaded & set(FRAMEWORKS))}"


def test_import_mlstm_spec_needs_nothing_but_numpy():
    loaded = imported_after("import mlstm_spec")
    baseline = imported_after("import numpy")
    extra = {m for m in loaded - baseline - set(sys.stdlib_module_names) if not m.startswith("_")}
    assert extra == {"mlstm_spec"}, f"import mlstm_spec also imported {sorted(extra - {'mlstm_spec'})}"
