"""The evaluation transform with the Preprocessing record that builds it, and the supervised training
augmentation of the linear probe and fine-tuning (the multi-crop augmentation of pretraining lives in
swavkit/data/multicrop.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.transforms import v2

from swavkit.data.channels import ArrayEvalTransform, ChannelReader
from swavkit.data.constants import IMAGENET_MEAN, IMAGENET_STD, crop_fraction_for, is_rgb8
from swavkit.errors import ConfigError


def eval_transform(size_px: int, mean, std, crop_fraction: float | None = None):
    """RGB PIL image -> [3, size_px, size_px] float32: resize the short side to size_px / crop_fraction,
    centre-crop size_px, normalise with mean/std. ``crop_fraction`` None = swavkit's evaluation rule
    (:func:`swavkit.data.constants.crop_fraction_for`)."""
    crop_fraction = crop_fraction_for(size_px) if crop_fraction is None else crop_fraction
    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize(int(math.floor(size_px / crop_fraction)), antialias=True),
        v2.CenterCrop(size_px),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


def train_transform(size_px: int, mean, std, min_crop_scale: float = 0.08):
    """RGB PIL image -> [3, size_px, size_px] float32: RandomResizedCrop(size_px, scale=(min_crop_scale, 1)) +
    horizontal flip + normalise with mean/std. The reference augmentation of both the linear probe and
    fine-tuning (one definition, so that the two protocols cannot drift apart)."""
    return v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop(size_px, scale=(min_crop_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(0.5),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


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
        return None if is_rgb8(self.channels, self.bit_depth) else ChannelReader(self.channels, self.bit_depth)

    def require_rgb(self, source, what: str) -> None:
        """ConfigError (one line) when ``source``'s backbone takes other than 8-bit RGB and ``what`` (a command whose
        augmentation is RGB-only: swavkit finetune, the reference linear probe) cannot feed it yet."""
        if not is_rgb8(self.channels, self.bit_depth):
            raise ConfigError(f"{source}: the backbone takes {self.channels} channel(s) at {self.bit_depth} bits; "
                              f"{what} augments 8-bit RGB images only (not yet): use swavkit knn or the fast linear "
                              "probe, which read images as the export says")

    def transform(self):
        """RGB PIL image -> [3, image_size_px, image_size_px] float32 (resize, centre crop, normalise); with
        another channel count or 16 bits, :meth:`reader`'s [C, H, W] array -> [C, image_size_px, image_size_px]."""
        if self.reader() is not None:
            return ArrayEvalTransform(self.image_size_px, self.mean, self.std, self.crop_fraction)
        return eval_transform(self.image_size_px, self.mean, self.std, self.crop_fraction)

    def as_dict(self) -> dict:
        record = {"image_size_px": self.image_size_px, "crop_fraction": self.crop_fraction,
                  "mean": list(self.mean), "std": list(self.std), "image_size_from": self.size_from}
        if not is_rgb8(self.channels, self.bit_depth):  # RGB records stay as they were
            record.update(channels=self.channels, bit_depth=self.bit_depth)
        return record
