"""How images become backbone inputs at evaluation time: the normalisation constants, the one crop rule,
and where a backbone's image size and mean/std come from.

Imports neither torch nor timm at module level, so ``swavkit.config`` can take its defaults from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# ImageNet RGB statistics: the defaults of config.crops and of every evaluation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE_PX = 224
# The usual centre crop: resize the short side to size / 0.875, keep the central size x size.
CENTRE_CROP_FRACTION = 0.875
# At CIFAR-like sizes that crop throws away an eighth of an already tiny image, so these are resized whole.
FULL_IMAGE_MAX_SIZE_PX = 64
# Backbone source that stands for "no network": flattened pixels, the floor every result must beat.
RAW_PIXELS_SOURCE = "pixels"
# 224 px would give 150,528-dimensional "features"; compare at the size of the backbone you test
RAW_PIXELS_DEFAULT_SIZE_PX = 32


def crop_fraction_for(image_size_px: int) -> float:
    """The evaluation crop rule: 1.0 (whole image) up to FULL_IMAGE_MAX_SIZE_PX, else CENTRE_CROP_FRACTION.

    Every evaluation (k-NN, linear probe, online monitor, cluster explorer) and the ``crop_pct`` of an
    export follow it.
    """
    return 1.0 if image_size_px <= FULL_IMAGE_MAX_SIZE_PX else CENTRE_CROP_FRACTION


@dataclass(frozen=True)
class Preprocessing:
    """How images become backbone inputs; recorded in every result."""
    image_size_px: int
    crop_fraction: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size_from: str  # where image_size_px came from: "argument", "export config", "checkpoint config", "default"
    bit_depth: int = 8  # data.bit_depth the backbone was trained with (16: 16-bit images keep 65536 levels)

    @classmethod
    def for_size(cls, image_size_px: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 size_from: str = "argument", bit_depth: int = 8) -> Preprocessing:
        """Preprocessing at ``image_size_px`` with the crop rule of :func:`crop_fraction_for`."""
        size = int(image_size_px)
        return cls(size, crop_fraction_for(size), tuple(float(m) for m in mean), tuple(float(s) for s in std),
                   size_from, int(bit_depth))

    @property
    def channels(self) -> int:
        """Input channels: one mean per channel."""
        return len(self.mean)

    def reader(self):
        """path -> what :meth:`transform` takes: None = swavkit.data.read_rgb (RGB PIL image), else a
        swavkit.data.channels.ChannelReader ([C, H, W] array) for other channel counts or 16 bits."""
        from swavkit.data.channels import ChannelReader, uses_arrays  # torch: only when images are read

        return ChannelReader(self.channels, self.bit_depth) if uses_arrays(self.channels, self.bit_depth) else None

    def transform(self):
        """RGB PIL image -> [3, image_size_px, image_size_px] float32 (resize, centre crop, normalise); with
        another channel count or 16 bits, :meth:`reader`'s [C, H, W] array -> [C, image_size_px, image_size_px]."""
        if self.reader() is not None:
            from swavkit.data.channels import ArrayEvalTransform

            return ArrayEvalTransform(self.image_size_px, self.mean, self.std, self.crop_fraction)
        from swavkit.data.transforms import eval_transform  # torchvision: only when images are read

        return eval_transform(self.image_size_px, self.mean, self.std, self.crop_fraction)

    def as_dict(self) -> dict:
        record = {"image_size_px": self.image_size_px, "crop_fraction": self.crop_fraction,
                  "mean": list(self.mean), "std": list(self.std), "image_size_from": self.size_from}
        if self.channels != 3 or self.bit_depth != 8:  # RGB records stay as they were
            record.update(channels=self.channels, bit_depth=self.bit_depth)
        return record


def _export_pretrained_cfg(source: Path) -> dict | None:
    for folder in (source, source / "backbone"):
        config = folder / "config.json"
        if config.is_file() and (folder / "model.safetensors").is_file():
            try:
                loaded = json.loads(config.read_text())
            except ValueError:
                return None
            # the export's data.bit_depth (swavkit.checkpoint.EXPORT_BIT_DEPTH_KEY) travels with its mean/std
            return {**loaded.get("pretrained_cfg", {}), "bit_depth": loaded.get("input_bit_depth", 8)}
    return None


def _checkpoint_crops(path: Path) -> dict | None:
    """The ``crops`` section of a swavkit training checkpoint's config, plus its data.bit_depth as
    ``bit_depth``; None for any other file."""
    from swavkit.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_state  # torch

    try:
        state = load_state(path)
    except CheckpointError:
        return None  # load_backbone will report the problem with its own message
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        config = state.get("config", {})
        return {**config.get("crops", {}), "bit_depth": config.get("data", {}).get("bit_depth", 8)}
    return None


def resolve_preprocessing(source: str | Path, image_size_px: int | None = None) -> Preprocessing:
    """Image size and normalisation for a backbone source.

    Size: ``image_size_px`` if given, else the ``input_size`` an exported folder records, else the
    large-crop size of a swavkit training checkpoint, else 224 (32 for ``"pixels"``). Mean/std follow the
    same sources (ImageNet statistics by default); ``"pixels"`` uses mean 0, std 1. The crop follows
    :func:`crop_fraction_for`. The channel count (len(mean)) and bit depth follow the export or checkpoint too.
    """
    size, mean, std, origin, bit_depth = None, IMAGENET_MEAN, IMAGENET_STD, "default", 8
    if str(source) == RAW_PIXELS_SOURCE:
        size, mean, std = RAW_PIXELS_DEFAULT_SIZE_PX, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    elif not str(source).startswith("timm:"):
        from swavkit.pretrained import resolve_source  # the one meaning of a source; heavy (timm)

        path = resolve_source(source, need="backbone")
        pretrained_cfg = _export_pretrained_cfg(path) if path.is_dir() else None
        if pretrained_cfg:
            if pretrained_cfg.get("input_size"):
                size, origin = int(pretrained_cfg["input_size"][-1]), "export config"
            mean = tuple(pretrained_cfg.get("mean", mean))
            std = tuple(pretrained_cfg.get("std", std))
            bit_depth = pretrained_cfg.get("bit_depth", 8)
        elif path.is_file() and path.suffix == ".pt":
            crops = _checkpoint_crops(path)
            if crops is not None:
                if crops.get("sizes_px"):
                    size, origin = int(crops["sizes_px"][0]), "checkpoint config"
                mean, std = tuple(crops.get("mean", mean)), tuple(crops.get("std", std))
                bit_depth = crops.get("bit_depth", 8)
    if image_size_px:
        size, origin = int(image_size_px), "argument"
    return Preprocessing.for_size(size or DEFAULT_IMAGE_SIZE_PX, mean, std, origin, bit_depth)


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DEFAULT_IMAGE_SIZE_PX", "CENTRE_CROP_FRACTION", "FULL_IMAGE_MAX_SIZE_PX",
           "RAW_PIXELS_SOURCE", "RAW_PIXELS_DEFAULT_SIZE_PX", "crop_fraction_for", "Preprocessing",
           "resolve_preprocessing"]
