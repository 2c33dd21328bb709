"""Shared by the evaluation tests: tiny generated labelled folders (root/{train,val}/<class>/<image>) and
a one-thread setting for their small computations."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Subprocesses: one thread each, for the same reason as the one_thread fixture.
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    """These problems are tiny: on a loaded 2-core machine two torch threads mostly wait for each other
    (an L-BFGS fit went from 0.02 s to 2 s), so run them on one thread and restore the setting after.
    Autouse in every test module that imports it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

# One dominant colour per class: separable from raw pixels and from a random convnet alike.
CLASS_COLOURS = {"blue": (30, 30, 200), "green": (30, 200, 30), "red": (200, 30, 30)}


def write_labelled_split(root: Path, n_per_class: int, size_px: int = 40, seed: int = 0,
                         classes: dict = CLASS_COLOURS) -> Path:
    """``n_per_class`` noisy PNGs of each class colour under ``root/<class>/``."""
    rng = np.random.default_rng(seed)
    for name, colour in classes.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            pixels = np.asarray(colour, dtype=np.float32)[None, None] + rng.normal(0, 30, (size_px, size_px, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{name}{i:03d}.png")
    return root


def write_labelled_folders(root: Path, n_train: int = 8, n_val: int = 4, size_px: int = 40) -> tuple[Path, Path]:
    """(root/train, root/val) with the three colour classes."""
    return (write_labelled_split(root / "train", n_train, size_px, seed=0),
            write_labelled_split(root / "val", n_val, size_px, seed=1))


def clusters(n: int, n_classes: int, dim: int, spread: float, seed: int):
    """Synthetic features [n, dim] around n_classes fixed random centres; labels [n] cycle through classes."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(1234))
    labels = torch.arange(n) % n_classes
    return centres[labels] + spread * torch.randn(n, dim, generator=generator), labels
