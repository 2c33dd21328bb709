"""Which images each process reads in each epoch, and the seed of each image's augmentation.

Every sample's augmentation is seeded from (seed, epoch, index), so the crops an image gets do not depend
on the number of workers or processes: a resumed or distributed run sees exactly the crops an
uninterrupted single-process run would.
"""

from __future__ import annotations

from torch.utils.data import DistributedSampler, Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Deterministic 63-bit seed for one sample's augmentation in one epoch."""
    return ((seed * 1_000_003 + epoch) * 2_654_435_761 + index * 40_503 + 17) % (2**63 - 1)


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
