"""Weights move losslessly between every pair of frameworks through one weight file.

For each ordered pair (A, B) of the NumPy spec and the installed backends: a model built in A is saved
with ``mlstm_spec.save``, loaded with ``mlstm_spec.load`` and built in B; B's parameters must be
bit-identical to A's and B's outputs must agree with A's (and with the spec in float64) within the
dtype's tolerance. A model trained three SGD steps in A, saved and loaded into B, then trained three
more steps in both, must end with the same parameters in both (float64 tolerance).

A framework that is not installed is a skip with the reason (an error when ``MLSTM_BACKENDS`` or CI
requires it); a framework that is installed but whose backend module is missing or broken is an error.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import backends
import mlstm_spec
from helpers import requested_backends
from mlstm_spec.conformance.tolerances import relative_error, tolerance

FRAMEWORKS = ("spec", "torch", "jax", "tensorflow")
PAIRS = list(itertools.permutations(FRAMEWORKS, 2)) + [(f, f) for f in FRAMEWORKS]
LEARNING_RATE, STEPS = 0.05, 3

CONFIGS = {
    # two layers, every bias, float64
    "stack-f64": dict(dtype="float64", num_layers=2, integration_mode="addition",
                      flags=dict(bias=True, recurrent_bias=True, multiplicative_bias=True,
                                 independent_recurrence=False)),
    # one layer, multiplicative integration, independent recurrence, only the recurrent bias, float32
    "mi-indep-f32": dict(dtype="float32", num_layers=1, integration_mode="multiplicative_integration",
                         flags=dict(bias=False, recurrent_bias=True, multiplicative_bias=False,
                                    independent_recurrence=True)),
}


def make_layers(config, seed=0, input_size=3, hidden_size=4):
    rng = np.random.default_rng(seed)
    layers = []
    for layer in range(config["num_layers"]):
        params = mlstm_spec.init_params(input_size if layer == 0 else hidden_size, hidden_size, rng=rng,
                                        dtype=np.float64, **config["flags"])
        layers.append({k: (v + rng.uniform(-0.3, 0.3, v.shape)).astype(config["dtype"]) for k, v in params.items()})
    return layers


# ---------------------------------------------------------------------------------------------------
# one small adapter per framework: build from canonical, read back, run, and one SGD step on
# loss = sum(hs ** 2) from a zero initial state
# ---------------------------------------------------------------------------------------------------

class Spec:
    """The NumPy spec as a framework: forward and backward of ``mlstm_spec`` through the stack."""

    def build(self, layers, integration_mode, **flags):  # the flags are implied by the keys present
        return dict(layers=[{k: v.copy() for k, v in p.items()} for p in layers], mode=integration_mode)

    def canonical(self, model):
        return model["layers"]

    def _forward(self, model, xs):
        inputs = [xs]
        for params in model["layers"]:
            hs, _ = mlstm_spec.forward(params, inputs[-1], integration_mode=model["mode"])
            inputs.append(hs)
        return inputs

    def outputs(self, model, xs):
        return self._forward(model, xs)[-1]

    def sgd_step(self, model, xs):
        inputs = self._forward(model, xs)
        d_hs = 2 * inputs[-1]
        grads = [None] * len(model["layers"])
        for k in reversed(range(len(model["layers"]))):
            grads[k] = mlstm_spec.backward(model["layers"][k], inputs[k], None, d_hs, integration_mode=model["mode"])
            d_hs = grads[k]["x"]
        layers = [{n: (v - LEARNING_RATE * g[n]).astype(v.dtype) for n, v in p.items()}
                  for p, g in zip(model["layers"], grads)]
        return dict(model, layers=layers)


class Torch:
    def __init__(self, module):
        import torch

        self.torch, self.module = torch, module

    def build(self, layers, integration_mode, **flags):
        return self.module.MLSTM.from_canonical(layers, integration_mode=integration_mode, batch_first=True, **flags)

    def canonical(self, model):
        return model.to_canonical()

    def outputs(self, model, xs):
        with self.torch.no_grad():
            return model(self.torch.from_numpy(xs))[0].numpy()

    def sgd_step(self, model, xs):
        model.zero_grad()
        (model(self.torch.from_numpy(xs))[0] ** 2).sum().backward()
        with self.torch.no_grad():
            for p in model.parameters():
                p -= LEARNING_RATE * p.grad
        return model


class Jax:
    def __init__(self, module):
        import jax

        self.jax, self.module = jax, module

    def build(self, layers, integration_mode, **flags):
        with self.jax.enable_x64(True):
            return self.module.MLSTM.from_canonical(layers, integration_mode=integration_mode, **flags)

    def canonical(self, model):
        return model.to_canonical()

    def outputs(self, model, xs):
        with self.jax.enable_x64(True):
            return np.asarray(model(xs)[0])

    def sgd_step(self, model, xs):
        jax = self.jax
        with jax.enable_x64(True):
            grads = jax.grad(lambda m: (m(xs)[0] ** 2).sum())(model)
            return jax.tree_util.tree_map(lambda p, g: p - LEARNING_RATE * g, model, grads)


class TensorFlow:
    """A Keras MLSTM is one layer; a stack is a list of layers chained with return_sequences=True."""

    def __init__(self, module):
        import tensorflow as tf

        self.tf, self.module = tf, module

    def build(self, layers, integration_mode, **flags):
        return [self.module.MLSTM.from_canonical(p, integration_mode=integration_mode, return_sequences=True,
                                                 **flags) for p in layers]

    def canonical(self, model):
        return [mapping for layer in model for mapping in layer.to_canonical()]

    def _run(self, model, xs):
        hs = self.tf.constant(xs)
        for layer in model:
            hs = layer(hs)
        return hs

    def outputs(self, model, xs):
        return self._run(model, xs).numpy()

    def sgd_step(self, model, xs):
        variables = [v for layer in model for v in layer.trainable_variables]
        with self.tf.GradientTape() as tape:
            loss = self.tf.reduce_sum(self._run(model, xs) ** 2)
        for variable, grad in zip(variables, tape.gradient(loss, variables)):
            variable.assign_sub(LEARNING_RATE * grad)
        return model


ADAPTERS = {"torch": Torch, "jax": Jax, "tensorflow": TensorFlow}


def framework(name):
    if name == "spec":
        return Spec()
    reason = backends.missing_reason(name)
    if reason is not None:
        if name in requested_backends():
            pytest.fail(f"MLSTM_BACKENDS requests {name}, but {reason}", pytrace=False)
        pytest.skip(reason)
    return ADAPTERS[name](backends.load(name))  # a missing or broken backend module is an error here


def assert_bit_identical(got, want, what):
    assert len(got) == len(want), what
    for k, (g, w) in enumerate(zip(got, want)):
        assert sorted(g) == sorted(w), (what, k)
        for name in w:
            assert g[name].dtype == w[name].dtype, (what, k, name, g[name].dtype, w[name].dtype)
            assert g[name].tobytes() == w[name].tobytes(), (what, k, name)


def assert_close(actual, expected, dtype, what):
    error, where = relative_error(actual, expected)
    assert error <= tolerance(dtype), f"{what}: relative error {error:.3g} at {where} > {tolerance(dtype)}"


def spec_outputs(layers, xs, mode):
    hs = xs.astype(np.float64)
    for params in layers:
        hs, _ = mlstm_spec.forward({k: v.astype(np.float64) for k, v in params.items()}, hs, integration_mode=mode)
    return hs


def pair_id(pair):
    return f"{pair[0]}->{pair[1]}"


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_file_round_trip_between_frameworks(tmp_path, pair, config):
    cfg = CONFIGS[config]
    source, target = framework(pair[0]), framework(pair[1])
    layers = make_layers(cfg)
    model_a = source.build(layers, cfg["integration_mode"])
    from_a = source.canonical(model_a)
    assert_bit_identical(from_a, layers, f"{pair[0]}.to_canonical after from_canonical")

    path = tmp_path / "model.safetensors"
    mlstm_spec.save(path, from_a, integration_mode=cfg["integration_mode"])
    loaded = mlstm_spec.load(path)
    assert loaded.options == dict(cfg["flags"], integration_mode=cfg["integration_mode"])
    model_b = target.build(loaded.layers, **loaded.options)  # the documented use of a loaded file
    assert_bit_identical(target.canonical(model_b), layers, f"{pair_id(pair)} parameters")

    xs = np.random.default_rng(1).standard_normal((2, 5, 3)).astype(cfg["dtype"])
    out_a, out_b = source.outputs(model_a, xs), target.outputs(model_b, xs)
    assert out_b.dtype == np.dtype(cfg["dtype"])
    assert_close(out_b, out_a, cfg["dtype"], f"{pair_id(pair)} outputs")
    assert_close(out_b, spec_outputs(layers, xs, cfg["integration_mode"]), cfg["dtype"], f"{pair[1]} vs spec")


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_training_continues_identically_in_another_framework(tmp_path, pair):
    cfg = CONFIGS["stack-f64"]
    mode = cfg["integration_mode"]
    source, target = framework(pair[0]), framework(pair[1])
    initial = make_layers(cfg, seed=2)
    xs = np.random.default_rng(3).standard_normal((2, 4, 3))

    model_a = source.build(initial, mode)
    for _ in range(STEPS):
        model_a = source.sgd_step(model_a, xs)
    path = tmp_path / "checkpoint.safetensors"
    mlstm_spec.save(path, source.canonical(model_a), integration_mode=mode, metadata={"step": str(STEPS)})
    loaded = mlstm_spec.load(path)
    assert loaded.metadata == {"step": str(STEPS)}
    model_b = target.build(loaded.layers, **loaded.options)
    assert_bit_identical(target.canonical(model_b), source.canonical(model_a), "checkpoint")

    for _ in range(STEPS):
        model_a = source.sgd_step(model_a, xs)
        model_b = target.sgd_step(model_b, xs)
    final_a, final_b = source.canonical(model_a), target.canonical(model_b)
    moved = max(np.max(np.abs(final_a[k][n] - initial[k][n])) for k in range(len(initial)) for n in initial[k])
    assert moved > 1e-3, "training did not change the parameters; the test would be vacuous"
    for k, (a, b) in enumerate(zip(final_a, final_b)):
        for name in a:
            assert_close(b[name], a[name], "float64", f"{pair_id(pair)} layer {k} {name} after {2 * STEPS} steps")
