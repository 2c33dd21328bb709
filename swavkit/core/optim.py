"""Optimisers: LARS (timm's maintained implementation) around SGD for CNNs, AdamW for transformers.

Biases and normalisation parameters get neither weight decay nor LARS adaptation, the usual practice
for LARS-trained self-supervised models (``optim.lars_exclude=bn_bias``, the default). The SwAV reference
wraps every parameter, biases and BN included, in apex LARC with weight decay: ``optim.lars_exclude=none``
builds exactly that (swavkit/core/larc.py), and the paper configs set it. timm's Lars adapts a group only when
its weight decay is non-zero unless ``always_adapt`` is set, so the weight group sets it:
``optim.weight_decay=0`` must not quietly turn LARS into plain SGD.
"""

from __future__ import annotations

import torch
from timm.optim import Lars

from swavkit.core.larc import ReferenceLARC
from swavkit.core.model import is_transformer


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """[weights (decayed), biases and norm parameters (not decayed)]; LARS adapts only the first."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def resolve_optimizer_name(name: str, backbone: torch.nn.Module) -> str:
    if name != "auto":
        return name
    return "adamw" if is_transformer(backbone) else "lars"


# Peak LRs per 256 images for train.py's stage 5 until it calls schedule.build_lr_schedule, which
# replaces this table (schedule.reference_peak_lr: the paper's 4.8 at 4096, not 0.6 x 16).
REFERENCE_BASE_LR = {"lars": 0.6, "sgd": 0.6, "adamw": 5e-4}


def build_optimizer(model: torch.nn.Module, name: str, *, lr: float, weight_decay: float, momentum: float,
                    trust_coefficient: float, lars_exclude: str = "bn_bias") -> torch.optim.Optimizer:
    """``lars_exclude`` (LARS only): "bn_bias" = biases and norm parameters without decay or adaptation
    (timm's Lars); "none" = the reference's LARC over every parameter (ReferenceLARC)."""
    if name == "lars" and lars_exclude == "none":
        params = [p for p in model.parameters() if p.requires_grad]
        return ReferenceLARC(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                             trust_coefficient=trust_coefficient)
    groups = parameter_groups(model, weight_decay)
    if name == "lars":
        weights, norms_and_biases = groups
        weights["always_adapt"], norms_and_biases["always_adapt"] = True, False
        return Lars(groups, lr=lr, momentum=momentum, trust_coeff=trust_coefficient)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optim.optimizer: unknown optimizer '{name}'")
