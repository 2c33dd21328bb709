"""Fine-tuning with few labels: the whole backbone plus a linear head, the SwAV paper's semi-supervised
protocol (1 % and 10 % of the labels), with the same fine-tune from random init beside it as the floor.

Protocol (facebookresearch/swav ``eval_semisup.py`` and its README, adopted here):
- labelled subset: a stratified, seeded part of the train folder (the reference uses SimCLR's fixed 1 %
  and 10 % ImageNet lists; here any folder, so the list is drawn and written next to the result);
- model: the backbone (pooled features [B, D]) + ``Linear(D, classes)``, everything trained, BN in train
  mode;
- optimiser: SGD momentum 0.9, no weight decay, two LR groups: trunk 0.01 / head 0.2 (the reference's
  10 % pair, at a global batch of 256; scaled linearly to the batch used here);
- schedule: 20 epochs, LR x 0.2 at epochs 12 and 16 (60 % and 80 % of the run, kept as fractions when
  the epoch count changes);
- augmentation: RandomResizedCrop(scale=(0.08, 1)) + horizontal flip; evaluation: resize + centre crop.
Deviations, for small data on a CPU: the batch is 64 (no larger than the labelled set), the LRs follow it
linearly, and when 20 epochs of a small labelled set would make fewer than ``min_steps`` optimiser steps
the epoch count is raised to reach them (the decay epochs move with it). The reference's 1 % pair (trunk
0.02 / head 5) is not the default: on 50 CIFAR-10 images at 32 px (a resnet10t after 20 SwAV epochs on
cifar10-small, 100 fine-tuning epochs, its 1,000 val images) its head LR (0.98 at batch 50) kept the training
loss jumping between 3 and 6 and the fine-tune scored no better than random init (19.2 vs 18.9 %), where
the 10 % pair gave 25.5 vs 19.6 % on the same labelled files; pass ``--trunk-lr 0.02 --head-lr 5`` to
run it. The reference prints the best val accuracy over epochs; here val is evaluated once, after the
last epoch, and that number is reported.

A run lives in its own folder (``out_dir``): ``finetune.json`` (what was run), ``labels.txt`` (the labelled
files) and ``checkpoint.pt`` (weights, optimiser, epoch; written atomically every
``checkpoint_interval_s``, at the end, and after the current batch on SIGTERM / SIGINT, which then exits with
code 3 like ``pretrain``). Running the same command again resumes from what was saved, and the result equals
that of an uninterrupted run (each epoch's order is seeded by (seed, epoch) and
each image's crop by (seed, epoch, image), whichever DataLoader worker reads it). A folder that holds
anything else is refused, and ``restart`` deletes only those files (the rule of every run folder:
:class:`swavkit.artifacts.rundir.OwnedFolder`). A fine-tune runs in one process (the CPU or one GPU): under torchrun or
srun it stops with a LaunchError before anything is written. ``--precision fp16`` (GPU only) scales the loss
like pretraining does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from swavkit.config import ConfigError
from swavkit.data.names import path_from_printable, printable_path
from swavkit.errors import DataError
from swavkit.runtime.fileio import write_text_atomic
from swavkit.artifacts.identity import backbone_name
from swavkit.evaluation.baselines import BASELINE_KINDS, display_names, trained_size, verdict
from swavkit.evaluation.floors import floors_wanted
from swavkit.runtime.signals import StopRequest, StopRequested

# torch, torchvision, timm and the modules that import them (swavkit.artifacts.rundir, swavkit.runtime.rng, swavkit.runtime.distributed)
# load inside the functions, so that `swavkit --help` (which registers this command) stays instant.
if TYPE_CHECKING:  # annotations only
    import torch

    from swavkit.data import LabelledImageFolder
    from swavkit.artifacts.rundir import FinetuneFolder

DEFAULT_RUNS_DIR = "runs"
# Reference LRs at a global batch of 256 (SwAV README, eval_semisup.py): (trunk, head) per label budget.
# The default for every budget is the 10 % pair (module docstring: the 1 % pair's head LR diverged here).
REFERENCE_LRS = {"1%": (0.02, 5.0), "10%": (0.01, 0.2)}
DEFAULT_LRS = "10%"
REFERENCE_BATCH_SIZE = 256
REFERENCE_EPOCHS = 20
DECAY_AT = (0.6, 0.8)  # epochs 12 and 16 of 20
SUBSET_SALT = "swavkit-finetune-labels"


# ----------------------------------------------------------------------------------------------------
# the labelled subset

@dataclass(frozen=True)
class LabelSpec:
    """``--label-fraction``: a fraction of each class (0 < fraction <= 1) or a number of images per class."""
    text: str
    fraction: float | None = None
    per_class: int | None = None


def parse_label_spec(text: str | float) -> LabelSpec:
    """"0.1" | "10%" -> 10 % of each class; "10/class" -> 10 images of each class. ConfigError otherwise."""
    raw = str(text).strip()
    per_class = re.fullmatch(r"(\d+)\s*/\s*class", raw)
    if per_class:
        if int(per_class.group(1)) < 1:
            raise ConfigError(f"--label-fraction {raw}: give at least 1 image per class")
        return LabelSpec(raw, per_class=int(per_class.group(1)))
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"--label-fraction {raw!r}: expected a fraction 0 < f <= 1 (0.01, 0.1), a percentage "
                          "(1%, 10%) or images per class (10/class)")
    return LabelSpec(raw, fraction=value)


def _subset_key(seed: int, relative_path: str) -> bytes:
    # A hash of (seed, path inside the train folder): a file's rank does not depend on which other files
    # exist or where the folder lives, and the 1 % list is part of the 10 % list drawn with the same seed.
    return hashlib.sha256(f"{SUBSET_SALT}|{seed}|{relative_path}".encode("utf-8", "surrogateescape")).digest()


def relative_paths(dataset: LabelledImageFolder) -> list[str]:
    """Each image's path inside the train folder, with "/" separators."""
    return [os.path.relpath(path, dataset.root).replace(os.sep, "/") for path in dataset.paths]


def select_labelled(relative: list[str], labels: list[int], spec: LabelSpec, seed: int) -> list[int]:
    """Sorted indices of the labelled subset: per class, the ``round(fraction x n)`` (at least 1) or
    ``per_class`` (at most n) images with the smallest seeded hash of their relative path."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    chosen = []
    for members in by_class.values():
        wanted = spec.per_class if spec.per_class else max(1, round(spec.fraction * len(members)))
        ranked = sorted(members, key=lambda i: _subset_key(seed, relative[i]))
        chosen += ranked[:min(wanted, len(members))]
    return sorted(chosen)


def label_list_text(relative: list[str], indices: list[int]) -> str:
    """One relative path per line (printable form: a name with a newline stays on one line)."""
    return "".join(printable_path(relative[i]) + "\n" for i in indices)


def read_label_list(path: str | Path, relative: list[str]) -> list[int]:
    """The indices of the files a label list names; DataError naming the first one not in the train folder."""
    position = {name: i for i, name in enumerate(relative)}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"--labels-file {printable_path(path)}: cannot read it ({err.__class__.__name__})") from None
    indices = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        name = path_from_printable(line)
        if name not in position:
            raise DataError(f"--labels-file {printable_path(path)} line {number}: {line} is not an image of the "
                            "train folder; use the --train folder the list was written for")
        indices.append(position[name])
    if not indices:
        raise DataError(f"--labels-file {printable_path(path)}: lists no files")
    return sorted(set(indices))


# ----------------------------------------------------------------------------------------------------
# options and the recipe they resolve to

@dataclass
class FinetuneOptions:
    """Everything ``finetune`` takes besides the backbone and the folders; defaults are the protocol above.

    ``trunk_lr`` / ``head_lr`` / ``epochs`` None = the reference values (see :func:`resolve_recipe`); LRs are
    stated at a batch of 256 and scaled linearly to ``batch_size``.
    """
    label_fraction: str = "10%"
    labels_file: str | None = None  # reuse a written label list instead of drawing one
    seed: int = 0
    epochs: int | None = None
    min_steps: int = 500
    batch_size: int = 64
    trunk_lr: float | None = None
    head_lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    decay_gamma: float = 0.2
    min_crop_scale: float = 0.08
    image_size_px: int | None = None
    num_workers: int = 2
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 on GPUs that support it, else fp32) | fp32 | bf16 | fp16 (GPU)
    out_dir: str | None = None  # default runs/finetune-<backbone>-<labels>-seed<seed>
    out_json: str | None = None  # None = results/finetune-<backbone>-<UTC time>.json; "" = none
    floors: str = "auto"  # auto | on | off: also fine-tune from random init (swavkit.evaluation.floors; auto counts labelled images)
    baselines: tuple[str, ...] = ()  # also fine-tune these backbones the same way (swavkit.evaluation.baselines)
    restart: bool = False
    checkpoint_interval_s: float = 60.0
    progress: bool = True
    stop_after_epochs: int | None = None  # stop (resumable) after this many epochs of this call: tests


@dataclass
class Recipe:
    """The numbers one fine-tune runs with; all of it goes into the checkpoint and the result."""
    epochs: int
    batch_size: int
    trunk_lr: float  # at this batch
    head_lr: float
    decay_epochs: list[int]
    decay_gamma: float
    momentum: float
    weight_decay: float
    min_crop_scale: float
    seed: int
    reference_lrs: str  # which reference pair the LRs came from ("given": from the options)
    notes: list[str] = field(default_factory=list)


def resolve_recipe(options: FinetuneOptions, n_labelled: int, n_train: int) -> Recipe:
    """Options + labelled-set size -> the recipe (see the module docstring for the rules)."""
    if n_labelled < 2:
        raise ConfigError(f"--label-fraction {options.label_fraction}: selects {n_labelled} image; fine-tuning "
                          "needs at least 2 (BatchNorm in train mode needs a batch of 2 or more)")
    trunk_at_256, head_at_256 = REFERENCE_LRS[DEFAULT_LRS]
    batch = min(options.batch_size, n_labelled)
    scale = batch / REFERENCE_BATCH_SIZE
    notes = []
    steps_per_epoch = n_labelled // batch
    epochs = options.epochs
    if epochs is None:
        epochs = max(REFERENCE_EPOCHS, math.ceil(options.min_steps / steps_per_epoch))
        if epochs > REFERENCE_EPOCHS:
            notes.append(f"epochs raised from {REFERENCE_EPOCHS} to {epochs} so that {n_labelled} labelled images "
                         f"give >= {options.min_steps} optimiser steps")
    if batch < options.batch_size:
        notes.append(f"batch {batch}: the labelled set is smaller than --batch-size {options.batch_size}")
    return Recipe(
        epochs=epochs, batch_size=batch,
        trunk_lr=(options.trunk_lr if options.trunk_lr is not None else trunk_at_256) * scale,
        head_lr=(options.head_lr if options.head_lr is not None else head_at_256) * scale,
        decay_epochs=sorted({max(1, round(f * epochs)) for f in DECAY_AT}), decay_gamma=options.decay_gamma,
        momentum=options.momentum, weight_decay=options.weight_decay, min_crop_scale=options.min_crop_scale,
        seed=options.seed, reference_lrs=DEFAULT_LRS if options.trunk_lr is None and options.head_lr is None
        else "given", notes=notes)


def lr_factor(epoch: int, decay_epochs: list[int], gamma: float) -> float:
    """Step decay: gamma ** (number of decay epochs <= epoch); epoch is 0-based."""
    return gamma ** sum(epoch >= boundary for boundary in decay_epochs)


def build_finetune_optimizer(backbone: torch.nn.Module, head: torch.nn.Module, recipe: Recipe) -> torch.optim.SGD:
    """SGD with two groups: 0 = trunk (every backbone parameter) at trunk_lr, 1 = head at head_lr."""
    import torch

    groups = [{"params": list(backbone.parameters()), "lr": recipe.trunk_lr, "base_lr": recipe.trunk_lr,
               "name": "trunk"},
              {"params": list(head.parameters()), "lr": recipe.head_lr, "base_lr": recipe.head_lr, "name": "head"}]
    return torch.optim.SGD(groups, lr=recipe.trunk_lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


# ----------------------------------------------------------------------------------------------------
# training and evaluation of one backbone

@dataclass
class LabelledData:
    """The train folder (augmenting transform), the labelled indices into it, and the val folder."""
    train: LabelledImageFolder
    indices: list[int]
    val: LabelledImageFolder
    relative: list[str]  # train images' paths inside the train folder

    @property
    def n_classes(self) -> int:
        return len(self.train.classes)


class SeededItems:
    """``items[(i, seed)]`` -> ``dataset[indices[i]]`` with the augmentation RNG seeded by ``seed``: the crops an
    image gets depend on (seed, epoch, image) only, not on the worker that reads it or on a resume."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        import torch

        position, seed = key
        if torch.utils.data.get_worker_info() is not None:  # a worker's RNG is its own
            torch.default_generator.manual_seed(seed)
            return self.dataset[self.indices[position]]
        with torch.random.fork_rng(devices=[]):  # in this process: leave the caller's RNG alone
            torch.default_generator.manual_seed(seed)
            return self.dataset[self.indices[position]]


def _labelled_loader(data: LabelledData, recipe: Recipe, num_workers: int, device):
    """(loader, sampler) over the labelled images; ``sampler.set_epoch(e)`` gives epoch e's order and seeds.
    One loader for the whole run (persistent workers): a 1 % label set makes many one-step epochs."""
    from torch.utils.data import DataLoader

    from swavkit.data import EpochSampler, ReadOrReport, collate_read_or_report

    sampler = EpochSampler(len(data.indices), seed=recipe.seed)
    loader = DataLoader(ReadOrReport(SeededItems(data.train, data.indices)), batch_size=recipe.batch_size,
                        sampler=sampler, drop_last=True, num_workers=num_workers, collate_fn=collate_read_or_report,
                        pin_memory=device.type == "cuda", persistent_workers=num_workers > 0)
    return loader, sampler


def train_one_epoch(model: torch.nn.Module, loader, optimizer, device: torch.device, dtype: torch.dtype | None,
                    sums: dict | None = None, stop_request: StopRequest | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> dict:
    """One pass of SGD over ``loader`` (images [B, 3, s, s] -> logits [B, C]); returns the epoch's running sums
    {"batches", "loss_sum", "correct", "seen"}, continuing ``sums`` (an epoch resumed in its middle). Ends
    early, after the current batch, once ``stop_request`` has caught a signal. ``scaler``: the fp16 loss
    scaler (a disabled one, or None, leaves the step a plain ``backward`` + ``step``)."""
    import torch
    import torch.nn.functional as F

    from swavkit.data import raise_for_unreadable

    model.train()
    sums = dict(sums or {"batches": 0, "loss_sum": 0.0, "correct": 0, "seen": 0})
    for _, images, labels, unreadable in loader:
        raise_for_unreadable(unreadable)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        if not torch.isfinite(loss):
            raise ConfigError(f"fine-tuning loss became {loss.item()}: the LRs are too high for this backbone; "
                              "lower --trunk-lr / --head-lr")
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:  # fp16 gradients underflow without loss scaling; it skips a step whose gradients are not finite
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        sums["batches"] += 1
        sums["loss_sum"] += loss.item() * len(labels)
        sums["correct"] += int((logits.argmax(1) == labels).sum())
        sums["seen"] += len(labels)
        if stop_request is not None and stop_request.signal_name is not None:
            break
    return sums


def _epoch_row(sums: dict) -> dict:
    """The epoch's mean loss and top-1 % from :func:`train_one_epoch`'s sums."""
    return {"train_loss": sums["loss_sum"] / max(1, sums["seen"]),
            "train_top1": 100.0 * sums["correct"] / max(1, sums["seen"])}


def evaluate_classifier(model: torch.nn.Module, dataset, device: torch.device, batch_size: int, num_workers: int,
                        dtype: torch.dtype | None) -> dict:
    """Top-1 (and top-5 with more than 5 classes) accuracy in % of ``model`` (eval mode) on ``dataset``."""
    import torch
    from torch.utils.data import DataLoader

    from swavkit.data import ReadOrReport, collate_read_or_report, raise_for_unreadable
    from swavkit.evaluation.metrics import topk_accuracy

    model.eval()
    loader = DataLoader(ReadOrReport(dataset), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate_read_or_report)
    all_logits, all_labels = [], []
    for _, images, labels, unreadable in loader:
        raise_for_unreadable(unreadable)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            all_logits.append(model(images.to(device)).float().cpu())
        all_labels.append(labels)
    # the logits of the whole val split [N_val, C] (ImageNet: 200 MB), scored like every other evaluation
    return topk_accuracy(torch.cat(all_logits), torch.cat(all_labels))


def _save(folder: FinetuneFolder, epoch: int, model, optimizer, scaler, history: list[dict],
          part_epoch: dict | None = None) -> None:
    """``epoch`` epochs done; ``part_epoch``: the next one's sums and RNG state, when stopped in its middle."""
    from swavkit.artifacts.checkpoint import save_atomic
    from swavkit.artifacts.rundir import FINETUNE_FORMAT

    state = {"format": FINETUNE_FORMAT, "epoch": epoch, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "history": history}
    if scaler.is_enabled():  # fp16 only: its loss scale
        state["scaler"] = scaler.state_dict()
    if part_epoch is not None:
        state["part_epoch"] = part_epoch
    save_atomic(state, folder.checkpoint)


def _rng_state_of(part_epoch: dict) -> dict:
    """The RNG state saved with a part epoch, as :func:`swavkit.runtime.rng.capture_rng_state` gives it; checkpoints
    written before that module saved it as {"cpu", "cuda"}."""
    rng = part_epoch.pop("rng")
    return {"rng_cpu": rng["cpu"], "rng_cuda": rng["cuda"]} if "cpu" in rng else rng


def _resume(folder: FinetuneFolder, model, optimizer, scaler) -> tuple[int, list[dict], dict | None]:
    """(epochs done, per-epoch history, the part of the next epoch done or None) from the folder's checkpoint;
    (0, [], None) without one."""
    from swavkit.artifacts.checkpoint import CheckpointError, load_state
    from swavkit.artifacts.rundir import FINETUNE_FORMAT

    if not folder.checkpoint.is_file():
        return 0, [], None
    state = load_state(folder.checkpoint)
    if not isinstance(state, dict) or state.get("format") != FINETUNE_FORMAT:
        raise CheckpointError(f"{folder.checkpoint} is not a swavkit fine-tune checkpoint; pass --restart to "
                              "start over")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler.is_enabled() and "scaler" in state:  # saved at fp16 and resumed at fp16; else it starts afresh
        scaler.load_state_dict(state["scaler"])
    return int(state["epoch"]), list(state["history"]), state.get("part_epoch")


def run_finetune(backbone: torch.nn.Module, data: LabelledData, recipe: Recipe, folder: FinetuneFolder,
                 options: FinetuneOptions, description: str, stop_request: StopRequest | None = None) -> dict:
    """Fine-tune ``backbone`` + a new linear head on the labelled images, resuming from ``folder``; evaluate
    val once after the last epoch. Returns {"metrics", "history", "resumed_from_epoch", "completed"}.

    A signal caught by ``stop_request`` during the epochs saves the state after the current batch and raises
    StopRequested (exit code 3); the same call again resumes from that batch.
    """
    import torch
    from tqdm import tqdm

    from swavkit.runtime.device import autocast_dtype, resolve_device, resolve_precision
    from swavkit.runtime.rng import capture_rng_state, restore_rng_state

    device = resolve_device(options.device)
    precision = resolve_precision(options.precision, device)
    dtype = autocast_dtype(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(recipe.seed)
        with torch.no_grad():
            feature_dim = int(backbone.eval()(data.val[0][0][None]).shape[1])
        head = torch.nn.Linear(feature_dim, data.n_classes)
        torch.nn.init.normal_(head.weight, std=0.01)
        torch.nn.init.zeros_(head.bias)
        model = torch.nn.Sequential(backbone, head).to(device)
        optimizer = build_finetune_optimizer(backbone, head, recipe)
        start_epoch, history, part_epoch = _resume(folder, model, optimizer, scaler)
        stop_at = recipe.epochs if options.stop_after_epochs is None else min(
            recipe.epochs, start_epoch + options.stop_after_epochs)
        last_save = time.monotonic()
        bar = tqdm(range(start_epoch, stop_at), desc=description, unit="epoch", initial=start_epoch,
                   total=recipe.epochs, disable=not options.progress, dynamic_ncols=True)
        loader, sampler = _labelled_loader(data, recipe, options.num_workers, device)
        steps_per_epoch = len(data.indices) // recipe.batch_size  # the loader drops the last partial batch
        with stop_request.deferred() if stop_request else contextlib.nullcontext():
            for epoch in bar:
                if part_epoch is None:
                    torch.manual_seed(recipe.seed * 1_000_003 + epoch)  # e.g. drop-path: the same after a resume
                else:
                    restore_rng_state(_rng_state_of(part_epoch), device)
                sampler.set_epoch(epoch, start=(part_epoch or {}).get("batches", 0) * recipe.batch_size)
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * lr_factor(epoch, recipe.decay_epochs, recipe.decay_gamma)
                sums = train_one_epoch(model, loader, optimizer, device, dtype, part_epoch, stop_request, scaler)
                part_epoch = None
                if sums["batches"] < steps_per_epoch:  # a signal in the middle of the epoch
                    bar.close()
                    _save(folder, epoch, model, optimizer, scaler, history, {**sums, "rng": capture_rng_state(device)})
                    _raise_stopped(stop_request, folder, f"epoch {epoch + 1}, batch {sums['batches']}/{steps_per_epoch}")
                row = _epoch_row(sums)
                history.append({"epoch": epoch + 1, **{k: round(v, 4) for k, v in row.items()},
                                "trunk_lr": optimizer.param_groups[0]["lr"], "head_lr": optimizer.param_groups[1]["lr"]})
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", train_top1=f"{row['train_top1']:.1f}")
                stopped = stop_request is not None and stop_request.signal_name is not None
                if stopped or epoch + 1 == stop_at or time.monotonic() - last_save >= options.checkpoint_interval_s:
                    _save(folder, epoch + 1, model, optimizer, scaler, history)
                    last_save = time.monotonic()
                if stopped:
                    bar.close()
                    _raise_stopped(stop_request, folder, f"the end of epoch {epoch + 1}")
        bar.close()
    if stop_at < recipe.epochs:
        return {"metrics": {}, "history": history, "resumed_from_epoch": start_epoch, "completed": False}
    metrics = evaluate_classifier(model, data.val, device, max(recipe.batch_size, 256), options.num_workers, dtype)
    return {"metrics": metrics, "history": history, "resumed_from_epoch": start_epoch, "completed": True,
            "feature_dim": feature_dim}


def _raise_stopped(stop_request: StopRequest, folder: FinetuneFolder, where: str) -> None:
    from swavkit.data import printable_path

    raise StopRequested(f"stopped by {stop_request.signal_name} at {where}; saved to "
                        f"{printable_path(folder.checkpoint)}: run the same command again to resume")


# ----------------------------------------------------------------------------------------------------
# `swavkit finetune`

def _load(source: str, seed: int) -> torch.nn.Module:
    """The backbone on CPU; ``timm:`` weights drawn with ``seed`` without touching the caller's RNG."""
    import torch
    from swavkit.artifacts.pretrained import load_backbone  # heavy (timm); only when needed

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return load_backbone(source)


def default_out_dir(backbone_source: str, spec_text: str, seed: int) -> Path:
    """``runs/finetune-<run or backbone name>-<labels>-seed<seed>``: the same command, the same folder."""
    from swavkit.evaluation.report import source_name  # torch: not at `swavkit --help`

    labels = re.sub(r"[^A-Za-z0-9.]+", "-", spec_text).strip("-")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", source_name(backbone_source)).strip("-.") or "backbone"
    return Path(DEFAULT_RUNS_DIR) / f"finetune-{name}-{labels}-seed{seed}"


def load_labelled_data(train_dir, val_dir, preprocessing, options: FinetuneOptions) -> tuple[LabelledData, str]:
    """The folders, and the labelled subset drawn by the options (or read from ``labels_file``); returns the
    data and what chose the subset (the spec text or the list's file name)."""
    from swavkit.data import LabelledImageFolder  # torch: not at `swavkit --help`
    from swavkit.data.transforms import train_transform  # the linear probe's augmentation, too

    train = LabelledImageFolder(train_dir, train_transform(preprocessing.image_size_px, preprocessing.mean,
                                                           preprocessing.std, options.min_crop_scale))
    val = LabelledImageFolder(val_dir, preprocessing.transform(), classes=train.classes)
    relative = relative_paths(train)
    if options.labels_file:
        indices, chosen_by = read_label_list(options.labels_file, relative), f"file {options.labels_file}"
    else:
        indices = select_labelled(relative, train.labels, parse_label_spec(options.label_fraction), options.seed)
        chosen_by = options.label_fraction
    return LabelledData(train, indices, val, relative), chosen_by


def _setup(source: str, train_dir, data: LabelledData, recipe: Recipe, preprocessing) -> dict:
    """What must be equal for a rerun to resume a folder (JSON-normalised so it compares with the file)."""
    label_text = label_list_text(data.relative, data.indices)
    setup = {"backbone_source": str(source), "train_dir": os.path.abspath(train_dir), "classes": data.train.classes,
             "labelled_sha256": hashlib.sha256(label_text.encode("utf-8")).hexdigest(),
             "recipe": {k: v for k, v in asdict(recipe).items() if k != "notes"},
             "preprocessing": {"image_size_px": preprocessing.image_size_px, "mean": list(preprocessing.mean),
                               "std": list(preprocessing.std)}}
    return json.loads(json.dumps(setup))


def _finetune_one(source: str, backbone, data, recipe, preprocessing, folder_path, train_dir, options,
                  description: str, stop_request: StopRequest) -> dict:
    from swavkit.artifacts.rundir import FinetuneFolder  # torch: not at `swavkit --help`

    folder = FinetuneFolder(folder_path)
    if options.restart:
        folder.discard()
    folder.start(_setup(source, train_dir, data, recipe, preprocessing), label_list_text(data.relative, data.indices))
    start = time.perf_counter()
    outcome = run_finetune(backbone, data, recipe, folder, options, description, stop_request)
    outcome.update(out_dir=str(folder.path), wall_time_s=round(time.perf_counter() - start, 3))
    return outcome


def _protocol(recipe: Recipe, chosen_by: str, data: LabelledData, options: FinetuneOptions) -> dict:
    per_class = [sum(data.train.labels[i] == c for i in data.indices) for c in range(data.n_classes)]
    return {"label_fraction": chosen_by, "n_labelled": len(data.indices), "labelled_per_class": per_class,
            "subset": "stratified: per class, the files with the smallest sha256(seed, path inside --train)",
            "epochs": recipe.epochs, "global_batch_size": recipe.batch_size, "optimizer": "SGD",
            "momentum": recipe.momentum, "weight_decay": recipe.weight_decay,
            "trunk_lr": recipe.trunk_lr, "head_lr": recipe.head_lr,
            "lr_rule": (f"reference {recipe.reference_lrs} pair {REFERENCE_LRS[recipe.reference_lrs]}"
                        if recipe.reference_lrs in REFERENCE_LRS else "given")
                       + f" at batch {REFERENCE_BATCH_SIZE}, scaled by batch/{REFERENCE_BATCH_SIZE}",
            "lr_schedule": f"step: x{recipe.decay_gamma} at epochs {recipe.decay_epochs}",
            "decay_epochs": recipe.decay_epochs, "decay_gamma": recipe.decay_gamma,
            "train_augmentation": f"RandomResizedCrop(scale=({recipe.min_crop_scale}, 1)) + horizontal flip",
            "eval_transform": "resize + centre crop", "trained": "whole backbone (BN in train mode) + linear head",
            "selection": "none: fixed hyperparameters, val evaluated once after the last epoch",
            "seed": recipe.seed, "precision": options.precision, "notes": recipe.notes}


def finetune(backbone_source: str | Path, train_dir: str | Path, val_dir: str | Path,
             options: FinetuneOptions | None = None) -> dict:
    """Fine-tune a backbone with few labels (module docstring) and, when ``options.floors`` asks for it
    (:func:`swavkit.evaluation.floors.floors_wanted` of the labelled set), the same architecture from random init on the
    same labelled files; write the result JSON and the label list.

    Returns the result record (:func:`swavkit.evaluation.report.build_result`, evaluation "finetune") with
    ``floors["random_init"]`` and ``labels_path``; {"completed": False, ...} when stopped by
    ``stop_after_epochs`` (nothing written but the run folders). SIGTERM / SIGINT (swavkit.runtime.signals) saves
    the fine-tune's state after the current batch and raises StopRequested: calling again resumes it.
    """
    with StopRequest() as stop_request:
        return _finetune(str(backbone_source), train_dir, val_dir, options or FinetuneOptions(), stop_request)


def _finetune(source: str, train_dir, val_dir, options: FinetuneOptions, stop_request: StopRequest) -> dict:
    from swavkit.artifacts.rundir import FINETUNE_FLOOR_FOLDER  # torch: not at `swavkit --help`
    from swavkit.evaluation import setup  # torch + timm: not at `swavkit --help`

    run = setup.start("finetune", source, options, check_output=check_outputs, one_process="swavkit finetune")
    preprocessing = setup.preprocessing_for(source, options.image_size_px)
    preprocessing.require_rgb(source, "swavkit finetune")  # before any image is read
    data, chosen_by = load_labelled_data(train_dir, val_dir, preprocessing, options)
    recipe = resolve_recipe(options, len(data.indices), len(data.train))
    with_floor = floors_wanted(options.floors, len(data.indices)) and not source.startswith("timm:")
    out_dir = Path(options.out_dir) if options.out_dir else default_out_dir(source, chosen_by, options.seed)
    backbone = _load(source, options.seed)
    main = _finetune_one(source, backbone, data, recipe, preprocessing, out_dir, train_dir, options, "fine-tune",
                         stop_request)
    if not main["completed"]:
        return {"completed": False, "out_dir": main["out_dir"], "history": main["history"]}
    floors = {}
    architecture = backbone_name(backbone)
    if with_floor:
        floor_source = f"timm:{architecture}"
        floor = _finetune_one(floor_source, _load(floor_source, options.seed), data, recipe, preprocessing,
                              out_dir / FINETUNE_FLOOR_FOLDER, train_dir, options, "random init", stop_request)
        if not floor["completed"]:
            return {"completed": False, "out_dir": floor["out_dir"], "history": floor["history"]}
        floors["random_init"] = {"source": floor_source, **floor["metrics"], "out_dir": floor["out_dir"],
                                 "final_train_loss": floor["history"][-1]["train_loss"],
                                 "wall_time_s": floor["wall_time_s"]}
    baselines, shown = {}, display_names(run.baseline_kinds)
    for name, kind in run.baseline_kinds.items():
        baseline = _finetune_baseline(name, preprocessing, data, recipe, out_dir, train_dir, val_dir, options,
                                      stop_request)
        if not baseline["completed"]:
            return {"completed": False, "out_dir": baseline["out_dir"], "history": baseline["history"]}
        size, origin = trained_size(name)
        baselines[name] = {"source": name, "name": shown[name], "kind": BASELINE_KINDS[kind], "image_size_px": preprocessing.image_size_px,
                           "trained_size_px": size, "trained_size_from": origin, **baseline["metrics"],
                           "out_dir": baseline["out_dir"], "wall_time_s": baseline["wall_time_s"]}
    result = run.record(
        metrics=main["metrics"], protocol=_protocol(recipe, chosen_by, data, options),
        backbone={"source": source, "architecture": architecture, "feature_dim": main["feature_dim"]},
        data={"train_dir": str(train_dir), "val_dir": str(val_dir), "n_train": len(data.indices),
              "n_train_folder": len(data.train), "n_val": len(data.val), "n_classes": data.n_classes,
              "classes": data.train.classes},
        preprocessing=preprocessing,
        extra={"floors": floors, "out_dir": main["out_dir"], "resumed_from_epoch": main["resumed_from_epoch"],
               "history": main["history"], "completed": True})
    if baselines:
        result["baselines"] = baselines
        result["verdict"] = verdict(result)

    def write_label_list(path: Path) -> None:  # beside the record, checked again now that its name is known
        check_outputs(path)
        result["labels_path"] = str(labels_path_for(path))
        write_text_atomic(labels_path_for(path), label_list_text(data.relative, data.indices))

    return run.publish(result, options.out_json, write_beside=write_label_list)


def _finetune_baseline(name: str, preprocessing, data: LabelledData, recipe: Recipe, out_dir: Path, train_dir,
                       val_dir, options: FinetuneOptions, stop_request: StopRequest) -> dict:
    """Fine-tune baseline ``name`` on the same labelled files with the same recipe, at the user's image size
    with its own mean/std, in ``out_dir/baseline-<name>/`` (resumed and restarted with the main fine-tune)."""
    from swavkit.artifacts.preprocessing import resolve_preprocessing  # torch + timm: not at `swavkit --help`
    from swavkit.artifacts.rundir import FINETUNE_BASELINE_PREFIX  # torch: as above

    own = resolve_preprocessing(name, preprocessing.image_size_px)
    own.require_rgb(name, "swavkit finetune")
    if (own.mean, own.std) != (preprocessing.mean, preprocessing.std):  # the same files, normalised its way
        data = load_labelled_data(train_dir, val_dir, own, options)[0]
    folder = out_dir / (FINETUNE_BASELINE_PREFIX + re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:60])
    return _finetune_one(name, _load(name, options.seed), data, recipe, own, folder, train_dir, options,
                         f"baseline {name}", stop_request)


def check_outputs(result_path: str | Path | None) -> None:
    """The result JSON and its label list may be new or an earlier swavkit record; anything else is refused
    in one line (FileExistsError) - checked before the fine-tune starts, and again before writing."""
    from swavkit.evaluation.report import check_result_target  # torch: not at `swavkit --help`

    if not result_path:
        return
    check_result_target(result_path)
    labels = labels_path_for(result_path)
    if labels.exists() and not Path(result_path).exists():
        raise FileExistsError(f"{labels} exists and belongs to no swavkit result; choose another --out")


def labels_path_for(result_path: str | Path) -> Path:
    """``x/finetune-a-....json`` -> ``x/finetune-a-....labels.txt``: the label list beside its result."""
    result_path = Path(result_path)
    return result_path.with_name(result_path.stem + ".labels.txt")


# The fine-tune folder and its file names live in swavkit.artifacts.rundir (the one module that knows run-folder
# layouts); they stay importable from here under their old names. Resolved on first use: swavkit.artifacts.rundir
# imports torch, and this module must not (it registers its command for `swavkit --help`).
_IN_RUNDIR = {"FinetuneFolder": "FinetuneFolder", "RUN_FORMAT": "FINETUNE_FORMAT", "RUN_FILE": "FINETUNE_RUN_FILE",
              "CHECKPOINT_FILE": "FINETUNE_CHECKPOINT_FILE", "LABELS_FILE": "FINETUNE_LABELS_FILE",
              "FLOOR_FOLDER": "FINETUNE_FLOOR_FOLDER"}


def __getattr__(name: str):
    if name not in _IN_RUNDIR:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import swavkit.artifacts.rundir  # torch: see above

    return getattr(swavkit.artifacts.rundir, _IN_RUNDIR[name])


__all__ = ["FinetuneOptions", "LabelSpec", "Recipe", "finetune", "run_finetune", "parse_label_spec",
           "select_labelled", "read_label_list", "label_list_text", "resolve_recipe", "build_finetune_optimizer",
           "lr_factor", "labels_path_for", "FinetuneFolder"]
