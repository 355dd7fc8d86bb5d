"""Time the PyTorch mLSTM against its peers, side by side in one process.

Compared, at each size (B, T, I, H), one layer, float32, time-major input (T, B, I):

- ``MLSTM``: this project's layer (``backends.torch.MLSTM``, the fused path; on CPU its time loops
  run in compiled C++, see ``backends.torch.compiled_cpu_loops``);
- ``MLSTM (no slices)``: the same layer with its inference forward on the step-parallel loop instead of
  one slice of the batch per thread (``MLSTM_TORCH_FORWARD_SLICES=off`` during its calls); its
  forward+backward is the same code as ``MLSTM``'s;
- ``MLSTM (no help)``: the same layer with each slice's thread computing only its own slice's input
  projections (``MLSTM_TORCH_FORWARD_HELP=off``), so a faster core cannot take over part of a slower
  one's work; forward+backward is again ``MLSTM``'s code;
- ``MLSTM (Python loops)``: the same fused layer with its time loops in Python, as on a machine
  without a C++ compiler (``MLSTM(..., cpu_loops="python")``);
- ``MLSTM (plain)``: the same layer with ``fused=False`` (ordinary autograd, one step at a time);
- ``nn.LSTM``: ``torch.nn.LSTM`` at the same sizes (it does 4/5 of the mLSTM's multiply-adds);
- ``torchrecurrent``: ``MultiplicativeLSTM`` of the published torchrecurrent package, the peer to beat
  (left out, with a line saying so, where it is not installed);
- ``naive``: a per-step loop with a separate ``nn.Linear`` per gate, as forum code writes it.

On a GPU (``--device cuda``) the Python-loops row is left out (the fused layer's loops are the same
Python code there), MLSTM's C++ CPU loops are not built, and float32 means float32: TF32 is off for
every implementation (matrix products and cuDNN), as in ``bench_jax.py``.

"forward" is inference (``torch.no_grad()``); "forward+backward" is a forward with autograd recording
and ``output.sum().backward()``, the input requiring grad. Each repeat runs every implementation once, in turn, so that a
change of machine load affects all alike; the table reports the median over the repeats after
warm-up runs, and ratios of medians.

Usage::

    python benchmarks/bench_torch.py                      # defaults: both sizes, 5 repeats
    python benchmarks/bench_torch.py --repeats 11 --threads 2 --output docs/performance-torch.md
    python benchmarks/bench_torch.py --sizes 32,128,64,256 --only MLSTM,nn.LSTM
    python benchmarks/bench_torch.py --generation --threads 1   # one step at batch 1 (text generation)
    python benchmarks/bench_torch.py --threads 2 --sizes 64,100,512,512 --processes 5   # a verdict per process
    python benchmarks/bench_torch.py --variants --threads 2 --repeats 9   # layers with the spec's variants

``--processes N`` runs the timing in N fresh processes, one after the other: the table is the median of
their medians, and each target line adds every process's ratio and in how many the target was met. On
a machine whose speed moves from process to process (a shared VM), a single run's verdict near a
target says little; N of them say how often it holds.

``--generation`` times one step at batch 1 (per call, no autograd, median over many calls):
``MLSTMCell`` (its compiled one-step kernel) against ``nn.LSTMCell`` at H = 4 (the per-call overhead)
and H = 512, the same cell's plain step (ordinary torch operations, what runs under autograd), and
``MLSTM`` on a length-1 sequence against the same layer with ``fused=False`` (the layer picks its path
per call). The products' measured packed/plain choices (see ``cpu_loops.cpp``) are printed after a
full run.

It is not part of the test command.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.torch import MLSTM, compiled_cpu_loops, full_float32  # noqa: E402
# benchmarks/ is on sys.path when this runs as a script
from _common import SIZES, draw_chart, machine, parse_size, ratio_table, torch_tf32_state  # noqa: E402

DEFAULT_SIZES = SIZES
PEER = "torchrecurrent"


class NaiveMLSTM(nn.Module):
    """The mLSTM as forum code writes it: one ``nn.Linear`` per gate and source, one step at a time."""

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.hidden_size = hidden_size
        self.m_x = nn.Linear(input_size, hidden_size)
        self.m_h = nn.Linear(hidden_size, hidden_size)
        for gate in "iofz":
            setattr(self, f"{gate}_x", nn.Linear(input_size, hidden_size))
            setattr(self, f"{gate}_m", nn.Linear(hidden_size, hidden_size))

    def forward(self, x):
        batch = x.shape[1]
        h = x.new_zeros(batch, self.hidden_size)
        c = x.new_zeros(batch, self.hidden_size)
        outputs = []
        for x_t in x:
            m = self.m_x(x_t) * self.m_h(h)
            i = torch.sigmoid(self.i_x(x_t) + self.i_m(m))
            o = torch.sigmoid(self.o_x(x_t) + self.o_m(m))
            f = torch.sigmoid(self.f_x(x_t) + self.f_m(m))
            z = torch.tanh(self.z_x(x_t) + self.z_m(m))
            c = f * c + i * z
            h = o * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs), (h, c)


class WithSetting(nn.Module):
    """A layer whose calls run with an environment variable set (the C++ loops read theirs per call)."""

    def __init__(self, layer, variable: str, value: str):
        super().__init__()
        self.layer, self.variable, self.value = layer, variable, value

    def forward(self, x):
        before = os.environ.get(self.variable)
        os.environ[self.variable] = self.value
        try:
            return self.layer(x)
        finally:
            if before is None:
                del os.environ[self.variable]
            else:
                os.environ[self.variable] = before


def build(name, input_size, hidden_size):
    if name == "MLSTM":
        return MLSTM(input_size, hidden_size)
    if name == "MLSTM (no slices)":
        return WithSetting(MLSTM(input_size, hidden_size), "MLSTM_TORCH_FORWARD_SLICES", "off")
    if name == "MLSTM (no help)":
        return WithSetting(MLSTM(input_size, hidden_size), "MLSTM_TORCH_FORWARD_HELP", "off")
    if name == "MLSTM (Python loops)":
        return MLSTM(input_size, hidden_size, cpu_loops="python")
    if name == "MLSTM (plain)":
        return MLSTM(input_size, hidden_size, fused=False)
    if name == "nn.LSTM":
        return nn.LSTM(input_size, hidden_size)
    if name == PEER:
        from torchrecurrent import MultiplicativeLSTM

        return MultiplicativeLSTM(input_size, hidden_size)
    if name == "naive":
        return NaiveMLSTM(input_size, hidden_size)
    raise ValueError(f"unknown implementation {name!r}")


IMPLEMENTATIONS = ("MLSTM", "MLSTM (no slices)", "MLSTM (no help)", "MLSTM (Python loops)", "MLSTM (plain)", "nn.LSTM", PEER, "naive")


def unavailable(device: str) -> dict:
    """Implementations that this run cannot (or need not) time, each with the reason."""
    import importlib.util

    reasons = {}
    if importlib.util.find_spec(PEER) is None:
        reasons[PEER] = f"{PEER} is not installed (pip install {PEER})"
    if device != "cpu":
        reasons["MLSTM (Python loops)"] = "on a GPU the fused layer's loops are Python code already"
        reasons["MLSTM (no slices)"] = "on a GPU the fused layer runs no C++ loops to slice"
        reasons["MLSTM (no help)"] = reasons["MLSTM (no slices)"]
    return reasons


def forward_only(model, x):
    with torch.no_grad():
        model(x)


def forward_backward(model, x):
    model.zero_grad(set_to_none=True)
    output = model(x)[0]
    output.sum().backward()


def time_once(function, model, x):
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    function(model, x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


#: --variants: the layers timed against the default (variant-free) layer, as MLSTM keyword arguments;
#: "every variant" projects to half the hidden size. The Python-loops rows show what the C++ loops are worth.
VARIANT_LAYERS = {
    "MLSTM": {},
    "forget_bias": {"forget_bias": 1.0},
    "forget_bias (Python loops)": {"forget_bias": 1.0, "cpu_loops": "python"},
    "every variant": {"peepholes": True, "cell_clip": 1.0, "proj_clip": 0.5, "forget_bias": 1.0},
    "every variant (Python loops)": {"peepholes": True, "cell_clip": 1.0, "proj_clip": 0.5, "forget_bias": 1.0,
                                     "cpu_loops": "python"},
}
VARIANT_SIZE = (32, 64, 128, 256)


def build_variant(name, input_size, hidden_size):
    options = dict(VARIANT_LAYERS[name])
    if name.startswith("every variant"):
        options["proj_size"] = hidden_size // 2
    return MLSTM(input_size, hidden_size, **options)


def run_size(size, names, repeats, warmup, device, build=build):
    B, T, I, H = size
    torch.manual_seed(0)
    models = {name: build(name, I, H).to(device) for name in names}
    x = torch.randn(T, B, I, device=device)
    x_grad = x.clone().requires_grad_(True)
    times = {(name, mode): [] for name in names for mode in ("forward", "forward+backward")}
    for mode, function, inp in (("forward", forward_only, x), ("forward+backward", forward_backward, x_grad)):
        for name in names:
            for _ in range(warmup):
                function(models[name], inp)
        for _ in range(repeats):
            for name in names:
                times[(name, mode)].append(time_once(function, models[name], inp))
    return {key: statistics.median(values) * 1e3 for key, values in times.items()}


#: Issue 12, item 7, at the large size: MLSTM's time at most this multiple of nn.LSTM's, per mode ...
LSTM_TARGETS = {"forward": 1.5, "forward+backward": 1.4}
#: ... and at least this many times faster than torchrecurrent, in both modes.
PEER_TARGET = 1.8
TARGET_SIZE = (64, 100, 512, 512)


def targets(results, per_process=()):
    """The issue's targets, each as the measured ratio and whether it is met; with ``per_process`` (the
    results of each process of a ``--processes`` run, whose medians ``results`` holds) also each
    process's own ratio and in how many processes the target was met."""
    lines = []
    for size, m in results.items():
        judged = size == TARGET_SIZE
        for mode in ("forward", "forward+backward"):
            comparisons = []
            if (PEER, mode) in m:
                comparisons.append((lambda r: r[(PEER, mode)] / r[("MLSTM", mode)], PEER_TARGET, True,
                                    "MLSTM is {:.2f}x faster than torchrecurrent"))
            if ("nn.LSTM", mode) in m:
                comparisons.append((lambda r: r[("MLSTM", mode)] / r[("nn.LSTM", mode)], LSTM_TARGETS[mode], False,
                                    "MLSTM takes {:.2f}x the time of nn.LSTM"))
            for ratio_of, bound, at_least, text in comparisons:
                def met(ratio):
                    return ratio >= bound if at_least else ratio <= bound

                # A ratio is judged as measured side by side in one process: with several processes,
                # the median of theirs (the ratio of the median times can differ from every one of them).
                each = [ratio_of(r[size]) for r in per_process]
                ratio = statistics.median(each) if each else ratio_of(m)
                notes = []
                if judged:
                    notes.append(f"target {'>=' if at_least else '<='} {bound}x: {'met' if met(ratio) else 'NOT met'}")
                if per_process:
                    notes.append(f"median of the per-process ratios {', '.join(f'{x:.2f}' for x in each)}"
                                 + (f", met in {sum(map(met, each))} of {len(each)}" if judged else ""))
                lines.append(f"- {size} {mode}: {text.format(ratio)}" + (f" ({'; '.join(notes)})" if notes else ""))
    return "\n".join(lines)


GEMM_KINDS = ("Per-step products (MKL packed, MKL or oneDNN, as measured on this machine)",
              "Whole-sequence products (input projection with a tape, d_input)",
              "Weight gradients (A^T B over all rows)")


def gemm_choices() -> list[list[str]] | None:
    """The C++ loops' products run so far, each as [one of GEMM_KINDS, its shape, the kind measured
    faster for it on this machine] (cpu_loops.cpp: step_product, sequence_product_on_onednn,
    weight_gradient_on_onednn); None where the loops are not built."""
    from backends.torch import build

    loops = build.cpu_loops()
    if loops is None:
        return None
    names = {"packed": "MKL packed", "plain": "MKL", "mkl": "MKL", "onednn": "oneDNN"}
    steps, sequences, gradients = GEMM_KINDS
    return ([[steps, f"{rows}x{k} by {k}x{n} ({threads} threads)", names[kind]]
             for rows, n, k, threads, kind in loops.step_gemm_choices()]
            + [[sequences, f"rows x {k} by {k}x{n} ({threads} threads)", names[kind]]
               for n, k, threads, kind in loops.sequence_gemm_choices()]
            + [[gradients, f"rows x {n} by rows x {k} ({threads} threads)", names[kind]]
               for n, k, threads, kind in loops.gradient_gemm_choices()])


def describe_gemm_choices(per_process: list) -> str:
    """One paragraph for the choices of every process (each a gemm_choices() result): a shape's kind,
    or, where the processes measured differently, how many chose each."""
    if any(choices is None for choices in per_process):
        return "Matrix products: the C++ loops are not built here."
    kinds: dict = {}
    for choices in per_process:
        for kind_of_product, shape, chosen in choices:
            kinds.setdefault(kind_of_product, {}).setdefault(shape, []).append(chosen)
    parts = []
    for kind_of_product in GEMM_KINDS:
        shapes = []
        for shape, chosen in kinds.get(kind_of_product, {}).items():
            counts = collections.Counter(chosen)
            if len(counts) == 1 and len(chosen) == len(per_process):
                shapes.append(f"{shape}: {chosen[0]}")
            else:
                shapes.append(f"{shape}: " + ", ".join(f"{name} in {n} of {len(per_process)} processes"
                                                       for name, n in counts.most_common()))
        parts.append(f"{kind_of_product}: {', '.join(shapes) or 'none run'}.")
    return " ".join(parts)


def load_average() -> str:
    """The 1-minute load average at the end of the run, where the system reports one."""
    try:
        return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} logical CPUs"
    except OSError:
        return "load average unknown"




def versions() -> str:
    parts = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    try:
        from importlib.metadata import version

        parts.append(f"torchrecurrent {version('torchrecurrent')}")
    except Exception:  # noqa: BLE001 - the peer is optional
        pass
    return ", ".join(parts)




GENERATION_HIDDEN = (4, 512)


def time_calls(function, calls: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean time of ``calls`` calls, in microseconds."""
    for _ in range(calls // 10 + 1):
        function()
    means = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            function()
        means.append((time.perf_counter() - start) / calls)
    return statistics.median(means) * 1e6


def without_kernel(cell):
    """``cell`` called with its compiled one-step kernel switched off: the plain step (ordinary torch
    operations) that runs when autograd records, timed here without autograd's own cost."""
    from backends.torch import modules

    def call(x, state):
        kept = modules.compiled_step
        modules.compiled_step = lambda *args: None
        try:
            return cell(x, state)
        finally:
            modules.compiled_step = kept

    return call


def generation(repeats: int) -> str:
    """One step at batch 1: MLSTMCell vs nn.LSTMCell, MLSTM (default) vs MLSTM(fused=False)."""
    from backends.torch import MLSTMCell

    lines = ["| H | MLSTMCell (us) | nn.LSTMCell (us) | ratio | MLSTMCell, plain step (us) | MLSTM, 1 step (us) | "
             "MLSTM fused=False (us) | ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for H in GENERATION_HIDDEN:
        torch.manual_seed(0)
        cell, lstm_cell = MLSTMCell(H, H), nn.LSTMCell(H, H)
        layer, plain = MLSTM(H, H), MLSTM(H, H, fused=False)
        plain_cell = without_kernel(cell)
        x, state = torch.randn(1, H), (torch.zeros(1, H), torch.zeros(1, H))
        xs, states = torch.randn(1, 1, H), (torch.zeros(1, 1, H), torch.zeros(1, 1, H))
        calls = 2000 if H < 64 else 300
        with torch.no_grad():
            t = {}
            for _ in range(repeats):  # interleaved, so that load changes affect all alike
                for name, f in (("cell", lambda: cell(x, state)), ("lstm", lambda: lstm_cell(x, state)),
                                ("plain cell", lambda: plain_cell(x, state)),
                                ("layer", lambda: layer(xs, states)), ("plain", lambda: plain(xs, states))):
                    t.setdefault(name, []).append(time_calls(f, calls, 1))
            m = {k: statistics.median(v) for k, v in t.items()}
        lines.append(f"| {H} | {m['cell']:.1f} | {m['lstm']:.1f} | {m['cell'] / m['lstm']:.2f} | "
                     f"{m['plain cell']:.1f} | {m['layer']:.1f} | {m['plain']:.1f} | {m['layer'] / m['plain']:.2f} |")
    return "\n".join(lines)


def in_processes(argv: list, processes: int) -> list:
    """Run this script ``processes`` times with ``argv``, one fresh process after the other (never two at
    once), each writing its medians to a JSON file: how much a ratio moves from process to process
    (which core, memory and load each one meets) is part of what a target's verdict must survive.
    Returns each process's ``{"results", "choices", "load"}``."""
    import json
    import subprocess
    import tempfile

    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for k in range(processes):
            print(f"process {k + 1} of {processes} ...", file=sys.stderr, flush=True)
            path = Path(folder) / f"{k}.json"
            subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--json", str(path)], check=True)
            run = json.loads(path.read_text())
            run["results"] = {tuple(size): {(name, mode): ms for name, mode, ms in rows}
                              for size, rows in run["results"]}
            runs.append(run)
    return runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per implementation (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=list(DEFAULT_SIZES),
                        help="B,T,I,H per size (default: 32,128,64,256 64,100,512,512)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the run (default: torch's own choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated subset of {', '.join(IMPLEMENTATIONS)} (MLSTM is always run; "
                             "default: every one this machine and device can run)")
    parser.add_argument("--output", type=Path, default=None, help="also write the report (Markdown) here")
    parser.add_argument("--processes", type=int, default=1,
                        help="run the timing this many times, each in a fresh process, one after the other; the "
                             "table gives the median of the processes' medians, and each target every process's ratio")
    parser.add_argument("--json", type=Path, default=None, help=argparse.SUPPRESS)  # one process of --processes
    parser.add_argument("--variants", action="store_true",
                        help=f"time layers with the spec's variants against the default layer instead "
                             f"(default size {','.join(map(str, VARIANT_SIZE))})")
    parser.add_argument("--generation", action="store_true",
                        help="time one step at batch 1 (MLSTMCell vs nn.LSTMCell, MLSTM's path choice) instead")
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error(f"--processes must be at least 1, got {args.processes}")
    if args.processes > 1 and (args.generation or args.variants):
        parser.error("--processes runs the main comparison, not --generation or --variants")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.generation:
        table = generation(args.repeats)
        report = (f"Generation, one step at batch 1, float32, no autograd; {machine()}; torch threads "
                  f"{torch.get_num_threads()}; {versions()}; MLSTM's CPU loops: {compiled_cpu_loops()[1]}; "
                  f"median of {args.repeats} interleaved rounds; {load_average()}.\n\n{table}\n")
        print(report)
        return report
    if args.variants:
        return variants(args, parser)
    left_out = unavailable(torch.device(args.device).type)
    if args.only is None:
        names = [n for n in IMPLEMENTATIONS if n not in left_out]
    else:
        names = ["MLSTM"] + [n for n in args.only.split(",") if n and n != "MLSTM"]
        unknown = sorted(set(names) - set(IMPLEMENTATIONS))
        if unknown:
            parser.error(f"unknown implementations {unknown}; choose from {IMPLEMENTATIONS}")
        if PEER in names and PEER in left_out:
            parser.error(f"--only asks for {left_out[PEER]}")
        left_out = {n: why for n, why in left_out.items() if n in names and n != PEER}
        names = [n for n in names if n not in left_out]
    for name, why in left_out.items():
        print(f"leaving out {name}: {why}", file=sys.stderr, flush=True)
    on_gpu = torch.device(args.device).type == "cuda"
    results, per_process = {}, []
    with full_float32() if on_gpu else contextlib.nullcontext():
        tf32 = torch_tf32_state()
        if args.processes > 1:
            child_argv = [a for a in (sys.argv[1:] if argv is None else argv)]
            for flag in ("--processes", "--output"):  # the children time; this process reports
                while flag in child_argv:
                    at = child_argv.index(flag)
                    del child_argv[at:at + 2]
            runs = in_processes(child_argv, args.processes)
            per_process = [run["results"] for run in runs]
            results = {tuple(size): {key: statistics.median(r[tuple(size)][key] for r in per_process)
                                     for key in per_process[0][tuple(size)]} for size in args.sizes}
        else:
            for size in args.sizes:
                print(f"timing {size} ...", file=sys.stderr, flush=True)
                results[tuple(size)] = run_size(tuple(size), names, args.repeats, args.warmup, args.device)
    if args.json is not None:
        import json

        args.json.write_text(json.dumps({
            "results": [[list(size), [[name, mode, ms] for (name, mode), ms in m.items()]]
                        for size, m in results.items()],
            "choices": None if on_gpu else gemm_choices(), "load": load_average()}))
        return results
    date = datetime.date.today().isoformat()
    if on_gpu:
        device = f"{torch.cuda.get_device_name(args.device)} (TF32 off: {tf32})"
        loops = "MLSTM's loops: Python (GPU)"
    else:
        device = args.device
        loops = f"MLSTM's CPU loops: {compiled_cpu_loops()[1]}"
    header = (
        f"Measured {date} on {machine()}; device {device}; torch threads {torch.get_num_threads()}; "
        f"{versions()}; {loops}; {load_average()}. "
        + (f"Median over {args.processes} processes, run one after the other, of each one's median"
           if args.processes > 1 else "Median")
        + f" of {args.repeats} runs after {args.warmup} warm-up runs, float32, one "
        "layer; forward = inference under torch.no_grad(), forward+backward = output.sum().backward() with the "
        "input requiring grad (so d_input is computed too)."
    )
    if left_out:
        header += " Left out: " + "; ".join(f"{n} ({why})" for n, why in left_out.items()) + "."
    report = f"{header}\n\n{ratio_table(results, names, 'MLSTM')}\n\nTargets:\n\n{targets(results, per_process)}\n"
    if not on_gpu:
        choices = [run["choices"] for run in runs] if per_process else [gemm_choices()]
        report += f"\n{describe_gemm_choices(choices)}\n"
    print(report)
    if args.output is not None:
        write_report(args.output, report)
        print(draw_chart(args.output, "PyTorch backend"), file=sys.stderr)
    return results


def variants(args, parser) -> dict:
    """--variants: the layers of VARIANT_LAYERS side by side, as the main comparison times its peers."""
    if torch.device(args.device).type != "cpu":
        parser.error("--variants compares the C++ and the Python loops, which differ only on CPU")
    sizes = [tuple(size) for size in args.sizes] if args.sizes != list(DEFAULT_SIZES) else [VARIANT_SIZE]
    names = list(VARIANT_LAYERS)
    results = {}
    for size in sizes:
        print(f"timing {size} ...", file=sys.stderr, flush=True)
        results[size] = run_size(size, names, args.repeats, args.warmup, args.device, build=build_variant)
    report = (f"Layers with variants, measured {datetime.date.today().isoformat()} on {machine()}; torch threads "
              f"{torch.get_num_threads()}; {versions()}; MLSTM's CPU loops: {compiled_cpu_loops()[1]}; "
              f"{load_average()}. Median of {args.repeats} interleaved runs after {args.warmup} warm-up runs, "
              "float32, one layer. " + "; ".join(f"{name}: {options or 'no variant'}"
                                                 for name, options in VARIANT_LAYERS.items())
              + "; every variant also has proj_size = H / 2.\n\n" + ratio_table(results, names, "MLSTM") + "\n")
    print(report)
    return results


BEGIN, END = "<!-- bench_torch.py results: begin -->", "<!-- bench_torch.py results: end -->"


def write_report(path: Path, report: str) -> None:
    """Put the report between the BEGIN/END markers of ``path``, keeping the prose around them;
    a file without the markers gets them appended."""
    block = f"{BEGIN}\n{report}{END}\n"
    text = path.read_text() if path.exists() else "# Performance of the PyTorch backend\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


if __name__ == "__main__":
    main()
