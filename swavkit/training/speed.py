"""The speed of one training step, measured once, as the run will run it.

``--auto`` with a budget on a CPU chooses its crops and ``train.epochs`` from the seconds a step takes, and a
budget run (swavkit/training/budget.py) makes its first plan from the same figure, before its first step: what
``--auto`` prints (passes, warm-up, prototype freezing) is then what the run plans. The figure is that of
:func:`swavkit.training.step.train_step` itself - the config's backbone, head and prototypes, its crops at the
per-process batch, its precision, under the thread count training uses - on random crops; only the data loading
is not in it (the run's own clock re-fits the total to the speed it sees, as for any budget run).

Measured once per process and remembered by what decides a step's cost (:func:`step_key`), so the run, started
in the same process (``swavkit pretrain --auto``, ``swavkit.pretrain(auto=True)``), finds the figure --auto used.
A run without it (no --auto, or on a GPU, where --auto does not time) plans from its clock alone.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch
import yaml

from swavkit.config import Config, backbone_kwargs, head_hidden_dims, prototype_rows, to_dict
from swavkit.core.model import build_model
from swavkit.core.optim import build_optimizer, resolve_optimizer_name
from swavkit.runtime.device import autocast_dtype, resolve_auto_flag
from swavkit.training.step import StepSettings, TrainState, train_step

TIMED_STEPS = 2  # after one untimed step (allocator, kernels): the median of these

# what step_key gave -> seconds per optimiser step, for the life of the process
_MEASURED: dict[str, float] = {}


def step_key(cfg: Config, device: torch.device, world: int, precision: str) -> str:
    """What decides the cost of one step of ``cfg`` on ``device`` among ``world`` processes in ``precision``
    (resolved), as text: the model, the crops, the per-process batch, the channels and the compute threads."""
    tree = to_dict(cfg)
    return yaml.safe_dump({"model": tree["model"], "method": cfg.method, "deepcluster": tree["deepcluster"],
                           "crops": {"counts": list(cfg.crops.counts), "sizes_px": list(cfg.crops.sizes_px)},
                           "channels": cfg.data.channels, "batch_per_process": max(1, cfg.train.batch_size // world),
                           "accumulate_steps": cfg.train.accumulate_steps, "device": device.type,
                           "precision": precision, "threads": torch.get_num_threads()}, sort_keys=True)


def measured_step_seconds(cfg: Config, device: torch.device, world: int, precision: str) -> float | None:
    """Seconds per step of ``cfg`` as this process measured it (:func:`step_seconds`), None when it did not."""
    return _MEASURED.get(step_key(cfg, device, world, precision))


def step_seconds(cfg: Config, device: torch.device, world: int = 1, precision: str = "fp32") -> float:
    """Wall seconds of one optimiser step of ``cfg`` (:func:`measure_step_seconds`), measured on the first call
    for what decides its cost and remembered after it."""
    key = step_key(cfg, device, world, precision)
    if key not in _MEASURED:
        _MEASURED[key] = measure_step_seconds(cfg, device, world, precision)
    return _MEASURED[key]


def measure_step_seconds(cfg: Config, device: torch.device, world: int = 1, precision: str = "fp32") -> float:
    """Median wall seconds of :data:`TIMED_STEPS` optimiser steps of ``cfg``'s model (built as training builds
    it, on ``device``) on random crops [B, C, size, size] at the per-process batch B, after one untimed step.
    The global RNG is left as it was (training seeds its own). ``method=deepclusterv2`` is timed on the SwAV step of
    the same model and crops (Sinkhorn codes instead of its memory bank and k-means targets, which need the data
    set): the backbone's forward and backward, the same in both, are nearly all of a step; the epoch-start
    k-means is not in the figure."""
    batch = max(1, cfg.train.batch_size // world)
    m = cfg.model
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        core = build_model(m.backbone, prototype_rows(cfg), head_hidden_dims(m), m.output_dim, backbone_kwargs(cfg),
                           zero_init_last=m.zero_init_last, head_bn=m.head_bn)
        memory_format = torch.channels_last if resolve_auto_flag(m.channels_last, device) else torch.contiguous_format
        core = core.to(device).to(memory_format=memory_format)
        optimizer = build_optimizer(core, resolve_optimizer_name(cfg.optim.optimizer, core.backbone), lr=0.0,
                                    weight_decay=cfg.optim.weight_decay, momentum=cfg.optim.momentum,
                                    trust_coefficient=cfg.optim.lars_trust_coefficient,
                                    lars_exclude=cfg.optim.lars_exclude)
        state = TrainState(core, optimizer, torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
                           epsilon=cfg.swav.epsilon)
        # the prototypes trained, no queue: the cost of most of the run's steps
        settings = dataclasses.replace(StepSettings.from_config(cfg, 1, autocast_dtype(precision)),
                                       freeze_prototype_steps=0)
        crops = [torch.rand(batch, cfg.data.channels, size, size, device=device).contiguous(memory_format=memory_format)
                 for count, size in zip(cfg.crops.counts, cfg.crops.sizes_px) for _ in range(count)]
        seconds = []
        for _ in range(1 + TIMED_STEPS):
            start = time.perf_counter()
            train_step(state, crops, settings, lr=0.0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[1:])


__all__ = ["step_seconds", "measured_step_seconds", "measure_step_seconds", "step_key", "TIMED_STEPS"]
