"""Training-step arms for the benchmarks: the library's own step, and what it is compared with.

``SwavkitStep`` runs ``swavkit.training.step.train_step``, the function ``swavkit.training.trainer`` calls for every batch, on
a fresh model and LARS optimiser at the library's SwAV defaults in the steady state (prototypes not frozen,
no queue): a benchmark of it measures the trainer's step, not a copy.

``ModelOnlyStep`` (attribution) is the same model with a trivial loss (the mean score): what the backbone,
head and prototypes cost without Sinkhorn and the swapped loss.

``BareBackboneStep`` is the floor: the same timm backbone, the same crop tensors grouped per resolution
exactly as ``SwAVModel.embed`` groups them, a trivial loss, backward and the same optimiser (LARS).
"""

from __future__ import annotations

import torch

from swavkit.core.model import build_model, create_backbone
from swavkit.core.optim import build_optimizer
from swavkit.training.step import StepSettings, TrainState, train_step

# the library's LARS defaults (swavkit.config), at a fixed learning rate
OPTIM = dict(lr=0.3, weight_decay=1e-6, momentum=0.9, trust_coefficient=0.001)


def make_crops(batch: int, counts: list[int], sizes: list[int], seed: int = 0,
               memory_format=torch.contiguous_format, device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """V crop tensors [B, 3, s, s], large crops first (what MultiCropTransform.collate yields)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, s, s, generator=g).to(device).contiguous(memory_format=memory_format)
            for c, s in zip(counts, sizes) for _ in range(c)]


def group_by_size(crops: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: list[list[torch.Tensor]] = []
    for crop in crops:
        if groups and groups[-1][0].shape[-2:] == crop.shape[-2:]:
            groups[-1].append(crop)
        else:
            groups.append([crop])
    return groups


class SwavkitStep:
    """One step of ``swavkit.training.step.train_step`` per call, on ``device`` (CPU unless told)."""

    def __init__(self, backbone: str, n_prototypes: int, hidden_dim: int = 2048, output_dim: int = 128,
                 autocast_dtype: torch.dtype | None = None, channels_last: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu"):
        torch.manual_seed(seed)
        self.device = torch.device(device)
        core = build_model(backbone, n_prototypes, hidden_dim, output_dim).to(self.device)
        if channels_last:
            core = core.to(memory_format=torch.channels_last)
        core.train()
        self.state = TrainState(core, build_optimizer(core, "lars", **OPTIM),
                                torch.amp.GradScaler(self.device.type, enabled=False))
        self.settings = StepSettings(autocast_dtype=autocast_dtype)
        self.skip_nonfinite = False  # True: count and drop refused steps (as train.skip_nonfinite_steps) instead of raising

    @property
    def core(self) -> torch.nn.Module:
        return self.state.core

    @property
    def nonfinite_steps(self) -> int:
        return self.state.nonfinite_skipped

    def __call__(self, crops: list[torch.Tensor]) -> torch.Tensor:
        result = train_step(self.state, crops, self.settings, lr=OPTIM["lr"])
        if not result.applied:
            if not self.skip_nonfinite:
                raise FloatingPointError(f"non-finite {result.nonfinite} in a benchmark step")
            self.state.step += 1  # as train.py: the batch is dropped
        return result.loss


class ModelOnlyStep(SwavkitStep):
    """Attribution: the SwAV model's step with a trivial loss (mean score) instead of Sinkhorn + swapped loss."""

    def __call__(self, crops: list[torch.Tensor]) -> torch.Tensor:
        state, dtype = self.state, self.settings.autocast_dtype
        state.core.prototypes.normalize_()
        state.keep_bn_statistics()  # as the library step, so the difference is Sinkhorn + loss + check only
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            _, scores = state.model(crops)
        loss = scores.float().mean()
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        return loss.detach()


class BareBackboneStep:
    """The same timm backbone alone: grouped forward, trivial loss, backward, the same LARS optimiser."""

    def __init__(self, backbone: str, autocast_dtype: torch.dtype | None = None, channels_last: bool = False,
                 seed: int = 0, device: str | torch.device = "cpu"):
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.net = create_backbone(backbone).to(self.device)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.net.train()
        self.optimizer = build_optimizer(self.net, "lars", **OPTIM)
        self.autocast_dtype = autocast_dtype

    def __call__(self, crops: list[torch.Tensor]) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            loss = sum(self.net(torch.cat(group)).float().mean() for group in group_by_size(crops))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()
