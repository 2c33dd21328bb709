"""swavkit plot: one non-trivial PNG from the metrics.jsonl of several runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from swavkit.config import ConfigError
from swavkit.cli.main import build_parser
from swavkit.training.plot import PNG_SOFTWARE_TAG, PlotError, plot_runs, read_run, render_figure, series


def write_run(folder, *, loss_drop: float, k: int = 30, knn: bool = True, throughput: float = 800.0):
    """A fake run folder: 30 logging steps (loss falling by ``loss_drop`` from ln K), k-NN every 100 steps."""
    folder.mkdir(parents=True)
    ln_k = math.log(k)
    rows = []
    for i in range(1, 31):
        step, t = 10 * i, i / 30
        rows.append({"step": step, "epoch": step / 100, "loss": ln_k - loss_drop * (1 - math.exp(-3 * t)),
                     "ln_k": ln_k, "lr": 0.6 * 0.5 * (1 + math.cos(math.pi * t)),
                     "images_per_s": throughput + 40 * math.sin(i), "data_wait_fraction": 0.2 + 0.05 * math.cos(i),
                     "prototypes_used": int(4 + 20 * t), "code_entropy": ln_k * (0.5 + 0.4 * t),
                     "queue_in_use": False})
        if knn and step % 100 == 0:
            rows.append({"step": step, "epoch": step // 100, "knn_top1": 30 + 40 * t, "knn_top5": None})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_two_runs_give_one_large_colourful_png_that_changes_with_the_data(tmp_path):
    good = write_run(tmp_path / "good", loss_drop=2.0)
    collapsed = write_run(tmp_path / "collapsed", loss_drop=0.02, throughput=1200.0)
    out = plot_runs([good, collapsed], tmp_path / "compare.png")

    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.width > 400 and image.height > 300
        assert image.text["Software"].startswith(PNG_SOFTWARE_TAG)
    rgb = pixels(out)
    packed = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    distinct_colours = len(np.unique(packed))
    # axes and text alone give ~260 colours (grey anti-aliasing); coloured curves give thousands
    assert distinct_colours > 1000
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):  # matplotlib's C0 and C1: each run is drawn
        assert (rgb == colour).all(axis=2).sum() > 500, colour

    # the same layout with a different second run is a different picture
    other = write_run(tmp_path / "other", loss_drop=1.0, throughput=300.0)
    out_other = plot_runs([good, other], tmp_path / "compare_other.png")
    rgb_other = pixels(out_other)
    assert rgb_other.shape == rgb.shape
    assert (rgb_other != rgb).any(axis=2).mean() > 0.002


def test_default_output_is_the_first_runs_folder_and_it_is_replaced_on_the_next_call(tmp_path, capsys):
    run = write_run(tmp_path / "run", loss_drop=1.5, knn=False)
    args = build_parser().parse_args(["plot", str(run)])
    assert args.func(args) == 0
    assert (run / "metrics.png").is_file()
    assert "wrote " in capsys.readouterr().out
    first = pixels(run / "metrics.png")
    with (run / "metrics.jsonl").open("a") as handle:  # the run went on: the plot is redrawn over its own file
        handle.write(json.dumps({"step": 400, "loss": 0.5, "ln_k": math.log(30)}) + "\n")
    assert args.func(args) == 0
    assert not np.array_equal(first, pixels(run / "metrics.png"))


def test_a_file_swavkit_did_not_write_is_never_overwritten(tmp_path):
    run = write_run(tmp_path / "run", loss_drop=1.5)
    foreign = tmp_path / "holiday.png"
    Image.new("RGB", (8, 8), "red").save(foreign)
    before = foreign.read_bytes()
    with pytest.raises(PlotError, match="holiday.png: exists and was not written by swavkit plot"):
        plot_runs([run], foreign)
    assert foreign.read_bytes() == before


def test_a_folder_without_metrics_is_one_line_error(tmp_path):
    (tmp_path / "empty_run").mkdir()
    run = write_run(tmp_path / "run", loss_drop=1.5)
    with pytest.raises(ConfigError) as err:  # a ConfigError: the CLI prints it as one line, exit code 2
        plot_runs([run, tmp_path / "empty_run"], tmp_path / "x.png")
    assert "empty_run/metrics.jsonl: no such file" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "x.png").exists()


def test_a_repeated_step_keeps_its_last_row():
    rows = [{"step": 10, "loss": 5.0}, {"step": 20, "loss": 4.0}, {"step": 30, "loss": 3.0},
            {"step": 20, "loss": 4.5}, {"step": 30, "loss": 3.5}, {"step": 30, "knn_top1": 50.0},
            {"step": 40, "loss": 3.2, "flag": True}]
    assert series(rows, "loss") == ([10, 20, 30, 40], [5.0, 4.5, 3.5, 3.2])
    assert series(rows, "knn_top1") == ([30], [50.0])
    assert series(rows, "flag") == ([], [])


def test_the_knn_panel_appears_only_when_a_run_has_knn_rows(tmp_path):
    def drawn_titles(runs):
        fig = render_figure(runs)
        return [ax.get_title() for ax in fig.axes if ax.axison]

    without = read_run(write_run(tmp_path / "a", loss_drop=1, knn=False))
    with_knn = read_run(write_run(tmp_path / "b", loss_drop=1, knn=True))
    titles = drawn_titles([("a", without)])
    assert "online k-NN top-1" not in titles and len(titles) == 6
    assert titles[0] == "SwAV loss (dashed: ln K = 3.40, the collapse level)"
    assert "online k-NN top-1" in drawn_titles([("a", without), ("b", with_knn)])
