"""The runner works from a non-editable install of the built wheel (the suite ships inside the package).

Builds the wheel from a copy of the sources, installs it with its ``conformance`` extra into a fresh
virtual environment (pip fetches numpy, Hypothesis and rich from the package index), and runs
``mlstm-conformance`` from a directory outside the repository. About 15-30 s, most of it pip.

Marked ``slow`` and ``network``: where pip cannot reach its package index (an offline GPU machine, or
``MLSTM_OFFLINE=1``) it is skipped with the reason; ``pytest -m "not network"`` leaves it out.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "mlstm_spec", "backends"]
#: What the fresh environment fetches: the package's dependency and its conformance extra.
FETCHED = ["numpy", "hypothesis", "rich"]
OFFLINE_VARIABLE = "MLSTM_OFFLINE"

pytestmark = [pytest.mark.slow, pytest.mark.network]


def index_unreachable_reason() -> str | None:
    """Why pip cannot fetch the fresh environment's packages here, or None when it can. Asks pip
    itself (a dry-run install with one short try, ~2-4 s), so that its own configuration (index,
    mirrors, find-links, proxies) decides; ``MLSTM_OFFLINE=1`` says offline without asking."""
    if os.environ.get(OFFLINE_VARIABLE, "") not in ("", "0"):
        return f"{OFFLINE_VARIABLE} is set: no package index to install the wheel's dependencies from"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
               "--quiet", "--retries", "0", "--timeout", "5", *FETCHED]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return f"the package index did not answer within 60 s ({' '.join(FETCHED)} are needed)"
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "ERROR" in line] or done.stderr.splitlines()
        return (f"pip cannot fetch {', '.join(FETCHED)} from its package index "
                f"({(errors or ['no message'])[-1].strip()[:200]})")
    return None


def _setuptools_is_recent() -> bool:
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0]) >= 68
    except importlib.metadata.PackageNotFoundError:
        return False


def install_wheel(root: Path) -> Path:
    """Build the wheel from a copy of the sources and install it into a fresh venv; its bin dir."""
    source = root / "src"
    source.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif path.exists():
            shutil.copy2(path, source / name)
    # --no-isolation uses this environment's setuptools (fast, offline); else build fetches it
    isolation = ["--no-isolation"] if _setuptools_is_recent() else []
    subprocess.run([sys.executable, "-m", "build", "--wheel", *isolation, "--outdir", str(root / "dist"),
                    str(source)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = (root / "dist").glob("mlstm_spec-*.whl")
    # the PyTorch backend's C++ loops are compiled from source on first use: the source must ship
    assert "backends/torch/cpu_loops.cpp" in zipfile.ZipFile(wheel).namelist()
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", f"{wheel}[conformance]"],
                   check=True, capture_output=True, text=True, timeout=600)
    return bin_dir


def test_runner_works_from_an_installed_wheel(tmp_path):
    """One test (not several sharing a fixture) so that pytest-xdist builds the wheel only once."""
    offline = index_unreachable_reason()
    if offline:
        pytest.skip(offline)
    if importlib.util.find_spec("build") is None:
        pytest.fail("the 'build' package is needed to build the wheel (it is in the test extra)")
    bin_dir = install_wheel(tmp_path)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLSTM_PROFILE", "CI")}

    def run(*args, script="mlstm-conformance"):
        command = [str(bin_dir / script), *args] if script else [str(bin_dir / "python"), *args]
        return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)

    # the package (suite included) comes from the wheel, not from the repository
    done = run("-c", "import mlstm_spec.conformance.runner as r; print(r.__file__)", script=None)
    assert done.returncode == 0, done.stderr
    location = Path(done.stdout.strip())
    assert "site-packages" in location.parts and REPO not in location.parents, location

    # the console script runs the suite
    report_path = workdir / "report.json"
    done = run("--backends", "mlstm_spec", "--profile", "ci", "--max-examples", "5", "--seed", "0",
               "--json", str(report_path))
    assert done.returncode == 0, done.stdout + done.stderr
    ran = [r for r in json.loads(report_path.read_text())["results"] if r["status"] == "pass"]
    # 3 dtypes x 3 checks; --max-examples counts the small tier, the profile's large shapes (those the
    # adapter supports) come on top
    assert len(ran) == 9 and {r["examples_by_tier"]["small"] for r in ran} == {5}
    assert all(r["examples_by_tier"]["large"] >= 1 for r in ran)
    assert all(r["examples"] == sum(r["examples_by_tier"].values()) for r in ran)

    # python -m, and a planted defect fails with a reproducer
    done = run("-m", "mlstm_spec.conformance", "--impl", "mlstm_spec.conformance.defects:StateSwapped",
               "--dtypes", "float64", "--seed", "0", script=None)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL" in done.stdout and "reproduce(ADAPTER, Case(" in done.stdout

    # a requested backend that is not installed exits 2; with no framework at all, nothing is checked: 3
    missing = [name for name in ("torch", "jax", "tensorflow")
               if run("-c", f"import {name}", script=None).returncode != 0]
    assert missing == ["torch", "jax", "tensorflow"], "the fresh environment should hold no framework"
    done = run("--backends", "torch")
    assert done.returncode == 2
    assert "--backends requests torch, but torch is not installed" in done.stderr
    done = run("--max-examples", "3")
    assert done.returncode == 3, done.stdout + done.stderr
    assert "nothing could be checked" in done.stdout
