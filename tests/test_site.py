"""The documentation site: ``mkdocs build --strict`` passes (broken links, anchors and references fail
it), the API reference is generated, the equations render in a real browser (where Chromium is
installed), and the performance charts show the figures their pages state."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "docs" / "site-config" / "mkdocs.yml"
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "docs"))

import _common  # noqa: E402  benchmarks/_common.py
import check_render  # noqa: E402  docs/check_render.py

DOCS_PACKAGES = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "mathjax")


def missing_docs_packages():
    missing = []
    for name in DOCS_PACKAGES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            missing.append(name)
    return missing


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site, built once with ``mkdocs build --strict`` into a temporary folder."""
    missing = missing_docs_packages()
    if missing:
        reason = f"the docs extra is not installed (missing {', '.join(missing)}: pip install 'mlstm-spec[docs]')"
        if os.environ.get("CI"):
            pytest.fail(f"CI installs the docs extra, but {reason}", pytrace=False)
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(CONFIG), "-d", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return out


def test_site_has_every_chapter_and_the_api_reference(site):
    for page in ("index.html", "equations.html", "conformance.html", "interop.html", "julia/index.html",
                 "performance.html", "performance-torch.html", "performance-jax.html", "performance-tensorflow.html"):
        assert (site / page).is_file(), page
    api = {
        "api/mlstm_spec.html": ["mlstm_spec.reference.forward", "mlstm_spec.io.save", "mlstm_spec.converters.from_paper"],
        "api/conformance.html": ["mlstm_spec.conformance.tolerances.relative_error"],
        "api/torch.html": ["backends.torch.MLSTM"],
        "api/jax.html": ["backends.jax.MLSTM"],
        "api/tensorflow.html": ["backends.tensorflow.MLSTM"],
    }
    for page, names in api.items():
        html = (site / page).read_text()
        for name in names:
            assert f'id="{name}"' in html, f"{page} documents no {name}"
    for chart in ("performance-torch.png", "performance-jax.png", "performance-tensorflow.png"):
        assert (site / "img" / chart).is_file(), chart
        assert f'src="img/{chart}"' in (site / chart.replace(".png", ".html")).read_text()
    # MathJax is served from the site, and nothing is fetched from elsewhere.
    assert (site / "assets" / "mathjax" / "tex-svg-full.js").stat().st_size > 1_000_000
    equations = (site / "equations.html").read_text()
    assert 'src="assets/mathjax/tex-svg-full.js"' in equations
    assert "fonts.googleapis.com" not in equations and "cdn.jsdelivr" not in equations
    assert not (site / "site-config" / "mkdocs.yml").exists() and not (site / "check_render.py").exists()


def test_equations_render_in_a_browser(site, tmp_path):
    browser = check_render.find_browser()
    if browser is None:
        pytest.skip(f"no Chromium on this machine (tried {', '.join(check_render.BROWSERS)})")
    count, problems = check_render.check(site, "equations.html", tmp_path / "equations.png", browser)
    assert not problems, "\n".join(problems)
    assert count >= 50, f"only {count} formulas on the equations page"
    assert (tmp_path / "equations.png").stat().st_size > 10_000


# ---- the render check's own detector, on pages written by hand ----

RENDERED = '<span class="arithmatex"><mjx-container class="MathJax"><svg><g></g></svg></mjx-container></span>'


@pytest.mark.parametrize("dom, problem", [
    ('<p><span class="arithmatex">\\(x_t\\)</span></p>', "not typeset"),
    (f'<p>{RENDERED} and <span class="arithmatex">\\(h_t\\)</span></p>', "formula 2 was not typeset"),
    ('<span class="arithmatex"><mjx-container><mjx-merror data-mjx-error="Undefined control sequence \\foo">'
     '</mjx-merror></mjx-container></span>', "MathJax error"),
    (f'<p>{RENDERED} then $$a + b$$ in a paragraph</p>', "raw TeX '$$'"),
    (f'<div>{RENDERED}<p>\\begin{{aligned}} p &= q</p></div>', "raw TeX '\\\\begin{'"),
    ("<p>no math at all</p>", "no formula found"),
])
def test_render_check_reports_unrendered_tex(dom, problem):
    _, problems = check_render.problems_in(f"<html><body>{dom}</body></html>")
    assert any(problem in p for p in problems), problems


def test_render_check_accepts_rendered_formulas_and_tex_in_code():
    dom = f"<html><body><p>{RENDERED} x {RENDERED}</p><pre><code>$$ \\(a\\) $$</code></pre></body></html>"
    assert check_render.problems_in(dom) == (2, [])


# ---- performance charts ----

@pytest.mark.parametrize("page", list(_common.REPORT_PAGES), ids=lambda p: Path(p).stem)
def test_chart_shows_the_ratios_its_page_states(page):
    """A chart is drawn from its page's table; one not redrawn after the table changed fails here."""
    page = ROOT / page
    rows = _common.ratio_rows(page.read_text())
    assert rows, page
    assert _common.chart_rows(_common.chart_path(page)) == rows, (
        f"{_common.chart_path(page).name} is stale: redraw it with `python benchmarks/_common.py charts`")
    assert _common.chart_markdown(page) in page.read_text()


def test_ratio_rows_reads_the_table_ratio_table_writes():
    results = {(2, 3, 4, 5): {("A", "forward"): 2.0, ("A", "forward+backward"): 6.0,
                              ("B", "forward"): 3.0, ("B", "forward+backward"): 3.0}}
    report = f"Measured ...\n\n{_common.ratio_table(results, ['A', 'B'], 'A')}\n\nTargets:\n"
    assert _common.ratio_rows(report) == [["(2, 3, 4, 5)", "forward", "B / A", 1.5],
                                          ["(2, 3, 4, 5)", "forward+backward", "B / A", 0.5]]
    with pytest.raises(ValueError, match="no table of ratios"):
        _common.ratio_rows("| a | b |\n|---|---|\n| 1 | 2 |\n")


def test_plot_ratios_records_its_rows(tmp_path):
    pytest.importorskip("matplotlib", reason="drawing charts needs matplotlib (the docs extra)")
    rows = [["(2, 3, 4, 5)", "forward", "B / A", 1.5], ["(2, 3, 4, 5)", "forward+backward", "B / A", 0.5]]
    _common.plot_ratios(rows, tmp_path / "chart.png", "test")
    assert _common.chart_rows(tmp_path / "chart.png") == rows
