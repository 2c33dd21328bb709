"""One supervised training loop: a linear head on a backbone ("trunk"), the trunk frozen (the reference linear
probe) or trained with it (fine-tuning).

Both callers get the same machinery:
- the feature size measured once (:func:`feature_dim_of`) and the head made in one place (:func:`linear_head`:
  N(0, 0.01) weights, zero bias, the SwAV / DINO evaluation heads);
- the data: each process reads its share of every epoch (:class:`swavkit.data.EpochSampler`), and each image's
  crop is seeded by (seed, epoch, image), whichever DataLoader worker reads it (:class:`SeededItems`);
- the LR of every parameter group from a ``swavkit.core.schedule`` schedule of the optimiser step;
- saves, stop signals and resume through :class:`swavkit.artifacts.checkpointer.Checkpointer`, so a run killed
  at any moment (kill -9 included) and run again continues from its last save and ends exactly where an
  uninterrupted run would;
- a non-finite loss handled as pretraining does: the last good state saved, ``TrainingDiverged`` (one line,
  exit 2);
- under torchrun, DistributedDataParallel around what is trained and the global batch split over the
  processes; the epoch's sums are all-reduced every step, so every process saves and reports the same numbers.

The checkpoint keeps the layout fine-tuning has always written (``swavkit-finetune-v1``: ``epoch`` done,
``part_epoch`` with the running sums and the RNG when saved inside an epoch), under the caller's format tag.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from swavkit.artifacts.checkpoint import CheckpointError
from swavkit.artifacts.checkpointer import Checkpointer
from swavkit.data import EpochSampler, ReadOrReport, collate_read_or_report, printable_path, raise_for_unreadable
from swavkit.errors import ConfigError, TrainingDiverged
from swavkit.runtime import distributed
from swavkit.runtime.rng import capture_rng_state, restore_rng_state
from swavkit.runtime.signals import StopRequest, StopRequested

EPOCH_SEED_STRIDE = 1_000_003  # each epoch's RNG (e.g. drop-path) is seeded by seed * stride + epoch


def feature_dim_of(trunk: torch.nn.Module, dataset, index: int, device: torch.device) -> int:
    """D of the trunk's pooled features [B, D], measured once by a forward pass (eval mode, no gradients) of
    ``dataset[index]``'s image [C, H, W] (any item: the shape is what counts); the trunk's mode is left as it was."""
    with torch.random.fork_rng(devices=[]):  # an augmenting transform must not move the caller's RNG
        image = dataset[index][0]
    was_training = trunk.training
    with torch.no_grad():
        dim = int(trunk.eval()(torch.zeros((1, *image.shape), device=device)).shape[1])
    trunk.train(was_training)
    return dim


def linear_head(feature_dim: int, n_classes: int) -> torch.nn.Linear:
    """``Linear(D, classes)`` with weights N(0, 0.01) and zero bias (drawn from the caller's RNG)."""
    head = torch.nn.Linear(feature_dim, n_classes)
    torch.nn.init.normal_(head.weight, std=0.01)
    torch.nn.init.zeros_(head.bias)
    return head


class SeededItems:
    """``items[(i, seed)]`` -> ``dataset[indices[i]]`` with the augmentation RNG seeded by ``seed``: the crops an
    image gets depend on (seed, epoch, image) only, not on the worker that reads it or on a resume."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        position, seed = key
        if torch.utils.data.get_worker_info() is not None:  # a worker's RNG is its own
            torch.default_generator.manual_seed(seed)
            return self.dataset[self.indices[position]]
        with torch.random.fork_rng(devices=[]):  # in this process: leave the caller's RNG alone
            torch.default_generator.manual_seed(seed)
            return self.dataset[self.indices[position]]


@dataclass
class SupervisedRun:
    """One supervised training run: what is trained, on what, how, and where it is saved.

    ``optimizer``'s parameter groups carry a ``name`` (history rows get ``<name>_lr``); ``schedules`` gives
    each group's LR as a function of the optimiser step (swavkit.core.schedule). ``batch_size`` is global.
    """
    trunk: torch.nn.Module
    head: torch.nn.Module
    train_trunk: bool  # False: the trunk is frozen (eval mode, no gradients), only the head learns
    dataset: object  # labelled items (image [3, s, s], label) with the augmenting transform
    indices: list[int]  # the items of ``dataset`` that are trained on
    epochs: int
    batch_size: int
    seed: int
    optimizer: torch.optim.Optimizer
    schedules: list  # one per parameter group: .lr(step)
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None = fp32
    scaler: torch.amp.GradScaler
    num_workers: int = 0
    checkpoint: Path | None = None  # None: nothing saved, no resume
    format_tag: str = ""
    every_minutes: float = 10.0
    setup: dict | None = None  # saved with the checkpoint; a resume with another setup is refused
    stop_request: StopRequest | None = None
    stop_after_epochs: int | None = None  # stop (resumable, saved) after this many epochs of this call
    description: str = "train"
    progress: bool = True
    lr_hint: str = "lower the learning rate"  # the option a diverged run should change
    remedy: str = "delete it to start over"  # what to do with a checkpoint that is not this run's

    @property
    def steps_per_epoch(self) -> int:
        return len(self.indices) // self.batch_size  # the last partial batch is dropped


class SupervisedState:
    """What the loop changes: the trained module's weights, the optimiser, the loss scale, the step, the
    per-epoch history and the running sums of the epoch in progress. ``state_dict()`` is the checkpoint."""

    def __init__(self, run: SupervisedRun, trained: torch.nn.Module):
        self.run, self.trained = run, trained  # trained: trunk + head, or the head alone (frozen trunk)
        self.step = 0
        self.history: list[dict] = []
        self.sums = _fresh_sums()
        self.pending_rng: dict | None = None  # a resumed part epoch's RNG, set once its batches are open

    def state_dict(self) -> dict:
        epoch, batches = divmod(self.step, self.run.steps_per_epoch)
        state = {"epoch": epoch, "model": self.trained.state_dict(), "optimizer": self.run.optimizer.state_dict(),
                 "history": list(self.history)}
        if self.run.scaler.is_enabled():  # fp16 only: its loss scale
            state["scaler"] = self.run.scaler.state_dict()
        if batches:
            state["part_epoch"] = {**self.sums, "batches": batches, "rng": capture_rng_state(self.run.device)}
        return state

    def load_state_dict(self, saved: dict) -> list[str]:
        self.trained.load_state_dict(saved["model"])
        self.run.optimizer.load_state_dict(saved["optimizer"])
        if self.run.scaler.is_enabled() and "scaler" in saved:  # saved at fp16 and resumed at fp16
            self.run.scaler.load_state_dict(saved["scaler"])
        self.history = list(saved["history"])
        part = dict(saved.get("part_epoch") or {})
        self.step = int(saved["epoch"]) * self.run.steps_per_epoch + int(part.get("batches", 0))
        if part:
            rng = part.pop("rng")  # written as {"cpu", "cuda"} before swavkit.runtime.rng
            self.pending_rng = {"rng_cpu": rng["cpu"], "rng_cuda": rng["cuda"]} if "cpu" in rng else rng
            self.sums = {key: part[key] for key in _fresh_sums()}
        return []


def _fresh_sums() -> dict:
    return {"batches": 0, "loss_sum": 0.0, "correct": 0, "seen": 0}


def train_supervised(run: SupervisedRun) -> dict:
    """Train ``run`` to its last epoch, resuming from ``run.checkpoint`` when it holds a save.

    Returns {"history": [per-epoch rows], "resumed_from_epoch", "completed", "steps"}; ``completed`` is False
    when ``stop_after_epochs`` ended this call (saved). A caught SIGTERM / SIGINT saves after the current
    batch and raises StopRequested (exit 3): the same call again resumes there.

    Raises:
        TrainingDiverged: the loss became non-finite (the last good state is saved).
    """
    trained = torch.nn.Sequential(run.trunk, run.head) if run.train_trunk else run.head
    trained.to(run.device)
    run.trunk.to(run.device)
    state = SupervisedState(run, trained)
    checkpointer = _checkpointer(run, state)
    if checkpointer is not None:
        saved = checkpointer.read("checkpoint for this run", run.remedy)
        if saved is not None:
            _check_setup(run, saved)
            checkpointer.restore(saved)
            checkpointer.saved_step = state.step
    spe, resumed_from_epoch = run.steps_per_epoch, state.step // run.steps_per_epoch
    stop_at_epoch = run.epochs if run.stop_after_epochs is None else min(run.epochs,
                                                                          resumed_from_epoch + run.stop_after_epochs)
    if checkpointer is not None and stop_at_epoch < run.epochs:
        checkpointer.stop_after_steps = stop_at_epoch * spe
    model = distributed.wrap_ddp(trained, run.device)
    loader, sampler = _loader(run)
    bar = tqdm(total=run.epochs, initial=resumed_from_epoch, desc=run.description, unit="epoch",
               disable=not (run.progress and distributed.is_main_process()), dynamic_ncols=True)
    with run.stop_request.deferred() if run.stop_request is not None else contextlib.nullcontext():
        while state.step < stop_at_epoch * spe:
            epoch, position = divmod(state.step, spe)
            if position == 0:
                torch.manual_seed(run.seed * EPOCH_SEED_STRIDE + epoch)  # e.g. drop-path: the same after a resume
            sampler.set_epoch(epoch, start=position * (run.batch_size // distributed.world_size()))
            batches = iter(loader)
            if state.pending_rng is not None:  # after the loader drew its seed, as the uninterrupted run did
                restore_rng_state(state.pending_rng, run.device)
                state.pending_rng = None
            if _train_epoch(run, state, model, batches, checkpointer, bar):
                break
    bar.close()
    if checkpointer is not None and checkpointer.saved_step != state.step:
        checkpointer.save(state.step)
    completed = state.step >= run.epochs * spe
    return {"history": state.history, "resumed_from_epoch": resumed_from_epoch, "completed": completed,
            "steps": run.epochs * spe}


def _checkpointer(run: SupervisedRun, state: SupervisedState) -> Checkpointer | None:
    if run.checkpoint is None:
        return None
    return Checkpointer(run.checkpoint, run.format_tag, state, every_minutes=run.every_minutes,
                        stop_request=run.stop_request, device=run.device,
                        extra=(lambda: {"setup": run.setup}) if run.setup is not None else None)


def _check_setup(run: SupervisedRun, saved: dict) -> None:
    if run.setup is None or saved.get("setup") == run.setup:
        return
    there = saved.get("setup") or {}
    changed = sorted(key for key in set(there) | set(run.setup) if there.get(key) != run.setup.get(key))
    details = "; ".join(f"{key}: {there.get(key)!r} there, {run.setup.get(key)!r} now" for key in changed[:3])
    raise CheckpointError(f"{printable_path(run.checkpoint)} holds a run of another setup ({details}); "
                          f"{run.remedy}")


def _loader(run: SupervisedRun) -> tuple[DataLoader, EpochSampler]:
    """(loader, sampler) over this process's share of the labelled items; ``sampler.set_epoch(e, start=n)`` gives
    epoch e's order from its n-th sample on. One loader for the whole run (persistent workers): a small label
    set makes many one-step epochs."""
    world = distributed.world_size()
    if run.batch_size % world:
        raise ConfigError(f"batch_size {run.batch_size} does not divide by {world} processes")
    if run.steps_per_epoch == 0:
        raise ConfigError(f"batch_size {run.batch_size} is larger than the {len(run.indices)} training images")
    sampler = EpochSampler(len(run.indices), rank=distributed.rank(), world_size=world, seed=run.seed)
    loader = DataLoader(ReadOrReport(SeededItems(run.dataset, run.indices)), batch_size=run.batch_size // world,
                        sampler=sampler, drop_last=True, num_workers=run.num_workers,
                        collate_fn=collate_read_or_report, pin_memory=run.device.type == "cuda",
                        persistent_workers=run.num_workers > 0)
    return loader, sampler


def _train_epoch(run: SupervisedRun, state: SupervisedState, model, batches, checkpointer: Checkpointer | None,
                 bar) -> bool:
    """The steps of the current epoch from ``state.step`` on; True when the run must stop now (saved)."""
    spe = run.steps_per_epoch
    for _, images, labels, unreadable in batches:
        raise_for_unreadable(unreadable)
        for group, schedule in zip(run.optimizer.param_groups, run.schedules):
            group["lr"] = schedule.lr(state.step)
        batch = _step(run, model, images.to(run.device, non_blocking=True), labels.to(run.device, non_blocking=True))
        if batch is None:
            _diverged(run, state, checkpointer)
        state.step += 1
        state.sums = {"batches": state.sums["batches"] + 1, **{k: state.sums[k] + v for k, v in batch.items()}}
        if state.step % spe == 0:  # the epoch's row, then fresh sums
            _end_epoch(run, state, bar)
        if checkpointer is not None and checkpointer.maybe_save(state.step):
            if checkpointer.signal_name is None:
                return True  # stop_after_epochs
            bar.close()
            epoch, done = divmod(state.step, spe)
            where = f"the end of epoch {epoch}" if done == 0 else f"epoch {epoch + 1}, batch {done}/{spe}"
            raise StopRequested(f"stopped by {checkpointer.signal_name} at {where}; saved to "
                                f"{printable_path(checkpointer.path)}: run the same command again to resume")
        if state.step % spe == 0:
            return False
    return False


def _step(run: SupervisedRun, model, images: torch.Tensor, labels: torch.Tensor) -> dict | None:
    """One optimiser step on a batch (images [B, 3, s, s], labels [B]); the batch's global sums {"loss_sum",
    "correct", "seen"}, or None (nothing changed) when the loss is not finite on some process."""
    autocast = torch.autocast(run.device.type, dtype=run.dtype or torch.float32, enabled=run.dtype is not None)
    if run.train_trunk:
        model.train()
        with autocast:
            logits = model(images)
    else:
        run.trunk.eval()  # frozen: BN uses its running statistics, no parameter is updated
        with torch.no_grad(), autocast:
            features = run.trunk(images)
        model.train()
        logits = model(features.float())
    loss = F.cross_entropy(logits.float(), labels)
    local = torch.stack([loss.detach() * len(labels), (logits.argmax(1) == labels).sum().float(),
                         torch.tensor(float(len(labels)), device=loss.device),
                         (~torch.isfinite(loss.detach())).float()])
    totals = distributed.all_reduce_sum(local) if distributed.world_size() > 1 else local
    loss_sum, correct, seen, nonfinite = totals.tolist()
    if nonfinite:
        return None
    run.optimizer.zero_grad(set_to_none=True)
    # fp16 gradients underflow without loss scaling; a disabled scaler is a plain backward + step
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return {"loss_sum": loss_sum, "correct": int(correct), "seen": int(seen)}


def _end_epoch(run: SupervisedRun, state: SupervisedState, bar) -> None:
    sums = state.sums
    row = {"epoch": state.step // run.steps_per_epoch,
           "train_loss": round(sums["loss_sum"] / max(1, sums["seen"]), 4),
           "train_top1": round(100.0 * sums["correct"] / max(1, sums["seen"]), 4),
           **{f"{group.get('name', i)}_lr": group["lr"] for i, group in enumerate(run.optimizer.param_groups)}}
    state.history.append(row)
    state.sums = _fresh_sums()
    bar.update(1)
    bar.set_postfix(loss=f"{row['train_loss']:.3f}", train_top1=f"{row['train_top1']:.1f}")


def _diverged(run: SupervisedRun, state: SupervisedState, checkpointer: Checkpointer | None) -> None:
    """A non-finite loss: save the last good state (nothing was changed by this batch) and stop in one line."""
    epoch = state.step // run.steps_per_epoch + 1
    saved = "nothing is saved (no checkpoint for this run)"
    if checkpointer is not None:
        checkpointer.save(state.step)
        saved = f"the last good state is saved in {printable_path(checkpointer.path)}"
    raise TrainingDiverged(f"{run.description}: non-finite training loss at step {state.step} (epoch {epoch}); "
                           f"{saved}. {run.lr_hint[:1].upper()}{run.lr_hint[1:]}")


__all__ = ["SupervisedRun", "SupervisedState", "SeededItems", "feature_dim_of", "linear_head", "train_supervised"]
