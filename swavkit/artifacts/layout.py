"""File layouts, in one place: what a run folder and an export folder are made of, and how to tell them
apart. Stdlib only. The rules that act on them (what may be replaced, resumed or deleted) are in
``rundir`` (run folders) and ``checkpoint`` (exports); readers (``pretrained``, ``preprocessing``, the
evaluation's result names, the model card) ask here instead of spelling the names again.
"""

from __future__ import annotations

from pathlib import Path

# an exported backbone: timm's local-dir layout plus our model card
EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CARD = "README.md"
EXPORT_FILES = (EXPORT_CONFIG, EXPORT_WEIGHTS, EXPORT_CARD)

# a pretraining run folder (out_dir)
RUN_CONFIG = "config.yaml"
# the first line of a run's config.yaml: with it, the folder is proven to be a swavkit run (artifacts/rundir.py)
RUN_CONFIG_HEADER = "# swavkit run: the resolved config of this run (written by swavkit pretrain)\n"
RUN_METRICS = "metrics.jsonl"
RUN_SKIPPED = "skipped.txt"
RUN_CHECKPOINT = Path("checkpoints") / "last.pt"
# the checkpoint with the best label-free signal so far (swavkit.training.checkpoint_signal), and the images
# that signal is measured on
RUN_BEST_CHECKPOINT = Path("checkpoints") / "best-rankme.pt"
RUN_SIGNAL_SAMPLE = Path("checkpoints") / "signal-images.txt"
# ``swavkit export RUN --select`` / train.export_checkpoint: which checkpoint of a run folder
RUN_CHECKPOINT_CHOICES = {"last": RUN_CHECKPOINT, "rankme": RUN_BEST_CHECKPOINT}
RUN_EXPORT_DIR = "backbone"
# what the metric loggers (swavkit.training.loggers) write beside metrics.jsonl: the remote backends' run ids (a
# resume appends to the same W&B / MLflow run), MLflow's local store, TensorBoard's and W&B's folders
RUN_LOGGER_IDS = "loggers.json"
RUN_MLFLOW_DB = "mlflow.db"
RUN_TENSORBOARD_DIR = "tensorboard"
RUN_WANDB_DIR = "wandb"  # W&B makes it inside the dir it is given (the run folder)
RUN_LOGGER_FILES = (RUN_LOGGER_IDS, RUN_MLFLOW_DB)
RUN_LOGGER_FOLDERS = (RUN_TENSORBOARD_DIR, RUN_WANDB_DIR)

# a fine-tune's folder (``swavkit finetune --out-dir``; swavkit.artifacts.rundir.FinetuneFolder): finetune.json says
# what was run, labels.txt lists the labelled files, checkpoint.pt is the training state; the random-init floor
# and each baseline are fine-tunes of their own in sub-folders
FINETUNE_RUN_FILE = "finetune.json"
FINETUNE_CHECKPOINT_FILE = "checkpoint.pt"
FINETUNE_LABELS_FILE = "labels.txt"
FINETUNE_FLOOR_FOLDER = "random-init"
FINETUNE_BASELINE_PREFIX = "baseline-"  # + the baseline's name: its fine-tune beside the floor's


def holds_export(folder: Path) -> bool:
    """True for a folder with an export's config and weights (swavkit's or anyone's timm local-dir)."""
    folder = Path(folder)
    return folder.is_dir() and (folder / EXPORT_CONFIG).is_file() and (folder / EXPORT_WEIGHTS).is_file()


def run_folder_of(path: Path) -> Path | None:
    """The run folder a run's own file lies in (``runs/a`` for ``runs/a/backbone`` and
    ``runs/a/checkpoints/last.pt``), or None for a path that is not one of a run's files by its place."""
    path = Path(str(path).rstrip("/\\"))
    if path.name == RUN_EXPORT_DIR and path.parent.name:
        return path.parent
    if path.parent.name == RUN_CHECKPOINT.parent.name and path.parent.parent.name:
        return path.parent.parent
    return None


__all__ = ["EXPORT_CONFIG", "EXPORT_WEIGHTS", "EXPORT_CARD", "EXPORT_FILES", "RUN_CONFIG", "RUN_METRICS",
           "RUN_SKIPPED", "RUN_CHECKPOINT", "RUN_BEST_CHECKPOINT", "RUN_SIGNAL_SAMPLE",
           "RUN_CHECKPOINT_CHOICES", "RUN_EXPORT_DIR", "RUN_LOGGER_IDS", "RUN_MLFLOW_DB", "RUN_TENSORBOARD_DIR",
           "RUN_WANDB_DIR", "RUN_LOGGER_FILES", "RUN_LOGGER_FOLDERS", "FINETUNE_RUN_FILE", "FINETUNE_CHECKPOINT_FILE",
           "FINETUNE_LABELS_FILE", "FINETUNE_FLOOR_FOLDER", "FINETUNE_BASELINE_PREFIX", "holds_export", "run_folder_of"]
