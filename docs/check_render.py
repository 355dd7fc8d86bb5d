"""Open the built documentation site in headless Chromium and fail if any formula is left as raw TeX.

    mkdocs build --strict -f docs/site-config/mkdocs.yml          # writes site/
    python docs/check_render.py                                   # checks site/equations.html
    python docs/check_render.py --site site --page equations.html --screenshot /tmp/equations.png

Chromium loads the page from disk (file://) with networking off, so MathJax must come from the site
itself. The page's DOM, as it stands after MathJax has run, is then read back: every formula that
pymdownx.arithmatex marked must hold MathJax's output (an ``mjx-container``) and no MathJax error, and
no TeX delimiter may be left in the page's text outside code. A screenshot is written for a person to
look at. Exit status 0 when every formula rendered, 1 otherwise, 2 when Chromium or the page is missing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# No sandbox: the check runs as root in containers; the page is our own, read from disk.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars")
# Virtual time lets MathJax's asynchronous typesetting finish before the DOM is dumped.
VIRTUAL_TIME_MS = 20000
# Left in a page's text, these mean a formula was never typeset.
RAW_TEX = ("\\(", "\\)", "\\[", "\\]", "$$", "\\begin{", "\\end{")
SKIPPED_TEXT_TAGS = {"code", "pre", "script", "style", "mjx-container", "svg", "math", "textarea"}


def find_browser(explicit: str | None = None) -> str | None:
    """The Chromium executable: ``explicit``, else $CHROMIUM, else the first of BROWSERS on PATH."""
    for name in (explicit, os.environ.get("CHROMIUM"), *BROWSERS):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class _FormulaScanner(HTMLParser):
    """Collects, for each element with class ``arithmatex``, whether MathJax output or an error is
    inside it and what raw text it still holds; and the page's text outside code and math."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack = []  # open elements: (tag, index of the formula it opened or None)
        self.formulas = []  # dicts: source text, rendered, error
        self.loose_text = []

    def _formula(self):
        for _, index in reversed(self.stack):
            if index is not None:
                return self.formulas[index]
        return None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        formula = self._formula()
        if formula is not None:
            if tag == "mjx-container":
                formula["rendered"] = True
            if tag == "mjx-merror" or "data-mjx-error" in attributes:
                formula["error"] = attributes.get("data-mjx-error") or attributes.get("title") or "MathJax error"
        index = None
        if "arithmatex" in (attributes.get("class") or "").split():
            index = len(self.formulas)
            self.formulas.append({"text": "", "rendered": False, "error": None})
        if tag not in self.VOID:
            self.stack.append((tag, index))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag):
        for position in range(len(self.stack) - 1, -1, -1):
            if self.stack[position][0] == tag:
                del self.stack[position:]
                return

    def handle_data(self, data):
        if any(tag in SKIPPED_TEXT_TAGS for tag, _ in self.stack):
            return
        formula = self._formula()
        if formula is not None:
            formula["text"] += data
        else:
            self.loose_text.append(data)


def problems_in(dom: str) -> tuple[int, list[str]]:
    """The number of formulas in a rendered page's DOM, and what is wrong with them (empty if nothing)."""
    scanner = _FormulaScanner()
    scanner.feed(dom)
    scanner.close()
    problems = []
    for number, formula in enumerate(scanner.formulas, 1):
        source = " ".join(formula["text"].split())[:120]
        if not formula["rendered"]:
            problems.append(f"formula {number} was not typeset (no MathJax output): {source!r}")
        elif formula["error"]:
            problems.append(f"formula {number}: MathJax error {formula['error']!r}")
        elif any(mark in formula["text"] for mark in RAW_TEX):
            problems.append(f"formula {number} still shows raw TeX next to its output: {source!r}")
    text = "".join(scanner.loose_text)
    for mark in RAW_TEX:
        at = text.find(mark)
        if at >= 0:
            problems.append(f"raw TeX {mark!r} in the page text, outside any formula: "
                            f"{' '.join(text[max(0, at - 60):at + 60].split())!r}")
    if not scanner.formulas:
        problems.append("no formula found (no element with class 'arithmatex'): is pymdownx.arithmatex on?")
    return len(scanner.formulas), problems


def run_browser(browser: str, url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="check-render-profile-") as profile:
        command = [browser, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={VIRTUAL_TIME_MS}",
                   *args, url]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def check(site: Path, page: str, screenshot: Path | None, browser: str) -> tuple[int, list[str]]:
    """Render ``site/page`` in ``browser``; returns the number of formulas and the problems found."""
    url = (site / page).resolve().as_uri()
    result = run_browser(browser, url, "--dump-dom")
    if result.returncode != 0 or "<html" not in result.stdout:
        return 0, [f"{browser} --dump-dom {url} failed (exit {result.returncode}): {result.stderr[-1500:]}"]
    count, problems = problems_in(result.stdout)
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        shot = run_browser(browser, url, f"--screenshot={screenshot.resolve()}", "--window-size=1280,2400")
        if shot.returncode != 0 or not screenshot.is_file():
            problems.append(f"no screenshot written (exit {shot.returncode}): {shot.stderr[-1500:]}")
    return count, problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=Path, default=ROOT / "site", help="the built site (default: site/)")
    parser.add_argument("--page", default="equations.html", help="page to check, relative to the site")
    parser.add_argument("--screenshot", type=Path, default=None,
                        help="write a PNG screenshot of the page here (default: <site>/<page>-screenshot.png)")
    parser.add_argument("--browser", default=None, help="Chromium executable (default: $CHROMIUM or chromium)")
    args = parser.parse_args(argv)
    browser = find_browser(args.browser)
    if browser is None:
        print(f"no Chromium found (tried {', '.join(BROWSERS)}; set CHROMIUM or --browser)", file=sys.stderr)
        return 2
    if not (args.site / args.page).is_file():
        print(f"{args.site / args.page} does not exist: build the site first "
              "(mkdocs build --strict -f docs/site-config/mkdocs.yml)", file=sys.stderr)
        return 2
    screenshot = args.screenshot or args.site / f"{Path(args.page).stem}-screenshot.png"
    count, problems = check(args.site, args.page, screenshot, browser)
    for problem in problems:
        print(f"FAIL: {problem}")
    print(f"{args.page}: {count} formulas, {len(problems)} problems; screenshot {screenshot}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
