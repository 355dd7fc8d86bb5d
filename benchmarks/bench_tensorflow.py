"""Speed of ``backends.tensorflow.MLSTM`` against ``keras.layers.LSTM``, side by side in one process.

For each size, forward and forward+backward (gradients of every weight) are timed for:

- ``keras.layers.LSTM`` inside ``tf.function`` (what ``model.fit`` runs on a CPU: Keras leaves XLA off
  there), and inside ``tf.function(jit_compile=True)``;
- ``MLSTM`` with its fused path (the default), with the fused path compiled by XLA
  (``jit_compile=True``), and with the generic ``keras.layers.RNN`` loop (``use_fused=False``).

Every variant is warmed up (tracing, XLA compilation), then the variants are run in turn, round after
round, so that a change in machine load hits all of them alike; the table reports medians and the
ratios of medians measured in this one run. Not part of the test command::

    python benchmarks/bench_tensorflow.py                      # writes docs/performance-tensorflow.md
    python benchmarks/bench_tensorflow.py --repeats 5 --no-write
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from backends.tensorflow import MLSTM  # noqa: E402
from _common import draw_chart, machine  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

#: (B, T, I, H) of the issue.
SIZES = ((32, 128, 64, 256), (64, 100, 512, 512))

#: name -> (layer factory, outer jit_compile)
VARIANTS = {
    "keras LSTM": (lambda h: keras.layers.LSTM(h, return_sequences=True), False),
    "keras LSTM + XLA": (lambda h: keras.layers.LSTM(h, return_sequences=True), True),
    "MLSTM fused": (lambda h: MLSTM(h, return_sequences=True), False),
    "MLSTM fused + XLA": (lambda h: MLSTM(h, return_sequences=True, jit_compile=True), False),
    "MLSTM generic loop": (lambda h: MLSTM(h, return_sequences=True, use_fused=False), False),
}

#: (numerator, denominator, what it says)
RATIOS = (
    ("MLSTM fused", "keras LSTM", "fused path vs LSTM, both as `model.fit` runs them on CPU"),
    ("MLSTM fused + XLA", "keras LSTM + XLA", "both compiled by XLA"),
    ("MLSTM fused + XLA", "keras LSTM", "MLSTM with `jit_compile=True` vs LSTM default"),
    ("MLSTM generic loop", "keras LSTM", "generic `keras.layers.RNN` loop (`use_fused=False`)"),
)


HEADER = """# TensorFlow backend: speed against keras.layers.LSTM

![Time ratios from the table below, drawn by benchmarks/_common.py](img/performance-tensorflow.png)

Written by `benchmarks/bench_tensorflow.py` (not part of the test command). Every variant runs inside
`tf.function`, as `model.fit` runs a model, on the same input in one process; variants take turns,
round after round, so a change in machine load hits them alike. Forward+backward takes the gradient of
every weight. Only the ratios, taken within one run, are meaningful: absolute times depend on the
machine and its load.

Variants:

- **keras LSTM**: `keras.layers.LSTM` inside `tf.function` -- what `model.fit` runs on a CPU (Keras
  turns XLA off on CPU-only machines);
- **keras LSTM + XLA**: the same inside `tf.function(jit_compile=True)`;
- **MLSTM fused**: `backends.tensorflow.MLSTM` with its default fused path (the input projection of the
  whole sequence as one matrix product, one graph loop, a hand-written backward pass);
- **MLSTM fused + XLA**: the same layer with `jit_compile=True`;
- **MLSTM generic loop**: `MLSTM(use_fused=False)`, Keras's generic `keras.layers.RNN` loop over
  `MLSTMCell` (one input product per step, autodiff through the loop).

`--clock cpu` measures the CPU time of the whole process instead of elapsed time: on a machine shared
with other work it is the steadier figure, and with `--threads 1` it compares the work each variant
does.

"""


def make_functions(layer, jit_compile, x):
    layer(x)  # build
    weights = layer.trainable_weights

    def forward(x):
        return layer(x)

    def forward_backward(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x))
        return tape.gradient(loss, weights)

    return (tf.function(forward, jit_compile=jit_compile),
            tf.function(forward_backward, jit_compile=jit_compile))


#: wall: elapsed time (what a user waits). cpu: CPU time of the whole process, every thread -- less
#: sensitive to other processes competing for the cores, useful on a shared machine.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def run_once(function, x, clock) -> float:
    start = clock()
    result = function(x)
    for tensor in tf.nest.flatten(result):
        tensor.numpy()  # wait for the computation
    return clock() - start


def bench_size(size, variants, repeats, warmup, seed, clock):
    batch, steps, inputs, hidden = size
    x = tf.constant(np.random.default_rng(seed).standard_normal((batch, steps, inputs)), tf.float32)
    functions = {}
    for name in variants:
        factory, jit = VARIANTS[name]
        keras.utils.set_random_seed(seed)
        functions[name] = dict(zip(("forward", "forward+backward"), make_functions(factory(hidden), jit, x)))
    times = {(name, kind): [] for name in variants for kind in ("forward", "forward+backward")}
    for kind in ("forward", "forward+backward"):
        for name in variants:
            for _ in range(warmup):
                run_once(functions[name][kind], x, clock)
        for _ in range(repeats):
            for name in variants:
                times[name, kind].append(run_once(functions[name][kind], x, clock))
    return {key: statistics.median(values) for key, values in times.items()}


def markdown(results, variants):
    lines = [
        "| B | T | I | H | pass | " + " | ".join(f"{v} (ms)" for v in variants) + " |",
        "|---|---|---|---|---|" + "---|" * len(variants),
    ]
    for size, medians in results.items():
        for kind in ("forward", "forward+backward"):
            cells = " | ".join(f"{medians[v, kind] * 1e3:.1f}" for v in variants)
            lines.append(f"| {' | '.join(map(str, size))} | {kind} | {cells} |")
    lines += ["", "Ratios of medians (lower is faster for MLSTM):", "",
              "| B | T | I | H | pass | ratio | value |", "|---|---|---|---|---|---|---|"]
    for size, medians in results.items():
        for kind in ("forward", "forward+backward"):
            for top, bottom, what in RATIOS:
                if top in variants and bottom in variants:
                    ratio = medians[top, kind] / medians[bottom, kind]
                    lines.append(f"| {' | '.join(map(str, size))} | {kind} | {top} / {bottom} ({what}) "
                                 f"| {ratio:.2f} |")
    return "\n".join(lines)




def gpu_note() -> str:
    gpus = tf.config.list_physical_devices("GPU")
    return f", GPUs: {len(gpus)}" if gpus else ", no GPU"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds per variant (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per variant first")
    parser.add_argument("--size", action="append", metavar="B,T,I,H",
                        help="size to run (repeatable); default: the two sizes of the issue")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time (default); cpu: process CPU time of all threads")
    parser.add_argument("--threads", type=int, default=0,
                        help="TensorFlow intra- and inter-op threads (default 0: TensorFlow decides)")
    parser.add_argument("--output", default=str(ROOT / "docs" / "performance-tensorflow.md"))
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--append", action="store_true",
                        help="add this run to the output file instead of replacing the file")
    args = parser.parse_args(argv)
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    sizes = [tuple(int(v) for v in s.split(",")) for s in args.size] if args.size else list(SIZES)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    results = {}
    for size in sizes:
        print(f"B, T, I, H = {size} ...", file=sys.stderr, flush=True)
        results[size] = bench_size(size, variants, args.repeats, args.warmup, args.seed, CLOCKS[args.clock])
    table = markdown(results, variants)
    command = " ".join(["python benchmarks/bench_tensorflow.py", *(sys.argv[1:] if argv is None else argv)])
    section = (
        f"## `{command}`\n\n"
        f"Measured {datetime.date.today().isoformat()}: float32, {args.clock}-clock medians of "
        f"{args.repeats} interleaved rounds after {args.warmup} warm-up runs per variant; "
        f"{args.threads or 'default (TensorFlow decides)'} intra-/inter-op threads.\n\n"
        f"Machine: {machine()}{gpu_note()}. TensorFlow {tf.__version__}, Keras {keras.__version__}, "
        f"NumPy {np.__version__}, Python {platform.python_version()}.\n\n" + table + "\n"
    )
    print(section)
    if args.no_write:
        return
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if args.append and output.exists():
        output.write_text(output.read_text().rstrip("\n") + "\n\n" + section)
    else:
        output.write_text(HEADER + section)
    print(f"written to {output}", file=sys.stderr)
    print(draw_chart(output, "TensorFlow backend"), file=sys.stderr)


if __name__ == "__main__":
    main()
