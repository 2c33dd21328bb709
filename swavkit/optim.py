"""Optimisers: LARS (timm's maintained implementation) around SGD for CNNs, AdamW for transformers.

Biases and normalisation parameters get neither weight decay nor LARS adaptation (timm's Lars only
adapts groups with weight decay), the usual practice for LARS-trained self-supervised models.
"""

from __future__ import annotations

import torch
from timm.optim import Lars

from swavkit.model import is_transformer


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
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


# Reference learning rates at a global batch of 256, used when optim.base_lr is 0.
REFERENCE_BASE_LR = {"lars": 0.6, "sgd": 0.6, "adamw": 5e-4}


def build_optimizer(model: torch.nn.Module, name: str, *, lr: float, weight_decay: float, momentum: float,
                    trust_coefficient: float) -> torch.optim.Optimizer:
    groups = parameter_groups(model, weight_decay)
    if name == "lars":
        return Lars(groups, lr=lr, momentum=momentum, trust_coeff=trust_coefficient)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optim.optimizer: unknown optimizer '{name}'")
