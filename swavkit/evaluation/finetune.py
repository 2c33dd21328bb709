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
code 3 like ``pretrain``). Running the same command again resumes from what was saved (after a kill -9 too), and
the result equals that of an uninterrupted run (each epoch's order is seeded by (seed, epoch) and each image's
crop by (seed, epoch, image), whichever DataLoader worker reads it). A non-finite loss saves the last good state
and raises TrainingDiverged (exit 2). The loop, its saves and its resume are the reference linear probe's too
(:mod:`swavkit.evaluation.supervised`, :mod:`swavkit.artifacts.checkpointer`). A folder that holds
anything else is refused, and ``restart`` deletes only those files (the rule of every run folder:
:class:`swavkit.artifacts.rundir.OwnedFolder`). Under torchrun or srun the global batch is split over the processes
(DistributedDataParallel; BatchNorm statistics per process) and the main process writes the
folder and the result. ``--precision fp16`` (GPU only) scales the loss
like pretraining does.
"""

from __future__ import annotations

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
from swavkit.core.schedule import StepDecaySchedule
from swavkit.runtime.signals import StopRequest

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


def evaluate_classifier(model: torch.nn.Module, dataset, device: torch.device, batch_size: int, num_workers: int,
                        dtype: torch.dtype | None) -> dict:
    """Top-1 (and top-5 with more than 5 classes) accuracy in % of ``model`` (eval mode) on ``dataset``."""
    import torch
    from torch.utils.data import DataLoader

    from swavkit.data import ReadOrReport, collate_read_or_report, raise_for_unreadable  # torch (not at --help)
    from swavkit.evaluation.metrics import topk_accuracy  # torch: as above

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


def finetune_schedules(recipe: Recipe, steps_per_epoch: int) -> list[StepDecaySchedule]:
    """The LR of the trunk group and of the head group (swavkit.core.schedule): each at its own LR, x
    ``decay_gamma`` at each of the recipe's decay epochs."""
    decay_steps = [epoch * steps_per_epoch for epoch in recipe.decay_epochs]
    return [StepDecaySchedule(lr, decay_steps, recipe.decay_gamma) for lr in (recipe.trunk_lr, recipe.head_lr)]


def run_finetune(backbone: torch.nn.Module, data: LabelledData, recipe: Recipe, folder: FinetuneFolder,
                 options: FinetuneOptions, description: str, stop_request: StopRequest | None = None) -> dict:
    """Fine-tune ``backbone`` + a new linear head on the labelled images (:mod:`swavkit.evaluation.supervised`,
    trunk trained), resuming from ``folder``; evaluate val once after the last epoch. Returns {"metrics",
    "history", "resumed_from_epoch", "completed", "feature_dim"}.

    A signal caught by ``stop_request`` during the epochs saves the state after the current batch and raises
    StopRequested (exit code 3); the same call again resumes from that batch. A non-finite loss saves the last
    good state and raises TrainingDiverged.
    """
    import torch

    from swavkit.artifacts.rundir import FINETUNE_FORMAT  # torch: not at `swavkit --help`
    from swavkit.evaluation.supervised import SupervisedRun, feature_dim_of, linear_head, train_supervised  # torch: as above
    from swavkit.runtime.device import autocast_dtype, resolve_device, resolve_precision  # torch: as above
    from swavkit.runtime.distributed import detect_launch  # torch: as above

    device = resolve_device(options.device, detect_launch().local_rank)  # under torchrun: this process's GPU
    precision = resolve_precision(options.precision, device)
    dtype = autocast_dtype(precision)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(recipe.seed)
        backbone.to(device)
        feature_dim = feature_dim_of(backbone, data.train, data.indices[0], device)
        head = linear_head(feature_dim, data.n_classes)
        run = SupervisedRun(
            trunk=backbone, head=head, train_trunk=True, dataset=data.train, indices=data.indices,
            epochs=recipe.epochs, batch_size=recipe.batch_size, seed=recipe.seed,
            optimizer=build_finetune_optimizer(backbone, head, recipe),
            schedules=finetune_schedules(recipe, len(data.indices) // recipe.batch_size), device=device,
            dtype=dtype, scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
            num_workers=options.num_workers, checkpoint=folder.checkpoint, format_tag=FINETUNE_FORMAT,
            every_minutes=options.checkpoint_interval_s / 60.0, stop_request=stop_request,
            stop_after_epochs=options.stop_after_epochs, description=description, progress=options.progress,
            lr_hint="lower --trunk-lr / --head-lr", remedy="pass --restart to start over")
        outcome = train_supervised(run)
    outcome.update(feature_dim=feature_dim, metrics={})
    if outcome["completed"]:
        model = torch.nn.Sequential(backbone, head)
        outcome["metrics"] = evaluate_classifier(model, data.val, device, max(recipe.batch_size, 256),
                                                 options.num_workers, dtype)
    return outcome


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
    from swavkit.runtime import distributed  # torch: as above

    if distributed.is_main_process():  # under torchrun the main process checks and writes the folder first
        folder = FinetuneFolder(folder_path)
        if options.restart:
            folder.discard()
        folder.start(_setup(source, train_dir, data, recipe, preprocessing),
                     label_list_text(data.relative, data.indices))
    distributed.barrier()
    folder = FinetuneFolder(folder_path)
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
    from swavkit.runtime.device import resolve_precision  # torch: as above

    run = setup.start("finetune", source, options, check_output=check_outputs)  # torchrun: the batch split
    resolve_precision(options.precision, run.device)  # fp16 on a CPU is refused now, not after reading the data
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
           "finetune_schedules", "labels_path_for", "FinetuneFolder"]
