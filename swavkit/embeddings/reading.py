"""Reading the images of one embeddings chunk (:mod:`swavkit.embeddings.embed`): a list of files, or the
samples of one tar shard, each item carrying its position and name so a worker's result says which image it
is, and unreadable images reported instead of raised. Imports torch (a DataLoader streams only from torch's
dataset classes); embed.py, which ``swavkit --help`` reads, imports this module only when it embeds.
"""

from __future__ import annotations

import torch
from torch.utils.data import IterableDataset, get_worker_info

from swavkit.data.datasets import ImageFiles, ReadOrReport
from swavkit.data.images import UnreadableImage, describe_failure, read_rgb_bytes
from swavkit.data.shards import _shard_samples


class NamedFiles:  # map-style: a DataLoader needs only __len__ and __getitem__
    """``paths[i]`` -> (i, [C, H, W] tensor | None, path, None | (path, reason)): ReadOrReport's item with
    the name, so a worker's result says which image it is."""

    def __init__(self, paths: list[str], transform, reader=None):
        self.paths, self.files = paths, ReadOrReport(ImageFiles(paths, transform=transform, reader=reader))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        _, sample, _, unreadable = self.files[index]
        return index, sample, self.paths[index], unreadable


class ShardSamples(IterableDataset):
    """The samples of one tar shard, in tar order, as :class:`NamedFiles` items; data worker w of W
    decodes samples w, w + W, ... (each worker reads the tar; decoding, not reading, is the cost)."""

    def __init__(self, shard: str, transform):
        self.shard, self.transform = shard, transform

    def __iter__(self):
        worker = get_worker_info()
        slot, n_slots = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for position, (name, data, reason) in enumerate(_shard_samples(self.shard)):
            if position % n_slots != slot:
                continue
            if data is None:
                yield position, None, name, (name, reason)
                continue
            try:
                yield position, self.transform(read_rgb_bytes(data, name)), name, None
            except UnreadableImage as err:
                yield position, None, name, (err.path, err.reason)
            except Exception as err:  # a decodable but degenerate image: still this sample's fault
                yield position, None, name, (name, describe_failure(err))


def collate_named(items):
    """[(position, sample | None, name, unreadable | None)] -> (positions [B'], samples [B', C, H, W] | None,
    names [B'], unreadable [(path, reason)]) for the B' readable items."""
    readable = [item for item in items if item[3] is None]
    samples = torch.stack([item[1] for item in readable]) if readable else None
    return ([item[0] for item in readable], samples, [item[2] for item in readable],
            [item[3] for item in items if item[3] is not None])


__all__ = ["NamedFiles", "ShardSamples", "collate_named"]
