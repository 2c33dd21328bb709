"""One checkpointer for every loop that trains: pretraining (``swavkit.training.loop``), fine-tuning and the
reference linear probe (``swavkit.evaluation.supervised``).

The loop calls :meth:`Checkpointer.maybe_save` after each optimiser step (the torchtitan / DINOv2 shape); the
checkpointer decides whether a save is due (every N steps, every M minutes, at the end of an epoch when asked,
on a stop signal, at ``stop_after_steps``), takes the same decision on every process, writes the state
atomically with its format tag, and says whether the loop must stop now. :meth:`Checkpointer.read` is the
other half: the saved dict of a resumable run, its format checked, or None.

What is saved is the ``stateful``'s ``state_dict()`` (collective in a multi-process run: every process gets
the whole dict) plus ``extra()`` (pretraining: its config) and the format tag; the RNG and the sampler's
position are part of that state (``swavkit.runtime.rng``; the step, which fixes the sampler's position). An
FSDP run's weights and optimiser go to DCP shards instead (``swavkit.artifacts.sharded_checkpoint``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch

from swavkit.artifacts.checkpoint import read_checkpoint, save_atomic
from swavkit.artifacts.sharded_checkpoint import (SHARDED_KEY, load_sharded_into, load_whole_into_sharded,
                                                  remove_shard_folders, save_sharded_checkpoint)
from swavkit.runtime import distributed
from swavkit.runtime.signals import StopRequest


class Checkpointer:
    """When to save and stop, and the save itself, for one run's checkpoint file ``path``.

    Args:
        path: the checkpoint file (pretraining ``checkpoints/last.pt``, a fine-tune's ``checkpoint.pt``).
        format_tag: the ``format`` entry that marks the file as this kind of checkpoint (checked on read).
        stateful: an object with ``state_dict()`` (and, for ``sharded``, what
            :func:`swavkit.artifacts.sharded_checkpoint.save_sharded_checkpoint` reads).
        every_steps: save when the step is a multiple of it (0: never by steps).
        every_minutes: save when this much time has passed since the last save (``math.inf``: never by time;
            0: at every step).
        epoch_steps: save at the end of every epoch of this many steps (0: not by epochs).
        stop_request: the run's SIGTERM / SIGINT flag; a caught signal saves and stops.
        stop_after_steps: save and stop once this step is reached (tests, ``stop_after_steps``).
        sync_every_steps: in a multi-process run, signals and clocks (which differ between processes) are
            acted on only at steps that are multiples of it, where every process joins one all-reduce.
        extra: more entries for the file, asked at each save (pretraining: ``{"config": ...}``).
        sharded: weights and optimiser as DCP shards beside the file (an FSDP run).
    """

    def __init__(self, path: str | Path, format_tag: str, stateful, *, every_steps: int = 0,
                 every_minutes: float = math.inf, epoch_steps: int = 0, stop_request: StopRequest | None = None,
                 stop_after_steps: int | None = None, sync_every_steps: int = 1,
                 extra: Callable[[], dict] | None = None, sharded: bool = False,
                 device: torch.device = torch.device("cpu")):
        self.path, self.format_tag, self.stateful = Path(path), format_tag, stateful
        self.every_steps, self.every_minutes, self.epoch_steps = every_steps, every_minutes, epoch_steps
        self.stop_request, self.stop_after_steps = stop_request, stop_after_steps
        self.sync_every_steps, self.extra, self.sharded, self.device = max(1, sync_every_steps), extra, sharded, device
        self.before_save: list[Callable[[], None]] = []  # e.g. the budget's minutes used, into the state
        self.after_save: list[Callable[[], None]] = []  # e.g. the label-free signal on the checkpoint just written
        self.last_save_s = time.monotonic()
        self.save_duration_s = 0.0  # how long the last save took (a time budget keeps a reserve for it)
        self.saved_step: int | None = None
        self.stopped = False  # a save was due to a stop (signal or stop_after_steps)

    @property
    def signal_name(self) -> str | None:
        return self.stop_request.signal_name if self.stop_request is not None else None

    @property
    def stop_reason(self) -> str:
        """Why :meth:`maybe_save` said stop: the signal's name, else ``stop_after_steps=N``."""
        return self.signal_name or f"stop_after_steps={self.stop_after_steps}"

    def due(self, step: int) -> tuple[bool, bool]:
        """(save now, stop now) after step ``step``; every process gets the same answer."""
        stop = self.signal_name is not None
        by_steps = self.every_steps > 0 and step % self.every_steps == 0
        by_time = time.monotonic() - self.last_save_s >= 60.0 * self.every_minutes
        if distributed.world_size() > 1:
            if step % self.sync_every_steps == 0:
                flags = torch.tensor([float(stop), float(by_steps), float(by_time)], device=self.device)
                stop, by_steps, by_time = (bool(v) for v in distributed.all_reduce_max(flags).tolist())
            else:
                stop = by_time = False
        if self.stop_after_steps is not None and step >= self.stop_after_steps:
            stop = True
        by_epoch = self.epoch_steps > 0 and step % self.epoch_steps == 0
        return stop or by_steps or by_time or by_epoch, stop

    def maybe_save(self, step: int) -> bool:
        """Save when due after step ``step`` (collective); True when the loop must stop now (saved)."""
        save, stop = self.due(step)
        if save:
            self.save(step)
        self.stopped = stop
        return stop

    def save(self, step: int) -> None:
        """Write the state now (collective): atomically, tagged, by the main process; a DCP folder per process
        for a sharded state."""
        started = time.monotonic()
        for hook in self.before_save:
            hook()
        extra = self.extra() if self.extra is not None else {}
        if self.sharded:
            save_sharded_checkpoint(self.stateful, self.path, extra.get("config", {}))
        else:
            state = self.stateful.state_dict()
            if distributed.is_main_process():
                save_atomic({**state, **extra, "format": self.format_tag}, self.path)
                remove_shard_folders(self.path.parent)  # an earlier FSDP save's shards: superseded now
            distributed.barrier()
        self.last_save_s = time.monotonic()
        self.save_duration_s = self.last_save_s - started
        self.saved_step = step
        for hook in self.after_save:
            hook()

    def restore(self, saved: dict) -> list:
        """Load ``saved`` (as :meth:`read` gives it) into the stateful (collective for sharded states): the weights
        and optimiser from DCP shards when the file names them (re-sharded to this run), a whole state into a
        sharded one (a run continued with FSDP), the rest through ``stateful.load_state_dict``. Returns what
        that returns (notes for the user)."""
        if SHARDED_KEY in saved:  # an FSDP run's weights and optimiser: DCP shards, re-sharded to this run
            load_sharded_into(self.stateful, self.path, saved)
        elif self.sharded:  # a whole checkpoint, continued sharded
            load_whole_into_sharded(self.stateful, saved)
            saved = {k: v for k, v in saved.items() if k not in ("model", "optimizer")}
        return self.stateful.load_state_dict(saved) or []

    def read(self, what: str = "checkpoint", remedy: str = "pass --restart to start over") -> dict | None:
        """The saved state (its format checked: CheckpointError in one line otherwise), or None without a file."""
        if not self.path.is_file():
            return None
        return read_checkpoint(self.path, self.format_tag, what, remedy)


__all__ = ["Checkpointer"]
