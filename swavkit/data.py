"""Unlabeled image folders, robust decoding, per-sample seeding, and the evaluation transform.

The multi-crop augmentation itself lives in swavkit/multicrop.py.

Pretraining reads a flat or nested folder (class folders, if any, are ignored). Every sample's
augmentation is seeded from (seed, epoch, index), so the crops an image gets do not depend on the number
of workers or processes: a resumed or distributed run sees exactly the crops an uninterrupted
single-process run would.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import Dataset, DistributedSampler, Sampler
from torchvision.transforms import v2

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
# Class-balanced Fashion-MNIST sample (MIT, see its COPYRIGHT): train/<class>/*.png and val/<class>/*.png.
BUNDLED_SAMPLE = Path(__file__).parent / "sample_data" / "fashion_mnist"

# A truncated JPEG would otherwise raise mid-epoch; we prefer to detect and skip it ourselves.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class DataError(ValueError):
    """A data problem, described in one line naming the file or folder."""


def find_images(root: str | Path) -> list[str]:
    """Sorted paths of all images under ``root`` (recursively, following symlinks without looping).

    Raises DataError for a missing folder, a file given instead of a folder, or no images at all.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data.path: folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data.path: {root} is a file; give the folder that holds the images")
    found: list[str] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=lambda err: None):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop or a second link to the same folder
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                found.append(os.path.join(dirpath, name))
    if not found:
        raise DataError(f"data.path: no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return sorted(found)


def read_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode any image file to an RGB PIL image (EXIF orientation applied, first frame of animations).

    Handles grayscale, palette (with transparency), alpha (composited on white), CMYK and 16-bit
    images. Raises whatever PIL raises for unreadable files; callers decide whether to skip.
    """
    with Image.open(path) as img:
        img.seek(0)
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit grey: PIL's convert("RGB") clips at 255, so scale to 8 bits ourselves.
            array = np.asarray(img, dtype=np.float64)
            peak = 65535.0 if img.mode.startswith("I;16") or array.max() > 255 else 255.0
            img = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode in ("RGBA", "LA", "PA"):
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img.convert("RGBA"))
        img = img.convert("RGB")
        img.load()
        return img


def check_readable(paths: list[str], root: str | Path) -> int:
    """Index of the first decodable image; DataError naming the folder when none is (a folder of only
    broken files would otherwise fail deep inside a data-loading worker)."""
    first_error = None
    for index, path in enumerate(paths):
        try:
            read_rgb(path)
            return index
        except Exception as err:  # any decoder failure
            first_error = first_error or f"{path}: {type(err).__name__}"
    raise DataError(f"data.path: none of the {len(paths)} image files under {root} can be decoded "
                    f"(first: {first_error})")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Deterministic 63-bit seed for one sample's augmentation in one epoch."""
    return ((seed * 1_000_003 + epoch) * 2_654_435_761 + index * 40_503 + 17) % (2**63 - 1)


def eval_transform(size_px: int, mean, std, crop_fraction: float = 0.875):
    """Resize the short side to size/crop_fraction, centre-crop size_px, normalise -> [3, s, s]."""
    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize(int(math.floor(size_px / crop_fraction)), antialias=True),
        v2.CenterCrop(size_px),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


class UnlabeledImageFolder(Dataset):
    """Images of a folder (no labels). Item = (crops, index, skipped) where skipped lists (path, reason).

    An unreadable file is replaced by the next readable one (deterministically) and reported in
    ``skipped`` so the trainer can count it and list it in ``skipped.txt``.
    """

    def __init__(self, root: str | Path, transform=None, paths: list[str] | None = None,
                 max_consecutive_failures: int = 64):
        self.root = str(root)
        self.paths = paths if paths is not None else find_images(root)
        self.transform = transform
        self.max_consecutive_failures = max_consecutive_failures
        # Which file each worker is decoding (-1 = none); shared with workers so that a worker that
        # dies can be reported with the file it was reading.
        self.reading = torch.full((64,), -1, dtype=torch.long).share_memory_()

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, index: int):
        worker = torch.utils.data.get_worker_info()
        slot = worker.id % len(self.reading) if worker is not None else 0
        self.reading[slot] = index
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = read_rgb(self.paths[index])
        self.reading[slot] = -1
        return image

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        skipped = []
        for attempt in range(self.max_consecutive_failures):
            current = (index + attempt) % len(self.paths)
            try:
                image = self._load(current)
                break
            except Exception as err:  # any decoder failure means "skip this file"
                reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                skipped.append((self.paths[current], reason[:200]))
        else:
            raise DataError(f"{self.max_consecutive_failures} consecutive unreadable images starting at "
                            f"{self.paths[index]}; is {self.root} really an image folder?")
        if self.transform is None:
            return image, index, skipped
        if seed is None:
            return self.transform(image), index, skipped
        # Only the CPU generator drives the transforms; torch.manual_seed would also (lazily) seed CUDA,
        # which costs ~100x more per sample on CUDA builds.
        if torch.utils.data.get_worker_info() is None:
            # In the training process, do not disturb the global RNG stream.
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                return self.transform(image), index, skipped
        torch.default_generator.manual_seed(seed)
        return self.transform(image), index, skipped

    def describe_reading(self) -> list[str]:
        return [self.paths[i] for i in self.reading.tolist() if 0 <= i < len(self.paths)]


class EpochSampler(Sampler):
    """torch's DistributedSampler (shuffle, drop_last, set_epoch) yielding (index, augmentation seed).

    ``set_epoch(epoch, start=n)`` skips this rank's first n samples, which is how a run resumed in the
    middle of an epoch continues with exactly the samples it had not seen yet.
    """

    def __init__(self, n_images: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.inner = DistributedSampler(range(n_images), num_replicas=world_size, rank=rank, shuffle=True,
                                        seed=seed, drop_last=True)
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner) - self.start

    def __iter__(self):
        for position, index in enumerate(self.inner):
            if position >= self.start:
                yield index, sample_seed(self.seed, self.epoch, index)
