"""``swavkit plot RUN [RUN ...]``: one PNG of the curves in each run's ``metrics.jsonl``, runs overlaid.

Panels: loss with its collapse level ln K, learning rate, prototypes used per batch, code entropy
(maximum ln K), online k-NN top-1 (when a run has it), images/s and the fraction of time spent waiting
for data. Drawn with matplotlib's object API on an Agg canvas, so importing this module never changes
the pyplot backend of the caller (a notebook keeps its own).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from swavkit.artifacts.layout import RUN_METRICS
from swavkit.config import ConfigError
from swavkit.runtime.fileio import atomic_writer, read_jsonl

METRICS_FILE = RUN_METRICS
DEFAULT_PLOT_NAME = "metrics.png"
# Written into the PNG's text chunks; a file without it was not made by swavkit and is never overwritten.
PNG_SOFTWARE_TAG = "swavkit plot"

# (metrics.jsonl key, panel title, y-axis label); ln_k is drawn inside the loss and entropy panels.
PANELS = (
    ("loss", "SwAV loss (dashed: {ln_k}, the collapse level)", "cross-entropy (nats)"),
    ("lr", "learning rate", "LR"),
    ("prototypes_used", "prototypes used per batch", "prototypes"),
    ("code_entropy", "code entropy (dashed: {ln_k}, even use)", "nats"),
    ("knn_top1", "online k-NN top-1", "top-1 (%)"),
    ("rankme", "RankMe at each checkpoint (label-free)", "effective rank"),
    ("images_per_s", "throughput", "images / s"),
    ("data_wait_fraction", "time waiting for data", "fraction of step time"),
)
OPTIONAL_PANELS = ("knn_top1", "rankme", "data_wait_fraction")  # drawn only when some run has them


class PlotError(ConfigError):
    """A run folder that cannot be plotted (no metrics.jsonl, no rows) or an output swavkit may not replace."""


def read_run(run_dir: str | Path) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` (``run_dir`` may also be the file itself)."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise PlotError(f"{path}: no such file; pass run folders written by swavkit pretrain (they hold "
                        f"{METRICS_FILE})")
    rows = read_jsonl(path)
    if not rows:
        raise PlotError(f"{path}: holds no metric rows yet; the first is written after train.log_every_steps steps")
    return rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, sorted by step. A step that appears twice (a resumed run, or an older
    run from before a fix) keeps its last row, the one the training that went on wrote."""
    by_step: dict[int, float] = {}
    for row in rows:
        value = row.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or "step" not in row:
            continue
        by_step[int(row["step"])] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Folder names; where two runs share a name, the parent folder is added to tell them apart."""
    names = [path.resolve().name for path in run_dirs]
    return [f"{path.resolve().parent.name}/{name}" if names.count(name) > 1 else name
            for path, name in zip(run_dirs, names)]


def _ln_k_levels(runs: list[tuple[str, list[dict]]]) -> list[float]:
    """The distinct ln K of the runs (a run logs one K), rounded to 2 decimals as the titles show them."""
    levels = {round(series(rows, "ln_k")[1][-1], 2) for _, rows in runs if series(rows, "ln_k")[0]}
    return sorted(levels)


def _draw_panel(ax, key: str, runs: list[tuple[str, list[dict]]], colours) -> None:
    for (label, rows), colour in zip(runs, colours):
        steps, values = series(rows, key)
        if not steps:
            continue
        sparse = len(steps) <= 20  # k-NN rows come once per epoch: markers show where they were measured
        ax.plot(steps, values, color=colour, linewidth=1.6, marker="o" if sparse else None, markersize=3.5,
                label=label)
    if key in ("loss", "code_entropy"):
        for ln_k in _ln_k_levels(runs):  # one line per distinct K: runs with the same K share it
            ax.axhline(ln_k, color="0.35", linestyle="--", linewidth=1.1)
    if key == "data_wait_fraction":
        ax.set_ylim(0, 1)
    elif key in ("images_per_s", "prototypes_used"):
        ax.set_ylim(bottom=0)  # differences between runs read true to scale from zero
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.02)


def _panels_to_draw(runs: list[tuple[str, list[dict]]]) -> list[tuple[str, str, str]]:
    present = {key for _, rows in runs for row in rows for key in row}
    return [panel for panel in PANELS if panel[0] not in OPTIONAL_PANELS or panel[0] in present]


def render_figure(runs: list[tuple[str, list[dict]]]):
    """A matplotlib Figure with one panel per metric and one line per run; ``runs`` = [(label, rows)]."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    panels = _panels_to_draw(runs)
    n_cols = 3 if len(panels) <= 6 else 4
    n_rows = math.ceil(len(panels) / n_cols)
    fig = Figure(figsize=(5.2 * n_cols, 3.6 * n_rows + 0.6), dpi=100, layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (key, title, y_label) in zip(axes, panels):
        _draw_panel(ax, key, runs, colours)
        levels = " / ".join(f"{level:.2f}" for level in _ln_k_levels(runs))
        ax.set_title(title.format(ln_k=f"ln K = {levels}" if levels else "ln K"), fontsize=10)
        ax.set_ylabel(y_label, fontsize=9)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        if not ax.lines:
            ax.text(0.5, 0.5, f"no {key} in these runs", transform=ax.transAxes, ha="center", va="center",
                    color="0.5")
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    handles = [Line2D([], [], color=colour, linewidth=2.5, label=label) for (label, _), colour in zip(runs, colours)]
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(runs), 4), frameon=False, fontsize=10)
    return fig


def _check_output(out_png: Path) -> None:
    """Refuse to replace a file that ``swavkit plot`` did not write (its PNG text chunk says so)."""
    if not out_png.exists() and not out_png.is_symlink():
        return
    if out_png.is_symlink() or not out_png.is_file():
        raise PlotError(f"{out_png}: exists and is not a plain file; choose another --out")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(out_png) as image:
            software = getattr(image, "text", {}).get("Software", "")
    except (OSError, UnidentifiedImageError):
        software = ""
    if not software.startswith(PNG_SOFTWARE_TAG):
        raise PlotError(f"{out_png}: exists and was not written by swavkit plot; choose another --out or move it")


def plot_runs(run_dirs, out_png: str | Path) -> Path:
    """Write one PNG comparing the runs; returns its path.

    Args:
        run_dirs: run folders (each holding ``metrics.jsonl``), drawn in this order with the colours C0, C1 ...
        out_png: the PNG to write (atomically). An existing file is replaced only if swavkit plot wrote it.
    """
    run_dirs = [Path(path) for path in run_dirs]
    if not run_dirs:
        raise PlotError("swavkit plot: give at least one run folder")
    runs = list(zip(run_labels(run_dirs), [read_run(path) for path in run_dirs]))
    out_png = Path(out_png)
    _check_output(out_png)
    fig = render_figure(runs)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": f"{PNG_SOFTWARE_TAG} ({', '.join(map(str, run_dirs))})"})
    with atomic_writer(out_png, "wb") as handle:
        handle.write(buffer.getvalue())
    return out_png


__all__ = ["PlotError", "plot_runs", "render_figure", "read_run", "series", "DEFAULT_PLOT_NAME"]
