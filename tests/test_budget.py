"""train.budget_minutes: the plan's arithmetic, the clock, and runs that end on time (also across a resume)."""

import json
import math
import time

import pytest

from conftest import tiny_overrides
from swavkit.training.budget import (CALIBRATION_S, BudgetClock, BudgetPlan, fit_total_steps, share_of_run,
                            worth_changing)
from swavkit.artifacts.checkpoint import load_training_checkpoint
from swavkit.config import load_config
from swavkit.training.trainer import train


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_fit_total_steps_spends_what_is_left_and_never_goes_back():
    # 100 steps done after 60 s of a 600 s budget, 0.5 s/step, 10 s reserve: (600 - 60 - 10) / 0.5 = 1060 more
    assert fit_total_steps(100, 60.0, 600.0, 0.5, 10.0) == 1160
    assert fit_total_steps(100, 700.0, 600.0, 0.5, 10.0) == 100  # spent: end now, never behind the current step


def test_share_of_run_keeps_each_setting_at_its_share():
    # warm-up of 10 epochs in a 100-epoch shape (of 50 steps each) = 10 %: 10 % of a 700-step plan
    assert share_of_run(500, 700, 5000) == 70
    assert share_of_run(0, 700, 5000) == 0


def test_worth_changing_ignores_jitter_below_one_percent_of_what_remains():
    assert not worth_changing(1005, 1000, 0)
    assert worth_changing(1011, 1000, 0)
    assert worth_changing(998, 1000, 900)  # 100 steps left: 2 steps is more than 1 %


def test_clock_ignores_warm_steps_and_calibrates_after_enough_timed_seconds():
    fake = FakeClock()
    plan = BudgetPlan(budget_s=3600.0)
    clock = BudgetClock(plan, started_s=fake.now - 5.0, clock=fake)  # 5 s of start-up before the loop
    clock.mark(0)
    fake.now += 20.0  # two slow warm steps: not timed
    clock.mark(1)
    clock.mark(2)
    assert clock.seconds_per_step() is None
    for step in range(3, 200):
        fake.now += 0.25
        clock.mark(step)
        if clock.calibrated():
            break
    # timed from step 2 on at 0.25 s/step; calibrated once CALIBRATION_S (< 2 % of an hour) were timed
    assert clock.seconds_per_step() == pytest.approx(0.25)
    assert (step - 2) * 0.25 == pytest.approx(CALIBRATION_S, abs=0.25)
    assert clock.elapsed_s() == pytest.approx(5.0 + 20.0 + (step - 2) * 0.25)


def test_clock_carries_the_seconds_of_earlier_attempts():
    fake = FakeClock()
    clock = BudgetClock(BudgetPlan(budget_s=600.0, used_s=100.0), started_s=fake.now, clock=fake)
    fake.now += 30.0
    assert clock.elapsed_s() == pytest.approx(130.0)


def test_plan_survives_a_state_dict_round_trip_but_the_new_budget_wins():
    saved = BudgetPlan(600.0, used_s=123.5, total_steps=900, warmup_steps=90, freeze_prototype_steps=9,
                       queue_start_step=45).state_dict()
    again = BudgetPlan(1200.0)
    again.load_state_dict(saved)
    assert (again.budget_s, again.used_s, again.total_steps, again.warmup_steps, again.freeze_prototype_steps,
            again.queue_start_step) == (1200.0, 123.5, 900, 90, 9, 45)


def budget_overrides(image_folder, out_dir, minutes, **extra):
    # log every step so the plan follows the speed closely; train.epochs=2 only sets the shape (warm-up 50 %)
    return tiny_overrides(image_folder, out_dir, **{"train.budget_minutes": minutes, "train.log_every_steps": 1,
                                                     "optim.warmup_epochs": 1, **extra})


def test_a_budget_run_ends_on_time_with_its_export(image_folder, tmp_path):
    budget_s = 12.0
    start = time.monotonic()
    result = train(load_config([], budget_overrides(image_folder, tmp_path / "run", budget_s / 60)), progress=False)
    wall_s = time.monotonic() - start
    assert result.completed and result.backbone_dir is not None
    # train.epochs=2 would be 8 steps; the budget gives many more, and ends within it (slack: a noisy machine)
    assert result.step > 40
    assert wall_s <= budget_s + 4.0, wall_s
    assert wall_s >= 0.6 * budget_s, wall_s  # it used the time it was given
    plan = load_training_checkpoint(result.checkpoint)["budget"]
    assert plan["total_steps"] == result.step and plan["used_s"] <= budget_s + 1.0
    # the configured warm-up (1 epoch = 4 steps) is never cut short by the plan, and never reaches the end
    assert 4 <= plan["warmup_steps"] < result.step
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    peak = max(lrs)
    assert lrs[-1] < 0.05 * peak  # the cosine reached its end: the run was planned, not cut off


def test_a_resumed_budget_run_counts_the_first_attempt(image_folder, tmp_path):
    budget_s = 12.0
    overrides = budget_overrides(image_folder, tmp_path / "run", budget_s / 60)
    first = train(load_config([], overrides), progress=False, stop_after_steps=30)
    assert not first.completed
    saved = load_training_checkpoint(first.checkpoint)["budget"]
    assert saved["used_s"] > 0 and saved["total_steps"] > 30  # planned before it stopped
    start = time.monotonic()
    last = train(load_config([], overrides), progress=False)
    second_s = time.monotonic() - start
    assert last.completed
    plan = load_training_checkpoint(last.checkpoint)["budget"]
    assert plan["total_steps"] == last.step
    # both attempts together stay within the budget (the first one's time was carried over)
    assert saved["used_s"] + second_s <= budget_s + 4.0


def test_budget_can_be_given_as_a_cli_duration():
    from swavkit.cli.args import parse_duration_minutes

    assert parse_duration_minutes("20m") == 20.0
    assert parse_duration_minutes("1300s") == pytest.approx(1300 / 60)
    assert parse_duration_minutes("1.5h") == 90.0
    assert parse_duration_minutes("7") == 7.0
    for bad in ("", "abc", "-5m", "0", "10x"):
        with pytest.raises(ValueError):
            parse_duration_minutes(bad)
    assert math.isfinite(parse_duration_minutes("90s"))
