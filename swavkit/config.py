"""The one typed source of defaults: dataclasses, YAML files that hold only what they change, and
``key=value`` overrides. Unknown keys and wrong types raise :class:`ConfigError` with one line.

Defaults follow the SwAV paper's batch-256 recipe (ImageNet, ResNet-50 initialised like the reference,
2x224 + 6x96 crops, LARS from 0.6 without warm-up, cosine to 0.0006) except that the queue is off;
``configs/`` holds recipes that change only what they need.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from swavkit.data.constants import IMAGENET_MEAN, IMAGENET_STD, is_rgb8  # stdlib only
from swavkit.errors import ConfigError
from swavkit.runtime.cores import default_num_workers


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class DataConfig:
    path: str = _help("the images: a folder, flat or nested (class folders are ignored); a .txt/.csv list of "
                      "image paths relative to the list (CSV: its 'path' column, else the first); or WebDataset "
                      "shards, a brace pattern or glob ending in .tar (shards/train-{000000..000099}.tar) or a list "
                      "of .tar paths (`swavkit shard` writes them). Empty = the bundled Fashion-MNIST sample",
                      default="")
    paths: list[str] = _help("several folders / list files read as one data set, in this order (instead of "
                             "data.path)", default_factory=list)
    samples_per_epoch: int = _help("shards only: images per epoch (all processes together); 0 = the count "
                                   "`swavkit shard` stored next to the shards", default=0)
    shuffle_buffer: int = _help("shards only: images each data worker holds to shuffle the stream (more = better "
                                "mixing, more memory: ~image bytes each)", default=1000)
    num_workers: int = _help("DataLoader worker processes; 0 decodes in the training process. Default: "
                             "min(4, usable CPU cores - 1)", default_factory=default_num_workers)
    pin_memory: bool = _help("page-locked host memory for faster host-to-GPU copies", default=True)
    prefetch_factor: int = _help("batches each worker prepares ahead", default=4)
    colour_on_device: str = _help("auto | true | false: workers only decode and cut; colour jitter, grayscale, "
                                  "blur and normalisation run batched on the training device (same views as "
                                  "in the workers). auto: on when training on a GPU, whose workers could not "
                                  "keep up (3x end-to-end images/s on an H200, benchmarks/README.md)",
                                  default="auto")
    decode_on_device: str = _help("auto | true | false: workers hand over JPEG files still encoded and the training "
                                  "process decodes each batch with torchvision.io.decode_jpeg on its device (nvJPEG "
                                  "on a GPU), cuts the crops there and runs the colour ops there too; other files "
                                  "are decoded by the workers as before. Same crops, pixels within a few levels of "
                                  "Pillow's decoder. auto: off until benchmarks/bench_gpu_pipeline.py has measured "
                                  "it on a GPU", default="auto")
    channels: int = _help("image channels fed to the backbone (timm's in_chans): 3 = RGB, every image converted to "
                          "RGB; 1 = grey (medical ...); N = multispectral TIFF stacks (samples or pages). With a value "
                          "other than 3 an image of another channel count is skipped and listed in skipped.txt, "
                          "colour jitter and grayscale are off, and crops.mean/std are computed from the data unless "
                          "given (swavkit/data/channels.py)", default=3)
    bit_depth: int = _help("8 | 16: precision of the pixels in the float tensor. 8 = 16-bit images scaled to 256 levels "
                           "(value * 255 // 65535); 16 = 16-bit images keep their 65536 levels (value / 65535; 8-bit "
                           "images value / 255). Recorded in the export", default=8)
    mean_std_sample_images: int = _help("images (evenly spaced over the data) whose pixels give the per-channel "
                                        "crops.mean/std when those are computed from the data", default=256)


@dataclass
class CropsConfig:
    """Multi-crop recipe, one entry per resolution group, large crops first."""
    counts: list[int] = _help("crops per resolution group", default_factory=lambda: [2, 6])
    sizes_px: list[int] = _help("output side length of each group's crops", default_factory=lambda: [224, 96])
    min_scales: list[float] = _help("smallest crop area as a fraction of the image", default_factory=lambda: [0.14, 0.05])
    max_scales: list[float] = _help("largest crop area as a fraction of the image", default_factory=lambda: [1.0, 0.14])
    color_jitter_strength: float = _help("s in ColorJitter(0.8s, 0.8s, 0.8s, 0.2s); lower it if training collapses",
                                         default=1.0)
    color_jitter_probability: float = _help("probability of applying colour jitter", default=0.8)
    grayscale_probability: float = _help("probability of converting a crop to grey", default=0.2)
    blur_probability: float = _help("probability of Gaussian blur (sigma 0.1..2); usually 0 for 32 px data",
                                    default=0.5)
    mean: list[float] = _help("normalisation mean, one per data.channels (ImageNet's RGB values by default); [] = "
                              "computed from data.mean_std_sample_images images, as for data.channels != 3 left at "
                              "the RGB default; the run records the numbers", default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = _help("normalisation std, one per data.channels; [] = computed like crops.mean",
                             default_factory=lambda: list(IMAGENET_STD))


@dataclass
class ModelConfig:
    backbone: str = _help("any timm model name, created with num_classes=0 (e.g. resnet18, resnet50, "
                          "vit_small_patch16_224)", default="resnet50")
    backbone_kwargs: dict = _help("extra keyword arguments for timm.create_model (weights come from model.init, "
                                  "never from pretrained=true)", default_factory=dict)
    init: str = _help("starting weights of the backbone; empty = random init. A timm pretrained name whose weights "
                      "are already on disk (e.g. resnet50.a1_in1k; never downloaded), an exported backbone folder, a "
                      "swavkit run folder or checkpoint, or a released SwAV/VISSL file. Head and prototypes always "
                      "start fresh", default="")
    zero_init_last: bool = _help("start the last BatchNorm of each residual block at 0, so every block begins as the "
                                 "identity (timm's default for ResNets) instead of 1 (false: the SwAV reference's "
                                 "torchvision-style ResNet-50). For backbones with timm's zero_init_last option "
                                 "(ResNet, ResNetV2, RegNet, ...); others have nothing to set", default=False)
    hidden_dim: int = _help("projection head hidden width (one hidden layer, the SwAV paper's 2048); 0 = a single "
                            "linear layer. model.head_dims replaces it for deeper heads", default=2048)
    head_dims: list[int] = _help("projection head hidden widths, one Linear (+ BN if head_bn) + ReLU each, then a "
                                 "Linear to output_dim; empty = [hidden_dim]. SEER: [8192, 8192] with head_bn false "
                                 "(configs/seer_*.yaml). Set it or hidden_dim, not both", default_factory=list)
    head_bn: bool = _help("BatchNorm1d after each hidden Linear of the projection head (the SwAV paper: true; SEER's "
                          "head: false)", default=True)
    output_dim: int = _help("embedding dimension fed to the prototypes", default=128)
    n_prototypes: int = _help("K, number of prototypes (clusters); ~10x the number of classes you expect. "
                              "Collapse shows as loss at ln K", default=3000)
    sync_batchnorm: str = _help("none | node | global: BatchNorm statistics across GPUs (per node like the "
                                "reference, or the whole job)", default="none")
    channels_last: str = _help("auto | true | false: NHWC memory format for convolutional backbones. auto: on a "
                               "GPU (an H200 ran the resnet50 step 1.7x faster in bf16), off on a CPU (1.03x)",
                               default="auto")
    compile: bool = _help("torch.compile the backbone with static shapes (opt-in; the first steps are slow while "
                          "it compiles one graph per crop resolution, and online k-NN monitoring compiles its own)",
                          default=False)
    activation_checkpointing: str = _help("off | on | a fraction of the backbone's blocks (e.g. 0.5): recompute their "
                                          "activations in the backward pass instead of storing them; same loss and "
                                          "gradients, less activation memory for ~one extra forward. on: every block "
                                          "timm's group_matcher names; a fraction: the first blocks, where CNN "
                                          "feature maps are largest (swavkit/core/activation_checkpointing.py)",
                                          default="off")


@dataclass
class DistConfig:
    """How the processes of a multi-process run share the model."""
    strategy: str = _help("ddp | fsdp. ddp: every process holds all weights, gradients and optimiser state "
                          "(DistributedDataParallel). fsdp: PyTorch FSDP2 fully_shard over the backbone's blocks and "
                          "the head, so each of N processes holds 1/N of them (prototypes stay whole); for models "
                          "bigger than one GPU, usually with model.activation_checkpointing=on. Needs >= 2 processes; "
                          "checkpoints are then sharded (torch.distributed.checkpoint) and resume at any process "
                          "count", default="ddp")


@dataclass
class SwAVConfig:
    epsilon: float = _help("Sinkhorn entropy regulariser; lower = sharper codes. If the loss sits at ln K, "
                           "try 0.03", default=0.05)
    sinkhorn_iterations: int = _help("Sinkhorn-Knopp iterations", default=3)
    sinkhorn_fp64: bool = _help("run Sinkhorn in float64 (slower; for very small epsilon)", default=False)
    temperature: float = _help("softmax temperature of the swapped prediction", default=0.1)
    assignment_crops: list[int] = _help("indices of the crops whose codes are predicted", default_factory=lambda: [0, 1])
    queue_length: int = _help("global queue of past embeddings per assignment crop (0 = off); needs to be a "
                              "multiple of the global batch. Use it when batch < ~1000", default=0)
    queue_start_epoch: int = _help("epoch at which the queue starts filling; it is used once full", default=15)
    freeze_prototypes_epochs: float = _help("epochs (fractions allowed) during which prototypes get no gradient",
                                            default=1.0)
    freeze_prototypes_steps: int = _help("optimiser steps during which prototypes get no gradient; -1 = from "
                                         "freeze_prototypes_epochs (which it replaces when >= 0). SEER: 313",
                                         default=-1)
    prevent_collapse: bool = _help("act when the codes stop carrying information: lower epsilon (down to "
                                   "min_epsilon) while the codes' per-sample entropy is above code_entropy_target x "
                                   "ln K, and stop using the queue if the loss returns to ln K while it is in use. "
                                   "false = the paper's fixed epsilon and queue (swavkit/training/collapse.py, "
                                   "benchmarks/README.md)", default=True)
    code_entropy_target: float = _help("prevent_collapse's target: mean per-sample code entropy as a fraction of "
                                       "ln K (0 = one-hot codes, 1 = uniform; healthy cifar10-small runs sat at "
                                       "0.5-0.7 with a fixed epsilon)", default=0.6)
    min_epsilon: float = _help("prevent_collapse's lower bound for epsilon", default=0.005)


@dataclass
class DeepClusterConfig:
    """method=deepclusterv2 (swavkit/core/deepcluster.py; docs/guides/deepcluster-v2.md). It also reads
    swav.assignment_crops (the crops whose embeddings fill the memory bank: the reference's crops_for_assign)
    and swav.temperature; SwAV's other swav.* keys (epsilon, queue, prototype freezing) do not apply."""
    n_heads: int = _help("k-means heads, each with model.n_prototypes clusters of its own and its own targets; the "
                         "loss is averaged over them (the reference: 3 heads of 3000)", default=3)
    kmeans_iterations: int = _help("spherical k-means iterations at every epoch start, over the memory bank of all "
                                   "processes (the reference: 10)", default=10)


@dataclass
class OptimConfig:
    """The LRs are at a global batch of ``reference_batch_size`` and move with the batch by the same factor.
    The paper's two recipes (facebookresearch/swav scripts): batch 4096: warm-up 10 epochs from 0.3 to 4.8,
    cosine to 0.0048 (configs/imagenet_resnet50.yaml); batch 256: 0.6, no warm-up, cosine to 0.0006 (the
    defaults, configs/single_gpu_queue.yaml). They are not linear in the batch: 0.6 x 4096/256 is 9.6."""
    optimizer: str = _help("lars | sgd | adamw | auto (adamw for transformer backbones, lars otherwise)",
                           default="auto")
    base_lr: float = _help("peak LR at a global batch of reference_batch_size (the paper: 0.6 at 256, 4.8 at "
                           "4096); 0 = the optimiser's reference at the actual batch: LARS/SGD 0.6 at 256 and 4.8 at "
                           "4096 (linear below 256, 0.6 x (batch/256)^0.75 above), AdamW 5e-4 per 256 (DINO)",
                           default=0.0)
    reference_batch_size: int = _help("global batch at which base_lr, warmup_start_lr and final_lr apply; another "
                                      "train.batch_size scales all three linearly", default=256)
    final_lr: float = _help("LR at the end of the cosine, at reference_batch_size; -1 = the peak LR / 1000, the "
                            "paper's ratio (4.8 -> 0.0048, 0.6 -> 0.0006)", default=-1.0)
    warmup_epochs: float = _help("linear warm-up length (the paper: 10 at batch 4096, none at 256; ViTs with "
                                 "AdamW want ~10)", default=0.0)
    warmup_steps: int = _help("linear warm-up length in optimiser steps, whatever the epoch length; -1 = from "
                              "warmup_epochs (set one of the two). SEER: 8000 (configs/seer_*.yaml)", default=-1)
    warmup_start_lr: float = _help("LR at step 0 when warming up, at reference_batch_size (the paper: 0.3 at 4096)",
                                   default=0.0)
    warmup_start_lr_absolute: bool = _help("true: warmup_start_lr is the LR itself at any batch, not scaled with "
                                           "train.batch_size (VISSL's SEER warm-up starts at 0.3 at batch 8192); "
                                           "false: stated at reference_batch_size like base_lr", default=False)
    weight_decay: float = _help("weight decay (not applied to biases and norm layers); at 0, LARS still adapts the "
                                "weights' step", default=1e-6)
    momentum: float = _help("SGD/LARS momentum", default=0.9)
    lars_trust_coefficient: float = _help("LARS trust coefficient", default=0.001)
    lars_exclude: str = _help("bn_bias | none: parameters LARS leaves alone. bn_bias = biases and norm layers get "
                              "neither weight decay nor the trust ratio (timm's Lars; the usual practice); none = "
                              "every parameter gets both, the SwAV reference's apex LARC (clip=False) exactly "
                              "(swavkit/core/larc.py; the paper configs set it)", default="bn_bias")


@dataclass
class TrainConfig:
    epochs: int = _help("passes over the data; with budget_minutes, only the run's shape (warm-up, prototype "
                        "freezing and queue start keep their share of it)", default=100)
    budget_minutes: float = _help("wall-clock minutes for the whole run, start-up and export included (0 = "
                                  "train.epochs decides). The first steps measure the speed, then the schedule is "
                                  "fitted to end on time and re-fitted if the speed changes (swavkit/training/budget.py)",
                                  default=0.0)
    batch_size: int = _help("GLOBAL batch (all processes together); must divide by the number of processes",
                            default=256)
    accumulate_steps: int = _help("micro-batches per optimiser step, to reach a batch that does not fit in memory: "
                                  "each process's batch (train.batch_size / processes) runs as this many micro-batches. "
                                  "The codes are computed first for the whole batch (a forward pass without "
                                  "gradients: ~1/3 more compute, benchmarks/README.md) with ONE Sinkhorn over all of "
                                  "it, so equipartition acts on train.batch_size samples as without accumulation; "
                                  "steps, LR, warm-up, freezing and the queue count optimiser steps. 1 = off",
                                  default=1)
    precision: str = _help("auto | fp32 | bf16 | fp16 (auto: bf16 on GPUs that support it, fp32 on CPU)",
                           default="auto")
    device: str = _help("auto | cpu | cuda", default="auto")
    log_every_steps: int = _help("steps between metrics.jsonl lines", default=10)
    checkpoint_every_minutes: float = _help("wall time between checkpoints (also saved each epoch and at exit)",
                                            default=10.0)
    checkpoint_every_steps: int = _help("steps between checkpoints (0 = by time only)", default=0)
    skip_nonfinite_steps: int = _help("non-finite losses to skip before stopping (0 = stop at the first)",
                                      default=0)
    signal_images: int = _help("training images (evenly spaced over the file list, fixed at the run's start and "
                               "listed in checkpoints/signal-images.txt) on which every checkpoint save measures a "
                               "label-free quality signal at the evaluation crop: RankMe (effective rank of the "
                               "backbone's features) and the prototypes' usage entropy, logged in metrics.jsonl; the "
                               "checkpoint with the highest RankMe is kept as checkpoints/best-rankme.pt. 0 = off. "
                               "Folders and list files (not tar shards), not with dist.strategy=fsdp", default=512)
    export_checkpoint: str = _help("last | rankme: which checkpoint the run's backbone/ export is made from: the last "
                                   "one, or checkpoints/best-rankme.pt (highest RankMe). On short CIFAR-10 and Fashion-MNIST runs RankMe "
                                   "ordered checkpoints only weakly as k-NN did (Spearman 0.31, 0.12) and its pick was "
                                   "~1 point below the last: docs/guides/checkpoint-selection.md",
                                   default="last")
    collapse_patience_steps: int = _help("steps with the loss within 1% of ln K before the collapse warning",
                                         default=200)
    memory_check: bool = _help("before the first step, estimate the peak memory of one step per process (model "
                               "state, activations at the per-process batch, crops, precision and checkpointing, data "
                               "workers; swavkit/training/memory_plan.py) and stop in one line when it exceeds the "
                               "host RAM or GPU memory available (SWAVKIT_MEMORY_AVAILABLE_BYTES / "
                               "SWAVKIT_GPU_MEMORY_AVAILABLE_BYTES override what the system reports). false: skip the "
                               "check (the estimate can be off for unusual backbones)", default=True)
    loggers: list[str] = _help("metric backends, each getting every metrics.jsonl row: jsonl (metrics.jsonl, always "
                               "needed), tensorboard (out_dir/tensorboard; `tensorboard --logdir OUT_DIR`), wandb "
                               "and mlflow (pip install 'swavkit[wandb]' / 'swavkit[mlflow]')",
                               default_factory=lambda: ["jsonl", "tensorboard"])


@dataclass
class MonitorConfig:
    """Online k-NN on a labelled folder while pretraining."""
    knn_data: str = _help("ImageFolder tree with train/ and val/ (or class folders); empty = off", default="")
    every_epochs: int = _help("epochs between k-NN evaluations", default=1)
    k: int = _help("neighbours", default=20)
    image_size: int = _help("eval image side (0 = the large crop size)", default=0)
    max_images: int = _help("cap on train images used (0 = all)", default=5000)
    floors: bool = _help("also k-NN of the same architecture randomly initialised and of raw pixels on the same "
                         "split, once per run, printed beside every result", default=True)


@dataclass
class Config:
    """The whole configuration of a pretraining run: one section per concern (``data``, ``crops``, ``model``,
    ``swav``, ``optim``, ``train``, ``monitor``, ``dist``) plus ``out_dir`` and ``seed``. Every key, its
    default, unit and meaning is in the configuration reference (``swavkit pretrain --help-config``).

    Build one with :func:`load_config` (files and ``key=value`` overrides, validated) rather than by hand; a
    run saves the resolved one as ``out_dir/config.yaml``.

    Example:
        >>> import swavkit
        >>> cfg = swavkit.load_config([], ["model.backbone=resnet18", "train.epochs=5"])
        >>> cfg.model.backbone, cfg.train.epochs, cfg.swav.epsilon
        ('resnet18', 5, 0.05)
    """

    out_dir: str = _help("run directory: config.yaml, metrics.jsonl, checkpoints/, backbone/", default="runs/swav")
    seed: int = _help("seed for weights, sampling and augmentation", default=0)
    method: str = _help("swav | deepclusterv2: the online-clustering method. swav: Sinkhorn codes per batch and the "
                        "swapped prediction (swav.*). deepclusterv2: a memory bank of last epoch's embeddings, "
                        "k-means at every epoch start whose clusters are the epoch's hard targets "
                        "(deepcluster.*; docs/guides/deepcluster-v2.md)", default="swav")
    data: DataConfig = field(default_factory=DataConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    swav: SwAVConfig = field(default_factory=SwAVConfig)
    deepcluster: DeepClusterConfig = field(default_factory=DeepClusterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    dist: DistConfig = field(default_factory=DistConfig)


# ----------------------------------------------------------------------------------------------------
# dict <-> dataclass with type checking

def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check/convert one value against its annotation; YAML already parsed numbers and bools."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool) and ("true" in CHOICES.get(key, ()) or key == "model.activation_checkpointing"):
            # an auto | true | false key: YAML read the word as a bool (other string keys still refuse
            # bools, so out_dir=off cannot quietly become "false")
            return str(value).lower()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if annotation is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    raise ConfigError(f"{key}: unsupported type {annotation}")


def _apply(obj, updates: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in names:
            # a section's key given without its section (epochs= for train.epochs) names it exactly
            sectioned = [f"{f.name}.{name}" for f in dataclasses.fields(obj) if dataclasses.is_dataclass(
                getattr(obj, f.name)) and name in {g.name for g in dataclasses.fields(getattr(obj, f.name))}]
            close = sectioned or [f"{prefix}{n}" for n in names if n.startswith(str(name)[:3])]
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint}; see `swavkit pretrain --help-config`")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of sub-keys, got {value!r}")
            _apply(current, value, prefix=f"{key}.")
        else:
            setattr(obj, name, _coerce(value, hints[name], key))


def from_dict(data: dict) -> Config:
    cfg = Config()
    _apply(cfg, data or {})
    return cfg


def parse_override(text: str) -> dict:
    """``a.b.c=value`` -> {"a": {"b": {"c": value}}}; the value is parsed as YAML (numbers, lists, bools)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key=value (e.g. train.epochs=10)")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if value is None:
        value = ""
    nested: dict = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def merge_trees(base: dict, update: dict) -> dict:
    """``update`` merged into the nested dict ``base`` (in place; a nested mapping merges key by key)."""
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge_trees(base[k], v)
        else:
            base[k] = v
    return base


# ----------------------------------------------------------------------------------------------------
# recipes: the configs/*.yaml files, shipped inside the wheel as swavkit/recipes/ (setup.py maps the folder)

def recipe_folders() -> list[Path]:
    """Where named recipes live: ``swavkit/recipes/`` in an installed wheel, the checkout's ``configs/`` when
    swavkit runs from its source tree (``pyproject.toml`` beside it, so no stray ``site-packages/configs``)."""
    package = Path(__file__).resolve().parent
    checkout = package.parent
    folders = [package / "recipes"]
    if (checkout / "pyproject.toml").is_file():
        folders.append(checkout / "configs")
    return [folder for folder in folders if folder.is_dir()]


def recipes() -> dict[str, Path]:
    """Recipe name (file name without ``.yaml``) -> its file, for ``--config NAME``."""
    found: dict[str, Path] = {}
    for folder in recipe_folders():
        for path in sorted(folder.glob("*.yaml")):
            found.setdefault(path.stem, path)
    return found


def recipe_summary(path: Path, max_chars: int = 160) -> str:
    """The first sentence of a recipe file's opening comment: what it is for."""
    words = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        words.append(line.lstrip("#").strip())
    text = " ".join(words)
    end = re.search(r"(?<!\bal)\.(\s|$)", text)  # a sentence's end, not "et al."
    text = text[:end.start() + 1] if end else text
    return text if len(text) <= max_chars else text[:max_chars - 3].rstrip() + "..."


def resolve_config_file(name: str | Path) -> Path:
    """A ``--config`` value -> the YAML file: an existing path as given, else a shipped recipe's name
    (``imagenet_resnet50`` or ``imagenet_resnet50.yaml``). ConfigError naming the recipes otherwise."""
    path = Path(name)
    if path.is_file():
        return path
    named = recipes()
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if path.parent == Path(".") and stem in named:
        return named[stem]
    hint = (f"; the shipped recipe of that name is --config {stem}" if stem in named
            else f"; shipped recipes (--config NAME): {', '.join(named) or 'none found'}")
    raise ConfigError(f"config file {path} does not exist{hint}")


def read_yaml(path: str | Path) -> dict:
    path = resolve_config_file(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read as UTF-8 text ({type(err).__name__})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return data


def merge_sources(config_files: list[str | Path] = (), overrides: list[str] = (), updates: dict | None = None) -> dict:
    """The nested dict of what the user set: each YAML file in order, then key=value overrides, then
    ``updates`` (a nested dict of Python values: the keyword API)."""
    merged: dict = {}
    for path in config_files:
        merge_trees(merged, read_yaml(path))
    for text in overrides:
        merge_trees(merged, parse_override(text))
    merge_trees(merged, copy.deepcopy(updates or {}))
    return merged


def load_config(config_files: list[str | Path] = (), overrides: list[str] = ()) -> Config:
    """Defaults <- each YAML file in order <- ``key=value`` overrides; then validated.

    Args:
        config_files: recipes applied in order, later ones winning: a YAML path or the name of a shipped
            recipe (``"imagenet_resnet50"``; ``swavkit pretrain --help-config`` lists them).
        overrides: ``"section.key=value"`` strings applied last; values are read as YAML
            (``"crops.sizes_px=[224, 96]"``).

    Returns:
        The validated :class:`Config`.

    Raises:
        ConfigError: one line naming the file or key: a missing file or unknown recipe name, invalid YAML,
            an unknown key, a value of the wrong type, or settings that contradict each other.

    Example:
        >>> import swavkit
        >>> cfg = swavkit.load_config(["cifar10_resnet18"], ["data.path=/data/imgs", "out_dir=runs/c"])
        >>> cfg.model.backbone, cfg.data.path
        ('resnet18', '/data/imgs')
    """
    cfg = from_dict(merge_sources(config_files, overrides))
    validate(cfg)
    return cfg


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML text (what a run saves as ``config.yaml``)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ----------------------------------------------------------------------------------------------------
# resuming: which changes a saved run accepts

# Keys a resumed run may change: they do not alter what has been computed so far (prefixes: "monitor."
# covers the whole section).
RESUMABLE_CHANGES = ("train.epochs", "train.budget_minutes", "swav.prevent_collapse", "swav.code_entropy_target",
                     "swav.min_epsilon", "train.log_every_steps", "train.checkpoint_every_minutes",
                     "train.checkpoint_every_steps", "train.device", "train.skip_nonfinite_steps",
                     "train.accumulate_steps",  # same codes and update; only BatchNorm's batch is smaller
                     "train.export_checkpoint",
                     "train.collapse_patience_steps", "train.memory_check", "data.num_workers", "data.pin_memory",
                     "data.prefetch_factor", "data.colour_on_device", "data.decode_on_device", "model.channels_last", "model.compile",
                     "model.init", "train.loggers", "monitor.", "out_dir",
                     "data.mean_std_sample_images",  # a resume takes the mean/std the run computed
                     "model.activation_checkpointing", "dist.strategy")  # recompute / sharding: same maths


def backbone_kwargs(cfg: Config) -> dict:
    """The keyword arguments every place that builds the backbone from a run's config (training, the memory plan,
    export, load_backbone, model.init checks) passes to timm: ``model.backbone_kwargs`` with data.channels as
    ``in_chans`` when it is not 3 (timm's default), so they all build the same one."""
    kwargs = dict(cfg.model.backbone_kwargs)
    if cfg.data.channels != 3:
        kwargs["in_chans"] = cfg.data.channels
    return kwargs


def _without_derived_in_chans(tree: dict) -> dict:
    """A ``to_dict`` config without ``model.backbone_kwargs.in_chans`` when it equals data.channels: runs saved
    before :func:`backbone_kwargs` derived it recorded it there, and it changes nothing."""
    model, data = tree.get("model"), tree.get("data")
    if not (isinstance(model, dict) and isinstance(data, dict) and isinstance(model.get("backbone_kwargs"), dict)):
        return tree
    kwargs = model["backbone_kwargs"]
    if "in_chans" not in kwargs or kwargs["in_chans"] != data.get("channels", 3):
        return tree
    return {**tree, "model": {**model, "backbone_kwargs": {k: v for k, v in kwargs.items() if k != "in_chans"}}}


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two ``to_dict`` configs, ignoring RESUMABLE_CHANGES."""
    if not prefix:
        saved, current = _without_derived_in_chans(saved), _without_derived_in_chans(current)
    diffs = []
    for key in sorted(set(saved) | set(current)):
        dotted = f"{prefix}{key}"
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key not in ("backbone_kwargs",):
            diffs += config_differences(a, b, f"{dotted}.")
        elif a != b and not dotted.startswith(RESUMABLE_CHANGES):
            diffs.append(dotted)
    return diffs


# ----------------------------------------------------------------------------------------------------
# validation: every message names the key

# dist.strategy: ddp = a whole model per process (DistributedDataParallel); fsdp = the weights sharded over the
# processes (FSDP2). Decided once, at start-up, by :func:`shards_weights` (swavkit.training.processes.Processes.sharded).
STRATEGIES = ("ddp", "fsdp")


def shards_weights(cfg: Config) -> bool:
    """True when ``dist.strategy`` shards the weights over the processes (fsdp), False for a whole model per
    process (ddp): the one place the strategy's name is read."""
    return cfg.dist.strategy == "fsdp"


CHOICES = {
    "model.sync_batchnorm": ("none", "node", "global"),
    "optim.optimizer": ("auto", "lars", "sgd", "adamw"),
    "optim.lars_exclude": ("bn_bias", "none"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "data.colour_on_device": ("auto", "true", "false"),
    "data.decode_on_device": ("auto", "true", "false"),
    "model.channels_last": ("auto", "true", "false"),
    "dist.strategy": STRATEGIES,
    "train.export_checkpoint": ("last", "rankme"),
}
LOGGER_CHOICES = ("jsonl", "tensorboard", "wandb", "mlflow")  # train.loggers entries (swavkit/training/loggers.py)


def check_logger_names(names) -> list[str]:
    """The names in order without repeats; ConfigError (naming ``train.loggers``) for an unknown one or a
    list without ``jsonl``."""
    names = list(dict.fromkeys(names))
    for name in names:
        if name not in LOGGER_CHOICES:
            raise ConfigError(f"train.loggers: '{name}' is not one of {', '.join(LOGGER_CHOICES)}")
    if "jsonl" not in names:
        raise ConfigError("train.loggers: must include jsonl (metrics.jsonl is the run's record that resuming and "
                          "swavkit plot read), e.g. train.loggers=[jsonl,tensorboard]")
    return names


def mean_std_from_data(cfg: Config) -> bool:
    """True when crops.mean/std are to be computed from the data: both [] or, with data.channels != 3, still
    ImageNet's three RGB values (which cannot normalise another channel count)."""
    c = cfg.crops
    if not c.mean and not c.std:
        return True
    rgb_default = tuple(c.mean) == IMAGENET_MEAN and tuple(c.std) == IMAGENET_STD
    return cfg.data.channels != 3 and rgb_default


def check_channel_settings(cfg: Config) -> None:
    """ConfigError (one line naming the key) for settings the array route cannot take. data.channels reaches the
    backbone as ``in_chans`` through :func:`backbone_kwargs`, not written here (this check is pure)."""
    d, c = cfg.data, cfg.crops
    if d.channels < 1:
        raise ConfigError(f"data.channels: must be >= 1, got {d.channels}")
    if d.bit_depth not in (8, 16):
        raise ConfigError(f"data.bit_depth: 8 or 16, got {d.bit_depth}")
    if d.mean_std_sample_images < 1:
        raise ConfigError(f"data.mean_std_sample_images: must be >= 1, got {d.mean_std_sample_images}")
    if bool(c.mean) != bool(c.std):
        raise ConfigError("crops.mean/crops.std: one is [] and the other is not; give both, or [] for both to "
                          "compute them from the data")
    if not mean_std_from_data(cfg) and not (len(c.mean) == len(c.std) == d.channels):
        raise ConfigError(f"crops.mean/crops.std: {len(c.mean)} and {len(c.std)} values for data.channels="
                          f"{d.channels}; give {d.channels} each, or [] to compute them from the data")
    in_chans = cfg.model.backbone_kwargs.get("in_chans", d.channels)
    if in_chans != d.channels:
        raise ConfigError(f"model.backbone_kwargs.in_chans={in_chans} differs from data.channels={d.channels}; "
                          "set data.channels only")
    if is_rgb8(d.channels, d.bit_depth):
        return
    if d.decode_on_device == "true":
        raise ConfigError(f"data.decode_on_device=true: decodes 8-bit RGB JPEGs only; with data.channels="
                          f"{d.channels} data.bit_depth={d.bit_depth} set it to false")
    if d.channels != 3 and cfg.monitor.knn_data:
        raise ConfigError(f"monitor.knn_data: the online k-NN reads RGB images; with data.channels={d.channels} "
                          "leave it empty and evaluate the export (swavkit.evaluation.features.extract_features)")


def parse_fraction(value: str) -> float:
    """``off|on|<fraction>`` -> the fraction of blocks to checkpoint, 0.0 .. 1.0 (ConfigError otherwise)."""
    text = str(value).strip().lower()
    if text in ("off", "false", "0", "none", ""):
        return 0.0
    if text in ("on", "true", "1", "all"):
        return 1.0
    try:
        fraction = float(text)
    except ValueError:
        fraction = math.nan
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"model.activation_checkpointing: '{value}' is not off, on or a fraction of blocks in (0, 1], e.g. 0.5")
    return fraction


def check_strategy(cfg: Config) -> None:
    """``model.activation_checkpointing`` and ``dist.strategy`` values (ConfigError, one line). The process count
    is checked at launch (:func:`swavkit.training.processes.check_processes`)."""
    parse_fraction(cfg.model.activation_checkpointing)
    if not shards_weights(cfg):
        return
    if cfg.train.precision == "fp16":
        raise ConfigError("train.precision=fp16 with dist.strategy=fsdp: fp16's loss scaler cannot unscale sharded "
                          "gradients here; use train.precision=bf16 (or fp32)")
    if cfg.monitor.knn_data:
        # its feature pass splits the images over the processes, possibly unevenly: a sharded backbone would
        # then wait in an all-gather that another process never joins
        raise ConfigError("monitor.knn_data with dist.strategy=fsdp is not supported yet; leave monitor.knn_data "
                          "empty and run `swavkit knn` on the export (or on a checkpoint) instead")
    if cfg.model.compile:
        raise ConfigError("model.compile=true with dist.strategy=fsdp is not supported yet; set model.compile=false")


METHODS = ("swav", "deepclusterv2")


def check_method(cfg: Config) -> None:
    """``method`` and what deepclusterv2 cannot take (ConfigError, one line naming the key)."""
    if cfg.method not in METHODS:
        raise ConfigError(f"method: '{cfg.method}' is not one of {', '.join(METHODS)}")
    if cfg.method != "deepclusterv2":
        return
    d = cfg.deepcluster
    for key, value in (("deepcluster.n_heads", d.n_heads), ("deepcluster.kmeans_iterations", d.kmeans_iterations)):
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if cfg.swav.queue_length:
        raise ConfigError(f"swav.queue_length={cfg.swav.queue_length}: the queue is SwAV's; method=deepclusterv2 keeps "
                          "a memory bank of the whole epoch instead; set swav.queue_length=0")
    if shards_weights(cfg):
        # the memory bank, the epoch's targets and the k-means writes into the prototypes have not been
        # carried through the sharded (DCP) checkpoint and its re-sharding on resume
        raise ConfigError("method=deepclusterv2 with dist.strategy=fsdp is not supported yet (its memory bank and "
                          "targets are not in the sharded checkpoint); use dist.strategy=ddp")
    if cfg.train.accumulate_steps > 1:
        # the accumulated step shares one Sinkhorn over the micro-batches, which deepclusterv2 has no use for
        # (its targets are fixed for the epoch); its memory-bank writes are not carried through the micro-batches
        raise ConfigError(f"train.accumulate_steps={cfg.train.accumulate_steps}: not supported with "
                          "method=deepclusterv2 yet; set train.accumulate_steps=1")


def prototype_rows(cfg: Config) -> int:
    """Rows of the model's prototype matrix: model.n_prototypes, or for deepclusterv2 one block of
    model.n_prototypes per k-means head (head after head, as a released checkpoint's prototypes0, 1, 2)."""
    return cfg.model.n_prototypes * (cfg.deepcluster.n_heads if cfg.method == "deepclusterv2" else 1)


def validate(cfg: Config, world_size: int = 1) -> None:
    """The config's own checks: choices, ranges, lengths, coherence (pure: nothing is imported, read or
    created). What needs the world - is the backbone a timm name, does model.init exist - is checked by
    :func:`swavkit.training.preflight.preflight`, which training runs before anything is written."""
    c = cfg.crops
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"{key}: '{value}' is not one of {', '.join(choices)}")
    check_logger_names(cfg.train.loggers)  # train.loggers: known names (LOGGER_CHOICES), jsonl included
    check_method(cfg)  # method and its section
    check_strategy(cfg)  # model.activation_checkpointing, dist.strategy (the process count: at launch)
    n_groups = len(c.counts)
    for name in ("sizes_px", "min_scales", "max_scales"):
        if len(getattr(c, name)) != n_groups:
            raise ConfigError(f"crops.{name}: has {len(getattr(c, name))} entries but crops.counts has {n_groups}; "
                              "give one value per resolution group")
    if n_groups == 0:
        raise ConfigError("crops.counts: needs at least one resolution group")
    for i in range(n_groups):
        if c.counts[i] < 1:
            raise ConfigError(f"crops.counts[{i}]: must be >= 1, got {c.counts[i]}")
        if c.sizes_px[i] < 1:
            raise ConfigError(f"crops.sizes_px[{i}]: must be >= 1, got {c.sizes_px[i]}")
        if not 0.0 < c.min_scales[i] <= c.max_scales[i] <= 1.0:
            raise ConfigError(f"crops.min_scales[{i}]/max_scales[{i}]: need 0 < min <= max <= 1, got "
                              f"{c.min_scales[i]}..{c.max_scales[i]}")
    if list(c.sizes_px) != sorted(c.sizes_px, reverse=True):
        raise ConfigError("crops.sizes_px: list the resolution groups from largest to smallest")
    n_crops = sum(c.counts)
    if n_crops < 2:
        raise ConfigError("crops.counts: swapped prediction needs at least 2 crops in total")
    for i in cfg.swav.assignment_crops:
        if not 0 <= i < n_crops:
            raise ConfigError(f"swav.assignment_crops: crop index {i} is outside 0..{n_crops - 1}")
    if not cfg.swav.assignment_crops:
        raise ConfigError("swav.assignment_crops: needs at least one crop index")

    check_channel_settings(cfg)
    positive = {
        "model.n_prototypes": cfg.model.n_prototypes, "model.output_dim": cfg.model.output_dim,
        "train.epochs": cfg.train.epochs, "train.batch_size": cfg.train.batch_size,
        "train.log_every_steps": cfg.train.log_every_steps, "swav.sinkhorn_iterations": cfg.swav.sinkhorn_iterations,
        "optim.reference_batch_size": cfg.optim.reference_batch_size,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    strictly_positive_floats = {"swav.epsilon": cfg.swav.epsilon, "swav.temperature": cfg.swav.temperature,
                                "swav.min_epsilon": cfg.swav.min_epsilon}
    _validate_lr(cfg.optim)
    for key, value in strictly_positive_floats.items():
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{key}: must be a positive number, got {value}")
    if cfg.swav.freeze_prototypes_steps < -1:
        raise ConfigError(f"swav.freeze_prototypes_steps: must be >= 0, or -1 for swav.freeze_prototypes_epochs, got "
                          f"{cfg.swav.freeze_prototypes_steps}")
    if not 0.0 < cfg.swav.code_entropy_target < 1.0:
        raise ConfigError(f"swav.code_entropy_target: a fraction of ln K strictly between 0 and 1, got "
                          f"{cfg.swav.code_entropy_target}")
    non_negative = {"model.hidden_dim": cfg.model.hidden_dim, "data.num_workers": cfg.data.num_workers,
                    "data.samples_per_epoch": cfg.data.samples_per_epoch, "data.shuffle_buffer": cfg.data.shuffle_buffer,
                    "swav.queue_length": cfg.swav.queue_length, "swav.queue_start_epoch": cfg.swav.queue_start_epoch,
                    "swav.freeze_prototypes_epochs": cfg.swav.freeze_prototypes_epochs,
                    "optim.warmup_epochs": cfg.optim.warmup_epochs, "optim.weight_decay": cfg.optim.weight_decay,
                    "train.budget_minutes": cfg.train.budget_minutes,
                    "train.checkpoint_every_steps": cfg.train.checkpoint_every_steps,
                    "train.signal_images": cfg.train.signal_images,
                    "train.skip_nonfinite_steps": cfg.train.skip_nonfinite_steps}
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    if cfg.train.batch_size % world_size:
        raise ConfigError(f"train.batch_size: the global batch {cfg.train.batch_size} does not divide by "
                          f"{world_size} processes; use a multiple of {world_size}")
    if cfg.train.accumulate_steps < 1:
        raise ConfigError(f"train.accumulate_steps: must be >= 1 (1 = no accumulation), got {cfg.train.accumulate_steps}")
    if (cfg.train.batch_size // world_size) % cfg.train.accumulate_steps:
        per_process = cfg.train.batch_size // world_size
        raise ConfigError(f"train.accumulate_steps: {per_process} images per process (train.batch_size "
                          f"{cfg.train.batch_size} / {world_size}) do not split into {cfg.train.accumulate_steps} "
                          "equal micro-batches; use a divisor of it")
    if cfg.swav.queue_length and cfg.swav.queue_length % cfg.train.batch_size:
        raise ConfigError(f"swav.queue_length: {cfg.swav.queue_length} is not a multiple of the global batch "
                          f"{cfg.train.batch_size}; try {max(1, round(cfg.swav.queue_length / cfg.train.batch_size)) * cfg.train.batch_size}")
    _validate_model(cfg.model)


# timm.create_model arguments that load weights: swavkit loads them itself (model.init), strictly and offline
WEIGHT_LOADING_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path")


def head_hidden_dims(m: ModelConfig) -> list[int]:
    """The projection head's hidden widths: ``model.head_dims``, else ``[model.hidden_dim]`` ([] when it is 0)."""
    if m.head_dims:
        return list(m.head_dims)
    return [m.hidden_dim] if m.hidden_dim else []


def _validate_model(m: ModelConfig) -> None:
    """The head's widths; timm arguments that swavkit owns (weights, classifier); the name and the weight
    source are checked by the pre-flight step (they need timm and the disk)."""
    if m.head_dims and m.hidden_dim != ModelConfig.hidden_dim:
        raise ConfigError(f"model.head_dims={list(m.head_dims)} and model.hidden_dim={m.hidden_dim} both set the head's "
                          "hidden widths; keep head_dims (the list) and remove hidden_dim")
    for i, width in enumerate(m.head_dims):
        if width < 1:
            raise ConfigError(f"model.head_dims[{i}]: a hidden width must be >= 1, got {width}; use an empty list "
                              "and model.hidden_dim=0 for a single linear head")
    for name in WEIGHT_LOADING_KWARGS:
        if name in m.backbone_kwargs:
            raise ConfigError(f"model.backbone_kwargs.{name}: swavkit never loads weights through timm.create_model; "
                              "set model.init instead (a timm pretrained name whose weights are on disk, e.g. "
                              f"model.init={m.backbone}.<tag>, an exported folder or a checkpoint) and remove {name}")
    if "num_classes" in m.backbone_kwargs:
        raise ConfigError("model.backbone_kwargs.num_classes: the backbone is always created with num_classes=0 "
                          "(pooled features, no classifier); remove it")


def _validate_lr(o: OptimConfig) -> None:
    """The LR keys: finite, non-negative (final_lr may be -1), and coherent with base_lr."""
    for name in ("base_lr", "warmup_start_lr", "final_lr"):
        value = getattr(o, name)
        if not math.isfinite(value) or (value < 0 and not (name == "final_lr" and value == -1)):
            allowed = ", or -1 for the peak LR / 1000" if name == "final_lr" else ""
            raise ConfigError(f"optim.{name}: must be >= 0{allowed}, got {value}")
    if o.warmup_steps < -1:
        raise ConfigError(f"optim.warmup_steps: must be >= 0, or -1 for optim.warmup_epochs, got {o.warmup_steps}")
    if o.warmup_steps >= 0 and o.warmup_epochs > 0:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} and optim.warmup_epochs={o.warmup_epochs} both set the "
                          "warm-up; keep one (warmup_steps=-1 or warmup_epochs=0)")
    if o.base_lr == 0:
        # base_lr 0 picks the reference peak for the actual batch, so an explicit start or end LR, which is
        # stated at reference_batch_size, has nothing fixed to relate to.
        for name in ("warmup_start_lr", "final_lr"):
            if getattr(o, name) > 0:
                raise ConfigError(f"optim.{name}={getattr(o, name)} needs an explicit optim.base_lr (both at "
                                  f"optim.reference_batch_size={o.reference_batch_size}); set optim.base_lr too, "
                                  "e.g. 0.6 at 256")
        return
    if o.final_lr > o.base_lr:
        raise ConfigError(f"optim.final_lr: {o.final_lr} is above optim.base_lr {o.base_lr}, so the cosine would "
                          "raise the LR; use a final LR below the peak (the paper: peak / 1000)")
    if o.warmup_start_lr_absolute:  # an LR at the actual batch: base_lr's scale is not known here
        return
    if o.warmup_start_lr > o.base_lr:
        raise ConfigError(f"optim.warmup_start_lr: {o.warmup_start_lr} is above optim.base_lr {o.base_lr}, so the "
                          "warm-up would lower the LR; start below the peak (the paper: 0.3 to 4.8)")


def describe(cls=Config, prefix: str = "", recipe=None) -> list[str]:
    """Lines ``key (type, default): help`` for --help-config; with ``recipe`` (a Config of the same
    class) each key the recipe changes reads ``key (type, default D, recipe V): help``."""
    lines = []
    default = cls()
    for f in dataclasses.fields(cls):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            lines.extend(describe(type(value), f"{prefix}{f.name}.", getattr(recipe, f.name, None)))
        else:
            type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            changed = recipe is not None and getattr(recipe, f.name) != value
            set_by = f", recipe {getattr(recipe, f.name)!r}" if changed else ""
            lines.append(f"{prefix}{f.name} ({type_name}, default {value!r}{set_by}): {f.metadata.get('help', '')}")
    return lines


def describe_recipes() -> list[str]:
    """Lines ``NAME: what it is for`` of every shipped recipe, for --help-config."""
    return [f"{name}: {recipe_summary(path)}" for name, path in recipes().items()]

