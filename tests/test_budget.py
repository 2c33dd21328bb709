"""train.budget_minutes: the plan's arithmetic (it ends on time, also across a resume), the clock, and the one
speed figure that --auto prints and the run plans from."""

import math

import pytest

from swavkit.training.budget import (CALIBRATION_S, BudgetClock, BudgetPlan, first_plan, fit_total_steps,
                                    share_of_run, worth_changing)
from swavkit.artifacts.checkpoint import load_training_checkpoint
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


def test_the_first_plan_fits_the_budget_and_keeps_the_shares_the_config_gives():
    # 20 s used, 0.5 s/step, 10 s reserve in 600 s: (600 - 20 - 10) / 0.5 = 1140 steps; the config's run of 100
    # steps had 10 warm-up, 5 frozen, queue from 20: the same shares of 1140
    plan = first_plan(0, 20.0, 600.0, 0.5, 10.0, shape_total=100, warmup_steps=10, freeze_steps=5,
                      queue_start_step=20)
    assert (plan.total_steps, plan.warmup_steps, plan.freeze_prototype_steps, plan.queue_start_step) == (1140, 114,
                                                                                                       57, 228)
    assert plan.used_s + plan.total_steps * 0.5 + 10.0 <= plan.budget_s  # it ends on time, export reserved
    # planned after a few timed steps: a warm-up already over stays; one still running never ends before now
    assert first_plan(15, 20.0, 600.0, 0.5, 10.0, 100, 10, 5, 20).warmup_steps == 10
    short = first_plan(8, 20.0, 30.0, 0.5, 5.0, 100, 10, 5, 20)  # 8 + 10 steps: the share would be 2
    assert short.total_steps == 18 and short.warmup_steps == 8
    # a spent budget ends the run now
    assert first_plan(40, 700.0, 600.0, 0.5, 10.0, 100, 10, 5, 20).total_steps == 40


def test_a_resumed_plan_counts_the_seconds_of_the_first_attempt():
    first = first_plan(0, 30.0, 600.0, 0.5, 10.0, 100, 10, 5, 20)
    first.used_s = 250.0  # saved with the checkpoint at step 400
    again = BudgetPlan(budget_s=600.0)
    again.load_state_dict(first.state_dict())
    fake = FakeClock()
    clock = BudgetClock(again, started_s=fake.now, clock=fake)
    fake.now += 20.0  # the resumed attempt's start-up
    total = fit_total_steps(400, clock.elapsed_s(), again.budget_s, 0.5, 10.0)
    assert total == 400 + (600 - 270 - 10) / 0.5
    # both attempts together: what the first used, the second's start-up, the rest of the steps, the reserve
    assert 250.0 + 20.0 + (total - 400) * 0.5 + 10.0 <= 600.0
    assert worth_changing(total, first.total_steps, 400)  # the loop re-paces the cosine to it


def test_auto_prints_the_epochs_warm_up_and_freezing_that_the_budget_run_plans(tmp_path, capsys):
    """--auto's passes and the budget plan come from one measurement of the run's own step (swavkit.training.speed):
    the printed epochs are within 25 % of the planned ones, and the warm-up and freezing keep their printed shares."""
    from conftest import write_images
    from swavkit.config import merge_sources
    from swavkit.training.presets import auto_config

    write_images(tmp_path / "imgs", 64)  # 32 px: one candidate crop size (32), batch 16, 4 steps per epoch
    cfg = auto_config(merge_sources([], [f"data.path={tmp_path / 'imgs'}", f"out_dir={tmp_path / 'run'}",
                                         "train.budget_minutes=2", "data.num_workers=0", "train.signal_images=0",
                                         "train.loggers=[jsonl]", "model.hidden_dim=32", "model.output_dim=16"]))
    printed = capsys.readouterr().out
    assert f"train.epochs = {cfg.train.epochs} " in printed and "the run plans its budget from the same figure" in printed
    assert "timed training steps of resnet10t" in printed and "passes over the data at the measured speed" in printed
    assert cfg.model.backbone == "resnet10t" and cfg.crops.sizes_px == [32] and cfg.train.budget_minutes == 2
    result = train(cfg, progress=False, stop_after_steps=1)
    assert "a step as --auto timed it" in capsys.readouterr().out  # planned before the first step, from that figure
    saved = load_training_checkpoint(result.checkpoint)
    plan, steps_per_epoch = saved["budget"], 64 // cfg.train.batch_size
    planned_epochs = plan["total_steps"] / steps_per_epoch
    assert abs(cfg.train.epochs - planned_epochs) <= 0.25 * planned_epochs, (cfg.train.epochs, planned_epochs)
    # the warm-up and freezing the config was given (epochs) are the same shares of the planned run
    warmup_steps = cfg.optim.warmup_epochs * steps_per_epoch * plan["total_steps"] / (cfg.train.epochs * steps_per_epoch)
    assert abs(plan["warmup_steps"] - warmup_steps) <= 1
    assert saved["lr_schedule"]["total_steps"] == plan["total_steps"]  # the cosine is paced to the plan


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
