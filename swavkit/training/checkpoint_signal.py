"""Which checkpoint is best, without labels: a quality signal measured at every checkpoint save on a fixed
sample of the training images (``train.signal_images``, chosen at the run's start and listed in the run
folder), and the rule that keeps the checkpoint with the best one (``checkpoints/best-rankme.pt``).

The signal is RankMe (Garrido et al. 2023, "RankMe: Assessing the downstream performance of pretrained
self-supervised representations by their rank"): the effective rank of the backbone's pooled features,
exp of the entropy of their normalised singular values. A collapsing or dimension-collapsing backbone loses
rank; the paper found it ordering hyperparameters about as downstream accuracy does. Logged beside it: the
usage of the prototypes by the model's predictions on the same images (entropy of the mean assignment, how
many prototypes are some image's argmax), which shows cluster collapse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from swavkit.config import Config
from swavkit.data.channels import ArrayEvalTransform, ChannelReader
from swavkit.data.constants import crop_fraction_for, eval_size_px, is_rgb8
from swavkit.data.images import UnreadableImage, read_rgb
from swavkit.data.transforms import eval_transform
from swavkit.runtime.fileio import write_text_atomic
from swavkit.training.diagnosis import code_statistics

SIGNAL_BATCH = 128  # images per forward while measuring (memory, not results)


def effective_rank(features: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe of features [N, d]: exp(-sum_k p_k log p_k) with p_k = sigma_k / ||sigma||_1 + eps (the paper's
    eq. 1), sigma the singular values. In [1, min(N, d)]: 1 when every row is the same direction, min(N, d)
    when the singular values are all equal. Computed in float64."""
    sigma = torch.linalg.svdvals(features.detach().double())
    p = sigma / sigma.sum().clamp_min(1e-300) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def sample_paths(paths: list[str], n: int) -> list[str]:
    """``n`` paths evenly spaced over ``paths`` (all of them when there are fewer): the run's fixed sample,
    the same for the same file list (a resumed run measures the same images)."""
    if n <= 0 or not paths:
        return []
    if len(paths) <= n:
        return list(paths)
    return [paths[(i * len(paths)) // n] for i in range(n)]


@dataclass
class SignalSample:
    """The fixed images the signal is measured on, at the run's evaluation crop."""
    paths: list[str]
    size_px: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int = 3
    bit_depth: int = 8

    @classmethod
    def from_config(cls, cfg: Config, training_paths: list[str]) -> "SignalSample":
        return cls(sample_paths(training_paths, cfg.train.signal_images), eval_size_px(cfg.crops.sizes_px),
                   tuple(cfg.crops.mean), tuple(cfg.crops.std), cfg.data.channels, cfg.data.bit_depth)

    def batches(self):
        """Yields [b, C, size_px, size_px] float32 batches of the readable sample images, in order. Reads with no
        DataLoader and no random numbers: measuring must not move the training RNG (a resume is exact)."""
        if not is_rgb8(self.channels, self.bit_depth):
            reader = ChannelReader(self.channels, self.bit_depth)
            transform = ArrayEvalTransform(self.size_px, self.mean, self.std, crop_fraction_for(self.size_px))
        else:
            reader, transform = read_rgb, eval_transform(self.size_px, self.mean, self.std)
        batch = []
        for path in self.paths:
            try:
                batch.append(transform(reader(path)))
            except UnreadableImage:  # listed in skipped.txt by training already
                continue
            if len(batch) == SIGNAL_BATCH:
                yield torch.stack(batch)
                batch = []
        if batch:
            yield torch.stack(batch)


@torch.no_grad()
def measure_signal(core: torch.nn.Module, sample: SignalSample, device: torch.device,
                   temperature: float = 0.1) -> dict:
    """The signal of the model ``core`` (a SwAVModel) on ``sample``, in eval mode (BN running statistics used,
    not changed; the caller puts the model back in train mode):

    - ``rankme``: effective rank of the backbone's pooled features [N, d] (what an export gives users);
    - ``rankme_embedding``: effective rank of the head's unit embeddings [N, D];
    - ``signal_prototypes_used`` / ``signal_code_entropy`` (nats, ln K = even use): how the predictions
      softmax(scores / temperature) [N, K] spread over the prototypes.
    """
    core.eval()
    features, embeddings, predictions = [], [], []
    for images in sample.batches():
        pooled = core.backbone(images.to(device))
        z = F.normalize(core.head(pooled).float(), dim=1)
        features.append(pooled.float().cpu())
        embeddings.append(z.cpu())
        predictions.append(torch.softmax(core.prototypes(z.to(core.prototypes.weight.dtype)).float() / temperature,
                                         dim=1).cpu())
    if not features:
        return {}
    usage = code_statistics(torch.cat(predictions))
    return {"rankme": round(effective_rank(torch.cat(features)), 3),
            "rankme_embedding": round(effective_rank(torch.cat(embeddings)), 3),
            "signal_code_entropy": round(usage["code_entropy"], 4), "signal_prototypes_used": usage["prototypes_used"],
            "signal_images": sum(len(f) for f in features)}


def best_so_far(metric_rows: list[dict], key: str = "rankme") -> float:
    """The best (highest) ``key`` among a run's metrics rows; -inf when none has it (a fresh run)."""
    values = [float(row[key]) for row in metric_rows if isinstance(row.get(key), (int, float))
              and math.isfinite(float(row[key]))]
    return max(values, default=-math.inf)


def write_sample_list(path: Path, sample: SignalSample) -> None:
    """The sample's paths, one per line, written atomically (the run's record of which images were measured)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(f"{p}\n" for p in sample.paths))


__all__ = ["effective_rank", "sample_paths", "SignalSample", "measure_signal", "best_so_far", "write_sample_list"]
