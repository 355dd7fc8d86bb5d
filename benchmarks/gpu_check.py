"""Check this project on a GPU machine in under ten minutes, and write everything into one folder.

Made for a machine lent for a short time, offline, with its own torch / JAX builds and nothing of this
project installed: run ``benchmarks/gpu_check.sh`` (or this file with the repository on
``PYTHONPATH``) from a checkout. Each step records what it found, or the error that stopped it, and the
run goes on:

- ``environment``: ``nvidia-smi``, versions, the devices each framework sees, TF32 defaults;
- ``tf32``: how far a float32 matrix product lands from float64, with each framework's default
  settings and with TF32 off (as the timings below run), which says whether TF32 was in use;
- ``opcheck``: ``torch.library.opcheck`` of every custom operator the public ``MLSTM`` calls (found by
  watching a forward and backward), on the GPU;
- ``launches``: kernel launches per time step (torch.profiler) of inference, forward with the tape, and
  forward+backward, and of a CUDA-graph replay;
- ``timings``: CUDA-event timings at (B, T, I, H) = (64, 100, 512, 512), float32, TF32 off, of MLSTM
  eager, MLSTM captured in a CUDA graph (by this script, forward and backward, and by the layer's
  ``cuda_graph=True``, inference only), nn.LSTM (cuDNN) and the jitted JAX MLSTM, as ratios to
  nn.LSTM measured side by side;
- ``compile``: ``torch.compile(MLSTM, fullgraph=True)`` on the GPU, forward and backward against eager;
- ``conformance``: ``mlstm-conformance --devices gpu`` for torch and JAX in float64, float32 (the
  adapters turn TF32 off), float16 and bfloat16, as JSON and Markdown;
- ``tests``: ``pytest -m gpu``, the test cases that need a GPU (with the time that is left).

Where no GPU is visible the GPU steps are recorded as skipped and the summary says "no GPU" (exit 3).
``--device cpu`` runs the same steps on the CPU instead: a dry run of this script, whose figures say
nothing about a GPU; ``--quick`` shrinks every size and example count (the tests use both).

Exit status: 0 every step ran and found nothing wrong; 1 a step failed or raised; 3 no GPU.

Usage::

    benchmarks/gpu_check.sh                          # writes gpu-check-<date>-<time>/
    python benchmarks/gpu_check.py --out results/ --steps environment,timings
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/dry-run
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from mlstm_spec._env import FRAMEWORK_ENVIRONMENT, set_framework_environment  # noqa: E402

# Before torch, JAX or TensorFlow is imported: the steps share one GPU among frameworks.
set_framework_environment()

from _common import JAX_FLOAT32_PRECISION, machine, parse_size, torch_tf32_state  # noqa: E402

# The measurements first; the two long subprocess steps share the time that is left.
STEPS = ("environment", "tf32", "opcheck", "launches", "timings", "compile", "conformance", "tests")
#: Steps that need a GPU (or --device cpu): skipped with the reason where there is none.
GPU_STEPS = STEPS[1:]
TIMING_SIZE = (64, 100, 512, 512)
QUICK_SIZE = (2, 5, 4, 8)
CONFORMANCE_DTYPES = ("float64", "float32", "float16", "bfloat16")
PURE_DEPENDENCIES = ("numpy", "hypothesis", "rich", "pytest", "safetensors")
VERSIONED = ("numpy", "torch", "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "tensorflow",
             "keras", "triton", "cupy-cuda13x", "cupy-cuda12x", "hypothesis", "rich", "pytest",
             "pytest-xdist", "safetensors", "torchrecurrent")
EXIT_OK, EXIT_PROBLEM, EXIT_NO_GPU = 0, 1, 3


@dataclass
class StepResult:
    name: str
    status: str  # "ok", "fail" (ran and found a problem), "error" (the step itself raised), "skip"
    summary: str = ""
    seconds: float = 0.0
    details: dict = field(default_factory=dict)
    error: str = ""


class StepFailed(Exception):
    """Raised by a step that ran and found something wrong; its message is the summary."""

    def __init__(self, summary: str, details: dict | None = None):
        super().__init__(summary)
        self.details = details or {}


class Skipped(Exception):
    """Raised by a step that cannot run here; its message is the reason."""


@dataclass
class Context:
    out: Path
    quick: bool
    device: str  # "cuda" or "cpu" (the dry run), or "none": no GPU and no --device cpu
    deadline: float
    size: tuple
    frameworks: dict  # "torch" / "jax" -> the device it checks on, or None with a reason below
    reasons: dict

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def write(self, name: str, content) -> Path:
        path = self.out / name
        text = content if isinstance(content, str) else json.dumps(content, indent=2, default=str)
        path.write_text(text if text.endswith("\n") else text + "\n")
        return path


# ---- which devices ----

def torch_gpu() -> tuple[bool, str]:
    if importlib.util.find_spec("torch") is None:
        return False, "torch is not installed"
    import torch

    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA device (built for CUDA {torch.version.cuda})"
    return True, f"torch sees {torch.cuda.device_count()} CUDA device(s): {torch.cuda.get_device_name(0)}"


def jax_gpu() -> tuple[bool, str]:
    if importlib.util.find_spec("jax") is None:
        return False, "jax is not installed"
    import jax

    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return False, f"JAX {jax.__version__} sees no GPU (its devices: {', '.join(d.platform for d in jax.devices())})"
    return True, f"JAX sees {len(gpus)} GPU(s): {gpus[0].device_kind}"


def _probe(function) -> tuple[bool, str]:
    try:
        return function()
    except Exception as error:  # noqa: BLE001 - a broken CUDA set-up is a finding, not a crash
        return False, f"{function.__name__} raised {type(error).__name__}: {str(error)[:300]}"


def make_context(args) -> Context:
    found = {"torch": _probe(torch_gpu), "jax": _probe(jax_gpu)}
    reasons = {name: why for name, (_, why) in found.items()}
    if args.device == "cpu":
        device = "cpu"
        frameworks = {name: ("cpu" if importlib.util.find_spec(name) else None) for name in found}
    else:
        device = "cuda" if any(ok for ok, _ in found.values()) else "none"
        frameworks = {name: ("gpu" if ok else None) for name, (ok, _) in found.items()}
    size = args.size or (QUICK_SIZE if args.quick else TIMING_SIZE)
    return Context(args.out, args.quick, device, time.monotonic() + args.budget, size, frameworks, reasons)


def full_float32():
    """:func:`backends.torch.full_float32` (TF32 off, restored after), imported when first used."""
    from backends.torch import full_float32 as torch_full_float32

    return torch_full_float32()


def need_torch(ctx: Context):
    if ctx.frameworks["torch"] is None:
        raise Skipped(ctx.reasons["torch"])
    import torch

    return torch, torch.device("cuda" if ctx.device == "cuda" else "cpu")


# ---- the steps ----

def step_environment(ctx: Context) -> str:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "python": sys.version.split()[0], "platform": platform.platform(),
            "executable": sys.executable,
            "environment": {k: os.environ.get(k) for k in (*FRAMEWORK_ENVIRONMENT, "CUDA_VISIBLE_DEVICES",
                                                           "CI", "MLSTM_BACKENDS")}}
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    info["versions"] = versions
    info["missing"] = [name for name in PURE_DEPENDENCIES if importlib.util.find_spec(name) is None]
    smi = shutil.which("nvidia-smi")
    if smi:
        listing = subprocess.run([smi], capture_output=True, text=True, timeout=60)
        query = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,compute_cap",
                                "--format=csv"], capture_output=True, text=True, timeout=60)
        ctx.write("nvidia-smi.txt", listing.stdout + listing.stderr + "\n" + query.stdout + query.stderr)
        info["nvidia-smi"] = query.stdout.strip() or query.stderr.strip()
    else:
        info["nvidia-smi"] = "not found"
    info["gpu"] = dict(ctx.reasons)
    devices = {}
    if importlib.util.find_spec("torch"):
        import torch

        devices["torch"] = ["cpu"] + [
            f"cuda:{k} {torch.cuda.get_device_name(k)} (capability {torch.cuda.get_device_capability(k)}, "
            f"{torch.cuda.get_device_properties(k).total_memory / 2**30:.0f} GiB)"
            for k in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]
        info["torch_cuda"] = torch.version.cuda
        info["torch_cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        info["torch_tf32_default"] = torch_tf32_state()
    if importlib.util.find_spec("jax"):
        import jax

        devices["jax"] = [f"{d.platform}:{d.id} {d.device_kind}" for d in jax.devices()]
        info["jax_default_matmul_precision"] = str(jax.config.jax_default_matmul_precision)
    if importlib.util.find_spec("tensorflow") and not ctx.quick:  # --quick: not worth its import time
        import tensorflow as tf

        devices["tensorflow"] = [d.name for d in tf.config.list_physical_devices()]
    info["devices"] = devices
    ctx.write("environment.json", info)
    missing = f"; missing: {', '.join(info['missing'])}" if info["missing"] else ""
    if ctx.device == "none":
        return f"no GPU: {ctx.reasons['torch']}; {ctx.reasons['jax']}; nvidia-smi {info['nvidia-smi']}{missing}"
    return f"{ctx.reasons['torch']}; {ctx.reasons['jax']}{missing}"


def step_tf32(ctx: Context) -> str:
    """Relative error of a float32 (n, n) @ (n, n) against float64: ~1e-7 in float32, ~1e-4 and up
    with TF32's 10-bit mantissa."""
    n = 64 if ctx.quick else 1024
    threshold = 1e-5  # between float32's ~n*2^-24 growth and TF32's 2^-11 rounding of the inputs
    rows = {}
    if ctx.frameworks["torch"]:
        torch, device = need_torch(ctx)
        generator = torch.Generator().manual_seed(0)
        a, b = (torch.randn(n, n, dtype=torch.float64, generator=generator) for _ in range(2))
        want = a @ b

        def torch_error():
            got = (a.float().to(device) @ b.float().to(device)).double().cpu()
            return float((got - want).abs().max() / want.abs().max())

        rows["torch, default settings"] = torch_error()
        with full_float32():
            rows["torch, TF32 off (as timed)"] = torch_error()
    if ctx.frameworks["jax"]:
        import jax
        import jax.numpy as jnp
        import numpy as np

        rng = np.random.default_rng(0)
        a64, b64 = rng.standard_normal((n, n)), rng.standard_normal((n, n))
        want64 = a64 @ b64
        device = jax.devices("gpu" if ctx.device == "cuda" else "cpu")[0]
        a32, b32 = (jax.device_put(jnp.asarray(v, jnp.float32), device) for v in (a64, b64))
        for label, precision in (("jax, default precision", None),
                                 (f"jax, precision {JAX_FLOAT32_PRECISION} (as timed)", JAX_FLOAT32_PRECISION)):
            with jax.default_matmul_precision(precision):
                got = np.asarray(jax.jit(jnp.matmul)(a32, b32), dtype=np.float64)
            rows[label] = float(np.abs(got - want64).max() / np.abs(want64).max())
    if not rows:
        raise Skipped("neither torch nor JAX is installed")
    verdicts = {label: ("TF32" if error > threshold else "float32") for label, error in rows.items()}
    ctx.write("tf32.json", {"n": n, "threshold": threshold, "relative_error": rows, "verdict": verdicts})
    timed_with_tf32 = [label for label, v in verdicts.items() if "as timed" in label and v == "TF32"]
    summary = "; ".join(f"{label}: {rows[label]:.1e} ({verdicts[label]})" for label in rows)
    if timed_with_tf32:
        raise StepFailed(f"TF32 is still on where it should be off: {summary}")
    return summary


def step_conformance(ctx: Context) -> str:
    names = [name for name in ("torch", "jax") if ctx.frameworks[name]]
    if not names:
        raise Skipped("; ".join(ctx.reasons.values()))
    devices = "gpu" if ctx.device == "cuda" else "cpu"
    command = [sys.executable, "-m", "mlstm_spec.conformance", "--backends", ",".join(names),
               "--devices", devices, "--dtypes", ",".join(CONFORMANCE_DTYPES), "--seed", "0",
               "--json", str(ctx.out / "conformance.json"), "--markdown", str(ctx.out / "conformance.md")]
    if ctx.quick:  # the tests' dry run: one float32 example per check
        command[command.index("--dtypes") + 1] = "float32"
        command += ["--max-examples", "1"]
    done = run_logged(ctx, command, "conformance.log", timeout=min(240, ctx.remaining() - 120))
    left_out = [f"{name}: {ctx.reasons[name]}" for name in ("torch", "jax") if not ctx.frameworks[name]]
    rows = []
    report = ctx.out / "conformance.json"
    if report.exists():
        rows = json.loads(report.read_text())["results"]
    counts = {status: sum(r["status"] == status for r in rows) for status in ("pass", "fail", "skip")}
    float32 = [f"{r['implementation']} {r['device']} {r['check']} {r['worst_error']:.1e} <= {r['tolerance']:.0e}"
               for r in rows if r["dtype"] == "float32" and r["status"] == "pass" and r.get("worst_error") is not None]
    summary = (f"exit {done.returncode}; rows: {counts['pass']} pass, {counts['fail']} fail, {counts['skip']} skip"
               + (f"; float32 worst errors: {', '.join(float32)}" if float32 else "")
               + (f"; left out: {'; '.join(left_out)}" if left_out else ""))
    if done.returncode != 0:
        raise StepFailed(summary)
    return summary


def step_tests(ctx: Context) -> str:
    installed = [name for name in ("torch", "jax", "tensorflow") if importlib.util.find_spec(name)]
    # CI=true would require TensorFlow; a GPU image may lack it: require what is installed instead
    env = {**os.environ, "MLSTM_BACKENDS": ",".join(installed)}
    paths = ["tests/test_jax.py"] if ctx.quick else ["tests"]  # --quick: a dry run of the step
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
               "--junitxml", str(ctx.out / "pytest.xml"), *paths]
    done = run_logged(ctx, command, "pytest.log", timeout=min(240, ctx.remaining() - 30), env=env)
    counts = junit_counts(ctx.out / "pytest.xml")
    summary = (f"exit {done.returncode}; {counts.get('passed', 0)} passed, {counts.get('failed', 0)} failed, "
               f"{counts.get('errors', 0)} errors, {counts.get('skipped', 0)} skipped (MLSTM_BACKENDS="
               f"{env['MLSTM_BACKENDS']})")
    if counts.get("skip_reasons"):
        summary += "; skipped because: " + "; ".join(counts["skip_reasons"])
    if done.returncode not in (0, 5):  # 5: nothing collected
        raise StepFailed(summary)
    return summary


def _model_and_input(torch, device, size, dtype, **options):
    from backends.torch import MLSTM

    B, T, I, H = size
    torch.manual_seed(0)
    model = MLSTM(I, H, device=device, dtype=dtype, **options)
    x = torch.randn(T, B, I, device=device, dtype=dtype)
    return model, x


def custom_op_calls(torch, model, x) -> list:
    """(operator, args, kwargs) of the first call of every non-ATen operator in a forward and backward
    of ``model``: the project's own custom operators, found through the public layer alone."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map

    def copy(value):
        if isinstance(value, torch.Tensor):  # autograd runs a backward operator with grad mode off
            return value.detach().clone().requires_grad_(value.requires_grad and torch.is_grad_enabled())
        return value

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace not in ("aten", "prim", "prims") and str(func) not in self.calls:
                self.calls[str(func)] = (func, tree_map(copy, args), tree_map(copy, kwargs))
            return func(*args, **kwargs)

    x = x.clone().requires_grad_(True)
    with Recorder() as recorder:
        output, (h_n, c_n) = model(x)
        (output.sum() + c_n.sum()).backward()
    return list(recorder.calls.values())


def step_opcheck(ctx: Context) -> str:
    torch, device = need_torch(ctx)
    results, problems = {}, []
    size = (2, 3, 3, 4)
    variants = [{}, {"integration_mode": "multiplicative_integration", "recurrent_bias": False,
                     "independent_recurrence": True}]
    for options in variants[:1] if ctx.quick else variants:
        model, x = _model_and_input(torch, device, size, torch.float64, **options)
        calls = custom_op_calls(torch, model, x)
        if not calls:
            problems.append(f"no custom operator seen with options {options}")
        for func, args, kwargs in calls:
            label = f"{func} {options or 'defaults'}"
            outcome = torch.library.opcheck(func, args, kwargs, raise_exception=False)
            results[label] = {test: ("SUCCESS" if value == "SUCCESS" else f"{type(value).__name__}: {value}")
                              for test, value in outcome.items()}
            problems += [f"{label}: {test}" for test, value in results[label].items() if value != "SUCCESS"]
    ctx.write("opcheck.json", results)
    summary = f"{len(results)} operator calls checked on {device}: " + (
        "all tests SUCCESS" if not problems else "FAILED " + "; ".join(problems))
    if problems:
        raise StepFailed(summary)
    return summary


def step_compile(ctx: Context) -> str:
    torch, device = need_torch(ctx)
    size = (3, 6, 5, 8) if ctx.quick else (8, 20, 32, 64)
    model, x = _model_and_input(torch, device, size, torch.float32, num_layers=2)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    results, seconds = [], {}
    with full_float32():
        for label, layer in (("eager", model), ("compiled", compiled)):
            start = time.perf_counter()
            x_ = x.clone().requires_grad_(True)
            out, (h_n, c_n) = layer(x_)
            (out.sum() + h_n.sum() + c_n.sum()).backward()
            grads = [p.grad.clone() for p in model.parameters()]
            model.zero_grad(set_to_none=True)
            results.append([out, h_n, c_n, x_.grad, *grads])
            seconds[label] = time.perf_counter() - start
    worst = max(float((a - b).abs().max()) for a, b in zip(*results))
    tolerance = 1e-5  # the same float32 operations in the same order: only reassociation may differ
    details = {"size": size, "max_abs_difference": worst, "tolerance": tolerance,
               "first_call_seconds": seconds}
    ctx.write("compile.json", details)
    summary = (f"fullgraph compile on {device}: first call {seconds['compiled']:.1f} s (eager "
               f"{seconds['eager']:.2f} s); forward+backward max |compiled - eager| = {worst:.1e}")
    if not worst <= tolerance:
        raise StepFailed(summary + f" > {tolerance:.0e}")
    return summary


LAUNCH_NAMES = ("LaunchKernel", "GraphLaunch")


def count_launches(torch, function, cuda: bool) -> dict:
    """Run ``function`` once under torch.profiler; count its kernel-launch calls (CPU side), the
    kernels that ran on the GPU, and the operators the CPU ran (the dry run's stand-in)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as profiler:
        function()
        if cuda:
            torch.cuda.synchronize()
    events = profiler.events()
    device_kernels = sum(1 for e in events if str(getattr(e, "device_type", "")).endswith("CUDA"))
    launches = sum(1 for e in events if any(name in e.name for name in LAUNCH_NAMES))
    operators = sum(1 for e in events if e.name.startswith("aten::"))
    return {"launch calls": launches, "GPU kernels": device_kernels, "aten operators": operators}


def step_launches(ctx: Context) -> str:
    torch, device = need_torch(ctx)
    cuda = device.type == "cuda"
    B, _, I, H = ctx.size
    steps = (4, 8) if ctx.quick else (10, 20)
    from backends.torch import MLSTM

    torch.manual_seed(0)
    model = MLSTM(I, H, device=device)

    def inference(x):
        with torch.no_grad():
            return model(x)

    modes = {
        "inference": inference,
        "forward with the tape": lambda x: model(x.requires_grad_(True)),
        "forward+backward": lambda x: model(x.requires_grad_(True))[0].sum().backward(),
    }
    counts = {}
    with full_float32():
        for mode, function in modes.items():
            per_length = {}
            for T in steps:
                x = torch.randn(T, B, I, device=device)
                function(x.clone())  # warm-up: lazy initialisation is not per step
                per_length[T] = count_launches(torch, lambda: function(x.clone()), cuda)
            counts[mode] = {kind: (per_length[steps[1]][kind] - per_length[steps[0]][kind]) / (steps[1] - steps[0])
                            for kind in per_length[steps[0]]}
            counts[mode]["at T"] = per_length
        if cuda:
            x = torch.randn(steps[1], B, I, device=device)
            replay = capture_forward(torch, model, x)
            counts["inference, CUDA graph replay"] = count_launches(torch, lambda: replay(x), cuda)
            option = MLSTM(I, H, device=device, cuda_graph=True)
            inference_with_option = torch.no_grad()(lambda: option(x))
            inference_with_option()  # captures
            counts["inference, MLSTM(cuda_graph=True)"] = count_launches(torch, inference_with_option, cuda)
    ctx.write("launches.json", counts)
    kind = "launch calls" if cuda else "aten operators"
    summary = "; ".join(f"{mode}: {c[kind]:.1f} {kind} per step" for mode, c in counts.items() if "at T" in c)
    if cuda:
        summary += (f"; inference at T={steps[1]} replayed from a CUDA graph: "
                    f"{counts['inference, CUDA graph replay']['launch calls']} launch call(s), through "
                    f"MLSTM(cuda_graph=True): {counts['inference, MLSTM(cuda_graph=True)']['launch calls']}")
    return summary


def capture_forward(torch, model, x):
    """Inference of ``model`` on inputs shaped like ``x``, captured once in a CUDA graph; returns a
    function that copies its input into the captured buffer and replays (the outputs are reused)."""
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):  # warm-up on a side stream, as capture requires
            model(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = model(static_x)

    def replay(new_x):
        static_x.copy_(new_x)
        graph.replay()
        return static_out

    return replay


def torch_timers(torch, device):
    """(start, stop) for one timed call: CUDA events on a GPU (elapsed GPU time), else the CPU clock."""
    if device.type == "cuda":
        def start():
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            return begin, end

        def stop(token):
            begin, end = token
            end.record()
            end.synchronize()
            return begin.elapsed_time(end)
    else:
        def start():
            return time.perf_counter()

        def stop(token):
            return (time.perf_counter() - token) * 1e3
    return start, stop


def torch_candidates(torch, device, size) -> dict:
    """name -> {"forward": f(), "forward+backward": f()} for the torch implementations."""
    from torch import nn

    from backends.torch import MLSTM

    B, T, I, H = size
    torch.manual_seed(0)
    mlstm = MLSTM(I, H, device=device)
    lstm = nn.LSTM(I, H, device=device)
    x = torch.randn(T, B, I, device=device)
    x_grad = x.clone().requires_grad_(True)

    def inference(model):
        def run():
            with torch.no_grad():
                model(x)
        return run

    def training(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(x_grad)[0].sum().backward()
        return run

    candidates = {"MLSTM eager": {"forward": inference(mlstm), "forward+backward": training(mlstm)}}
    if device.type == "cuda":
        replay = capture_forward(torch, mlstm, x)

        class Flat(nn.Module):  # make_graphed_callables wants a flat tuple of tensors out
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, inputs):
                output, (h_n, c_n) = self.inner(inputs)
                return output, h_n, c_n

        graphed = torch.cuda.make_graphed_callables(Flat(mlstm), (x_grad,))

        def graphed_training():
            mlstm.zero_grad(set_to_none=True)
            graphed(x_grad)[0].sum().backward()

        candidates["MLSTM graph-captured"] = {"forward": lambda: replay(x), "forward+backward": graphed_training}
        option = MLSTM(I, H, device=device, cuda_graph=True)  # the layer's own capture (inference only)
        option.load_state_dict(mlstm.state_dict())
        candidates["MLSTM cuda_graph=True"] = {"forward": inference(option), "forward+backward": training(option)}
    candidates["nn.LSTM (cuDNN)" if device.type == "cuda" else "nn.LSTM"] = {
        "forward": inference(lstm), "forward+backward": training(lstm)}
    return candidates


def jax_candidate(device_kind: str, size) -> dict:
    import jax
    import jax.numpy as jnp

    from backends.jax import MLSTM

    B, T, I, H = size
    device = jax.devices("gpu" if device_kind == "cuda" else "cpu")[0]
    with jax.default_device(device):
        model = MLSTM(I, H, key=jax.random.key(0))
        xs = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32)
    forward = jax.jit(lambda m, v: m(v)[0])
    gradient = jax.jit(jax.grad(lambda m, v: jnp.sum(m(v)[0]), argnums=(0, 1)))
    return {"forward": lambda: jax.block_until_ready(forward(model, xs)),
            "forward+backward": lambda: jax.block_until_ready(gradient(model, xs))}


def step_timings(ctx: Context) -> str:
    torch, device = need_torch(ctx)
    repeats, warmup = (2, 1) if ctx.quick else (15, 3)
    notes = []
    with full_float32(), contextlib.ExitStack() as stack:
        tf32 = torch_tf32_state()
        candidates = torch_candidates(torch, device, ctx.size)
        if ctx.frameworks["jax"]:
            import jax

            stack.enter_context(jax.default_matmul_precision(JAX_FLOAT32_PRECISION))
            try:
                candidates["JAX MLSTM (jit)"] = jax_candidate(ctx.device, ctx.size)
            except Exception as error:  # noqa: BLE001 - recorded, the torch rows still count
                notes.append(f"JAX left out: {type(error).__name__}: {error}")
        else:
            notes.append(f"JAX left out: {ctx.reasons['jax']}")
        start, stop = torch_timers(torch, device)
        times = {(name, mode): [] for name in candidates for mode in ("forward", "forward+backward")}
        for mode in ("forward", "forward+backward"):
            for name, functions in candidates.items():
                for _ in range(warmup + 1):  # the first call compiles (JAX) or captures
                    functions[mode]()
            for _ in range(repeats):
                for name, functions in candidates.items():
                    if name.startswith("JAX"):  # not on torch's stream: the CPU clock around a blocking call
                        begin = time.perf_counter()
                        functions[mode]()
                        times[(name, mode)].append((time.perf_counter() - begin) * 1e3)
                    else:
                        token = start()
                        functions[mode]()
                        times[(name, mode)].append(stop(token))
    medians = {key: statistics.median(values) for key, values in times.items()}
    base = next(name for name in candidates if name.startswith("nn.LSTM"))
    lines = [f"| implementation | forward ms | forward+backward ms | forward / {base} | "
             f"forward+backward / {base} |", "|---|---:|---:|---:|---:|"]
    for name in candidates:
        f, b = medians[(name, "forward")], medians[(name, "forward+backward")]
        lines.append(f"| {name} | {f:.3f} | {b:.3f} | {f / medians[(base, 'forward')]:.2f} | "
                     f"{b / medians[(base, 'forward+backward')]:.2f} |")
    clock = ("CUDA events around each torch call; the CPU clock around each blocking JAX call"
             if device.type == "cuda" else "the CPU clock (dry run: says nothing about a GPU)")
    header = (f"(B, T, I, H) = {ctx.size}, float32, TF32 off ({tf32}; JAX precision "
              f"{JAX_FLOAT32_PRECISION}), device {device}; median of {repeats} interleaved runs after "
              f"{warmup} warm-up run(s); timed with {clock}.")
    table = "\n".join(lines)
    ctx.write("timings.md", f"{header}\n\n{table}\n" + "".join(f"\n{note}\n" for note in notes))
    ctx.write("timings.json", {"size": ctx.size, "device": str(device), "repeats": repeats,
                               "median_ms": {f"{n} | {m}": v for (n, m), v in medians.items()}, "notes": notes})
    summary = "; ".join(
        f"{name}: {medians[(name, 'forward')] / medians[(base, 'forward')]:.2f}x / "
        f"{medians[(name, 'forward+backward')] / medians[(base, 'forward+backward')]:.2f}x"
        for name in candidates if name != base)
    return f"time / {base}'s (forward / forward+backward): {summary}" + "".join(f"; {n}" for n in notes)


# ---- running steps ----

def run_logged(ctx: Context, command: list, log_name: str, timeout: float, env=None):
    if timeout < 10:
        raise Skipped(f"out of time ({ctx.remaining():.0f} s left of the budget)")
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        ctx.write(log_name, f"$ {' '.join(command)}\n{output}\n(timed out after {timeout:.0f} s)")
        raise StepFailed(f"timed out after {timeout:.0f} s: {' '.join(command[2:])}") from None
    ctx.write(log_name, f"$ {' '.join(command)}\n(exit {done.returncode})\n{done.stdout}\n{done.stderr}")
    return done


def junit_counts(path: Path) -> dict:
    if not path.exists():
        return {}
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    tests, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    reasons = sorted({s.get("message", "") for s in suite.iter("skipped")})
    return {"passed": tests - failures - errors - skipped, "failed": failures, "errors": errors,
            "skipped": skipped, "skip_reasons": reasons}


STEP_FUNCTIONS = {"environment": step_environment, "tf32": step_tf32, "conformance": step_conformance,
                  "tests": step_tests, "opcheck": step_opcheck, "compile": step_compile,
                  "launches": step_launches, "timings": step_timings}


def run_step(ctx: Context, name: str) -> StepResult:
    started = time.perf_counter()
    if name in GPU_STEPS and ctx.device == "none":
        result = StepResult(name, "skip", "no GPU (see environment)")
    elif ctx.remaining() < 5:
        result = StepResult(name, "skip", f"out of time ({ctx.remaining():.0f} s left of the budget)")
    else:
        try:
            result = StepResult(name, "ok", STEP_FUNCTIONS[name](ctx))
        except Skipped as skip:
            result = StepResult(name, "skip", str(skip))
        except StepFailed as failure:
            result = StepResult(name, "fail", str(failure), details=failure.details)
        except Exception as error:  # noqa: BLE001 - recorded; the next step still runs
            result = StepResult(name, "error", f"{type(error).__name__}: {str(error)[:500]}",
                                error=traceback.format_exc())
    result.seconds = round(time.perf_counter() - started, 2)
    print(f"[{result.status}] {name} ({result.seconds:.1f} s): {result.summary}", file=sys.stderr, flush=True)
    return result


def verdict(ctx: Context, results: list) -> tuple[int, str]:
    if any(r.status in ("fail", "error") for r in results):
        bad = ", ".join(r.name for r in results if r.status in ("fail", "error"))
        return EXIT_PROBLEM, f"PROBLEMS in: {bad}"
    if ctx.device == "none":
        return EXIT_NO_GPU, "no GPU: nothing GPU-specific was checked (" + "; ".join(ctx.reasons.values()) + ")"
    if ctx.device == "cpu":
        return EXIT_OK, "dry run on the CPU: every step ran (its figures say nothing about a GPU)"
    return EXIT_OK, "every step ran and found nothing wrong"


def write_summary(ctx: Context, results: list, status: int, headline: str, seconds: float) -> str:
    lines = [f"# GPU check, {datetime.date.today().isoformat()}", "", f"**{headline}** (exit {status}; "
             f"{seconds:.0f} s; {machine()}; device {ctx.device})", "",
             "| step | status | seconds | result |", "|---|---|---:|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.summary.replace('|', '/')} |")
    errors = [r for r in results if r.error]
    for r in errors:
        lines += ["", f"## {r.name}: traceback", "", "```", r.error.rstrip(), "```"]
    text = "\n".join(lines) + "\n"
    ctx.write("summary.md", text)
    ctx.write("summary.json", {"status": status, "headline": headline, "device": ctx.device,
                               "seconds": round(seconds, 1), "steps": [asdict(r) for r in results]})
    return text


def parse_steps(text: str) -> list:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STEPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"steps are a comma-separated list from {', '.join(STEPS)}, got {text!r}")
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="the results folder (default: gpu-check-<date>-<time>)")
    parser.add_argument("--steps", type=parse_steps, default=list(STEPS),
                        help=f"from {', '.join(STEPS)} (default: all)")
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto",
                        help="auto: the GPU where there is one; cpu: a dry run of every step on the CPU")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one example per check (for tests)")
    parser.add_argument("--size", type=parse_size, default=None,
                        help=f"B,T,I,H for launches and timings (default {','.join(map(str, TIMING_SIZE))})")
    parser.add_argument("--budget", type=float, default=570, help="seconds for the whole run (default 570)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path(f"gpu-check-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ctx = make_context(args)
    results = [run_step(ctx, name) for name in args.steps]
    status, headline = verdict(ctx, results)
    text = write_summary(ctx, results, status, headline, time.perf_counter() - started)
    print(text)
    print(f"results in {args.out.resolve()}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
