"""Evaluation results as JSON records that carry their protocol, and as a short text table.

A number without its protocol cannot be compared with another one (linear-probe accuracies differ
between papers mostly because the protocols differ), so every result file holds the metrics next to
every hyperparameter, the data sizes, the image preprocessing, the code version and the machine.
"""

from __future__ import annotations

import datetime
import json
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from swavkit.runtime import distributed
from swavkit.runtime.fileio import write_json_atomic
from swavkit.artifacts.layout import run_folder_of
from swavkit.evaluation.floors import FLOOR_NAMES, below_floors
from swavkit.data.names import printable_path

RESULT_SCHEMA = "swavkit-eval-v1"
DEFAULT_RESULTS_DIR = "results"
# Keys every result has; tests and downstream tables rely on them.
RESULT_KEYS = ("schema", "evaluation", "metrics", "protocol", "backbone", "data", "preprocessing",
               "environment", "started_at", "wall_time_s")


def swavkit_version() -> str:
    """Installed distribution version; "unknown" when running from a source tree that is not installed."""
    try:
        return metadata.version("swavkit")
    except metadata.PackageNotFoundError:
        return "unknown"


SOURCE_DIR = Path(__file__).resolve().parent


def run_git(*args: str, cwd: str | Path = SOURCE_DIR) -> str | None:
    """stdout of ``git ARGS`` in ``cwd`` (trailing whitespace removed; a leading status column is kept), or
    None when git is missing, fails or ``cwd`` is no checkout."""
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.rstrip() if out.returncode == 0 else None


def git_commit(path: str | Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout that holds the swavkit source (or ``path``), or (None, None)
    without git.

    The commit is that of the code that produced the number, not of the folder the user runs in.
    """
    where = Path(path) if path is not None else SOURCE_DIR
    commit = run_git("rev-parse", "HEAD", cwd=where)
    if not commit:
        return None, None
    status = run_git("status", "--porcelain", "--untracked-files=no", cwd=where)
    return commit, (bool(status.strip()) if status is not None else None)


def describe_device(device: torch.device | str) -> str:
    """"cuda:0 (NVIDIA H100 80GB HBM3)" or "cpu (x86_64, 16 threads)"."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device | str, world_size: int = 1) -> dict:
    commit, dirty = git_commit()
    try:
        import faiss
        faiss_version = faiss.__version__
    except ImportError:
        faiss_version = None
    return {"swavkit_version": swavkit_version(), "git_commit": commit, "git_dirty": dirty,
            "torch_version": torch.__version__, "faiss_version": faiss_version,
            "python_version": platform.python_version(), "device": describe_device(device),
            "world_size": world_size, "hostname": platform.node()}


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def build_result(*, evaluation: str, metrics: dict, protocol: dict, backbone: dict, data: dict,
                 preprocessing: dict, device: torch.device | str, started_at: datetime.datetime,
                 wall_time_s: float, world_size: int = 1, extra: dict | None = None) -> dict:
    """The JSON-able record of one evaluation.

    Args:
        evaluation: "knn" or "linear".
        metrics: e.g. {"top1": 71.3, "top5": 90.2} in percent (top5 only with more than 5 classes).
        protocol: every hyperparameter of the evaluation (k, temperature, recipe, epochs, ...).
        backbone: {"source", "architecture", "feature_dim"}.
        data: {"train_dir", "val_dir", "n_train", "n_val", "n_classes", "max_per_class", ...}.
        preprocessing: image size, crop fraction, mean/std (``Preprocessing.as_dict()``).
    """
    result = {
        "schema": RESULT_SCHEMA,
        "evaluation": evaluation,
        "metrics": dict(metrics),
        "metrics_unit": "percent",
        "protocol": dict(protocol),
        "backbone": dict(backbone),
        "data": dict(data),
        "preprocessing": dict(preprocessing),
        "environment": environment(device, world_size),
        "started_at": started_at.isoformat(timespec="seconds"),
        "wall_time_s": round(float(wall_time_s), 3),
    }
    result.update(extra or {})
    return result


def data_record(train_dir, val_dir, n_train: int, n_val: int, classes: list[str], max_per_class: int) -> dict:
    """The ``data`` section of a result record."""
    return {"train_dir": str(train_dir), "val_dir": str(val_dir), "n_train": int(n_train), "n_val": int(n_val),
            "n_classes": len(classes), "classes": classes, "max_per_class": max_per_class}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:60] or "backbone"


def source_name(backbone_source: str | Path) -> str:
    """A short name for a backbone source that tells runs apart: the run folder's name for the files a run
    writes (``runs/a/backbone`` and ``runs/a/checkpoints/last.pt`` are both "a": every export folder is
    called ``backbone``), else the file or folder name, or ``timm:<name>`` as given."""
    text = str(backbone_source)
    if text.startswith("timm:"):
        return text
    path = Path(text.rstrip("/\\"))
    run = run_folder_of(path)
    return run.name if run is not None else path.name


def default_result_path(evaluation: str, backbone_source: str, started_at: datetime.datetime | None = None,
                        results_dir: str | Path = DEFAULT_RESULTS_DIR) -> Path:
    """``results/<evaluation>-<run or backbone name>-<UTC YYYYmmdd-HHMMSS>.json`` under the current folder
    (see :func:`source_name`)."""
    stamp = (started_at or utc_now()).strftime("%Y%m%d-%H%M%S")
    return Path(results_dir) / f"{evaluation}-{_slug(source_name(backbone_source))}-{stamp}.json"


def check_result_target(path: str | Path | None) -> None:
    """An ``--out`` file may be new or an earlier swavkit result; anything else is refused (FileExistsError,
    one line) - checked before an evaluation starts, and again when it writes."""
    if not path:
        return
    path = Path(path)
    if not path.exists():
        return
    try:
        ours = json.loads(path.read_text(encoding="utf-8")).get("schema") == RESULT_SCHEMA
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise FileExistsError(f"--out {path} exists and is not a swavkit result; choose another file name")


def write_result(result: dict, path: str | Path) -> Path:
    """Write the record as indented JSON, atomically and durably (see :mod:`swavkit.runtime.fileio`); never over a
    file that is not a swavkit result."""
    check_result_target(path)
    return write_json_atomic(path, result)


def rewrite_result(result: dict) -> dict:
    """Write ``result`` again over its own ``result_path`` (after floors were added), on the main process;
    nothing when it has no file. Returns ``result``."""
    if distributed.is_main_process() and result.get("result_path"):
        write_result(result, result["result_path"])
    return result


def format_table(rows: list[tuple[str, object]]) -> str:
    """Two aligned columns, e.g. ``[("top-1 %", 71.3), ("k", 20)]``; floats get two decimals."""
    def text(value) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    width = max((len(label) for label, _ in rows), default=0)
    return "\n".join(f"{label:<{width}}  {text(value)}" for label, value in rows)


def _method_rows(result: dict) -> list[tuple[str, object]]:
    """The rows that say what was measured and how, per evaluation (knn, linear, finetune)."""
    protocol, data, evaluation = result["protocol"], result["data"], result["evaluation"]
    if evaluation == "finetune":
        return [("evaluation", "fine-tune (whole backbone + linear head)"), ("backbone", result["backbone"]["source"]),
                ("labels", f"{protocol['label_fraction']}: {protocol['n_labelled']} of {data['n_train_folder']} "
                           f"train images, {data['n_classes']} classes"),
                ("recipe", f"{protocol['epochs']} epochs, batch {protocol['global_batch_size']}, SGD lr trunk "
                           f"{protocol['trunk_lr']:.4g} / head {protocol['head_lr']:.4g}, {protocol['lr_schedule']}"),
                ("image size px", result["preprocessing"]["image_size_px"]), ("val images", data["n_val"])]
    rows: list[tuple[str, object]] = [("evaluation", evaluation), ("backbone", result["backbone"].get("source")),
                                      ("feature dim", result["backbone"].get("feature_dim"))]
    if evaluation == "knn":
        rows.append(("protocol", f"{protocol['k']}-NN cosine, weights exp(sim/{protocol['temperature']}), "
                                 f"{protocol['index']} index"))
    else:
        rows.append(("protocol", f"{protocol['recipe']} linear probe"))
        if "selected_weight_decay" in protocol:
            rows.append(("weight decay (chosen on held-out train)", f"{protocol['selected_weight_decay']:g}"))
    return rows + [("image size px", result["preprocessing"].get("image_size_px")),
                   ("train / val images", f"{data['n_train']} / {data['n_val']}"), ("classes", data["n_classes"])]


def summary_rows(result: dict) -> list[tuple[str, object]]:
    """The lines ``swavkit knn`` / ``linear`` / ``finetune`` print for a result record: what was measured,
    top-1 / top-5, the floors (with a warning when the backbone does not beat one), the baselines."""

    rows = _method_rows(result)
    for key in ("top1", "top5"):
        if key in result["metrics"]:
            rows.append((f"{key} %", float(result["metrics"][key])))
    for name, floor in result.get("floors", {}).items():
        rows.append((f"floor: {FLOOR_NAMES.get(name, name)} ({floor['source']}) top1 %", float(floor["top1"])))
    missed = below_floors(result)
    if missed:
        rows.append(("WARNING", "top-1 is not above " + " and ".join(missed) + ": the backbone adds nothing there"))
    rows += baseline_rows(result)
    rows.append(("wall time s", float(result["wall_time_s"])))
    return rows


def baseline_rows(result: dict) -> list[tuple[str, object]]:
    """Table rows of a result's baselines: "baseline: NAME (kind, trained at P px) top1 %"."""
    size_px = result["preprocessing"]["image_size_px"]
    rows = []
    for name, record in result.get("baselines", {}).items():
        trained = record.get("trained_size_px")
        note = "" if trained in (None, size_px) else f", trained at {trained} px, evaluated at {size_px} px"
        rows.append((f"baseline: {record.get('name', name)} ({record.get('kind', 'backbone')}{note}) top1 %",
                     float(record["top1"])))
    return rows


def print_report(rows: list[tuple[str, object]], result: dict) -> None:
    """What ``knn``, ``linear`` and ``finetune`` print: the table, where the record went, and last the one
    sentence comparing the backbone with its baselines (when it has any)."""

    print(format_table(rows))
    if result.get("result_path"):
        print(f"wrote {printable_path(result['result_path'])}"
              + (f" and {printable_path(result['labels_path'])}" if result.get("labels_path") else ""))
    if result.get("verdict"):
        print(result["verdict"])


__all__ = ["RESULT_SCHEMA", "RESULT_KEYS", "build_result", "data_record", "write_result", "rewrite_result",
           "default_result_path", "source_name", "format_table", "summary_rows", "baseline_rows", "print_report", "run_git", "git_commit",
           "swavkit_version", "environment", "utc_now"]
