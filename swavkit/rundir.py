"""The run folder (``out_dir``): what a swavkit run writes there, and the rule that it never touches
anything else.

A run folder holds ``config.yaml``, ``metrics.jsonl``, ``skipped.txt``, ``checkpoints/last.pt``,
``backbone/`` and what the metric loggers write (``tensorboard/``, ``loggers.json``, ``mlflow.db``,
``wandb/``). ``pretrain`` accepts an ``out_dir`` that does not exist yet, an empty folder, or a folder
that already holds a swavkit run (its checkpoint, or a config.yaml with swavkit's header); any other folder (a home folder, ``/``, a data folder, a project) is
refused before anything is written. ``--restart`` deletes only the run's own files, and only after every
other check of the run (config, backbone name, data folder, model build) has passed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from swavkit.checkpoint import CheckpointError, check_export_target, is_swavkit_export
from swavkit.config import ConfigError
from swavkit.data.filelist import CACHE_NAME as LIST_CACHE_FILE
from swavkit.data.names import read_skipped_report, skipped_report_text
from swavkit.fileio import jsonl_line, read_jsonl, write_text_atomic

CONFIG_HEADER = "# swavkit run: the resolved config of this run (written by swavkit pretrain)\n"
# What swavkit.loggers writes into the run folder (deleted with the run on --restart).
LOGGER_FILES = ("loggers.json", "mlflow.db")
LOGGER_FOLDERS = ("tensorboard", "wandb")


def resolve_out_dir(text: str) -> Path:
    """``out_dir`` as given -> a path; ``~`` expanded; an empty value refused (YAML reads ``~`` as empty)."""
    text = (text or "").strip()
    if not text:
        raise ConfigError("out_dir: empty (note that out_dir=~ is YAML for 'nothing'); name the run folder, "
                          "e.g. out_dir=runs/a or out_dir=$HOME/runs/a")
    return Path(os.path.expanduser(text))


def _is_run_config(path: Path) -> bool:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    # Only our header counts: a user's own recipe named config.yaml must not make a folder a "run" whose
    # files --restart may delete (runs written before the header have their checkpoint instead).
    return text.startswith(CONFIG_HEADER)


class RunFolder:
    """The files of one run inside ``out_dir``; construction checks that the folder may hold a run."""

    def __init__(self, out_dir: str):
        self.path = resolve_out_dir(out_dir)
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.skipped = self.path / "skipped.txt"
        self.checkpoint = self.path / "checkpoints" / "last.pt"
        self.backbone = self.path / "backbone"
        self._check_usable()

    def holds_run(self) -> bool:
        return self.checkpoint.is_file() or _is_run_config(self.config)

    def _check_usable(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"out_dir: {self.path} is a file, not a folder; name a new folder")
        if not self.path.is_dir():
            return
        if self.holds_run():
            try:  # checked now rather than after hours of training, when the export would be refused
                check_export_target(self.backbone)
            except CheckpointError as err:
                raise ConfigError(f"out_dir: {err}") from None
            return
        entries = sorted(entry.name for entry in self.path.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (f" ... (+{len(entries) - 5} more)" if len(entries) > 5 else "")
            raise ConfigError(f"out_dir: {self.path} holds files that are not a swavkit run ({shown}); swavkit "
                              "writes runs only into a new folder, an empty one, or an earlier run: choose another "
                              "out_dir")

    def discard_previous_run(self) -> None:
        """``--restart``: delete this run's own files (never anything else in the folder)."""
        logger_files = [self.path / name for name in LOGGER_FILES]
        for own_file in (self.checkpoint, self.metrics, self.skipped, self.config, self.path / LIST_CACHE_FILE,
                         *logger_files):
            own_file.unlink(missing_ok=True)
        for own_folder in LOGGER_FOLDERS:
            shutil.rmtree(self.path / own_folder, ignore_errors=True)
        if is_swavkit_export(self.backbone):
            shutil.rmtree(self.backbone)
        from swavkit.sharded_checkpoint import remove_shard_folders  # torch.distributed: only when restarting

        remove_shard_folders(self.checkpoint.parent)  # an FSDP run's shards (swavkit's folder names only)
        try:
            self.checkpoint.parent.rmdir()  # only if empty: a user's file in there stays
        except OSError:
            pass

    def start(self, config_yaml: str, *, restart: bool, resume_step: int | None,
              skipped_at_resume: set[str] = frozenset()) -> None:
        """Create the folder and write the config; on ``restart`` discard the old run first. On resume,
        go back to the checkpoint: drop the metrics rows after its step and the skipped.txt lines it did
        not know (those steps run again and write them again), so every step has at most one row."""
        if restart:
            self.discard_previous_run()
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.config, CONFIG_HEADER + config_yaml)
        if resume_step is None:
            return
        if self.metrics.exists():
            kept = [row for row in read_jsonl(self.metrics) if int(row.get("step", 0)) <= resume_step]
            write_text_atomic(self.metrics, "".join(jsonl_line(row) for row in kept))
        if self.skipped.exists():
            kept = [entry for entry in read_skipped_report(self.skipped) if entry[0] in skipped_at_resume]
            write_text_atomic(self.skipped, skipped_report_text(kept))
