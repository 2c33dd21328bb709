"""The datasets of image files: what one item is, and what happens when its file cannot be read.

* :class:`UnlabeledImageFolder` (pretraining): item = (crops, index, skipped). An unreadable file is
  replaced by the next readable one and listed in ``skipped``, so an epoch keeps its length.
* :class:`ImageFiles` / :class:`LabelledImageFolder` (evaluation, the cluster explorer): item =
  (transform(image), label). An unreadable file raises UnreadableImage naming it: there every item must
  be the image it names.
* :class:`ReadOrReport` wraps one of those for a DataLoader: item = (index, sample, label, None), or
  (index, None, None, (path, reason)) for an unreadable file, so the failure travels back from a worker as
  data and the main process decides (evaluation stops with one line naming the file, the explorer lists it
  and goes on). :func:`collate_read_or_report` batches those items.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from swavkit.errors import DataError
from swavkit.data.folders import find_classes, find_images, walk_images
from swavkit.data.images import IMAGE_EXTENSIONS, UnreadableImage, describe_failure, read_rgb
from swavkit.data.names import printable_path


# ----------------------------------------------------------------------------------------------------
# evaluation: every item is the file it names

class ImageFiles(Dataset):
    """``paths[i]`` -> (transform(image), labels[i]) (label None without ``labels``; the PIL image
    without ``transform``). Raises UnreadableImage naming the file when it cannot be decoded or its
    transform fails. ``reader``: path -> what ``transform`` takes (None: read_rgb, an RGB PIL image;
    swavkit.data.channels.ChannelReader: a [C, H, W] array)."""

    def __init__(self, paths: list[str], labels: list[int] | None = None, transform=None, reader=None):
        if labels is not None and len(labels) != len(paths):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = list(paths)
        self.labels = labels
        self.transform = transform
        self.reader = reader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        label = self.labels[index] if self.labels is not None else None
        image = (self.reader or read_rgb)(path)
        if self.transform is None:
            return image, label
        try:
            return self.transform(image), label
        except Exception as err:  # e.g. a decodable but degenerate image: still this file's fault
            raise UnreadableImage(path, describe_failure(err)) from err


def _selection_key(class_name: str, path: str, class_folder: str) -> bytes:
    # Hash of the path inside its class folder: a file is kept or dropped regardless of where the tree
    # lives or which other files exist, and the kept subset is not biased by file-name order. The name's
    # bytes (os.fsencode) also cover names that are not UTF-8.
    relative = os.path.relpath(path, class_folder).replace(os.sep, "/")
    return hashlib.sha256(b"swavkit-eval-subset|" + os.fsencode(f"{class_name}/{relative}")).digest()


class LabelledImageFolder(ImageFiles):
    """``root/<class>/<image>`` -> items ``(transform(image), label)``; labels index ``classes``.

    Images may sit in sub-folders of a class folder; every class folder is read with the one folder
    walker (links followed, each real folder once), so a link loop cannot repeat an image.

    Args:
        root: the folder of class folders.
        transform: applied to the decoded RGB PIL image (None returns the PIL image).
        classes: class names that define the label indices. Pass the TRAIN split's ``classes`` when
            reading its val split, so a class missing from val cannot shift the other labels.
            A class folder outside this list is an error. Default: the sorted class folders of root.
        max_per_class: keep at most this many images per class (0 = all). The subset is deterministic
            (smallest sha256 of each file's path inside its class folder) and the same on every machine.

    Attributes: ``classes``, ``class_to_idx``, ``samples`` (list of (path, label)), ``targets``, and
    ImageFiles' ``paths`` and ``labels``.
    """

    def __init__(self, root: str | Path, transform=None, *, classes: list[str] | None = None,
                 max_per_class: int = 0, reader=None):
        self.root = Path(root)
        present = find_classes(self.root)
        self.classes = list(classes) if classes is not None else present
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        unknown = [printable_path(name) for name in present if name not in self.class_to_idx]
        if unknown:
            raise DataError(f"{printable_path(self.root)}: class folder(s) {', '.join(unknown[:5])} are not among "
                            f"the {len(self.classes)} training classes; train and val need the same class names")
        paths, labels = [], []
        for name in present:
            folder = str(self.root / name)
            found = walk_images(folder)
            if max_per_class and len(found) > max_per_class:
                keep = set(sorted(found, key=lambda p: _selection_key(name, p, folder))[:max_per_class])
                found = [p for p in found if p in keep]
            paths += found
            labels += [self.class_to_idx[name]] * len(found)
        if not paths:
            raise DataError(f"{printable_path(self.root)}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its "
                            "class folders")
        super().__init__(paths, labels, transform, reader)

    @property
    def samples(self) -> list[tuple[str, int]]:
        return list(zip(self.paths, self.labels))

    @property
    def targets(self) -> list[int]:
        return self.labels


class ReadOrReport(Dataset):
    """Wraps a dataset of (sample, label) items: item i -> (i, sample, label, None), or
    (i, None, None, (path, reason)) when item i's file is unreadable (UnreadableImage). Any other error
    is a bug, not a bad file, and propagates."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            sample, label = self.dataset[index][:2]
        except UnreadableImage as err:
            return index, None, None, (err.path, err.reason)
        return index, sample, label, None


class ReadBatch(NamedTuple):
    """A batch of ReadOrReport items: the B' readable ones, in order, and the files that were not."""
    indices: torch.Tensor  # [B'] int64 dataset indices
    samples: torch.Tensor | None  # [B', ...] stacked samples; None when B' = 0
    labels: torch.Tensor | None  # [B'] int64; None when B' = 0 or the items carry no labels
    unreadable: list[tuple[str, str]]  # (path, reason)


def collate_read_or_report(items) -> ReadBatch:
    """[(index, sample | None, label, unreadable)] from ReadOrReport -> ReadBatch."""
    readable = [item for item in items if item[3] is None]
    unreadable = [item[3] for item in items if item[3] is not None]
    indices = torch.tensor([item[0] for item in readable], dtype=torch.long)
    samples = torch.stack([item[1] for item in readable]) if readable else None
    labelled = bool(readable) and readable[0][2] is not None
    labels = torch.tensor([int(item[2]) for item in readable], dtype=torch.long) if labelled else None
    return ReadBatch(indices, samples, labels, unreadable)


def raise_for_unreadable(unreadable: list[tuple[str, str]]) -> None:
    """One DataError line for a batch's unreadable files (none: return). Evaluation stops rather than
    drop a file silently, which would change the denominator of every reported accuracy."""
    if unreadable:
        path, reason = unreadable[0]
        more = f" (and {len(unreadable) - 1} more in this batch)" if len(unreadable) > 1 else ""
        raise DataError(f"{UnreadableImage(path, reason)}{more}; remove or replace it")


# ----------------------------------------------------------------------------------------------------
# pretraining: an unreadable file is replaced by a readable one

def seeded_transform(transform, image, seed: int | None):
    """``transform(image)`` with torch's CPU generator seeded by ``seed`` (None: as it stands), so the
    crops depend on the sample, not on the worker or process that makes them."""
    if seed is None:
        return transform(image)
    # Only the CPU generator drives the transforms; torch.manual_seed would also (lazily) seed CUDA,
    # which costs ~100x more per sample on CUDA builds.
    if torch.utils.data.get_worker_info() is None:
        # In the training process, do not disturb the global RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return transform(image)
    torch.default_generator.manual_seed(seed)
    return transform(image)


class UnlabeledImageFolder(Dataset):
    """Images of a folder (no labels). Item = (crops, index, skipped) where skipped lists (path, reason).

    An unreadable file is replaced by the next readable one (deterministically) and reported in
    ``skipped`` so the trainer can count it and list it in ``skipped.txt``
    (:func:`swavkit.data.append_skipped_report`). ``reader`` turns a path into what ``transform`` takes
    (default :func:`read_rgb`; data.decode_on_device keeps JPEGs encoded, swavkit.data.device_decode)
    and raises UnreadableImage for a file it cannot read.
    """

    def __init__(self, root: str | Path, transform=None, paths: list[str] | None = None,
                 max_consecutive_failures: int = 64, reader=None):
        self.root = str(root)
        self.paths = paths if paths is not None else find_images(root)
        self.transform = transform
        self.reader = reader  # None: read_rgb, looked up when called (one patch point for tests)
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
        image = (self.reader or read_rgb)(self.paths[index])
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
            except UnreadableImage as err:
                skipped.append((err.path, err.reason))
        else:
            raise DataError(f"{self.max_consecutive_failures} consecutive unreadable images starting at "
                            f"{printable_path(self.paths[index])}; is {printable_path(self.root)} really an "
                            "image folder?")
        if self.transform is None:
            return image, index, skipped
        return seeded_transform(self.transform, image, seed), index, skipped

    def describe_reading(self) -> list[str]:
        """The files the workers are decoding right now, printable (for a message about a dead worker)."""
        return [printable_path(self.paths[i]) for i in self.reading.tolist() if 0 <= i < len(self.paths)]
