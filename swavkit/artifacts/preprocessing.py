"""Where a backbone's evaluation preprocessing comes from: the image size and mean/std an export or a
training checkpoint records (the constants and the crop rule are in swavkit/data/constants.py, the
transform in swavkit/data/transforms.py)."""

from __future__ import annotations

import json
from pathlib import Path

from swavkit.artifacts.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_state
from swavkit.artifacts.pretrained import pretrained_timm_name, resolve_source
from swavkit.data.constants import (DEFAULT_IMAGE_SIZE_PX, eval_size_px, IMAGENET_MEAN, IMAGENET_STD, RAW_PIXELS_DEFAULT_SIZE_PX,
                                    RAW_PIXELS_SOURCE)
from swavkit.data.transforms import Preprocessing
from swavkit.artifacts.layout import EXPORT_CONFIG, RUN_EXPORT_DIR, holds_export


def _export_pretrained_cfg(source: Path) -> dict | None:
    for folder in (source, source / RUN_EXPORT_DIR):
        if holds_export(folder):
            try:
                loaded = json.loads((folder / EXPORT_CONFIG).read_text())
            except ValueError:
                return None
            # the export's data.bit_depth (swavkit.artifacts.checkpoint.EXPORT_BIT_DEPTH_KEY) travels with its mean/std
            return {**loaded.get("pretrained_cfg", {}), "bit_depth": loaded.get("input_bit_depth", 8)}
    return None


def _checkpoint_crops(path: Path) -> dict | None:
    """The ``crops`` section of a swavkit training checkpoint's config, plus its data.bit_depth as
    ``bit_depth``; None for any other file."""
    try:
        state = load_state(path)
    except CheckpointError:
        return None  # load_backbone will report the problem with its own message
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        config = state.get("config", {})
        return {**config.get("crops", {}), "bit_depth": config.get("data", {}).get("bit_depth", 8)}
    return None


def timm_pretrained_cfg(name: str) -> dict:
    """timm's pretrained cfg of ``name`` (``input_size`` [C, H, W], ``mean``, ``std``, ...): what its weights
    were trained and are evaluated at."""
    import timm  # the registry: only for timm names

    return timm.models.get_pretrained_cfg(name).to_dict()


def resolve_preprocessing(source: str | Path, image_size_px: int | None = None) -> Preprocessing:
    """Image size and normalisation for a backbone source.

    Size: ``image_size_px`` if given, else the ``input_size`` an exported folder records, else the
    large-crop size of a swavkit training checkpoint, else the ``input_size`` of a timm pretrained name's cfg,
    else 224 (32 for ``"pixels"``). Mean/std follow the
    same sources (ImageNet statistics by default); ``"pixels"`` uses mean 0, std 1. The crop follows
    :func:`crop_fraction_for`. The channel count (len(mean)) and bit depth follow the export or checkpoint too.
    """
    size, mean, std, origin, bit_depth = None, IMAGENET_MEAN, IMAGENET_STD, "default", 8
    if str(source) == RAW_PIXELS_SOURCE:
        size, mean, std = RAW_PIXELS_DEFAULT_SIZE_PX, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    elif pretrained_timm_name(source):  # downloadable weights: their own pretrained cfg
        pretrained_cfg = timm_pretrained_cfg(str(source))
        size, origin = int(pretrained_cfg["input_size"][-1]), "timm pretrained cfg"
        mean, std = tuple(pretrained_cfg["mean"]), tuple(pretrained_cfg["std"])
    elif not str(source).startswith("timm:"):
        path = resolve_source(source, need="backbone")
        pretrained_cfg = _export_pretrained_cfg(path) if path.is_dir() else None
        if pretrained_cfg:
            if pretrained_cfg.get("input_size"):
                size, origin = int(pretrained_cfg["input_size"][-1]), "export config"
            mean = tuple(pretrained_cfg.get("mean", mean))
            std = tuple(pretrained_cfg.get("std", std))
            bit_depth = pretrained_cfg.get("bit_depth", 8)
        elif path.is_file() and path.suffix == ".pt":
            crops = _checkpoint_crops(path)
            if crops is not None:
                if crops.get("sizes_px"):
                    size, origin = eval_size_px(crops["sizes_px"]), "checkpoint config"
                mean, std = tuple(crops.get("mean", mean)), tuple(crops.get("std", std))
                bit_depth = crops.get("bit_depth", 8)
    if image_size_px:
        size, origin = int(image_size_px), "argument"
    return Preprocessing.for_size(size or DEFAULT_IMAGE_SIZE_PX, mean, std, origin, bit_depth)


__all__ = ["Preprocessing", "resolve_preprocessing", "timm_pretrained_cfg"]
