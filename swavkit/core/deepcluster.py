"""DeepCluster-v2 (Caron et al. 2020, SwAV paper appendix; the reference is facebookresearch/swav
``main_deepclusterv2.py``): the second online-clustering method on SwAV's multi-crop machinery.

Instead of Sinkhorn codes computed per batch, every epoch starts with a spherical k-means over a memory bank
that holds, for every image this process saw in the last epoch, the unit embedding of each assignment crop.
Each of H heads clusters one crop's bank (head h uses assignment crop h mod A, as the reference's
``j = (j + 1) % len(crops_for_assign)``); its K centroids become that head's prototypes and its assignments
the hard targets of the epoch, looked up by each sample's dataset index. The loss is the cross-entropy of
scores / temperature against those targets on every crop, averaged over the heads. The prototypes are never
trained (the reference's scripts freeze them for 300000 iterations, longer than any of its runs).

Data flow: bank [A, S, D] (S slots per process) -> :func:`spherical_kmeans` per head (sums and counts
all-reduced, so every process gets the same centroids) -> centroids [K, D] and a :class:`TargetTable`
(dataset id -> target per head) -> :func:`deepcluster_loss` on scores [V, B, H*K].

Pure maths with explicit arguments; the only world it touches is ``swavkit.runtime.distributed`` for the
all-reduces and all-gathers (all no-ops in one process).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from swavkit.runtime import distributed

IGNORE_TARGET = -100  # a sample without an assignment (not in any bank last epoch): no loss term, as the reference


# ----------------------------------------------------------------------------------------------------
# k-means

@dataclass
class KMeansResult:
    centroids: torch.Tensor  # [K, D] unit rows (a centroid that lost every sample keeps its previous value)
    assignments: torch.Tensor  # [N] int64, this process's samples: the centroid of highest cosine
    counts: torch.Tensor  # [K] int64 samples per centroid over ALL processes (the final assignments)


@torch.no_grad()
def initial_centroids(embeddings: torch.Tensor, K: int, generator: torch.Generator) -> torch.Tensor:
    """K distinct rows of ``embeddings`` [N, D] drawn without replacement (the reference: ``randperm[:K]`` of
    rank 0's bank). Raises ValueError when N < K."""
    if embeddings.shape[0] < K:
        raise ValueError(f"{K} centroids need at least {K} embeddings, got {embeddings.shape[0]}")
    pick = torch.randperm(embeddings.shape[0], generator=generator)[:K]
    return embeddings[pick.to(embeddings.device)].clone()


@torch.no_grad()
def spherical_kmeans(embeddings: torch.Tensor, centroids: torch.Tensor, n_iters: int = 10,
                     distributed_sums: bool = True) -> KMeansResult:
    """Spherical k-means, as the reference's ``cluster_memory``: ``n_iters`` rounds of (E) each sample to the
    centroid of highest dot product, (M) each centroid to the L2-normalised mean of its samples, then a last E
    step. In a torch.distributed run the M step's sums and counts are all-reduced, so every process must call
    it with the same ``centroids`` and ends with the same ones.

    Args:
        embeddings: [N, D] this process's unit embeddings (fp32).
        centroids: [K, D] starting centroids (unit rows; not modified).
        n_iters: M steps (the reference: 10).
        distributed_sums: all-reduce across processes when torch.distributed is initialised.
    """
    across = distributed_sums and distributed.world_size() > 1
    K = centroids.shape[0]
    centroids = centroids.clone()
    assignments = torch.empty(0, dtype=torch.long, device=embeddings.device)
    for n_iter in range(n_iters + 1):
        assignments = (embeddings @ centroids.t()).argmax(dim=1)  # E step
        if n_iter == n_iters:
            break
        sums = torch.zeros_like(centroids).index_add_(0, assignments, embeddings)  # M step
        counts = torch.bincount(assignments, minlength=K)
        if across:
            distributed.all_reduce_sum(sums)
            distributed.all_reduce_sum(counts)
        filled = counts > 0  # an empty cluster keeps its previous centroid (the reference's mask)
        centroids[filled] = sums[filled] / counts[filled].unsqueeze(1).to(sums.dtype)
        centroids = F.normalize(centroids, dim=1)
    counts = torch.bincount(assignments, minlength=K)
    if across:
        distributed.all_reduce_sum(counts)
    return KMeansResult(centroids, assignments, counts)


# ----------------------------------------------------------------------------------------------------
# the memory bank and the epoch's targets

class MemoryBank(torch.nn.Module):
    """This process's unit embeddings of the assignment crops of the last epoch, by slot: ``embeddings``
    [A, S, D] and ``ids`` [S] (the dataset index of the image in each slot; -1 = empty). Slots are written in
    step order from 0 at every epoch start (the reference's ``start_idx``), S = steps per epoch x batch per
    process."""

    def __init__(self, n_crops: int, slots: int, dim: int):
        super().__init__()
        self.register_buffer("embeddings", torch.zeros(n_crops, slots, dim))
        self.register_buffer("ids", torch.full((slots,), -1, dtype=torch.long))
        self.next_slot = 0

    @property
    def slots(self) -> int:
        return self.ids.shape[0]

    @torch.no_grad()
    def write(self, ids: torch.Tensor, embeddings: torch.Tensor) -> None:
        """ids [B] int64, embeddings [A, B, D] unit rows -> the next B slots (wrapping round at the end)."""
        B = ids.shape[0]
        slots = (torch.arange(B, device=self.ids.device) + self.next_slot) % self.slots
        self.ids[slots] = ids.to(self.ids.device)
        self.embeddings[:, slots] = embeddings.to(self.embeddings)
        self.next_slot = (self.next_slot + B) % self.slots

    def filled(self) -> torch.Tensor:
        """[S] bool: the slots that hold an embedding."""
        return self.ids >= 0


@dataclass
class TargetTable:
    """The epoch's hard targets: ``ids`` [M] sorted distinct dataset indices, ``targets`` [H, M] int64."""
    ids: torch.Tensor
    targets: torch.Tensor

    @classmethod
    def empty(cls, n_heads: int) -> "TargetTable":
        return cls(torch.zeros(0, dtype=torch.long), torch.zeros(n_heads, 0, dtype=torch.long))

    @classmethod
    def build(cls, ids: torch.Tensor, targets: torch.Tensor) -> "TargetTable":
        """ids [N] (repeats allowed: the later one wins), targets [H, N] -> the table."""
        order = torch.argsort(ids, stable=True)
        ids, targets = ids[order], targets[:, order]
        last = torch.ones_like(ids, dtype=torch.bool)
        last[:-1] = ids[1:] != ids[:-1]
        return cls(ids[last].contiguous(), targets[:, last].contiguous())

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B] -> targets [H, B] on ``ids``' device; IGNORE_TARGET for an id not in the table."""
        table_ids = self.ids.to(ids.device)
        if table_ids.numel() == 0:
            return torch.full((self.targets.shape[0], ids.shape[0]), IGNORE_TARGET, dtype=torch.long, device=ids.device)
        where = torch.searchsorted(table_ids, ids).clamp_max(table_ids.numel() - 1)
        found = table_ids[where] == ids
        out = self.targets.to(ids.device)[:, where]
        return torch.where(found, out, torch.full_like(out, IGNORE_TARGET))

    def state_dict(self) -> dict:
        return {"ids": self.ids.cpu(), "targets": self.targets.cpu()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "TargetTable":
        return cls(state["ids"].long(), state["targets"].long())


@torch.no_grad()
def cluster_bank(bank: MemoryBank, centroid_counts: list[int], n_iters: int,
                 generator: torch.Generator) -> tuple[list[KMeansResult], TargetTable]:
    """One k-means per head over the memory banks of all processes (the reference's ``cluster_memory``).

    Head h clusters bank crop ``h % A``. Process 0 draws its starting centroids from its own bank with
    ``generator``; the others receive them (an all-reduce of zeros and rank 0's rows). Every process returns
    the same centroids and the same table of all processes' assignments (an all-gather of ids and targets).

    Args:
        bank: this process's bank (only its filled slots take part).
        centroid_counts: K of each head.
        generator: CPU generator for process 0's draw (the others' is not used).
    """
    filled = bank.filled()
    ids = distributed.all_gather_cat(bank.ids[filled])
    results, targets = [], []
    for h, K in enumerate(centroid_counts):
        embeddings = bank.embeddings[h % bank.embeddings.shape[0]][filled]
        start = torch.zeros(K, embeddings.shape[1], device=embeddings.device)
        if distributed.rank() == 0:
            start = initial_centroids(embeddings, K, generator)
        distributed.all_reduce_sum(start)  # rank 0's rows everywhere (x + 0 is exact)
        result = spherical_kmeans(embeddings, start, n_iters)
        results.append(result)
        targets.append(distributed.all_gather_cat(result.assignments))
    return results, TargetTable.build(ids.cpu(), torch.stack(targets).cpu())


@dataclass(eq=False)
class DeepClusterState:
    """What DeepCluster-v2 adds to a training state: this process's ``bank``, the epoch's ``table`` of targets
    (the same on every process), which epoch it belongs to, and whether the bank was filled by its first pass."""
    bank: MemoryBank
    centroid_counts: list[int]  # K of each head; the model's prototype rows are these heads, one after another
    table: TargetTable
    clustered_epoch: int = -1  # the epoch whose targets ``table`` holds (-1: none yet)
    bank_filled: bool = False  # the full pass before training is done (or the bank came from a checkpoint)
    collapse_warned: bool = False  # a k-means collapse warning is standing (said once until the clusters recover)

    def per_rank_state_dict(self) -> dict:
        return {"embeddings": self.bank.embeddings.cpu(), "ids": self.bank.ids.cpu(), "next_slot": self.bank.next_slot,
                "filled": self.bank_filled}

    def load_per_rank_state_dict(self, state: dict) -> None:
        self.bank.embeddings.copy_(state["embeddings"])
        self.bank.ids.copy_(state["ids"])
        self.bank.next_slot, self.bank_filled = int(state["next_slot"]), bool(state["filled"])

    def shared_state_dict(self) -> dict:
        return {"table": self.table.state_dict(), "clustered_epoch": self.clustered_epoch}

    def load_shared_state_dict(self, state: dict) -> None:
        self.table = TargetTable.from_state_dict(state["table"])
        self.clustered_epoch = int(state["clustered_epoch"])


# ----------------------------------------------------------------------------------------------------
# the loss

def deepcluster_loss(scores: torch.Tensor, targets: torch.Tensor, centroid_counts: list[int],
                     temperature: float) -> torch.Tensor:
    """Cross-entropy of every crop's scores / temperature against its image's hard target, per head, averaged
    over the heads (the reference's loop over ``nmb_prototypes``).

    Args:
        scores: [V, B, sum(K_h)] scores of all V crops (crop-major) against the heads' prototypes, head after head.
        targets: [H, B] int64 targets of the B images (IGNORE_TARGET: no term for that image).
        centroid_counts: K_h of each head.

    Returns:
        0-d fp32: mean over heads of the mean over the V x B rows that have a target (0 when none has).
    """
    V, B, _ = scores.shape
    total = scores.new_zeros((), dtype=torch.float32)
    for h, head_scores in enumerate(scores.float().split(list(centroid_counts), dim=-1)):
        t = targets[h].repeat(V)  # crop-major, as the scores (the reference's ``.repeat(sum(nmb_crops))``)
        summed = F.cross_entropy(head_scores.reshape(V * B, -1) / temperature, t, ignore_index=IGNORE_TARGET,
                                 reduction="sum")
        total = total + summed / (t != IGNORE_TARGET).sum().clamp_min(1)
    return total / len(centroid_counts)


def cluster_statistics(counts: torch.Tensor) -> dict:
    """counts [K] samples per cluster -> {"empty_clusters", "largest_cluster_fraction"} (the k-means collapse
    signs: clusters nobody is assigned to, one cluster taking most samples)."""
    total = max(int(counts.sum()), 1)
    return {"empty_clusters": int((counts == 0).sum()), "largest_cluster_fraction": round(int(counts.max()) / total, 4)}


__all__ = ["IGNORE_TARGET", "KMeansResult", "initial_centroids", "spherical_kmeans", "MemoryBank", "TargetTable",
           "DeepClusterState", "cluster_bank", "deepcluster_loss", "cluster_statistics"]
