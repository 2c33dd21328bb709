"""``swavkit pretrain`` (quickstart) with the batched multi-crop prototype swapped in, for this process only.

    python benchmarks/_pretrain_with_prototype.py key=value ...

Used by bench_data_wait.py to measure what the recommended pipeline (benchmarks/_batched_multicrop.py)
would do to the data wait of the real training loop. The library is not modified: train.py's module-level
names ``MultiCropTransform`` and ``collate_crops`` are rebound before ``train`` runs. Workers are forked,
so they inherit the rebinding.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import swavkit.train as train_module  # noqa: E402
from _batched_multicrop import BatchedMultiCrop  # noqa: E402
from swavkit.cli import main as cli_main  # noqa: E402


class PrototypeTransform(BatchedMultiCrop):
    current: "PrototypeTransform | None" = None

    @classmethod
    def from_config(cls, c) -> "PrototypeTransform":
        cls.current = cls(c.counts, c.sizes_px, c.min_scales, c.max_scales, c.color_jitter_strength,
                          c.color_jitter_probability, c.grayscale_probability, c.blur_probability, c.mean, c.std)
        return cls.current


def prototype_collate(items):
    return PrototypeTransform.current.collate(items)


train_module.MultiCropTransform = PrototypeTransform
train_module.collate_crops = prototype_collate

if __name__ == "__main__":
    sys.exit(cli_main(["pretrain", "--no-progress", "--restart", *sys.argv[1:]]))
