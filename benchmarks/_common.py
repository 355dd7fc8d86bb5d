"""What the benchmark scripts share: describing the machine, parsing sizes, the table of medians, and
the charts drawn from the reports they write (``python benchmarks/_common.py charts`` redraws them),
and TF32 off for float32 comparisons (torch and JAX alike)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
from pathlib import Path

#: The two sizes (B, T, I, H) every issue measures.
SIZES = ((32, 128, 64, 256), (64, 100, 512, 512))


def machine() -> str:
    """CPU model, logical CPU count and OS, for the report header."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def parse_size(text: str) -> tuple:
    """argparse type for ``B,T,I,H``."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"a size is B,T,I,H (four positive integers), got {text!r}")
    return values


def ratio_table(results: dict, names, base: str, decimals: int = 1) -> str:
    """Markdown: per size and implementation, the median forward and forward+backward times (ms, with
    ``decimals`` places) and their ratios to ``base``'s. ``results[size][(name, mode)]`` is in ms."""
    lines = [
        "| size (B, T, I, H) | implementation | forward ms | forward+backward ms | "
        f"forward: time / {base}'s | forward+backward: time / {base}'s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for size, medians in results.items():
        base_f, base_b = medians[(base, "forward")], medians[(base, "forward+backward")]
        for name in names:
            f, b = medians[(name, "forward")], medians[(name, "forward+backward")]
            lines.append(f"| {size} | {name} | {f:.{decimals}f} | {b:.{decimals}f} | {f / base_f:.2f} | "
                         f"{b / base_b:.2f} |")
    return "\n".join(lines)


# ---- charts of the ratios, drawn from the reports the benchmark scripts write ----
#
# The data of a chart is the report a benchmark script wrote into its docs page (the table of medians
# and ratios), so a chart can be redrawn from the page without rerunning the benchmark, and always
# shows the figures the page states. Each PNG also carries the rows it was drawn from (a text chunk
# under CHART_KEY), so a test can tell a stale chart from a current one without drawing anything.

#: The docs pages the benchmark scripts write, relative to the repository root, and their charts' titles.
REPORT_PAGES = {
    "docs/performance-torch.md": "PyTorch backend",
    "docs/performance-jax.md": "JAX backend",
    "docs/performance-tensorflow.md": "TensorFlow backend",
}
CHART_KEY = "mlstm-spec ratio rows"
MODES = ("forward", "forward+backward")


def chart_path(page: Path) -> Path:
    """Where the chart of a report page goes: ``img/<page name>.png`` beside the page."""
    return page.parent / "img" / f"{page.stem}.png"


def chart_markdown(page: Path) -> str:
    """The Markdown that shows ``page``'s chart inside the page."""
    return (f"![Time ratios from the table below, drawn by benchmarks/_common.py]"
            f"(img/{chart_path(page).name})")


def markdown_tables(text: str) -> list:
    """Every Markdown table in ``text``: a list of rows, header first, cells stripped (rule rows dropped)."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", cell) for cell in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def ratio_rows(report: str) -> list:
    """The time ratios a benchmark report states, as ``[size, mode, label, ratio]`` rows, ``label``
    naming the two implementations as "first / second" (ratio = first's time / second's). Read from
    :func:`ratio_table`'s table (every implementation but the base) or, for bench_tensorflow.py, from
    its table of ratios (the last one, when runs were appended). Raises ValueError if neither is there."""
    tables = markdown_tables(report)
    for table in tables:
        header = table[0]
        if header[:2] == ["size (B, T, I, H)", "implementation"] and header[4].startswith("forward: time / "):
            base = re.fullmatch(r"forward: time / (.+)'s", header[4]).group(1)
            rows = []
            for size, name, _, _, *ratios in table[1:]:
                if name != base:
                    rows += [[size, mode, f"{name} / {base}", float(r)] for mode, r in zip(MODES, ratios)]
            return rows
    tensorflow_tables = [t for t in tables if t[0] == ["B", "T", "I", "H", "pass", "ratio", "value"]]
    if tensorflow_tables:
        return [[f"({', '.join(row[:4])})", row[4], row[5].split(" (", 1)[0], float(row[6])]
                for row in tensorflow_tables[-1][1:]]
    raise ValueError("no table of ratios in the report (neither ratio_table's nor bench_tensorflow.py's)")


def plot_ratios(rows: list, path: Path, title: str) -> None:
    """A PNG bar chart of ``rows`` (as :func:`ratio_rows` returns them): one panel per size, forward and
    forward+backward side by side for each pair, with a line at 1 (equal time)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise RuntimeError("drawing the charts needs matplotlib (pip install 'mlstm-spec[docs]')") from error
    sizes = list(dict.fromkeys(row[0] for row in rows))
    labels = list(dict.fromkeys(row[2] for row in rows))
    value = {(size, mode, label): ratio for size, mode, label, ratio in rows}
    width = 0.38
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.8 * len(sizes), 0.5 * len(labels) + 2.4),
                             sharex=True, squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for k, (mode, colour) in enumerate(zip(MODES, ("#3f7fbf", "#e08a2e"))):
            ys = [i + (k - 0.5) * width for i in range(len(labels))]
            xs = [value.get((size, mode, label), 0.0) for label in labels]
            bars = ax.barh(ys, xs, height=width, color=colour, label=mode)
            ax.bar_label(bars, labels=[f"{x:.2f}" if x else "" for x in xs], padding=2, fontsize=8)
        ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_yticks(range(len(labels)), labels if ax is axes[0][0] else [""] * len(labels))
        ax.invert_yaxis()
        ax.set_title(f"(B, T, I, H) = {size}", fontsize=10)
        ax.set_xlabel("time of first / time of second")
        ax.margins(x=0.15)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncols=len(MODES), fontsize=9, frameon=False)
    fig.suptitle(f"{title}: ratios of median times (dashed: equal time)", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=96, metadata={"Software": None, CHART_KEY: json.dumps(rows)})
    plt.close(fig)


def chart_rows(path: Path) -> list:
    """The rows a chart written by :func:`plot_ratios` was drawn from (its PNG text chunk)."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    position = 8
    while position < len(data):
        length = int.from_bytes(data[position:position + 4], "big")
        kind, body = data[position + 4:position + 8], data[position + 8:position + 8 + length]
        if kind == b"tEXt":
            key, _, text = body.partition(b"\0")
            if key.decode("latin-1") == CHART_KEY:
                return json.loads(text.decode("latin-1"))
        position += 12 + length
    raise ValueError(f"{path} has no {CHART_KEY!r} text chunk: not drawn by plot_ratios")


def write_chart(page: Path, title: str) -> Path:
    """Draw ``page``'s chart from the report in it; returns the PNG's path."""
    path = chart_path(page)
    plot_ratios(ratio_rows(page.read_text()), path, title)
    return path


# ---- float32 means float32: TF32 off for every float32 comparison on a GPU ----
# (torch: backends.torch.full_float32 sets and restores it; JAX: JAX_FLOAT32_PRECISION below)

def torch_tf32_state() -> str:
    """The TF32 settings in effect, for a report."""
    import torch

    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return (f"fp32_precision: matmul {torch.backends.cuda.matmul.fp32_precision}, cudnn.conv "
                f"{torch.backends.cudnn.conv.fp32_precision}, cudnn.rnn {torch.backends.cudnn.rnn.fp32_precision}")
    return (f"allow_tf32: matmul {torch.backends.cuda.matmul.allow_tf32}, "
            f"cudnn {torch.backends.cudnn.allow_tf32}")


#: JAX's matmul precision for float32 comparisons: "highest" is full float32 (JAX's default lets a GPU
#: use TF32 for float32 products). Set it before tracing: jit caches are keyed on it.
JAX_FLOAT32_PRECISION = "highest"


def draw_chart(page: Path, title: str) -> str:
    """:func:`write_chart` where matplotlib is installed; a benchmark run on a machine without it (an
    offline GPU machine, say) still writes its report. Returns a line saying which happened."""
    if importlib.util.find_spec("matplotlib") is None:
        return f"no chart drawn for {page}: matplotlib is not installed (pip install 'mlstm-spec[docs]')"
    return f"chart drawn to {write_chart(page, title)}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/_common.py",
        description="Redraw the performance charts from the reports in the docs pages (no benchmark runs).")
    parser.add_argument("command", choices=["charts"])
    parser.parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    for page, title in REPORT_PAGES.items():
        print(f"wrote {write_chart(root / page, title).relative_to(root)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
