"""Collapse diagnosis: recognise the loss sitting at ln K (every sample gets the uniform code).

When the codes are uniform the swapped cross-entropy is exactly ln K whatever the predictions, so a
loss that stays within a small margin of ln K means nothing is being learned. A healthy run leaves
ln K within the first few hundred steps.
"""

from __future__ import annotations

import math

import torch

LEVERS = (
    "lower swav.epsilon (e.g. 0.05 -> 0.03) so the codes are sharper",
    "freeze the prototypes longer (swav.freeze_prototypes_epochs)",
    "start the queue later or make it shorter (swav.queue_start_epoch, swav.queue_length)",
    "soften the augmentation (crops.color_jitter_strength, larger crops.min_scales)",
    "lower the learning rate (optim.base_lr)",
)

# method=deepclusterv2: the targets are k-means clusters, so collapse shows as clusters that take most
# images or none (swavkit/core/deepcluster.py cluster_statistics), and as a loss at ln K (uniform predictions)
DEEPCLUSTER_LEVERS = (
    "fewer clusters (model.n_prototypes), so that each one keeps enough images",
    "lower the learning rate (optim.base_lr) or warm up longer (optim.warmup_epochs)",
    "soften the augmentation (crops.color_jitter_strength, larger crops.min_scales)",
    "compare with method=swav, whose equipartition rules this collapse out",
)
LARGEST_CLUSTER_WARNING = 0.5  # one cluster with over half the images (and over 2/K: not just a small K) ...
EMPTY_CLUSTERS_WARNING = 0.5  # ... or half the clusters empty: the k-means targets say little


def kmeans_collapse_warning(head: int, K: int, stats: dict) -> str | None:
    """A warning text for one head's k-means (``stats`` from cluster_statistics), None when healthy."""
    largest, empty = stats["largest_cluster_fraction"], stats["empty_clusters"]
    if largest <= max(LARGEST_CLUSTER_WARNING, 2 / K) and empty < EMPTY_CLUSTERS_WARNING * K:
        return None
    levers = "; ".join(f"({i}) {lever}" for i, lever in enumerate(DEEPCLUSTER_LEVERS, 1))
    return (f"collapse: k-means head {head} put {largest:.0%} of the images into one cluster and left {empty} of {K} "
            f"clusters empty, so the epoch's targets carry little information. Try, in this order: {levers}.")


@torch.no_grad()
def code_statistics(codes: torch.Tensor) -> dict:
    """Usage of the prototypes by a batch of codes Q [B, K] (rows sum to 1).

    Returns the number of prototypes that are some sample's argmax, and the entropy (nats) of the mean
    code distribution; ln K means the batch spreads over all prototypes evenly.
    """
    K = codes.shape[1]
    used = int(torch.bincount(codes.argmax(dim=1), minlength=K).count_nonzero())
    mean_code = codes.float().mean(dim=0)
    entropy = float(-(mean_code * mean_code.clamp_min(1e-12).log()).sum())
    return {"prototypes_used": used, "code_entropy": entropy}


class CollapseMonitor:
    """Feed it (step, loss) at every logging step; ``update`` returns a warning text once, when the loss has
    stayed within ``relative_margin`` of ln K for ``patience_steps`` steps."""

    def __init__(self, n_prototypes: int, patience_steps: int = 200, relative_margin: float = 0.01,
                 levers: tuple[str, ...] = LEVERS):
        self.levers = levers  # what to try, in order (SwAV's by default; DEEPCLUSTER_LEVERS for deepclusterv2)
        self.ln_k = math.log(n_prototypes)
        self.patience_steps = patience_steps
        self.relative_margin = relative_margin
        self.since_step: int | None = None
        self.warned = False

    def is_near_ln_k(self, loss: float) -> bool:
        return abs(loss - self.ln_k) <= self.relative_margin * self.ln_k

    def update(self, step: int, loss: float, prototypes_used: int | None = None) -> str | None:
        if not self.is_near_ln_k(loss):
            self.since_step = None
            return None
        if self.since_step is None:
            self.since_step = step
        if self.warned or step - self.since_step < self.patience_steps:
            return None
        self.warned = True
        usage = f", {prototypes_used} prototypes in use" if prototypes_used is not None else ""
        levers = "; ".join(f"({i}) {lever}" for i, lever in enumerate(self.levers, 1))
        return (f"collapse: the loss has stayed at ln K = {self.ln_k:.3f} (now {loss:.3f}{usage}) since step "
                f"{self.since_step}, so every image gets the same uniform code and nothing is learned. "
                f"Try, in this order: {levers}.")

    def final_verdict(self, final_loss: float) -> str | None:
        """For a run's last lines: a warning when it ended on the plateau, however short the run was."""
        if not self.is_near_ln_k(final_loss):
            return None
        levers = "; ".join(f"({i}) {lever}" for i, lever in enumerate(self.levers, 1))
        return (f"the run ended at the collapse plateau: final loss {final_loss:.4f} is within "
                f"{self.relative_margin:.0%} of ln K = {self.ln_k:.4f}, so the codes were uniform and the backbone "
                f"has probably learned nothing. Try, in this order: {levers}.")

    def state_dict(self) -> dict:
        return {"since_step": -1 if self.since_step is None else self.since_step, "warned": self.warned}

    def load_state_dict(self, state: dict) -> None:
        self.since_step = None if state.get("since_step", -1) < 0 else int(state["since_step"])
        self.warned = bool(state.get("warned", False))
