"""Load backbones from anything a user has: an exported folder, a swavkit training checkpoint, a released
SwAV checkpoint (``module.``-prefixed, with ``projection_head.*`` / ``prototypes.*``), VISSL trunk
weights, or ``timm:<name>`` (random init, the floor of every benchmark). Loading is always strict:
a key mismatch raises :class:`LoadError` listing the keys, never silently random weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import timm
from safetensors.torch import load_file, save

from swavkit.checkpoint import (CHECKPOINT_FORMAT, CheckpointError, backbone_state, check_export_target,
                                export_backbone, load_state)
from swavkit.config import from_dict
from swavkit.model import SwAVModel, build_model, create_backbone


class LoadError(RuntimeError):
    """The weights do not fit the model; the message lists missing and unexpected keys."""


def _describe_keys(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_strict(module: torch.nn.Module, state: dict, source: str) -> torch.nn.Module:
    """``load_state_dict(strict=True)`` with a one-line error naming missing/unexpected/mis-shaped keys."""
    expected = module.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    wrong_shape = [k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing keys: {_describe_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_describe_keys(unexpected)}")
        if wrong_shape:
            parts.append("wrong shapes: " + _describe_keys(
                f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong_shape))
        raise LoadError(f"{source} does not fit {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
    return module


# ----------------------------------------------------------------------------------------------------
# released checkpoint layouts

_STRIP_PREFIXES = ("module.", "_feature_blocks.", "trunk.", "base_model.", "backbone.", "model.")
_HEAD_PREFIXES = ("projection_head.", "prototypes.", "heads.", "head.")


def _unwrap_container(state: dict) -> dict:
    """Find the tensor dict inside the usual wrappers: state_dict / model / VISSL classy_state_dict."""
    for path in (("classy_state_dict", "base_model", "model", "trunk"), ("model", "trunk"), ("state_dict",),
                 ("model",), ("teacher",)):
        node = state
        for key in path:
            if isinstance(node, dict) and key in node:
                node = node[key]
            else:
                node = None
                break
        if isinstance(node, dict) and node and all(isinstance(v, torch.Tensor) for v in node.values()):
            return node
    return state


def split_reference_state(state: dict) -> tuple[dict, dict]:
    """Released SwAV / VISSL weights -> (backbone state in timm/torchvision ResNet names, head state).

    The head state holds ``projection_head.*`` and ``prototypes.*`` with prefixes stripped, so it can be
    loaded into a :class:`SwAVModel`.
    """
    tensors = _unwrap_container(state)
    backbone, head = {}, {}
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            continue
        name = key
        changed = True
        while changed:
            changed = False
            for prefix in _STRIP_PREFIXES:
                if name.startswith(prefix):
                    name, changed = name[len(prefix):], True
        if name.startswith(_HEAD_PREFIXES):
            head[name] = value
        elif not name.startswith("fc."):  # a supervised classifier is not part of the backbone
            backbone[name] = value
    return backbone, head


def _reference_head_to_swavkit(head: dict) -> dict:
    """projection_head.{0,1,3} / prototypes.weight -> SwAVModel's head.layers.* / prototypes.weight."""
    out = {}
    for key, value in head.items():
        if key.startswith("projection_head."):
            out["head.layers." + key[len("projection_head."):]] = value
        elif key.startswith("prototypes."):
            out["prototypes." + key[len("prototypes."):]] = value
    return out


# ----------------------------------------------------------------------------------------------------
# public API

def _is_export_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def load_backbone(source: str | Path, *, architecture: str = "resnet50") -> torch.nn.Module:
    """A timm backbone (num_classes=0, eval mode) from any supported source.

    Args:
        source: an exported folder (``config.json`` + ``model.safetensors``), a swavkit run folder
            (its ``backbone/`` is used), a swavkit training checkpoint (``.pt``), a released SwAV or
            VISSL checkpoint (``.pth``/``.torch``/``.tar``), or ``timm:<name>`` for random init.
        architecture: timm name for released checkpoints, which do not record it (default resnet50).
    """
    text = str(source)
    if text.startswith("timm:"):
        return create_backbone(text[len("timm:"):]).eval()
    path = Path(text)
    if path.is_dir() and not _is_export_dir(path) and _is_export_dir(path / "backbone"):
        path = path / "backbone"
    if _is_export_dir(path):
        try:
            config = json.loads((path / "config.json").read_text())
            arch, model_args = config["architecture"], dict(config.get("model_args", {}))
        except (ValueError, KeyError) as err:
            raise LoadError(f"{path / 'config.json'}: not a timm export config ({err})") from None
        model_args["num_classes"] = 0
        net = timm.create_model(arch, pretrained=False, **model_args)
        return load_strict(net, load_file(str(path / "model.safetensors")), str(path)).eval()
    if path.is_dir():
        raise LoadError(f"{path}: a folder without config.json + model.safetensors (or backbone/ with them); "
                        "export one with `swavkit export CHECKPOINT OUT_DIR`")
    state = load_state(path)
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        cfg = from_dict(state["config"])
        net = create_backbone(cfg.model.backbone, **cfg.model.backbone_kwargs)
        return load_strict(net, backbone_state(state["model"]), str(path)).eval()
    backbone, _ = split_reference_state(state)
    net = create_backbone(architecture)
    return load_strict(net, backbone, f"{path} (as {architecture})").eval()


def load_swav_model(source: str | Path, *, architecture: str = "resnet50") -> tuple[SwAVModel, dict]:
    """The whole SwAVModel (backbone + head + prototypes) and the config dict it was trained with.

    Works for swavkit training checkpoints and released SwAV checkpoints (projection 2048-128,
    3000 prototypes are read from the tensor shapes).
    """
    path = Path(source)
    state = load_state(path)
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        cfg = from_dict(state["config"])
        m = cfg.model
        model = build_model(m.backbone, m.n_prototypes, m.hidden_dim, m.output_dim, m.backbone_kwargs)
        return load_strict(model, state["model"], str(path)).eval(), state["config"]
    backbone, head = split_reference_state(state)
    head = _reference_head_to_swavkit(head)
    if "prototypes.weight" not in head:
        raise LoadError(f"{path} has no prototypes.weight: it holds a backbone only; use load_backbone")
    n_prototypes, output_dim = head["prototypes.weight"].shape
    linear_keys = sorted(k for k in head if k.startswith("head.layers.") and k.endswith(".weight")
                         and head[k].ndim == 2)
    hidden_dim = head[linear_keys[0]].shape[0] if len(linear_keys) > 1 else 0
    model = build_model(architecture, n_prototypes, hidden_dim, output_dim)
    full = {f"backbone.{k}": v for k, v in backbone.items()} | head
    config = {"model": {"backbone": architecture, "n_prototypes": n_prototypes, "hidden_dim": hidden_dim,
                        "output_dim": output_dim}}
    return load_strict(model, full, f"{path} (as {architecture})").eval(), config


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """``swavkit export``: training checkpoint -> timm-loadable ``out_dir`` (config.json + model.safetensors)."""
    check_export_target(out_dir)  # before any loading: a refused target should fail fast
    state = load_state(checkpoint)
    if not (isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT):
        backbone = load_backbone(checkpoint)
        return export_backbone(backbone, out_dir, image_size_px=224, mean=(0.485, 0.456, 0.406),
                               std=(0.229, 0.224, 0.225))
    cfg = from_dict(state["config"])
    net = create_backbone(cfg.model.backbone, **cfg.model.backbone_kwargs)
    load_strict(net, backbone_state(state["model"]), str(checkpoint))
    return export_backbone(net, out_dir, image_size_px=cfg.crops.sizes_px[0], mean=cfg.crops.mean,
                           std=cfg.crops.std)


def export_torchvision(source: str | Path, out_file: str | Path) -> Path:
    """Backbone weights in torchvision's ResNet key layout (``conv1``, ``layer1.0.downsample.0`` ...).

    timm's plain ResNets already use torchvision's names; the file has no ``fc.*``, so load it with
    ``model.fc = torch.nn.Identity(); model.load_state_dict(load_file(path))`` (strict). The weights are
    first loaded strictly into torchvision's model of the same name, so a backbone torchvision cannot
    represent (resnet10t's deep stem, a ViT ...) is refused instead of written as an unloadable file.
    """
    import torchvision

    from swavkit.fileio import atomic_writer

    net = load_backbone(source)
    architecture = getattr(net, "default_cfg", {}).get("architecture") or type(net).__name__.lower()
    builder = getattr(torchvision.models, architecture, None)
    if builder is None or not architecture.startswith(("resnet", "resnext", "wide_resnet")):
        raise LoadError(f"{source}: torchvision has no '{architecture}' ResNet, so its weights cannot be written "
                        "in torchvision's layout; use the timm export (timm.create_model('local-dir:...'))")
    target = builder(weights=None)
    target.fc = torch.nn.Identity()
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    load_strict(target, state, f"{source} as torchvision {architecture}")
    with atomic_writer(out_file) as handle:
        handle.write(save(state))
    return Path(out_file)


__all__ = ["LoadError", "CheckpointError", "load_backbone", "load_swav_model", "load_strict",
           "export_checkpoint", "export_torchvision", "split_reference_state"]
