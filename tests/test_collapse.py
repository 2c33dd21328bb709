"""Collapse diagnosis in both directions: a run forced to collapse warns, a healthy run does not."""

import json
import math

from conftest import tiny_overrides
from swavkit.config import load_config
from swavkit.training.diagnosis import CollapseMonitor, code_statistics
from swavkit.training.trainer import codes_banner, train

import re
import torch


def test_the_codes_banner_says_what_is_in_force_then_how_to_change_it():
    on, off = load_config([], []).swav, load_config([], ["swav.prevent_collapse=false"]).swav
    adaptive, fixed = codes_banner(on), codes_banner(off)
    assert "starts at 0.05 and is lowered towards 0.005" in adaptive and "fixed" not in adaptive.split("(")[0]
    assert adaptive.endswith("set swav.prevent_collapse=false)")
    assert "fixed at 0.05, as in the paper" in fixed and fixed.endswith("set swav.prevent_collapse=true)")
    for line in (adaptive, fixed):  # never "(key=value: what that would do)", which reads as if both held
        assert not re.search(r"\(\w+\.\w+=\w+:", line), line


def test_monitor_warns_once_after_patience():
    monitor = CollapseMonitor(n_prototypes=100, patience_steps=20)
    ln_k = math.log(100)
    assert monitor.update(10, ln_k + 1.0) is None  # far from ln K
    assert monitor.update(20, ln_k + 0.01) is None  # near, but not for long yet
    warning = monitor.update(40, ln_k)
    assert warning and "lower swav.epsilon" in warning and "since step 20" in warning
    assert monitor.update(60, ln_k) is None  # once


def test_code_statistics():
    uniform = torch.full((8, 4), 0.25)
    stats = code_statistics(uniform)
    assert abs(stats["code_entropy"] - math.log(4)) < 1e-6
    one_hot = torch.eye(4).repeat(2, 1)
    assert code_statistics(one_hot)["prototypes_used"] == 4


def _run(image_folder, out, capsys, **extra):
    overrides = tiny_overrides(image_folder, out, **{"train.epochs": 2, "train.log_every_steps": 1,
                                                     "train.collapse_patience_steps": 3, **extra})
    train(load_config([], overrides), progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return capsys.readouterr().out, rows


def test_forced_collapse_warns(image_folder, tmp_path, capsys):
    # A huge temperature makes every prediction uniform: the swapped loss is pinned at ln K.
    printed, rows = _run(image_folder, tmp_path / "collapsed", capsys, **{"swav.temperature": 1000.0})
    assert all(abs(r["loss"] - r["ln_k"]) < 0.01 * r["ln_k"] for r in rows)
    assert "collapse: the loss has stayed at ln K" in printed


def test_healthy_run_does_not_warn(image_folder, tmp_path, capsys):
    printed, rows = _run(image_folder, tmp_path / "healthy", capsys)
    assert all(abs(r["loss"] - r["ln_k"]) > 0.01 * r["ln_k"] for r in rows)
    assert "collapse:" not in printed and "collapse plateau" not in printed  # neither warning
