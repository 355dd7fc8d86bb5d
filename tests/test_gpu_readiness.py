"""What a GPU machine needs from the project, checked on the CPU: offline skips with reasons, GPU memory
settings made before a framework starts, TF32 off in the benchmarks, and benchmarks/gpu_check.py
reporting "no GPU" cleanly (plus a dry run of its steps on the CPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlstm_spec._env import FRAMEWORK_ENVIRONMENT, set_framework_environment

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
GPU_MEMORY = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "TF_FORCE_GPU_ALLOW_GROWTH": "true"}


def load_script(name: str):
    """Import benchmarks/<name>.py as a module (benchmarks/ holds scripts, not a package)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"_script_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def clean_environment(**overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in FRAMEWORK_ENVIRONMENT and k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)
    env.update(overrides)
    return env


# ---- GPU memory: set before the frameworks start ----

def test_framework_environment_sets_only_what_the_user_left_unset():
    environ = {"XLA_PYTHON_CLIENT_PREALLOCATE": "true"}
    in_effect = set_framework_environment(environ)
    assert environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"  # the user's choice wins
    assert environ["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
    assert in_effect == environ and set(environ) == set(FRAMEWORK_ENVIRONMENT)
    fresh = {}
    set_framework_environment(fresh)
    assert {k: fresh[k] for k in GPU_MEMORY} == GPU_MEMORY


RECORD_AT_IMPORT = """
import json, os, sys
seen = {}
class Recorder:
    def find_spec(self, name, path=None, target=None):
        if name in ("jax", "tensorflow", "torch") and name not in seen:
            seen[name] = {k: os.environ.get(k) for k in NAMES}
        return None
sys.meta_path.insert(0, Recorder())
import pytest
status = pytest.main(ARGS)
print("RECORDED " + json.dumps({"seen": seen, "status": int(status)}))
"""


def test_conftest_sets_gpu_memory_before_jax_is_imported_and_marks_gpu_cases():
    """A fresh pytest (environment variables unset) collecting the JAX tests: when ``import jax``
    happens, the variables are already set; ``-m gpu`` selects exactly the GPU cases."""
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed")
    args = ["--co", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-p", "no:xdist", str(REPO / "tests" / "test_jax.py")]
    code = RECORD_AT_IMPORT.replace("NAMES", repr(sorted(GPU_MEMORY))).replace("ARGS", repr(args))
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean_environment(MLSTM_BACKENDS=""),
                          capture_output=True, text=True, timeout=300)
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("RECORDED ")]
    recorded = json.loads(line.removeprefix("RECORDED "))
    assert recorded["seen"]["jax"] == GPU_MEMORY, recorded
    collected = [x for x in done.stdout.splitlines() if "::" in x]
    assert recorded["status"] == 0 and collected, done.stdout[-2000:]
    assert all("[gpu" in x or "[cuda" in x for x in collected), collected


# ---- offline: the wheel test and the benchmark's peer ----

def test_wheel_test_skips_with_the_reason_when_the_package_index_is_unreachable(tmp_path):
    """pip pointed at a closed port and no local wheels: the wheel test (selected by its markers) is
    skipped, and says why."""
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    env = clean_environment(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL="http://127.0.0.1:9/simple",
                            PIP_FIND_LINKS=str(empty), PIP_EXTRA_INDEX_URL="")
    env.pop("MLSTM_OFFLINE", None)
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "slow and network", "-rs", "-p", "no:cacheprovider",
                           "-p", "no:xdist", str(REPO / "tests" / "test_wheel.py")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "1 skipped" in done.stdout, done.stdout[-2000:]
    assert "cannot fetch numpy, hypothesis, rich from its package index" in done.stdout


def test_offline_variable_skips_the_wheel_test_without_asking_pip(monkeypatch):
    sys.path.insert(0, str(REPO / "tests"))
    try:
        import test_wheel
    finally:
        sys.path.remove(str(REPO / "tests"))

    def no_subprocess(*args, **kwargs):
        raise AssertionError("pip was asked although MLSTM_OFFLINE is set")

    monkeypatch.setattr(test_wheel.subprocess, "run", no_subprocess)
    monkeypatch.setenv("MLSTM_OFFLINE", "1")
    assert "MLSTM_OFFLINE is set" in test_wheel.index_unreachable_reason()


def test_bench_torch_runs_without_torchrecurrent_and_matplotlib_and_says_so(monkeypatch, tmp_path, capsys):
    """As on an offline GPU machine: the peer is left out of the timings and the chart is not drawn,
    each with a line saying why; the report is still written."""
    pytest.importorskip("torch")
    bench = load_script("bench_torch")
    monkeypatch.setitem(sys.modules, "torchrecurrent", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report = tmp_path / "report.md"
    results = bench.main(["--sizes", "2,3,4,5", "--repeats", "1", "--warmup", "0", "--output", str(report)])
    timed = {name for name, _mode in results[(2, 3, 4, 5)]}
    assert "torchrecurrent" not in timed and {"MLSTM", "nn.LSTM", "MLSTM (plain)"} <= timed
    assert "Left out: torchrecurrent (torchrecurrent is not installed" in report.read_text()
    assert "no chart drawn" in capsys.readouterr().err and not (tmp_path / "img").exists()
    with pytest.raises(SystemExit):
        bench.main(["--sizes", "2,3,4,5", "--only", "MLSTM,torchrecurrent"])
    assert "--only asks for torchrecurrent is not installed" in capsys.readouterr().err


@pytest.mark.gpu
def test_bench_torch_on_a_gpu_builds_no_cpu_loops_and_keeps_tf32_off(monkeypatch, tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no GPU visible to torch on this machine")
    bench = load_script("bench_torch")

    def no_build():
        raise AssertionError("a GPU-only benchmark built the C++ CPU loops")

    monkeypatch.setattr(bench, "compiled_cpu_loops", no_build)
    report = tmp_path / "report.md"
    results = bench.main(["--device", "cuda", "--sizes", "2,3,4,5", "--repeats", "1", "--warmup", "0",
                          "--only", "MLSTM,nn.LSTM,MLSTM (Python loops)", "--output", str(report)])
    assert {name for name, _ in results[(2, 3, 4, 5)]} == {"MLSTM", "nn.LSTM"}
    text = report.read_text()
    assert "TF32 off: fp32_precision: matmul ieee" in text or "TF32 off: allow_tf32: matmul False" in text


# ---- TF32: off for float32 comparisons in both benchmarks ----

def test_the_benchmarks_float32_context_covers_cudnn_rnns_too():
    """bench_torch.py and gpu_check.py time nn.LSTM, a cuDNN RNN on a GPU, inside
    backends.torch.full_float32: it must turn TF32 off for cuDNN's RNNs as well as for matrix products,
    or nn.LSTM would be timed in TF32 against an MLSTM in float32."""
    torch = pytest.importorskip("torch")
    from backends.torch import full_float32

    if hasattr(torch.backends.cudnn, "rnn") and hasattr(torch.backends.cudnn.rnn, "fp32_precision"):
        settings = [torch.backends.cudnn.rnn, torch.backends.cuda.matmul]
        attribute, tf32, full = "fp32_precision", "tf32", "ieee"
    else:
        settings = [torch.backends.cudnn, torch.backends.cuda.matmul]
        attribute, tf32, full = "allow_tf32", True, False
    original = [getattr(s, attribute) for s in settings]
    try:
        for s in settings:
            setattr(s, attribute, tf32)
        with full_float32():
            assert [getattr(s, attribute) for s in settings] == [full, full]
        assert [getattr(s, attribute) for s in settings] == [tf32, tf32]
    finally:
        for s, value in zip(settings, original):
            setattr(s, attribute, value)


def test_bench_jax_traces_float32_at_full_precision(monkeypatch):
    """bench_jax.py's float32 programs are traced (and so compiled) with matmul precision "highest",
    JAX's float32-means-float32 setting; the half-precision runs keep JAX's default."""
    jax = pytest.importorskip("jax")
    bench = load_script("bench_jax")
    precisions = []

    def fake_run_size(size, repeats, warmup, dtype, unroll):
        precisions.append(jax.config.jax_default_matmul_precision)
        return {(name, mode): 1.0 for name in bench.IMPLEMENTATIONS for mode in ("forward", "forward+backward")}

    monkeypatch.setattr(bench, "run_size", fake_run_size)
    monkeypatch.setattr(bench, "compile_seconds", lambda *args: {
        (name, steps): 1.0 for name in bench.IMPLEMENTATIONS for steps in bench.COMPILE_STEPS})
    for dtype in ("float32", "bfloat16"):
        bench.main(["--sizes", "2,3,4,5", "--dtype", dtype])
    assert precisions == ["highest", None]


# ---- benchmarks/gpu_check.py ----

def test_gpu_check_without_a_gpu_says_so_and_checks_nothing_else(tmp_path):
    pytest.importorskip("torch")
    check = load_script("gpu_check")
    if check._probe(check.torch_gpu)[0] or check._probe(check.jax_gpu)[0]:
        pytest.skip("a GPU is visible here: the no-GPU report is made on machines without one")
    status = check.main(["--quick", "--out", str(tmp_path)])
    assert status == check.EXIT_NO_GPU == 3
    steps = {s["name"]: s for s in json.loads((tmp_path / "summary.json").read_text())["steps"]}
    assert list(steps) == list(check.STEPS)
    assert steps["environment"]["status"] == "ok" and steps["environment"]["summary"].startswith("no GPU: ")
    assert all(s["status"] == "skip" and s["summary"].startswith("no GPU") for name, s in steps.items()
               if name != "environment"), steps
    assert "**no GPU: nothing GPU-specific was checked" in (tmp_path / "summary.md").read_text()
    environment = json.loads((tmp_path / "environment.json").read_text())
    assert environment["versions"]["torch"] and environment["devices"]["torch"] == ["cpu"]


def test_gpu_check_dry_run_on_cpu_records_a_failing_step_and_goes_on(tmp_path, monkeypatch):
    """--device cpu runs the GPU steps' code on the CPU; a step that raises is recorded with its
    traceback and the later steps still run."""
    pytest.importorskip("torch")
    check = load_script("gpu_check")

    def planted(ctx):
        raise RuntimeError("planted failure")

    monkeypatch.setitem(check.STEP_FUNCTIONS, "tf32", planted)
    status = check.main(["--device", "cpu", "--quick", "--out", str(tmp_path),
                         "--steps", "tf32,opcheck,launches,timings"])
    assert status == check.EXIT_PROBLEM == 1
    steps = {s["name"]: s for s in json.loads((tmp_path / "summary.json").read_text())["steps"]}
    assert steps["tf32"]["status"] == "error" and "planted failure" in steps["tf32"]["error"]
    assert {name: steps[name]["status"] for name in ("opcheck", "launches", "timings")} == dict.fromkeys(
        ("opcheck", "launches", "timings"), "ok"), steps
    assert "## tf32: traceback" in (tmp_path / "summary.md").read_text()
    opcheck = json.loads((tmp_path / "opcheck.json").read_text())
    assert len(opcheck) == 2  # the forward and the backward operator (--quick: one set of options)
    assert {result for tests in opcheck.values() for result in tests.values()} == {"SUCCESS"}
    launches = json.loads((tmp_path / "launches.json").read_text())
    assert set(launches) == {"inference", "forward with the tape", "forward+backward"}
    assert all(len(counts["at T"]) == 2 and counts["at T"][next(iter(counts["at T"]))]["aten operators"] > 0
               for counts in launches.values())
    table = (tmp_path / "timings.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert {"MLSTM eager", "nn.LSTM"} <= set(rows) and rows["nn.LSTM"].endswith("| 1.00 | 1.00 |")
    if importlib.util.find_spec("jax"):
        assert "JAX MLSTM (jit)" in rows


def test_gpu_check_runs_the_conformance_and_tests_steps_for_what_has_a_gpu(tmp_path, monkeypatch):
    """On a GPU machine where JAX has no GPU: the runner is asked for torch on the GPU in every dtype
    (JAX is left out, with the reason), and pytest for the GPU cases with the installed frameworks
    required (not TensorFlow because CI is set)."""
    import subprocess as sp
    import time

    check = load_script("gpu_check")
    ctx = check.Context(tmp_path, quick=False, device="cuda", deadline=time.monotonic() + 600,
                        size=check.TIMING_SIZE, frameworks={"torch": "gpu", "jax": None},
                        reasons={"torch": "torch sees 1 CUDA device(s)", "jax": "JAX sees no GPU"})
    calls = []

    def fake_run(ctx_, command, log_name, timeout, env=None):
        calls.append((command, env))
        row = {"implementation": "torch", "device": "cuda:0", "dtype": "float32", "check": "outputs",
               "status": "pass", "worst_error": 2e-7, "tolerance": 1e-3}
        (tmp_path / "conformance.json").write_text(json.dumps({"results": [row]}))
        (tmp_path / "pytest.xml").write_text(
            '<testsuites><testsuite tests="3" failures="0" errors="0" skipped="1">'
            '<testcase name="a"/><testcase name="b"/><testcase name="c"><skipped message="no GPU visible to jax"/>'
            "</testcase></testsuite></testsuites>")
        return sp.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(check, "run_logged", fake_run)
    monkeypatch.setenv("CI", "true")
    summary = check.step_conformance(ctx)
    (command, _), = calls
    option = lambda name: command[command.index(name) + 1]  # noqa: E731
    assert (option("--backends"), option("--devices"), option("--dtypes")) == (
        "torch", "gpu", "float64,float32,float16,bfloat16")
    assert "1 pass, 0 fail" in summary and "left out: jax: JAX sees no GPU" in summary
    summary = check.step_tests(ctx)
    command, env = calls[1]
    assert command[command.index("-m", 2) + 1] == "gpu"
    installed = [f for f in ("torch", "jax", "tensorflow") if importlib.util.find_spec(f)]
    assert env["MLSTM_BACKENDS"] == ",".join(installed)
    assert "2 passed, 0 failed, 0 errors, 1 skipped" in summary and "no GPU visible to jax" in summary


def test_the_runner_sets_the_framework_environment_before_planning(monkeypatch):
    """mlstm-conformance starts JAX and TensorFlow itself, so it must set what conftest.py sets for
    the tests (JAX's GPU preallocation off above all) before it plans the run and imports them."""
    from mlstm_spec._env import FRAMEWORK_ENVIRONMENT
    from mlstm_spec.conformance import runner

    for name in FRAMEWORK_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    seen = {}

    def stop_at_planning(args):
        seen.update({name: os.environ.get(name) for name in FRAMEWORK_ENVIRONMENT})
        raise runner.UsageError("stopped by the test")

    monkeypatch.setattr(runner, "plan_run", stop_at_planning)
    assert runner.main([]) == runner.EXIT_USAGE
    assert seen == FRAMEWORK_ENVIRONMENT
