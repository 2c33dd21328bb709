"""Stage 1 of training: where this process runs, among how many, in which precision (and the pre-flight
checks, before anything is read or written)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from swavkit.runtime import distributed
from swavkit.config import Config, ConfigError, shards_weights
from swavkit.training.preflight import preflight
from swavkit.data.device_decode import resolve_decode_on_device
from swavkit.runtime.device import resolve_auto_flag, resolve_device, resolve_precision


@dataclass
class Processes:
    """Stage 1: where this process runs, among how many, in which precision."""
    device: torch.device
    world: int
    rank: int
    is_main: bool
    local_world_size: int
    precision: str  # fp32 | bf16 | fp16
    colour_on_device: bool  # colour ops in the training loop (True) or in the data workers
    decode_on_device: bool = False  # JPEGs decoded and cut in the training loop (implies colour_on_device)
    # dist.strategy, decided once here: FSDP shards the weights over the processes (True) or every process holds
    # the whole model under DDP (False); swavkit.training.sharding.parallelize acts on it
    sharded: bool = False

    def say(self, *args, **kwargs) -> None:
        """print on the main process only"""
        if self.is_main:
            print(*args, **kwargs)

    def say_progress(self, text: str) -> None:
        """A line on the main process while a progress bar is showing."""
        if self.is_main:
            tqdm.write(text)


def check_processes(sharded_weights: bool, world_size: int, device_type: str) -> None:
    """Refuse FSDP in one process: there is nothing to shard over, and it would only slow the step."""
    if sharded_weights and world_size < 2:
        where = "torchrun --nproc_per_node=N (N GPUs; on a CPU, N >= 2)" if device_type == "cuda" else \
            "torchrun --nproc_per_node=2 or more"
        raise ConfigError(f"dist.strategy=fsdp needs several processes, this run has 1 on {device_type}: launch "
                          f"with {where}, or use dist.strategy=ddp (one process holds the whole model anyway)")


def start_processes(cfg: Config) -> Processes:
    launch = distributed.detect_launch()
    device = resolve_device(cfg.train.device, launch.local_rank)
    launch = distributed.init(device.type)
    world = distributed.world_size()
    preflight(cfg, world_size=world)
    check_processes(shards_weights(cfg), world, device.type)
    decode = resolve_decode_on_device(cfg.data.decode_on_device, device)
    return Processes(device, world, distributed.rank(), distributed.is_main_process(), launch.local_world_size,
                      resolve_precision(cfg.train.precision, device),
                      resolve_auto_flag(cfg.data.colour_on_device, device) or decode, decode, shards_weights(cfg))
