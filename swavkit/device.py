"""Device and precision: the config's words ("auto", "bf16", ...) -> what torch is given.

One place for the rules, so training and evaluation agree on what "auto" means.
"""

from __future__ import annotations

import torch

from swavkit.config import ConfigError

# precision word -> the dtype autocast runs in; fp32 (absent) means no autocast at all
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``train.device`` (auto | cpu | cuda) -> this process's device; under a launcher, GPU ``local_rank``."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device: cuda requested but no GPU is visible; use train.device=cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_precision(name: str, device: torch.device) -> str:
    """``train.precision`` (auto | fp32 | bf16 | fp16) -> fp32 | bf16 | fp16 for ``device``."""
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision: fp16 needs a GPU (it needs a loss scaler); use bf16 or fp32 on CPU")
    return name


def autocast_dtype(precision: str) -> torch.dtype | None:
    """A resolved precision (fp32 | bf16 | fp16) -> the autocast dtype, or None for no autocast."""
    return AUTOCAST_DTYPES.get(precision)


def resolve_auto_flag(name: str, device: torch.device) -> bool:
    """auto | true | false -> bool, auto meaning "on a GPU": for data.colour_on_device (on a GPU the
    workers' colour ops were the bottleneck) and model.channels_last (faster there, neutral on a CPU)."""
    return name == "true" or (name == "auto" and device.type == "cuda")


__all__ = ["AUTOCAST_DTYPES", "resolve_device", "resolve_precision", "autocast_dtype", "resolve_auto_flag"]
