"""Classification metrics shared by every evaluation (k-NN, linear probe, online monitor)."""

from __future__ import annotations

import torch


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict:
    """{"top1": %, "top5": %} from scores [M, C] and true labels [M]; top5 only when C > 5.

    Ties go to the lower class index (stable sort), so equal scores never count as a hit by chance.
    """
    labels = labels.cpu().long()
    ranked = scores.argsort(dim=1, descending=True, stable=True)
    metrics = {"top1": 100.0 * (ranked[:, 0] == labels).double().mean().item()}
    if scores.shape[1] > 5:
        metrics["top5"] = 100.0 * (ranked[:, :5] == labels[:, None]).any(dim=1).double().mean().item()
    return metrics


__all__ = ["topk_accuracy"]
