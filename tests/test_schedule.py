"""The LR schedule: paper configs give the reference numbers; a resume with another length is continuous."""

import io
import math
from pathlib import Path

import pytest
import torch

from swavkit.config import Config, ConfigError, load_config
from swavkit.core.optim import resolve_optimizer_name
from swavkit.core.schedule import LRSchedule, build_lr_schedule, reference_peak_lr

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
IMAGENET_IMAGES = 1_281_167


def reference_lrs(steps: list[int], *, base_lr, final_lr, start_warmup, warmup_epochs, epochs, iters_per_epoch):
    """The LR main_swav.py (facebookresearch/swav) sets at each iteration, rewritten here independently:
    np.linspace(start_warmup, base_lr, warm-up iterations), then
    final + (base - final)/2 * (1 + cos(pi * t / cosine iterations))."""
    n_warmup, n_cosine = iters_per_epoch * warmup_epochs, iters_per_epoch * (epochs - warmup_epochs)
    out = []
    for step in steps:
        if step < n_warmup:
            out.append(start_warmup + (base_lr - start_warmup) * step / max(1, n_warmup - 1))
        else:
            t = step - n_warmup
            out.append(final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * t / n_cosine)))
    return out


def paper_config(name: str) -> Config:
    return Config() if name == "defaults" else load_config([CONFIGS / name])


# The reference scripts: swav_*ep_pretrain.sh (batch 64 x 64 GPUs) and swav_*ep_bs256_pretrain.sh (64 x 4).
PAPER = {
    "imagenet_resnet50.yaml": dict(base_lr=4.8, final_lr=0.0048, start_warmup=0.3, warmup_epochs=10, batch=4096),
    "single_gpu_queue.yaml": dict(base_lr=0.6, final_lr=0.0006, start_warmup=0.0, warmup_epochs=0, batch=256),
    "defaults": dict(base_lr=0.6, final_lr=0.0006, start_warmup=0.0, warmup_epochs=0, batch=256),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_give_the_reference_schedule(name):
    cfg, ref = paper_config(name), PAPER[name]
    assert cfg.train.batch_size == ref["batch"]
    optimizer = resolve_optimizer_name(cfg.optim.optimizer, torch.nn.Conv2d(3, 8, 3))  # a CNN backbone
    assert optimizer == "lars"
    steps_per_epoch = IMAGENET_IMAGES // cfg.train.batch_size  # drop_last, as the reference's loader
    schedule = build_lr_schedule(cfg, steps_per_epoch, optimizer)
    total = steps_per_epoch * cfg.train.epochs
    warmup = steps_per_epoch * ref["warmup_epochs"]
    assert schedule.total_steps == total and schedule.warmup_steps == warmup
    first = ref["start_warmup"] if warmup else ref["base_lr"]
    assert schedule.lr(0) == pytest.approx(first, rel=1e-12)  # start
    assert schedule.lr(warmup) == pytest.approx(ref["base_lr"], rel=1e-12)  # peak
    assert max(schedule.lr(s) for s in range(0, total, 97)) <= ref["base_lr"] * (1 + 1e-12)  # never above
    assert schedule.lr(total) == pytest.approx(ref["final_lr"], rel=1e-12)  # final
    assert schedule.lr(total - 1) == pytest.approx(ref["final_lr"], rel=1e-3)  # the last step taken
    # every step against the reference's own formula: the cosine exactly; the warm-up within one warm-up
    # increment (np.linspace reaches the peak one step before the cosine starts, ours at the cosine's start)
    steps = list(range(0, total, 37)) + list(range(max(0, warmup - 3), warmup + 3)) + [total - 1]
    expected = reference_lrs(steps, base_lr=ref["base_lr"], final_lr=ref["final_lr"],
                             start_warmup=ref["start_warmup"], warmup_epochs=ref["warmup_epochs"],
                             epochs=cfg.train.epochs, iters_per_epoch=steps_per_epoch)
    warmup_increment = (ref["base_lr"] - ref["start_warmup"]) / max(1, warmup)
    for step, want in zip(steps, expected):
        tolerance = warmup_increment * 1.01 if step < warmup else 1e-12 * ref["base_lr"]
        assert abs(schedule.lr(step) - want) <= tolerance, (step, schedule.lr(step), want)


def test_the_paper_lr_is_not_linear_in_the_batch():
    """0.6 at 256 and 4.8 at 4096 (not 9.6); linear below 256, the power law through both anchors above."""
    assert reference_peak_lr("lars", 256) == pytest.approx(0.6)
    assert reference_peak_lr("lars", 4096) == pytest.approx(4.8)
    assert reference_peak_lr("lars", 128) == pytest.approx(0.3)
    assert 0.6 * 4 > reference_peak_lr("lars", 1024) > 0.6
    assert reference_peak_lr("adamw", 512) == pytest.approx(1e-3)
    cfg = load_config([], ["train.batch_size=4096"])  # the defaults at the paper's big batch
    schedule = build_lr_schedule(cfg, 312, "lars")
    assert schedule.peak_lr == pytest.approx(4.8) and schedule.final_lr == pytest.approx(0.0048)


def test_a_paper_config_at_another_batch_scales_all_three_lrs():
    cfg = load_config([CONFIGS / "imagenet_resnet50.yaml"], ["train.batch_size=2048"])
    schedule = build_lr_schedule(cfg, 625, "lars")
    assert (schedule.warmup_start_lr, schedule.peak_lr, schedule.final_lr) == pytest.approx((0.15, 2.4, 0.0024))


def test_adamw_reference_ends_below_its_peak():
    schedule = build_lr_schedule(Config(), 10, "adamw")
    assert schedule.peak_lr == pytest.approx(5e-4) and schedule.final_lr == pytest.approx(5e-7)


# ---------------------------------------------------------------------------------------------------
# resume with another train.epochs

def small_schedule(total_steps=120, warmup_steps=12) -> LRSchedule:
    return LRSchedule(peak_lr=1.0, final_lr=0.001, warmup_start_lr=0.1, warmup_steps=warmup_steps,
                      total_steps=total_steps)


def largest_step_change(schedule: LRSchedule) -> float:
    """The largest change of the LR between two consecutive steps of the cosine."""
    return max(abs(schedule.lr(s + 1) - schedule.lr(s)) for s in range(schedule.warmup_steps, schedule.total_steps))


@pytest.mark.parametrize("step, new_total", [(100, 240), (118, 1000), (60, 90), (119, 120 * 5)])
def test_a_new_total_on_resume_continues_from_the_current_lr(step, new_total):
    old = small_schedule()
    new = small_schedule()
    new.change_total_steps(new_total, step, steps_per_epoch=12)
    assert new.lr(step) == pytest.approx(old.lr(step), abs=1e-15)
    # no jump: the resume step differs from the step before it by that step's change in the old schedule
    assert abs(new.lr(step) - old.lr(step - 1)) <= abs(old.lr(step) - old.lr(step - 1)) + 1e-15
    assert [new.lr(s) for s in range(step)] == pytest.approx([old.lr(s) for s in range(step)], rel=1e-12)
    after = [new.lr(s) for s in range(step, new_total + 1)]
    assert all(a >= b for a, b in zip(after, after[1:]))  # still decaying, never back up
    assert after[-1] == pytest.approx(0.001)
    # what re-building the schedule for the new total gives (the bug): a jump at the resume step
    rebuilt = LRSchedule(peak_lr=1.0, final_lr=0.001, warmup_start_lr=0.1, warmup_steps=12,
                         total_steps=new_total).lr(step)
    assert abs(rebuilt - old.lr(step)) > 3 * largest_step_change(old)


def test_the_reported_jump_is_gone():
    """The issue's run: a finished run (LR ~4e-5 at its last step) resumed with more train.epochs jumped to
    0.0188 at the next step; now it goes on at the final LR and says why."""
    old = LRSchedule(peak_lr=0.3, final_lr=3e-5, warmup_start_lr=0.0, warmup_steps=0, total_steps=126)
    new = LRSchedule(**old.state_dict())
    note = new.change_total_steps(252, 126, steps_per_epoch=14)
    assert abs(new.lr(126) - old.lr(125)) <= largest_step_change(old)
    assert max(new.lr(s) for s in range(126, 253)) == pytest.approx(3e-5)
    assert "cosine had ended" in note and "\n" not in note
    rebuilt = LRSchedule(peak_lr=0.3, final_lr=3e-5, warmup_start_lr=0.0, warmup_steps=0, total_steps=252).lr(126)
    assert rebuilt > 0.1  # what train.py did: the cosine re-stretched over the new total


def test_during_the_warmup_the_warmup_ends_as_planned():
    old, new = small_schedule(), small_schedule()
    note = new.change_total_steps(240, 5, steps_per_epoch=12)
    assert all(new.lr(s) == old.lr(s) for s in range(13))  # same warm-up, same peak at step 12
    assert new.lr(12) == 1.0 and new.lr(240) == pytest.approx(0.001)
    assert new.lr(120) > old.lr(120)  # the cosine spans the new total
    assert "warm-up ends as planned" in note


def test_repeated_changes_stay_continuous_and_survive_a_checkpoint():
    schedule = small_schedule()
    schedule.change_total_steps(240, 50, steps_per_epoch=12)
    buffer = io.BytesIO()
    torch.save({"lr_schedule": schedule.state_dict()}, buffer)  # as in the training checkpoint
    buffer.seek(0)
    restored = small_schedule(total_steps=360)  # what the next resume builds from its config
    restored.load_state_dict(torch.load(buffer, weights_only=True)["lr_schedule"])
    assert restored == schedule
    before = restored.lr(150)
    restored.change_total_steps(360, 150, steps_per_epoch=12)
    assert restored.lr(150) == pytest.approx(before, abs=1e-15)
    assert [restored.lr(s) for s in range(150)] == pytest.approx([schedule.lr(s) for s in range(150)], rel=1e-12)
    assert restored.lr(360) == pytest.approx(0.001)


@pytest.mark.parametrize("step, new_total, epochs_needed", [(100, 96, 9), (100, 12, 9), (5, 4, 1)])
def test_a_total_behind_the_run_is_refused_saying_what_to_do(step, new_total, epochs_needed):
    schedule = small_schedule()
    with pytest.raises(ConfigError, match="train.epochs") as err:
        schedule.change_total_steps(new_total, step, steps_per_epoch=12)
    message = str(err.value)
    assert f"already at step {step}" in message and "\n" not in message
    assert f"resume with train.epochs >= {epochs_needed}," in message
    assert schedule == small_schedule()  # refused: nothing changed


def test_a_shorter_run_ending_inside_the_warmup_stays_continuous():
    old, new = small_schedule(), small_schedule()
    note = new.change_total_steps(8, 5, steps_per_epoch=4)
    assert [new.lr(s) for s in range(8)] == [old.lr(s) for s in range(8)]
    assert "never reaches its peak" in note


def test_unchanged_total_is_a_no_op():
    schedule = small_schedule()
    assert schedule.change_total_steps(120, 60, steps_per_epoch=12) == "" and schedule == small_schedule()


def test_the_banner_says_where_the_peak_lr_comes_from():
    from swavkit.core.schedule import explain_peak_lr

    paper = load_config([CONFIGS / "imagenet_resnet50.yaml"])
    assert explain_peak_lr(paper, "lars") == "optim.base_lr 4.8 at batch 4096"
    assert explain_peak_lr(load_config([], ["train.batch_size=8"]), "adamw") == "AdamW reference 0.0005 x 8/256"
    assert "4.8 at 4096" in explain_peak_lr(Config(), "lars")
