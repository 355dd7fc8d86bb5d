"""The conformance report: one table (implementation x device x dtype x check), the failures with code
that reproduces them, and the run's metadata, rendered as plain text, with rich, as Markdown or JSON.

The report holds :class:`~mlstm_spec.conformance.suite.CheckResult` objects (or anything with the same
fields); rows that could not run are results with ``status="skip"`` and the reason in ``message``.
Nothing here imports Hypothesis, and rich only inside :func:`print_rich`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

#: the suite's checks (mlstm_spec.conformance.suite.CHECKS; repeated so this module needs no Hypothesis)
CHECKS = ("outputs", "final_state", "gradients")
#: One table row per (implementation, device, dtype); each check's column holds its worst error.
COLUMNS = ("implementation", "device", "dtype", *CHECKS, "tolerance", "examples", "result", "note")
NUMERIC = (*CHECKS, "tolerance", "examples")
RESULT_WORDS = {"pass": "pass", "fail": "FAIL", "skip": "skip"}

#: Exit statuses of ``mlstm-conformance`` (also documented in its ``--help`` and docs/conformance.md).
EXIT_PASS = 0  # every check that ran passed (and at least one implementation was checked)
EXIT_FAIL = 1  # at least one check failed
EXIT_USAGE = 2  # bad arguments, or a requested backend / device / --impl is not available
EXIT_NOTHING_CHECKED = 3  # nothing could be checked (no backend installed and no --impl, or no Hypothesis)


@dataclass
class Report:
    results: list
    metadata: dict = field(default_factory=dict)
    exit_status: int = EXIT_PASS
    #: one entry per failing implementation and device: {"implementation", "device", "dtype", "text",
    #: "matches", "errors", ...} (see mlstm_spec.conformance.diagnosis)
    diagnoses: list = field(default_factory=list)

    def counts(self) -> dict:
        out = {"pass": 0, "fail": 0, "skip": 0}
        for result in self.results:
            out[result.status] = out.get(result.status, 0) + 1
        return out

    def failures(self) -> list:
        return [r for r in self.results if r.status == "fail"]

    def summary(self) -> str:
        counts = self.counts()
        text = f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped"
        seconds = self.metadata.get("wall_time_s")
        if seconds is not None:
            text += f" in {seconds:.1f} s"
        return f"{text}; exit status {self.exit_status} ({describe_exit(self.exit_status)})"

    def as_dict(self) -> dict:
        return {
            "tool": "mlstm-conformance",
            "metadata": self.metadata,
            "summary": self.counts() | {"exit_status": self.exit_status},
            "results": [_as_dict(r) for r in self.results],
            "diagnoses": _finite(self.diagnoses),
        }


def describe_exit(status: int) -> str:
    return {
        EXIT_PASS: "all checks passed",
        EXIT_FAIL: "failures",
        EXIT_USAGE: "usage error or requested target unavailable",
        EXIT_NOTHING_CHECKED: "nothing could be checked",
    }.get(status, "unknown")


def _as_dict(result) -> dict:
    return _finite(result.as_dict() if hasattr(result, "as_dict") else dict(vars(result)))


def _finite(value):
    """JSON has no inf/nan: a crash or NaN output is reported as the string "inf"/"nan"."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def format_error(value) -> str:
    if value is None:
        return "-"
    return f"{value:.1e}" if math.isfinite(value) else str(value)


def groups(results) -> list[list]:
    """Results grouped by (implementation, device, dtype), in order of first appearance."""
    out: dict = {}
    for result in results:
        out.setdefault((result.implementation, result.device, result.dtype), []).append(result)
    return list(out.values())


def group_status(group) -> str:
    statuses = {r.status for r in group}
    return "fail" if "fail" in statuses else "pass" if "pass" in statuses else "skip"


def _exceeded(result) -> bool:
    """Whether the result failed on its numbers (rather than by crashing or a wrong shape or dtype)."""
    ratio = getattr(result, "worst_ratio", None)
    if ratio:
        return ratio > 1
    return result.tolerance is not None and not result.worst_error <= result.tolerance


def _check_cell(result) -> str:
    if result is None:
        return "-"
    if result.status == "skip":
        return "not run"
    if result.check in CHECKS and result.examples == 0:
        return "FAIL" if result.status == "fail" else "-"
    if result.status == "fail" and not _exceeded(result):
        return "FAIL"  # it crashed, or returned the wrong shape or dtype: the note says which
    value = format_error(result.worst_error)
    return f"{value} FAIL" if result.status == "fail" else value


def _examples_cell(ran) -> str:
    if not ran:
        return "-"
    tiers = [getattr(r, "examples_by_tier", None) or {} for r in ran]
    if any(tiers):
        small = max(t.get("small", 0) for t in tiers)
        large = max(t.get("large", 0) for t in tiers)
        return f"{small}+{large}"
    return str(max(r.examples for r in ran))


def _note(group, limit: int | None = 120) -> str:
    """Why a row was skipped, where it failed, or which of its checks were not run."""
    notes = []
    for result in group:
        label = f"{result.check}: " if result.check in CHECKS else ""
        if result.status == "fail":
            text = f"worst at {result.worst_at}" if result.worst_at and _exceeded(result) else (
                result.message.splitlines() or [""])[0]
            failures = len(getattr(result, "failures", None) or [])
            if failures > 1:
                text += f" ({failures} distinct failures)"
            notes.append(label + text)
        elif result.status == "skip" and result.message and not (
                group_status(group) == "pass" and result.check not in CHECKS):
            notes.append(label + result.message)
        elif result.status == "pass" and result.message and result.message not in notes:
            notes.append(result.message)  # checked, but not in every example: say which were not run
    variants = _variants_note(group)
    if variants:
        notes.append(variants)
    text = "; ".join(notes)
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."


def _variants_note(group) -> str:
    """Which of the spec's variants the row checked (examples with each on), which no example drew,
    and which the adapter does not compute (shown as not run, never as a pass)."""
    counts = next((getattr(r, "variants", None) for r in group if r.check in CHECKS and getattr(r, "variants", None)),
                  None)
    if not counts:
        return ""
    checked = [f"{name} {n}" for name, n in counts.items() if isinstance(n, int) and n > 0]
    undrawn = [name for name, n in counts.items() if n == 0]
    absent = {}
    for name, n in counts.items():
        if isinstance(n, str):
            absent.setdefault(n, []).append(name)
    parts = [f"variants checked (examples): {', '.join(checked)}"] if checked else []
    parts += [f"variants {', '.join(undrawn)}: not run (no example drew them)"] if undrawn else []
    parts += [f"variants {', '.join(names)}: {why}" for why, names in absent.items()]
    return "; ".join(parts)


def row(group) -> tuple[str, ...]:
    """The table's cells for one (implementation, device, dtype)."""
    first = group[0]
    by_check = {r.check: r for r in group}
    ran = [r for r in group if r.check in CHECKS and r.status != "skip"]
    rule = next((getattr(r, "tolerance_rule", "") for r in group if getattr(r, "tolerance_rule", "")), "")
    tolerance = next((r.tolerance for r in group if r.tolerance is not None), None)
    return (
        first.implementation,
        first.device,
        first.dtype,
        *(_check_cell(by_check.get(c)) for c in CHECKS),
        rule or (f"{tolerance:.0e}" if tolerance is not None else "-"),
        _examples_cell(ran),
        RESULT_WORDS[group_status(group)],
        _note(group),
    )


def failure_entries(result, shown: set | None = None) -> list:
    """``(message, reproducer)`` of every distinct failure of a result. A reproducer already in
    ``shown`` (the same example failing another check) is not repeated: its entry says so instead."""
    failures = getattr(result, "failures", None) or []
    entries = [(f["message"], f.get("reproducer", "")) for f in failures] or [(result.message, result.reproducer)]
    if shown is None:
        return entries
    out = []
    for message, code in entries:
        if code and code in shown:
            out.append((message + "\n(the same example as a failure above: reproduced by the same code)", ""))
        else:
            shown.add(code)
            out.append((message, code))
    return out


def failure_title(result) -> str:
    where = [f"on {result.device}"] if result.device != "-" else []
    where += [result.dtype] if result.dtype != "-" else []
    return " ".join([result.implementation, ", ".join(where), f"check {result.check!r}"]).replace("  ", " ")


# ---- plain text (no TTY, no rich): readable in CI logs ----

def plain_table(results) -> str:
    rows = [COLUMNS] + [row(g) for g in groups(results)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    lines = []
    for i, cells in enumerate(rows):
        line = "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)) + "  " + cells[-1]
        lines.append(line.rstrip())
        if i == 0:
            lines.append("  ".join("-" * width for width in widths) + "  " + "-" * 4)
    return "\n".join(lines)


def plain_text(report: Report) -> str:
    parts = [plain_table(report.results)]
    notes = _long_notes(report)
    if notes:
        parts.append("Notes:\n" + "\n".join(f"  {where}: {text}" for where, text, _ in notes))
    shown: set = set()
    for result in report.failures():
        for message, code in failure_entries(result, shown):
            parts.append(f"FAIL: {failure_title(result)}\n{_indent(message)}")
            if code:
                parts.append("Reproduce with:\n" + _indent(code))
    for diagnosis in report.diagnoses:
        parts.append(f"DIAGNOSIS: {_diagnosis_title(diagnosis)}\n{_indent(diagnosis['text'])}")
    parts.append(_footer(report))
    return "\n\n".join(parts) + "\n"


def _diagnosis_title(diagnosis) -> str:
    return f"{diagnosis['implementation']} on {diagnosis['device']} ({diagnosis['dtype']})"


def _long_notes(report: Report) -> list:
    """The notes the table cut short, in full: (where, text, status)."""
    out = []
    for group in groups(report.results):
        full = _note(group, limit=None)
        if full != _note(group):
            first = group[0]
            out.append((f"{first.implementation} {first.device} {first.dtype}".replace(" -", ""), full,
                        group_status(group)))
    return out


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line if line else line for line in text.splitlines())


def _footer(report: Report) -> str:
    lines = [report.summary()]
    if report.exit_status == EXIT_NOTHING_CHECKED:
        try:  # the registry of backends (framework-free)
            from backends import BACKENDS
        except ImportError:
            BACKENDS = {}
        hints = ", ".join(backend.install_hint for backend in BACKENDS.values())
        lines.append(f"No implementation was checked: install a backend ({hints}) or pass --impl MODULE:FACTORY")
    seed = report.metadata.get("seed")
    if seed is not None and report.metadata.get("seed_source") == "drawn":
        lines.append(f"Examples drawn with seed {seed}: rerun them with --seed {seed}")
    return "\n".join(lines)


# ---- rich (a terminal) ----

def print_rich(report: Report, console) -> None:
    from rich import box
    from rich.measure import Measurement
    from rich.table import Table
    from rich.text import Text

    styles = {"pass": "green", "fail": "bold red", "skip": "yellow"}
    # The notes go below the table, so that the table itself fits an 80- to 100-column terminal.
    table = Table(box=box.SIMPLE_HEAD, title="mlstm-conformance", title_justify="left", pad_edge=False,
                  padding=(0, 2, 0, 0))
    shown = [c for c in COLUMNS if c != "note"]
    for name in shown:
        table.add_column(name.replace("_", " "), justify="right" if name in NUMERIC else "left", no_wrap=True)
    notes = []
    for group in groups(report.results):
        cells = dict(zip(COLUMNS, row(group)))
        rendered = []
        for name in shown:
            text = cells[name]
            if name in CHECKS and text.endswith(" FAIL"):
                rendered.append(Text(text[:-5] + " \u2717", style=styles["fail"]))
            elif name == "result":
                rendered.append(Text(text + ("*" if cells["note"] else " "), style=styles[group_status(group)]))
            else:
                rendered.append(text)
        table.add_row(*rendered)
        if cells["note"]:
            notes.append((f"{cells['implementation']} {cells['device']} {cells['dtype']}".replace(" -", ""),
                          _note(group, limit=None), group_status(group)))
    if Measurement.get(console, console.options.update_width(100_000), table).maximum <= console.width:
        console.print(table)
    else:  # a terminal too narrow for the table: the plain one, whose long lines the terminal wraps
        console.print(Text(plain_table(report.results)), soft_wrap=True)
        notes = []
    if notes:
        console.print("* notes:")
        for where, text, status in notes:
            console.print(Text.assemble("  ", (where, styles[status]), ": ", text))
        console.print()
    printed: set = set()
    for result in report.failures():
        for message, code in failure_entries(result, printed):
            console.print(Text(f"FAIL: {failure_title(result)}", style="bold red"))
            console.print(Text(_indent(message)))
            if code:
                console.print("Reproduce with:")
                # soft_wrap: long lines are left whole (the terminal wraps them), so the code copies intact
                console.print(Text(_indent(code), style="cyan"), soft_wrap=True)
            console.print()
    for diagnosis in report.diagnoses:
        console.print(Text(f"DIAGNOSIS: {_diagnosis_title(diagnosis)}", style="bold magenta"))
        console.print(Text(_indent(diagnosis["text"])))
        console.print()
    style = "bold red" if report.failures() else ("green" if report.exit_status == EXIT_PASS else "yellow")
    console.print(Text(_footer(report), style=style))


# ---- Markdown and JSON files ----

def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(report: Report) -> str:
    meta = report.metadata
    lines = ["# mlstm-conformance report", ""]
    facts = [
        ("date", meta.get("date")),
        ("command", meta.get("command")),
        ("profile", meta.get("profile")),
        ("max examples per implementation, device and dtype", meta.get("max_examples")),
        ("seed", meta.get("seed") if meta.get("seed") is not None else "derandomized"),
        ("wall time", f"{meta['wall_time_s']:.1f} s" if "wall_time_s" in meta else None),
        ("versions", ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())),
        ("devices", ", ".join(f"{k}: {v}" for k, v in meta.get("devices", {}).items())),
    ]
    lines += [f"- **{name}**: {_md_cell(str(value))}" for name, value in facts if value not in (None, "")]
    lines += ["", "Each check column holds the worst relative error over the examples run; the examples "
              "column counts small-tier + large-tier examples; below float64 each example's tolerance is "
              "k times the spec's own error in that dtype on it, between a floor and the fixed ceiling "
              "(see mlstm_spec/conformance/tolerances.py).", "",
              "| " + " | ".join(COLUMNS) + " |",
              "|" + "|".join("---:" if c in NUMERIC else "---" for c in COLUMNS) + "|"]
    for group in groups(report.results):
        lines.append("| " + " | ".join(_md_cell(cell) for cell in row(group)) + " |")
    notes = _long_notes(report)
    if notes:
        lines += ["", "Notes in full:", ""] + [f"- **{where}**: {_md_cell(text)}" for where, text, _ in notes]
    failures = report.failures()
    if failures:
        lines += ["", "## Failures"]
        shown: set = set()
        for result in failures:
            for message, code in failure_entries(result, shown):
                lines += ["", f"### {failure_title(result)}", "", "```text", message, "```"]
                if code:
                    lines += ["", "Reproduce with:", "", "```python", code, "```"]
    if report.diagnoses:
        lines += ["", "## Diagnosis"]
        for diagnosis in report.diagnoses:
            lines += ["", f"- **{_diagnosis_title(diagnosis)}**: {_md_cell(diagnosis['text'])}"]
    lines += ["", report.summary(), ""]
    return "\n".join(lines)


def to_json(report: Report) -> str:
    return json.dumps(report.as_dict(), indent=2, allow_nan=False) + "\n"
