"""method=deepclusterv2's epoch hook (the maths is swavkit/core/deepcluster.py): the memory bank built and
filled by a full pass before training, and at every epoch start the k-means whose centroids become the
prototypes and whose assignments become the epoch's targets. The loop calls it (swavkit/training/loop.py);
the step reads the targets and refreshes the bank (swavkit/training/step.py)."""

from __future__ import annotations

from typing import Iterable

import torch

from swavkit.config import Config, ConfigError
from swavkit.core.deepcluster import DeepClusterState, MemoryBank, TargetTable, cluster_bank, cluster_statistics
from swavkit.training.step import StepSettings, TrainState


def build_deepcluster(cfg: Config, slots_per_process: int, device: torch.device) -> DeepClusterState:
    """An empty bank of [len(swav.assignment_crops), slots_per_process, model.output_dim] and no targets yet.
    ConfigError when one process's bank cannot seed model.n_prototypes centroids (the reference asserts it)."""
    K = cfg.model.n_prototypes
    if slots_per_process < K:
        raise ConfigError(f"model.n_prototypes={K}: method=deepclusterv2 starts each k-means from {K} embeddings of "
                          f"one process's memory bank, which holds {slots_per_process} (steps per epoch x batch per "
                          "process); lower model.n_prototypes or use more images")
    bank = MemoryBank(len(cfg.swav.assignment_crops), slots_per_process, cfg.model.output_dim).to(device)
    n_heads = cfg.deepcluster.n_heads
    return DeepClusterState(bank, [K] * n_heads, TargetTable.empty(n_heads))


def describe_bank(dc: DeepClusterState) -> str:
    """The bank's size per process, for the start-up banner."""
    A, S, D = dc.bank.embeddings.shape
    megabytes = (dc.bank.embeddings.numel() * dc.bank.embeddings.element_size() + dc.bank.ids.numel() * 8) / 2 ** 20
    return (f"memory bank of {A} x {S} x {D} embeddings per process ({megabytes:.1f} MB: {A} assignment crop(s), "
            f"{S} images); {len(dc.centroid_counts)} k-means head(s) of {dc.centroid_counts[0]} clusters")


@torch.no_grad()
def fill_memory_bank(state: TrainState, batches: Iterable[tuple[list[torch.Tensor], torch.Tensor]],
                     settings: StepSettings) -> int:
    """The full pass before training (the reference's ``init_memory``): each batch's assignment crops, one
    forward each, with the model in training mode and no gradient; their unit embeddings into the bank from
    slot 0. ``batches``: (V crops [B, 3, s, s], indices [B]) on the model's device. Returns the images written."""
    dc, core = state.deepcluster, state.core
    dc.bank.next_slot, written = 0, 0
    dtype = settings.autocast_dtype
    for crops, indices in batches:
        with torch.autocast(state.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            z = torch.stack([core([crops[i]])[0].float() for i in settings.assignment_crops])  # [A, B, D]
        dc.bank.write(indices, z)
        written += len(indices)
    dc.bank.next_slot, dc.bank_filled = 0, True
    return written


def cluster_epoch(state: TrainState, epoch: int, seed: int, kmeans_iterations: int) -> list[dict]:
    """The epoch start: one k-means per head over every process's bank; its centroids written into that head's
    prototype rows, its assignments the epoch's targets; the bank refilled from slot 0 during the epoch.
    Collective. Returns each head's :func:`cluster_statistics`."""
    dc = state.deepcluster
    # its own generator: the draw depends on (seed, epoch) only, so a resumed run draws the same centroids
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    results, table = cluster_bank(dc.bank, dc.centroid_counts, kmeans_iterations, generator)
    with torch.no_grad():
        rows = state.core.prototypes.weight
        start = 0
        for K, result in zip(dc.centroid_counts, results):
            rows[start:start + K].copy_(result.centroids.to(rows))
            start += K
    dc.table, dc.clustered_epoch, dc.bank.next_slot = table, epoch, 0
    return [cluster_statistics(result.counts) for result in results]


__all__ = ["build_deepcluster", "describe_bank", "fill_memory_bank", "cluster_epoch"]
