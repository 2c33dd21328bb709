"""Linear classifier on a frozen backbone, with two recipes and one rule: nothing is chosen on the
split that is reported.

- ``fast``: on cached features. Features are standardised; a softmax regression is fitted to
  convergence with full-batch L-BFGS (convex, so no epoch or learning rate to pick). The only
  hyperparameter, the L2 weight decay, is chosen from a small grid on a held-out, class-stratified part
  of TRAIN; the classifier is then refitted on all of TRAIN with that value and evaluated once on VAL.
  Cheap enough for a CPU: one pass over the images, then fits on cached features.
- ``reference`` (the SwAV/DINO recipe, for GPUs): random-resized-crop + flip images through the frozen
  backbone (eval mode, BN statistics frozen), SGD momentum 0.9, lr 0.3 x batch/256 with a cosine
  schedule to 0, weight decay 1e-6, 100 epochs, centre-crop evaluation; fixed hyperparameters, and
  the last epoch is reported.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from swavkit.runtime import distributed
from swavkit.errors import ConfigError
from swavkit.runtime.cores import default_num_workers, threads_for_size
from swavkit.data import LabelledImageFolder
from swavkit.data.transforms import train_transform as augment
from swavkit.runtime.device import autocast_dtype, resolve_device, resolve_precision
from swavkit.evaluation.options import DEFAULT_WEIGHT_DECAYS, RECIPES, EvalOptions, LinearOptions, apply_keywords
from swavkit.evaluation import setup
from swavkit.evaluation.features import (SplitFeatures, backbone_name, backbone_record, extract_features,
                              extract_split_features, load_eval_backbone)
from swavkit.evaluation.metrics import topk_accuracy
from swavkit.data.transforms import Preprocessing
from swavkit.evaluation.report import data_record
from swavkit.core.schedule import LRSchedule
from swavkit.evaluation.supervised import SupervisedRun, feature_dim_of, linear_head, train_supervised
from swavkit.runtime.signals import StopRequest



# ----------------------------------------------------------------------------------------------------
# fast recipe: cached features

def stratified_holdout(labels: torch.Tensor, fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (fit [N - H], holdout [H]): a seeded random ``fraction`` of each class is held out.

    A class with a single image stays in the fit part. Both index tensors are sorted.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"holdout fraction must be in (0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    held = []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        n_held = int(round(fraction * len(members))) if len(members) > 1 else 0
        n_held = min(n_held, len(members) - 1)
        held.append(members[torch.randperm(len(members), generator=generator)[:n_held]])
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[torch.cat(held)] = True
    return torch.nonzero(~mask).flatten(), torch.nonzero(mask).flatten()


def standardisation(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], std [D]) of the given (training) features; constant dimensions get std 1."""
    mean = features.mean(dim=0)
    std = features.std(dim=0)
    return mean, torch.where(std > 1e-6, std, torch.ones_like(std))


def fit_softmax_regression(features: torch.Tensor, labels: torch.Tensor, n_classes: int, weight_decay: float,
                           *, max_iterations: int = 300,
                           start: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS; returns (weight [C, D], bias [C]).

    Minimises mean cross-entropy + weight_decay / 2 * ||W||^2 (bias not decayed), from zero weights or
    from ``start`` (a solution for a larger weight decay: a warm start along the regularisation path).
    The problem is convex, so a converged result depends on weight_decay only, not on the start or an
    epoch. Runs on the device of ``features`` [N, D] (float32).
    """
    features = features.float()
    labels = labels.to(features.device).long()
    if start is None:
        weight = torch.zeros(n_classes, features.shape[1], device=features.device)
        bias = torch.zeros(n_classes, device=features.device)
    else:
        weight, bias = (t.detach().clone().to(features.device) for t in start)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iterations, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, labels) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad(), threads_for_size(features.device, features.numel() * n_classes):
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def _top1(weight, bias, features, labels) -> float:
    return topk_accuracy((features @ weight.T + bias).cpu(), labels)["top1"]


def linear_probe_fast(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                      val_labels: torch.Tensor, *, n_classes: int | None = None,
                      weight_decays=DEFAULT_WEIGHT_DECAYS, holdout_fraction: float = 0.2, seed: int = 0,
                      max_iterations: int = 300, device: str | torch.device = "cpu") -> dict:
    """The fast recipe on features [N_train, D] / [N_val, D]; returns metrics and the selection record.

    Returns:
        {"top1": % on val, "top5": % (more than 5 classes), "selected_weight_decay": float,
         "holdout_top1": {weight_decay: % on the held-out part of train}, "train_top1": % (fit on all
         train, measured on train), "n_fit": int, "n_holdout": int}
    """
    n_classes = n_classes or int(max(train_labels.max(), val_labels.max())) + 1
    weight_decays = tuple(float(w) for w in weight_decays)
    if not weight_decays:
        raise ConfigError("weight_decays: give at least one value")
    train_features = train_features.to(device).float()
    train_labels = train_labels.to(device).long()
    fit, holdout = stratified_holdout(train_labels.cpu(), holdout_fraction, seed)
    fit, holdout = fit.to(device), holdout.to(device)

    # 1) choose the weight decay on held-out TRAIN images (statistics from the fit part only)
    holdout_top1 = {}
    if len(weight_decays) > 1:
        if len(holdout) == 0:
            raise ConfigError("the held-out part of train is empty; give more than one image per class")
        mean, std = standardisation(train_features[fit])
        fit_x = (train_features[fit] - mean) / std
        holdout_x = (train_features[holdout] - mean) / std
        solution = None
        for wd in sorted(weight_decays, reverse=True):  # strong to weak: each fit warm-starts the next
            solution = fit_softmax_regression(fit_x, train_labels[fit], n_classes, wd,
                                              max_iterations=max_iterations, start=solution)
            holdout_top1[wd] = _top1(*solution, holdout_x, train_labels[holdout])
        # ties go to the strongest regularisation: the simpler model
        chosen = max(weight_decays, key=lambda wd: (holdout_top1[wd], wd))
    else:
        chosen = weight_decays[0]

    # 2) refit on all of TRAIN with the chosen value; evaluate once on VAL
    mean, std = standardisation(train_features)
    train_x = (train_features - mean) / std
    weight, bias = fit_softmax_regression(train_x, train_labels, n_classes, chosen, max_iterations=max_iterations)
    val_x = (val_features.to(device).float() - mean) / std
    metrics = topk_accuracy((val_x @ weight.T + bias).cpu(), val_labels)
    metrics.update(selected_weight_decay=chosen, holdout_top1={str(k): v for k, v in holdout_top1.items()},
                   train_top1=_top1(weight, bias, train_x, train_labels.cpu()), n_fit=int(len(fit)),
                   n_holdout=int(len(holdout)))
    return metrics


# ----------------------------------------------------------------------------------------------------
# reference recipe: augmented images through the frozen backbone

def train_transform(preprocessing: Preprocessing, min_crop_scale: float = 0.08):
    """RandomResizedCrop(size, scale=(min_crop_scale, 1)) + horizontal flip + normalise -> [3, s, s]
    (:func:`swavkit.data.transforms.train_transform` at ``preprocessing``'s size, mean and std)."""
    return augment(preprocessing.image_size_px, preprocessing.mean, preprocessing.std, min_crop_scale)


REFERENCE_PROBE_FORMAT = "swavkit-linear-reference-v1"  # the checkpoint of a reference linear probe


def linear_probe_reference(backbone: torch.nn.Module, train_dataset, val_dataset, *, n_classes: int,
                           epochs: int = 100, batch_size: int = 256, lr: float = 0.3,
                           weight_decay: float = 1e-6, momentum: float = 0.9, num_workers: int | None = None,
                           device: str | torch.device = "cpu", precision: str = "auto", seed: int = 0,
                           progress: bool = True, checkpoint: str | Path | None = None,
                           checkpoint_every_minutes: float = 10.0, stop_request: StopRequest | None = None) -> dict:
    """Train a linear layer on frozen-backbone features of augmented images; evaluate the last epoch.

    The loop is :mod:`swavkit.evaluation.supervised` with the trunk frozen: under torchrun the global batch is
    split over the processes; with ``checkpoint`` (a file path) the state is saved there every
    ``checkpoint_every_minutes``, at the end and on a signal caught by ``stop_request``, and the same call
    resumes from it (after a kill -9 too) to the result of an uninterrupted run.

    Args:
        train_dataset: labelled items with the augmenting transform (:func:`train_transform`).
        val_dataset: labelled items with the centre-crop eval transform.
        batch_size: GLOBAL batch (split over torchrun processes); the peak LR is lr x batch_size / 256.
    Returns:
        {"top1", "top5" (more than 5 classes), "final_train_loss" (last epoch, all processes' batches),
         "peak_lr", "steps", "feature_dim"}
    Raises:
        TrainingDiverged: the loss became non-finite (the last good state is saved).
        CheckpointError: ``checkpoint`` is not a reference probe's, or one of another setup.
    """
    device = resolve_device(device)
    dtype = autocast_dtype(resolve_precision(precision, device))
    num_workers = default_num_workers() if num_workers is None else num_workers
    peak_lr = lr * batch_size / 256
    backbone.to(device).eval()  # frozen: BN uses its running statistics, no parameter is updated
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        feature_dim = feature_dim_of(backbone, train_dataset, 0, device)
        head = linear_head(feature_dim, n_classes).to(device)
        optimizer = torch.optim.SGD([{"params": list(head.parameters()), "name": "head"}], lr=peak_lr,
                                    momentum=momentum, weight_decay=weight_decay)
        steps_per_epoch = len(train_dataset) // batch_size
        # cosine from the peak to 0, no warm-up: the SwAV/DINO linear-evaluation schedule
        schedule = LRSchedule(peak_lr=peak_lr, final_lr=0.0, warmup_start_lr=0.0, warmup_steps=0,
                              total_steps=epochs * steps_per_epoch)
        setup = {"n_classes": n_classes, "feature_dim": feature_dim, "n_train": len(train_dataset), "epochs": epochs,
                 "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "momentum": momentum, "seed": seed}
        run = SupervisedRun(trunk=backbone, head=head, train_trunk=False, dataset=train_dataset,
                            indices=list(range(len(train_dataset))), epochs=epochs, batch_size=batch_size, seed=seed,
                            optimizer=optimizer, schedules=[schedule], device=device, dtype=dtype,
                            scaler=torch.amp.GradScaler(device.type, enabled=False), num_workers=num_workers,
                            checkpoint=Path(checkpoint) if checkpoint is not None else None,
                            format_tag=REFERENCE_PROBE_FORMAT, every_minutes=checkpoint_every_minutes,
                            setup=setup, stop_request=stop_request,
                            description="linear probe", progress=progress and distributed.is_main_process(),
                            lr_hint="lower --lr", remedy="delete it or choose another checkpoint path")
        outcome = train_supervised(run)
    val_features, val_labels = extract_features(backbone, val_dataset, device, batch_size // distributed.world_size(),
                                                num_workers, precision=precision, progress=progress,
                                                description="val features")
    with torch.no_grad():
        logits = head.cpu()(val_features)
    metrics = topk_accuracy(logits, val_labels)
    metrics.update(final_train_loss=outcome["history"][-1]["train_loss"], peak_lr=peak_lr, steps=outcome["steps"],
                   feature_dim=feature_dim)
    return metrics


# ----------------------------------------------------------------------------------------------------
# `swavkit linear`

def _run_fast(split: SplitFeatures, linear: LinearOptions, device: torch.device, precision: str):
    """(metrics or None off the main process, protocol, timings) of the fast recipe on cached features."""
    metrics, timings = None, {}
    if distributed.is_main_process():
        fit_start = time.perf_counter()
        metrics = linear_probe_fast(split.train_features, split.train_labels, split.val_features, split.val_labels,
                                    n_classes=len(split.classes), weight_decays=linear.weight_decays,
                                    holdout_fraction=linear.holdout_fraction, seed=linear.seed,
                                    max_iterations=linear.lbfgs_iterations, device=device)
        timings = {"features": round(split.extraction_s, 3), "fit": round(time.perf_counter() - fit_start, 3)}
    protocol = {"recipe": "fast", "classifier": "softmax regression, full-batch L-BFGS (sweep warm-started "
                                              "from strong to weak decay; final fit from zeros)",
                "feature_standardisation": "per-dimension mean/std of the fitting split",
                "weight_decay_grid": list(linear.weight_decays), "holdout_fraction": linear.holdout_fraction,
                "selection": "weight decay with the best top-1 on a stratified held-out part of train; "
                             "refit on all train; val evaluated once",
                "lbfgs_iterations": linear.lbfgs_iterations, "seed": linear.seed, "precision": precision}
    return metrics, protocol, timings


def _run_reference(backbone, train_dir, val_dir, preprocessing: Preprocessing, options: EvalOptions,
                   linear: LinearOptions):
    """(metrics, protocol, timings, data record) of the reference recipe on augmented images."""
    preprocessing.require_rgb("the backbone", "the reference linear probe (--recipe reference)")
    train = LabelledImageFolder(train_dir, train_transform(preprocessing, linear.min_crop_scale),
                                max_per_class=options.max_per_class)
    val = LabelledImageFolder(val_dir, preprocessing.transform(), classes=train.classes,
                              max_per_class=options.max_per_class)
    fit_start = time.perf_counter()
    with StopRequest() as stop_request:  # with a checkpoint, SIGTERM saves and exits 3; the same command resumes
        metrics = linear_probe_reference(backbone, train, val, n_classes=len(train.classes), epochs=linear.epochs,
                                         batch_size=options.batch_size, lr=linear.lr,
                                         weight_decay=linear.weight_decay, momentum=linear.momentum,
                                         num_workers=options.num_workers, device=options.device,
                                         precision=options.precision, seed=linear.seed, progress=options.progress,
                                         checkpoint=linear.checkpoint or None,
                                         stop_request=stop_request if linear.checkpoint else None)
    timings = {"train_and_eval": round(time.perf_counter() - fit_start, 3)}
    data = data_record(train_dir, val_dir, len(train), len(val), train.classes, options.max_per_class)
    protocol = {"recipe": "reference", "epochs": linear.epochs, "global_batch_size": options.batch_size,
                "base_lr_at_batch_256": linear.lr, "peak_lr": metrics.pop("peak_lr"), "lr_schedule": "cosine to 0",
                "optimizer": "SGD", "momentum": linear.momentum, "weight_decay": linear.weight_decay,
                "train_augmentation": f"RandomResizedCrop(scale=({linear.min_crop_scale}, 1)) + horizontal flip",
                "eval_transform": "resize + centre crop", "backbone_mode": "eval (frozen BN statistics)",
                "selection": "none: fixed hyperparameters, last epoch reported", "seed": linear.seed,
                "precision": options.precision, "steps": metrics.pop("steps")}
    return metrics, protocol, timings, data


def evaluate_linear(backbone_source: str | Path, train_dir: str | Path, val_dir: str | Path,
                    options: EvalOptions | None = None, linear: LinearOptions | None = None, *,
                    features: SplitFeatures | None = None, **keywords) -> dict:
    """Linear-probe top-1/top-5 of a frozen backbone on a train/val pair of labelled folders.

    Args:
        backbone_source: exported folder, run folder, training checkpoint, released SwAV checkpoint,
            ``timm:<name>`` (random init) or ``pixels`` (raw pixels).
        train_dir: the labelled train split, a ``DIR/<class>/<image>`` tree (part of it is held out to choose
            the weight decay; nothing is chosen on ``val_dir``).
        val_dir: the labelled val split, a tree with the same class names (reported).
        options: extraction and output (:class:`swavkit.evaluation.options.EvalOptions`).
        linear: the recipe and its hyperparameters (:class:`swavkit.evaluation.options.LinearOptions`).
        features: (fast recipe) features already extracted from these folders with this backbone.
        **keywords: any field of either options class, e.g. ``recipe="reference", epochs=10`` (they override it).

    Returns:
        the result record (see :func:`swavkit.evaluation.report.build_result`): ``metrics`` (``top1``,
        ``top5`` in percent), the ``protocol`` and chosen hyperparameters, the floors when they ran;
        identical on every process, and written to ``options.out_json`` (unless ``""``).

    Raises:
        LoadError: the backbone source cannot be loaded.
        DataError: a split is missing, holds no class folders, or their class names differ.

    Example:
        ```python
        result = swavkit.evaluate_linear("runs/a", "/data/cifar10/train", "/data/cifar10/val")
        print(result["metrics"]["top1"])
        ```
    """
    options, linear = apply_keywords(keywords, options or EvalOptions(), linear or LinearOptions())
    if linear.recipe not in RECIPES:
        raise ConfigError(f"recipe: '{linear.recipe}' is not one of {', '.join(RECIPES)}")
    if features is not None and linear.recipe != "fast":
        raise ConfigError("precomputed features only fit the fast recipe (the reference one augments images)")
    if linear.checkpoint and linear.recipe != "reference":
        raise ConfigError("--checkpoint / checkpoint: only the reference recipe trains long enough to resume; the "
                          "fast recipe is minutes on cached features: drop it, or pass --recipe reference")
    run = setup.start("linear", backbone_source, options)
    options = replace(options, device=run.device)
    preprocessing = setup.preprocessing_for(backbone_source, options.image_size_px, features)
    backbone = load_eval_backbone(backbone_source) if features is None else None
    if linear.recipe == "fast":
        split = features or extract_split_features(backbone, train_dir, val_dir, preprocessing, options)
        metrics, protocol, timings = _run_fast(split, linear, run.device, options.precision)
        data = split.data_record(train_dir, val_dir, options.max_per_class)
        feature_dim, name = split.feature_dim, split.backbone_name
    else:
        metrics, protocol, timings, data = _run_reference(backbone, train_dir, val_dir, preprocessing, options,
                                                          linear)
        feature_dim, name = metrics.pop("feature_dim"), backbone_name(backbone)
    result = None
    if distributed.is_main_process():
        for key in ("selected_weight_decay", "holdout_top1", "n_fit", "n_holdout"):
            if key in metrics:
                protocol[key] = metrics.pop(key)
        result = run.record(metrics=metrics, protocol=protocol, backbone=backbone_record(backbone_source, name, feature_dim),
                            data=data, preprocessing=preprocessing, extra={"timings_s": timings})
    result = run.publish(result, options.out_json)
    if features is not None:  # features shared with another evaluation: its floors are that one's
        return result
    return run.beside(result, evaluate_linear, train_dir, val_dir, options, linear)


__all__ = ["linear_probe_fast", "linear_probe_reference", "evaluate_linear", "fit_softmax_regression",
           "stratified_holdout", "standardisation", "train_transform"]
