"""The README's set-up commands are the ones CI runs, so the two cannot drift apart."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(?:bash|sh)\n(.+?)\n```", setup)


def test_readme_opens_with_exactly_two_setup_commands():
    commands = readme_commands()
    assert len(commands) == 2, commands
    assert all("\n" not in c for c in commands), "each set-up command must be one pasteable line"
    main_job, tests = commands
    assert main_job.rstrip().endswith("mlstm-conformance"), main_job
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    test_command = readme_commands()[1]
    assert test_command in ci_lines, f"{test_command!r} is not a line of .ci/run"


def test_both_commands_share_the_same_setup():
    main_job, tests = readme_commands()
    install = lambda c: c.split(" && ")[:2]  # noqa: E731  venv creation, pip install
    assert install(main_job)[0] == install(tests)[0]
    assert "-c .ci/constraints.txt" in install(main_job)[1] and "-c .ci/constraints.txt" in install(tests)[1]


def test_readme_usage_example_runs(tmp_path):
    """The README's Python example, run as a user would paste it (it needs all three frameworks)."""
    import importlib.util
    import subprocess
    import sys

    import pytest

    from helpers import requested_backends

    missing = [f for f in ("torch", "jax", "tensorflow", "safetensors") if importlib.util.find_spec(f) is None]
    if missing:
        if requested_backends() & set(missing):
            pytest.fail(f"the README example needs {missing}, which are required here but missing")
        pytest.skip(f"the README example needs {missing}")
    text = (ROOT / "README.md").read_text()
    (snippet,) = re.findall(r"```python\n(.+?)\n```", text, re.S)
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "layer.safetensors").exists()
