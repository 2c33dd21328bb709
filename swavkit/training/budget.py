"""Time budget: ``train.budget_minutes`` fits a run's length to wall-clock time.

A user knows how long they can wait, not how many epochs their machine manages in that time. With a
budget, ``train.epochs`` only sets the *shape* of the run: the warm-up, prototype freezing and queue start
keep the share of the run that the config gives them (``optim.warmup_epochs / train.epochs``, ...). The
plan (:func:`first_plan`): total steps = what fits in the budget left, minus a reserve for the final
checkpoint and export, at a measured speed. When ``--auto`` timed this run's step in this process
(:mod:`swavkit.training.speed`), the plan is made from that figure before the first step, so the passes,
warm-up and freezing ``--auto`` printed are the run's; otherwise the first steps measure the speed, and the
plan is made at the first logging step after ``CALIBRATION_S`` (or 2 % of the budget, whichever is less) of
timed steps. At each later logging step the total is re-fitted to the
recent speed (the LR then continues from where it is, :meth:`LRSchedule.change_total_steps`), so a machine
that slows down or speeds up still ends on time.

The budget counts the whole ``train()`` call, start-up and export included, and carries over a resume:
the seconds used up to the last checkpoint are saved with the plan. A budget run is not repeatable step
for step (its length depends on the measured speed); its ``config.yaml`` and the checkpoint's plan say
what it did.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import asdict, dataclass

WARM_STEPS = 2  # the first steps (allocator, kernels, workers starting) are not timed
CALIBRATION_S = 30.0  # timed seconds before the first plan (at most 2 % of the budget)
MIN_TIMED_STEPS = 5
RECENT_S = 120.0  # the speed of the last ~2 minutes decides re-plans (a queue or monitor changes it)
MIN_CHANGE_FRACTION = 0.01  # re-plan only when the total moves by > 1 % of the remaining steps


@dataclass
class BudgetPlan:
    """What the budget decided; saved in the training checkpoint so a resume continues the same plan.

    Attributes:
        budget_s: the budget in seconds.
        used_s: wall seconds used by this run up to its last save (earlier attempts included).
        total_steps: planned optimiser steps (0: not planned yet).
        warmup_steps, freeze_prototype_steps, queue_start_step: the step settings of the plan.
    """
    budget_s: float
    used_s: float = 0.0
    total_steps: int = 0
    warmup_steps: int = 0
    freeze_prototype_steps: int = 0
    queue_start_step: int = 0

    @property
    def planned(self) -> bool:
        return self.total_steps > 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        budget_s = self.budget_s  # the budget asked for now wins (a resume may give more or less time)
        vars(self).update({k: type(getattr(self, k))(v) for k, v in state.items() if k in vars(self)})
        self.budget_s = budget_s


class BudgetClock:
    """This attempt's wall clock and recent speed. ``clock`` is injectable for tests. ``measured_step_s``: the
    seconds per step --auto measured for this run (swavkit.training.speed), from which the first plan is made
    before the first step; None: the first timed steps make it."""

    def __init__(self, plan: BudgetPlan, started_s: float, clock=time.monotonic,
                 measured_step_s: float | None = None):
        self.plan, self.started_s, self.clock = plan, started_s, clock
        self.measured_step_s = measured_step_s
        self.used_before_s = plan.used_s
        self.marks: deque[tuple[int, float]] = deque()  # (step, time) at logging steps, timed steps only
        self.first_step: int | None = None  # state.step when this attempt's loop began

    def elapsed_s(self) -> float:
        """Budget seconds used so far, earlier attempts included."""
        return self.used_before_s + self.clock() - self.started_s

    def mark(self, step: int) -> None:
        """Record that ``step`` steps are done now (call after every step, and once before the loop)."""
        if self.first_step is None:
            self.first_step = step
        if step < self.first_step + WARM_STEPS:
            return
        now = self.clock()
        self.marks.append((step, now))
        while len(self.marks) > 2 and now - self.marks[1][1] >= RECENT_S:
            self.marks.popleft()

    def seconds_per_step(self) -> float | None:
        """Recent wall seconds per step, or None before enough timed steps."""
        if len(self.marks) < 2:
            return None
        (step0, t0), (step1, t1) = self.marks[0], self.marks[-1]
        if step1 - step0 < MIN_TIMED_STEPS:
            return None
        return (t1 - t0) / (step1 - step0)

    def calibrated(self) -> bool:
        """Enough timed steps for the first plan."""
        if self.seconds_per_step() is None:
            return False
        return self.marks[-1][1] - self.marks[0][1] >= min(CALIBRATION_S, 0.02 * self.plan.budget_s)


def fit_total_steps(step: int, elapsed_s: float, budget_s: float, seconds_per_step: float, reserve_s: float) -> int:
    """Steps of the whole run when ``step`` are done after ``elapsed_s`` and each further one takes
    ``seconds_per_step``; never fewer than ``step`` (a spent budget ends the run now)."""
    remaining_s = budget_s - elapsed_s - reserve_s
    return step + max(0, math.floor(remaining_s / max(seconds_per_step, 1e-9)))


def first_plan(step: int, elapsed_s: float, budget_s: float, seconds_per_step: float, reserve_s: float,
               shape_total: int, warmup_steps: int, freeze_steps: int, queue_start_step: int) -> BudgetPlan:
    """The plan made once the speed is known: the total that fits (:func:`fit_total_steps`), and the warm-up,
    prototype freezing and queue start at the shares of the run the config gives them (``shape_total``:
    train.epochs x steps per epoch, what the config's settings refer to). A warm-up already over stays as
    it was; one still running never ends before ``step`` (no LR jump). ``used_s``: ``elapsed_s``."""
    total = fit_total_steps(step, elapsed_s, budget_s, seconds_per_step, reserve_s)
    warmup = warmup_steps
    if step < warmup_steps:
        warmup = max(share_of_run(warmup_steps, total, shape_total), step)
    return BudgetPlan(budget_s, elapsed_s, total, warmup, share_of_run(freeze_steps, total, shape_total),
                      share_of_run(queue_start_step, total, shape_total))


def share_of_run(steps: int, total_steps: int, configured_total: int) -> int:
    """A setting of ``steps`` in a run of ``configured_total`` steps, kept at the same share of a run of
    ``total_steps`` (the warm-up, prototype freezing and queue start of a budget run)."""
    return round(steps * total_steps / max(1, configured_total))


def worth_changing(new_total: int, current_total: int, step: int) -> bool:
    """Whether a re-fitted total differs enough from the current one to re-pace the cosine."""
    return abs(new_total - current_total) > max(1, MIN_CHANGE_FRACTION * max(0, current_total - step))


__all__ = ["BudgetPlan", "BudgetClock", "fit_total_steps", "first_plan", "share_of_run", "worth_changing"]
