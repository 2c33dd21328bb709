"""Shared fixtures: small generated image folders and a tiny CPU training config."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Two cores: more threads only add contention (OMP_NUM_THREADS=1 when the machine is shared with other work:
# two spinning OpenMP threads on one free core make every step tens of times slower).
torch.set_num_threads(min(int(os.environ.get("OMP_NUM_THREADS") or 2), os.cpu_count() or 1))


def write_images(root: Path, n: int, size_px: int = 24, nested: bool = False, seed: int = 0) -> list[Path]:
    """``n`` random-ish RGB PNG/JPEG images (coloured blobs, two visual groups) under ``root``."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        group = i % 2
        base = np.zeros((size_px, size_px, 3), dtype=np.float32)
        base[..., group] = 200
        image = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
        folder = root / (f"part{i % 3}" / Path(f"deeper{i % 2}") if nested else Path("."))
        folder = root / folder if not nested else folder
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / (f"img{i:03d}.png" if i % 4 else f"img{i:03d}.jpg")
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def image_folder(tmp_path) -> Path:
    root = tmp_path / "images"
    write_images(root, 32)
    return root


@pytest.fixture
def nested_image_folder(tmp_path) -> Path:
    root = tmp_path / "nested"
    write_images(root, 32, nested=True)
    return root


def tiny_overrides(data_path: Path, out_dir: Path, **extra) -> list[str]:
    """key=value overrides for a seconds-long CPU run: resnet10t, 2x32 + 2x16 crops, batch 8."""
    values = {
        "data.path": str(data_path), "out_dir": str(out_dir), "data.num_workers": 0,
        "model.backbone": "resnet10t", "model.hidden_dim": 32, "model.output_dim": 16, "model.n_prototypes": 10,
        "crops.counts": "[2,2]", "crops.sizes_px": "[32,16]", "crops.min_scales": "[0.5,0.2]",
        "crops.max_scales": "[1.0,0.5]", "crops.blur_probability": 0.0,
        "train.epochs": 2, "train.batch_size": 8, "train.log_every_steps": 2, "optim.warmup_epochs": 1,
        "swav.freeze_prototypes_epochs": 0.5,
        # the checkpoint signal measures at every save (~45 ms here); tests/test_checkpoint_signal.py turns it on
        "train.signal_images": 0,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="session")
def gloo_pair():
    """Two worker processes for the session's two-rank gloo tests (tests/gloo_pair.py): one torch import each,
    not one per test."""
    from gloo_pair import GlooPair

    pair = GlooPair()
    yield pair
    pair.close()
