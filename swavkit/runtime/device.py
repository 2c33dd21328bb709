"""Device and precision: the words of the config and the CLI ("auto", "cuda:1", "bf16", ...) -> what
torch is given.

One place for the rules, so training and every evaluation agree on what "auto" means.
"""

from __future__ import annotations

import torch

from swavkit.errors import ConfigError

# precision word -> the dtype autocast runs in; fp32 (absent) means no autocast at all
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(name: str | torch.device = "auto", local_rank: int | None = None) -> torch.device:
    """auto | cpu | cuda | cuda:N | a torch.device -> the device this process uses.

    "auto" is the GPU when one is visible, else the CPU. A GPU without an index is GPU ``local_rank``
    (a launcher's local rank), or torch's current GPU when ``local_rank`` is None. Raises ConfigError
    naming the word when it is no device or asks for a GPU that is not there.
    """
    if isinstance(name, torch.device):
        resolved = name
    else:
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            resolved = torch.device(name)
        except (RuntimeError, TypeError):
            raise ConfigError(f"device: '{name}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: '{name}' requested but no CUDA GPU is visible; use cpu")
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device() if local_rank is None else local_rank)
    return resolved


def resolve_precision(name: str, device: torch.device) -> str:
    """auto | fp32 | bf16 | fp16 -> fp32 | bf16 | fp16 for ``device``; auto is bf16 on GPUs that have it."""
    if name not in PRECISIONS:
        raise ConfigError(f"precision: '{name}' is not one of {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("precision: fp16 needs a GPU (fp16 training needs a loss scaler, and CPUs run fp16 "
                          "slowly); use bf16 or fp32 on a CPU")
    return name


def autocast_dtype(precision: str) -> torch.dtype | None:
    """A resolved precision (fp32 | bf16 | fp16) -> the autocast dtype, or None for no autocast."""
    return AUTOCAST_DTYPES.get(precision)


def resolve_auto_flag(name: str, device: torch.device) -> bool:
    """auto | true | false -> bool, auto meaning "on a GPU": for data.colour_on_device (on a GPU the
    workers' colour ops were the bottleneck) and model.channels_last (faster there, neutral on a CPU)."""
    return name == "true" or (name == "auto" and device.type == "cuda")


__all__ = ["AUTOCAST_DTYPES", "PRECISIONS", "resolve_device", "resolve_precision", "autocast_dtype",
           "resolve_auto_flag"]
