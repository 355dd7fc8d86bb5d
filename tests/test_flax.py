"""The Flax layers (backends.flax: linen, backends.flax_nnx: nnx): the conformance suite through their
adapters, and what a Flax user does with a cell: nn.RNN / nnx.RNN with seq_lengths, reverse and
Bidirectional, init under jit, nnx.Optimizer(wrt=nnx.Param) training the weights. The oracle is
mlstm_spec.forward on the unpadded sequences."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import require_backend, run_conformance

bf = require_backend("flax")
bn = require_backend("flax_nnx")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from hypothesis import settings  # noqa: E402

import mlstm_spec  # noqa: E402



@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


# ---- the conformance suite, through each adapter ----

@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("module", [bf, bn], ids=["linen", "nnx"])
def test_conformance(module, dtype):
    # The layers run backends.jax's functional core, which test_jax checks with every dtype and the full
    # example count; here a few examples check that each adapter's parameters, state and gradients
    # reach that core and come back under the right names.
    run_conformance(module.ConformanceAdapter, "cpu", dtype, settings=settings(max_examples=8))


# ---- the oracle on padded batches ----

def _case(rng, batch=3, steps=6, inputs=3, hidden=4):
    params = mlstm_spec.init_params(inputs, hidden, rng=rng, dtype=np.float64)
    params["bias_ih"] = rng.standard_normal(params["bias_ih"].shape)
    xs = rng.standard_normal((batch, steps, inputs))
    lengths = np.array([steps, 2, 4][:batch])
    return params, xs, lengths


def _spec_rows(params, xs, lengths, reverse=False):
    """Per row: the spec's outputs and final (h, c) on the valid steps, reversed for a backward RNN."""
    rows = []
    for row, length in zip(xs, lengths):
        valid = row[:length][::-1] if reverse else row[:length]
        hs, (h, c) = mlstm_spec.forward(params, valid)
        rows.append((hs[::-1] if reverse else hs, h, c))
    return rows


def _check_rows(outputs, carry, rows):
    """Outputs on the valid steps and the final carry ``(c, h)`` of each row equal the spec's."""
    c, h = carry
    for k, (hs, h_want, c_want) in enumerate(rows):
        np.testing.assert_allclose(np.asarray(outputs)[k, : len(hs)], hs, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(np.asarray(h)[k], h_want, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(np.asarray(c)[k], c_want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("reverse", [False, True])
def test_linen_rnn_with_seq_lengths_equals_the_spec(x64, reverse):
    rng = np.random.default_rng(0)
    params, xs, lengths = _case(rng)
    cell = bf.MLSTMCell.from_canonical(params)
    module, variables = cell.unbind()
    rnn = nn.RNN(module, reverse=reverse, keep_order=True, return_carry=True)
    carry, outputs = rnn.apply({"params": {"cell": variables["params"]}}, jnp.asarray(xs),
                               seq_lengths=jnp.asarray(lengths))
    _check_rows(outputs, carry, _spec_rows(params, xs, lengths, reverse))


def test_linen_bidirectional_init_under_jit_and_round_trip(x64):
    rng = np.random.default_rng(1)
    params, xs, lengths = _case(rng)
    back = mlstm_spec.init_params(3, 4, rng=rng, dtype=np.float64)
    model = nn.Bidirectional(nn.RNN(bf.MLSTMCell(4, param_dtype=jnp.float64)),
                             nn.RNN(bf.MLSTMCell(4, param_dtype=jnp.float64)))
    variables = jax.jit(model.init)(jax.random.key(0), jnp.asarray(xs))
    drawn = variables["params"]["forward_rnn"]["cell"]
    assert sorted(drawn) == sorted(params)
    # drawn by the spec's initialiser: glorot_uniform bounds, zero biases
    bound = np.sqrt(6 / (20 + 3))
    assert 0 < np.abs(drawn["weight_ih"]).max() <= bound and not np.any(drawn["bias_ih"])
    variables = {"params": {"forward_rnn": {"cell": params}, "backward_rnn": {"cell": back}}}
    outputs = model.apply(variables, jnp.asarray(xs), seq_lengths=jnp.asarray(lengths))
    assert outputs.shape == (3, 6, 8)
    for k, (forward, backward) in enumerate(zip(_spec_rows(params, xs, lengths),
                                                _spec_rows(back, xs, lengths, reverse=True))):
        n = lengths[k]
        np.testing.assert_allclose(outputs[k, :n, :4], forward[0], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(outputs[k, :n, 4:], backward[0], rtol=1e-12, atol=1e-13)
    cell = bf.MLSTMCell(4).bind({"params": params})
    for got, want in zip(cell.to_canonical()[0].values(), params.values()):
        assert got.tobytes() == np.asarray(want).tobytes()


def test_linen_stack_equals_the_spec_and_keeps_the_jax_state_convention(x64):
    rng = np.random.default_rng(2)
    layers = [mlstm_spec.init_params(3, 4, rng=rng, dtype=np.float64),
              mlstm_spec.init_params(4, 4, rng=rng, dtype=np.float64)]
    xs = rng.standard_normal((2, 5, 3))
    h0, c0 = rng.standard_normal((2, 2, 4)), rng.standard_normal((2, 2, 4))
    module, variables = bf.MLSTM.from_canonical(layers, integration_mode="multiplicative_integration").unbind()
    hs, (h_n, c_n) = jax.jit(module.apply)(variables, jnp.asarray(xs), (jnp.asarray(h0), jnp.asarray(c0)))
    want = xs
    for k, params in enumerate(layers):
        want, (h, c) = mlstm_spec.forward(params, want, (h0[k], c0[k]), integration_mode="multiplicative_integration")
        np.testing.assert_allclose(h_n[k], h, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(c_n[k], c, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(hs, want, rtol=1e-12, atol=1e-13)


# ---- nnx ----

def test_nnx_weights_are_params_and_train_under_the_optimizer():
    """The issue: weights wrapped as nnx.data were never updated by nnx.Optimizer(wrt=nnx.Param), silently."""
    import optax

    model = bn.MLSTM(3, 4, num_layers=2, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    assert len(jax.tree.leaves(params)) == 12  # 6 canonical arrays per layer, every one an nnx.Param
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    xs = jax.random.normal(jax.random.key(1), (4, 6, 3))
    target = jnp.sin(jnp.arange(4 * 6 * 4, dtype=jnp.float32)).reshape(4, 6, 4) * 0.5

    @nnx.jit
    def step(model, optimizer):
        def loss(model):
            return jnp.mean((model(xs)[0] - target) ** 2)

        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value

    before = model.to_canonical()
    losses = [float(step(model, optimizer)) for _ in range(20)]
    after = model.to_canonical()
    for old, new in zip(before, after):
        for name in old:
            assert not np.array_equal(old[name], new[name]), name
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("reverse", [False, True])
def test_nnx_rnn_with_seq_lengths_equals_the_spec(x64, reverse):
    rng = np.random.default_rng(3)
    params, xs, lengths = _case(rng)
    rnn = nnx.RNN(bn.MLSTMCell.from_canonical(params), reverse=reverse, keep_order=True, return_carry=True)
    carry, outputs = rnn(jnp.asarray(xs), seq_lengths=jnp.asarray(lengths))
    _check_rows(outputs, carry, _spec_rows(params, xs, lengths, reverse))


def test_nnx_bidirectional_and_init_under_jit(x64):
    rng = np.random.default_rng(4)
    params, xs, lengths = _case(rng)
    back = mlstm_spec.init_params(3, 4, rng=rng, dtype=np.float64)
    model = nnx.Bidirectional(nnx.RNN(bn.MLSTMCell.from_canonical(params)),
                              nnx.RNN(bn.MLSTMCell.from_canonical(back)))
    outputs = model(jnp.asarray(xs), seq_lengths=jnp.asarray(lengths))
    for k, (forward, backward) in enumerate(zip(_spec_rows(params, xs, lengths),
                                                _spec_rows(back, xs, lengths, reverse=True))):
        n = lengths[k]
        np.testing.assert_allclose(outputs[k, :n, :4], forward[0], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(outputs[k, :n, 4:], backward[0], rtol=1e-12, atol=1e-13)
    built = nnx.jit(lambda key: bn.MLSTMCell(3, 4, rngs=nnx.Rngs(key)))(jax.random.key(5))
    eager = bn.MLSTMCell(3, 4, rngs=nnx.Rngs(jax.random.key(5)))
    for got, want in zip(built.to_canonical()[0].values(), eager.to_canonical()[0].values()):
        np.testing.assert_array_equal(got, want)


def test_bad_options_name_the_argument():
    with pytest.raises(TypeError, match=r"unexpected option\(s\) \['units'\]"):
        bn.MLSTM.from_canonical(mlstm_spec.init_params(3, 4, rng=0), units=4)
    with pytest.raises(ValueError, match="integration_mode must be"):
        bn.MLSTMCell(3, 4, integration_mode="sum")
    with pytest.raises(ValueError, match="needs a bound module"):
        bf.MLSTM(4).to_canonical()


# ---- docs/jax.md ----

def test_the_jax_page_examples_run(tmp_path):
    """docs/jax.md's code blocks, in order, as one script on two fake CPU devices (for shard_map)."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("optax", reason="optax is not installed (test extra)")
    pytest.importorskip("safetensors", reason="safetensors is not installed (io extra)")
    root = Path(__file__).resolve().parents[1]
    blocks = re.findall(r"```python\n(.+?)\n```", (root / "docs" / "jax.md").read_text(), re.S)
    assert len(blocks) >= 7
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", "\n\n".join(blocks)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "mlstm.safetensors").exists()


# ---- the spec's variants: projection, peepholes, run-time options ----

VARIANT_OPTIONS = dict(cell_clip=0.5, proj_clip=0.3, forget_bias=1.0)


def _variant_layer(rng, inputs=3, hidden=5, proj_size=2):
    """A projected, peepholed layer with every bias and peephole weight random, so each term matters."""
    params = mlstm_spec.init_params(inputs, hidden, rng=rng, dtype=np.float64, proj_size=proj_size, peepholes=True)
    for name in ("bias_ih", "bias_hh", "bias_mh", "weight_ci", "weight_cf", "weight_co"):
        params[name] = rng.uniform(-1, 1, params[name].shape)
    return params


@pytest.mark.parametrize("module", [bf, bn], ids=["linen", "nnx"])
def test_variant_cell_in_rnn_with_seq_lengths_equals_the_spec(x64, module):
    rng = np.random.default_rng(6)
    params = _variant_layer(rng)
    xs, lengths = rng.standard_normal((3, 6, 3)), np.array([6, 2, 4])
    cell = module.MLSTMCell.from_canonical(params, **VARIANT_OPTIONS)
    if module is bf:
        unbound, variables = cell.unbind()
        carry, outputs = nn.RNN(unbound, return_carry=True).apply(
            {"params": {"cell": variables["params"]}}, jnp.asarray(xs), seq_lengths=jnp.asarray(lengths))
        zeros = unbound.initialize_carry(None, xs[:, 0].shape)
    else:
        carry, outputs = nnx.RNN(cell, return_carry=True)(jnp.asarray(xs), seq_lengths=jnp.asarray(lengths))
        zeros = cell.initialize_carry(xs[:, 0].shape)
    assert [z.shape for z in zeros] == [(3, 5), (3, 2)]  # (c, h): h is P wide
    rows = []
    for row, n in zip(xs, lengths):
        hs, (h, c) = mlstm_spec.forward(params, row[:n], **VARIANT_OPTIONS)
        rows.append((hs, h, c))
    _check_rows(outputs, carry, rows)


@pytest.mark.parametrize("module", [bf, bn], ids=["linen", "nnx"])
def test_variant_stack_equals_the_spec_and_round_trips(x64, module):
    rng = np.random.default_rng(7)
    layers = [_variant_layer(rng), _variant_layer(rng, inputs=2)]
    model = module.MLSTM.from_canonical(layers, **VARIANT_OPTIONS)
    xs = rng.standard_normal((2, 5, 3))
    hs, (h_n, c_n) = model(jnp.asarray(xs))
    assert hs.shape == (2, 5, 2) and h_n.shape == (2, 2, 2) and c_n.shape == (2, 2, 5)
    want = xs
    for k, params in enumerate(layers):
        want, (h, c) = mlstm_spec.forward(params, want, **VARIANT_OPTIONS)
        np.testing.assert_allclose(h_n[k], h, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(c_n[k], c, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(hs, want, rtol=1e-12, atol=1e-13)
    for got, original in zip(model.to_canonical(), layers):
        assert sorted(got) == sorted(original)
        assert all(got[k].tobytes() == original[k].tobytes() for k in original)


def test_variant_options_draw_the_specs_parameters():
    xs = jnp.ones((2, 4, 3), jnp.float32)
    variables = bf.MLSTM(5, num_layers=2, proj_size=2, peepholes=True, unit_forget_bias=True).init(
        jax.random.key(0), xs)
    linen = bf.MLSTM(5).to_canonical(variables)
    model = bn.MLSTM(3, 5, num_layers=2, proj_size=2, peepholes=True, unit_forget_bias=True, rngs=nnx.Rngs(0))
    assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) == 20  # 10 per layer, every one an nnx.Param
    for layers in (linen, model.to_canonical()):
        assert layers[1]["weight_ih"].shape == (25, 2) and layers[1]["weight_hr"].shape == (2, 5)
        assert sorted(layers[0]) == sorted(mlstm_spec.init_params(3, 5, proj_size=2, peepholes=True))
        np.testing.assert_array_equal(layers[0]["bias_ih"][15:20], 1.0)  # block f: unit_forget_bias
    cell = bf.MLSTMCell(5, proj_size=2, peepholes=True)
    carry = cell.initialize_carry(None, (2, 3))
    (c, h), out = cell.apply(cell.init(jax.random.key(1), carry, xs[:, 0]), carry, xs[:, 0])
    assert c.shape == (2, 5) and h.shape == out.shape == (2, 2)
    with pytest.raises(ValueError, match="proj_clip=0.5 clips the projected output"):
        bn.MLSTM(3, 5, proj_clip=0.5)
