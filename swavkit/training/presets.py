"""Size-aware defaults: derive the SwAV knobs from the data and the hardware, each with a one-line reason.

``swavkit pretrain --auto data.path=DIR`` looks at the folder (number of images, typical image side),
the number of processes and the global batch, and fills in every key the user did not set explicitly.
The rules start from the paper's ImageNet recipe (1.28M images, 3000 prototypes, 2x224 + 6x96 crops,
queue for small batches, one epoch of frozen prototypes) and scale it down to smaller data.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from swavkit.runtime import distributed
from swavkit.config import Config, ConfigError, from_dict, validate
from swavkit.core.model import check_backbone_name
from swavkit.training.preflight import preflight
from swavkit.data import BUNDLED_SAMPLE
from swavkit.data.channels import header_size
from swavkit.data.shards import is_shard_spec
from swavkit.data.sources import data_specs, describe_specs, resolve_images
from swavkit.errors import is_user_error
from swavkit.runtime.cores import AUTO_WORKER_CAP, default_num_workers, training_threads, usable_cores
from swavkit.runtime.device import resolve_device, resolve_precision
from swavkit.training.speed import step_seconds
from swavkit.core.schedule import reference_peak_lr

REFERENCE_IMAGES = 1_281_167  # ImageNet-1k train, what the paper's numbers are tuned for
REFERENCE_FREEZE_STEPS = 313  # one ImageNet epoch at batch 4096

# On a CPU: resnet10t, timm's cheapest ResNet, whose tiered 3-conv stem keeps the most of a small crop; it
# learned the most per CPU-minute in the cifar10-small probes (benchmarks/README.md, "Evaluation").
CPU_BACKBONE = "resnet10t"
# With a budget on a CPU, the largest crop side (of CROP_LADDER_PX, at most the images' side) that still
# affords this many passes over the data at the measured speed (swavkit.training.speed: the run's own step). On
# cifar10-small the 20-NN accuracy kept rising from 10 to 89 passes (37.6 -> 44.8 %): passes matter more than
# pixels on a CPU.
CPU_MIN_PASSES = 30
CROP_LADDER_PX = (32, 48, 64, 96, 128, 160, 224)
BUDGET_TRAINING_SHARE = 0.85  # of the budget, for steps (start-up, checkpoints and export take the rest)


@dataclass(frozen=True)
class Suggestion:
    key: str
    value: object
    reason: str


# the suggestions that make a candidate config -> measured wall seconds of one of its training steps
SecondsPerStep = Callable[[list[Suggestion]], float]


def typical_side_px(paths: list[str], sample: int = 200) -> int:
    """Median shorter side over an evenly spaced sample of (readable) images; header reads only."""
    step = max(1, len(paths) // sample)
    sides = []
    for path in paths[::step][:sample]:
        try:
            sides.append(min(header_size(path)))  # header only; multispectral TIFFs too (data/channels.py)
        except Exception:  # unreadable files are skipped here as in training
            continue
    return int(statistics.median(sides)) if sides else 224


def _crop_recipe(side_px: int, on_gpu: bool = True) -> tuple[dict, str]:
    if side_px <= 48 and not on_gpu:
        return ({"counts": [2], "sizes_px": [32], "min_scales": [0.2], "max_scales": [1.0], "blur_probability": 0.0},
                f"images are ~{side_px} px on a CPU: two 32 px crops, no small ones (16 px crops end in a 1x1 map "
                "and cost steps; on cifar10-small they lowered k-NN accuracy at equal epochs: "
                "benchmarks/README.md), no blur")
    if side_px <= 48:
        return ({"counts": [2, 4], "sizes_px": [32, 16], "min_scales": [0.25, 0.08], "max_scales": [1.0, 0.25],
                 "blur_probability": 0.0},
                f"images are ~{side_px} px: 2x32 + 4x16 crops, no blur (it erases tiny images)")
    if side_px <= 128:
        return ({"counts": [2, 4], "sizes_px": [64, 32], "min_scales": [0.2, 0.08], "max_scales": [1.0, 0.2],
                 "blur_probability": 0.5},
                f"images are ~{side_px} px: 2x64 + 4x32 crops")
    if side_px <= 200:
        return ({"counts": [2, 6], "sizes_px": [160, 64], "min_scales": [0.14, 0.05], "max_scales": [1.0, 0.14]},
                f"images are ~{side_px} px: 2x160 + 6x64 crops, the paper's scales")
    return ({"counts": [2, 6], "sizes_px": [224, 96], "min_scales": [0.14, 0.05], "max_scales": [1.0, 0.14]},
            f"images are ~{side_px} px: the paper's 2x224 + 6x96 crops")


def _cpu_crops(size_px: int) -> dict:
    """CPU crops for a large-crop side: two crops, plus four at half the side once that is >= 48 px."""
    if size_px >= 96:
        return {"counts": [2, 4], "sizes_px": [size_px, size_px // 2], "min_scales": [0.14, 0.05],
                "max_scales": [1.0, 0.14], "blur_probability": 0.5}
    return {"counts": [2], "sizes_px": [size_px], "min_scales": [0.2], "max_scales": [1.0],
            "blur_probability": 0.0 if size_px <= 48 else 0.5}


def budget_passes(budget_s: float, seconds_per_step: float, steps_per_epoch: int) -> float:
    """Passes over the data a budget affords at ``seconds_per_step``: the share of the budget left for steps
    (start-up, checkpoints and export take the rest)."""
    return BUDGET_TRAINING_SHARE * budget_s / (seconds_per_step * steps_per_epoch)


def _global_batch(size_px: int, n_images: int, world_size: int, on_gpu: bool) -> int:
    """The derived global batch for a largest crop side: 64 per GPU process, 128 (<= 64 px) or 32 per CPU
    process, at most a quarter of the data (an epoch of several steps), a multiple of the process count."""
    per_process = 64 if on_gpu else 128 if size_px <= 64 else 32
    global_batch = per_process * world_size
    while global_batch > max(world_size, n_images // 4) and global_batch > world_size:
        global_batch //= 2
    return max(world_size, global_batch // world_size * world_size)


def _budget_crops_on_cpu(side_px: int, n_images: int, budget_s: float, fixed: list[Suggestion],
                         global_batch: int | None, world_size: int,
                         seconds_per_step: SecondsPerStep) -> tuple[dict, int, float, str]:
    """(crops, global batch, passes over the data they afford, reason): the largest ladder size <= the images'
    side whose crops still afford CPU_MIN_PASSES passes in the budget at the measured speed of a step of the
    candidate (``fixed``: the suggestions made before the crops, e.g. the backbone)."""
    sizes = [s for s in CROP_LADDER_PX if s <= max(32, side_px)]
    chosen, tried = None, []
    for size in sizes:  # small to large: stop at the first that no longer affords the passes
        crops = _cpu_crops(size)
        batch = global_batch or _global_batch(size, n_images, world_size, on_gpu=False)
        candidate = fixed + [Suggestion(f"crops.{k}", v, "") for k, v in crops.items()] + \
            [Suggestion("train.batch_size", batch, "")]
        passes = budget_passes(budget_s, seconds_per_step(candidate), max(1, n_images // batch))
        tried.append(f"{size} px: {passes:.0f}")
        if chosen is not None and passes < CPU_MIN_PASSES:
            break
        chosen = crops, batch, passes
    crops, batch, passes = chosen
    groups = " + ".join(f"{c}x{s}" for c, s in zip(crops["counts"], crops["sizes_px"]))
    return (crops, batch, passes,
            f"images are ~{side_px} px, budget {budget_s / 60:g} min on a CPU: passes over the data at the measured "
            f"speed of a training step ({', '.join(tried)}); {groups} crops, the largest affording >= "
            f"{CPU_MIN_PASSES} passes (passes mattered more than pixels on cifar10-small)")


def derive(n_images: int, side_px: int, world_size: int = 1, global_batch: int | None = None,
           on_gpu: bool = False, epochs: int | None = None, local_world_size: int = 1,
           budget_minutes: float | None = None, backbone: str | None = None,
           seconds_per_step: SecondsPerStep | None = None) -> list[Suggestion]:
    """Suggested values (with reasons) for a dataset of ``n_images`` images of ~``side_px`` pixels.

    ``budget_minutes``: the run's time budget (None: none). ``backbone``: the user's choice (None: derived
    here). ``seconds_per_step(suggestions)``: measured wall seconds of one training step of the config these
    suggestions (backbone, prototypes, crops, batch) make (:func:`swavkit.training.speed.step_seconds`, the
    figure the run's budget plan starts from); needed with a budget on a CPU.
    """
    out: list[Suggestion] = []
    if backbone is None:
        if on_gpu:
            backbone = "resnet18" if side_px <= 64 else "resnet50"
            why = (f"images are ~{side_px} px on a GPU: " + ("resnet18 (a resnet50 is mostly wasted on 1x1 final maps)"
                                                             if side_px <= 64 else "the paper's resnet50"))
            out.append(Suggestion("model.backbone", backbone, why))
        else:
            backbone = CPU_BACKBONE
            out.append(Suggestion("model.backbone", backbone,
                                  "on a CPU: resnet10t, the cheapest timm ResNet, learned the most per CPU-minute in the "
                                  "cifar10-small probes (resnet50 trains ~2 images/s here: benchmarks/README.md)"))
            out.append(Suggestion("model.zero_init_last", True, "timm's ResNet init, with which the CPU recipes were "
                                  "measured"))
    n_prototypes = int(min(3000, max(10, round(n_images / 50, -1 if n_images >= 500 else 0))))
    out.append(Suggestion("model.n_prototypes", n_prototypes,
                          f"~1 prototype per 50 images ({n_images} images), capped at the paper's 3000: over-cluster, "
                          "but keep every prototype fed"))
    budget_s = 60.0 * budget_minutes if budget_minutes else None
    passes, derived_batch = None, None
    if budget_s and not on_gpu and seconds_per_step is not None:
        crops, derived_batch, passes, why = _budget_crops_on_cpu(side_px, n_images, budget_s, list(out),
                                                                  global_batch, world_size, seconds_per_step)
    else:
        crops, why = _crop_recipe(side_px, on_gpu)
    for key, value in crops.items():
        out.append(Suggestion(f"crops.{key}", value, why))
    if not on_gpu and crops["sizes_px"][0] <= 48:
        out.append(Suggestion("crops.color_jitter_strength", 0.5, "small images: SimCLR's CIFAR jitter strength (1.0 "
                              "and 0.25 both lost 1.6-2.4 k-NN points on cifar10-small)"))

    if global_batch is None:
        global_batch = derived_batch or _global_batch(crops["sizes_px"][0], n_images, world_size, on_gpu)
        out.append(Suggestion("train.batch_size", global_batch,
                              f"{global_batch // world_size} per process x {world_size} process(es), at most a quarter "
                              "of the data so an epoch has several steps"))

    if epochs is None and passes is not None:
        epochs = max(1, round(passes))
        out.append(Suggestion("train.epochs", epochs,
                              "the passes the budget affords at the measured speed; the run plans its steps from the "
                              "same figure before its first step, then re-fits the total to the speed it sees"))
    elif epochs is None:
        epochs = 800 if n_images <= 20_000 else 400 if n_images <= 200_000 else 200 if n_images <= 2_000_000 else 100
        out.append(Suggestion("train.epochs", epochs,
                              f"{n_images} images: small data needs more passes (paper: 200-800 epochs on ImageNet)"
                              + ("; with the budget this only shapes warm-up, freezing and queue" if budget_s else "")))

    steps_per_epoch = max(1, n_images // global_batch)
    # the paper's 313 steps, but never more than 5 % of the run (a short run must train its prototypes too)
    freeze_epochs = min(max(1.0, REFERENCE_FREEZE_STEPS / steps_per_epoch), 0.05 * epochs)
    out.append(Suggestion("swav.freeze_prototypes_epochs", round(freeze_epochs, 2),
                          f"prototypes frozen ~{round(freeze_epochs * steps_per_epoch)} steps (paper: 313 steps), at "
                          "most 5% of training, so the head settles before clusters form"))

    if global_batch < 1024 and n_images >= 8 * global_batch:
        length = min(3840, (n_images // 4) // global_batch * global_batch)
        length = max(global_batch, length // global_batch * global_batch)
        start = max(1, round(0.075 * epochs))
        out.append(Suggestion("swav.queue_length", length,
                              f"batch {global_batch} < 1024 gives Sinkhorn too few samples per prototype; a queue of "
                              f"{length} (a multiple of the batch, at most a quarter of the data) fixes that"))
        out.append(Suggestion("swav.queue_start_epoch", start,
                              "queue starts after ~7.5% of training (paper: epoch 15 of 200) so stale early "
                              "embeddings do not push the loss back to ln K"))
    else:
        out.append(Suggestion("swav.queue_length", 0,
                              f"batch {global_batch} is large enough (or the data too small) for Sinkhorn without a queue"))

    workers = default_num_workers(AUTO_WORKER_CAP, local_world_size, leave_one_for_main=False)
    out.append(Suggestion("data.num_workers", workers,
                          f"{usable_cores()} CPU core(s) shared by {local_world_size} process(es) on this machine"))

    warmup = min(10.0, round(0.05 * epochs, 1))
    out.append(Suggestion("optim.warmup_epochs", warmup,
                          "5% of training, from LR 0, at most the 10 epochs of the paper's batch-4096 recipe"))
    lars_peak, adamw_peak = reference_peak_lr("lars", global_batch), reference_peak_lr("adamw", global_batch)
    out.append(Suggestion("optim.base_lr", 0.0,
                          f"the optimiser's reference peak LR at batch {global_batch}: LARS {lars_peak:.3g} (the "
                          "paper: 0.6 at 256, 4.8 at 4096, not linear: 0.6 x 16 would be 9.6), AdamW "
                          f"{adamw_peak:.3g} (5e-4 per 256); cosine to peak / 1000"))
    return out


def explicit_keys(tree: dict, prefix: str = "") -> set[str]:
    """Dotted keys present in a merged YAML/override dict (what the user chose)."""
    keys = set()
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and key != "backbone_kwargs":
            keys |= explicit_keys(value, f"{dotted}.")
        else:
            keys.add(dotted)
    return keys


# Keys holding one value per crop resolution group: they must agree in length, so a user who sets any of them
# sets the crop layout, and none of the others is derived for another layout.
CROP_GROUP_KEYS = ("crops.counts", "crops.sizes_px", "crops.min_scales", "crops.max_scales")


def apply(tree: dict, suggestions: list[Suggestion], chosen: set[str]) -> list[Suggestion]:
    """Write suggestions into the nested ``tree`` except for keys the user chose (and, when the user set any
    per-group crop key, the other per-group crop keys); return those applied."""
    if chosen.intersection(CROP_GROUP_KEYS):
        chosen = chosen | set(CROP_GROUP_KEYS)
    applied = []
    for s in suggestions:
        if s.key in chosen:
            continue
        node = tree
        *parents, leaf = s.key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = s.value
        applied.append(s)
    return applied


def describe(applied: list[Suggestion]) -> str:
    """One line per value; a reason shared by consecutive values is printed once."""
    width = max((len(f"{s.key} = {s.value}") for s in applied), default=0)
    lines, previous = [], None
    for s in applied:
        reason = f"# {s.reason}" if s.reason != previous else ""
        lines.append(f"  {f'{s.key} = {s.value}':<{width}}  {reason}".rstrip())
        previous = s.reason
    return "\n".join(lines)


def auto_config(tree: dict, implicit: bool = False) -> Config:
    """``--auto`` / ``pretrain(auto=True)``: a merged config tree (YAML files + overrides, see
    :func:`swavkit.config.merge_sources`) -> the validated Config, with every key the user did not set
    derived from the images under ``data.path`` (the bundled sample when unset) and the launcher's
    process count. Prints each derived value with its reason (main process only).

    ``implicit``: derived because no recipe was given (``swavkit pretrain data.path=DIR``), not asked for. Then
    data that cannot be looked at (tar shards, a folder that is missing or holds no images) derives nothing:
    the keys keep the schema defaults, and training reports the data itself."""
    chosen = explicit_keys(tree)
    from_dict(tree)  # unknown keys and wrong types are named before any folder is read
    if "model.backbone" in chosen:
        check_backbone_name(tree["model"]["backbone"])
    specs = data_specs(tree.get("data", {}).get("path", ""), tree.get("data", {}).get("paths", []))
    specs = specs or [str(BUNDLED_SAMPLE / "train")]
    if any(is_shard_spec(spec) for spec in specs):
        if implicit:
            return _schema_defaults(tree, "tar shards: image counts and sizes are read from files, so nothing was "
                                          "derived")
        raise ConfigError("--auto reads image counts and sizes from files, not from tar shards; set the recipe "
                          "keys yourself (see configs/) or run --auto once on a folder or list of the same images")
    try:
        paths = resolve_images(specs)
    except Exception as err:
        if not (implicit and is_user_error(err)):
            raise
        return _schema_defaults(tree, "the data could not be looked at, so nothing was derived")
    data_root = describe_specs(specs)
    launch = distributed.detect_launch()
    world = launch.world_size
    # the device the run will train on, by the one rule of swavkit.runtime.device
    on_gpu = resolve_device(tree.get("train", {}).get("device", "auto"), launch.local_rank).type == "cuda"
    budget = tree.get("train", {}).get("budget_minutes") or None
    backbone = tree["model"]["backbone"] if "model.backbone" in chosen else None
    device, start = torch.device("cuda" if on_gpu else "cpu"), time.perf_counter()
    speed = partial(_candidate_step_seconds, tree, chosen, device, world) if budget and not on_gpu else None
    # timed with the thread count the run will use (swavkit.runtime.cores.training_threads)
    with training_threads(device, launch.local_world_size):
        suggestions = derive(len(paths), typical_side_px(paths), world, local_world_size=launch.local_world_size,
                             global_batch=tree["train"]["batch_size"] if "train.batch_size" in chosen else None,
                             on_gpu=on_gpu, epochs=tree["train"]["epochs"] if "train.epochs" in chosen else None,
                             budget_minutes=float(budget) if budget else None, backbone=backbone,
                             seconds_per_step=speed)
    if speed is not None and distributed.is_main_process():
        print(f"swavkit: --auto timed training steps of {backbone or CPU_BACKBONE} on this machine in "
              f"{time.perf_counter() - start:.1f} s (the run plans its budget from the same figure)")
    if tree.get("method") == "deepclusterv2":  # the queue is SwAV's; deepclusterv2's memory bank replaces it
        suggestions = [s for s in suggestions if not s.key.startswith("swav.queue")]
    applied = apply(tree, suggestions, chosen)
    cfg = from_dict(tree)
    preflight(cfg, world_size=world)
    if distributed.is_main_process():
        how = (f"no recipe given (--config): derived for this machine from {len(paths)} images in {data_root} and "
               f"{world} process(es) (keys you set are kept; --config configs/imagenet_resnet50.yaml is the paper's "
               "recipe, --no-auto the schema defaults)" if implicit else
               f"--auto derived from {len(paths)} images in {data_root} and {world} process(es) (keys you set are "
               "kept)")
        print(f"swavkit: {how}:\n{describe(applied)}")
    return cfg


def _candidate_step_seconds(tree: dict, chosen: set[str], device: torch.device, world: int,
                            candidate: list[Suggestion]) -> float:
    """Seconds per training step of the config ``candidate`` makes of ``tree`` (the user's keys kept), measured
    once (swavkit.training.speed: a budget run started in this process plans from the same figure)."""
    trial = copy.deepcopy(tree)
    apply(trial, candidate, chosen)
    cfg = from_dict(trial)
    validate(cfg)
    return step_seconds(cfg, device, world, resolve_precision(cfg.train.precision, device))


def _schema_defaults(tree: dict, why: str) -> Config:
    """The config of ``tree`` with every unset key at its schema default, saying so (implicit derivation only)."""
    cfg = from_dict(tree)
    validate(cfg)
    if distributed.is_main_process():
        print(f"swavkit: no recipe given (--config) and {why}: unset keys keep the schema defaults (the pre-flight "
              "memory check still guards the run)")
    return cfg


__all__ = ["Suggestion", "SecondsPerStep", "auto_config", "derive", "budget_passes", "typical_side_px", "explicit_keys", "apply", "describe"]
