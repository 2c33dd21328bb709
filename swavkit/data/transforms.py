"""The evaluation transform with the Preprocessing record that builds it, and the supervised training
augmentation of the linear probe and fine-tuning (the multi-crop augmentation of pretraining lives in
swavkit/data/multicrop.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.transforms import v2

from swavkit.data.constants import IMAGENET_MEAN, IMAGENET_STD, crop_fraction_for


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

    @classmethod
    def for_size(cls, image_size_px: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 size_from: str = "argument") -> Preprocessing:
        """Preprocessing at ``image_size_px`` with the crop rule of :func:`crop_fraction_for`."""
        size = int(image_size_px)
        return cls(size, crop_fraction_for(size), tuple(float(m) for m in mean), tuple(float(s) for s in std),
                   size_from)

    def transform(self):
        """RGB PIL image -> [3, image_size_px, image_size_px] float32 (resize, centre crop, normalise)."""
        return eval_transform(self.image_size_px, self.mean, self.std, self.crop_fraction)

    def as_dict(self) -> dict:
        return {"image_size_px": self.image_size_px, "crop_fraction": self.crop_fraction,
                "mean": list(self.mean), "std": list(self.std), "image_size_from": self.size_from}
