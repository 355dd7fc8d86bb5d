"""Train an mLSTM and an LSTM character model side by side on Tiny Shakespeare, and compare them.

Run from the repository root::

    python -m examples.char_lm --plot docs/example-char-lm-loss.png      # the default run
    python -m examples.char_lm --quick                                   # seconds: a smoke run

Both models (embedding -> recurrent layer -> linear; see :mod:`.models`) have the same parameter count
within 2 %, and are trained in lockstep: at every step the same batch of windows goes first through
the mLSTM's training step, then through the LSTM's, with the same optimiser settings. Alternating the
two also spreads any change in machine load evenly over both, so their times stay comparable; each
model's clock counts only its own training steps (not evaluation).

At the end: a table of validation loss (nats and bits per character, over the whole validation part),
a plot of training and validation loss against steps and against training time, a sampled text from
each model, and the framework-agnostic check: the trained mLSTM is written with ``mlstm_spec.save``
(its embedding and output layer beside it), read back into PyTorch, JAX and Keras, and decoded
greedily from the same prompt in each (:mod:`.decode`). Everything is also written to
``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from . import data

DEFAULT_OUT = Path(__file__).with_name("output")
LN2 = math.log(2)
PROMPT = "ROMEO:\n"


@dataclass(frozen=True)
class Config:
    embed_size: int = 64
    hidden_size: int = 512  # the mLSTM's; the LSTM's is chosen to match the parameter count
    batch_size: int = 32
    seq_len: int = 128
    steps: int = 1200
    learning_rate: float = 3e-3  # Adam; cosine decay to a tenth of it by the last step
    clip_norm: float = 1.0
    eval_every: int = 100
    eval_streams: int = 64  # the validation text as this many contiguous streams
    eval_chunk: int = 256  # characters per forward pass of each stream; the state carries over
    eval_chunks_during_training: int = 1  # periodic validation reads this many chunks of each stream
    seed: int = 0
    threads: int = 2
    sample_length: int = 400
    temperature: float = 0.8
    greedy_length: int = 200


QUICK = Config(embed_size=16, hidden_size=32, batch_size=8, seq_len=32, steps=60, eval_every=20,
               eval_streams=16, eval_chunk=64, sample_length=80, greedy_length=40, threads=1)


@dataclass
class History:
    steps: list = field(default_factory=list)
    seconds: list = field(default_factory=list)  # this model's training time so far
    train_loss: list = field(default_factory=list)
    val_steps: list = field(default_factory=list)
    val_seconds: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)


def learning_rate(config: Config, step: int) -> float:
    """Cosine decay from ``learning_rate`` at step 0 to a tenth of it at the last step."""
    progress = min(step / max(config.steps - 1, 1), 1.0)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def evaluate(model, streams: np.ndarray, chunk: int, max_chunks: int | None = None) -> float:
    """Mean cross-entropy in nats per character over ``streams`` (B, N): every character after the
    first of each stream is predicted, reading the stream in chunks with the state carried over."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    total, count, state = 0.0, 0, None
    stop = streams.shape[1] - 1
    if max_chunks is not None:
        stop = min(stop, max_chunks * chunk)
    with torch.no_grad():
        for start in range(0, stop, chunk):
            end = min(start + chunk, stop)
            inputs = torch.from_numpy(streams[:, start:end])
            targets = torch.from_numpy(streams[:, start + 1:end + 1])
            logits, state = model(inputs, state)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                     reduction="sum").item()
            count += targets.numel()
    model.train(was_training)
    return total / count


def sample(model, corpus: data.Corpus, prompt: str, length: int, temperature: float, seed: int) -> str:
    """``prompt`` continued by ``length`` characters drawn from the model at ``temperature``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    model.eval()
    ids = torch.from_numpy(corpus.encode(prompt).astype(np.int64))[None]
    out = []
    with torch.no_grad():
        logits, state = model(ids)
        for _ in range(length):
            probabilities = torch.softmax(logits[0, -1] / temperature, dim=-1)
            next_id = torch.multinomial(probabilities, 1, generator=generator)
            out.append(int(next_id))
            logits, state = model(next_id[None], state)
    return prompt + corpus.decode(out)


def machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def train(config: Config, out: Path, *, plot: Path | None = None, check_frameworks: bool = True,
          progress: bool = True) -> dict:
    """Train both models, write the outputs under ``out`` (and the plot to ``plot``, default
    ``out/loss.png``), print the summary, and return everything that ``results.json`` holds."""
    import torch
    import torch.nn.functional as F

    from . import decode, models

    torch.set_num_threads(config.threads)
    out.mkdir(parents=True, exist_ok=True)
    plot = out / "loss.png" if plot is None else plot
    corpus = data.load()
    vocab_size = len(corpus.vocab)
    mlstm, lstm = models.build_pair(vocab_size, config.embed_size, config.hidden_size, seed=config.seed)
    named = {"mLSTM": mlstm, "LSTM": lstm}
    counts = {name: models.parameter_count(m) for name, m in named.items()}
    hidden = {"mLSTM": config.hidden_size, "LSTM": lstm.rnn.hidden_size}
    for name in named:
        print(f"{name:>5}: hidden size {hidden[name]}, {counts[name]:,} parameters")
    print(f"parameter counts differ by {abs(counts['LSTM'] - counts['mLSTM']) / counts['mLSTM']:.2%}")

    optimisers = {name: torch.optim.Adam(m.parameters(), lr=config.learning_rate) for name, m in named.items()}
    histories = {name: History() for name in named}
    clocks = dict.fromkeys(named, 0.0)
    running = dict.fromkeys(named, math.log(vocab_size))
    validation = data.streams(corpus.validation, config.eval_streams)

    def periodic_validation(step):
        for name, m in named.items():
            history = histories[name]
            history.val_steps.append(step)
            history.val_seconds.append(clocks[name])
            history.val_loss.append(evaluate(m, validation, config.eval_chunk, config.eval_chunks_during_training))

    bar = _progress_bar(config.steps, progress)
    started = time.perf_counter()
    load_before = _load_average()
    periodic_validation(0)
    windows = data.training_windows(corpus.train, steps=config.steps, batch_size=config.batch_size,
                                    seq_len=config.seq_len, seed=config.seed)
    for step, (inputs, targets) in enumerate(windows, start=1):
        inputs, targets = torch.from_numpy(inputs), torch.from_numpy(targets)
        rate = learning_rate(config, step - 1)
        for name, m in named.items():
            tick = time.perf_counter()
            for group in optimisers[name].param_groups:
                group["lr"] = rate
            logits, _ = m(inputs)
            loss = F.cross_entropy(logits.reshape(-1, vocab_size), targets.reshape(-1))
            optimisers[name].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), config.clip_norm)
            optimisers[name].step()
            value = loss.item()
            clocks[name] += time.perf_counter() - tick
            if not math.isfinite(value):
                raise FloatingPointError(f"{name} training loss became {value} at step {step}")
            running[name] = 0.95 * running[name] + 0.05 * value
            history = histories[name]
            history.steps.append(step)
            history.seconds.append(clocks[name])
            history.train_loss.append(value)
        if step % config.eval_every == 0 or step == config.steps:
            periodic_validation(step)
            bar.write(f"step {step}: validation " + ", ".join(
                f"{name} {histories[name].val_loss[-1]:.3f}" for name in named) + " nats/char; training time "
                + ", ".join(f"{name} {clocks[name]:.0f} s" for name in named))
        bar.set_postfix_str(" ".join(f"{name} {running[name]:.3f}" for name in named), refresh=False)
        bar.update(1)
    bar.close()
    training_wall = time.perf_counter() - started

    final = {name: evaluate(m, validation, config.eval_chunk) for name, m in named.items()}
    samples = {name: sample(m, corpus, PROMPT, config.sample_length, config.temperature, config.seed)
               for name, m in named.items()}
    weights, head = decode.save_char_lm(out / "mlstm", mlstm, corpus.vocab)
    results = {
        "config": asdict(config),
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
        "load_average_before_after": [load_before, _load_average()],
        "parameters": counts,
        "hidden_size": hidden,
        "validation_nats": final,
        "validation_bits": {name: value / LN2 for name, value in final.items()},
        "training_seconds": clocks,
        "wall_seconds": training_wall,
        "total_seconds": time.perf_counter() - started,
        "histories": {name: asdict(h) for name, h in histories.items()},
        "samples": samples,
        "frameworks": None,
        "files": {"weights": str(weights), "head": str(head), "plot": str(plot)},
    }
    # Written before the three-framework check, so that a failure there loses no training results.
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_plot(results, plot)
    print(summary(results))
    if check_frameworks:
        agreement = decode.check_frameworks(weights, head, PROMPT, config.greedy_length)
        results["frameworks"] = {key: value for key, value in agreement.items() if key != "logits"}
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print("\n" + results["frameworks"]["summary"])
    return results


def summary(results: dict) -> str:
    """The end-of-run report: the table (Markdown), times, samples and the three-framework check."""
    lines = ["", "| model | hidden | parameters | validation nats/char | bits/char | training time s |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in results["parameters"]:
        lines.append(f"| {name} | {results['hidden_size'][name]} | {results['parameters'][name]:,} | "
                     f"{results['validation_nats'][name]:.4f} | {results['validation_bits'][name]:.4f} | "
                     f"{results['training_seconds'][name]:.1f} |")
    seconds = results["training_seconds"]
    lines.append("")
    lines.append(f"{results['config']['steps']} steps each; wall time {results['wall_seconds']:.0f} s "
                 f"for training both (with periodic validation), {results['total_seconds']:.0f} s with "
                 f"the final validation, samples and saving; mLSTM time / LSTM time = {seconds['mLSTM'] / seconds['LSTM']:.2f}; "
                 f"{results['machine']}, {results['torch_threads']} torch threads, load average "
                 f"{results['load_average_before_after'][0]} before, {results['load_average_before_after'][1]} after")
    for name, text in results["samples"].items():
        lines += ["", f"--- {name} sample (temperature {results['config']['temperature']}) ---", text]
    return "\n".join(lines)


def write_plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the plot needs matplotlib: pip install -e '.[examples]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colours = {"mLSTM": "tab:blue", "LSTM": "tab:orange"}
    for name, history in results["histories"].items():
        smooth = _moving_average(history["train_loss"], 25)
        for axis, x, val_x in ((axes[0], history["steps"], history["val_steps"]),
                               (axes[1], history["seconds"], history["val_seconds"])):
            axis.plot(x, smooth, color=colours[name], alpha=0.55, linewidth=1,
                      label=f"{name} training (25-step mean)")
            axis.plot(val_x, history["val_loss"], "o--", color=colours[name], markersize=3.5,
                      label=f"{name} validation")
    axes[0].set_xlabel("training step")
    axes[1].set_xlabel("training time of the model, seconds")
    axes[0].set_ylabel("loss, nats per character")
    counts = results["parameters"]
    figure.suptitle(f"Tiny Shakespeare, {counts['mLSTM']:,} vs {counts['LSTM']:,} parameters, "
                    f"seed {results['config']['seed']}; {results['machine']}, {results['torch_threads']} threads")
    # From just above the first validation after step 0 (the start, ~ln V, would squash the tail)
    # down to the lowest training loss.
    histories = results["histories"].values()
    later = [h["val_loss"][1] for h in histories if len(h["val_loss"]) > 1]
    top = min(max(h["val_loss"][0] for h in histories), max(later, default=np.inf) + 0.3)
    bottom = min(min(_moving_average(h["train_loss"], 25).min(), min(h["val_loss"])) for h in histories)
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.set_ylim(bottom - 0.05, top + 0.05)
    axes[0].legend(fontsize=8, loc="upper right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _moving_average(values, window):
    values = np.asarray(values, dtype=np.float64)
    sums = np.cumsum(np.insert(values, 0, 0.0))
    lengths = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.arange(1, len(values) + 1) - lengths]) / lengths


def _load_average():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _progress_bar(total, enabled):
    try:
        from tqdm import tqdm
    except ImportError:
        raise SystemExit("the progress bar needs tqdm: pip install -e '.[examples]'") from None
    # Outside a terminal (a log file), fewer updates: each one is a line.
    interval = 0.5 if sys.stderr.isatty() else 30
    return tqdm(total=total, unit="step", disable=not enabled, mininterval=interval, dynamic_ncols=True)


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m examples.char_lm",
        description="Train an mLSTM and an LSTM of equal parameter count on Tiny Shakespeare, side by "
                    "side, and compare validation loss; then decode the mLSTM greedily in PyTorch, JAX "
                    "and Keras from one weight file.")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model for a few dozen steps (seconds): checks the pipeline, not the claim")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="directory for results.json, the weight files and (by default) the plot; "
                             "default: %(default)s")
    parser.add_argument("--plot", type=Path, default=None, help="where to write the PNG (default: OUT/loss.png)")
    for name in ("steps", "hidden_size", "embed_size", "batch_size", "seq_len", "eval_every", "threads"):
        parser.add_argument("--" + name.replace("_", "-"), type=_positive_int, default=None,
                            help=f"default {getattr(Config(), name)} ({getattr(QUICK, name)} with --quick)")
    parser.add_argument("--learning-rate", type=_positive_float, default=None,
                        help=f"Adam's peak learning rate, default {Config().learning_rate}")
    parser.add_argument("--seed", type=int, default=0, help="data order and initialisation, default 0")
    parser.add_argument("--no-frameworks", action="store_true",
                        help="skip the JAX and Keras greedy-decoding check")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--replot", type=Path, default=None, metavar="RESULTS_JSON",
                        help="train nothing: redraw the plot of an earlier run's results.json (to --plot, "
                             "default: loss.png beside it)")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else Config()
    overrides = {name: getattr(args, name) for name in
                 ("steps", "hidden_size", "embed_size", "batch_size", "seq_len", "eval_every", "threads",
                  "learning_rate") if getattr(args, name) is not None}
    config = replace(config, seed=args.seed, **overrides)
    return args, config


def main(argv=None) -> dict:
    args, config = parse_args(argv)
    if args.replot is not None:
        results = json.loads(args.replot.read_text())
        write_plot(results, args.plot or args.replot.with_name("loss.png"))
        return results
    return train(config, args.out, plot=args.plot, check_frameworks=not args.no_frameworks,
                 progress=not args.no_progress)
