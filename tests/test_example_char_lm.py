"""examples/char_lm: the data split, equal parameter counts, a --quick run whose loss falls, and greedy
decoding from one weight file that gives the same text in PyTorch, JAX and Keras."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import require_backend, requested_backends
from mlstm_spec.conformance.tolerances import FLOOR, relative_error, tolerance

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # examples/ is not installed with the package; it runs from the repository
    sys.path.insert(0, str(ROOT))

from examples.char_lm import data  # noqa: E402

require_backend("torch")  # the example trains with PyTorch: a skip with the reason, or a failure in CI
import torch  # noqa: E402


def test_split_takes_the_last_tenth_for_validation_and_the_vocabulary_from_training():
    text = "abcd" * 22 + "ab" + "dcbabadcab"  # 90 characters, then the last 10
    corpus = data.split(text)
    assert corpus.decode(corpus.train) == text[:90]
    assert corpus.decode(corpus.validation) == text[90:]
    assert corpus.vocab == "abcd"
    with pytest.raises(ValueError, match=r"validation part.*\['z'\]"):
        data.split("abcd" * 22 + "ab" + "cdabzdabcd")  # 'z' appears only in the last tenth


def test_the_shipped_corpus_is_split_as_documented():
    text = data.CORPUS.read_text(encoding="utf-8")
    corpus = data.load()
    assert len(text) == 1_115_394  # Tiny Shakespeare as char-rnn distributes it
    boundary = len(text) - len(corpus.validation)
    assert boundary == int(0.9 * len(text))
    assert corpus.decode(corpus.validation[:1000]) == text[boundary:boundary + 1000]
    assert corpus.vocab == "".join(sorted(set(text[:boundary])))


def test_training_windows_depend_on_the_seed_only_and_targets_are_the_next_characters():
    train = np.arange(200, dtype=np.uint8)
    first = list(data.training_windows(train, steps=3, batch_size=4, seq_len=10, seed=7))
    again = list(data.training_windows(train, steps=3, batch_size=4, seq_len=10, seed=7))
    other = list(data.training_windows(train, steps=3, batch_size=4, seq_len=10, seed=8))
    for (x, y), (x2, y2) in zip(first, again):
        assert np.array_equal(x, x2) and np.array_equal(y, y2)
        assert np.array_equal(x[:, 1:], y[:, :-1]) and np.array_equal(y[:, -1], x[:, -1] + 1)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, other))


@pytest.mark.parametrize("vocab_size, embed_size, hidden_size", [(65, 64, 512), (65, 16, 32), (30, 8, 100)])
def test_the_lstm_is_matched_to_the_mlstms_parameter_count(vocab_size, embed_size, hidden_size):
    from examples.char_lm import models

    mlstm, lstm = models.build_pair(vocab_size, embed_size, hidden_size, seed=0)
    counted = {name: sum(p.numel() for p in m.parameters()) for name, m in (("mlstm", mlstm), ("lstm", lstm))}
    # The count formula the search uses, against the real nn.LSTM model's parameters.
    assert models.lstm_parameter_count(vocab_size, embed_size, lstm.rnn.hidden_size) == counted["lstm"]
    assert abs(counted["lstm"] - counted["mlstm"]) <= 0.02 * counted["mlstm"]
    # The nearest size: one unit more or fewer moves the count further away.
    for neighbour in (lstm.rnn.hidden_size - 1, lstm.rnn.hidden_size + 1):
        gap = abs(models.lstm_parameter_count(vocab_size, embed_size, neighbour) - counted["mlstm"])
        assert gap >= abs(counted["lstm"] - counted["mlstm"])


def test_bad_command_line_values_are_refused_with_the_argument_named(capsys):
    from examples.char_lm import train

    with pytest.raises(SystemExit):
        train.parse_args(["--steps", "0"])
    assert "--steps: expected a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--learning-rate", "nan"])
    assert "--learning-rate: expected a positive number, got nan" in capsys.readouterr().err


def test_quick_run_trains_both_models_and_their_loss_falls(tmp_path, capsys):
    pytest.importorskip("tqdm", reason="the example's progress bar needs tqdm (the examples extra)")
    pytest.importorskip("matplotlib", reason="the example's plot needs matplotlib (the examples extra)")
    pytest.importorskip("safetensors", reason="the example saves the mLSTM with mlstm_spec.save (io extra)")
    from examples.char_lm import train

    results = train.main(["--quick", "--out", str(tmp_path), "--no-progress", "--no-frameworks"])
    printed = capsys.readouterr().out
    for name, history in results["histories"].items():
        val = history["val_loss"]
        assert val[-1] < val[0], f"{name}: validation loss {val[0]:.3f} at step 0, {val[-1]:.3f} at the end"
        early, late = np.mean(history["train_loss"][:10]), np.mean(history["train_loss"][-10:])
        assert late < early, f"{name}: training loss {early:.3f} over the first 10 steps, {late:.3f} over the last"
        assert f"| {name} | {results['hidden_size'][name]} | {results['parameters'][name]:,} |" in printed
    assert json.loads((tmp_path / "results.json").read_text())["validation_nats"] == results["validation_nats"]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "mlstm.safetensors").exists()


def _require_frameworks():
    missing = [name for name, module in (("jax", "jax"), ("tensorflow", "tensorflow"), ("safetensors", "safetensors"))
               if importlib.util.find_spec(module) is None]
    if missing:
        if requested_backends() & set(missing):
            pytest.fail(f"decoding in three frameworks needs {missing}, which are required here but missing")
        pytest.skip(f"decoding in three frameworks needs {missing}")


def test_greedy_decoding_from_one_weight_file_is_identical_in_torch_jax_and_keras(tmp_path):
    _require_frameworks()
    from examples.char_lm import decode, models

    vocab = data.load().vocab
    torch.manual_seed(3)
    model = models.CharLM("mlstm", len(vocab), 8, 24)
    with torch.no_grad():  # larger than Glorot-initial weights, so the recurrence is not near-linear
        for parameter in model.parameters():
            parameter.mul_(2.0)
    weights, head = decode.save_char_lm(tmp_path / "model", model, vocab)
    result = decode.check_frameworks(weights, head, "ROMEO:\n", 40, dtype="float64")

    assert not result["skipped"], result["skipped"]
    assert set(result["texts"]) == {"torch", "jax", "keras"}
    logits = {name: np.asarray(value) for name, value in result["logits"].items()}
    # The float64 entry of the one table: 1e-10, against errors of ~1e-15 here. Its budget assumes
    # <= 8 steps and sizes <= 8; this model runs ~47 steps at H=24, but its forget gates (< 1) damp
    # earlier rounding instead of amplifying it, and what we measured stays ~1e-15.
    limit = tolerance("float64", "cpu")
    for name in ("jax", "keras"):
        error, where = relative_error(logits[name], logits["torch"])
        assert error <= limit, f"{name} logits differ from torch's by {error:.1e} (relative) at {where}"
    # Identical argmax choices then follow from arithmetic, not luck, when every step's two best logits
    # are further apart than twice the largest difference the tolerance allows.
    scale = max(float(np.max(np.abs(logits["torch"]))), FLOOR)
    assert result["min_top2_margin"] > 2 * limit * scale, (
        f"a near-tie (top-2 gap {result['min_top2_margin']:.1e}) makes the argmax comparison meaningless; "
        "choose another prompt or seed")
    assert result["identical"], result["summary"]
    texts = list(result["texts"].values())
    assert texts[0] == texts[1] == texts[2] and texts[0].startswith("ROMEO:\n") and len(texts[0]) == 47
    # The decoded text depends on the weights: another model decodes differently.
    torch.manual_seed(4)
    other = models.CharLM("mlstm", len(vocab), 8, 24)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.mul_(2.0)
    weights, head = decode.save_char_lm(tmp_path / "other", other, vocab)
    assert decode.check_frameworks(weights, head, "ROMEO:\n", 40, frameworks=("torch",))["texts"]["torch"] != texts[0]
