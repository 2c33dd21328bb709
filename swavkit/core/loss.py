"""Swapped-prediction loss (SwAV eq. 1) and the per-rank queue of past embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swapped_prediction_loss(scores: torch.Tensor, codes: dict[int, torch.Tensor], temperature: float) -> torch.Tensor:
    """Cross-entropy between each assignment crop's codes and every other crop's prediction.

    Args:
        scores: [V, B, K] prototype scores of all V crops (crop-major, as the grouped forward emits them).
        codes: {crop index i: Q_i [B, K]} codes of the assignment crops (rows sum to 1).
        temperature: softmax temperature tau.

    Returns:
        scalar: mean over assignment crops i of the mean over crops v != i of
        -sum_k q_i[b, k] log softmax(scores_v[b] / tau)_k, averaged over the batch.

    Example:
        >>> import math, torch, swavkit
        >>> scores = torch.zeros(8, 4, 3000)               # V=8 crops, B=4, K=3000; equal scores
        >>> codes = {i: swavkit.sinkhorn(scores[i]) for i in (0, 1)}   # the two large crops assign
        >>> loss = swavkit.swapped_prediction_loss(scores, codes, temperature=0.1)
        >>> round(loss.item(), 3), round(math.log(3000), 3)   # uniform codes: the loss is ln K
        (8.006, 8.006)
    """
    V = scores.shape[0]
    log_p = F.log_softmax(scores.float() / temperature, dim=-1)  # [V, B, K]
    # sum over v != i of log p_v == (sum over all v) - log p_i: one reduction serves every i.
    log_p_all = log_p.sum(dim=0)  # [B, K]
    total = scores.new_zeros((), dtype=torch.float32)
    for i, q in codes.items():
        cross = -(q.to(log_p.dtype) * (log_p_all - log_p[i])).sum(dim=-1).mean()
        total = total + cross / (V - 1)
    return total / len(codes)


class FeatureQueue(torch.nn.Module):
    """FIFO of this rank's past embeddings for each assignment crop.

    Holds [n_assignment_crops, length, dim] embeddings (not scores): their scores are recomputed with the
    current prototypes each step, so they never go stale w.r.t. the prototypes. ``is_full`` gates use:
    a half-empty queue of zeros would skew Sinkhorn's equipartition and push the loss back to ln K.
    """

    def __init__(self, n_crops: int, length: int, dim: int):
        super().__init__()
        self.register_buffer("embeddings", torch.zeros(n_crops, length, dim))
        self.register_buffer("n_filled", torch.zeros((), dtype=torch.long))
        # Host-side mirror of n_filled: asking "is it full?" every step must not wait for the GPU.
        self._n_filled = 0
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_n_filled", int(module.n_filled)))

    @property
    def length(self) -> int:
        return self.embeddings.shape[1]

    @property
    def is_full(self) -> bool:
        return self._n_filled >= self.length

    @torch.no_grad()
    def push(self, batch: torch.Tensor) -> None:
        """Insert [n_crops, B, dim] newest-first at the front; the oldest B rows fall off the end."""
        B = batch.shape[1]
        if B >= self.length:
            self.embeddings.copy_(batch[:, -self.length:].to(self.embeddings.dtype))
        else:
            self.embeddings[:, B:] = self.embeddings[:, :-B].clone()
            self.embeddings[:, :B] = batch.to(self.embeddings.dtype)
        self._n_filled = min(self.length, self._n_filled + B)
        self.n_filled.fill_(self._n_filled)
