"""Where training metrics go: ``metrics.jsonl`` always, plus TensorBoard, Weights & Biases or MLflow.

``train.loggers`` names the backends (default ``[jsonl, tensorboard]``). Every backend receives the same
rows the training loop writes to ``metrics.jsonl``, the run's record that ``swavkit plot`` and resuming
read: a dict with ``"step"`` and scalars (loss, ln_k, lr, images_per_s, data_wait_fraction,
prototypes_used, code_entropy, knn_top1, ...). Each scalar keeps its ``metrics.jsonl`` name in every
backend, so a curve is found under the same name everywhere.

Only the main process should log (one writer per run). W&B and MLflow are optional extras, imported
only when named; the run ids they get are kept in ``run_dir/loggers.json``, so a resumed run continues
the same W&B / MLflow run instead of starting a new one.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Protocol

from swavkit.config import ConfigError, check_logger_names
from swavkit.artifacts.layout import RUN_LOGGER_IDS, RUN_METRICS, RUN_MLFLOW_DB, RUN_TENSORBOARD_DIR
from swavkit.runtime.fileio import append_jsonl, write_json_atomic

DEFAULT_LOGGERS = ("jsonl", "tensorboard")
# the files they write in the run folder are named in swavkit.artifacts.layout (--restart deletes those)
METRICS_FILE = RUN_METRICS
TENSORBOARD_DIR = RUN_TENSORBOARD_DIR
RUN_IDS_FILE = RUN_LOGGER_IDS  # run ids of the remote backends, so a resume appends to the same W&B / MLflow run
# name -> (module to import, pyproject extra that installs it)
OPTIONAL_BACKENDS = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
# TensorBoard's "custom scalars" tab draws these tags in one chart: the loss against its collapse level
# ln K, and the code entropy against its maximum ln K.
TENSORBOARD_LAYOUT = {"SwAV": {"loss vs ln K (collapse level)": ["Multiline", ["^loss$", "^ln_k$"]],
                               "code entropy vs ln K (uniform use)": ["Multiline", ["^code_entropy$", "^ln_k$"]]}}


class MetricLogger(Protocol):
    """One backend: ``log`` receives every metrics row, ``close`` flushes and releases it."""

    def log(self, row: dict) -> None: ...

    def close(self) -> None: ...


def scalars(row: dict) -> dict[str, float]:
    """The numeric entries of a metrics row except ``step``; bools become 0/1, None and text are left out."""
    out = {}
    for key, value in row.items():
        if key == "step" or value is None or isinstance(value, str):
            continue
        if isinstance(value, (bool, int, float)):
            out[key] = float(value)
    return out


def _flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}: MLflow parameters are flat."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _import_optional(name: str):
    module_name, extra = OPTIONAL_BACKENDS[name]
    try:
        return __import__(module_name)
    except ImportError:
        raise ConfigError(f"train.loggers: '{name}' needs the {module_name} package; install it with "
                          f"pip install 'swavkit[{extra}]' or remove {name} from train.loggers") from None


class _RunIds:
    """``run_dir/loggers.json``: the remote run id of each backend, written by swavkit only."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / RUN_IDS_FILE

    def get(self, key: str) -> str | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data.get(key) if isinstance(data, dict) else None

    def set(self, key: str, value: str) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        write_json_atomic(self.path, {**(data if isinstance(data, dict) else {}), key: value})


# ----------------------------------------------------------------------------------------------------
# backends

class JsonlLogger:
    """``metrics.jsonl``: one whole JSON line per row, appended (a kill leaves at worst a torn last line)."""

    def __init__(self, path: Path):
        self.path = path

    def log(self, row: dict) -> None:
        append_jsonl(self.path, row)

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Event files in ``run_dir/tensorboard/`` (``tensorboard --logdir run_dir``)."""

    def __init__(self, log_dir: Path, config: dict | None, resume_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("train.loggers: 'tensorboard' needs the tensorboard package; install it with "
                              "pip install tensorboard, or remove tensorboard from train.loggers") from None
        # purge_step: after a resume, TensorBoard hides the events the interrupted run wrote past the
        # checkpoint, as the resumed run writes those steps again. flush_secs: a watched run shows new
        # points within 30 s instead of torch's default 2 min.
        first_writer = not any(Path(log_dir).glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(str(log_dir), purge_step=resume_step, flush_secs=30)
        if first_writer:  # the layout and the config once per run, not again at each resume
            self.writer.add_custom_scalars(TENSORBOARD_LAYOUT)
            if config:
                import yaml

                text = yaml.safe_dump(config, sort_keys=False)
                # TensorBoard's text tab renders Markdown: indent four spaces to show the YAML verbatim
                self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)

    def log(self, row: dict) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, global_step=int(row["step"]))

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A Weights & Biases run (``WANDB_PROJECT``, default "swavkit"; ``WANDB_MODE=offline`` works)."""

    def __init__(self, run_dir: Path, config: dict | None, run_ids: _RunIds):
        wandb = _import_optional("wandb")
        run_id = run_ids.get("wandb_run_id")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "swavkit"), name=run_dir.resolve().name,
                              dir=str(run_dir), config=config or {}, id=run_id, resume="allow" if run_id else None)
        run_ids.set("wandb_run_id", self.run.id)
        # The training step is a metric of its own, so rows a resumed run writes again are accepted
        # (W&B refuses a step argument that goes backwards).
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, row: dict) -> None:
        self.run.log({"step": int(row["step"]), **scalars(row)})

    def close(self) -> None:
        self.run.finish()


class MlflowLogger:
    """An MLflow run: tracking URI from ``MLFLOW_TRACKING_URI``, else ``sqlite:///run_dir/mlflow.db``;
    experiment ``MLFLOW_EXPERIMENT_NAME`` (default "swavkit"); the resolved config as parameters."""

    def __init__(self, run_dir: Path, config: dict | None, run_ids: _RunIds):
        _import_optional("mlflow")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or run_ids.get("mlflow_tracking_uri") or \
            f"sqlite:///{(run_dir / RUN_MLFLOW_DB).resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_ids.get("mlflow_run_id") if run_ids.get("mlflow_tracking_uri") == uri else None
        if self.run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "swavkit")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment_id, run_name=run_dir.resolve().name).info.run_id
            # MLflow caps a parameter value at 6000 characters; a config value is far shorter
            params = [Param(key, str(value)[:6000]) for key, value in _flatten(config or {}).items()]
            for start in range(0, len(params), 100):  # log_batch takes at most 100 parameters per call
                self.client.log_batch(self.run_id, params=params[start:start + 100])
            run_ids.set("mlflow_tracking_uri", uri)
            run_ids.set("mlflow_run_id", self.run_id)
        else:
            self.client.update_run(self.run_id, status="RUNNING")
        self._metric = Metric

    def log(self, row: dict) -> None:
        now_ms = int(time.time() * 1000)
        step = int(row["step"])
        metrics = [self._metric(key, value, now_ms, step) for key, value in scalars(row).items()
                   if math.isfinite(value)]  # MLflow's stores refuse NaN/inf on some backends
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


# ----------------------------------------------------------------------------------------------------

class MetricLoggers:
    """All configured backends behind one ``log(row)``.

    ``metrics.jsonl`` is the record: a failure to write it stops training. Any other backend that fails
    (a W&B or MLflow server gone, a full disk under the event files) is reported once on stderr and
    dropped, because a long run should not die for its dashboard; the rows stay in ``metrics.jsonl``.
    """

    def __init__(self, backends: dict[str, MetricLogger]):
        self.backends = dict(backends)

    def log(self, row: dict) -> None:
        if "step" not in row:
            raise ValueError(f"a metrics row needs a 'step' entry, got keys {sorted(row)}")
        for name, backend in list(self.backends.items()):
            if name == "jsonl":
                backend.log(row)
                continue
            try:
                backend.log(row)
            except Exception as err:  # noqa: BLE001 - any backend error must not end the run
                print(f"swavkit: warning: the {name} logger failed ({type(err).__name__}: {err}); it is off for "
                      "the rest of this run, metrics.jsonl still has every row", file=sys.stderr)
                self.backends.pop(name)
                try:
                    backend.close()
                except Exception:  # noqa: BLE001 - already reported; closing is best effort
                    pass

    def close(self) -> None:
        """Flush and close every backend (idempotent)."""
        backends, self.backends = self.backends, {}
        for backend in backends.values():
            backend.close()

    def __enter__(self) -> "MetricLoggers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_loggers(names, run_dir: str | Path, config: dict | None = None, *,
                  resume_step: int | None = None) -> MetricLoggers:
    """The backends named in ``names`` (``cfg.train.loggers``), writing into ``run_dir``.

    Args:
        names: e.g. ["jsonl", "tensorboard", "wandb"]; must include "jsonl".
        run_dir: the run folder (``cfg.out_dir``); created if needed.
        config: the resolved config (``config.to_dict(cfg)``), recorded by TensorBoard (text), W&B (config)
            and MLflow (parameters).
        resume_step: the step of the checkpoint a resumed run starts from, None for a fresh run.
    """
    names = check_logger_names(names)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_ids = _RunIds(run_dir)
    makers = {"jsonl": lambda: JsonlLogger(run_dir / METRICS_FILE),
              "tensorboard": lambda: TensorBoardLogger(run_dir / TENSORBOARD_DIR, config, resume_step),
              "wandb": lambda: WandbLogger(run_dir, config, run_ids),
              "mlflow": lambda: MlflowLogger(run_dir, config, run_ids)}
    loggers = MetricLoggers({})
    try:
        for name in names:
            loggers.backends[name] = makers[name]()
    except BaseException:
        loggers.close()
        raise
    return loggers


__all__ = ["DEFAULT_LOGGERS", "METRICS_FILE", "TENSORBOARD_DIR", "RUN_IDS_FILE", "MetricLogger", "MetricLoggers",
           "build_loggers", "check_logger_names", "scalars"]
