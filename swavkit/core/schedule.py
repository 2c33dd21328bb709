"""Learning-rate schedule: linear warm-up, then half a cosine down to the final LR.

The SwAV reference scripts (facebookresearch/swav, scripts/swav_*.sh) give two recipes, and they are
NOT related by linear scaling (0.6 x 4096/256 would be 9.6):
  batch 4096: warm-up 10 epochs from 0.3 to 4.8, cosine to 0.0048;
  batch  256: 0.6 from the first step (no warm-up), cosine to 0.0006.
A config states its numbers at ``optim.reference_batch_size``; only another global batch rescales them.

:class:`LRSchedule` is a function of the optimiser step whose few numbers go into the checkpoint, so a
resumed run continues exactly, and a resume with more (or fewer) epochs continues from the current LR
instead of jumping to where a re-stretched cosine would be.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from swavkit.config import Config, ConfigError

# The reference recipe's anchors: (global batch, peak LR) of the batch-256 and batch-4096 scripts.
SWAV_LR_ANCHORS = ((256, 0.6), (4096, 4.8))
# AdamW for vision transformers: 5e-4 per 256 images, scaled linearly (DINO's rule).
ADAMW_LR_PER_256 = 5e-4
# final LR = peak / 1000 in both SwAV scripts (4.8 -> 0.0048, 0.6 -> 0.0006)
FINAL_LR_RATIO = 1e-3


def reference_peak_lr(optimizer_name: str, global_batch_size: int) -> float:
    """The peak LR used when ``optim.base_lr`` is 0.

    LARS/SGD: the paper's 0.6 at batch 256 and 4.8 at 4096. Below 256 the LR scales linearly; above,
    it follows the power law through both anchors, 0.6 x (B/256)^0.75 (exactly 4.8 at 4096; the paper
    gives no number between or beyond them). AdamW: 5e-4 per 256 images.
    """
    if optimizer_name == "adamw":
        return ADAMW_LR_PER_256 * global_batch_size / 256
    (small_batch, small_lr), (large_batch, large_lr) = SWAV_LR_ANCHORS
    if global_batch_size <= small_batch:
        return small_lr * global_batch_size / small_batch
    exponent = math.log(large_lr / small_lr) / math.log(large_batch / small_batch)  # 0.75
    return small_lr * (global_batch_size / small_batch) ** exponent


@dataclass
class LRSchedule:
    """Warm-up from ``warmup_start_lr`` to ``peak_lr`` over ``warmup_steps`` (linear), then half a cosine
    from ``peak_lr`` to ``final_lr`` reached at ``total_steps``.

    The cosine's argument, its progress from 0 to 1, is piecewise linear in the step: it starts at
    (warmup_steps, 0), passes through each point of ``pace_changes`` and ends at (total_steps, 1). Without
    changes this is the reference's ``(step - warmup) / (total - warmup)``; a change of the total on
    resume adds a point at the resume step, so the LR there is unchanged and only the pace of the decay
    after it differs.
    """

    peak_lr: float
    final_lr: float
    warmup_start_lr: float
    warmup_steps: int
    total_steps: int
    pace_changes: list[tuple[int, float]] = field(default_factory=list)  # (step, cosine progress)

    def __post_init__(self) -> None:
        # the same numbers whether they come from the config or from a checkpoint (lists, ints for floats)
        self.peak_lr, self.final_lr, self.warmup_start_lr = (float(self.peak_lr), float(self.final_lr),
                                                             float(self.warmup_start_lr))
        self.warmup_steps, self.total_steps = int(self.warmup_steps), int(self.total_steps)
        self.pace_changes = [(int(step), float(progress)) for step, progress in self.pace_changes]

    def progress(self, step: int) -> float:
        """Cosine progress in [0, 1] at ``step`` (0 up to the end of the warm-up)."""
        if step >= self.total_steps:
            return 1.0
        points = [(self.warmup_steps, 0.0), *self.pace_changes, (self.total_steps, 1.0)]
        if step <= points[0][0]:
            return 0.0
        for (start, start_progress), (end, end_progress) in zip(points, points[1:]):
            if start <= step < end:
                return start_progress + (end_progress - start_progress) * (step - start) / (end - start)
        return 1.0

    def lr(self, step: int) -> float:
        """LR for optimiser step ``step`` (0-based: the first step of the run is step 0)."""
        if step < self.warmup_steps:
            return self.warmup_start_lr + (self.peak_lr - self.warmup_start_lr) * step / self.warmup_steps
        cosine = 0.5 * (1.0 + math.cos(math.pi * self.progress(step)))
        return self.final_lr + (self.peak_lr - self.final_lr) * cosine

    def state_dict(self) -> dict:
        """Plain numbers (torch.save- and JSON-safe); saved in the training checkpoint."""
        state = asdict(self)
        state["pace_changes"] = [list(point) for point in self.pace_changes]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Take the saved schedule as it was: peak, warm-up and pace changes come from the run itself."""
        names = set(self.state_dict())
        if set(state) != names:
            raise ValueError(f"the checkpoint's LR schedule has keys {sorted(state)}, expected {sorted(names)}")
        vars(self).update(vars(LRSchedule(**state)))

    def change_total_steps(self, total_steps: int, step: int, steps_per_epoch: int) -> str:
        """Continue the saved schedule at ``step`` (the next step to run) towards a new ``total_steps``.

        After the warm-up the LR at ``step`` is kept and the rest of the cosine is spread over the steps
        that remain (more or fewer); during the warm-up the warm-up goes on unchanged and the cosine after
        it spans the new total. Either way no step's LR jumps. Returns a one-line note for the log ("" when
        nothing changes); a total behind ``step`` raises ConfigError saying what to do.
        """
        if total_steps == self.total_steps:
            return ""
        if total_steps < step:
            raise ConfigError(f"train.epochs: this run is already at step {step} (epoch {step / steps_per_epoch:.2f}) "
                              f"and the new total is {total_steps} steps; resume with train.epochs >= "
                              f"{math.ceil(step / steps_per_epoch)}, or use another out_dir (or --restart) to start a "
                              "shorter run")
        change = f"LR schedule: {self.total_steps} -> {total_steps} steps at step {step}"
        current_lr, current_progress = self.lr(step), self.progress(step)  # of the schedule as it was
        self.total_steps = total_steps
        if step < self.warmup_steps:
            if total_steps <= self.warmup_steps:
                return f"{change}: the run now ends inside the warm-up, so the LR never reaches its peak"
            return f"{change}: the warm-up ends as planned at step {self.warmup_steps}, then the cosine runs to the end"
        self.pace_changes = [point for point in self.pace_changes if point[0] < step] + [(step, current_progress)]
        if current_progress >= 1.0:
            return (f"{change}: the old cosine had ended, so the added steps run at the final LR {self.final_lr:.3g}; "
                    "to train on at a higher LR, start a new run from this run's weights")
        return (f"{change}: the LR continues from {current_lr:.3g} down to {self.final_lr:.3g} over the remaining "
                f"{total_steps - step} steps")

    def describe(self) -> str:
        """One line for the setup banner."""
        warmup = (f"warm-up {self.warmup_steps} steps from {self.warmup_start_lr:.3g}, " if self.warmup_steps
                  else "no warm-up, ")
        return f"peak LR {self.peak_lr:.4g}, {warmup}cosine to {self.final_lr:.3g} at step {self.total_steps}"


@dataclass
class StepDecaySchedule:
    """``peak_lr`` times ``gamma`` for each boundary in ``decay_steps`` that the step has reached: the step
    decay of the SwAV semi-supervised fine-tuning recipe (x0.2 at epochs 12 and 16 of 20, given here in
    optimiser steps). Like :class:`LRSchedule`, a function of the 0-based optimiser step."""

    peak_lr: float
    decay_steps: list[int]
    gamma: float

    def lr(self, step: int) -> float:
        return self.peak_lr * self.gamma ** sum(step >= boundary for boundary in self.decay_steps)

    def describe(self) -> str:
        return f"LR {self.peak_lr:.4g}, x{self.gamma:g} at steps {list(self.decay_steps)}"


def build_lr_schedule(cfg: Config, steps_per_epoch: int, optimizer_name: str) -> LRSchedule:
    """The schedule ``cfg.optim`` asks for at the global batch ``cfg.train.batch_size``.

    ``optimizer_name`` is the resolved optimiser (lars | sgd | adamw), used when ``optim.base_lr`` is 0.
    The LRs in the config are at ``optim.reference_batch_size``; all of them move with the batch by the
    same factor, so a paper config run at its own batch gets exactly the numbers it states.
    """
    o = cfg.optim
    batch_factor = cfg.train.batch_size / o.reference_batch_size
    if o.base_lr > 0:
        peak_lr = o.base_lr * batch_factor
    else:
        peak_lr = reference_peak_lr(optimizer_name, cfg.train.batch_size)
    final_lr = o.final_lr * batch_factor if o.final_lr >= 0 else peak_lr * FINAL_LR_RATIO
    warmup_start_lr = o.warmup_start_lr if o.warmup_start_lr_absolute else o.warmup_start_lr * batch_factor
    if warmup_start_lr > peak_lr:
        raise ConfigError(f"optim.warmup_start_lr: {warmup_start_lr:g} (absolute) is above the peak LR {peak_lr:g} at "
                          f"batch {cfg.train.batch_size}, so the warm-up would lower the LR; start below the peak")
    return LRSchedule(peak_lr=peak_lr, final_lr=final_lr, warmup_start_lr=warmup_start_lr,
                      warmup_steps=steps_of(o.warmup_epochs, o.warmup_steps, steps_per_epoch),
                      total_steps=steps_per_epoch * cfg.train.epochs)


def steps_of(epochs: float, steps: int, steps_per_epoch: int) -> int:
    """A length the config gives in epochs (fractions allowed) or, when ``steps`` >= 0, in optimiser steps
    (``optim.warmup_steps``, ``swav.freeze_prototypes_steps``: a recipe's iteration count, exact at any
    epoch length)."""
    return steps if steps >= 0 else round(epochs * steps_per_epoch)


def explain_peak_lr(cfg: Config, optimizer_name: str) -> str:
    """Where :func:`build_lr_schedule`'s peak LR comes from, for the setup banner."""
    o, batch = cfg.optim, cfg.train.batch_size
    if o.base_lr > 0:
        return (f"optim.base_lr {o.base_lr:g} at batch {batch}" if batch == o.reference_batch_size
                else f"optim.base_lr {o.base_lr:g} x {batch}/{o.reference_batch_size}")
    if optimizer_name == "adamw":
        return f"AdamW reference {ADAMW_LR_PER_256:g} x {batch}/256"
    return f"the paper's LARS LR for batch {batch}: 0.6 at 256, 4.8 at 4096"
