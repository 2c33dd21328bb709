"""What identifies a backbone wherever its files live: its architecture name, the channels it takes, a hash
of its weights, and the seed a ``timm:<name>`` random initialisation is drawn with (so that source names the
same weights on every run). Embeddings manifests, ONNX metadata, k-means centroids and result records
record these; a later command compares them.

Torch is imported inside the functions: ``swavkit embed``'s module (read by ``swavkit --help``) uses them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

RANDOM_INIT_SEED = 0


def load_seeded_backbone(source: str | Path):
    """``load_backbone(source)`` with ``timm:<name>`` weights drawn under seed ``RANDOM_INIT_SEED`` (the
    caller's RNG untouched), so the random-init floor, an ONNX export and an embeddings manifest name the
    same backbone on every run. Eval mode, on CPU."""
    import torch

    from swavkit.artifacts.pretrained import load_backbone  # torch + timm registry: only when loading

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return load_backbone(source)


def backbone_name(backbone) -> str:
    """timm architecture name when known, else the class name."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(backbone).__name__


def backbone_record(source, architecture: str, feature_dim: int) -> dict:
    """The ``backbone`` section of a result record and an embeddings manifest."""
    record = {"source": str(source), "architecture": architecture, "feature_dim": int(feature_dim)}
    if str(source).startswith("timm:"):
        record["random_init_seed"] = RANDOM_INIT_SEED
    return record


def weights_sha256(module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), in state_dict order: the same
    weights give the same hash wherever the files live, any changed weight another."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)  # 0-d buffers (BN counters) too
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def input_channels(module) -> int:
    """Channels the backbone takes: its first convolution's (timm's patch embedding is one too), else 3."""
    import torch

    first = next((m for m in module.modules() if isinstance(m, torch.nn.Conv2d)), None)
    return int(first.in_channels) if first is not None else 3
