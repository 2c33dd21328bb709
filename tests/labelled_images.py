"""Tiny generated labelled folders (root/{train,val}/<class>/<image>) for the evaluation tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

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
