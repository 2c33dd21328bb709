"""Everything swavkit needs from torch.distributed, and the only module that imports it.

Every helper is a no-op (or the identity) in a single process, so a plain ``python``/``swavkit`` run on
one CPU or GPU needs no launcher. Under ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK) or SLURM ``srun``
(SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID) :func:`init` joins the process group.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from swavkit.errors import UserError


class LaunchError(UserError, RuntimeError):
    """The launcher environment is inconsistent (e.g. more processes than devices on a node)."""


@dataclass(frozen=True)
class ProcessInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str  # "none" | "torchrun" | "slurm"


def _slurm_master_addr() -> str:
    """First host of SLURM_JOB_NODELIST (needs ``scontrol``; falls back to the plain name)."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0].split("[")[0] or "127.0.0.1"


def detect_launch() -> ProcessInfo:
    """Read the process layout from torchrun's or SLURM's environment variables (no side effects)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return ProcessInfo(int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)),
                           int(env.get("LOCAL_WORLD_SIZE", world)), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        world = int(env["SLURM_NTASKS"])
        local_world = int(env.get("SLURM_NTASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "1")).split("(")[0])
        return ProcessInfo(int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)), local_world, "slurm")
    return ProcessInfo(0, 1, 0, 1, "none")


def init(device_type: str, timeout_minutes: float = 30.0) -> ProcessInfo:
    """Join the process group when launched with several processes; return the layout.

    ``device_type`` is "cuda" or "cpu": NCCL is used on GPUs, gloo on CPU. The pre-flight check refuses a
    node that runs more processes than it has GPUs, which otherwise shows up as a hang or an
    out-of-memory on GPU 0.
    """
    info = detect_launch()
    if info.world_size == 1 or dist.is_initialized():
        return info
    if device_type == "cuda":
        n_gpus = torch.cuda.device_count()
        if info.local_world_size > n_gpus:
            raise LaunchError(
                f"{info.local_world_size} processes per node but only {n_gpus} GPU(s) visible on this node: "
                f"launch one process per GPU (torchrun --nproc_per_node={n_gpus}, or srun --ntasks-per-node={n_gpus})")
        torch.cuda.set_device(info.local_rank)
    if info.launcher == "slurm":
        os.environ.setdefault("MASTER_ADDR", _slurm_master_addr())
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(info.rank), str(info.world_size)
        os.environ["LOCAL_RANK"] = str(info.local_rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                            device_id=torch.device("cuda", info.local_rank) if device_type == "cuda" else None)
    return info


# The key a failing process writes into the job's rendezvous store: "<exit code>|<one-line message>".
FAILURE_KEY = "swavkit/failure"


def _store():
    """The c10d store every process of the job already shares (the rendezvous); None if unavailable."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def publish_failure(exit_code: int, message: str) -> None:
    """Tell every other process that this one is ending (best effort: the store may be gone)."""
    store = _store() if is_initialized() else None
    if store is None:
        return
    one_line = " ".join(message.split())[:500]
    try:
        if not store.check([FAILURE_KEY]):  # the first failure is the one worth reporting
            store.set(FAILURE_KEY, f"{exit_code}|rank {rank()}: {one_line}")
    except (RuntimeError, OSError):
        pass


def _failure_of_another_rank(store) -> tuple[int, str] | None:
    """(exit code, message) of a failure another process reported; None if none (or the store is gone)."""
    try:
        if not store.check([FAILURE_KEY]):
            return None
        code, _, message = store.get(FAILURE_KEY).decode("utf-8", "replace").partition("|")
    except (RuntimeError, OSError):
        return None
    if message.startswith(f"rank {rank()}:"):
        return None  # our own report
    return (int(code) if code.isdigit() else 1), message


def _is_peer_disconnect(err: BaseException) -> bool:
    """gloo's and NCCL's word for "another process went away" (then that process's report explains it)."""
    text = str(err)
    return isinstance(err, RuntimeError) and ("closed by peer" in text or "Connection reset" in text
                                              or "NCCL" in text or "DistBackendError" in type(err).__name__)


def _end_because(failure: tuple[int, str]) -> None:
    code, message = failure
    print(f"swavkit: ending rank {rank()} because {message}", file=sys.stderr, flush=True)
    os._exit(code)


def _watch_for_failures(store, stop: threading.Event, poll_s: float) -> None:
    while not stop.wait(poll_s):
        failure = _failure_of_another_rank(store)
        if failure is not None:
            _end_because(failure)


@contextlib.contextmanager
def fail_together(exit_code_of=lambda err: 1, poll_s: float = 0.5) -> Iterator[None]:
    """Make any process's failure end the whole job within about a second, with its message.

    Without this, an exception on one rank (a full disk on rank 0, a crashed data worker) leaves the
    others waiting in their next collective until the process-group timeout (30 minutes), and a plain
    ``srun`` never tears them down. On an exception this process writes ``FAILURE_KEY`` into the
    rendezvous store and re-raises; a watcher thread in every other process polls that key and exits
    the process with the same exit code. ``exit_code_of(err)`` maps the exception to that code.
    A no-op in a single process.
    """
    store = _store() if is_initialized() else None
    if store is None:
        yield
        return
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_for_failures, args=(store, stop, poll_s), daemon=True,
                               name="swavkit-fail-together")
    watcher.start()
    try:
        yield
    except BaseException as err:
        # An error here right after another rank failed (typically gloo's "connection closed by peer") is
        # a consequence: end with that rank's message and code instead of a second traceback.
        failure = _failure_of_another_rank(store)
        deadline = time.monotonic() + 1.0  # the peer's report can trail its broken connection a little
        while failure is None and time.monotonic() < deadline and _is_peer_disconnect(err):
            time.sleep(0.05)
            failure = _failure_of_another_rank(store)
        if failure is not None:
            _end_because(failure)
        publish_failure(exit_code_of(err), str(err) or type(err).__name__)
        raise
    finally:
        stop.set()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum across ranks; returns the same tensor (unchanged in one process)."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a [n_r, ...] tensor from every rank along dim 0 (sizes may differ per rank)."""
    if not is_initialized():
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    max_n = int(max(s.item() for s in sizes))
    padded = tensor.new_zeros((max_n, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes)])


def all_gather_objects(obj):
    """List of one picklable object per rank (``[obj]`` in one process)."""
    if not is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s object on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def convert_sync_batchnorm(module: torch.nn.Module, mode: str, local_world_size: int) -> torch.nn.Module:
    """Turn BatchNorm into SyncBatchNorm over the whole job ("global") or within each node ("node").

    Per-node groups are what the SwAV reference uses: statistics over 8 GPUs are enough and the
    all-reduce stays on the fast intra-node links.
    """
    if mode == "none" or not is_initialized():
        return module
    group = None
    if mode == "node":
        world = world_size()
        groups = [dist.new_group(list(range(start, min(start + local_world_size, world))))
                  for start in range(0, world, local_world_size)]
        group = groups[rank() // local_world_size]
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group=group)


def wrap_ddp(module: torch.nn.Module, device: torch.device, static_graph: bool = True) -> torch.nn.Module:
    """DistributedDataParallel in a multi-process run, the module itself otherwise."""
    if not is_initialized():
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, static_graph=static_graph)
