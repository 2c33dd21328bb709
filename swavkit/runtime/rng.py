"""The random-number state a resumed run needs to continue exactly where it stopped.

One pair of functions for every trainer (pretraining's TrainState, fine-tuning), so that both capture the
same generators and write them under the same keys: ``rng_cpu`` (torch's default CPU generator) and
``rng_cuda`` (the generator of the GPU the run uses; None on a CPU). Those are the key names pretraining
checkpoints have always used, so old checkpoints keep loading.
"""

from __future__ import annotations

import torch


def capture_rng_state(device: torch.device) -> dict:
    """{"rng_cpu": ByteTensor, "rng_cuda": ByteTensor of ``device``'s generator, or None off a GPU}."""
    return {"rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng_state(state: dict, device: torch.device) -> None:
    """Set the generators from :func:`capture_rng_state`'s dict. The GPU's state is restored only on a GPU and
    only when one was saved: a run saved on the CPU and resumed on a GPU keeps the GPU generator it has."""
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and state.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(state["rng_cuda"], device)


__all__ = ["capture_rng_state", "restore_rng_state"]
