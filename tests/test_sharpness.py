"""swav.prevent_collapse: the adaptive epsilon and the queue guard, as rules and inside a run."""

import json
import math

import pytest
import torch

from conftest import tiny_overrides
from swavkit.artifacts.checkpoint import load_training_checkpoint
from swavkit.config import load_config
from swavkit.training.collapse import (QUEUE_GUARD_WINDOWS, EpsilonControl, queue_should_stop, row_entropy)
from swavkit.core.sinkhorn import sinkhorn
from swavkit.training.trainer import train


def test_row_entropy_is_ln_k_for_uniform_codes_and_zero_for_one_hot():
    K = 16
    assert float(row_entropy(torch.full((8, K), 1.0 / K))) == pytest.approx(math.log(K), abs=1e-6)
    assert float(row_entropy(torch.eye(K))) == pytest.approx(0.0, abs=1e-6)


def test_epsilon_moves_towards_the_target_within_its_bounds_and_on_its_grid():
    control = EpsilonControl(target_fraction=0.6, min_epsilon=0.005, max_epsilon=0.05)
    ln_k = math.log(100)
    # codes near uniform: sharper (down, by at most 2x per update)
    down = control.next_epsilon(0.05, 0.98 * ln_k, 100)
    assert 0.025 <= down < 0.05
    # codes sharper than the target: back up, never above the configured epsilon
    assert control.next_epsilon(0.01, 0.1 * ln_k, 100) > 0.01
    assert control.next_epsilon(0.05, 0.1 * ln_k, 100) == 0.05
    # at the floor it stays there however uniform the codes
    assert control.next_epsilon(0.005, ln_k, 100) == pytest.approx(0.005)
    # on target: unchanged
    assert control.next_epsilon(0.02, 0.6 * ln_k, 100) == pytest.approx(control.on_grid(0.02))
    # a window without a finite entropy keeps epsilon
    assert control.next_epsilon(0.02, math.nan, 100) == 0.02
    # grid: 8 values per octave below the configured epsilon
    n = 8 * math.log2(0.05 / down)
    assert n == pytest.approx(round(n), abs=1e-9)


def test_a_lower_epsilon_really_lowers_the_codes_entropy():
    # what the control relies on: with near-equal scores (a collapsing model), epsilon decides the entropy
    torch.manual_seed(0)
    scores = 0.9 + 0.01 * torch.randn(256, 64)
    soft, sharp = (float(row_entropy(sinkhorn(scores, eps, 3))) for eps in (0.05, 0.005))
    assert soft > 0.95 * math.log(64) and sharp < 0.8 * math.log(64)


def test_queue_guard_needs_windows_in_a_row_at_ln_k():
    ln_k = math.log(512)
    count, stop = 0, False
    for _ in range(QUEUE_GUARD_WINDOWS - 1):
        count, stop = queue_should_stop(count, ln_k * 1.005, 512)
        assert not stop
    assert queue_should_stop(count, ln_k * 0.9, 512) == (0, False)  # one healthy window resets the count
    count, stop = queue_should_stop(count, ln_k, 512)
    assert stop


def _rows(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_prevent_collapse_lowers_epsilon_in_a_run_and_the_switch_keeps_the_papers(image_folder, tmp_path):
    # epsilon 0.5: near-uniform codes from the first step, which the control must sharpen
    common = {"train.epochs": 3, "swav.epsilon": 0.5}
    on = train(load_config([], tiny_overrides(image_folder, tmp_path / "on", **common)), progress=False)
    off = train(load_config([], tiny_overrides(image_folder, tmp_path / "off", **common,
                                               **{"swav.prevent_collapse": "false"})), progress=False)
    eps_on = [r["epsilon"] for r in _rows(tmp_path / "on") if "epsilon" in r]
    eps_off = [r["epsilon"] for r in _rows(tmp_path / "off") if "epsilon" in r]
    assert eps_off == [0.5] * len(eps_off)
    assert eps_on[0] == 0.5 and min(eps_on) < 0.25
    assert all("code_row_entropy" in r for r in _rows(tmp_path / "on") if "loss" in r)
    # the epsilon in use is part of the checkpoint (a resume continues with it)
    assert load_training_checkpoint(on.checkpoint)["epsilon"] < 0.5
    assert math.isclose(load_training_checkpoint(off.checkpoint)["epsilon"], 0.5)
    assert on.final_loss != off.final_loss


def test_the_paper_recipes_keep_the_papers_fixed_epsilon_and_queue():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    for recipe in ("imagenet_resnet50.yaml", "single_gpu_queue.yaml"):
        assert load_config([configs / recipe]).swav.prevent_collapse is False
    assert load_config([]).swav.prevent_collapse is True  # everyone else gets the prevention
