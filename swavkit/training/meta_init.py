"""Build a model on the meta device, shard it, then give each process only its shards of the initial weights.

Under ``dist.strategy=fsdp`` no process may ever hold the whole model (the 10B SEER trunk is ~40 GB in fp32; 8
processes of a node would need ~320 GB before FSDP divides it). The torchtitan pattern: construct on the meta
device (shapes only), ``fully_shard``, ``to_empty`` (each process allocates its shards), then initialise.

The initialisation is *timm's own*, replayed, so the values equal those of the unsharded build with the same
seed (not merely the same distribution): while the model is constructed on the meta device, a
``TorchDispatchMode`` records every operation the constructors and timm's init functions apply to each
parameter and buffer (``uniform_``, ``normal_``, ``fill_``, ``zero_``, trunc_normal's ``uniform_, erfinv_,
mul_, add_, clamp_`` ...), which costs no memory. :func:`replay_into` then re-runs the random operations in the
recorded order on the CPU generator, seeded as the unsharded build was: the operations that a later one
overwrites (a Conv2d's default kaiming_uniform_, replaced by timm's normal_) run on a scratch tensor only to
advance the generator as they did; the last write of each parameter runs on a whole CPU tensor of that one
parameter, whose local shard is copied into the process's DTensor and the rest dropped. Peak memory: the
process's shards plus the largest single parameter (twice, with its scratch), never the model.

What it cannot replay (refused in one line naming the parameters, before anything is allocated): a parameter
whose last write reads another tensor (``copy_`` from a computed value, ``orthogonal_``), writes part of it, or
a parameter created from a computed tensor with no in-place initialisation after it (``nn.Parameter(scale *
torch.ones(d))``, timm's LayerScale): use ``dist.strategy=ddp`` for such backbones. The prototypes (not
sharded) are initialised after the replay exactly as :class:`swavkit.core.model.Prototypes` does, so the RNG
stream continues as in the unsharded build.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from swavkit.config import ConfigError

aten = torch.ops.aten

# In-place writes that set every element without reading the old values: each starts a new "segment" of a
# tensor's history; the segment in force at the end of construction is the tensor's initial value.
_RANDOM_INPLACE = {aten.uniform_, aten.normal_, aten.bernoulli_, aten.exponential_, aten.log_normal_, aten.cauchy_,
                   aten.geometric_, aten.random_}  # operator packets: every overload
_OVERWRITES = _RANDOM_INPLACE | {aten.fill_, aten.zero_}
# Factories that draw from the default generator: replayed in order so that the stream advances as it did.
_RANDOM_FACTORIES = {aten.randn, aten.rand, aten.randint, aten.randperm, aten.normal, aten.randn_like,
                     aten.rand_like, aten.randint_like, aten.bernoulli, aten.multinomial}
# Every other in-place operation (mul_, add_, erfinv_, clamp_ ... of trunc_normal_) continues a segment when it
# reads nothing but the tensor itself and Python numbers.


def _is_inplace(func) -> bool:
    return func.overloadpacket.__name__.endswith("_")


@dataclass
class _Op:
    func: object
    args: tuple
    kwargs: dict
    target: str | None  # the parameter/buffer name it writes, None: not one of the model's tensors


@dataclass
class InitRecording:
    """Everything construction did to the model's tensors, in order (see the module docstring)."""
    ops: list = field(default_factory=list)
    storages: dict = field(default_factory=dict)  # StorageWeakRef -> name, filled once the module exists


class _Recorder(TorchDispatchMode):
    def __init__(self, recording: InitRecording):
        super().__init__()
        self.recording = recording

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _is_inplace(func) or func.overloadpacket in _RANDOM_FACTORIES:
            self.recording.ops.append(_Op(func, args, kwargs, None))
        return out


def build_on_meta(build: Callable[[], nn.Module]) -> tuple[nn.Module, InitRecording]:
    """``build()`` run on the meta device (no memory, no generator draws), with the record of its initialisation."""
    recording = InitRecording()
    with torch.device("meta"), _Recorder(recording):
        module = build()
    named = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    recording.storages = {StorageWeakRef(t.untyped_storage()): name for name, t in named.items()}
    for op in recording.ops:
        first = op.args[0] if op.args else None
        if isinstance(first, torch.Tensor) and first.is_meta:
            op.target = recording.storages.get(StorageWeakRef(first.untyped_storage()))
    return module, recording


def _final_segments(recording: InitRecording, module: nn.Module, skip: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """name -> (first, last) op index of the segment that gives the tensor its initial value; ConfigError
    (one line) naming what cannot be replayed."""
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    start: dict[str, int] = {}
    end: dict[str, int] = {}
    unsupported: dict[str, str] = {}
    for index, op in enumerate(recording.ops):
        name = op.target
        if name is None or name.startswith(skip):
            continue
        first = op.args[0]
        whole = tuple(first.shape) == tuple(tensors[name].shape) and first.storage_offset() == 0 \
            and first.is_contiguous()
        reads_other = any(isinstance(a, torch.Tensor) for a in (*op.args[1:], *op.kwargs.values()))
        if op.func.overloadpacket in _OVERWRITES and whole and not reads_other:
            start[name], end[name] = index, index
            unsupported.pop(name, None)
        elif name in start and whole and not reads_other:
            end[name] = index
        else:
            unsupported[name] = op.func.overloadpacket.__name__
            start.pop(name, None)
    for name in tensors:
        if not name.startswith(skip) and name not in start and name not in unsupported:
            unsupported[name] = "created from a computed tensor"
    if unsupported:
        listed = ", ".join(f"{name} ({why})" for name, why in list(unsupported.items())[:4])
        raise ConfigError(f"dist.strategy=fsdp: the initialisation of {len(unsupported)} tensor(s) cannot be replayed "
                          f"shard by shard: {listed}; use dist.strategy=ddp for this backbone")
    return {name: (start[name], end[name]) for name in start}


def check_replayable(recording: InitRecording, module: nn.Module, skip: tuple[str, ...] = ()) -> None:
    """Raise the one-line ConfigError :func:`replay_into` would, before anything is allocated or sharded."""
    _final_segments(recording, module, skip)


def _write_shard(tensor: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this process's part of ``full`` (the whole value, on the CPU) into ``tensor`` (a DTensor or plain)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(full.shape, tensor.device_mesh, tensor.placements)
        part = full[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
        tensor.to_local().copy_(part)
    else:
        tensor.copy_(full)


@torch.no_grad()
def replay_into(recording: InitRecording, module: nn.Module, seed: int, skip: tuple[str, ...] = ()) -> None:
    """Give ``module``'s materialised (``to_empty``) parameters and buffers the values the unsharded build makes
    after ``torch.manual_seed(seed)``; each process writes its own shards. Leaves the CPU generator where the
    unsharded build left it after the recorded tensors (tensors named under ``skip`` are left alone, and must
    be built last: their draws are not replayed)."""
    segments = _final_segments(recording, module, skip)
    owner = {index: name for name, (first, _) in segments.items() for index in [first]}
    finish = {last: name for name, (_, last) in segments.items()}
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    open_values: dict[str, torch.Tensor] = {}
    torch.manual_seed(seed)
    for index, op in enumerate(recording.ops):
        name = op.target
        if name is not None and name.startswith(skip):
            continue
        if name is not None and (index in owner or name in open_values):  # the tensor's initial value
            if index in owner:
                open_values[name] = torch.empty(op.args[0].shape, dtype=op.args[0].dtype)
            op.func(open_values[name], *op.args[1:], **op.kwargs)
            if finish.get(index) == name:
                _write_shard(tensors[name], open_values.pop(name))
        elif op.func.overloadpacket in _RANDOM_INPLACE:  # overwritten later: drawn only to advance the generator as it did
            op.func(torch.empty(op.args[0].shape, dtype=op.args[0].dtype), *op.args[1:], **op.kwargs)
        elif op.func.overloadpacket in _RANDOM_FACTORIES:
            kwargs = {**op.kwargs, "device": "cpu"}
            args = tuple(torch.empty(a.shape, dtype=a.dtype) if isinstance(a, torch.Tensor) else a for a in op.args)
            op.func(*args, **kwargs)


__all__ = ["InitRecording", "build_on_meta", "check_replayable", "replay_into"]
