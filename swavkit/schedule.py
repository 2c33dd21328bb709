"""Learning-rate schedule: linear warm-up, then cosine decay; LR scaled linearly with the global batch.

Pure functions of the step, so a resumed run needs nothing but the step counter to continue exactly.
"""

from __future__ import annotations

import math


def scaled_lr(base_lr: float, global_batch_size: int, reference_batch_size: int = 256) -> float:
    """Linear scaling rule: ``base_lr`` is the LR at ``reference_batch_size`` (SwAV: 0.6 at 256 = 4.8 at 4096)."""
    return base_lr * global_batch_size / reference_batch_size


def lr_at_step(step: int, *, peak_lr: float, total_steps: int, warmup_steps: int,
               warmup_start_lr: float, final_lr: float) -> float:
    """LR for optimiser step ``step`` (0-based): linear from warmup_start_lr to peak over warmup_steps,
    then half a cosine from peak_lr down to final_lr at total_steps."""
    if step < warmup_steps:
        return warmup_start_lr + (peak_lr - warmup_start_lr) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_lr + 0.5 * (peak_lr - final_lr) * (1.0 + math.cos(math.pi * progress))
