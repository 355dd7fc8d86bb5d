"""Every public function of ``mlstm_spec`` rejects bad input with a ``ValueError`` (shapes, sizes,
values) or ``TypeError`` (types, dtypes) whose message names the argument, what was expected and
what was given.

Each case below starts from valid arguments (checked to run), breaks one thing, and lists the
exception type and the fragments its message must contain: ``(argument, expected, given)``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import mlstm_spec

B, T, I, H = 4, 5, 3, 2
FUNCTIONS = ("cell", "forward", "backward")
INPUT_NAME = {"cell": "x", "forward": "xs", "backward": "xs"}
DTYPES_TEXT = "'float16', 'float32', 'float64'"
MODES_TEXT = "'addition', 'multiplicative_integration'"


def valid_arguments(function):
    rng = np.random.default_rng(0)
    params = {
        "weight_ih": rng.uniform(-1, 1, (5 * H, I)), "weight_hh": rng.uniform(-1, 1, (H, H)),
        "weight_mh": rng.uniform(-1, 1, (4 * H, H)), "bias_ih": rng.uniform(-1, 1, 5 * H),
        "bias_hh": rng.uniform(-1, 1, H), "bias_mh": rng.uniform(-1, 1, 4 * H),
    }
    return dict(
        params=params,
        input=rng.standard_normal((B, I) if function == "cell" else (B, T, I)),
        state=(rng.uniform(-1, 1, (B, H)), rng.uniform(-1, 1, (B, H))),
        d_hs=rng.standard_normal((B, T, H)),
        d_state=(rng.standard_normal((B, H)), rng.standard_normal((B, H))),
        integration_mode="addition",
    )


def invoke(function, a):
    options = dict(integration_mode=a["integration_mode"], **a.get("runtime", {}))
    if function == "cell":
        return mlstm_spec.cell(a["params"], a["input"], a["state"], **options)
    if function == "forward":
        return mlstm_spec.forward(a["params"], a["input"], a["state"], **options)
    return mlstm_spec.backward(a["params"], a["input"], a["state"], a["d_hs"], a["d_state"], **options)


def assert_raises_naming(error_type, fragments, call):
    __tracebackhide__ = True
    with pytest.raises(error_type) as info:
        call()
    message = str(info.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"message {message!r} does not mention {missing}"
    return message


@pytest.mark.parametrize("function", FUNCTIONS)
def test_the_valid_arguments_are_accepted(function):
    invoke(function, valid_arguments(function))
    arguments = valid_arguments(function)
    with_projection(arguments, function)
    for name in ("weight_ci", "weight_cf", "weight_co"):
        arguments["params"][name] = np.zeros(H)
    arguments["runtime"] = dict(cell_clip=2, proj_clip=np.float32(0.5), forget_bias=-1)
    invoke(function, arguments)


# ---- cases shared by cell, forward and backward: (mutate(args, function) -> (type, fragments)) ----

def rank_too_high(a, function):
    a["input"] = a["input"][None]
    expected = "(B, I) or (I,)" if function == "cell" else "(B, T, I) or (T, I)"
    return ValueError, [INPUT_NAME[function], expected, str(a["input"].shape)]


def rank_too_low(a, function):
    a["input"] = a["input"][0, 0, ...]  # a 0-d array for cell, (I,) for forward
    expected = "(B, I) or (I,)" if function == "cell" else "(B, T, I) or (T, I)"
    return ValueError, [INPUT_NAME[function], expected, str(a["input"].shape)]


def input_features_differ_from_params(a, function):
    a["input"] = a["input"][..., :2]
    return ValueError, [INPUT_NAME[function], f"I={I}", str(a["input"].shape)]


def input_without_rows(a, function):
    a["input"] = a["input"][:0]
    return ValueError, [INPUT_NAME[function], str(a["input"].shape)]


def input_of_integers(a, function):
    a["input"] = a["input"].astype(np.int64)
    return TypeError, [INPUT_NAME[function], DTYPES_TEXT, "int64"]


def input_of_booleans(a, function):
    a["input"] = a["input"] > 0
    return TypeError, [INPUT_NAME[function], DTYPES_TEXT, "bool"]


def input_dtype_differs_from_params(a, function):
    a["input"] = a["input"].astype(np.float32)
    return TypeError, [INPUT_NAME[function], "float32", "float64"]


def input_is_a_list(a, function):
    a["input"] = a["input"].tolist()
    return TypeError, [INPUT_NAME[function], "numpy.ndarray", "list"]


def state_of_wrong_hidden_size(a, function):
    a["state"] = (np.zeros((B, H + 1)), a["state"][1])
    return ValueError, ["state h", str((B, H)), str((B, H + 1))]


def state_of_wrong_batch(a, function):
    a["state"] = (a["state"][0], np.zeros((B - 1, H)))
    return ValueError, ["state c", str((B, H)), str((B - 1, H))]


def unbatched_state_for_batched_input(a, function):
    a["state"] = (a["state"][0][0], a["state"][1][0])
    return ValueError, ["state h", str((B, H)), str((H,))]


def state_dtype_differs_from_params(a, function):
    a["state"] = (a["state"][0], a["state"][1].astype(np.float16))
    return TypeError, ["state c", "float16", "float64"]


def state_of_integers(a, function):
    a["state"] = (a["state"][0].astype(np.int32), a["state"][1])
    return TypeError, ["state h", DTYPES_TEXT, "int32"]


def state_not_a_pair(a, function):
    a["state"] = (a["state"][0],)
    return TypeError, ["state", "pair (h, c)", "tuple of length 1"]


def state_stacked_in_one_array(a, function):
    a["state"] = np.stack(a["state"])
    return TypeError, ["state", "pair (h, c)", "ndarray"]


def state_of_lists(a, function):
    a["state"] = (a["state"][0].tolist(), a["state"][1])
    return TypeError, ["state h", "numpy.ndarray", "list"]


def params_not_a_mapping(a, function):
    a["params"] = list(a["params"].values())
    return TypeError, ["params", "mapping", "list"]


def params_with_unknown_key(a, function):
    a["params"]["bias_hx"] = a["params"]["bias_hh"]
    return ValueError, ["params", "'bias_hx'", "'weight_ih', 'weight_hh', 'weight_mh'"]


def params_missing_a_weight(a, function):
    del a["params"]["weight_mh"]
    return ValueError, ["params", "missing", "weight_mh"]


def weight_mh_transposed(a, function):
    a["params"]["weight_mh"] = a["params"]["weight_mh"].T
    return ValueError, ["params['weight_mh']", "4H", str((4 * H, H)), str((H, 4 * H))]


def weight_mh_of_five_blocks(a, function):
    a["params"]["weight_mh"] = np.zeros((5 * H, H))
    return ValueError, ["params['weight_mh']", str((4 * H, H)), str((5 * H, H))]


def weight_hh_of_wrong_size(a, function):
    a["params"]["weight_hh"] = np.zeros((H + 1, H + 1))
    return ValueError, ["params['weight_hh']", str((H, H)), str((H + 1, H + 1))]


def weight_hh_vector_of_wrong_length(a, function):
    a["params"]["weight_hh"] = np.zeros(H + 1)
    return ValueError, ["params['weight_hh']", str((H,)), str((H + 1,))]


def weight_hh_of_rank_three(a, function):
    a["params"]["weight_hh"] = np.zeros((H, H, 1))
    return ValueError, ["params['weight_hh']", str((H, H)), str((H, H, 1))]


def weight_ih_not_five_blocks(a, function):
    a["params"]["weight_ih"] = np.zeros((5 * H + 1, I))
    return ValueError, ["params['weight_ih']", "(5H, I)", str((5 * H + 1, I))]


def bias_ih_of_wrong_length(a, function):
    a["params"]["bias_ih"] = np.zeros(4 * H)
    return ValueError, ["params['bias_ih']", str((5 * H,)), str((4 * H,))]


def bias_hh_of_wrong_length(a, function):
    a["params"]["bias_hh"] = np.zeros(H + 1)
    return ValueError, ["params['bias_hh']", str((H,)), str((H + 1,))]


def bias_mh_of_wrong_length(a, function):
    a["params"]["bias_mh"] = np.zeros(5 * H)
    return ValueError, ["params['bias_mh']", str((4 * H,)), str((5 * H,))]


def bias_mh_as_a_matrix(a, function):
    a["params"]["bias_mh"] = a["params"]["bias_mh"][:, None]
    return ValueError, ["params['bias_mh']", str((4 * H,)), str((4 * H, 1))]


def params_of_mixed_dtypes(a, function):
    a["params"]["bias_hh"] = a["params"]["bias_hh"].astype(np.float32)
    return TypeError, ["params", "one dtype", "'bias_hh': 'float32'", "'weight_ih': 'float64'"]


def params_of_integers(a, function):
    a["params"] = {k: v.astype(np.int64) for k, v in a["params"].items()}
    return TypeError, ["params['weight_ih']", DTYPES_TEXT, "int64"]


def param_given_as_a_list(a, function):
    a["params"]["bias_ih"] = a["params"]["bias_ih"].tolist()
    return TypeError, ["params['bias_ih']", "numpy.ndarray", "list"]


def unknown_integration_mode(a, function):
    a["integration_mode"] = "multiplicative"
    return ValueError, ["integration_mode", MODES_TEXT, "'multiplicative'"]


def julia_symbol_as_integration_mode(a, function):
    a["integration_mode"] = ":addition"
    return ValueError, ["integration_mode", MODES_TEXT, "':addition'"]


def integration_mode_none(a, function):
    a["integration_mode"] = None
    return ValueError, ["integration_mode", MODES_TEXT, "None"]


def cell_clip_zero(a, function):
    a["runtime"] = dict(cell_clip=0.0)
    return ValueError, ["cell_clip", "None or a finite number > 0", "0.0"]


def cell_clip_negative(a, function):
    a["runtime"] = dict(cell_clip=-1)
    return ValueError, ["cell_clip", "> 0", "-1"]


def cell_clip_nan(a, function):
    a["runtime"] = dict(cell_clip=float("nan"))
    return ValueError, ["cell_clip", "finite", "nan"]


def cell_clip_a_string(a, function):
    a["runtime"] = dict(cell_clip="0.5")
    return TypeError, ["cell_clip", "None or a finite number > 0", "'0.5'"]


def cell_clip_true(a, function):
    a["runtime"] = dict(cell_clip=True)
    return TypeError, ["cell_clip", "bool", "True"]


def proj_clip_without_projection(a, function):
    a["runtime"] = dict(proj_clip=0.5)
    return ValueError, ["proj_clip=0.5", "no projection", "weight_hr"]


def proj_clip_infinite(a, function):
    with_projection(a, function)
    a["runtime"] = dict(proj_clip=float("inf"))
    return ValueError, ["proj_clip", "finite number > 0", "inf"]


def forget_bias_none(a, function):
    a["runtime"] = dict(forget_bias=None)
    return TypeError, ["forget_bias", "a finite number", "None"]


def forget_bias_an_array(a, function):
    a["runtime"] = dict(forget_bias=np.ones(H))
    return TypeError, ["forget_bias", "a finite number", "ndarray"]


def forget_bias_infinite(a, function):
    a["runtime"] = dict(forget_bias=-float("inf"))
    return ValueError, ["forget_bias", "a finite number", "-inf"]


def with_projection(a, function, P=1):
    """Valid arguments for a projection of size P (h is P wide)."""
    rng = np.random.default_rng(1)
    a["params"]["weight_hr"] = rng.uniform(-1, 1, (P, H))
    a["params"]["weight_hh"] = rng.uniform(-1, 1, (H, P))
    a["state"] = (a["state"][0][:, :P], a["state"][1])
    a["d_hs"] = a["d_hs"][..., :P]
    a["d_state"] = (a["d_state"][0][:, :P], a["d_state"][1])


def weight_hr_as_wide_as_h(a, function):
    with_projection(a, function)
    a["params"]["weight_hr"] = np.zeros((H, H))
    return ValueError, ["params['weight_hr']", f"(P, H) with 1 <= P < H = {H}", str((H, H))]


def weight_hr_transposed(a, function):
    with_projection(a, function)
    a["params"]["weight_hr"] = np.zeros((H, 1))
    return ValueError, ["params['weight_hr']", "(P, H)", str((H, 1))]


def weight_hr_a_vector(a, function):
    with_projection(a, function)
    a["params"]["weight_hr"] = np.zeros(H)
    return ValueError, ["params['weight_hr']", "(P, H)", str((H,))]


def weight_hh_square_with_a_projection(a, function):
    with_projection(a, function)
    a["params"]["weight_hh"] = np.zeros((H, H))
    return ValueError, ["params['weight_hh']", "(H,P)", str((H, 1)), "P=1", str((H, H))]


def projection_with_independent_recurrence(a, function):
    with_projection(a, function)
    a["params"]["weight_hh"] = np.zeros(H)
    return ValueError, ["weight_hh", "independent recurrence", "weight_hr", "cannot be combined"]


def state_h_hidden_wide_with_a_projection(a, function):
    with_projection(a, function)
    a["state"] = (np.zeros((B, H)), a["state"][1])
    return ValueError, ["state h", str((B, 1)), "P wide", str((B, H))]


def state_c_projection_wide(a, function):
    with_projection(a, function)
    a["state"] = (a["state"][0], np.zeros((B, 1)))
    return ValueError, ["state c", str((B, H)), str((B, 1))]


def peepholes_incomplete(a, function):
    a["params"]["weight_ci"] = np.zeros(H)
    a["params"]["weight_co"] = np.zeros(H)
    return ValueError, ["'weight_ci', 'weight_co'", "['weight_cf']", "all three"]


def peephole_of_wrong_length(a, function):
    for name in ("weight_ci", "weight_cf", "weight_co"):
        a["params"][name] = np.zeros(H)
    a["params"]["weight_cf"] = np.zeros(H + 1)
    return ValueError, ["params['weight_cf']", str((H,)), str((H + 1,))]


SHARED_CASES = [
    rank_too_high, rank_too_low, input_features_differ_from_params, input_without_rows,
    input_of_integers, input_of_booleans, input_dtype_differs_from_params, input_is_a_list,
    state_of_wrong_hidden_size, state_of_wrong_batch, unbatched_state_for_batched_input,
    state_dtype_differs_from_params, state_of_integers, state_not_a_pair, state_stacked_in_one_array,
    state_of_lists, params_not_a_mapping, params_with_unknown_key, params_missing_a_weight,
    weight_mh_transposed, weight_mh_of_five_blocks, weight_hh_of_wrong_size,
    weight_hh_vector_of_wrong_length, weight_hh_of_rank_three, weight_ih_not_five_blocks,
    bias_ih_of_wrong_length, bias_hh_of_wrong_length, bias_mh_of_wrong_length, bias_mh_as_a_matrix,
    params_of_mixed_dtypes, params_of_integers, param_given_as_a_list, unknown_integration_mode,
    julia_symbol_as_integration_mode, integration_mode_none,
    # the variants
    cell_clip_zero, cell_clip_negative, cell_clip_nan, cell_clip_a_string, cell_clip_true,
    proj_clip_without_projection, proj_clip_infinite, forget_bias_none, forget_bias_an_array,
    forget_bias_infinite, weight_hr_as_wide_as_h, weight_hr_transposed, weight_hr_a_vector,
    weight_hh_square_with_a_projection, projection_with_independent_recurrence,
    state_h_hidden_wide_with_a_projection, state_c_projection_wide, peepholes_incomplete,
    peephole_of_wrong_length,
]


@pytest.mark.parametrize("mutate", SHARED_CASES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("function", FUNCTIONS)
def test_bad_arguments_are_rejected_with_a_message_naming_them(function, mutate):
    arguments = valid_arguments(function)
    error_type, fragments = mutate(arguments, function)
    assert_raises_naming(error_type, fragments, lambda: invoke(function, arguments))


def test_unbatched_input_wants_an_unbatched_state():
    a = valid_arguments("forward")
    a["input"] = a["input"][0]
    invoke("forward", dict(a, state=(a["state"][0][0], a["state"][1][0])))  # (T, I) with (H,): fine
    assert_raises_naming(ValueError, ["state h", str((H,)), str((B, H))], lambda: invoke("forward", a))


# ---- backward's own arguments ----

def d_hs_of_wrong_shape(a):
    a["d_hs"] = np.zeros((B, T, H + 1))
    return ValueError, ["d_hs", str((B, T, H)), str((B, T, H + 1))]


def d_hs_time_major(a):
    a["d_hs"] = np.zeros((T, B, H))
    return ValueError, ["d_hs", str((B, T, H)), str((T, B, H))]


def d_hs_dtype_differs(a):
    a["d_hs"] = a["d_hs"].astype(np.float32)
    return TypeError, ["d_hs", "float32", "float64"]


def d_hs_of_integers(a):
    a["d_hs"] = a["d_hs"].astype(np.int16)
    return TypeError, ["d_hs", DTYPES_TEXT, "int16"]


def d_hs_is_a_list(a):
    a["d_hs"] = a["d_hs"].tolist()
    return TypeError, ["d_hs", "numpy.ndarray", "list"]


def d_state_of_wrong_shape(a):
    a["d_state"] = (a["d_state"][0], np.zeros((B, H + 1)))
    return ValueError, ["d_state c", str((B, H)), str((B, H + 1))]


def d_state_not_a_pair(a):
    a["d_state"] = a["d_state"][0]
    return TypeError, ["d_state", "pair (h, c)", "ndarray"]


def d_state_dtype_differs(a):
    a["d_state"] = (a["d_state"][0].astype(np.float32), a["d_state"][1])
    return TypeError, ["d_state h", "float32", "float64"]


def d_hs_hidden_wide_with_a_projection(a):
    with_projection(a, "backward")
    a["d_hs"] = np.zeros((B, T, H))
    return ValueError, ["d_hs", str((B, T, 1)), str((B, T, H))]


@pytest.mark.parametrize("mutate", [
    d_hs_of_wrong_shape, d_hs_time_major, d_hs_dtype_differs, d_hs_of_integers, d_hs_is_a_list,
    d_state_of_wrong_shape, d_state_not_a_pair, d_state_dtype_differs, d_hs_hidden_wide_with_a_projection,
], ids=lambda f: f.__name__)
def test_bad_output_gradients_are_rejected(mutate):
    arguments = valid_arguments("backward")
    error_type, fragments = mutate(arguments)
    assert_raises_naming(error_type, fragments, lambda: invoke("backward", arguments))


# ---- init_params ----

INIT_CASES = [
    (dict(input_size=0), ValueError, ["input_size", "positive int", "0"]),
    (dict(hidden_size=-2), ValueError, ["hidden_size", "positive int", "-2"]),
    (dict(hidden_size="2"), TypeError, ["hidden_size", "positive int", "'2'"]),
    (dict(input_size=2.0), TypeError, ["input_size", "positive int", "float"]),
    (dict(input_size=True), TypeError, ["input_size", "positive int", "bool"]),
    (dict(dtype=np.int32), TypeError, ["dtype", DTYPES_TEXT, "int32"]),
    (dict(dtype="bfloat16"), TypeError, ["dtype", DTYPES_TEXT, "bfloat16"]),
    (dict(dtype=np.complex128), TypeError, ["dtype", DTYPES_TEXT, "complex128"]),
    (dict(weight_init="he_normal"), ValueError, ["weight_init", "'glorot_uniform', 'orthogonal'",
                                                 "'he_normal'"]),
    (dict(rng=1.5), TypeError, ["rng", "numpy.random.Generator", "float"]),
    (dict(rng=True), TypeError, ["rng", "numpy.random.Generator", "bool"]),
    (dict(rng=np.random.RandomState(0)), TypeError, ["rng", "numpy.random.Generator", "RandomState"]),
    (dict(forget_bias_init=3.0, bias=False), ValueError,
     ["forget_bias_init=3.0", "forget block of bias_ih", "bias=False", "run-time forget_bias"]),
    (dict(unit_forget_bias=True, bias=False), ValueError,
     ["unit_forget_bias=True", "forget block of bias_ih", "bias=False"]),
    (dict(unit_forget_bias=True, forget_bias_init=3.0), ValueError,
     ["unit_forget_bias=True", "forget_bias_init=3.0", "give one"]),
    (dict(forget_bias_init="1"), TypeError, ["forget_bias_init", "number", "'1'"]),
    (dict(forget_bias_init=float("inf")), ValueError, ["forget_bias_init", "finite", "inf"]),
    (dict(proj_size=2), ValueError, ["proj_size", "1..hidden_size-1 = 1..1", "2"]),
    (dict(proj_size=-1), ValueError, ["proj_size", "0 (no projection)", "-1"]),
    (dict(proj_size=1.0), TypeError, ["proj_size", "int", "float"]),
    (dict(proj_size=True), TypeError, ["proj_size", "int", "bool"]),
    (dict(proj_size=1, independent_recurrence=True), ValueError,
     ["proj_size=1", "independent_recurrence=True", "element-wise"]),
]


def option_id(kwargs):
    def text(value):
        if isinstance(value, (int, float, str)):
            return repr(value)
        return getattr(value, "__name__", type(value).__name__)
    return ",".join(f"{name}={text(value)}" for name, value in kwargs.items())


@pytest.mark.parametrize("kwargs, error_type, fragments", INIT_CASES,
                         ids=[option_id(kwargs) for kwargs, _, _ in INIT_CASES])
def test_init_params_rejects_bad_options(kwargs, error_type, fragments):
    arguments = dict(input_size=3, hidden_size=2) | kwargs
    assert_raises_naming(error_type, fragments, lambda: mlstm_spec.init_params(**arguments))


# ---- layout helpers ----

@pytest.mark.parametrize("function, value, error_type, fragments", [
    (mlstm_spec.to_time_major, np.zeros(3), ValueError, ["xs", "2 or 3 dimensions", "(3,)"]),
    (mlstm_spec.to_time_major, np.zeros((1, 2, 3, 4)), ValueError, ["xs", "2 or 3", "(1, 2, 3, 4)"]),
    (mlstm_spec.to_batch_major, [[1.0, 2.0]], TypeError, ["xs", "numpy.ndarray", "list"]),
    (mlstm_spec.to_batch_major, np.zeros(()), ValueError, ["xs", "2 or 3", "()"]),
    (mlstm_spec.from_julia_sequence, np.zeros((1, 1, 1, 1)), ValueError, ["xs", "3 dimensions",
                                                                          "(1, 1, 1, 1)"]),
    (mlstm_spec.to_julia_sequence, (1.0, 2.0), TypeError, ["xs", "numpy.ndarray", "tuple"]),
], ids=lambda v: getattr(v, "__name__", None))
def test_layout_helpers_reject_bad_arrays(function, value, error_type, fragments):
    assert_raises_naming(error_type, fragments, lambda: function(value))


# ---- check_params, as backends call it ----

def test_check_params_names_the_argument_it_is_given():
    params = valid_arguments("forward")["params"]
    params["weight_mh"] = params["weight_mh"][:, :1]
    assert_raises_naming(ValueError, ["params[2]['weight_mh']", str((4 * H, H)), str((4 * H, 1))],
                         lambda: mlstm_spec.check_params(params, argument="params[2]"))


def test_check_params_reads_shapes_and_dtypes_through_the_callbacks():
    """What backends rely on: any array type, through shape_of/dtype_of, with framework dtype names."""

    class FakeTensor:
        def __init__(self, shape, dtype):
            self.size, self.kind = shape, dtype

    shapes = {"weight_ih": (5 * H, I), "weight_hh": (H,), "weight_mh": (4 * H, H), "bias_mh": (4 * H,)}
    for dtype_text in ("torch.float32", "<dtype: 'float32'>", "float32"):
        params = {k: FakeTensor(s, dtype_text) for k, s in shapes.items()}
        info = mlstm_spec.check_params(params, shape_of=lambda v: v.size, dtype_of=lambda v: v.kind)
        assert info == mlstm_spec.LayerInfo(
            input_size=I, hidden_size=H, bias=False, recurrent_bias=False, multiplicative_bias=True,
            independent_recurrence=True, dtype="float32")
    params["bias_hh"] = FakeTensor((H,), "torch.int64")
    message = assert_raises_naming(
        TypeError, ["params['bias_hh']", DTYPES_TEXT, "int64"],
        lambda: mlstm_spec.check_params(params, shape_of=lambda v: v.size, dtype_of=lambda v: v.kind))
    assert not re.search(r"torch\.", message), "the dtype name should be normalised"



def as_matrix(array):
    return np.asmatrix(array if array.ndim < 3 else array[0])


MATRIX_ARGUMENTS = {  # argument -> (functions taking it, the arguments with one np.matrix, name in the message)
    "params": (FUNCTIONS, lambda a: dict(a, params=dict(a["params"], weight_ih=as_matrix(a["params"]["weight_ih"]))),
               "params['weight_ih']"),
    "input": (FUNCTIONS, lambda a: dict(a, input=as_matrix(a["input"])), None),
    "state": (FUNCTIONS, lambda a: dict(a, state=(as_matrix(a["state"][0]), a["state"][1])), "state h"),
    "d_hs": (("backward",), lambda a: dict(a, d_hs=as_matrix(a["d_hs"])), "d_hs"),
    "d_state": (("backward",), lambda a: dict(a, d_state=(a["d_state"][0], as_matrix(a["d_state"][1]))),
                "d_state c"),
}


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # NumPy's own advice against np.matrix
@pytest.mark.parametrize("function,argument", [(f, arg) for arg, (fs, _, _) in MATRIX_ARGUMENTS.items() for f in fs])
def test_a_numpy_matrix_is_refused_naming_the_argument(function, argument):
    """np.matrix is an ndarray subclass that stays 2-D: taken as an array, it broke the equations' shapes
    (a broadcasting error, an IndexError, or a silently accepted state)."""
    _, with_matrix, name = MATRIX_ARGUMENTS[argument]
    assert_raises_naming(TypeError, [name or INPUT_NAME[function], "numpy.ndarray", "numpy.matrix", "np.asarray"],
                         lambda: invoke(function, with_matrix(valid_arguments(function))))
