"""Metric backends: every backend gets the scalars of metrics.jsonl under the same names (read back)."""

from __future__ import annotations

import glob
import math
import sys
import time

import pytest

from swavkit.config import ConfigError, load_config
from swavkit.runtime.fileio import read_jsonl
from swavkit.training.loggers import DEFAULT_LOGGERS, build_loggers, scalars

LN_K = round(math.log(30), 5)
SCALAR_KEYS = ("loss", "ln_k", "lr", "images_per_s", "data_wait_fraction", "prototypes_used", "code_entropy",
               "knn_top1")


def training_rows() -> list[dict]:
    """Rows shaped like the training loop's: four logging steps, then an end-of-epoch k-NN row."""
    rows = [{"step": step, "epoch": step / 40, "loss": 3.4 - 0.1 * i, "ln_k": LN_K, "lr": 0.6 * (1 - i / 10),
             "images_per_s": 120.0 + 7 * i, "data_wait_fraction": 0.25 - 0.01 * i, "prototypes_used": 5 + 3 * i,
             "code_entropy": 2.1 + 0.2 * i, "queue_in_use": i >= 2}
            for i, step in enumerate((10, 20, 30, 40))]
    rows.append({"step": 40, "epoch": 1, "knn_top1": 61.25, "knn_top5": None})
    return rows


def read_tensorboard(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]} | {"_tensors": accumulator.Tags()["tensors"]}


def expected_series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(row["step"], float(row[key])) for row in rows if row.get(key) is not None]


def test_default_loggers_write_jsonl_and_the_same_scalars_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is a core dependency: pip install -e .")
    rows = training_rows()
    config = {"swav": {"epsilon": 0.05}, "model": {"n_prototypes": 30}}
    with build_loggers(list(DEFAULT_LOGGERS), tmp_path, config) as loggers:
        for row in rows:
            loggers.log(row)

    assert read_jsonl(tmp_path / "metrics.jsonl") == rows
    events = read_tensorboard(tmp_path / "tensorboard")
    for key in SCALAR_KEYS:
        got, want = events[key], expected_series(rows, key)
        assert [step for step, _ in got] == [step for step, _ in want], key
        assert [value for _, value in got] == pytest.approx([value for _, value in want], rel=1e-6), key
    assert [value for _, value in events["queue_in_use"]] == [0.0, 0.0, 1.0, 1.0]
    assert "knn_top5" not in events  # None is not a scalar
    assert "step" not in events
    # the chart that draws loss against ln K, and the resolved config in the text tab
    assert "custom_scalars__config__" in events["_tensors"]
    assert "config/text_summary" in events["_tensors"]


def test_resumed_run_replaces_the_tensorboard_points_past_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is a core dependency: pip install -e .")
    with build_loggers(["jsonl", "tensorboard"], tmp_path) as loggers:
        for step in (10, 20, 30, 40, 50):
            loggers.log({"step": step, "loss": float(step)})
    # killed after step 50, resumed from the checkpoint at step 30: steps 30 and 40 are trained again
    with build_loggers(["jsonl", "tensorboard"], tmp_path, resume_step=30) as loggers:
        for step in (30, 40):
            loggers.log({"step": step, "loss": -float(step)})
    assert read_tensorboard(tmp_path / "tensorboard")["loss"] == [(10, 10.0), (20, 20.0), (30, -30.0), (40, -40.0)]


def test_scalars_keeps_numbers_and_bools_only():
    row = {"step": 7, "loss": 1.5, "used": 3, "queue_in_use": True, "knn_top5": None, "note": "x"}
    assert scalars(row) == {"loss": 1.5, "used": 3.0, "queue_in_use": 1.0}


@pytest.mark.parametrize("value, message", [
    ("[jsonl,tensorbord]", "train.loggers: 'tensorbord' is not one of jsonl, tensorboard, wandb, mlflow"),
    ("[tensorboard]", "train.loggers: must include jsonl"),
    ("[]", "train.loggers: must include jsonl"),
])
def test_config_refuses_unknown_logger_names_and_a_list_without_jsonl(value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(overrides=[f"train.loggers={value}"])


def test_config_default_and_a_single_name_are_accepted():
    assert load_config().train.loggers == ["jsonl", "tensorboard"]
    assert load_config(overrides=["train.loggers=jsonl"]).train.loggers == ["jsonl"]


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_missing_optional_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    with pytest.raises(ConfigError) as err:
        build_loggers(["jsonl", name], tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"train.loggers: '{name}' needs the {name} package")
    assert f"pip install 'swavkit[{name}]'" in message


def test_a_failing_dashboard_backend_is_dropped_with_a_warning_and_jsonl_goes_on(tmp_path, capsys):
    class Broken:
        closed = False

        def log(self, row):
            raise ConnectionError("server went away")

        def close(self):
            Broken.closed = True

    loggers = build_loggers(["jsonl"], tmp_path)
    loggers.backends["wandb"] = Broken()
    loggers.log({"step": 1, "loss": 2.0})
    loggers.log({"step": 2, "loss": 1.0})
    loggers.close()
    assert [row["step"] for row in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
    err = capsys.readouterr().err
    assert err.count("the wandb logger failed (ConnectionError: server went away)") == 1
    assert Broken.closed


def test_a_failing_jsonl_write_stops_the_run(tmp_path):
    loggers = build_loggers(["jsonl"], tmp_path)
    (tmp_path / "metrics.jsonl").mkdir()  # stands for a full disk or a vanished folder: open() fails
    with pytest.raises(IsADirectoryError):
        loggers.log({"step": 1, "loss": 2.0})


def test_wandb_offline_run_gets_the_same_scalars_and_a_resume_continues_it(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb not installed (pip install 'swavkit[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "swavkit-test")
    rows = training_rows()
    loggers = build_loggers(["jsonl", "wandb"], tmp_path, {"swav": {"epsilon": 0.05}})
    run = loggers.backends["wandb"].run
    for row in rows:
        loggers.log(row)
    summary = {key: run.summary[key] for key in SCALAR_KEYS}
    assert run.config["swav"] == {"epsilon": 0.05}
    run_id = run.id
    loggers.close()

    last = {key: expected_series(rows, key)[-1][1] for key in SCALAR_KEYS}
    assert summary == pytest.approx(last)
    (log_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / f"run-{run_id}.wandb"))
    # the offline log (what `wandb sync` uploads) is written by wandb's own service process, which on a
    # busy machine may still be flushing when finish() returns
    deadline = time.monotonic() + 20
    while not all(key.encode() in open(log_file, "rb").read() for key in SCALAR_KEYS) and time.monotonic() < deadline:
        time.sleep(0.2)
    data = open(log_file, "rb").read()
    for key in SCALAR_KEYS:
        assert key.encode() in data, key

    with build_loggers(["jsonl", "wandb"], tmp_path, {"swav": {"epsilon": 0.05}}, resume_step=30) as again:
        assert again.backends["wandb"].run.id == run_id


def test_mlflow_run_gets_the_same_scalars_and_the_config_as_parameters(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow not installed (pip install 'swavkit[mlflow]')")
    from mlflow.tracking import MlflowClient

    # A file store in tmp_path: seconds faster than the default sqlite store (run_dir/mlflow.db), whose
    # schema set-up alone takes ~10 s; MLflow 3 wants the opt-in for it.
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "swavkit-test")
    run_dir = tmp_path / "run"
    rows = training_rows()
    with build_loggers(["jsonl", "mlflow"], run_dir, {"swav": {"epsilon": 0.05}, "seed": 3}) as loggers:
        run_id = loggers.backends["mlflow"].run_id
        for row in rows:
            loggers.log(row)

    client = MlflowClient(tracking_uri=uri)
    for key in SCALAR_KEYS:
        history = sorted((metric.step, metric.value) for metric in client.get_metric_history(run_id, key))
        want = expected_series(rows, key)
        assert [step for step, _ in history] == [step for step, _ in want], key
        assert [value for _, value in history] == pytest.approx([value for _, value in want]), key
    run = client.get_run(run_id)
    assert run.data.params == {"swav.epsilon": "0.05", "seed": "3"}
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "run"
    with build_loggers(["jsonl", "mlflow"], run_dir, resume_step=30) as again:
        assert again.backends["mlflow"].run_id == run_id
