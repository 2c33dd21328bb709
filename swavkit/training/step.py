"""One SwAV training step as a function of explicit state.

``TrainState`` holds everything a step reads and changes: model, optimiser, loss scaler, queue, collapse
monitor and counters; ``TrainState.state_dict()`` plus the config is the training checkpoint.
``train_step(state, crops, settings, lr)`` is one step (stages 7b-7f of ``swavkit.training.trainer``): projected
prototypes, grouped forward, codes, swapped-prediction loss, backward, and an update that is applied only
when the loss and every gradient are finite. ``assign_codes`` is the pure maths of the codes.

Data flow of a step: crops [B, 3, s, s] x V -> SwAVModel -> scores [V, B, K] -> assign_codes (Sinkhorn,
with the queue once full) -> codes Q_i [B, K] -> swapped_prediction_loss -> backward -> optimiser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from swavkit.runtime import distributed
from swavkit.training.budget import BudgetPlan
from swavkit.artifacts.checkpoint import CHECKPOINT_FORMAT
from swavkit.config import Config
from swavkit.training.diagnosis import CollapseMonitor
from swavkit.core.deepcluster import DeepClusterState, deepcluster_loss
from swavkit.core.loss import FeatureQueue, swapped_prediction_loss
from swavkit.core.model import SwAVModel
from swavkit.runtime.rng import capture_rng_state, restore_rng_state
from swavkit.core.schedule import LRSchedule
from swavkit.core.sinkhorn import sinkhorn
from swavkit.training.sharding import broadcast_buffers, sync_whole_gradients


# ----------------------------------------------------------------------------------------------------
# codes

@torch.no_grad()
def assign_codes(scores: torch.Tensor, queue_embeddings: torch.Tensor | None, prototype_weight: torch.Tensor,
                 epsilon: float, n_iters: int, dtype: torch.dtype = torch.float32,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Codes of one assignment crop: Sinkhorn-Knopp (SwAV eq. 3) over this batch, and over the queue too.

    Args:
        scores: [B, K] prototype scores of the batch (fp32).
        queue_embeddings: [L, D] unit embeddings of past batches, or None. Their scores against the
            current prototypes are put before the batch's, so equipartition holds over L + B samples.
        prototype_weight: [K, D] prototypes (rows unit length).
        epsilon, n_iters, dtype: as :func:`swavkit.core.sinkhorn.sinkhorn`.
        out: optional [L + B, K] ``dtype`` buffer for Sinkhorn's output (reused across steps).

    Returns:
        Q: [B, K] codes of the batch rows only (a view of ``out`` when given); rows sum to 1.
    """
    B = scores.shape[0]
    scores = scores.detach()
    if queue_embeddings is not None:
        scores = torch.cat([queue_embeddings @ prototype_weight.t().float(), scores])
    return sinkhorn(scores, epsilon, n_iters, dtype=dtype, out=out)[-B:]


# ----------------------------------------------------------------------------------------------------
# what a step needs and what it changes

@dataclass(frozen=True)
class StepSettings:
    """The fixed hyperparameters of a step, in the step's own units. Defaults: the config's SwAV defaults
    with no prototype freezing and the queue (if any) on from the first step."""
    assignment_crops: tuple[int, ...] = (0, 1)
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    sinkhorn_dtype: torch.dtype = torch.float32
    temperature: float = 0.1
    autocast_dtype: torch.dtype | None = None  # None: no autocast (fp32)
    freeze_prototype_steps: int = 0  # the prototypes get no gradient while state.step is below this
    queue_start_step: int = 0  # the queue is fed (and used once full) from this step on

    @classmethod
    def from_config(cls, cfg: Config, steps_per_epoch: int, autocast_dtype: torch.dtype | None) -> "StepSettings":
        s = cfg.swav
        return cls(assignment_crops=tuple(s.assignment_crops), epsilon=s.epsilon,
                   sinkhorn_iterations=s.sinkhorn_iterations,
                   sinkhorn_dtype=torch.float64 if s.sinkhorn_fp64 else torch.float32, temperature=s.temperature,
                   autocast_dtype=autocast_dtype,
                   freeze_prototype_steps=round(s.freeze_prototypes_epochs * steps_per_epoch),
                   queue_start_step=s.queue_start_epoch * steps_per_epoch)


@dataclass(eq=False)
class TrainState:
    """Everything a training step reads and changes. ``state_dict()`` + the config is the checkpoint.

    ``model`` is what the forward runs (``core`` itself, or DistributedDataParallel around it); ``core``
    is the SwAVModel whose weights are saved. The torch RNG (CPU and this process's GPU) is part of the
    state: ``state_dict`` saves it and ``load_state_dict`` restores it.
    """
    core: SwAVModel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    queue: FeatureQueue | None = None
    collapse: CollapseMonitor | None = None  # None: a monitor with the default patience
    model: torch.nn.Module | None = None  # None: ``core``
    lr_schedule: LRSchedule | None = None  # saved with the state: a resume continues the same curve
    budget: BudgetPlan | None = None  # train.budget_minutes: the plan, saved with the state
    epsilon: float = math.nan  # Sinkhorn's epsilon now (swavkit.training.collapse moves it); NaN: settings.epsilon
    queue_dropped_at_step: int = -1  # >= 0: swavkit.training.collapse stopped the queue at that step (-1: in use)
    queue_near_ln_k_windows: int = 0  # logging windows in a row at ln K with the queue in use (the guard's count)
    step: int = 0  # optimiser steps taken or dropped so far (the schedule's clock)
    nonfinite_skipped: int = 0  # steps refused for a non-finite loss or gradient
    last_loss: float = math.nan  # mean loss of the last logging window
    skipped_files: set[str] = field(default_factory=set)  # unreadable files met so far
    sharded: bool = False  # dist.strategy=fsdp: core holds FSDP shards (swavkit.training.sharding)
    deepcluster: DeepClusterState | None = None  # method=deepclusterv2: memory bank and the epoch's targets
    # scratch reused by every step (not state): BN buffers and their backup, Sinkhorn outputs per crop
    _bn_buffers: list[torch.Tensor] = field(init=False, repr=False)
    _bn_backup: list[torch.Tensor] = field(init=False, repr=False)
    _code_buffers: dict[int, torch.Tensor] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self):
        if self.model is None:
            self.model = self.core
        if self.collapse is None:
            self.collapse = CollapseMonitor(self.core.n_prototypes)
        self._bn_buffers = list(self.core.buffers())
        self._bn_backup = [b.detach().clone() for b in self._bn_buffers]

    @property
    def device(self) -> torch.device:
        return self.core.prototypes.weight.device

    def keep_bn_statistics(self) -> None:
        """Copy the BN running statistics (and any other buffer), which change during a training forward."""
        if self._bn_buffers:
            torch._foreach_copy_(self._bn_backup, self._bn_buffers)

    def restore_bn_statistics(self) -> None:
        """Undo the forward's changes to the buffers since ``keep_bn_statistics``."""
        if self._bn_buffers:
            torch._foreach_copy_(self._bn_buffers, self._bn_backup)

    def state_dict(self, weights: bool = True) -> dict:
        """The training checkpoint without its config (format ``swavkit-train-v1``); ``weights=False`` leaves out
        ``model`` and ``optimizer`` (an FSDP run saves them as shards: swavkit.artifacts.sharded_checkpoint).

        Collective in a multi-process run: every rank must call it, each contributes its queue and RNG
        (``per_rank``), and every rank gets the whole dict.
        """
        device = self.device
        mine = {**capture_rng_state(device),  # rng_cpu, rng_cuda
                "queue": {k: v.cpu() for k, v in self.queue.state_dict().items()} if self.queue is not None else None,
                **({"deepcluster_bank": self.deepcluster.per_rank_state_dict()} if self.deepcluster is not None else {})}
        per_rank = distributed.all_gather_objects(mine)
        return {"format": CHECKPOINT_FORMAT, "step": self.step,
                **({"model": self.core.state_dict(), "optimizer": self.optimizer.state_dict()} if weights else {}),
                "scaler": self.scaler.state_dict(), "per_rank": per_rank,
                "collapse": self.collapse.state_dict(), "nonfinite_skipped": self.nonfinite_skipped,
                "last_loss": self.last_loss, "skipped_files": sorted(self.skipped_files), "epsilon": self.epsilon,
                "queue_dropped_at_step": self.queue_dropped_at_step,
                "queue_near_ln_k_windows": self.queue_near_ln_k_windows,
                **({"lr_schedule": self.lr_schedule.state_dict()} if self.lr_schedule is not None else {}),
                **({"budget": self.budget.state_dict()} if self.budget is not None else {}),
                **({"deepcluster": self.deepcluster.shared_state_dict()} if self.deepcluster is not None else {})}

    def load_state_dict(self, state: dict) -> list[str]:
        """Restore a checkpoint dict (as ``state_dict`` or ``load_training_checkpoint`` gives it).

        A run resumed with another number of processes takes rank 0's RNG and starts with an empty
        queue. Returns notes for the user about what could not be restored as saved.
        """
        if "model" in state:  # else a sharded checkpoint, loaded by swavkit.artifacts.sharded_checkpoint
            self.core.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.nonfinite_skipped = int(state["step"]), int(state.get("nonfinite_skipped", 0))
        self.last_loss = float(state.get("last_loss", math.nan))
        self.epsilon = float(state.get("epsilon", math.nan))
        self.queue_dropped_at_step = int(state.get("queue_dropped_at_step", -1))
        self.queue_near_ln_k_windows = int(state.get("queue_near_ln_k_windows", 0))
        self.collapse.load_state_dict(state.get("collapse", {}))
        self.skipped_files = set(state.get("skipped_files", []))
        if self.lr_schedule is not None and "lr_schedule" in state:  # older checkpoints: the one built now
            self.lr_schedule.load_state_dict(state["lr_schedule"])
        if self.budget is not None and "budget" in state:  # a run that had no budget starts planning now
            self.budget.load_state_dict(state["budget"])
        per_rank, world = state["per_rank"], distributed.world_size()
        mine = per_rank[distributed.rank()] if len(per_rank) == world else per_rank[0]
        restore_rng_state(mine, self.device)
        notes = []
        if self.queue is not None and mine.get("queue") is not None:
            if len(per_rank) == world:
                self.queue.load_state_dict(mine["queue"])
            else:
                notes.append(f"the queue was saved by {len(per_rank)} process(es), now {world}: it refills")
        if self.deepcluster is not None and "deepcluster" in state:
            self.deepcluster.load_shared_state_dict(state["deepcluster"])
            if len(per_rank) == world:
                self.deepcluster.load_per_rank_state_dict(mine["deepcluster_bank"])
            else:
                notes.append(f"the memory bank was saved by {len(per_rank)} process(es), now {world}: a full pass "
                             "fills it again (the epoch's targets are kept)")
        return notes


# ----------------------------------------------------------------------------------------------------
# the step

class Forward(NamedTuple):
    loss: torch.Tensor  # 0-d fp32 swapped-prediction loss, with its graph
    embeddings: torch.Tensor  # [V, B, D] fp32 unit embeddings, detached (what the queue stores)
    codes: dict[int, torch.Tensor]  # {assignment crop i: Q_i [B, K]}


@dataclass
class StepResult:
    """What one ``train_step`` did. Tensors stay on the device: reading them is a host sync."""
    step: int  # index of the step that ran (state.step before it)
    loss: torch.Tensor  # 0-d fp32, detached: this rank's loss
    codes: torch.Tensor  # [B, K] codes of the first assignment crop (for the prototype-usage statistics)
    queue_started: bool  # past settings.queue_start_step (the queue is fed when applied, used once full)
    applied: bool  # False: refused; nothing of the step reached the weights or the BN statistics
    nonfinite_loss: bool = False  # refused because this rank's loss was NaN/inf
    nonfinite_parameter: str | None = None  # refused with a finite loss: the first non-finite gradient

    @property
    def nonfinite(self) -> str:
        """What was non-finite, for messages: "loss" or "gradient (<parameter>)"."""
        return "loss" if self.nonfinite_loss else f"gradient ({self.nonfinite_parameter})"


def forward_loss(state: TrainState, crops: list[torch.Tensor], settings: StepSettings,
                 use_queue: bool = False, indices: torch.Tensor | None = None) -> Forward:
    """Stages 7b-7e: projected prototypes, grouped forward under autocast, codes (fp32 Sinkhorn, with the
    queue once full when ``use_queue``), swapped-prediction loss. Keeps a copy of the BN statistics first.
    method=deepclusterv2 (``state.deepcluster``): the epoch's hard targets of ``indices`` instead of codes.

    crops: V tensors [B, 3, s_v, s_v] on the model's device, large crops first.
    indices: [B] int64 dataset indices of the images (deepclusterv2 only).
    """
    core = state.core
    if state.deepcluster is None:  # deepclusterv2's prototypes are k-means centroids, unit rows already
        core.prototypes.normalize_()  # projected gradient: scores stay cosines
    state.keep_bn_statistics()  # a refused step must leave no trace in the running statistics
    V, B, K = len(crops), crops[0].shape[0], core.n_prototypes
    dtype = settings.autocast_dtype
    with torch.autocast(state.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        z, scores = state.model(crops)
    scores = scores.float().view(V, B, K)
    z = z.detach().float().view(V, B, -1)
    if state.deepcluster is not None:
        return _deepcluster_forward(state.deepcluster, scores, z, indices, settings)
    codes = _batch_codes(state, scores, settings, use_queue)
    return Forward(swapped_prediction_loss(scores, codes, settings.temperature), z, codes)


def _batch_codes(state: TrainState, scores: torch.Tensor, settings: StepSettings,
                 use_queue: bool) -> dict[int, torch.Tensor]:
    """scores [V, B, K] -> {assignment crop i: Q_i [B, K]}, into Sinkhorn buffers kept in ``state``."""
    _, B, K = scores.shape
    epsilon = settings.epsilon if math.isnan(state.epsilon) else state.epsilon
    codes = {}
    for j, i in enumerate(settings.assignment_crops):
        queued = state.queue.embeddings[j] if use_queue and state.queue.is_full else None
        rows = B + (queued.shape[0] if queued is not None else 0)
        out = state._code_buffers.get(j)
        if out is None or out.shape != (rows, K):  # first step, or the queue joined
            out = state._code_buffers[j] = torch.empty(rows, K, dtype=settings.sinkhorn_dtype, device=scores.device)
        codes[i] = assign_codes(scores[i], queued, state.core.prototypes.weight, epsilon,
                                settings.sinkhorn_iterations, settings.sinkhorn_dtype, out=out)
    return codes


def _deepcluster_forward(dc: DeepClusterState, scores: torch.Tensor, z: torch.Tensor, indices: torch.Tensor,
                         settings: StepSettings) -> Forward:
    """deepclusterv2's loss on scores [V, B, H*K] against the epoch's targets of ``indices`` [B]; its ``codes``
    are head 0's targets one-hot (rows of images without a target left out), for the usage statistics."""
    targets = dc.table.lookup(indices.cpu()).to(scores.device)  # [H, B]
    loss = deepcluster_loss(scores, targets, dc.centroid_counts, settings.temperature)
    head0 = targets[0][targets[0] >= 0]
    codes = torch.nn.functional.one_hot(head0, dc.centroid_counts[0]).float()
    if not len(codes):  # no image of the batch has a target: one empty row keeps the statistics finite
        codes = scores.new_zeros(1, dc.centroid_counts[0])
    return Forward(loss, z, {settings.assignment_crops[0]: codes})


def train_step(state: TrainState, crops: list[torch.Tensor], settings: StepSettings, lr: float,
               indices: torch.Tensor | None = None) -> StepResult:
    """One training step (train.py stages 7b-7f) on ``state``.

    Args:
        crops: V tensors [B, 3, s_v, s_v] on the model's device, large crops first.
        lr: this step's learning rate (``state.lr_schedule.lr(state.step)``).
        indices: [B] int64 dataset indices of the batch's images (method=deepclusterv2: its targets and the
            memory bank's ids; unused by SwAV).

    An applied step updates the weights, feeds the queue and advances ``state.step``. A refused step
    (non-finite loss or gradient; one host sync decides) restores the BN statistics, drops the
    gradients, counts ``state.nonfinite_skipped`` and leaves ``state.step`` as it was: the caller then
    stops (the state is the last good one) or drops the batch (``state.step += 1``).
    """
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    queue_started = (state.queue is not None and state.queue_dropped_at_step < 0
                     and state.step >= settings.queue_start_step)
    forward = forward_loss(state, crops, settings, use_queue=queue_started, indices=indices)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(forward.loss).backward()
    if state.step < settings.freeze_prototype_steps:
        state.core.prototypes.weight.grad = None
    if state.sharded:  # FSDP averaged the shards' gradients; the whole prototypes are averaged here
        sync_whole_gradients(state.core)
    result = StepResult(state.step, forward.loss.detach(), forward.codes[settings.assignment_crops[0]],
                        queue_started, applied=update_is_finite(state, forward.loss))
    if not result.applied:
        state.restore_bn_statistics()
        result.nonfinite_loss = not bool(torch.isfinite(result.loss))
        if not result.nonfinite_loss:
            result.nonfinite_parameter = nonfinite_gradient_name(state.core)
        state.optimizer.zero_grad(set_to_none=True)
        state.nonfinite_skipped += 1
        return result
    state.scaler.step(state.optimizer)
    state.scaler.update()
    if state.sharded:  # DDP starts every forward from rank 0's BN statistics: every rank keeps rank 0's here too
        broadcast_buffers(state.core)
    if queue_started:
        state.queue.push(forward.embeddings[list(settings.assignment_crops)])
    if state.deepcluster is not None:  # the reference: the bank takes the embeddings of the step just taken
        state.deepcluster.bank.write(indices, forward.embeddings[list(settings.assignment_crops)])
    state.step += 1
    return result


def update_is_finite(state: TrainState, loss: torch.Tensor) -> bool:
    """Whether the loss and (without a loss scaler) every gradient are finite; one host sync."""
    # With fp16 the GradScaler already skips steps with inf/NaN gradients (and lowers its scale).
    check_grads = not state.scaler.is_enabled()
    finite = torch.isfinite(loss.detach() + (gradient_norm_sum(state.core) if check_grads else 0.0))
    if (not check_grads or state.sharded) and distributed.world_size() > 1:  # FSDP: each rank checks its shards
        # Gradients are all-reduced, so their norm is the same on every rank, but the loss is not: with
        # fp16 only the loss is checked, so the ranks must agree on it. Otherwise the refusing rank skips
        # scaler.update(), the loss scales drift apart, and a TrainingDiverged on one rank leaves the
        # others waiting in the next all-reduce.
        finite = distributed.all_reduce_max((~finite).float()) == 0
    return bool(finite)


def gradient_norm_sum(module: torch.nn.Module) -> torch.Tensor:
    """Sum of the per-parameter gradient L2 norms (fp32 scalar, on the parameters' device): non-finite
    exactly when some gradient is, and also when one is so large (> ~1e19) that its square overflows -
    the kind of garbage a broken kernel returns. One fused pass, no host sync."""
    grads = [getattr(p.grad, "_local_tensor", p.grad) for p in module.parameters() if p.grad is not None]  # FSDP: shards
    if not grads:
        return torch.zeros(())
    return torch.stack(torch._foreach_norm(grads)).float().sum()


def nonfinite_gradient_name(module: torch.nn.Module) -> str:
    """Name of the first parameter whose gradient is non-finite (for the error message only)."""
    for name, p in module.named_parameters():
        if p.grad is not None and not bool(torch.isfinite(p.grad.float().norm())):
            return name
    return "unknown parameter"


__all__ = ["TrainState", "StepSettings", "StepResult", "Forward", "assign_codes", "forward_loss", "train_step",
           "update_is_finite", "gradient_norm_sum", "nonfinite_gradient_name"]
