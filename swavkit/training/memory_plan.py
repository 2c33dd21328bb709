"""Memory plan: the peak memory of one training step per process, estimated without allocating, and the
pre-flight check that refuses a run that would not fit (one line, exit 2, before anything is written).

How the estimate is made (docs/guides/memory-plan.md):

* The SwAV model is built on the meta device (no storage) through :func:`swavkit.core.model.build_model`, as
  training builds it, and activation checkpointing is applied as training applies it. Parameter, gradient and
  optimiser-state bytes are counted from it (under ``dist.strategy=fsdp`` the backbone and head are divided by
  the process count, the prototypes stay whole, plus the all-gathered weights of the largest block).
* Activations: the forward of the configured crops at the per-process batch runs on fake tensors (meta
  storage with a CPU device: autocast applies, nothing is computed or allocated) through the model and the
  swapped loss, and ``torch.autograd.graph.saved_tensors_hooks`` counts the bytes autograd keeps for the
  backward pass (each storage once; the parameters themselves are already counted). The backward's
  transient (gradients of the largest activations) is added as a multiple of the largest saved tensor.
* The host side: the interpreter with torch and timm loaded, the crops of the step, the data workers and the
  batches they hold (prefetch_factor per worker), measured on this project's CPU machine
  (benchmarks/bench_memory_estimate.py calibrates and checks the constants below).

The memory available is read from the system (``/proc/meminfo`` MemAvailable and the cgroup limit, or
``torch.cuda.mem_get_info``) unless ``SWAVKIT_MEMORY_AVAILABLE_BYTES`` / ``SWAVKIT_GPU_MEMORY_AVAILABLE_BYTES``
give it (a number of bytes or a size such as 4GB): for a machine shared with other work, and for tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from swavkit.config import (Config, ConfigError, backbone_kwargs, from_dict, head_hidden_dims, parse_fraction,
                            prototype_rows, shards_weights, to_dict)
from swavkit.core.activation_checkpointing import apply_activation_checkpointing, backbone_blocks
from swavkit.core.loss import swapped_prediction_loss
from swavkit.core.model import SwAVModel, build_model
from swavkit.core.optim import resolve_optimizer_name
from swavkit.runtime.device import autocast_dtype
from swavkit.runtime.procfs import proc_kib_bytes

# Host memory of a training process before its model and data: the interpreter with torch, timm, torchvision
# and swavkit imported, the allocator's arenas and the step's bookkeeping (measured: RSS of a training process
# on the CPU machine minus what the plan counts, median over benchmarks/bench_memory_estimate.py's configs).
RUNTIME_HOST_BYTES = {"cpu": 850 * 2**20, "cuda": 2048 * 2**20}  # cuda: CUDA/cuDNN libraries mapped (not measured here)
CUDA_CONTEXT_BYTES = 600 * 2**20  # GPU memory the CUDA context and cuBLAS/cuDNN workspaces take
# Unique memory of one data worker beside the batches it holds: decoded images, its Python objects written
# after the fork (copy-on-write pages), PIL buffers (measured: USS of a worker, bench_memory_estimate.py).
WORKER_HOST_BYTES = 96 * 2**20
# The backward pass holds, beside what the forward saved, the gradient of the activation it is working on and
# of that activation's input: about this many times the largest saved tensor (calibrated on the CPU machine).
BACKWARD_TRANSIENT_FACTOR = 3.0
# Optimiser state per parameter byte: LARS and SGD keep a momentum buffer, AdamW two moments.
OPTIMIZER_STATE_FACTOR = {"lars": 1, "sgd": 1, "adamw": 2}

ENV_HOST = "SWAVKIT_MEMORY_AVAILABLE_BYTES"
ENV_GPU = "SWAVKIT_GPU_MEMORY_AVAILABLE_BYTES"
LEVERS = ("--auto (derive the unset keys for this machine)", "a smaller train.batch_size{batch}",
          "smaller crops.sizes_px", "a smaller model.backbone", "model.activation_checkpointing=on",
          "more processes (torchrun; with dist.strategy=fsdp for the weights)")


class MemoryPlanError(ConfigError):
    """The run does not fit the memory available (one line: the estimate, what is available, the levers)."""


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes one training process needs at the peak of a step. ``device_type``: where the model lives."""
    processes: int
    per_process_batch: int
    device_type: str  # cpu | cuda
    precision: str  # fp32 | bf16 | fp16
    checkpointing: str  # "" = off, else the description
    parameters_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int  # saved for backward + the backward's transient, at per_process_batch
    batch_bytes: int  # the step's crops in the training process
    workers_bytes: int  # host: data workers and the batches they hold
    runtime_bytes: int  # host: interpreter and libraries; on a GPU plus the CUDA context there (in device_bytes)

    @property
    def model_state_bytes(self) -> int:
        return self.parameters_bytes + self.gradients_bytes + self.optimizer_bytes

    @property
    def device_bytes(self) -> int:
        """What the model's device holds: on a CPU everything of the training process, on a GPU the model
        state, activations, crops and the CUDA context."""
        if self.device_type == "cpu":
            return self.model_state_bytes + self.activations_bytes + self.batch_bytes + self.runtime_bytes
        return self.model_state_bytes + self.activations_bytes + self.batch_bytes + CUDA_CONTEXT_BYTES

    @property
    def host_bytes(self) -> int:
        """Host RAM of one process with its data workers (the model's bytes too when it trains on the CPU)."""
        if self.device_type == "cpu":
            return self.device_bytes + self.workers_bytes
        return self.runtime_bytes + self.workers_bytes + self.batch_bytes  # + the pinned copy of the crops

    def rows(self) -> list[tuple[str, int]]:
        """(what, bytes) per component, for printing."""
        return [("parameters", self.parameters_bytes), ("gradients", self.gradients_bytes),
                ("optimiser state", self.optimizer_bytes), ("activations", self.activations_bytes),
                ("crops of the step", self.batch_bytes), ("data workers", self.workers_bytes),
                ("runtime" + (" (host)" if self.device_type == "cuda" else ""), self.runtime_bytes)]


def format_bytes(n_bytes: float) -> str:
    """1234567890 -> '1.15 GiB' (binary units, as memory is sold and measured)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if abs(n_bytes) >= scale:
            return f"{n_bytes / scale:.{2 if n_bytes < 10 * scale else 1}f} {unit}"
    return f"{n_bytes / 2**20:.2f} MiB"


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_bytes(text: str | int, what: str) -> int:
    """'80GB', '80G', '80GiB', '1.5t', '4000000000' -> bytes (GB and GiB both mean 2**30: memory is sized in binary
    units); ConfigError naming ``what`` otherwise."""
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"{what}: '{text}' is not a size; use bytes or e.g. 80GB, 512MB")
    value, unit = float(match.group(1)), match.group(2).lower()
    return int(value * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[unit])


# ------------------------------------------------------------------------------------------------------------
# the model's bytes, on the meta device

def build_meta_model(cfg: Config) -> tuple[SwAVModel, str]:
    """(SwAVModel whose parameters and buffers live on the meta device, checkpointing description). Built by the
    same call as training's (trainer._build_model), so a head or backbone option there is the plan's too."""
    m = cfg.model
    with torch.device("meta"):
        core = build_model(m.backbone, prototype_rows(cfg), head_hidden_dims(m), m.output_dim, backbone_kwargs(cfg),
                           zero_init_last=m.zero_init_last, head_bn=m.head_bn)
    checkpointing = apply_activation_checkpointing(core.backbone, m.activation_checkpointing, m.backbone)
    return core, checkpointing


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@functools.lru_cache(maxsize=64)
def model_state_bytes(model_yaml: str, optimizer: str, processes: int, sharded: bool) -> tuple[int, int, int]:
    """(parameter, gradient, optimiser-state) bytes per process of the model ``model_yaml`` (the config's model
    section) trained with ``optimizer`` (auto | lars | sgd | adamw): everything under DDP; under FSDP 1/N of the
    backbone and head plus the whole prototypes, plus the full weights of the units running."""
    core, _ = build_meta_model(_model_config(model_yaml))
    factor = OPTIMIZER_STATE_FACTOR[resolve_optimizer_name(optimizer, core.backbone)]
    prototypes = core.prototypes.weight
    whole = _tensor_bytes([prototypes])
    shardable = _tensor_bytes([p for p in core.parameters() if p is not prototypes])
    if not sharded:
        return shardable + whole, _tensor_bytes([p for p in core.parameters() if p.requires_grad]), \
            factor * (shardable + whole)
    # a unit's full weights exist while it runs, and FSDP2 prefetches the next one's: the two largest units;
    # its full gradient exists until it is reduce-scattered: the largest
    units = sorted([_tensor_bytes(b.parameters()) for b in backbone_blocks(core.backbone)]
                   + [_tensor_bytes(core.head.parameters())], reverse=True)
    shard = math.ceil(shardable / processes)
    return shard + whole + sum(units[:2]), shard + whole + units[0], factor * (shard + whole)


# ------------------------------------------------------------------------------------------------------------
# activations, on fake tensors

def _to_fake(core: SwAVModel, mode) -> None:
    """Replace every meta parameter and buffer by a fake CPU tensor of the same shape (still no storage)."""
    from torch._subclasses.fake_tensor import FakeTensor

    cpu = torch.device("cpu")
    for module in core.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(FakeTensor(mode, p.data, cpu),
                                                              requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = FakeTensor(mode, b, cpu)


@functools.lru_cache(maxsize=64)
def _saved_bytes(model_yaml: str, batch: int, sizes: tuple[tuple[int, int], ...], channels: int, precision: str,
                 temperature: float, assignment: tuple[int, ...]) -> tuple[int, int]:
    """(bytes autograd saves for the backward, bytes of the largest saved tensor) for one forward + loss of the
    crops ``sizes`` ((count, side px) per group) at ``batch``. Cached: the same run configuration in one process
    (tests, --plan at several process counts) is traced once.

    fp32 runs on meta tensors; with autocast (bf16/fp16) on fake CPU tensors, which autocast sees as CPU tensors
    (meta tensors would skip it), at ~3x the tracing time (batch norm is decomposed op by op there)."""
    core, _ = build_meta_model(_model_config(model_yaml))
    core.train()
    dtype = autocast_dtype(precision)
    device, mode = torch.device("meta"), contextlib.nullcontext()
    if dtype is not None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode, device = FakeTensorMode(), torch.device("cpu")
        _to_fake(core, mode)
    parameters = {id(p) for p in core.parameters()}
    seen: dict[int, torch.Tensor] = {}  # storage address -> a tensor on it (kept alive so addresses stay unique)
    sizes_saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) in parameters:
            return t
        storage = t.untyped_storage()
        if storage._cdata not in seen:  # the storage's address: views of one tensor share it
            seen[storage._cdata] = t
            sizes_saved.append(storage.nbytes())
        return t

    with mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        crops = [torch.empty(batch, channels, side, side, device=device) for count, side in sizes
                 for _ in range(count)]
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            _, scores = core(crops)
        V, K = len(crops), core.n_prototypes
        scores = scores.float().view(V, batch, K)
        with torch.no_grad():  # the codes: Sinkhorn needs no gradient; its buffers are transient
            codes = {i: torch.softmax(scores[i], dim=-1) for i in assignment}
        swapped_prediction_loss(scores, codes, temperature)
    return sum(sizes_saved), max(sizes_saved, default=0)


def _model_yaml(cfg: Config) -> str:
    """What the model is built from (the ``model`` section, the method and its prototype heads) as text: the cache
    key of everything built from it."""
    tree = to_dict(cfg)
    return yaml.safe_dump({**{key: tree[key] for key in ("model", "method", "deepcluster")},
                           "data": {"channels": tree["data"]["channels"]}}, sort_keys=True)  # in_chans


def _model_config(model_yaml: str) -> Config:
    return from_dict(yaml.safe_load(model_yaml))


def activation_bytes(cfg: Config, batch: int, precision: str) -> int:
    """Bytes of activations one step holds at its peak at ``batch`` images per process (see module docstring)."""
    c = cfg.crops
    saved, largest = _saved_bytes(_model_yaml(cfg), batch, tuple(zip(c.counts, c.sizes_px)), cfg.data.channels,
                                  precision, cfg.swav.temperature, tuple(cfg.swav.assignment_crops))
    return int(saved + BACKWARD_TRANSIENT_FACTOR * largest)


def _checkpointing(m) -> str:
    """What model.activation_checkpointing does to this backbone, in words ("" = off)."""
    return "" if parse_fraction(m.activation_checkpointing) == 0 else \
        build_meta_model(_model_config(yaml.safe_dump({"model": dataclasses.asdict(m)})))[1]


def crop_bytes(cfg: Config, batch: int, dtype_bytes: int = 4) -> int:
    """Bytes of one step's crops: ``batch`` images x every crop, ``data.channels`` x side^2 each."""
    c = cfg.crops
    return batch * cfg.data.channels * dtype_bytes * sum(n * s * s for n, s in zip(c.counts, c.sizes_px))


def plan_memory(cfg: Config, processes: int = 1, device_type: str = "cpu", precision: str = "fp32",
                colour_on_device: bool = False) -> MemoryPlan:
    """The memory plan of ``cfg`` run as ``processes`` processes (the global batch split over them) on
    ``device_type`` in ``precision`` (resolved: fp32 | bf16 | fp16). Allocates nothing."""
    batch = max(1, cfg.train.batch_size // processes)
    params, grads, state = model_state_bytes(_model_yaml(cfg), cfg.optim.optimizer, processes,
                                             sharded=shards_weights(cfg) and processes > 1)
    activations = activation_bytes(cfg, batch, precision)
    # workers hand over uint8 crops when the colour ops run on the device, float32 views otherwise
    handed_over = crop_bytes(cfg, batch, 1 if colour_on_device else 4)
    workers = cfg.data.num_workers * (WORKER_HOST_BYTES + cfg.data.prefetch_factor * handed_over)
    checkpointing = _checkpointing(cfg.model)
    return MemoryPlan(processes, batch, device_type, precision, checkpointing, params, grads, state, activations,
                      crop_bytes(cfg, batch), workers, RUNTIME_HOST_BYTES[device_type])


# ------------------------------------------------------------------------------------------------------------
# what is available

def _meminfo_available() -> int | None:
    return proc_kib_bytes("/proc/meminfo", "MemAvailable")


def _cgroup_available() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), or the v1 limit - usage; None: no limit."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            text = Path(limit).read_text().strip()
            if text == "max" or int(text) >= 2**60:
                return None
            return int(text) - int(Path(usage).read_text().strip())
        except (OSError, ValueError):
            continue
    return None


def _own_rss_bytes() -> int:
    return proc_kib_bytes("/proc/self/status", "VmRSS") or 0


def host_available_bytes(local_processes: int = 1) -> tuple[int | None, str]:
    """(bytes the run's processes on this machine may use together, where the number comes from). From the
    system: MemAvailable (or the cgroup's room, when smaller) plus what these processes already hold (the
    plan's runtime share is already resident). None: unknown (no check)."""
    if os.environ.get(ENV_HOST):
        return parse_bytes(os.environ[ENV_HOST], ENV_HOST), ENV_HOST
    known = [n for n in (_meminfo_available(), _cgroup_available()) if n is not None]
    if not known:
        return None, "unknown"
    return min(known) + local_processes * _own_rss_bytes(), "host RAM available"


def gpu_available_bytes(device: torch.device) -> tuple[int | None, str]:
    """(free bytes of this process's GPU plus what torch already reserved there, the source)."""
    if os.environ.get(ENV_GPU):
        return parse_bytes(os.environ[ENV_GPU], ENV_GPU), ENV_GPU
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) + CUDA_CONTEXT_BYTES, f"free on {device}"


# ------------------------------------------------------------------------------------------------------------
# the check

def _fitting_batch(plan: MemoryPlan, available_per_process: int, on_device: bool) -> int:
    """The largest per-process batch whose plan fits, assuming activations and crops grow linearly with it."""
    per_image = (plan.activations_bytes + plan.batch_bytes) / plan.per_process_batch
    need = plan.device_bytes if on_device else plan.host_bytes
    fixed = need - per_image * plan.per_process_batch
    return max(0, int((available_per_process - fixed) // per_image)) if per_image else 0


def refusal(plan: MemoryPlan, need_bytes: int, available_bytes: int, source: str, where: str,
            local_processes: int, fitting_batch: int) -> str:
    """The one line: the estimate, what is available, the levers in order."""
    parts = ", ".join(f"{what} {format_bytes(n)}" for what, n in plan.rows() if n)
    together = f" x {local_processes} processes" if local_processes > 1 else ""
    batch = (f" (train.batch_size={fitting_batch * plan.processes} fits)" if fitting_batch >= 1 else "")
    levers = ", ".join(lever.format(batch=batch) for lever in LEVERS)
    return (f"memory: one training step needs ~{format_bytes(need_bytes)} of {where} per process{together} "
            f"({parts}; batch {plan.per_process_batch} per process, {plan.precision}"
            f"{', ' + plan.checkpointing if plan.checkpointing else ''}) but {format_bytes(available_bytes)} is "
            f"available ({source}); levers, in order: {levers}; train.memory_check=false skips this check")


def check_memory(cfg: Config, device: torch.device, processes: int, local_processes: int, precision: str,
                 colour_on_device: bool = False) -> MemoryPlan | None:
    """Raise MemoryPlanError (one line) when one step at ``cfg``'s batch, crops, precision and checkpointing
    would not fit the memory available: the host RAM for this machine's processes and their data workers, and
    on a GPU its memory too. Returns the plan (None when ``train.memory_check`` is off)."""
    if not cfg.train.memory_check:
        return None
    plan = plan_memory(cfg, processes, device.type, precision, colour_on_device)
    host, source = host_available_bytes(local_processes)
    if host is not None and plan.host_bytes * local_processes > host:
        raise MemoryPlanError(refusal(plan, plan.host_bytes, host, source, "host RAM", local_processes,
                                      _fitting_batch(plan, host // local_processes, on_device=False)))
    if device.type == "cuda":
        gpu, source = gpu_available_bytes(device)
        if gpu is not None and plan.device_bytes > gpu:
            raise MemoryPlanError(refusal(plan, plan.device_bytes, gpu, source, "GPU memory", 1,
                                          _fitting_batch(plan, gpu, on_device=True)))
    return plan


def out_of_memory(cfg: Config, device: torch.device, processes: int, precision: str, step: int) -> MemoryPlanError:
    """A CUDA out-of-memory error during the first steps as the check's one line (the plan's numbers, the GPU's
    memory, the levers), for the command line to print instead of a traceback."""
    plan = plan_memory(cfg, processes, device.type, precision)
    total = torch.cuda.get_device_properties(device).total_memory if torch.cuda.is_available() else 0
    line = refusal(plan, plan.device_bytes, total, f"{device} in total; CUDA ran out of memory at step {step}",
                   "GPU memory", 1, _fitting_batch(plan, total, on_device=True))
    return MemoryPlanError(line.replace("memory: ", "memory: out of GPU memory: ", 1))


def describe_plan(plan: MemoryPlan, gpu_memory_bytes: int | None = None) -> str:
    """The plan as a small table (one row per component, bytes per process) and whether it fits."""
    total = "on the " + ("GPU" if plan.device_type == "cuda" else "CPU (host RAM)")
    width = max([len(what) for what, _ in plan.rows()] + [len(total)])
    lines = [f"memory plan per process ({plan.processes} process(es), batch {plan.per_process_batch} per process, "
             f"{plan.precision}, model on {plan.device_type}"
             + (f", {plan.checkpointing}" if plan.checkpointing else "") + "):"]
    lines += [f"  {what:<{width}}  {format_bytes(n):>11}" for what, n in plan.rows()]
    lines.append(f"  {total:<{width}}  {format_bytes(plan.device_bytes):>11}")
    if plan.device_type == "cuda":
        lines.append(f"  {'host RAM':<{width}}  {format_bytes(plan.host_bytes):>11}")
    if gpu_memory_bytes is not None:
        fits = plan.device_bytes <= gpu_memory_bytes
        lines.append(f"fits {format_bytes(gpu_memory_bytes)} per GPU: {'yes' if fits else 'NO'}"
                     + ("" if fits else f" (short by {format_bytes(plan.device_bytes - gpu_memory_bytes)})"))
    return "\n".join(lines)


__all__ = ["MemoryPlan", "MemoryPlanError", "plan_memory", "check_memory", "out_of_memory", "describe_plan",
           "host_available_bytes", "gpu_available_bytes", "parse_bytes", "format_bytes", "build_meta_model",
           "ENV_HOST", "ENV_GPU"]
