"""The run folder (``out_dir``): what a swavkit run writes there, and the rule that it never touches
anything else.

A run folder holds ``config.yaml``, ``metrics.jsonl``, ``skipped.txt``, ``checkpoints/last.pt`` (and
``best-rankme.pt``, ``signal-images.txt`` beside it),
``backbone/`` and what the metric loggers write (``tensorboard/``, ``loggers.json``, ``mlflow.db``,
``wandb/``). ``pretrain`` accepts an ``out_dir`` that does not exist yet, an empty folder, or a folder
that swavkit can prove holds one of its runs: a ``checkpoints/last.pt`` in swavkit's format (read weights-only,
its ``format`` marker checked: another tool's ``last.pt`` does not count), or a config.yaml with swavkit's header.
Any other folder (a home folder, ``/``, a data folder, a project, another tool's run) is refused before
anything is written, with or without ``--restart``. ``--restart`` deletes only the run's own files, and only after every
other check of the run (config, backbone name, data folder, model build) has passed.

The same rule holds for every folder swavkit writes a run into: :class:`OwnedFolder` states it once, and
:class:`RunFolder` (pretraining) and :class:`FinetuneFolder` (``swavkit finetune --out-dir``) name their own
files. This module is the one place that knows those layouts.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from swavkit.artifacts.layout import (RUN_BEST_CHECKPOINT, RUN_CHECKPOINT, RUN_CONFIG, RUN_CONFIG_HEADER,
                                     RUN_EXPORT_DIR, RUN_LOGGER_FILES, RUN_LOGGER_FOLDERS, RUN_METRICS,
                                     RUN_SIGNAL_SAMPLE, RUN_SKIPPED)
# the fine-tune folder's names, also importable from here as before (swavkit.evaluation.finetune reads them here)
from swavkit.artifacts.layout import (FINETUNE_BASELINE_PREFIX, FINETUNE_CHECKPOINT_FILE,  # noqa: F401
                                     FINETUNE_FLOOR_FOLDER, FINETUNE_LABELS_FILE, FINETUNE_RUN_FILE)
from swavkit.artifacts.sharded_checkpoint import remove_shard_folders
from swavkit.artifacts.checkpoint import CheckpointError, check_export_target, is_swavkit_checkpoint, is_swavkit_export
from swavkit.config import ConfigError
from swavkit.data.filelist import CACHE_NAME as LIST_CACHE_FILE
from swavkit.data.names import printable_path, read_skipped_report, skipped_report_text
from swavkit.runtime.fileio import jsonl_line, read_jsonl, write_json_atomic, write_text_atomic

CONFIG_HEADER = RUN_CONFIG_HEADER

# A fine-tune's folder (its file names: artifacts/layout.py); the "format" of its finetune.json is the marker
# that makes a folder a fine-tune, and the format tag of its checkpoint.pt.
FINETUNE_FORMAT = "swavkit-finetune-v1"


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


class OwnedFolder:
    """A folder that swavkit writes one run into, and the rule for all of them: it may be new, empty, or
    already hold a run of its kind (:meth:`holds_run`); any other folder is refused in one line before anything
    is written; :meth:`discard` deletes only what the run writes (``OWN_FILES``, ``OWN_FOLDERS``: paths
    inside the folder), never a file a user put there.

    Subclasses name their layout, the marker that makes a folder theirs (``holds_run``), and for the messages
    the option that names the folder (``OPTION``) and what it holds (``KIND``).
    """

    # The files that make holds_run true come last, so that a discard cut short leaves a folder that is still
    # recognised as a run (and can be discarded again) rather than one that is refused as a user's folder.
    OWN_FILES: tuple[str, ...] = ()
    OWN_FOLDERS: tuple[str, ...] = ()
    OPTION = "out_dir"
    KIND = "run"

    def __init__(self, path: Path):
        self.path = Path(path)
        self._check_usable()

    def holds_run(self) -> bool:
        raise NotImplementedError

    def _check_run(self) -> None:
        """A folder that holds a run: what else must hold before it is reused (nothing here)."""

    def _check_usable(self) -> None:
        shown_path = printable_path(self.path)
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{self.OPTION}: {shown_path} is a file, not a folder; name a new folder")
        if not self.path.is_dir():
            return
        if self.holds_run():
            self._check_run()
            return
        entries = sorted(printable_path(entry.name) for entry in self.path.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (f" ... (+{len(entries) - 5} more)" if len(entries) > 5 else "")
            raise ConfigError(f"{self.OPTION}: {shown_path} holds files that are not a swavkit {self.KIND} ({shown}); "
                              f"swavkit writes {self.KIND}s only into a new folder, an empty one, or an earlier "
                              f"{self.KIND}: choose another {self.OPTION}")

    def discard(self) -> None:
        """Restart: delete this run's own files and folders, never anything else in the folder."""
        for name in self.OWN_FOLDERS:
            shutil.rmtree(self.path / name, ignore_errors=True)
        for name in self.OWN_FILES:
            (self.path / name).unlink(missing_ok=True)


class RunFolder(OwnedFolder):
    """The files of one pretraining run inside ``out_dir``; construction checks that the folder may hold a run."""

    OWN_FILES = (RUN_METRICS, RUN_SKIPPED, LIST_CACHE_FILE, *RUN_LOGGER_FILES, str(RUN_BEST_CHECKPOINT),
                 str(RUN_SIGNAL_SAMPLE), str(RUN_CHECKPOINT), RUN_CONFIG)
    OWN_FOLDERS = RUN_LOGGER_FOLDERS  # what swavkit.training.loggers writes (deleted with the run on --restart)

    def __init__(self, out_dir: str):
        path = resolve_out_dir(out_dir)
        self.config = path / RUN_CONFIG
        self.metrics = path / RUN_METRICS
        self.skipped = path / RUN_SKIPPED
        self.checkpoint = path / RUN_CHECKPOINT
        self.backbone = path / RUN_EXPORT_DIR
        super().__init__(path)

    def holds_run(self) -> bool:
        """Proof that swavkit wrote this run: its config header, or a checkpoint in its format (read safely)."""
        return _is_run_config(self.config) or is_swavkit_checkpoint(self.checkpoint)

    def _check_run(self) -> None:
        try:  # checked now rather than after hours of training, when the export would be refused
            check_export_target(self.backbone)
        except CheckpointError as err:
            raise ConfigError(f"out_dir: {err}") from None

    def discard(self) -> None:
        """``--restart``: delete this run's own files, and its ``backbone/`` export if swavkit wrote it."""
        if is_swavkit_export(self.backbone):
            shutil.rmtree(self.backbone)
        remove_shard_folders(self.checkpoint.parent)  # an FSDP run's shards (swavkit's folder names only)
        super().discard()
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
            self.discard()
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


def _holds_finetune(run_file: Path) -> bool:
    try:
        return json.loads(run_file.read_text(encoding="utf-8")).get("format") == FINETUNE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class FinetuneFolder(OwnedFolder):
    """``--out-dir`` of one fine-tune: finetune.json (the marker: format + setup), labels.txt, checkpoint.pt,
    and the random-init floor's fine-tune in ``random-init/``. Construction refuses a folder that holds
    anything else (a user's folder is never written into)."""

    OWN_FILES = (FINETUNE_LABELS_FILE, FINETUNE_CHECKPOINT_FILE, FINETUNE_RUN_FILE)
    OPTION = "--out-dir"
    KIND = "fine-tune"

    def __init__(self, path: str | Path):
        path = Path(os.path.expanduser(str(path)))
        self.run_file = path / FINETUNE_RUN_FILE
        self.labels = path / FINETUNE_LABELS_FILE
        self.checkpoint = path / FINETUNE_CHECKPOINT_FILE
        super().__init__(path)

    def holds_run(self) -> bool:
        return _holds_finetune(self.run_file)

    def discard(self) -> None:
        """``restart``: delete this run's own files, and its floor's, never anything else."""
        floor = self.path / FINETUNE_FLOOR_FOLDER
        # checked without FinetuneFolder(floor), whose refusal of a user's random-init/ would end the restart
        if floor.is_dir() and _holds_finetune(floor / FINETUNE_RUN_FILE):
            FinetuneFolder(floor).discard()
            try:
                floor.rmdir()  # only if empty: a user's file in there stays
            except OSError:
                pass
        super().discard()

    def saved_setup(self) -> dict | None:
        if not self.holds_run():
            return None
        return json.loads(self.run_file.read_text(encoding="utf-8")).get("setup")

    def start(self, setup: dict, label_text: str) -> None:
        """Record the setup and the label list; refuse a folder that holds a different fine-tune."""
        saved = self.saved_setup()
        if saved is not None and saved != setup:
            changed = sorted(key for key in set(saved) | set(setup) if saved.get(key) != setup.get(key))
            details = "; ".join(f"{key}: {saved.get(key)!r} there, {setup.get(key)!r} now" for key in changed[:3])
            raise ConfigError(f"--out-dir {printable_path(self.path)} holds a different fine-tune ({details}); "
                              "rerun its own command to resume it, pass --restart to discard it, or choose another "
                              "--out-dir")
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_file, {"format": FINETUNE_FORMAT, "setup": setup})
        write_text_atomic(self.labels, label_text)
