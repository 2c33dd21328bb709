"""Released SEER weights (VISSL RegNet trunks) in timm's RegNet names.

VISSL saves a RegNet trunk as ``_feature_blocks.conv1.stem.{0,1}`` (stem conv, BN) and
``_feature_blocks.res<k>.block<stage>-<index>.{proj,bn,f.a.0,f.a.1,f.b.0,f.b.1,f.se.excitation.{0,2},f.c,f.final_bn}``;
timm maps that layout to its own (``stem.conv``, ``s<stage>.b<index + 1>.conv1.conv`` ...) in
``timm.models.regnet._filter_fn``, which is how timm itself loads its ``regnety_*.seer`` files. swavkit uses that
same mapping (not a copy of it), so a file timm loads, swavkit loads, strictly, through ``model.init`` and
``swavkit.load_backbone(path, architecture="regnety_1280")``.
"""

from __future__ import annotations

import torch

_VISSL_REGNET_MARKERS = ("_feature_blocks.conv1.stem.", "_feature_blocks.res")


def is_vissl_regnet(state: dict) -> bool:
    """Whether a tensor dict holds a VISSL RegNet trunk (possibly under ``trunk.`` / ``module.`` prefixes)."""
    return any(marker in key for key in state for marker in _VISSL_REGNET_MARKERS)


def vissl_regnet_to_timm(state: dict) -> dict:
    """VISSL RegNet trunk tensors -> timm RegNet state dict (backbone only: heads are dropped).

    Args:
        state: {name: tensor}; names may carry prefixes before ``_feature_blocks.`` (``trunk.``, ``module.``).
    """
    from timm.models.regnet import _filter_fn

    trunk = {}
    for key, value in state.items():
        start = key.find("_feature_blocks.")
        if start >= 0 and isinstance(value, torch.Tensor):
            trunk[key[start:]] = value
    return _filter_fn({"classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": {}}}}})


__all__ = ["is_vissl_regnet", "vissl_regnet_to_timm"]
