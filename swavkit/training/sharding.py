"""``dist.strategy=fsdp``: PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``) for models bigger than one GPU.

Each of the backbone's blocks (timm's ``group_matcher``, as in :mod:`swavkit.core.activation_checkpointing`) and the
projection head become one FSDP unit, the rest of the backbone (stem, final norm) the root unit: every process
holds 1/N of each weight, gradient and optimiser state, and a unit's full weights exist only while it runs.
The prototypes stay whole on every process (FSDP's ``ignored_params``): they are re-normalised before every
step, read by the queue's scores outside the forward and may be frozen, all of which wants the plain [K, D]
matrix; their gradient is averaged here (:func:`sync_whole_gradients`), as DDP would.

LARS: timm's ``Lars`` computes ``p.norm()`` and ``grad.norm()`` on the sharded DTensors, whose norm is that of
the whole parameter (DTensor reduces the shard norms across processes), so the trust ratio, and the update,
equal DDP's (tests/test_sharding.py checks the weights after one step from the same state). Mixed precision: FSDP's
``MixedPrecisionPolicy`` reduces gradients in fp32 and the step's autocast computes in bf16, as on the DDP path
(:func:`precision_policy` says why weights are not all-gathered in bf16); fp16 is refused (its GradScaler does
not unscale sharded gradients).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from typing import Callable

from swavkit.core.activation_checkpointing import backbone_blocks
from swavkit.config import Config, ConfigError
from swavkit.core.model import Prototypes
from swavkit.runtime import distributed
from swavkit.training.meta_init import replay_into
from swavkit.training.processes import Processes


def parallelize(core: nn.Module, cfg: Config, procs: Processes, memory_format: torch.memory_format,
                recording=None, initial_backbone: Callable[[], dict] | None = None) -> nn.Module:
    """What the forward runs, as ``procs.sharded`` (dist.strategy, decided at start-up) says: DDP around
    ``core`` moved to the device, or ``core`` itself sharded by FSDP2 (torchtitan's ``parallelize`` shape:
    the model is built first, then distributed in one place).

    Args:
        core: the SwAVModel: built on the CPU (DDP), or on the meta device by
            :func:`swavkit.training.meta_init.build_on_meta` (FSDP); changed in place.
        memory_format: the crops' memory format (DDP moves the weights to it; FSDP2 shards contiguous ones).
        recording: FSDP: build_on_meta's recording, replayed into each process's shards.
        initial_backbone: FSDP with ``model.init``: gives the whole backbone state, called on rank 0 only (a DDP
            run loads it into ``core`` before this call).
    """
    if not procs.sharded:
        core.to(procs.device).to(memory_format=memory_format)
        # train.accumulate_steps: DDP's static graph refuses no_sync (an internal assert in its reducer)
        return distributed.wrap_ddp(core, procs.device, static_graph=cfg.train.accumulate_steps == 1)
    model = shard_model(core, procs.precision, procs.device, cfg.model.backbone)
    materialise_shards(core, recording, procs.device, cfg.seed)
    if initial_backbone is not None:  # rank 0 reads the file; the others receive their shards tensor by tensor
        load_backbone_into_shards(core.backbone, initial_backbone() if procs.is_main else None)
    return model


def precision_policy(precision: str):
    """FSDP's MixedPrecisionPolicy for ``train.precision``: fp32 weights all-gathered, fp32 gradient reduction;
    bf16 compute comes from the step's autocast, exactly as on the DDP path.

    Why not ``param_dtype=bf16`` (half the all-gather traffic): it casts BatchNorm's weight to bf16 while its
    running statistics stay fp32, and torch's batch_norm refuses that mix (measured here on CPU: "expected
    scalar type BFloat16 but found Float" in the first RegNet/ResNet BN). Worth revisiting for BN-free
    backbones, not measured."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision in ("bf16", "fp32"):
        return MixedPrecisionPolicy(reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(core: nn.Module, precision: str, device: torch.device, backbone_name: str = "") -> nn.Module:
    """``fully_shard`` the backbone's blocks, the head, then the whole model with the prototypes left whole.

    Args:
        core: a SwAVModel on ``device`` (BN already converted to SyncBN if asked); changed in place.
    Returns:
        ``core`` itself (now an FSDPModule): what the forward runs, instead of DDP.
    """
    from torch.distributed import get_world_size
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    blocks = backbone_blocks(core.backbone)
    if not blocks:
        raise ConfigError(f"dist.strategy=fsdp: {backbone_name or type(core.backbone).__name__} names no blocks in "
                          "timm's group_matcher, so it cannot be sharded block by block; use dist.strategy=ddp")
    mesh = init_device_mesh(device.type, (get_world_size(),))
    policy = precision_policy(precision)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(core.head, mesh=mesh, mp_policy=policy)
    fully_shard(core, mesh=mesh, mp_policy=policy, ignored_params={core.prototypes.weight})
    return core


@torch.no_grad()
def materialise_shards(core: nn.Module, recording, device: torch.device, seed: int) -> None:
    """A SwAVModel built on the meta device and sharded (:func:`shard_model`): every process allocates only its
    shards (``to_empty``) and fills them with the values the unsharded build gives after ``torch.manual_seed(seed)``
    (:mod:`swavkit.training.meta_init`); the prototypes, whole on every process, as
    :class:`swavkit.core.model.Prototypes` draws them, from where the replay left the generator."""
    core.to_empty(device=device)
    replay_into(recording, core, seed, skip=("prototypes.",))
    n_prototypes, dim = core.prototypes.weight.shape
    with torch.device("cpu"):  # the unsharded build draws them on the CPU, after the backbone and head
        core.prototypes.weight.copy_(Prototypes(dim, n_prototypes).weight)


def load_backbone_into_shards(backbone: nn.Module, state: dict | None) -> None:
    """Collective: a whole backbone state dict held by rank 0 alone (``state``; None on the other processes)
    into a sharded backbone. Rank 0 broadcasts one tensor at a time and every process keeps its shard, so no
    other process ever holds a whole copy; strict (missing or unexpected keys raise). ``state`` is consumed
    (torch replaces its values as it distributes them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(backbone, state or {}, options=StateDictOptions(full_state_dict=True,
                                                                         broadcast_from_rank0=True, strict=True))


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` holds FSDP-sharded (DTensor) parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def sync_whole_gradients(core: nn.Module) -> None:
    """Average the prototypes' gradient over the processes (FSDP leaves ignored parameters alone; DDP would
    average it). No-op while the prototypes are frozen (no gradient on any process)."""
    grad = core.prototypes.weight.grad
    if grad is not None and distributed.world_size() > 1:
        distributed.all_reduce_sum(grad).div_(distributed.world_size())


def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's BatchNorm statistics (and other buffers) on every rank, one broadcast per dtype: what DDP does
    before each forward (broadcast_buffers=True), so an FSDP run keeps the same statistics as a DDP run."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in module.buffers():
        by_dtype.setdefault(buffer.dtype, []).append(buffer)
    for buffers in by_dtype.values():
        flat = _flatten_dense_tensors(buffers)
        dist.broadcast(flat, src=0)
        torch._foreach_copy_(buffers, list(_unflatten_dense_tensors(flat, buffers)))


def full_model_state(core: nn.Module) -> dict:
    """The SwAVModel's whole state dict (plain CPU tensors) on rank 0, e.g. for the timm export.

    Collective under FSDP (every process must call it; the others get {}); ``core.state_dict()`` otherwise.
    """
    if not is_sharded(core):
        return core.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(core, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this process holds of parameters, gradients and optimiser state (its shards under FSDP)."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    params = [local(p) for p in model.parameters()]
    out = {"params": sum(p.numel() * p.element_size() for p in params),
           "grads": sum(local(p.grad).numel() * local(p.grad).element_size()
                        for p in model.parameters() if p.grad is not None),
           "optimizer": 0}
    if optimizer is not None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.ndim > 0:
                    out["optimizer"] += local(value).numel() * local(value).element_size()
    return out


__all__ = ["parallelize", "precision_policy", "shard_model", "materialise_shards",
           "load_backbone_into_shards", "is_sharded",
           "sync_whole_gradients", "broadcast_buffers", "full_model_state", "local_state_bytes"]
