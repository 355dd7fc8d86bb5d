"""Time the JAX mLSTM against a plain JAX LSTM written the same way, side by side in one process.

Compared, at each size (B, T, I, H), one layer, batch-major input (B, T, I), under ``jax.jit``:

- ``MLSTM``: this project's module (``backends.jax.MLSTM``): the input projection of all steps as one
  matrix product, then one ``lax.scan`` over time;
- ``LSTM``: a plain LSTM built the same way (hoisted projection, ``lax.scan``, one ``(4H, H)``
  recurrent product per step), defined in this file. It does 4/5 of the mLSTM's multiply-adds
  (per step: ``4H*(I+H)`` against ``5H*I + H*H + 4H*H``).

With ``--dtype bfloat16`` or ``float16`` the MLSTM computes in float32 between two casts (see
``backends.jax``), while the LSTM baseline computes in the given dtype.

float32 means float32 on a GPU too: the float32 runs trace under
``jax.default_matmul_precision("highest")`` (JAX's default lets a GPU use TF32 for float32 matrix
products), as ``bench_torch.py`` turns TF32 off, so that the two scripts' GPU figures compare.

"forward" computes the outputs; "forward+backward" is ``jax.grad`` of ``sum(hs)`` with respect to the
parameters and the input. Each repeat runs both implementations in turn, so that a change of machine
load affects both alike; the table reports medians over the repeats after warm-up runs, and ratios of
medians. Compile time is the first call's ``lower`` + ``compile`` of the forward+backward function at
T=128 and T=1024 (median over fresh compilations with the caches cleared): ``lax.scan`` keeps it
independent of T.

Usage::

    python benchmarks/bench_jax.py                               # both sizes, 11 repeats
    python benchmarks/bench_jax.py --repeats 21 --output docs/performance-jax.md
    python benchmarks/bench_jax.py --sizes 32,128,64,256 --dtype bfloat16

It is not part of the test command.
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

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends import jax as mlstm_jax  # noqa: E402
# benchmarks/ is on sys.path when this runs as a script
from _common import (JAX_FLOAT32_PRECISION, SIZES, chart_markdown, draw_chart, machine, parse_size,  # noqa: E402
                     ratio_table)

DEFAULT_SIZES = SIZES
COMPILE_STEPS = (128, 1024)
IMPLEMENTATIONS = ("MLSTM", "LSTM")


# ---- the baseline: an LSTM written like backends.jax writes the mLSTM ----

def lstm_init(key, input_size, hidden_size, dtype):
    k_ih, k_hh = jax.random.split(key)
    bound = 1 / np.sqrt(hidden_size)
    return {
        "weight_ih": jax.random.uniform(k_ih, (4 * hidden_size, input_size), dtype, -bound, bound),
        "weight_hh": jax.random.uniform(k_hh, (4 * hidden_size, hidden_size), dtype, -bound, bound),
        "bias": jnp.zeros((4 * hidden_size,), dtype),
    }


def lstm(params, xs):
    """xs (B, T, I) -> hs (B, T, H), gates in order i, f, g, o, state starting at zeros."""
    hidden = params["weight_hh"].shape[1]
    p_all = lax.dot_general(jnp.swapaxes(xs, 0, 1), params["weight_ih"], (((2,), (1,)), ((), ()))) + params["bias"]
    w_hh = params["weight_hh"]

    def step(carry, p_t):
        h, c = carry
        a = p_t + lax.dot_general(h, w_hh, (((1,), (1,)), ((), ())))
        ifo = jax.nn.sigmoid(jnp.concatenate([a[:, : 2 * hidden], a[:, 3 * hidden :]], axis=1))
        i, f, o = ifo[:, :hidden], ifo[:, hidden : 2 * hidden], ifo[:, 2 * hidden :]
        c = f * c + i * jnp.tanh(a[:, 2 * hidden : 3 * hidden])
        h = o * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((xs.shape[0], hidden), xs.dtype)
    _, hs = lax.scan(step, (zeros, zeros), p_all)
    return jnp.swapaxes(hs, 0, 1)


def build(name, input_size, hidden_size, dtype, unroll):
    key = jax.random.key(0)
    if name == "MLSTM":
        model = mlstm_jax.MLSTM(input_size, hidden_size, key=key, dtype=dtype, unroll=unroll)
        return model, lambda model, xs: model(xs)[0]
    if name == "LSTM":
        return lstm_init(key, input_size, hidden_size, dtype), lstm
    raise ValueError(f"unknown implementation {name!r}")


def compiled_functions(apply):
    forward = jax.jit(apply)
    loss = lambda params, xs: jnp.sum(apply(params, xs).astype(jnp.float32))  # noqa: E731
    forward_backward = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return {"forward": forward, "forward+backward": forward_backward}


def time_once(function, params, xs):
    start = time.perf_counter()
    jax.block_until_ready(function(params, xs))
    return time.perf_counter() - start


def run_size(size, repeats, warmup, dtype, unroll):
    B, T, I, H = size
    xs = jax.random.normal(jax.random.key(1), (B, T, I), dtype)
    built = {name: build(name, I, H, dtype, unroll) for name in IMPLEMENTATIONS}
    functions = {name: compiled_functions(apply) for name, (_, apply) in built.items()}
    times = {(name, mode): [] for name in IMPLEMENTATIONS for mode in ("forward", "forward+backward")}
    for mode in ("forward", "forward+backward"):
        for name in IMPLEMENTATIONS:
            for _ in range(warmup + 1):  # the first call compiles
                time_once(functions[name][mode], built[name][0], xs)
        for _ in range(repeats):
            for name in IMPLEMENTATIONS:
                times[(name, mode)].append(time_once(functions[name][mode], built[name][0], xs))
    return {key: statistics.median(values) * 1e3 for key, values in times.items()}


def compile_seconds(size, dtype, unroll, trials):
    """Lower + compile time of the forward+backward function at each T in ``COMPILE_STEPS``, for
    each implementation: the median over ``trials`` fresh compilations with JAX's caches cleared,
    interleaved so that a change of machine load affects every T alike."""
    B, _, I, H = size
    built = {name: build(name, I, H, dtype, unroll) for name in IMPLEMENTATIONS}
    durations = {(name, steps): [] for name in IMPLEMENTATIONS for steps in COMPILE_STEPS}
    for _ in range(trials):
        for steps in COMPILE_STEPS:
            xs = jnp.zeros((B, steps, I), dtype)
            for name, (params, apply) in built.items():
                jax.clear_caches()
                function = compiled_functions(apply)["forward+backward"]
                start = time.perf_counter()
                function.lower(params, xs).compile()
                durations[(name, steps)].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in durations.items()}


# ---- the report ----

NOTES = """Reading the table:

- Per step the mLSTM does `5H*I + H*H + 4H*H` multiply-adds against the LSTM's `4H*I + 4H*H`, so a
  ratio near 1.25 is what the extra work costs; anything well above that would be overhead.
- Compile time does not depend on T: the time loop is one `lax.scan`, so the program XLA compiles is
  the same at every T (`tests/test_jax.py` checks that the lowered program does not grow with T).
  The two compile columns differ only by measurement noise.
- Both implementations compute the input projection as `swapaxes(xs) @ W_ih.T` (time-major input,
  one plain GEMM); written as `einsum("bti,gi->tbg", ...)` the projection alone measured 1.5-4x
  slower on XLA:CPU at these sizes."""

def compile_table(compiles, size):
    lines = [f"| implementation | compile s, T={COMPILE_STEPS[0]} | compile s, T={COMPILE_STEPS[1]} | "
             f"T={COMPILE_STEPS[1]} / T={COMPILE_STEPS[0]} |", "|---|---:|---:|---:|"]
    for name in IMPLEMENTATIONS:
        short, long = (compiles[(name, steps)] for steps in COMPILE_STEPS)
        lines.append(f"| {name} | {short:.3f} | {long:.3f} | {long / short:.2f} |")
    return f"Forward+backward at B={size[0]}, I={size[2]}, H={size[3]}:\n\n" + "\n".join(lines)


def targets(results, compiles):
    lines = []
    for size, m in results.items():
        ratio = m[("MLSTM", "forward+backward")] / m[("LSTM", "forward+backward")]
        lines.append(f"- {size} forward+backward: MLSTM takes {ratio:.2f}x the time of the LSTM "
                     f"(target <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'})")
    short, long = (compiles[("MLSTM", steps)] for steps in COMPILE_STEPS)
    ratio = long / short
    lines.append(f"- compile time at T={COMPILE_STEPS[1]} is {ratio:.2f}x that at T={COMPILE_STEPS[0]} "
                 f"(target <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'})")
    return "\n".join(lines)




def versions() -> str:
    import jaxlib

    return f"Python {platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, numpy {np.__version__}"




def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=11, help="timed runs per implementation (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs after the compiling call")
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=list(DEFAULT_SIZES),
                        help="B,T,I,H per size (default: 32,128,64,256 64,100,512,512)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--unroll", type=int, default=1, help="the MLSTM's scan unroll (default 1)")
    parser.add_argument("--compile-trials", type=int, default=5, help="compilations per T (median)")
    parser.add_argument("--output", type=Path, default=None, help="also write the report (Markdown) here")
    args = parser.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    precision = JAX_FLOAT32_PRECISION if args.dtype == "float32" else None
    results = {}
    with jax.default_matmul_precision(precision):
        for size in args.sizes:
            print(f"timing {size} ...", file=sys.stderr, flush=True)
            results[tuple(size)] = run_size(tuple(size), args.repeats, args.warmup, dtype, args.unroll)
        print(f"compiling at T={COMPILE_STEPS} ...", file=sys.stderr, flush=True)
        compile_size = tuple(args.sizes[0])
        compiles = compile_seconds(compile_size, dtype, args.unroll, args.compile_trials)
    date = datetime.date.today().isoformat()
    device = jax.devices()[0]
    header = (
        f"Measured {date} on {machine()}; JAX device {device.platform} ({device.device_kind}); {versions()}. "
        f"Median of {args.repeats} runs after the compiling call and {args.warmup} warm-up runs, {args.dtype}, "
        f"one layer, unroll={args.unroll}, under jax.jit, matmul precision "
        f"{precision or 'default'}{' (no TF32)' if precision else ''}; forward = the outputs hs, forward+backward = "
        "jax.grad of sum(hs) with respect to the parameters and the input."
    )
    report = (f"{header}\n\n{ratio_table(results, IMPLEMENTATIONS, 'LSTM', decimals=2)}\n\nFirst-call compile time (lower + compile, median of "
              f"{args.compile_trials}):\n\n{compile_table(compiles, compile_size)}\n\n"
              f"Targets:\n\n{targets(results, compiles)}\n\n{NOTES}\n")
    print(report)
    if args.output is not None:
        args.output.write_text(f"# Performance of the JAX backend\n\n{chart_markdown(args.output)}\n\n{report}")
        print(draw_chart(args.output, "JAX backend"), file=sys.stderr)
    return results, compiles


if __name__ == "__main__":
    main()
