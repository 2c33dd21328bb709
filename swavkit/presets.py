"""Size-aware defaults: derive the SwAV knobs from the data and the hardware, each with a one-line reason.

``swavkit pretrain --auto data.path=DIR`` looks at the folder (number of images, typical image side),
the number of processes and the global batch, and fills in every key the user did not set explicitly.
The rules start from the paper's ImageNet recipe (1.28M images, 3000 prototypes, 2x224 + 6x96 crops,
queue for small batches, one epoch of frozen prototypes) and scale it down to smaller data.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass

import torch

from swavkit import distributed
from swavkit.config import Config, ConfigError, from_dict, validate
from swavkit.data import BUNDLED_SAMPLE, open_image
from swavkit.schedule import reference_peak_lr

REFERENCE_IMAGES = 1_281_167  # ImageNet-1k train, what the paper's numbers are tuned for
REFERENCE_FREEZE_STEPS = 313  # one ImageNet epoch at batch 4096


@dataclass(frozen=True)
class Suggestion:
    key: str
    value: object
    reason: str


def typical_side_px(paths: list[str], sample: int = 200) -> int:
    """Median shorter side over an evenly spaced sample of (readable) images; header reads only."""
    step = max(1, len(paths) // sample)
    sides = []
    for path in paths[::step][:sample]:
        try:
            with open_image(path) as img:  # swavkit's formats and pixel limit, header only
                sides.append(min(img.size))
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


def derive(n_images: int, side_px: int, world_size: int = 1, global_batch: int | None = None,
           on_gpu: bool = False, epochs: int | None = None, local_world_size: int = 1) -> list[Suggestion]:
    """Suggested values (with reasons) for a dataset of ``n_images`` images of ~``side_px`` pixels."""
    out: list[Suggestion] = []
    crops, why = _crop_recipe(side_px, on_gpu)
    for key, value in crops.items():
        out.append(Suggestion(f"crops.{key}", value, why))

    if global_batch is None:
        per_process = 64 if on_gpu else 32
        global_batch = per_process * world_size
        while global_batch > max(world_size, n_images // 4) and global_batch > world_size:
            global_batch //= 2
        global_batch = max(world_size, global_batch // world_size * world_size)
        out.append(Suggestion("train.batch_size", global_batch,
                              f"{global_batch // world_size} per process x {world_size} process(es), at most a quarter "
                              "of the data so an epoch has several steps"))

    n_prototypes = int(min(3000, max(10, round(n_images / 50, -1 if n_images >= 500 else 0))))
    out.append(Suggestion("model.n_prototypes", n_prototypes,
                          f"~1 prototype per 50 images ({n_images} images), capped at the paper's 3000: over-cluster, "
                          "but keep every prototype fed"))

    if epochs is None:
        epochs = 800 if n_images <= 20_000 else 400 if n_images <= 200_000 else 200 if n_images <= 2_000_000 else 100
        out.append(Suggestion("train.epochs", epochs,
                              f"{n_images} images: small data needs more passes (paper: 200-800 epochs on ImageNet)"))

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

    workers = max(0, min(8, (os.cpu_count() or 1) // max(1, local_world_size)))
    out.append(Suggestion("data.num_workers", workers,
                          f"{os.cpu_count()} CPU core(s) shared by {local_world_size} process(es) on this machine"))

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


def apply(tree: dict, suggestions: list[Suggestion], chosen: set[str]) -> list[Suggestion]:
    """Write suggestions into the nested ``tree`` except for keys the user chose; return those applied."""
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


def auto_config(tree: dict) -> Config:
    """``--auto`` / ``pretrain(auto=True)``: a merged config tree (YAML files + overrides, see
    :func:`swavkit.config.merge_sources`) -> the validated Config, with every key the user did not set
    derived from the images under ``data.path`` (the bundled sample when unset) and the launcher's
    process count. Prints each derived value with its reason (main process only)."""
    from swavkit.data.shards import is_shard_spec
    from swavkit.data.sources import data_specs, describe_specs, resolve_images

    chosen = explicit_keys(tree)
    specs = data_specs(tree.get("data", {}).get("path", ""), tree.get("data", {}).get("paths", []))
    specs = specs or [str(BUNDLED_SAMPLE / "train")]
    if any(is_shard_spec(spec) for spec in specs):
        raise ConfigError("--auto reads image counts and sizes from files, not from tar shards; set the recipe "
                          "keys yourself (see configs/) or run --auto once on a folder or list of the same images")
    paths = resolve_images(specs)
    data_root = describe_specs(specs)
    launch = distributed.detect_launch()
    world = launch.world_size
    suggestions = derive(len(paths), typical_side_px(paths), world, local_world_size=launch.local_world_size,
                         global_batch=tree["train"]["batch_size"] if "train.batch_size" in chosen else None,
                         on_gpu=torch.cuda.is_available(),
                         epochs=tree["train"]["epochs"] if "train.epochs" in chosen else None)
    applied = apply(tree, suggestions, chosen)
    cfg = from_dict(tree)
    validate(cfg, world_size=world)
    if distributed.is_main_process():
        print(f"swavkit: --auto derived from {len(paths)} images in {data_root} and {world} process(es) "
              f"(keys you set are kept):\n{describe(applied)}")
    return cfg


__all__ = ["Suggestion", "auto_config", "derive", "typical_side_px", "explicit_keys", "apply", "describe"]
