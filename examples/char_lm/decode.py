"""One weight file, three frameworks: the trained mLSTM character model decoded greedily in PyTorch,
JAX and Keras.

The recurrent layer is written with :func:`mlstm_spec.save` (framework-neutral, canonical layout;
the vocabulary rides along in its metadata); the embedding table and the output layer, which are
plain matrices, go to a ``.npz`` beside it. Each framework rebuilds the model from these two files
with its own ``MLSTM.from_canonical`` and its own operations for the lookup and the output layer.

Precision: greedy decoding takes an argmax at every step, and one different choice changes the rest
of the text. In float32 the three frameworks round differently (summation order, fused kernels), so
where the two best logits of a step lie closer than that rounding (~1e-6 of their size) the argmax
may differ, and it then depends on arithmetic details rather than on the weights. Decoding therefore
runs in float64 by default (the float32 weights are exactly representable in it): the frameworks'
logits then agree to ~1e-13, far below any top-2 gap that occurs, and :func:`check_frameworks`
reports both numbers, so "identical text" is backed by arithmetic rather than luck.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import mlstm_spec

FRAMEWORKS = ("torch", "jax", "keras")
INTEGRATION_MODE = "addition"  # what models.CharLM builds


def save_char_lm(prefix, model, vocab: str) -> tuple[Path, Path]:
    """Write ``model`` (a :class:`.models.CharLM` with an mLSTM) as ``<prefix>.safetensors`` (the
    recurrent layer) and ``<prefix>_embedding_head.npz``; returns both paths."""
    prefix = Path(prefix)
    if model.kind != "mlstm":
        raise ValueError(f"model must be an mLSTM CharLM, got kind={model.kind!r}")
    weights = mlstm_spec.save(prefix.with_name(prefix.name + ".safetensors"), model.rnn.to_canonical(),
                              integration_mode=INTEGRATION_MODE,
                              metadata={"vocab": json.dumps(vocab),
                                        "model": "examples.char_lm: embedding -> mLSTM -> linear"})
    head = prefix.with_name(prefix.name + "_embedding_head.npz")
    np.savez(head, embedding=_numpy(model.embed.weight), head_weight=_numpy(model.head.weight),
             head_bias=_numpy(model.head.bias))
    return weights, head


def _numpy(parameter):
    return parameter.detach().cpu().numpy().copy()


def load_char_lm(weights, head, dtype: str = "float64"):
    """``(layers, options, matrices, vocab)``: canonical layers and the embedding/output matrices in
    ``dtype``, the layer options and the vocabulary, as read from the two files."""
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    file = mlstm_spec.load(weights)
    if "vocab" not in file.metadata:
        raise ValueError(f"{weights}: no 'vocab' entry in its metadata; write it with save_char_lm")
    layers = [{name: value.astype(dtype) for name, value in layer.items()} for layer in file.layers]
    with np.load(head) as arrays:
        matrices = {name: arrays[name].astype(dtype) for name in ("embedding", "head_weight", "head_bias")}
    return layers, dict(file.options), matrices, json.loads(file.metadata["vocab"])


def torch_runner(layers, options, matrices):
    """``run(ids) -> logits``: feeds ``ids`` (1-D int array) after everything fed before, returns the
    logits after the last one."""
    import torch

    from backends.torch import MLSTM

    rnn = MLSTM.from_canonical(layers, batch_first=True, **options)
    embedding, weight, bias = (torch.from_numpy(matrices[k]) for k in ("embedding", "head_weight", "head_bias"))
    state = None

    def run(ids):
        nonlocal state
        with torch.no_grad():
            hs, state = rnn(embedding[torch.from_numpy(np.asarray(ids, np.int64))][None], state)
            return torch.nn.functional.linear(hs[0, -1], weight, bias).numpy()

    return run


def jax_runner(layers, options, matrices):
    import jax
    import jax.numpy as jnp

    from backends.jax import MLSTM

    x64 = layers[0]["weight_ih"].dtype == np.float64
    with jax.enable_x64(x64):
        model = MLSTM.from_canonical(layers, **options)
        embedding, weight, bias = (jnp.asarray(matrices[k]) for k in ("embedding", "head_weight", "head_bias"))
    state = None

    def run(ids):
        nonlocal state
        with jax.enable_x64(x64):
            hs, state = model(embedding[jnp.asarray(ids)][None], state)
            return np.asarray(weight @ hs[0, -1] + bias)

    return run


def keras_runner(layers, options, matrices):
    import tensorflow as tf

    from backends.tensorflow import MLSTM

    layer = MLSTM.from_canonical(layers, return_sequences=True, return_state=True, **options)
    embedding, weight, bias = (tf.constant(matrices[k]) for k in ("embedding", "head_weight", "head_bias"))
    state = None

    def run(ids):
        nonlocal state
        inputs = tf.gather(embedding, np.asarray(ids, np.int64))[None]
        hs, h, c = layer(inputs) if state is None else layer(inputs, initial_state=state)
        state = [h, c]
        return (tf.linalg.matvec(weight, hs[0, -1]) + bias).numpy()

    return run


RUNNERS = {"torch": torch_runner, "jax": jax_runner, "keras": keras_runner}


def greedy_decode(run, prompt_ids, length: int):
    """``length`` argmax choices after ``prompt_ids``; returns the chosen ids and the (length, V)
    logits each choice was taken from."""
    logits = run(prompt_ids)
    chosen, seen = [], []
    for _ in range(length):
        seen.append(logits)
        chosen.append(int(np.argmax(logits)))
        logits = run([chosen[-1]])
    return chosen, np.stack(seen)


def top2_margins(logits: np.ndarray) -> np.ndarray:
    """Per step, the gap between the largest and the second-largest logit."""
    top = np.sort(logits, axis=-1)
    return top[..., -1] - top[..., -2]


def check_frameworks(weights, head, prompt: str, length: int, *, dtype: str = "float64",
                     frameworks=FRAMEWORKS) -> dict:
    """Greedy decoding of ``length`` characters after ``prompt`` in each framework from the same two
    files. A framework that is not installed is reported as skipped with the reason.

    Returns a dict: ``texts`` (framework -> text), ``skipped`` (framework -> reason), ``identical``,
    ``max_logit_difference`` (largest |difference| from the first framework's logits over the steps
    where all chose alike), ``min_top2_margin`` (smallest gap between its two best logits),
    ``summary``, and ``logits`` (framework -> one list of logits per decoded character)."""
    layers, options, matrices, vocab = load_char_lm(weights, head, dtype)
    lookup = {ch: i for i, ch in enumerate(vocab)}
    unknown = sorted(set(prompt) - set(lookup))
    if unknown:
        raise ValueError(f"prompt has characters outside the model's vocabulary: {unknown!r}")
    prompt_ids = np.array([lookup[ch] for ch in prompt], np.int64)
    texts, logits, skipped = {}, {}, {}
    for name in frameworks:
        if name not in RUNNERS:
            raise ValueError(f"frameworks must be among {FRAMEWORKS}, got {name!r}")
        try:
            run = RUNNERS[name](layers, options, matrices)
        except ImportError as error:
            skipped[name] = f"{name} is not installed ({error})"
            continue
        ids, logits[name] = greedy_decode(run, prompt_ids, length)
        texts[name] = prompt + "".join(vocab[i] for i in ids)
    identical = len(set(texts.values())) == 1
    reference = next(iter(logits.values()), None)
    agree = length
    for name in texts:  # compare logits only where every framework had chosen the same so far
        mismatch = [k for k, (a, b) in enumerate(zip(texts[name][len(prompt):],
                                                    next(iter(texts.values()))[len(prompt):])) if a != b]
        if mismatch:
            agree = min(agree, mismatch[0] + 1)
    difference = max((float(np.max(np.abs(v[:agree] - reference[:agree]))) for v in logits.values()), default=0.0)
    margin = float(np.min(top2_margins(reference))) if reference is not None else float("nan")
    decoded = ", ".join(texts) or "none"
    summary = (f"greedy decoding of {length} characters after {prompt!r} in {dtype} from one weight file: "
               f"{'identical' if identical else 'DIFFERENT'} text in {decoded}; largest logit difference "
               f"{difference:.1e}, smallest gap between the two best logits {margin:.1e}")
    if skipped:
        summary += "; skipped: " + "; ".join(skipped.values())
    if not identical:
        summary += "\n" + "\n".join(f"[{name}] {text!r}" for name, text in texts.items())
    else:
        summary += "\n" + next(iter(texts.values()))
    return {"texts": texts, "skipped": skipped, "identical": identical, "dtype": dtype,
            "max_logit_difference": difference, "min_top2_margin": margin, "summary": summary,
            "logits": {name: value.tolist() for name, value in logits.items()}}
