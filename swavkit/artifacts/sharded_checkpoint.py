"""Checkpoints of FSDP runs: weights and optimiser state with ``torch.distributed.checkpoint`` (DCP), the rest as
before in ``checkpoints/last.pt``.

Layout: every process writes its shards into ``checkpoints/sharded-step<N>/`` (DCP's ``.metadata`` is written
last, once all shards are complete); then rank 0 writes ``last.pt`` atomically with everything else
(step, RNG and queue per rank, schedule, ...) and ``"sharded": "sharded-step<N>"`` in place of ``model`` and
``optimizer``, and only then removes the previous ``sharded-step*`` folder. A kill at any moment leaves a
``last.pt`` that names a complete folder. DCP stores each tensor with its global shape, so a resume at
another process count (or in one plain process, ``dist.strategy=ddp``) re-shards on load.

Everything that reads a training checkpoint for its weights (``load_backbone``, ``swavkit export``, ``model.init``)
gets the whole ``model`` dict through :func:`with_model_tensors`. Every read of a DCP folder here goes through
:class:`swavkit.artifacts.dcp_reader.SafeFileSystemReader`: DCP's own reader would unpickle the folder's
``.metadata`` and its non-tensor items without restriction, so a folder from someone else could run code.
"""

from __future__ import annotations

import re
import shutil
import uuid
import warnings
from pathlib import Path

import torch

from swavkit.errors import is_unwritable
from swavkit.runtime import distributed
from swavkit.runtime.fileio import naming
from swavkit.artifacts.checkpoint import CheckpointError, load_training_checkpoint, save_atomic

SHARDED_KEY = "sharded"  # last.pt entry: the folder (a sibling) holding model + optimizer as DCP shards
_FOLDER = re.compile(r"^sharded-step\d{9}-[0-9a-f]{8}$")  # the only folder names swavkit writes (and may remove)


def _read_errors() -> tuple[type[BaseException], ...]:
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    return (Exception, CheckpointException)


_READ_ERRORS = _read_errors()


def _safe_reader(folder: Path):
    # imported here: torch.distributed.checkpoint is heavy, and only sharded checkpoints need it
    from swavkit.artifacts.dcp_reader import SafeFileSystemReader

    return SafeFileSystemReader(folder)


def _refused(err: BaseException) -> CheckpointError | None:
    """The reader's own one-line refusal (unsafe or inconsistent folder) inside DCP's wrapped error, if any."""
    from swavkit.artifacts.dcp_reader import unwrap_read_error  # torch.distributed.checkpoint: as above

    return unwrap_read_error(err)


def _new_folder_name(step: int) -> str:
    """A fresh name, the same on every rank: a second save at the same step (end of epoch, then the final
    one) must not overwrite the folder the current last.pt names."""
    return distributed.broadcast_object(f"sharded-step{step:09d}-{uuid.uuid4().hex[:8]}")


def save_sharded_checkpoint(state, checkpoint: Path, config: dict) -> None:
    """Collective: DCP shards of model + optimizer, then ``last.pt`` (rank 0), then old shard folders removed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    checkpoint = Path(checkpoint)
    folder = checkpoint.parent / _new_folder_name(state.step)
    model_state, optimizer_state = get_state_dict(state.core, state.optimizer)
    try:
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))
    except CheckpointException as err:  # a BaseException wrapping each rank's error, traceback and all
        unwritable = [error for error, _ in err.failures.values() if is_unwritable(error)]
        if not unwritable:
            raise
        shutil.rmtree(folder, ignore_errors=True)  # partial shards: last.pt still names the previous save
        raise naming(unwritable[0], folder) from None
    rest = state.state_dict(weights=False)  # collective: every rank's RNG and queue
    if distributed.is_main_process():
        save_atomic({**rest, SHARDED_KEY: folder.name, "config": config}, checkpoint)
        remove_shard_folders(checkpoint.parent, keep=folder.name)
    distributed.barrier()


def remove_shard_folders(checkpoints: Path, keep: str | None = None) -> None:
    """Remove swavkit's shard folders but ``keep`` (the previous save's, partial ones of a killed run, or all of
    them after a whole-model save or on --restart). Only names swavkit writes; a missing folder is a no-op."""
    if not checkpoints.is_dir():
        return
    for entry in checkpoints.iterdir():
        if entry.is_dir() and _FOLDER.match(entry.name) and entry.name != keep:
            shutil.rmtree(entry, ignore_errors=True)


def shard_folder(checkpoint: Path, saved: dict) -> Path:
    """The complete DCP folder a sharded ``last.pt`` names; CheckpointError (one line) when it is not there."""
    folder = Path(checkpoint).parent / str(saved[SHARDED_KEY])
    if not _FOLDER.match(folder.name) or not (folder / ".metadata").is_file():
        raise CheckpointError(f"{checkpoint} names the sharded weights {folder}, which are missing or incomplete; "
                              "restore that folder, or start over with --restart")
    return folder


def load_sharded_into(state, checkpoint: Path, saved: dict) -> None:
    """Collective: model and optimizer state from the DCP folder into ``state`` (sharded or plain, any process
    count: DCP reads each process's part of every tensor)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = shard_folder(checkpoint, saved)
    reader = _safe_reader(folder)  # refuses an unsafe or inconsistent folder (one line) before DCP starts
    model_state, optimizer_state = get_state_dict(state.core, state.optimizer)
    target = {"model": model_state, "optimizer": optimizer_state}
    try:
        with warnings.catch_warnings():  # one plain process: "assuming the intent is to load in a single process"
            warnings.filterwarnings("ignore", message=".*single process.*")
            dcp.load(target, storage_reader=reader)
    except _READ_ERRORS as err:  # DCP wraps a missing or short shard file in its own error types
        refused = _refused(err)
        if refused is not None:
            raise CheckpointError(str(refused)) from None
        first = " ".join(str(err).split())[:200]
        raise CheckpointError(f"{folder}: the sharded checkpoint cannot be re-sharded to {distributed.world_size()} "
                              f"process(es) ({type(err).__name__}: {first}); restore the folder from a copy, or "
                              "start over with --restart") from None
    set_state_dict(state.core, state.optimizer, model_state_dict=target["model"],
                   optim_state_dict=target["optimizer"])


def load_whole_into_sharded(state, saved: dict) -> None:
    """Collective: a whole checkpoint (a DDP run's ``model`` and ``optimizer``) into a sharded ``state``, so a run
    may switch to ``dist.strategy=fsdp`` on resume. The optimizer dict numbers parameters in the order of its
    groups, which is the same order here (swavkit.core.optim builds both from ``named_parameters``); it is re-keyed by
    parameter name, the form torch's ``set_state_dict`` reads, and each process keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    names = {id(p): n for n, p in state.core.named_parameters()}
    order = [names[id(p)] for group in state.optimizer.param_groups for p in group["params"]]
    optimizer = saved["optimizer"]
    by_name = {"state": {order[i]: value for i, value in optimizer["state"].items()},
               "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                                for group in optimizer["param_groups"]]}
    set_state_dict(state.core, state.optimizer, model_state_dict=saved["model"], optim_state_dict=by_name,
                   options=StateDictOptions(full_state_dict=True))


def with_model_tensors(saved: dict, checkpoint: Path) -> dict:
    """``saved`` (a loaded last.pt) with a whole ``model`` state dict, read from its DCP folder when sharded.

    Reads without a process group (one process, e.g. ``swavkit export``); plain CPU tensors.
    """
    if not isinstance(saved, dict) or SHARDED_KEY not in saved or "model" in saved:
        return saved
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    folder = shard_folder(checkpoint, saved)
    reader = _safe_reader(folder)  # refuses an unsafe or inconsistent folder (one line) before DCP starts
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process.*")
            model = _load_state_dict_from_keys(keys={"model"}, storage_reader=reader)["model"]
    except _READ_ERRORS as err:
        refused = _refused(err)
        if refused is not None:
            raise CheckpointError(str(refused)) from None
        first = " ".join(str(err).split())[:200]
        raise CheckpointError(f"{folder}: cannot read the sharded weights ({type(err).__name__}: {first})") from None
    return {**saved, "model": {k: v.detach().cpu() for k, v in model.items() if isinstance(v, torch.Tensor)}}


def load_whole_training_checkpoint(path: str | Path) -> dict:
    """:func:`load_training_checkpoint` with the whole ``model`` dict also when an FSDP run saved it as shards."""
    return with_model_tensors(load_training_checkpoint(path), Path(path))


__all__ = ["load_whole_training_checkpoint", "SHARDED_KEY", "save_sharded_checkpoint", "remove_shard_folders", "load_whole_into_sharded", "load_sharded_into", "with_model_tensors", "shard_folder"]
