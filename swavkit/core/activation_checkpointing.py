"""Activation checkpointing (``model.activation_checkpointing``): recompute a block's activations in the
backward pass instead of keeping them, trading ~one extra forward for memory.

A fraction f in (0, 1] checkpoints the first ceil(f x n) of the backbone's n blocks with
``torch.utils.checkpoint`` (the early blocks of a CNN hold the largest feature maps, so they free the most
per recomputed FLOP); "on" is all of them. Blocks are what timm's ``group_matcher`` calls blocks (``s1.b1``
in a RegNet, ``layer1.0`` in a ResNet, ``blocks.0`` in a ViT), also the units :mod:`swavkit.training.sharding` shards.

Why not timm's ``set_grad_checkpointing`` for "on": its recompute runs every BatchNorm a second time in train
mode, which applies the running-statistics update twice per step (measured: the running means then differ
from a run without checkpointing). Our wrapper sets BN momentum to 0 during the recompute, so loss,
gradients AND BN statistics equal those without checkpointing (tests/test_sharding.py). timm's method is
used only for a backbone whose blocks its group_matcher does not name AND that has no BatchNorm tracking
running statistics; such a backbone with BatchNorm is refused (one line), since its statistics would drift.
"""

from __future__ import annotations

import contextlib
import math
import re
import types

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from swavkit.config import ConfigError, parse_fraction

KEY = "model.activation_checkpointing"


def _block_patterns(backbone: nn.Module) -> list[str]:
    """The regexes timm's ``group_matcher(coarse=False)`` uses for blocks (the stem and final norm excluded)."""
    matcher = getattr(backbone, "group_matcher", None)
    if matcher is None:
        return []
    blocks = matcher(coarse=False).get("blocks")
    if isinstance(blocks, str):
        return [blocks]
    # [(regex, None), (regex, (99999,))]: a fixed group number marks a lone layer (a final norm), not a block
    return [pattern for pattern, suffix in (blocks or []) if suffix is None]


def backbone_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's blocks in forward order (timm's ``group_matcher``); [] when it names none."""
    prefixes: dict[str, None] = {}
    patterns = [re.compile(p) for p in _block_patterns(backbone)]
    for name, _ in backbone.named_parameters():
        for pattern in patterns:
            match = pattern.match(name)
            if match:
                prefixes.setdefault(match.group(0).rstrip("."), None)
                break
    blocks = []
    for prefix in prefixes:
        try:
            module = backbone.get_submodule(prefix)
        except AttributeError:  # a regex that stops inside a name (e.g. "blocks.1" of "blocks.10")
            continue
        if module is not backbone and not any(module is b for b in blocks):
            blocks.append(module)
    return blocks


def _checkpointed_forward(block: nn.Module, *args, **kwargs):
    """The block's own forward under torch.utils.checkpoint (non-reentrant: works with FSDP2 and with
    inputs that need no gradient)."""
    original = type(block).forward
    return checkpoint(original, block, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _frozen_batchnorm(block)), **kwargs)


def _tracked_batchnorms(module: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers that update running statistics in train mode."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def _frozen_batchnorm(block: nn.Module):
    """During the recompute: BN layers normalise with the batch statistics as in the forward, but leave their
    running statistics (and batch count) as the forward left them."""
    norms = [m for m in _tracked_batchnorms(block) if m.training]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) x running + 0 x batch: unchanged, exactly
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def apply_activation_checkpointing(backbone: nn.Module, value: str, backbone_name: str = "") -> str:
    """Turn on checkpointing as ``model.activation_checkpointing`` says; returns a description ("" = off).

    A no-op for "off" (nothing is wrapped: the default path is untouched).
    """
    fraction = parse_fraction(value)
    if fraction == 0.0:
        return ""
    blocks = backbone_blocks(backbone)
    name = backbone_name or type(backbone).__name__
    if fraction == 1.0 and not blocks and hasattr(backbone, "set_grad_checkpointing"):
        if _tracked_batchnorms(backbone):
            # timm's recompute would run these in train mode a second time: two running-statistics updates a step
            raise ConfigError(f"{KEY}={value}: {name} names no blocks in timm's group_matcher, and timm's "
                              "set_grad_checkpointing would update its BatchNorm statistics twice per step; set it "
                              "to off, or use a backbone whose blocks timm names (RegNet, ResNet, ViT ...)")
        try:
            backbone.set_grad_checkpointing(True)
            return ("activation checkpointing: timm's set_grad_checkpointing (the backbone names no blocks, so "
                    "timm chooses the segments; no BatchNorm statistics to update twice)")
        except (AssertionError, NotImplementedError):
            pass  # timm models that declare it unsupported: refused below
    if not blocks:
        raise ConfigError(f"{KEY}={value}: {name} has neither timm's "
                          "set_grad_checkpointing nor blocks named by its group_matcher; set it to off")
    count = max(1, math.ceil(fraction * len(blocks)))
    for block in blocks[:count]:
        # an instance attribute: nn.Module.__call__ (and its hooks, FSDP's included) still runs around it,
        # and the state dict keys stay those of timm (no wrapper module)
        block.forward = types.MethodType(_checkpointed_forward, block)
    return f"activation checkpointing: the first {count} of {len(blocks)} blocks (torch.utils.checkpoint)"


__all__ = ["backbone_blocks", "apply_activation_checkpointing"]
