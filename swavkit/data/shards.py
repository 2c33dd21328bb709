"""WebDataset tar shards: naming them, and the stream of training batches read from them.

A shard is a plain tar whose members ``<key>.<ext>`` group into samples by key (the WebDataset layout);
a sample's image is its first member with an image extension (jpg, png, webp ...). ``swavkit shard``
writes them, with ``shards.json`` next to them holding each shard's image count.

**The stream.** ``world`` processes x ``W`` data workers make ``world * max(W, 1)`` slots. In epoch e the
shards are permuted with a generator seeded by (seed, e) and slot s reads shards s, s + slots, ... of
that order (again in a new order when they run out: the stream never ends; so a slot with fewer shards
starts repeating its images sooner - use a shard count divisible by world x W), through a shuffle buffer of
``data.shuffle_buffer`` samples seeded by (seed, e, slot). An epoch is ``data.samples_per_epoch``
images (default: the count in ``shards.json``). Each worker makes whole batches of its own slot; the
DataLoader takes batch j of a rank from worker j mod W (a resumed loader starts at worker 0, which
then plays the role of worker k mod W). A sample's crops are seeded by (seed, epoch,
its shard name and key), as a folder image's are by its index.

**Bad data.** An undecodable image is replaced in its batch by the next decodable one of that batch
(with its own crops), so a batch always uses exactly B samples of the stream, and listed in
``skipped.txt`` as ``<shard>/<member>``. A truncated or corrupt shard ends where it breaks (the samples
before the break are used) and is listed as ``<shard>``; training goes on. (A shard cut exactly at a
512-byte block boundary between two members cannot be told from a shorter shard.) Where nothing
decodes at all, training stops at start-up with one line naming data.path (:func:`check_decodable`),
and a stream that has read every shard without an image since its last one ends with a DataError rather
than going round forever.

**Resume (what is exact).** The stream is a pure function of (seed, epoch, slot), and a batch always
takes exactly B samples of it, so a resume at step k of an epoch fast-forwards each worker past the
samples of the batches it had made (read, not decoded) and continues with the very next one: with the
same number of processes and data.num_workers as the interrupted run, no image of the epoch is repeated
or left out and every image gets the same crops as without the interruption. Batches a worker had
prepared but the loop had not used when the run was killed are made again (they were not trained on).
If data.num_workers (or the number of processes) differs from the run that wrote the checkpoint, the
rest of that epoch is read with the new slots, fast-forwarded by the same count per slot: some images of
that epoch may then repeat and others be left out; the following epochs are exact again.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import braceexpand
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from swavkit.data.datasets import seeded_transform
from swavkit.errors import DataError
from swavkit.data.filelist import LIST_SUFFIXES, first_list_entry, read_list_file
from swavkit.data.images import IMAGE_EXTENSIONS, UnreadableImage, describe_failure, read_rgb_bytes
from swavkit.data.names import printable_path
from swavkit.data.sampling import sample_seed

SHARD_INDEX = "shards.json"  # written by `swavkit shard` next to its shards
_IMAGE_SUFFIXES = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)


# ----------------------------------------------------------------------------------------------------
# naming shards

def is_shard_spec(spec: str) -> bool:
    """A brace pattern, glob or path ending in ``.tar``, or a list file whose first entry does (read up to
    that entry only: the list may be 10M image paths)."""
    if spec.lower().endswith(".tar"):
        return True
    if spec.lower().endswith(LIST_SUFFIXES) and os.path.isfile(spec):
        try:
            first = first_list_entry(spec)
        except DataError:  # an unreadable list is not shards; reading it as images then says what is wrong
            return False
        return first is not None and first.lower().endswith(".tar")
    return False


def expand_shards(spec: str) -> list[str]:
    """The shard files ``spec`` names, in order. DataError (one line, naming the pattern) when it matches
    none, or when a brace pattern or list names a shard that does not exist."""
    if spec.lower().endswith(LIST_SUFFIXES):
        names = read_list_file(spec)
    elif "{" in spec:
        names = list(braceexpand.braceexpand(spec))
    elif glob.has_magic(spec):
        names = sorted(glob.glob(os.path.expanduser(spec)))
    else:
        names = [spec]
    names = [os.path.expanduser(name) for name in names]
    existing = [name for name in names if os.path.isfile(name)]
    if not existing:
        raise DataError(f"data.path: no shard matches {printable_path(spec)}")
    if len(existing) < len(names):
        missing = [name for name in names if not os.path.isfile(name)]
        raise DataError(f"data.path: {printable_path(spec)} names {len(missing)} shard(s) that do not exist "
                        f"(first: {printable_path(missing[0])}); fix the pattern or the list")
    return names


def stored_count(shards: list[str]) -> int | None:
    """Images in ``shards`` according to the ``shards.json`` files next to them; None when one is unknown."""
    indexes: dict[str, dict] = {}
    total = 0
    for shard in shards:
        folder = os.path.dirname(os.path.abspath(shard))
        if folder not in indexes:
            try:
                indexes[folder] = json.loads(Path(folder, SHARD_INDEX).read_text(encoding="utf-8"))["counts"]
            except (OSError, ValueError, KeyError, TypeError):
                indexes[folder] = {}
        count = indexes[folder].get(os.path.basename(shard))
        if not isinstance(count, int):
            return None
        total += count
    return total


def describe_shards(shards: list[str]) -> str:
    """``a.tar`` or ``the 40 shards a.tar ... z.tar``, printable, for messages."""
    if len(shards) == 1:
        return printable_path(shards[0])
    return f"the {len(shards)} shards {printable_path(shards[0])} ... {printable_path(shards[-1])}"


# ----------------------------------------------------------------------------------------------------
# reading one shard

def _shard_samples(shard: str) -> Iterator[tuple[str, bytes | None, str]]:
    """(name, image bytes, "") per sample of ``shard`` in tar order; (name, None, reason) for a sample
    without an image member or for the shard itself where it breaks (then it ends)."""
    try:
        with open(shard, "rb") as handle:
            members = ({**member, "__url__": shard} for member in tar_file_iterator(handle))
            for sample in group_by_keys(members):
                suffix = next((s for s in sample if s.lower() in _IMAGE_SUFFIXES), None)
                if suffix is None:
                    yield f"{shard}/{sample['__key__']}", None, "no image member in this sample"
                else:
                    yield f"{shard}/{sample['__key__']}.{suffix}", sample[suffix], ""
    except Exception as err:  # tarfile.ReadError, OSError, a duplicate member ...: the shard is broken here
        yield shard, None, f"broken shard: {describe_failure(err)}"
        return
    # A tar cut between two members reads as a shorter tar (tarfile takes the missing header for the end),
    # but a tar is whole 512-byte blocks: a size that is not betrays the cut.
    size = os.path.getsize(shard)
    if size % 512:
        yield shard, None, f"broken shard: truncated ({size} bytes is not a whole number of 512-byte tar blocks)"


def check_decodable(shards: list[str], spec: str) -> list[str]:
    """``shards`` when one of them holds a decodable image (read in order up to the first one: for a
    sound set, one image of the first shard); else DataError (one line, naming ``spec``) - the
    stream of a set without one image would never make a batch."""
    first_problem = None
    for shard in shards:
        for name, data, reason in _shard_samples(shard):
            if data is None:
                first_problem = first_problem or f"{printable_path(name)}: {reason}"
                continue
            try:
                read_rgb_bytes(data, name)
                return shards
            except UnreadableImage as err:
                first_problem = first_problem or str(err)
    raise DataError(f"data.path: nothing in {printable_path(spec)} ({len(shards)} shard(s)) could be decoded "
                    f"(first: {first_problem or 'no member at all'}); are these WebDataset tar shards of images?")


def _member_index(name: str) -> int:
    """A stable 62-bit number of a member (its shard's file name and key) that seeds its crops."""
    digest = hashlib.blake2b(os.fsencode(os.path.basename(os.path.dirname(name)) + "/" + os.path.basename(name)),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


# ----------------------------------------------------------------------------------------------------
# the stream

class ShardStream(IterableDataset):
    """Per-rank batches from tar shards (see the module docstring): iterating yields ``collate(items)``
    for items (crops, index, skipped) of ``batch_size`` images, forever; the loop stops each epoch.

    ``set_epoch(epoch, start)`` (start = samples this rank already used in the epoch) must come before
    each ``iter``; the DataLoader must not keep its workers between epochs (persistent_workers=False), so
    that they see the new epoch. ``decode(bytes, name)`` turns a member into what ``transform`` takes
    (default read_rgb_bytes; data.decode_on_device keeps JPEGs encoded, swavkit.data.device_decode)."""

    def __init__(self, shards: list[str], transform, collate, batch_size: int, *, rank: int, world: int,
                 seed: int, shuffle_buffer: int, samples_per_epoch: int, decode=read_rgb_bytes):
        self.shards, self.transform, self.collate, self.decode = list(shards), transform, collate, decode
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.shuffle_buffer, self.samples_per_epoch = shuffle_buffer, samples_per_epoch
        self.epoch, self.start_batches = 0, 0
        # The shard each worker reads (-1 = none), shared with the workers for a message about a dead one.
        self.reading = torch.full((64,), -1, dtype=torch.long).share_memory_()

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start_batches = epoch, start // self.batch_size

    def __len__(self) -> int:
        return self.samples_per_epoch

    def describe_reading(self) -> list[str]:
        return [printable_path(self.shards[i]) for i in self.reading.tolist() if 0 <= i < len(self.shards)]

    def _slot(self) -> tuple[int, int, int, int, int]:
        """(slot, number of slots, this worker, the worker whose batches it continues, workers per rank)"""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # A fresh DataLoader asks worker 0 first, for batch start_batches of the epoch, which the
        # uninterrupted run had asked of worker start_batches mod W: that worker's stream it continues.
        role = (worker + self.start_batches) % workers
        return self.rank * workers + role, self.world * workers, worker, role, workers

    def _slot_samples(self, slot: int, n_slots: int, worker: int) -> Iterator[tuple[str, bytes | None, str]]:
        """This slot's endless sample stream for this epoch, before shuffling. DataError once every shard
        has been read through without an image since the last one that had one: the stream would only
        go round (and a batch wait) forever."""
        without_image: set[int] = set()
        first_problem = ""
        for pass_index in range(1 << 62):
            order = np.random.default_rng([self.seed, self.epoch, pass_index]).permutation(len(self.shards))
            for shard_index in order[slot::n_slots]:
                self.reading[worker % len(self.reading)] = int(shard_index)
                had_image = False
                for name, data, reason in _shard_samples(self.shards[shard_index]):
                    if data is not None:
                        had_image = True
                    elif not first_problem:
                        first_problem = f"{printable_path(name)}: {reason}"
                    yield name, data, reason
                if had_image:
                    without_image.clear()
                    first_problem = ""
                else:
                    without_image.add(int(shard_index))
                if len(without_image) == len(self.shards):
                    raise DataError(f"data.path: nothing in {describe_shards(self.shards)} could be decoded (first: "
                                    f"{first_problem or 'no member at all'}); are these WebDataset tar shards of images?")

    def _shuffled(self, slot: int, n_slots: int, worker: int) -> Iterator[tuple[str, bytes | None, str]]:
        """The slot's samples through the shuffle buffer; a bad entry (no bytes) passes at once."""
        rng = np.random.default_rng([self.seed, self.epoch, slot, 1])
        buffer: list[tuple[str, bytes, str]] = []
        for entry in self._slot_samples(slot, n_slots, worker):
            if entry[1] is None:
                yield entry
                continue
            if len(buffer) < self.shuffle_buffer:
                buffer.append(entry)
                continue
            pick = int(rng.integers(len(buffer)))
            buffer[pick], entry = entry, buffer[pick]
            yield entry

    def __iter__(self):
        slot, n_slots, worker, role, workers = self._slot()
        samples = self._shuffled(slot, n_slots, worker)
        done = max(0, (self.start_batches - role + workers - 1) // workers)  # batches j < start, j % W == role
        to_skip = done * self.batch_size
        while to_skip:  # fast-forward: read, never decode
            if next(samples)[1] is not None:
                to_skip -= 1
        while True:
            yield self.collate(self._batch(samples))

    def _batch(self, samples: Iterator) -> list[tuple]:
        """The next ``batch_size`` samples as items (crops, index, skipped); undecodable ones replaced by
        the next decodable one of the batch, every bad entry listed in the first item's ``skipped``."""
        taken, skipped = [], []
        while len(taken) < self.batch_size:
            name, data, reason = next(samples)
            if data is None:
                skipped.append((name, reason))
                continue
            try:
                taken.append((name, self.decode(data, name)))
            except UnreadableImage as err:
                skipped.append((err.path, err.reason))
                taken.append((name, None))
        good = [i for i, (_, image) in enumerate(taken) if image is not None]
        if not good:
            raise DataError(f"none of {self.batch_size} images in a row could be decoded (last: "
                            f"{printable_path(taken[-1][0])}); are these shards of images?")
        items = []
        for i, (name, image) in enumerate(taken):
            if image is None:
                image = taken[next((j for j in good if j > i), good[0])][1]
            index = _member_index(name)
            crops = seeded_transform(self.transform, image, sample_seed(self.seed, self.epoch, index))
            items.append((crops, index, []))
        items[0] = (items[0][0], items[0][1], skipped)
        return items


def pass_batch(batch):
    """The DataLoader's collate_fn for a ShardStream, whose items are whole batches already."""
    return batch
