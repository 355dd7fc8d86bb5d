"""``mlstm_spec.converters``: other implementations' layouts to and from the canonical parameters.

torchrecurrent is checked against the real package (a test dependency): its own modules compute the
expected outputs. The paper, OpenAI and NVIDIA layouts are checked against one-step cells written
below from their published equations (each in its own orientation and gate order), not from the
converters.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import mlstm_spec
from mlstm_spec import converters
from mlstm_spec.conformance.tolerances import relative_error, tolerance

FLAG_SETS = [
    dict(bias=True, recurrent_bias=True, multiplicative_bias=True),
    dict(bias=False, recurrent_bias=True, multiplicative_bias=False),
    dict(bias=True, recurrent_bias=False, multiplicative_bias=True),
    dict(bias=False, recurrent_bias=False, multiplicative_bias=False),
]


def flag_id(flags):
    return "".join("1" if v else "0" for v in flags.values())


def random_params(input_size=3, hidden_size=4, *, seed=0, dtype=np.float64, **flags):
    rng = np.random.default_rng(seed)
    params = mlstm_spec.init_params(input_size, hidden_size, rng=rng, dtype=dtype, **flags)
    return {k: (v + rng.uniform(-0.5, 0.5, v.shape)).astype(dtype) for k, v in params.items()}


def spec_stack(layers, xs, state=None):
    """hs of the last layer and the final (h, c) of every layer, as torch's (L, B, H)."""
    hs, finals = xs, []
    for k, params in enumerate(layers):
        layer_state = None if state is None else (state[0][k], state[1][k])
        hs, final = mlstm_spec.forward(params, hs, layer_state)
        finals.append(final)
    return hs, tuple(np.stack(s) for s in zip(*finals))


def assert_close(actual, expected, dtype="float64", what=""):
    error, where = relative_error(actual, expected)
    assert error <= tolerance(dtype), f"{what}: relative error {error:.3g} at {where} > {tolerance(dtype)}"


def assert_bit_identical(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].tobytes() == want[name].tobytes(), name


# ---------------------------------------------------------------------------------------------------
# torchrecurrent, against the real package
# ---------------------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")
torchrecurrent = pytest.importorskip("torchrecurrent")


def random_torchrecurrent(num_layers=2, seed=0, dtype=torch.float64, **flags):
    torch.manual_seed(seed)
    module = torchrecurrent.MultiplicativeLSTM(3, 4, num_layers=num_layers, batch_first=True, dtype=dtype, **flags)
    with torch.no_grad():
        for p in module.parameters():  # biases start at zero; give every parameter values that matter
            p.uniform_(-0.8, 0.8)
    return module


@pytest.mark.parametrize("flags", FLAG_SETS, ids=flag_id)
@pytest.mark.parametrize("num_layers", [1, 2])
def test_from_torchrecurrent_module_computes_what_it_computes(flags, num_layers):
    module = random_torchrecurrent(num_layers=num_layers, **flags)
    layers = converters.from_torchrecurrent(module)
    assert len(layers) == num_layers
    for layer in layers:  # switched-off biases (zero buffers there) are absent here
        assert {k for k in ("bias_ih", "bias_hh", "bias_mh") if k in layer} == {
            k for k, f in zip(("bias_ih", "bias_hh", "bias_mh"), flags) if flags[f]}
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((2, 6, 3))
    h0, c0 = rng.standard_normal((2, num_layers, 2, 4)) * 0.5
    out, (h_n, c_n) = module(torch.from_numpy(xs), (torch.from_numpy(h0), torch.from_numpy(c0)))
    hs, (h_T, c_T) = spec_stack(layers, xs, (h0, c0))
    assert_close(hs, out.detach().numpy(), what="hs")
    assert_close(h_T, h_n.detach().numpy(), what="h_n")
    assert_close(c_T, c_n.detach().numpy(), what="c_n")


@pytest.mark.parametrize("flags", FLAG_SETS, ids=flag_id)
def test_to_torchrecurrent_module_computes_what_the_spec_computes(flags):
    layers = [random_params(3, 4, seed=2, **flags), random_params(4, 4, seed=3, **flags)]
    module = converters.to_torchrecurrent_module(layers, batch_first=True)
    assert {name for name, _ in module.named_parameters()} >= {f"cells.1.{k}" for k in layers[1]}
    xs = np.random.default_rng(4).standard_normal((3, 5, 3))
    out, _ = module(torch.from_numpy(xs))
    hs, _ = spec_stack(layers, xs)
    assert_close(out.detach().numpy(), hs, what="hs")


def test_float32_module_agrees_within_float32_tolerance():
    module = random_torchrecurrent(num_layers=1, dtype=torch.float32)
    (params,) = converters.from_torchrecurrent(module)
    assert params["weight_ih"].dtype == np.float32
    xs = np.random.default_rng(5).standard_normal((2, 6, 3)).astype(np.float32)
    out, _ = module(torch.from_numpy(xs))
    expected, _ = mlstm_spec.forward({k: v.astype(np.float64) for k, v in params.items()}, xs.astype(np.float64))
    assert_close(out.detach().numpy(), expected, "float32", "hs")


def test_cell_and_its_state_dict():
    torch.manual_seed(7)
    cell = torchrecurrent.MultiplicativeLSTMCell(3, 4, recurrent_bias=False, dtype=torch.float64)
    with torch.no_grad():
        for p in cell.parameters():
            p.uniform_(-0.8, 0.8)
    (from_module,) = converters.from_torchrecurrent(cell)
    assert "bias_hh" not in from_module
    # a state_dict cannot tell a zero buffer from a zero parameter: name the flag to drop it
    (from_state,) = converters.from_torchrecurrent(cell.state_dict(), recurrent_bias=False)
    assert_bit_identical(from_state, from_module)
    x = np.random.default_rng(8).standard_normal((2, 3))
    h, c = cell(torch.from_numpy(x))
    _, (h_spec, c_spec) = mlstm_spec.cell(from_module, x)
    assert_close(h_spec, h.detach().numpy(), what="h")
    assert_close(c_spec, c.detach().numpy(), what="c")
    back = converters.to_torchrecurrent(from_module, cell=True)
    assert sorted(back) == sorted(cell.state_dict())
    for name, value in cell.state_dict().items():
        assert np.array_equal(back[name], value.numpy()), name


def test_state_dict_keeps_zero_biases_by_default_and_refuses_to_drop_a_nonzero_one():
    module = random_torchrecurrent(num_layers=2, bias=False)
    state = module.state_dict()
    kept = converters.from_torchrecurrent(state)
    assert all(np.all(layer["bias_ih"] == 0) for layer in kept)  # the zero buffers, kept: same function
    dropped = converters.from_torchrecurrent(state, bias=False)
    assert all("bias_ih" not in layer for layer in dropped)
    with pytest.raises(ValueError, match=r"source layer 0 bias_hh is nonzero, but recurrent_bias=False"):
        converters.from_torchrecurrent(state, recurrent_bias=False)


def test_round_trip_through_torchrecurrent_is_bit_identical():
    layers = [random_params(3, 4, seed=9), random_params(4, 4, seed=10)]
    module = converters.to_torchrecurrent_module(layers)
    assert len(converters.from_torchrecurrent(module)) == 2
    for got, want in zip(converters.from_torchrecurrent(module), layers):
        assert_bit_identical(got, want)
    state = converters.to_torchrecurrent(layers)
    for got, want in zip(converters.from_torchrecurrent(state), layers):
        assert_bit_identical(got, want)


def test_block_orders_are_the_ones_found_in_torchrecurrent():
    assert converters.TORCHRECURRENT_IH_BLOCKS == ("m", "i", "f", "z", "o")
    assert converters.TORCHRECURRENT_MH_BLOCKS == ("i", "f", "z", "o")
    # Copying the canonical tensors into torchrecurrent by name, without reordering, runs another network.
    params = random_params(seed=11)
    module = torchrecurrent.MultiplicativeLSTM(3, 4, batch_first=True, dtype=torch.float64)
    module.load_state_dict({f"cells.0.{k}": torch.from_numpy(v) for k, v in params.items()})
    xs = np.random.default_rng(12).standard_normal((2, 5, 3))
    naive, _ = module(torch.from_numpy(xs))
    expected, _ = mlstm_spec.forward(params, xs)
    assert relative_error(naive.detach().numpy(), expected)[0] > 1e-2


def test_independent_recurrence_needs_expand_independent():
    params = random_params(seed=13, independent_recurrence=True)
    with pytest.raises(ValueError, match=r"is a vector \(independent recurrence\).*expand_independent=True"):
        converters.to_torchrecurrent(params)
    module = converters.to_torchrecurrent_module(params, expand_independent=True, batch_first=True)
    xs = np.random.default_rng(14).standard_normal((2, 5, 3))
    out, _ = module(torch.from_numpy(xs))
    expected, _ = mlstm_spec.forward(params, xs)
    assert_close(out.detach().numpy(), expected, what="hs")


def test_multiplicative_integration_cannot_map_to_torchrecurrent():
    with pytest.raises(ValueError, match="multiplicative_integration.*cannot map to torchrecurrent"):
        converters.to_torchrecurrent(random_params(), integration_mode="multiplicative_integration")


def test_torchrecurrent_sources_that_are_not_its_layout_are_refused():
    with pytest.raises(ValueError, match=r"key 'layers.0.weight_ih'; expected 'cells.<k>.<name>'"):
        converters.from_torchrecurrent({"layers.0.weight_ih": np.zeros((20, 3))})
    with pytest.raises(ValueError, match=r"unexpected tensors \['weight_ph'\]"):
        converters.from_torchrecurrent({"weight_ih": np.zeros((20, 3)), "weight_hh": np.zeros((4, 4)),
                                        "weight_mh": np.zeros((16, 4)), "weight_ph": np.zeros(12)})
    with pytest.raises(ValueError, match=r"layers must be cells.0 .. cells.1, got \[0, 2\]"):
        converters.from_torchrecurrent({"cells.0.weight_ih": np.zeros((20, 3)), "cells.2.weight_ih": np.zeros((20, 4))})
    with pytest.raises(TypeError, match="source must be a torchrecurrent"):
        converters.from_torchrecurrent([1, 2])


# ---------------------------------------------------------------------------------------------------
# the paper, eqs. 18-22 (column vectors)
# ---------------------------------------------------------------------------------------------------

def paper_sequence(W, xs):
    """Eqs. 18-22 with a tanh candidate and h = o * tanh(c) (Krause's Chainer form), one row of xs (T, I)."""
    sigma = lambda a: 1.0 / (1.0 + np.exp(-a))  # noqa: E731
    H = W["W_mh"].shape[0]
    h, c, out = np.zeros(H), np.zeros(H), []
    for x in xs:
        m = (W["W_mx"] @ x) * (W["W_mh"] @ h)
        h_hat = W["W_hx"] @ x + W["W_hm"] @ m
        i = sigma(W["W_ix"] @ x + W["W_im"] @ m)
        o = sigma(W["W_ox"] @ x + W["W_om"] @ m)
        f = sigma(W["W_fx"] @ x + W["W_fm"] @ m)
        c = f * c + i * np.tanh(h_hat)
        h = o * np.tanh(c)
        out.append(h)
    return np.array(out)


def paper_matrices(seed=15, inputs=3, hidden=4):
    rng = np.random.default_rng(seed)
    return {name: rng.uniform(-0.8, 0.8, (hidden, inputs if name.endswith("x") else hidden))
            for name in converters.PAPER_NAMES}


def test_from_paper_computes_the_papers_equations():
    W = paper_matrices()
    params = converters.from_paper(**W)
    assert sorted(params) == ["weight_hh", "weight_ih", "weight_mh"]  # the bias-free variant
    xs = np.random.default_rng(16).standard_normal((7, 3))
    hs, _ = mlstm_spec.forward(params, xs)
    assert_close(hs, paper_sequence(W, xs), what="hs")


def test_paper_round_trip_is_bit_identical():
    W = paper_matrices()
    back = converters.to_paper(converters.from_paper(**W))
    assert_bit_identical(back, W)
    params = random_params(seed=17, bias=False, recurrent_bias=False, multiplicative_bias=False)
    assert_bit_identical(converters.from_paper(**converters.to_paper(params)), params)


def test_paper_linear_variant_and_nonzero_biases_are_refused():
    with pytest.raises(ValueError, match=r"variant='linear' .* h = tanh\(c \* o\).* cannot map exactly"):
        converters.from_paper(**paper_matrices(), variant="linear")
    with pytest.raises(ValueError, match=r"params\['bias_ih'\] is nonzero, but the paper's equations have no biases"):
        converters.to_paper(random_params(seed=18))
    zero_biases = random_params(seed=19)
    for name in ("bias_ih", "bias_hh", "bias_mh"):
        zero_biases[name] = np.zeros_like(zero_biases[name])
    assert sorted(converters.to_paper(zero_biases)) == sorted(converters.PAPER_NAMES)
    W = paper_matrices()
    with pytest.raises(ValueError, match=r"W_om must have shape \(4, 4\)"):
        converters.from_paper(**dict(W, W_om=W["W_ox"]))


# ---------------------------------------------------------------------------------------------------
# OpenAI (TensorFlow row vectors, gates i, f, o, u) and NVIDIA (F.linear, gates i, f, g, o)
# ---------------------------------------------------------------------------------------------------

def sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def openai_sequence(v, xs):
    """OpenAI's encoder.py mlstm step (wn=False), batch-major xs (B, T, I)."""
    H = v["wmh"].shape[0]
    h = c = np.zeros((xs.shape[0], H))
    out = []
    for t in range(xs.shape[1]):
        x = xs[:, t]
        m = (x @ v["wmx"]) * (h @ v["wmh"])
        z = x @ v["wx"] + m @ v["wh"] + v["b"]
        i, f, o, u = np.split(z, 4, axis=1)
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(u)
        h = sigmoid(o) * np.tanh(c)
        out.append(h)
    return np.stack(out, axis=1)


def nvidia_sequence(v, xs):
    """NVIDIA's apex mLSTMCell step, batch-major xs (B, T, I)."""
    H = v["w_mhh"].shape[0]
    h = c = np.zeros((xs.shape[0], H))
    out = []
    for t in range(xs.shape[1]):
        x = xs[:, t]
        m = (x @ v["w_mih"].T) * (h @ v["w_mhh"].T)
        gates = x @ v["w_ih"].T + v.get("b_ih", 0) + m @ v["w_hh"].T + v.get("b_hh", 0)
        i, f, g, o = np.split(gates, 4, axis=1)
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        out.append(h)
    return np.stack(out, axis=1)


def openai_variables(seed=20, inputs=3, hidden=4):
    rng = np.random.default_rng(seed)
    shapes = dict(wx=(inputs, 4 * hidden), wh=(hidden, 4 * hidden), wmx=(inputs, hidden), wmh=(hidden, hidden),
                  b=(4 * hidden,))
    return {name: rng.uniform(-0.8, 0.8, shape) for name, shape in shapes.items()}


def nvidia_parameters(seed=21, inputs=3, hidden=4, biases=True):
    rng = np.random.default_rng(seed)
    shapes = dict(w_ih=(4 * hidden, inputs), w_hh=(4 * hidden, hidden), w_mih=(hidden, inputs),
                  w_mhh=(hidden, hidden))
    if biases:
        shapes.update(b_ih=(4 * hidden,), b_hh=(4 * hidden,))
    return {name: rng.uniform(-0.8, 0.8, shape) for name, shape in shapes.items()}


def test_from_openai_computes_openais_cell_and_round_trips():
    v = openai_variables()
    params = converters.from_openai(**v)
    assert sorted(params) == ["bias_mh", "weight_hh", "weight_ih", "weight_mh"]
    xs = np.random.default_rng(22).standard_normal((2, 6, 3))
    hs, _ = mlstm_spec.forward(params, xs)
    assert_close(hs, openai_sequence(v, xs), what="hs")
    assert_bit_identical(converters.to_openai(params), v)


def test_openai_weight_norm_is_refused_unless_folded():
    v = openai_variables()
    rng = np.random.default_rng(23)
    gains = dict(gx=rng.uniform(0.5, 2, 16), gh=rng.uniform(0.5, 2, 16), gmx=rng.uniform(0.5, 2, 4),
                 gmh=rng.uniform(0.5, 2, 4))
    with pytest.raises(ValueError, match="weight-normalisation gains .* cannot map exactly; pass fold_weight_norm=True"):
        converters.from_openai(**v, **gains)
    params = converters.from_openai(**v, **gains, fold_weight_norm=True)
    effective = dict(v)
    for name, gain in (("wx", "gx"), ("wh", "gh"), ("wmx", "gmx"), ("wmh", "gmh")):
        effective[name] = v[name] / np.linalg.norm(v[name], axis=0) * gains[gain]
    xs = np.random.default_rng(24).standard_normal((2, 6, 3))
    hs, _ = mlstm_spec.forward(params, xs)
    assert_close(hs, openai_sequence(effective, xs), what="hs")


def test_to_openai_refuses_biases_it_cannot_hold():
    params = random_params(seed=25)
    with pytest.raises(ValueError, match=r"params\['bias_hh'\] is nonzero, but OpenAI's m has no bias"):
        converters.to_openai(params)
    with pytest.raises(ValueError, match=r"params\['bias_ih'\] is nonzero, but OpenAI's mLSTM has a single gate bias"):
        converters.to_openai({k: v for k, v in params.items() if k != "bias_hh"})


@pytest.mark.parametrize("biases", [True, False])
def test_from_nvidia_computes_nvidias_cell_and_round_trips(biases):
    v = nvidia_parameters(biases=biases)
    params = converters.from_nvidia(**v)
    xs = np.random.default_rng(26).standard_normal((2, 6, 3))
    hs, _ = mlstm_spec.forward(params, xs)
    assert_close(hs, nvidia_sequence(v, xs), what="hs")
    assert_bit_identical(converters.to_nvidia(params), v)


def test_nvidia_projection_and_biased_m_are_refused():
    v = nvidia_parameters()
    with pytest.raises(ValueError, match=r"output projection"):
        converters.from_nvidia(**dict(v, w_mhh=np.zeros((5, 5))))
    with pytest.raises(ValueError, match=r"the m block of params\['bias_ih'\] is nonzero, but NVIDIA's m has no bias"):
        converters.to_nvidia(random_params(seed=27, recurrent_bias=False))


# ---------------------------------------------------------------------------------------------------
# layouts that cannot map, and the table
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout,reason", [
    ("keras_titu1994", "hard_sigmoid"),
    ("tamamori", r"h = tanh\(c \* o\) with no sigmoid on o"),
    ("krause_chainer", "weight-normalises"),
    ("lux_recurrent_layers", r"o \* tanh\(tanh\(z\)\)"),
])
def test_layouts_that_cannot_map_are_refused_with_the_reason(layout, reason):
    assert converters.explain(layout).startswith("cannot map exactly: ")
    with pytest.raises(ValueError, match=f"{layout} cannot map exactly: .*{reason}"):
        converters.convert_from(layout, np.zeros(3))


def test_every_mappable_layout_has_both_directions():
    for layout, (mappable, _) in converters.LAYOUTS.items():
        assert converters.explain(layout).startswith("maps exactly: " if mappable else "cannot map exactly: ")
        assert hasattr(converters, f"from_{layout}") == mappable, layout
        assert hasattr(converters, f"to_{layout}") == mappable, layout
    W = paper_matrices()
    assert_bit_identical(converters.convert_from("paper", **W), converters.from_paper(**W))
    with pytest.raises(ValueError, match="layout must be one of"):
        converters.explain("keras")


# ---------------------------------------------------------------------------------------------------
# variants: the exact layouts have none
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", [dict(proj_size=2), dict(peepholes=True)], ids=["projection", "peepholes"])
@pytest.mark.parametrize("convert", [converters.to_paper, converters.to_openai, converters.to_nvidia,
                                     converters.to_torchrecurrent], ids=lambda f: f.__name__)
def test_exact_layouts_refuse_a_projection_or_peepholes_instead_of_dropping_them(convert, variant):
    params = mlstm_spec.init_params(3, 4, rng=0, dtype=np.float64, bias=False, recurrent_bias=False,
                                    multiplicative_bias=False, **variant)
    what = "a projection (weight_hr)" if "proj_size" in variant else "peepholes"
    with pytest.raises(ValueError, match=rf"params has {re.escape(what)}.*dropping them would change the function"):
        convert(params)


# ---------------------------------------------------------------------------------------------------
# the TF 0.12 MultiplicativeLSTMCell (Tamamori's): variables built by hand in its layout
# ---------------------------------------------------------------------------------------------------

# Its variables, written from its source: "<scope>/<name>", matrices applied to [x, h] / [x, m] as rows.
TF_SCOPE = "rnn/MultiplicativeLSTMCell"
TF_GATE_COLUMNS = ("i", "j", "f", "o")  # j: the candidate


def tf012_checkpoint(I=3, H=4, P=None, peepholes=False, seed=0, cross=False, suffix=":0"):
    """A checkpoint of the TF 0.12 cell as TensorFlow names and shapes it; ``cross`` leaves the blocks
    of m's matrix that the canonical m has no place for nonzero."""
    rng = np.random.default_rng(seed)
    width = H if P is None else P
    multipli = rng.uniform(-1, 1, (I + width, 2 * H))
    if not cross:
        multipli[I:, :H] = 0  # h -> first factor
        multipli[:I, H:] = 0  # x -> second factor
    names = {
        "Multipli_Weight/Linear/Matrix": multipli,
        "Multipli_Weight/Linear/Bias": rng.uniform(-1, 1, 2 * H),
        "LSTM_Weight/Linear/Matrix": rng.uniform(-1, 1, (I + H, 4 * H)),
        "LSTM_Weight/Linear/Bias": rng.uniform(-1, 1, 4 * H),
    }
    if peepholes:
        names.update({f"W_{g}_diag": rng.uniform(-1, 1, H) for g in "IFO"})
    if P is not None:
        names["W_P"] = rng.uniform(-1, 1, (H, P))
    return {f"{TF_SCOPE}/{name}{suffix}": value for name, value in names.items()}


def tf_variables(checkpoint):
    """name (without scope and :0) -> array."""
    return {key.split(TF_SCOPE + "/")[1].removesuffix(":0"): value for key, value in checkpoint.items()}


def tf_layout_step(v, x, h, c, output_formula):
    """One step read from the TF variables as that cell reads them ([x, h] @ Matrix + Bias, split into
    halves / gate columns i, j, f, o; peepholes; projection W_P), finished with either the canonical
    formula or the TF 0.12 cell's own."""
    sigma = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
    H = v["LSTM_Weight/Linear/Bias"].shape[0] // 4
    factors = np.concatenate([x, h], axis=-1) @ v["Multipli_Weight/Linear/Matrix"] + v["Multipli_Weight/Linear/Bias"]
    m = factors[..., :H] * factors[..., H:]
    gates = np.concatenate([x, m], axis=-1) @ v["LSTM_Weight/Linear/Matrix"] + v["LSTM_Weight/Linear/Bias"]
    i, j, f, o = (gates[..., k * H:(k + 1) * H] for k in range(4))
    w = {g: v.get(f"W_{g}_diag", np.zeros(H)) for g in "IFO"}
    if output_formula == "canonical":
        c_new = sigma(f + w["F"] * c) * c + sigma(i + w["I"] * c) * np.tanh(j)
        h_new = sigma(o + w["O"] * c_new) * np.tanh(c_new)
    else:  # the TF 0.12 cell's: linear candidate, tanh(c * o) or its peephole form
        c_new = sigma(f + w["F"] * c) * c + sigma(i + w["I"] * c) * j
        o_peep = o + w["O"] * c_new
        h_new = sigma(o_peep) * np.tanh(c_new * o_peep) if "W_O_diag" in v else np.tanh(c_new * o)
    if "W_P" in v:
        h_new = h_new @ v["W_P"]
    return h_new, c_new


TF_SHAPES = [dict(), dict(peepholes=True), dict(P=2), dict(P=2, peepholes=True)]


def tf_id(options):
    return "+".join(f"{k}={v}" for k, v in options.items()) or "plain"


@pytest.mark.parametrize("options", TF_SHAPES, ids=tf_id)
def test_tf012_variables_move_to_the_places_tensorflow_reads_them_from(options):
    checkpoint = tf012_checkpoint(**options)
    params = converters.from_tf012(checkpoint, allow_formula_change=True)
    info = mlstm_spec.check_params(params)
    assert (info.proj_size, info.peepholes, info.hidden_size, info.input_size) == (
        options.get("P", 0), options.get("peepholes", False), 4, 3)
    rng = np.random.default_rng(9)
    xs = rng.standard_normal((2, 5, 3))
    h = rng.uniform(-1, 1, (2, info.output_size))
    c = rng.standard_normal((2, 4))
    hs, (h_T, c_T) = mlstm_spec.forward(params, xs, (h, c))
    v = tf_variables(checkpoint)
    for t in range(5):
        h, c = tf_layout_step(v, xs[:, t], h, c, "canonical")
        assert_close(hs[:, t], h, what=f"hs[:, {t}]")
    assert_close(c_T, c, what="c_T")


@pytest.mark.parametrize("options", TF_SHAPES, ids=tf_id)
def test_tf012_round_trip_is_bit_identical(options):
    checkpoint = tf012_checkpoint(seed=1, suffix="", **options)
    params = converters.from_tf012(checkpoint, allow_formula_change=True)
    assert_bit_identical(converters.to_tf012(params, scope=TF_SCOPE, allow_formula_change=True), checkpoint)
    assert_bit_identical(converters.from_tf012(converters.to_tf012(params, allow_formula_change=True),
                                               allow_formula_change=True), params)


@pytest.mark.parametrize("options", TF_SHAPES, ids=tf_id)
def test_tf012_is_refused_with_the_formula_the_checkpoint_was_trained_with(options):
    checkpoint = tf012_checkpoint(**options)
    output = (r"h = sigmoid\(o \+ w_o \* c\) \* tanh\(c \* \(o \+ w_o \* c\)\)" if options.get("peepholes")
              else r"h = tanh\(c \* o\) \(no sigmoid on o\)")
    with pytest.raises(ValueError, match=rf"this checkpoint is for the TF 0\.12 MultiplicativeLSTMCell, "
                                         rf"which computes .*linear candidate j.*{output}.*allow_formula_change"):
        converters.from_tf012(checkpoint)
    params = converters.from_tf012(checkpoint, allow_formula_change=True)
    with pytest.raises(ValueError, match=rf"to_tf012 is for the TF 0\.12 .*{output}"):
        converters.to_tf012(params)
    # why refusing is right: the cell's own formula is another function of the same weights
    v = tf_variables(checkpoint)
    rng = np.random.default_rng(2)
    x, h, c = rng.standard_normal((2, 3)), rng.uniform(-1, 1, (2, 4 if "P" not in options else 2)), rng.standard_normal((2, 4))
    canonical, _ = tf_layout_step(v, x, h, c, "canonical")
    own, _ = tf_layout_step(v, x, h, c, "tf012")
    assert np.abs(canonical - own).max() > 0.1


def test_tf012_cross_blocks_of_m_cannot_be_placed_even_when_the_formula_change_is_allowed():
    checkpoint = tf012_checkpoint(cross=True)
    cross = r"the h rows of the first factor \(max \|value\| .*\) and the x rows of the second factor .* are nonzero"
    with pytest.raises(ValueError, match=rf"h = tanh\(c \* o\).* {cross}"):
        converters.from_tf012(checkpoint)
    with pytest.raises(ValueError, match=rf"^In Multipli_Weight/Linear/Matrix, {cross}"):
        converters.from_tf012(checkpoint, allow_formula_change=True)


def test_tf012_variables_are_found_by_name_and_scope():
    first, second = tf012_checkpoint(seed=3), tf012_checkpoint(seed=4, P=2)
    both = {**first, **{key.replace(TF_SCOPE, "rnn/cell_1"): value for key, value in second.items()}}
    with pytest.raises(ValueError, match=r"2 candidates for Multipli_Weight/Linear/Matrix.*pass scope="):
        converters.from_tf012(both, allow_formula_change=True)
    chosen = converters.from_tf012(both, scope="rnn/cell_1", allow_formula_change=True)
    assert_bit_identical(chosen, converters.from_tf012(second, allow_formula_change=True))
    incomplete = {k: v for k, v in first.items() if "LSTM_Weight/Linear/Bias" not in k}
    with pytest.raises(ValueError, match=r"have no \['LSTM_Weight/Linear/Bias'\]"):
        converters.from_tf012(incomplete, allow_formula_change=True)
    partial = {k: v for k, v in tf012_checkpoint(peepholes=True).items() if "W_F_diag" not in k}
    with pytest.raises(ValueError, match=r"not all three peepholes"):
        converters.from_tf012(partial, allow_formula_change=True)
    wrong = dict(first, **{f"{TF_SCOPE}/LSTM_Weight/Linear/Bias:0": np.zeros(15)})
    with pytest.raises(ValueError, match=r"these differ: \{'LSTM_Weight/Linear/Bias': \(15,\)\}"):
        converters.from_tf012(wrong, allow_formula_change=True)


def test_to_tf012_takes_one_gate_bias_and_refuses_what_it_cannot_hold():
    params = random_params(3, 4, seed=5)  # bias_ih, bias_hh and bias_mh all nonzero
    with pytest.raises(ValueError, match=r"gate blocks of params\['bias_ih'\] is nonzero.*one gate bias"):
        converters.to_tf012(params, allow_formula_change=True)
    only_mh = dict(params, bias_ih=np.concatenate([params["bias_ih"][:4], np.zeros(16)]))
    out = converters.to_tf012(only_mh, allow_formula_change=True)
    gate_bias = out[f"{TF_SCOPE}/LSTM_Weight/Linear/Bias"]
    order = dict(zip(TF_GATE_COLUMNS, np.split(gate_bias, 4)))
    np.testing.assert_array_equal(order["j"], mlstm_spec.block(params["bias_mh"], "z", mlstm_spec.MH_BLOCKS))
    with pytest.raises(ValueError, match="multiplicative_integration"):
        converters.to_tf012(params, integration_mode="multiplicative_integration", allow_formula_change=True)
