"""The evaluation transform (the multi-crop augmentation of pretraining lives in swavkit/multicrop.py)."""

from __future__ import annotations

import math

import torch
from torchvision.transforms import v2


def eval_transform(size_px: int, mean, std, crop_fraction: float = 0.875):
    """RGB PIL image -> [3, size_px, size_px] float32: resize the short side to size_px / crop_fraction,
    centre-crop size_px, normalise with mean/std."""
    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize(int(math.floor(size_px / crop_fraction)), antialias=True),
        v2.CenterCrop(size_px),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])
