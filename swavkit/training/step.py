"""One SwAV training step as a function of explicit state.

``TrainState`` holds everything a step reads and changes: model, optimiser, loss scaler, queue, collapse
monitor and counters; ``TrainState.state_dict()`` plus the config is the training checkpoint.
``train_step(state, crops, settings, lr)`` is one step (stages 7b-7f of ``swavkit.training.trainer``): projected
prototypes, grouped forward, codes, swapped-prediction loss, backward, and an update that is applied only
when the loss and every gradient are finite. ``assign_codes`` is the pure maths of the codes. With
``train.accumulate_steps`` > 1, ``accumulated_train_step`` takes that optimiser step over micro-batches whose
codes come from one Sinkhorn over the whole batch.

Data flow of a step: crops [B, 3, s, s] x V -> SwAVModel -> scores [V, B, K] -> assign_codes (Sinkhorn,
with the queue once full) -> codes Q_i [B, K] -> swapped_prediction_loss -> backward -> optimiser.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from swavkit.core.schedule import LRSchedule, steps_of
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
    sinkhorn_iterations: int = 3
    sinkhorn_dtype: torch.dtype = torch.float32
    temperature: float = 0.1
    autocast_dtype: torch.dtype | None = None  # None: no autocast (fp32)
    freeze_prototype_steps: int = 0  # the prototypes get no gradient while state.step is below this
    queue_start_step: int = 0  # the queue is fed (and used once full) from this step on
    accumulate_steps: int = 1  # micro-batches per optimiser step (train.accumulate_steps; accumulated_train_step)

    @classmethod
    def from_config(cls, cfg: Config, steps_per_epoch: int, autocast_dtype: torch.dtype | None) -> "StepSettings":
        s = cfg.swav
        return cls(assignment_crops=tuple(s.assignment_crops), sinkhorn_iterations=s.sinkhorn_iterations,
                   sinkhorn_dtype=torch.float64 if s.sinkhorn_fp64 else torch.float32, temperature=s.temperature,
                   autocast_dtype=autocast_dtype,
                   freeze_prototype_steps=steps_of(s.freeze_prototypes_epochs, s.freeze_prototypes_steps, steps_per_epoch),
                   queue_start_step=s.queue_start_epoch * steps_per_epoch,
                   accumulate_steps=cfg.train.accumulate_steps)


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
    # Sinkhorn's epsilon now, its one holder: swav.epsilon at the start (the trainer passes it; this default is
    # the config's), moved by swavkit.training.collapse when swav.prevent_collapse is on
    epsilon: float = 0.05
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
        saved_epsilon = float(state.get("epsilon", math.nan))
        if math.isfinite(saved_epsilon):  # older checkpoints saved NaN (or nothing) for "swav.epsilon": kept
            self.epsilon = saved_epsilon
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
    codes = {}
    for j, i in enumerate(settings.assignment_crops):
        queued = state.queue.embeddings[j] if use_queue and state.queue.is_full else None
        rows = B + (queued.shape[0] if queued is not None else 0)
        out = state._code_buffers.get(j)
        if out is None or out.shape != (rows, K):  # first step, or the queue joined
            out = state._code_buffers[j] = torch.empty(rows, K, dtype=settings.sinkhorn_dtype, device=scores.device)
        codes[i] = assign_codes(scores[i], queued, state.core.prototypes.weight, state.epsilon,
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
    if settings.accumulate_steps > 1:  # train.accumulate_steps: one Sinkhorn over all micro-batches
        return accumulated_train_step(state, crops, settings, lr)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    queue_started = queue_in_step(state, settings)
    forward = forward_loss(state, crops, settings, use_queue=queue_started, indices=indices)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(forward.loss).backward()
    if state.step < settings.freeze_prototype_steps:
        state.core.prototypes.weight.grad = None
    if state.sharded:  # FSDP averaged the shards' gradients; the whole prototypes are averaged here
        sync_whole_gradients(state.core)
    result = StepResult(state.step, forward.loss.detach(), forward.codes[settings.assignment_crops[0]],
                        queue_started, applied=update_is_finite(state, forward.loss))
    return finish_step(state, result, forward.embeddings[list(settings.assignment_crops)], indices)


def finish_step(state: TrainState, result: StepResult, queue_embeddings: torch.Tensor,
                indices: torch.Tensor | None = None) -> StepResult:
    """The end of a step whose gradients are in place: a refused step (``result.applied`` False) restores the
    BN statistics, drops the gradients and is counted; an applied one updates the weights, feeds the queue
    with ``queue_embeddings`` [n_assignment_crops, B, D] (once ``result.queue_started``; under deepclusterv2 they
    also refresh the memory bank rows of ``indices`` [B]) and advances ``state.step``."""
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
    if result.queue_started:
        state.queue.push(queue_embeddings)
    if state.deepcluster is not None:  # the reference: the bank takes the embeddings of the step just taken
        state.deepcluster.bank.write(indices, queue_embeddings)
    state.step += 1
    return result


def queue_in_step(state: TrainState, settings: StepSettings) -> bool:
    """Whether this step feeds the queue (and uses it once full): there is one, the collapse policy has not
    dropped it, and ``state.step`` (optimiser steps) has reached ``settings.queue_start_step``."""
    return (state.queue is not None and state.queue_dropped_at_step < 0
            and state.step >= settings.queue_start_step)


# ----------------------------------------------------------------------------------------------------
# the step over micro-batches (train.accumulate_steps)
#
# Plain gradient accumulation would run Sinkhorn on each micro-batch, so its equal-partition constraint
# would act on B / A samples instead of B: the codes of a small micro-batch are the codes of a small batch,
# and SwAV trained that way stalls like a small-batch run (facebookresearch/swav #12). Here the codes come
# first, from a forward pass without gradients over every micro-batch, with ONE Sinkhorn over the whole
# per-rank batch (and the queue; its sums are all-reduced over all ranks' whole batches), and each
# micro-batch's gradient pass then predicts its slice of those codes.

def split_micro_batches(crops: list[torch.Tensor], n: int) -> list[list[torch.Tensor]]:
    """V crop tensors [B, ...] -> n micro-batches of V tensors [B / n, ...] (views, in batch order)."""
    B = crops[0].shape[0]
    if B % n:
        raise ValueError(f"a batch of {B} does not split into {n} equal micro-batches")
    return [list(group) for group in zip(*(c.chunk(n) for c in crops))]


@torch.no_grad()
def micro_batch_scores(state: TrainState, micro: list[list[torch.Tensor]], settings: StepSettings
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The no-gradient pass: every micro-batch through the model in train mode -> (embeddings
    [n_assignment_crops, B, D], scores [n_assignment_crops, B, K]), fp32, batch order.

    Train mode, so BatchNorm normalises with the micro-batch's statistics exactly as the gradient pass will
    (same weights, same micro-batches), and the scores are the ones the gradient pass computes. The running
    statistics this pass would update are restored afterwards: only the gradient pass moves them.
    """
    crops_i = list(settings.assignment_crops)
    state.keep_bn_statistics()
    z_parts, score_parts = [], []
    dtype = settings.autocast_dtype
    for crops in micro:
        V, b = len(crops), crops[0].shape[0]
        with torch.autocast(state.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            # ``core``, not DDP around it: DDP's forward would prepare its reducer for a backward that never
            # comes; the buffers it would broadcast do not enter a train-mode forward (FSDP: core is the module)
            z, scores = state.core(crops)
        z_parts.append(z.float().view(V, b, -1)[crops_i])
        score_parts.append(scores.float().view(V, b, -1)[crops_i])
    state.restore_bn_statistics()
    return torch.cat(z_parts, dim=1), torch.cat(score_parts, dim=1)


def accumulated_train_step(state: TrainState, crops: list[torch.Tensor], settings: StepSettings,
                           lr: float) -> StepResult:
    """One optimiser step over ``settings.accumulate_steps`` (A) micro-batches of this rank's batch: the same
    update as :func:`train_step` on the whole batch wherever no layer couples the samples of a batch
    (GroupNorm/LayerNorm backbones); with BatchNorm, its statistics are those of a micro-batch.

    crops: V tensors [B, 3, s_v, s_v] (B divisible by A). Cost: one extra forward pass without gradients
    over the batch (benchmarks/README.md). The RNG is replayed for the gradient pass, so stochastic layers
    (dropout, drop-path) draw the same masks in both passes. Under DDP only the last micro-batch's backward
    all-reduces the gradients (no_sync); under FSDP likewise (set_requires_gradient_sync).
    """
    A = settings.accumulate_steps
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    queue_started = queue_in_step(state, settings)
    state.core.prototypes.normalize_()  # projected gradient: scores stay cosines
    micro = split_micro_batches(crops, A)
    rng = capture_rng_state(state.device)
    embeddings, assignment_scores = micro_batch_scores(state, micro, settings)  # keeps the BN backup too
    # _batch_codes reads scores[i] for each assignment crop i: here they are rows 0..n-1 of ``assignment_scores``
    positions = tuple(range(len(settings.assignment_crops)))
    by_position = _batch_codes(state, assignment_scores, dataclasses.replace(settings, assignment_crops=positions),
                               use_queue=queue_started)
    codes = {i: by_position[j] for j, i in enumerate(settings.assignment_crops)}  # {crop i: Q_i [B, K]}
    restore_rng_state(rng, state.device)  # the gradient pass draws the masks the scores were computed with
    state.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=state.device)
    b = crops[0].shape[0] // A
    for m, micro_crops in enumerate(micro):
        with gradient_sync(state.model, enabled=m == A - 1):
            loss = _micro_batch_loss(state, micro_crops, {i: q[m * b:(m + 1) * b] for i, q in codes.items()},
                                     settings)
            # each micro-batch loss is a mean over b = B / A samples: / A makes the sum the batch's mean
            state.scaler.scale(loss / A).backward()
        loss_sum += loss.detach()
    mean_loss = loss_sum / A
    if state.step < settings.freeze_prototype_steps:
        state.core.prototypes.weight.grad = None
    if state.sharded:
        sync_whole_gradients(state.core)
    result = StepResult(state.step, mean_loss, codes[settings.assignment_crops[0]], queue_started,
                        applied=update_is_finite(state, mean_loss))
    return finish_step(state, result, embeddings)


def _micro_batch_loss(state: TrainState, crops: list[torch.Tensor], codes: dict[int, torch.Tensor],
                      settings: StepSettings) -> torch.Tensor:
    """The gradient pass of one micro-batch: grouped forward under autocast -> swapped-prediction loss
    against ``codes`` {crop i: Q_i [b, K]} (a slice of the whole batch's codes); 0-d fp32 with its graph."""
    V, b = len(crops), crops[0].shape[0]
    dtype = settings.autocast_dtype
    with torch.autocast(state.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        _, scores = state.model(crops)
    return swapped_prediction_loss(scores.float().view(V, b, -1), codes, settings.temperature)


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool):
    """Inside: the backward passes all-reduce (DDP) or reduce-scatter (FSDP2) the gradients only when
    ``enabled``; otherwise they accumulate locally, to be synchronised with the next enabled backward.
    A no-op in a one-process run."""
    if enabled:
        yield
    elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2's fully_shard module
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


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
           "finish_step", "queue_in_step", "accumulated_train_step", "split_micro_batches", "micro_batch_scores",
           "gradient_sync", "update_is_finite", "gradient_norm_sum", "nonfinite_gradient_name"]
