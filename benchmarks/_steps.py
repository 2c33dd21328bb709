"""Training steps used by the benchmarks, built only from swavkit's public functions.

``SwavkitStep`` replicates stage 7 of ``swavkit.train.train`` (7b-7f) line for line: normalise the
prototypes, back up the BN buffers, grouped forward under autocast, fp32 Sinkhorn on the assignment crops, swapped-prediction
loss, backward through the (disabled) GradScaler, prototype-freeze gate, loss + gradient-norm
finiteness check (one host sync), optimiser step. Nothing is factored out of the library; if train.py changes, this file must follow it.

``BareBackboneStep`` is the floor: the same timm backbone, the same crop tensors grouped per resolution
exactly as ``SwAVModel.embed`` groups them, a trivial loss, backward and the same optimiser (LARS).
"""

from __future__ import annotations

import torch

from swavkit.loss import swapped_prediction_loss
from swavkit.model import build_model, create_backbone
from swavkit.optim import build_optimizer
from swavkit.sinkhorn import sinkhorn
from swavkit.train import gradient_norm_sum

# the library defaults (swavkit.config) that the step uses
EPSILON, SINKHORN_ITERS, TEMPERATURE, ASSIGNMENT_CROPS = 0.05, 3, 0.1, (0, 1)
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
    """One swavkit training step (train.py stage 7b-7f), on ``device`` (CPU unless told)."""

    def __init__(self, backbone: str, n_prototypes: int, hidden_dim: int = 2048, output_dim: int = 128,
                 autocast_dtype: torch.dtype | None = None, channels_last: bool = False, seed: int = 0,
                 trivial_loss: bool = False, device: str | torch.device = "cpu"):
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.core = build_model(backbone, n_prototypes, hidden_dim, output_dim).to(self.device)
        if channels_last:
            self.core = self.core.to(memory_format=torch.channels_last)
        self.core.train()
        self.optimizer = build_optimizer(self.core, "lars", **OPTIM)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)
        self.autocast_dtype = autocast_dtype
        self.K = n_prototypes
        self.step_index = 10**6  # past the prototype-freeze window: the steady state
        self.freeze_prototype_steps = 0
        self.trivial_loss = trivial_loss  # attribution arm: model forward, no Sinkhorn / swapped loss
        self.skip_nonfinite = False  # True: count and skip refused steps instead of raising
        self.check_finite = True  # False (attribution only): no finiteness check, so no host sync before the update
        self.nonfinite_steps = 0
        # train.py keeps a copy of the BN buffers, refreshed before every forward (undo on a non-finite loss)
        self.code_buffers: dict[int, torch.Tensor] = {}
        self.buffers = list(self.core.buffers())
        self.buffer_backup = [b.detach().clone() for b in self.buffers]

    def __call__(self, crops: list[torch.Tensor]) -> torch.Tensor:
        V, B, K = len(crops), crops[0].shape[0], self.K
        core, optimizer, scaler = self.core, self.optimizer, self.scaler
        for group in optimizer.param_groups:
            group["lr"] = OPTIM["lr"]
        core.prototypes.normalize_()
        if self.buffers:
            torch._foreach_copy_(self.buffer_backup, self.buffers)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            z, scores = core(crops)
        if self.trivial_loss:
            loss = scores.float().mean()
        else:
            scores = scores.float().view(V, B, K)
            z = z.detach().float().view(V, B, -1)
            codes = {}
            with torch.no_grad():
                for j, i in enumerate(ASSIGNMENT_CROPS):
                    buffer = self.code_buffers.get(j)
                    if buffer is None or buffer.shape != scores[i].shape:  # as train.py: reused across steps
                        buffer = self.code_buffers[j] = torch.empty(scores[i].shape, dtype=torch.float32,
                                                                    device=self.device)
                    codes[i] = sinkhorn(scores[i].detach(), EPSILON, SINKHORN_ITERS, dtype=torch.float32,
                                        out=buffer)[-B:]
            loss = swapped_prediction_loss(scores, codes, TEMPERATURE)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if self.step_index < self.freeze_prototype_steps:
            core.prototypes.weight.grad = None
        if not self.trivial_loss and self.check_finite:
            # as train.py 7f: loss and gradient norms checked in one host sync before the update
            check_grads = not scaler.is_enabled()
            if not bool(torch.isfinite(loss.detach() + (gradient_norm_sum(core) if check_grads else 0.0))):
                if self.buffers:
                    torch._foreach_copy_(self.buffers, self.buffer_backup)
                if not self.skip_nonfinite:
                    raise FloatingPointError("non-finite loss or gradient in benchmark step")
                self.nonfinite_steps += 1  # as train.py with train.skip_nonfinite_steps: no update
                optimizer.zero_grad(set_to_none=True)
                return loss.detach()
        scaler.step(optimizer)
        scaler.update()
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
