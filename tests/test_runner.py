"""The ``mlstm-conformance`` runner: targets, options, exit statuses, reports, and the worked example.

Most tests run ``runner.main`` in this process against fake backend modules (the NumPy spec dressed
as "torch" etc.), so they need no framework and take well under a second each. The worked example
(docs/examples/torchrecurrent_adapter.py) is checked against the real torchrecurrent package.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

import backends
from mlstm_spec.conformance import TOLERANCES, Case, ConformanceError, runner
from mlstm_spec.conformance.defects import SpecAdapter
from mlstm_spec.conformance.profiles import EXAMPLES as EXAMPLES_BY_PROFILE, profile_from_environment
from mlstm_spec.conformance.report import Report, plain_table, print_rich
from mlstm_spec.conformance.suite import CheckResult

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "docs" / "examples"


# ---- helpers ----

@pytest.fixture(autouse=True)
def _isolate(monkeypatch):
    """--impl puts the current directory on sys.path: keep that from leaking between tests; and run
    the runner with its own default profile, whatever profile CI chose for the test session."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("MLSTM_PROFILE", raising=False)


def fake_backend(name, devices=("cpu",), dtypes=("float64", "float32"), base=SpecAdapter, fail_init=None):
    """A stand-in for ``backends.<name>``: the spec, named ``name``, on the given devices."""

    class Adapter(base):
        def __init__(self, device):
            if fail_init:
                raise fail_init
            self.device = device

    Adapter.name, Adapter.dtypes = name, tuple(dtypes)
    return types.SimpleNamespace(__name__=f"backends.{name}", devices=lambda: list(devices),
                                 ConformanceAdapter=Adapter)


@pytest.fixture
def fake_backends(monkeypatch):
    """``install(torch=module | Exception)``; every framework not installed is reported missing."""
    registry = {}

    def missing_reason(name):
        return None if name in registry else f"{name} is not installed (fake)"

    def load(name):
        if name not in registry:
            raise ImportError(missing_reason(name))
        if isinstance(registry[name], Exception):
            raise registry[name]
        return registry[name]

    monkeypatch.setattr(backends, "missing_reason", missing_reason)
    monkeypatch.setattr(backends, "load", load)
    return registry.update


def run(capsys, *argv, tmp_path=None):
    """Run the runner in-process; returns (exit status, stdout, stderr, JSON report or None). The
    small tier only, unless ``--tiers`` is given (the large tier is tested on its own)."""
    argv = list(argv)
    if "--tiers" not in argv:
        argv += ["--tiers", "small"]
    if "--jobs" not in argv:  # a --jobs child would import the real backends, not the test's fakes
        argv += ["--jobs", "1"]
    report_path = None
    if tmp_path is not None:
        report_path = tmp_path / f"report-{len(list(tmp_path.glob('report-*')))}.json"
        argv += ["--json", str(report_path)]
    try:
        status = runner.main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        status = exc.code
    out, err = capsys.readouterr()
    report = json.loads(report_path.read_text()) if report_path and report_path.exists() else None
    return status, out, err, report


def rows(report, **match):
    return [r for r in report["results"] if all(r[k] == v for k, v in match.items())]


def write_module(directory: Path, name: str, source: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(source))
    sys.modules.pop(name, None)


# ---- which targets a run checks ----

def test_default_run_checks_installed_backends_and_skips_missing_ones_with_reason(capsys, fake_backends, tmp_path):
    fake_backends(torch=fake_backend("torch"))
    status, out, err, report = run(capsys, "--max-examples", "5", tmp_path=tmp_path)
    assert status == 0, out + err
    assert {r["dtype"] for r in rows(report, implementation="mlstm_spec")} == {"float64", "float32", "float16"}
    torch_cpu = rows(report, implementation="torch", device="cpu")
    assert {(r["dtype"], r["check"]) for r in torch_cpu} == {
        (d, c) for d in ("float64", "float32") for c in ("outputs", "final_state", "gradients")}
    assert all(r["status"] == "pass" and r["examples"] == 5 for r in torch_cpu)
    (gpu,) = rows(report, implementation="torch", device="gpu")
    assert gpu["status"] == "skip" and gpu["message"] == "no GPU visible to torch"
    for name in set(backends.BACKENDS) - {"torch"}:
        (row,) = rows(report, implementation=name)
        assert row["status"] == "skip" and row["message"] == f"{name} is not installed (fake)"
    assert "no GPU visible to torch" in out and "jax is not installed (fake)" in out


def test_every_device_a_backend_sees_is_checked_with_its_tolerance(capsys, fake_backends, tmp_path):
    fake_backends(torch=fake_backend("torch", devices=("cpu", "cuda:0")))
    status, out, err, report = run(capsys, "--backends", "torch", "--max-examples", "3", tmp_path=tmp_path)
    assert status == 0, out + err
    assert {r["device"] for r in report["results"]} == {"cpu", "cuda:0"}
    assert not rows(report, status="skip")
    assert {r["tolerance"] for r in rows(report, device="cuda:0", dtype="float32")} == {TOLERANCES[("float32", "gpu")]}


def test_devices_option_selects_by_kind(capsys, fake_backends, tmp_path):
    fake_backends(torch=fake_backend("torch", devices=("cpu", "cuda:0", "cuda:1")))
    status, out, err, report = run(capsys, "--devices", "gpu", "--max-examples", "3", tmp_path=tmp_path)
    assert status == 0, out + err
    assert {r["device"] for r in rows(report, implementation="torch")} == {"cuda:0", "cuda:1"}
    (spec,) = rows(report, implementation="mlstm_spec")
    assert spec["status"] == "skip" and "CPU" in spec["message"]

    status, out, err, report = run(capsys, "--devices", "cuda:1,cpu", "--backends", "torch",
                                   "--max-examples", "3", tmp_path=tmp_path)
    assert status == 0, out + err
    assert {r["device"] for r in report["results"]} == {"cuda:1", "cpu"}


@pytest.mark.parametrize("argv, message", [
    (["--devices", "gpu"], "no selected implementation sees a GPU (torch sees: cpu)"),
    (["--backends", "torch", "--devices", "gpu"], "no GPU visible to torch"),
    (["--devices", "cuda:3"], "no selected implementation sees cuda:3"),
    (["--backends", "torch", "--devices", "cuda:3"], "torch does not see a device 'cuda:3'"),
    (["--backends", "jax"], "--backends requests jax, but jax is not installed (fake)"),
    (["--backends", "spec", "--devices", "gpu"], "runs on the CPU only"),
])
def test_requested_but_unavailable_is_an_error(capsys, fake_backends, argv, message):
    fake_backends(torch=fake_backend("torch", devices=("cpu",)))
    status, out, err, _ = run(capsys, *argv)
    assert status == 2
    assert message in err
    assert out == ""  # nothing ran


def test_devices_gpu_checks_the_backends_with_a_gpu_and_skips_the_others(capsys, fake_backends, tmp_path):
    fake_backends(torch=fake_backend("torch", devices=("cpu", "cuda:0")), jax=fake_backend("jax"))
    status, out, err, report = run(capsys, "--devices", "gpu", "--max-examples", "2", tmp_path=tmp_path)
    assert status == 0, out + err
    assert {r["status"] for r in rows(report, implementation="torch", device="cuda:0")} == {"pass"}
    (jax_row,) = rows(report, implementation="jax")
    assert jax_row["status"] == "skip" and jax_row["device"] == "gpu"
    assert jax_row["message"] == "no GPU visible to jax (it sees: cpu)"


def test_the_torch_cpu_loops_are_asked_about_only_when_torch_cpu_rows_ran(capsys, fake_backends, tmp_path):
    asked = []
    module = fake_backend("torch", devices=("cpu", "cuda:0"))
    module.compiled_cpu_loops = lambda: asked.append(1) or (True, "compiled for the test")
    module.versions = lambda: {"backends.torch CPU loops": module.compiled_cpu_loops()[1]}  # as backends.torch
    fake_backends(torch=module)
    report = run(capsys, "--devices", "gpu", "--max-examples", "2", tmp_path=tmp_path)[3]
    assert asked == [] and "backends.torch CPU loops" not in report["metadata"]["versions"]
    report = run(capsys, "--devices", "cpu", "--backends", "torch", "--max-examples", "2", tmp_path=tmp_path)[3]
    assert asked == [1] and report["metadata"]["versions"]["backends.torch CPU loops"] == "compiled for the test"


def test_a_broken_backend_is_a_failure_not_a_skip(capsys, fake_backends, tmp_path):
    fake_backends(torch=ImportError("backends.torch is broken"),
                  jax=fake_backend("jax", fail_init=RuntimeError("no XLA")))
    status, out, err, report = run(capsys, "--max-examples", "3", tmp_path=tmp_path)
    assert status == 1
    (torch_row,) = rows(report, implementation="torch")
    assert torch_row["status"] == "fail" and "backends.torch is broken" in torch_row["message"]
    (jax_row,) = rows(report, implementation="jax", device="cpu")
    assert jax_row["status"] == "fail" and "no XLA" in jax_row["message"]


def test_nothing_checked_exits_3_even_though_the_spec_row_ran(capsys, fake_backends, tmp_path):
    status, out, err, report = run(capsys, "--max-examples", "3", tmp_path=tmp_path)
    assert status == 3
    assert {r["status"] for r in rows(report, implementation="mlstm_spec")} == {"pass"}
    assert {r["implementation"] for r in rows(report, status="skip")} == set(backends.BACKENDS)
    assert "No implementation was checked" in out
    assert run(capsys, "--backends", "none")[0] == 3


@pytest.mark.parametrize("name", ["mlstm_spec", "spec"])
def test_the_spec_counts_when_named(capsys, fake_backends, name):
    assert run(capsys, "--backends", name, "--max-examples", "3")[0] == 0


def test_dtype_an_implementation_does_not_offer_is_a_skip_row(capsys, fake_backends, tmp_path):
    fake_backends(torch=fake_backend("torch", dtypes=("float64", "float32")))
    status, out, err, report = run(capsys, "--dtypes", "float16", "--max-examples", "3", tmp_path=tmp_path)
    assert status == 3  # only the spec (not an implementation) could run float16
    (skip,) = rows(report, implementation="torch", dtype="float16")
    assert skip["status"] == "skip" and "does not offer float16" in skip["message"]
    assert {r["status"] for r in rows(report, implementation="mlstm_spec", dtype="float16")} == {"pass"}
    assert not rows(report, dtype="float64")


@pytest.mark.parametrize("argv", [
    ["--backends", "nosuch"], ["--backends", "none,torch"], ["--dtypes", "float8"], ["--max-examples", "0"],
    ["--seed", "-1"], ["--profile", "nope"], ["--impl", "no_colon"], ["--impl", "no_such_module_xyz:make"],
    ["--impl", "mlstm_spec.conformance.defects:NoSuchFactory"], ["--impl", "mlstm_spec:__version__"],
    ["--json", "/no/such/directory/report.json"], ["--markdown", "/no/such/directory/report.md"],
    ["--timeout", "-1"], ["--timeout", "soon"], ["--tiers", "huge"],
])
def test_usage_errors_exit_2(capsys, fake_backends, argv):
    status, out, err, _ = run(capsys, *argv)
    assert status == 2
    assert "error" in err


# ---- outside implementations (--impl) ----

def test_impl_alone_checks_only_that_implementation(capsys, fake_backends, tmp_path):
    fake_backends(torch=fake_backend("torch"))
    status, out, err, report = run(capsys, "--impl", "mlstm_spec.conformance.defects:CorrectRewrite",
                                   "--max-examples", "5", tmp_path=tmp_path)
    assert status == 0, out + err
    assert {r["implementation"] for r in report["results"]} == {"control:independent-rewrite"}
    gradients = rows(report, check="gradients")
    assert gradients and all(r["status"] == "skip" and "no gradients()" in r["message"] for r in gradients)
    assert all(r["status"] == "pass" for r in report["results"] if r["check"] != "gradients")

    status, out, err, report = run(capsys, "--impl", "mlstm_spec.conformance.defects:CorrectRewrite",
                                   "--backends", "torch", "--max-examples", "3", tmp_path=tmp_path)
    assert status == 0
    assert {r["implementation"] for r in report["results"]} == {"control:independent-rewrite", "torch"}


def test_impl_module_is_imported_from_the_current_directory(capsys, fake_backends, tmp_path, monkeypatch):
    write_module(tmp_path, "my_mlstm_adapter_ok", """
        from mlstm_spec import forward

        class Mine:
            name = "mine"
            dtypes = ("float64",)

            def supports(self, options):  # never unbatched: forward below would crash on it
                return options["batched"] and options["num_layers"] == 1

            def forward(self, params, xs, state, *, integration_mode):
                assert xs.ndim == 3, "unbatched input was drawn although supports() declined it"
                return forward(params, xs, state, integration_mode=integration_mode)

        def make():
            return Mine()
    """)
    monkeypatch.chdir(tmp_path)
    status, out, err, report = run(capsys, "--impl", "my_mlstm_adapter_ok:make", "--max-examples", "15",
                                   tmp_path=tmp_path)
    assert status == 0, out + err
    assert rows(report, check="outputs")[0]["examples"] == 15


@pytest.mark.parametrize("source, message", [
    ("class A:\n    name = 'a'\ndef make():\n    return A()\n", "forward"),
    ("class A:\n    def forward(self, *a, **k): pass\ndef make():\n    return A()\n", "'name'"),
    ("def make():\n    raise RuntimeError('no licence')\n", "make() raised RuntimeError: no licence"),
    ("class A:\n    name = 'a'\n    dtypes = ('float8',)\n    def forward(self, *a, **k): pass\n"
     "def make():\n    return A()\n", "dtypes"),
])
def test_impl_adapter_is_validated(capsys, fake_backends, tmp_path, monkeypatch, source, message):
    name = f"my_bad_adapter_{abs(hash(source))}"
    write_module(tmp_path, name, source)
    monkeypatch.chdir(tmp_path)
    status, out, err, _ = run(capsys, "--impl", f"{name}:make")
    assert status == 2
    assert message in err


def test_supports_that_declines_everything_is_reported_not_hidden(capsys, fake_backends, tmp_path, monkeypatch):
    write_module(tmp_path, "my_picky_adapter", """
        from mlstm_spec.conformance.defects import SpecAdapter

        class Picky(SpecAdapter):
            name = "picky"
            dtypes = ("float64",)

            def supports(self, options):
                return False
    """)
    monkeypatch.chdir(tmp_path)
    status, out, err, report = run(capsys, "--impl", "my_picky_adapter:Picky", tmp_path=tmp_path)
    assert status == 1
    (row,) = report["results"]
    assert row["status"] == "fail" and "the suite could not run" in row["message"]


# ---- failures: what is reported, and that the reproducer reproduces ----

def test_failure_report_has_the_smallest_example_as_code_that_reproduces_it(capsys, fake_backends, tmp_path):
    markdown_path = tmp_path / "report.md"
    status, out, err, report = run(capsys, "--impl", "mlstm_spec.conformance.defects:StateNotCarried",
                                   "--dtypes", "float64", "--seed", "0", "--markdown", str(markdown_path),
                                   tmp_path=tmp_path)
    assert status == 1
    failed = {r["check"]: r for r in rows(report, status="fail")}
    assert set(failed) == {"outputs", "final_state"}  # the state after step 1 is wrong: both show it
    failed = failed["outputs"]
    assert failed["worst_error"] > failed["tolerance"]
    code = failed["reproducer"]
    assert "ADAPTER = mlstm_spec.conformance.defects.StateNotCarried()" in code
    case = eval(re.search(r"reproduce\(ADAPTER, (Case\(.*?\))\)", code).group(1), {"Case": Case})
    assert case.steps == 2  # the defect needs T > 1, and Hypothesis shrank T to the smallest such
    with pytest.raises(ConformanceError, match="but should be"):
        exec(code, {})
    assert "Reproduce with:" in out and code.splitlines()[-1] in out
    text = markdown_path.read_text()
    assert "```python\n" + code + "\n```" in text
    assert "| defect:state-reset-after-step-1 | cpu | float64 |" in text


def test_reproducer_of_an_outside_implementation_runs_from_anywhere(capsys, fake_backends, tmp_path, monkeypatch):
    package = tmp_path / "project" / "my_port"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "checks.py").write_text("from mlstm_spec.conformance.defects import StateSwapped as Broken\n")
    monkeypatch.chdir(tmp_path / "project")
    status, out, err, report = run(capsys, "--impl", "my_port.checks:Broken", "--dtypes", "float32",
                                   "--seed", "3", tmp_path=tmp_path)
    assert status == 1
    (failed,) = [r for r in report["results"] if r["reproducer"]]
    assert f"sys.path.insert(0, {str(tmp_path / 'project')!r})" in failed["reproducer"]
    done = subprocess.run([sys.executable, "-c", failed["reproducer"]], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and "ConformanceError" in done.stderr and "h_T" in done.stderr


def _broken(capsys, monkeypatch, tmp_path, *argv):
    """Run the runner on an adapter of docs/examples/broken_adapters.py (imported afresh)."""
    sys.modules.pop("broken_adapters", None)
    monkeypatch.chdir(EXAMPLES)
    return run(capsys, *argv, tmp_path=tmp_path)


def test_two_distinct_failures_are_reported_each_with_its_reproducer(capsys, fake_backends, tmp_path, monkeypatch):
    status, out, err, report = _broken(capsys, monkeypatch, tmp_path, "--impl", "broken_adapters:TwoBugs",
                                       "--dtypes", "float64", "--seed", "0", "--no-diagnosis")
    assert status == 1
    (outputs,) = rows(report, check="outputs")
    assert sorted(f["kind"] for f in outputs["failures"]) == ["mismatch", "raised ValueError"]
    assert out.count("FAIL: two-bugs on cpu, float64 check 'outputs'") == 2
    raised = []
    for failure in outputs["failures"]:
        assert failure["reproducer"].splitlines()[-1] in out
        with pytest.raises(ConformanceError) as error:
            exec(failure["reproducer"], {})
        raised.append(str(error.value))
    assert any("raised ValueError" in m for m in raised) and any("but should be" in m for m in raised)
    assert "the suite could not run" not in out


def test_an_adapter_calling_sys_exit_0_is_a_failure_and_the_report_is_still_written(
        capsys, fake_backends, tmp_path, monkeypatch):
    status, out, err, report = _broken(capsys, monkeypatch, tmp_path, "--impl", "broken_adapters:Exiting",
                                       "--max-examples", "3", "--no-diagnosis")
    assert status == 1
    assert {r["check"]: r["status"] for r in report["results"]} == {
        "outputs": "fail", "final_state": "fail", "gradients": "pass"}
    assert "forward() raised SystemExit: 0" in out and "2 failed" in out


def test_a_hanging_adapter_times_out_and_the_run_goes_on(capsys, fake_backends, tmp_path, monkeypatch):
    try:
        status, out, err, report = _broken(capsys, monkeypatch, tmp_path, "--impl", "broken_adapters:Hanging",
                                           "--impl", "mlstm_spec.conformance.defects:SpecAdapter",
                                           "--dtypes", "float64", "--max-examples", "3", "--timeout", "0.5")
    finally:
        sys.modules["broken_adapters"].RELEASE.set()
    assert status == 1
    hanging = {r["check"]: r for r in rows(report, implementation="hanging")}
    assert hanging["outputs"]["status"] == "fail" and "did not return" in hanging["outputs"]["message"]
    assert hanging["gradients"]["status"] == "skip" and "not called again" in hanging["gradients"]["message"]
    assert {r["status"] for r in rows(report, implementation="mlstm_spec")} == {"pass"}
    assert report["metadata"]["timeout_s"] == 0.5
    assert report["diagnoses"] == []  # an abandoned adapter is not called again, not even to diagnose it


def test_an_unwritable_report_path_is_refused_before_the_run(capsys, fake_backends, tmp_path):
    status, out, err, _ = run(capsys, "--backends", "spec", "--json", str(tmp_path))
    assert status == 2 and "is a directory" in err and out == ""
    status, out, err, _ = run(capsys, "--backends", "spec", "--markdown", str(tmp_path / "no" / "r.md"))
    assert status == 2 and "does not exist" in err and out == ""
    unwritable = Path("/proc/version")  # exists, cannot be opened for writing (Linux)
    if not unwritable.exists():
        pytest.skip("needs Linux's /proc/version as a path that cannot be written")
    status, out, err, _ = run(capsys, "--backends", "spec", "--json", str(unwritable))
    assert status == 2 and "cannot be written" in err and out == ""


def test_a_failing_implementation_is_diagnosed(capsys, fake_backends, tmp_path):
    argv = ["--impl", "mlstm_spec.conformance.defects:IhBlocksPermuted", "--dtypes", "float32",
            "--max-examples", "3", "--seed", "1"]
    status, out, err, report = run(capsys, *argv, tmp_path=tmp_path)
    assert status == 1
    (diagnosis,) = report["diagnoses"]
    assert diagnosis["implementation"] == "defect:ih-blocks-permuted" and diagnosis["dtype"] == "float32"
    assert diagnosis["matches"] == ["ih-gate-order-mifzo"]
    assert "DIAGNOSIS: defect:ih-blocks-permuted on cpu" in out and "m, i, f, z, o" in out
    assert run(capsys, *argv, "--no-diagnosis", tmp_path=tmp_path)[3]["diagnoses"] == []


def test_the_large_tier_is_part_of_a_default_run_with_a_fixed_count(capsys, fake_backends, tmp_path):
    from mlstm_spec.conformance.cases import LARGE_SHAPES

    status, out, err, report = run(capsys, "--backends", "spec", "--dtypes", "float64", "--max-examples", "2",
                                   "--tiers", "small,large", "--seed", "4", tmp_path=tmp_path)
    assert status == 0
    assert report["metadata"]["large_tier"] == [str(s) for s in LARGE_SHAPES["default"]]
    # the spec adapter takes single layers only: the stack is not run, and the row says so
    assert {r["check"]: r["examples_by_tier"]["large"] for r in report["results"]} == dict.fromkeys(
        ("outputs", "final_state", "gradients"), len(LARGE_SHAPES["default"]) - 1)
    assert "2 layers (supports() declines it)" in out and f"2+{len(LARGE_SHAPES['default']) - 1}" in out
    report = run(capsys, "--backends", "spec", "--dtypes", "float64", "--tiers", "large", tmp_path=tmp_path)[3]
    assert {r["examples_by_tier"]["small"] for r in report["results"]} == {0}


def test_json_report_carries_run_metadata(capsys, fake_backends, tmp_path):
    fake_backends(torch=fake_backend("torch"))
    status, out, err, report = run(capsys, "--backends", "torch", "--max-examples", "4", "--seed", "9",
                                   tmp_path=tmp_path)
    meta = report["metadata"]
    assert meta["profile"] == "default" and meta["max_examples"] == 4 and meta["seed"] == 9
    assert {"numpy", "hypothesis", "python", "mlstm_spec"} <= set(meta["versions"])
    assert set(meta["devices"]) == {"torch cpu"} and meta["devices"]["torch cpu"]
    assert meta["examples"] == {"torch cpu float64": 4, "torch cpu float32": 4}
    assert meta["examples_by_tier"]["torch cpu float64"] == {"small": 4, "large": 0}
    assert meta["wall_time_s"] > 0 and meta["date"]
    assert report["summary"] == {"pass": 6, "fail": 0, "skip": 1, "exit_status": 0}  # skip: no GPU
    assert report["diagnoses"] == []


# ---- Hypothesis settings: seed, profile, max examples ----

def _fingerprint(report):
    return [(r["implementation"], r["dtype"], r["check"], r["worst_error"], r["worst_at"])
            for r in report["results"]]


def test_seed_makes_a_run_reproducible_and_a_drawn_seed_is_printed(capsys, fake_backends, tmp_path):
    argv = ["--backends", "spec", "--dtypes", "float32", "--max-examples", "10"]
    first = run(capsys, *argv, "--seed", "123", tmp_path=tmp_path)[3]
    again = run(capsys, *argv, "--seed", "123", tmp_path=tmp_path)[3]
    other = run(capsys, *argv, "--seed", "124", tmp_path=tmp_path)[3]
    assert _fingerprint(first) == _fingerprint(again)
    assert _fingerprint(first) != _fingerprint(other)

    status, out, err, drawn = run(capsys, *argv, tmp_path=tmp_path)
    seed = drawn["metadata"]["seed"]
    assert drawn["metadata"]["seed_source"] == "drawn" and f"--seed {seed}" in out
    rerun = run(capsys, *argv, "--seed", str(seed), tmp_path=tmp_path)[3]
    assert _fingerprint(rerun) == _fingerprint(drawn)


def test_profile_and_max_examples(capsys, fake_backends, tmp_path):
    report = run(capsys, "--backends", "spec", "--dtypes", "float64", "--profile", "ci", tmp_path=tmp_path)[3]
    assert report["metadata"]["seed_source"] == "derandomized" and report["metadata"]["seed"] is None
    assert {r["examples"] for r in report["results"]} == {25}
    ci_again = run(capsys, "--backends", "spec", "--dtypes", "float64", "--profile", "ci", tmp_path=tmp_path)[3]
    assert _fingerprint(ci_again) == _fingerprint(report)
    report = run(capsys, "--backends", "spec", "--dtypes", "float64", "--profile", "thorough",
                 "--max-examples", "7", tmp_path=tmp_path)[3]
    assert report["metadata"]["profile"] == "thorough"
    assert {r["examples"] for r in report["results"]} == {7}


@pytest.mark.parametrize("variable, value, profile", [("MLSTM_PROFILE", "thorough", "thorough"),
                                                      ("CI", "true", "ci")])
def test_profile_from_the_environment(capsys, fake_backends, tmp_path, monkeypatch, variable, value, profile):
    monkeypatch.setenv(variable, value)
    report = run(capsys, "--backends", "spec", "--dtypes", "float64", "--max-examples", "2", tmp_path=tmp_path)[3]
    assert report["metadata"]["profile"] == profile


# ---- output ----

def test_plain_progress_is_one_line_per_implementation_device_and_dtype(capsys, fake_backends):
    fake_backends(torch=fake_backend("torch"))
    status, out, err, _ = run(capsys, "--max-examples", "20")
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [line for line in lines if re.match(r"\[\d/5\] ", line)]
    assert len(lines) == 5  # mlstm_spec x 3 dtypes, torch x 2 dtypes


def _result(impl, dtype, check, status="pass", error=1e-7, examples=25, **extra):
    return CheckResult(impl, "cpu", dtype, check, 1e-4, status, error, "hs[0, 1] (example 3)", examples, **extra)


def test_rich_table_and_its_fallback_in_a_narrow_terminal():
    from rich.console import Console

    results = [_result("torch", "float32", c) for c in ("outputs", "final_state")]
    results.append(_result("torch", "float32", "gradients", "fail", 3.0, message="d_h0[1]=0, but should be 1",
                           reproducer="reproduce(ADAPTER, Case(batch=2, steps=1, input_size=1, hidden_size=1))"))
    results.append(CheckResult("jax", "-", "-", "-", None, "skip", message="jax is not installed"))
    report = Report(results, {"wall_time_s": 1.0}, 1)
    wide = Console(file=io.StringIO(), force_terminal=True, width=160, color_system=None)
    print_rich(report, wide)
    text = wide.file.getvalue()
    assert "final state" in text and "3.0e+00" in text and "FAIL" in text
    assert "jax: jax is not installed" in text  # the notes under the table
    assert "reproduce(ADAPTER, Case(batch=2, steps=1, input_size=1, hidden_size=1))" in text
    narrow = Console(file=io.StringIO(), force_terminal=True, width=60, color_system=None)
    print_rich(report, narrow)
    assert plain_table(results).splitlines()[1] in narrow.file.getvalue()


def test_live_display_in_a_terminal(capsys, fake_backends, monkeypatch):
    from rich.console import Console

    screen = io.StringIO()
    monkeypatch.setattr(runner, "_console", lambda stdout=False: Console(
        file=screen, force_terminal=True, width=150, color_system=None))
    status = runner.main(["--backends", "spec", "--max-examples", "3"])
    text = screen.getvalue()
    assert status == 0
    assert "mlstm_spec cpu float16" in text and "total" in text  # the progress bars
    assert re.search(r"mlstm_spec\s+cpu\s+float64\s+0\.0e\+00", text)  # the table


# ---- entry points ----

def test_python_dash_m_runs_the_runner(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mlstm_spec.conformance", "--backends", "spec",
                           "--max-examples", "3", "--seed", "1"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "9 passed, 0 failed, 0 skipped" in done.stdout


def test_without_hypothesis_it_says_what_to_install(tmp_path):
    hide = "import sys; sys.modules['hypothesis'] = None; from mlstm_spec.conformance.runner import main; "
    done = subprocess.run([sys.executable, "-c", hide + "sys.exit(main([]))"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3
    assert "pip install 'mlstm-spec[conformance]'" in done.stderr
    assert "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, "-c", hide + "main(['--help'])"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "exit status" in done.stdout and "--impl" in done.stdout


def _install_plugin(tmp_path, monkeypatch, entries: str, outputs_scale: float = 1.0):
    """A distribution on sys.path (a dist-info folder, no pip) registering adapters: the spec, with
    its outputs multiplied by ``outputs_scale``."""
    dist = tmp_path / "my_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{runner.ENTRY_POINT_GROUP}]\n{entries}\n")
    write_module(tmp_path, "my_plugin_mod", f"""
        from mlstm_spec.conformance.defects import SpecAdapter

        class Plugged(SpecAdapter):
            name = "plugged-impl"
            dtypes = ("float64",)

            def forward(self, params, xs, state, *, integration_mode):
                hs, final = super().forward(params, xs, state, integration_mode=integration_mode)
                return hs * {outputs_scale}, final

        def make():
            return Plugged()
    """)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_registered_adapters_are_checked_without_impl(capsys, fake_backends, tmp_path, monkeypatch):
    _install_plugin(tmp_path, monkeypatch, "plugged = my_plugin_mod:make\nbroken = my_plugin_mod:nothing_here")
    status, out, err, report = run(capsys, "--max-examples", "2", tmp_path=tmp_path)
    assert status == 1  # the broken registration is a failure, like a broken backend
    assert {r["status"] for r in rows(report, implementation="plugged-impl")} == {"pass"}
    (broken,) = rows(report, implementation="broken")
    assert broken["status"] == "fail" and "my_plugin_mod:nothing_here" in broken["message"]

    status, out, err, report = run(capsys, "--backends", "plugged", "--max-examples", "2", tmp_path=tmp_path)
    assert status == 0  # a registered adapter counts as an implementation
    assert {r["implementation"] for r in report["results"]} == {"plugged-impl"}
    impl_only = run(capsys, "--impl", "mlstm_spec.conformance.defects:SpecAdapter", "--max-examples", "2",
                    tmp_path=tmp_path)[3]
    assert {r["implementation"] for r in impl_only["results"]} == {"mlstm_spec"}  # --impl alone: only it


def test_the_reproducer_of_a_registered_adapter_imports_it(capsys, fake_backends, tmp_path, monkeypatch):
    _install_plugin(tmp_path, monkeypatch, "plugged = my_plugin_mod:make", outputs_scale=2.0)
    status, out, err, report = run(capsys, "--backends", "plugged", "--max-examples", "3", "--seed", "1",
                                   "--no-diagnosis", tmp_path=tmp_path)
    assert status == 1
    (outputs,) = rows(report, check="outputs")
    assert outputs["reproducer"].startswith("import my_plugin_mod\nADAPTER = my_plugin_mod.make()\n")
    with pytest.raises(ConformanceError, match="but should be"):
        exec(outputs["reproducer"], {})


# ---- the worked example: torchrecurrent ----

def _example_run(capsys, monkeypatch, tmp_path, factory):
    pytest.importorskip("torchrecurrent", reason="the worked example wraps torchrecurrent")
    monkeypatch.chdir(EXAMPLES)
    return run(capsys, "--impl", factory, "--seed", "0", tmp_path=tmp_path)


def test_worked_example_torchrecurrent_passes_with_its_block_order(capsys, fake_backends, monkeypatch, tmp_path):
    status, out, err, report = _example_run(capsys, monkeypatch, tmp_path, "torchrecurrent_adapter:make_adapter")
    assert status == 0, out + err
    assert {(r["dtype"], r["check"]) for r in report["results"] if r["status"] == "pass"} == {
        (d, c) for d in ("float64", "float32") for c in ("outputs", "final_state", "gradients")}
    # the profile in effect (default here, ci under CI=true); the adapter declines the large tier's shapes
    assert {r["examples"] for r in report["results"]} == {EXAMPLES_BY_PROFILE[profile_from_environment()]}


def test_worked_example_without_the_block_permutation_fails(capsys, fake_backends, monkeypatch, tmp_path):
    write_module(tmp_path, "naive_torchrecurrent_adapter", """
        from mlstm_spec import IH_BLOCKS, MH_BLOCKS
        from torchrecurrent_adapter import TorchrecurrentAdapter

        class Naive(TorchrecurrentAdapter):
            name = "torchrecurrent-naive"
            IH_ORDER, MH_ORDER = IH_BLOCKS, MH_BLOCKS  # "same names, same shapes": copied as they are
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    status, out, err, report = _example_run(capsys, monkeypatch, tmp_path, "naive_torchrecurrent_adapter:Naive")
    assert status == 1
    failed = rows(report, status="fail")
    assert {(r["dtype"], r["check"]) for r in failed} >= {("float64", "outputs"), ("float32", "outputs")}
    assert all(r["worst_error"] > 1e-2 for r in failed if r["check"] == "outputs")
    (diagnosis,) = report["diagnoses"]  # the real torchrecurrent, given canonical arrays: its own order
    assert diagnosis["matches"] == ["torchrecurrent-gate-order"] and diagnosis["dtype"] == "float64"


# ---- docs/conformance.md states what the code does ----

DOC = REPO / "docs" / "conformance.md"


def _doc_table(header_start: str) -> list[list[str]]:
    lines = DOC.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("| " + header_start):
            table = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    return table
                table.append([cell.strip() for cell in row.strip().strip("|").split("|")])
    raise AssertionError(f"docs/conformance.md has no table headed {header_start!r}")


def test_docs_worked_example_is_the_tested_file():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert (EXAMPLES / "torchrecurrent_adapter.py").read_text() in blocks


def test_docs_exit_statuses_options_and_tolerances_match_the_code():
    from mlstm_spec.conformance import report, suite, tolerances

    assert report.CHECKS == suite.CHECKS  # report.py repeats them so that it needs no Hypothesis

    statuses = {int(row[0]) for row in _doc_table("exit status")}
    assert statuses == {report.EXIT_PASS, report.EXIT_FAIL, report.EXIT_USAGE, report.EXIT_NOTHING_CHECKED}
    documented = set(re.findall(r"`(--[a-z-]+)", " ".join(row[0] for row in _doc_table("option"))))
    actual = {o for action in runner.build_parser()._actions if action.help != argparse.SUPPRESS
              for o in action.option_strings} - {"-h", "--help"}
    assert documented == actual
    for dtype, value in _doc_table("dtype | tolerance"):
        assert tolerances.tolerance(dtype, "cpu") == tolerances.tolerance(dtype, "gpu") == float(value)


def test_docs_drawn_ranges_match_the_strategy():
    import inspect

    from mlstm_spec.conformance.suite import cases

    defaults = {k: p.default for k, p in inspect.signature(cases).parameters.items()}
    table = {row[0]: row[1] for row in _doc_table("what | drawn from")}
    assert table["batch `B`"].startswith(f"1 to {defaults['max_batch']},")
    assert table["steps `T`"] == f"1 to {defaults['max_steps']}"
    assert table["input size `I`, hidden size `H`"] == f"1 to {defaults['max_size']} each"
    assert table["stacked layers"].startswith(f"1 or {defaults['max_layers']} ")


def test_docs_defect_table_covers_every_planted_defect():
    from mlstm_spec.conformance import defects

    table = _doc_table("defect | dtype")
    assert [row[0].strip("`") for row in table] == [d.name for d in defects.DEFECTS]
    for row in table:  # the size defects are the ones the small tier does not catch
        size_defect = row[0].strip("`") in {d.name for d in defects.SIZE_DEFECTS}
        assert row[2].startswith("not caught") == size_defect and row[3].startswith("caught")


def test_docs_large_tier_variants_and_sharpness_match_the_code():
    from mlstm_spec.conformance import LARGE_SHAPES, SHARPNESS, VARIANTS

    def shapes(text):
        out = []
        for b, t, i, h, rest, mode in re.findall(
                r"\((\d+|unbatched), (\d+), (\d+), (\d+)\)( with \d layers)?(?: under ([a-z ]+))?", text):
            layers = int(rest.split()[1]) if rest else 1
            out.append((None if b == "unbatched" else int(b), int(t), int(i), int(h), layers,
                        mode.replace(" ", "_") or None))
        return out

    as_tuples = {name: [(s.batch, s.steps, s.input_size, s.hidden_size, s.num_layers, s.integration_mode)
                        for s in shapes_]
                 for name, shapes_ in LARGE_SHAPES.items()}
    table = {row[0]: row[1] for row in _doc_table("profile | shapes")}
    assert shapes(table["`default`, `ci`"]) == as_tuples["default"] == as_tuples["ci"]
    assert shapes(table["`thorough`"]) == as_tuples["thorough"][len(as_tuples["default"]):]
    variants_table = _doc_table("variant | what it computes")
    assert [row[0].strip("`") for row in variants_table] == [v.key for v in VARIANTS]
    assert [tuple(row[1:]) for row in variants_table] == [(v.title, v.seen_in) for v in VARIANTS]
    for dtype, k, floor, _ in _doc_table("dtype | k | floor"):
        assert SHARPNESS[dtype][0] == float(k)
        assert SHARPNESS[dtype][1] == pytest.approx(float(re.search(r"\(([\d.e-]+)\)", floor).group(1)), rel=0.05)


# ---- --jobs: the checks split by dtype across processes ----

def test_checks_split_across_processes_give_the_report_of_one_process(capsys, tmp_path):
    argv = ("--backends", "spec", "--max-examples", "3", "--seed", "7")
    one = run(capsys, *argv, "--jobs", "1", tmp_path=tmp_path)
    status, out, err, two = run(capsys, *argv, "--jobs", "2", tmp_path=tmp_path)
    assert one[0] == status == 0, out + err
    assert (one[3]["metadata"]["processes"], two["metadata"]["processes"]) == (1, 2)
    assert two["results"] == one[3]["results"]
    assert {r["dtype"] for r in two["results"]} == {"float64", "float32", "float16"}
    # every unit's progress line reached this process, the child's included
    assert sorted(re.findall(r"mlstm_spec cpu (\w+): pass", err)) == ["float16", "float32", "float64"]


def test_one_dtype_runs_in_one_process(capsys, tmp_path):
    report = run(capsys, "--backends", "spec", "--dtypes", "float64", "--max-examples", "2", "--jobs", "4",
                 tmp_path=tmp_path)[3]
    assert report["metadata"]["processes"] == 1


def test_a_child_process_that_dies_fails_its_checks_and_says_so(capsys, tmp_path, monkeypatch):
    # float32 goes to the child (dtypes are dealt out in turn: float64 here, float32 there); the
    # adapter ends its process there, as a crashing native library would
    write_module(tmp_path, "my_dying_adapter", """
        import os
        from mlstm_spec.conformance.defects import SpecAdapter

        class Dying(SpecAdapter):
            name = "dying"
            dtypes = ("float64", "float32")

            def forward(self, params, xs, state, **options):
                if xs.dtype.name == "float32":
                    os.write(2, b"native crash in the float32 kernel\\n")
                    os._exit(7)
                return super().forward(params, xs, state, **options)
    """)
    monkeypatch.chdir(tmp_path)
    status, out, err, report = run(capsys, "--impl", "my_dying_adapter:Dying", "--max-examples", "2",
                                   "--jobs", "2", tmp_path=tmp_path)
    assert status == 1, out + err
    assert {r["status"] for r in rows(report, dtype="float64")} == {"pass"}
    (failed,) = rows(report, dtype="float32")
    assert failed["status"] == "fail" and failed["check"] == "suite"
    assert "ended (exit status 7) without their results" in failed["message"]
    assert "native crash in the float32 kernel" in failed["message"]
