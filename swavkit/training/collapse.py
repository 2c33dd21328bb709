"""Keeping the codes informative (``swav.prevent_collapse``): an epsilon that adapts to the codes'
per-sample entropy, and a queue that is dropped when the loss returns to ln K while it is in use.

Collapse (see :mod:`swavkit.training.diagnosis`) is a fixed point: when every embedding scores about the same
against every prototype, Sinkhorn's equipartition turns each sample's scores into a near-uniform code,
the swapped cross-entropy is ln K whatever the network predicts, and nothing pushes the embeddings apart.
With a fixed epsilon the run stays there. Lowering epsilon sharpens the codes: small score differences
become confident (still balanced) assignments, which gives the swapped prediction something to learn.

``EpsilonControl`` watches the mean per-sample code entropy H (nats; ln K = uniform codes, 0 = one-hot) at
every logging step and moves epsilon multiplicatively towards the value whose codes sit at
``target_fraction x ln K``: down when H is above it (codes carry too little), back up (never above the
configured epsilon, the reference value) when below. Epsilon lives on a grid of 8 values per octave so
that Sinkhorn's captured CUDA graphs (one per epsilon) stay few.

The queue: Sinkhorn over the batch plus stale embeddings of past batches. On a lightly-sized recipe
(resnet18, 2x32 + 6x16 crops, cifar10-small) the adaptive epsilon took the loss from ln K down, and it
went back up to ln K once the queue joined; without a queue it stayed down. ``queue_should_stop``: after
``QUEUE_GUARD_WINDOWS`` logging windows in a row with the loss within ``QUEUE_GUARD_MARGIN`` of ln K while
the queue is in use, the run goes on without it (said in the log; saved in the checkpoint).

``swav.prevent_collapse=false`` keeps the paper's fixed epsilon and queue.

Measured on cifar10-small (benchmarks/README.md, "Collapse prevention"): the lightly-sized recipe that sat
at ln K with a fixed epsilon leaves it with the control on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

QUEUE_GUARD_MARGIN = 0.02  # loss within 2 % of ln K ...
QUEUE_GUARD_WINDOWS = 2  # ... for 2 logging windows in a row, with the queue in use: drop it
GRID_STEPS_PER_OCTAVE = 8  # epsilon = max_epsilon x 2^(-n/8): at most ~27 distinct values per decade x 10
MAX_FACTOR_PER_UPDATE = 2.0  # one logging window moves epsilon by at most 2x either way (no overshoot)


@torch.no_grad()
def row_entropy(codes: torch.Tensor) -> torch.Tensor:
    """Mean per-sample entropy of codes Q [B, K] (rows sum to 1), in nats: 0-d fp32 tensor on Q's device.

    ln K when every code is uniform (no information), 0 when every code is one-hot. Stays on the device:
    no host sync."""
    q = codes.float()
    return -(q * q.clamp_min(1e-12).log()).sum(dim=1).mean()


@dataclass(frozen=True)
class EpsilonControl:
    """Moves epsilon so that the mean per-sample code entropy sits near ``target_fraction`` x ln K.

    Attributes:
        target_fraction: target entropy as a fraction of ln K (0..1).
        min_epsilon: the sharpest codes allowed (Sinkhorn switches to its log-domain route when needed).
        max_epsilon: the configured swav.epsilon; the control never softens the codes beyond it.
        gain: log-epsilon change per unit of (entropy fraction - target); clamped to 2x per update.
    """
    target_fraction: float
    min_epsilon: float
    max_epsilon: float
    gain: float = 3.0

    def next_epsilon(self, epsilon: float, mean_row_entropy_nats: float, n_prototypes: int) -> float:
        """The epsilon for the next steps, given the current one and the entropy its codes had."""
        fraction = mean_row_entropy_nats / math.log(n_prototypes)
        if not math.isfinite(fraction):  # a refused window: keep what we have
            return epsilon
        step = max(-math.log(MAX_FACTOR_PER_UPDATE),
                   min(math.log(MAX_FACTOR_PER_UPDATE), self.gain * (self.target_fraction - fraction)))
        return self.on_grid(epsilon * math.exp(step))

    def on_grid(self, epsilon: float) -> float:
        """Nearest grid value max_epsilon x 2^(-n/8), within [min_epsilon, max_epsilon]."""
        epsilon = min(self.max_epsilon, max(self.min_epsilon, epsilon))
        n = round(GRID_STEPS_PER_OCTAVE * math.log2(self.max_epsilon / epsilon))
        return max(self.min_epsilon, self.max_epsilon * 2.0 ** (-n / GRID_STEPS_PER_OCTAVE))


def queue_should_stop(windows_near_ln_k: int, mean_loss: float, n_prototypes: int) -> tuple[int, bool]:
    """One logging window with the queue in use: (the updated count of windows in a row near ln K, whether
    to stop using the queue now)."""
    ln_k = math.log(n_prototypes)
    count = windows_near_ln_k + 1 if abs(mean_loss - ln_k) <= QUEUE_GUARD_MARGIN * ln_k else 0
    return count, count >= QUEUE_GUARD_WINDOWS




@dataclass
class CollapsePolicy:
    """``swav.prevent_collapse``'s decisions at the end of each logging window, in one place: the next
    Sinkhorn epsilon (EpsilonControl) and whether the queue goes. Every rank calls it with the same
    all-reduced numbers, so every rank decides the same. It changes ``state.epsilon``,
    ``state.queue_near_ln_k_windows`` and ``state.queue_dropped_at_step`` (all in the checkpoint)."""
    epsilon_control: EpsilonControl

    @classmethod
    def from_config(cls, swav) -> "CollapsePolicy | None":
        """``swav``: the config's SwAVConfig; None when ``swav.prevent_collapse`` is off (the paper)."""
        if not swav.prevent_collapse:
            return None
        return cls(EpsilonControl(target_fraction=swav.code_entropy_target,
                                  min_epsilon=min(swav.min_epsilon, swav.epsilon), max_epsilon=swav.epsilon))

    def after_window(self, state, epsilon_used: float, mean_loss: float, mean_row_entropy: float,
                     queue_in_use: bool) -> str | None:
        """Update ``state`` for the next window; returns a line to print when the queue was dropped."""
        n_prototypes = state.core.n_prototypes
        state.epsilon = self.epsilon_control.next_epsilon(epsilon_used, mean_row_entropy, n_prototypes)
        if not queue_in_use:
            return None
        state.queue_near_ln_k_windows, stop = queue_should_stop(state.queue_near_ln_k_windows, mean_loss,
                                                                n_prototypes)
        if not stop:
            return None
        state.queue_dropped_at_step = state.step
        return (f"step {state.step}: the loss returned to ln K while the queue was in use; going on without the "
                "queue (to keep the queue in such a case, set swav.prevent_collapse=false)")


__all__ = ["EpsilonControl", "CollapsePolicy", "row_entropy", "queue_should_stop", "QUEUE_GUARD_MARGIN",
           "QUEUE_GUARD_WINDOWS"]
