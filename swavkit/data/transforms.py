"""The evaluation transform and the supervised training augmentation of the linear probe and fine-tuning
(the multi-crop augmentation of pretraining lives in swavkit/multicrop.py)."""

from __future__ import annotations

import math

import torch
from torchvision.transforms import v2

from swavkit.preprocessing import crop_fraction_for


def eval_transform(size_px: int, mean, std, crop_fraction: float | None = None):
    """RGB PIL image -> [3, size_px, size_px] float32: resize the short side to size_px / crop_fraction,
    centre-crop size_px, normalise with mean/std. ``crop_fraction`` None = swavkit's evaluation rule
    (:func:`swavkit.preprocessing.crop_fraction_for`)."""
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
