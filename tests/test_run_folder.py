"""Training runs and their folder: checks before writes, restart deletes only the run, resume keeps the
schedule continuous, model.init, and the closing lines of a run that ended on the ln K plateau."""

from __future__ import annotations

import math
import os
import pickle

import pytest
import timm
import torch

from conftest import tiny_overrides
from swavkit.artifacts.checkpoint import export_backbone, load_training_checkpoint
from swavkit.cli.main import main
from swavkit.config import ConfigError, load_config
from swavkit.runtime.fileio import read_jsonl
from swavkit.training.trainer import train


def _run(overrides, **kwargs):
    return train(load_config([], overrides), progress=False, **kwargs)


def test_restart_with_a_typo_deletes_nothing(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    _run(tiny_overrides(image_folder, out, **{"train.epochs": 1}))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["pretrain", "--restart", "--no-progress",
                 *tiny_overrides(image_folder, out, **{"model.backbone": "resnet1O"})]) == 2
    assert "did you mean resnet" in capsys.readouterr().err  # a suggestion, before any other work
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    # a missing data folder is found before anything is deleted too
    assert main(["pretrain", "--restart", "--no-progress", *tiny_overrides(tmp_path / "nowhere", out)]) == 2
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_folder_that_is_not_a_run_is_refused_and_kept(image_folder, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "thesis.tex").write_text("chapter 1")
    for restart in (False, True):
        with pytest.raises(ConfigError, match="not a swavkit run"):
            _run(tiny_overrides(image_folder, project), restart=restart)
    assert sorted(p.name for p in project.iterdir()) == ["thesis.tex"]


def _another_tools_run(folder, marker) -> dict:
    """What another trainer leaves in its out_dir, with a last.pt that runs code when unpickled; {path: bytes}."""
    class CodeRunner:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (folder / "checkpoints").mkdir(parents=True)
    (folder / "wandb").mkdir()
    (folder / "tensorboard").mkdir()
    with open(folder / "checkpoints" / "last.pt", "wb") as handle:
        pickle.dump({"epoch": 3, "state": CodeRunner()}, handle)
    torch.save({"format": "other-trainer", "model": torch.zeros(2)}, folder / "checkpoints" / "best.pt")
    (folder / "config.yaml").write_text("lr: 0.1\n")
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    (folder / "wandb" / "run.log").write_text("wandb")
    (folder / "tensorboard" / "events.out").write_text("tb")
    (folder / "notes.md").write_text("mine")
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("last_pt", ["code-running pickle", "another format"])
def test_restart_never_clears_a_folder_swavkit_cannot_prove_it_wrote(image_folder, tmp_path, capsys, last_pt):
    folder, marker = tmp_path / "other-run", tmp_path / "CODE-RAN"
    files = _another_tools_run(folder, marker)
    if last_pt == "another format":  # a plain tensor file without swavkit's format marker
        torch.save({"format": "other-trainer", "model": torch.zeros(2)}, folder / "checkpoints" / "last.pt")
        files[folder / "checkpoints" / "last.pt"] = (folder / "checkpoints" / "last.pt").read_bytes()
    for restart in ([], ["--restart"]):
        assert main(["pretrain", *restart, "--no-progress", *tiny_overrides(image_folder, folder)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "not a swavkit run" in err and "--restart" not in err, err
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == files and not marker.exists()


def test_a_fine_tune_folder_is_one_only_with_its_marker(tmp_path):
    from swavkit.artifacts.rundir import FINETUNE_FORMAT, FinetuneFolder

    folder = tmp_path / "ft"
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(b"another tool's")
    (folder / "finetune.json").write_text('{"format": "not-swavkit"}')
    with pytest.raises(ConfigError, match="not a swavkit fine-tune") as info:
        FinetuneFolder(folder)  # what finetune --restart builds before it discards anything
    assert "--restart" not in str(info.value) and (folder / "checkpoint.pt").read_bytes() == b"another tool's"
    (folder / "finetune.json").write_text(f'{{"format": "{FINETUNE_FORMAT}"}}')
    FinetuneFolder(folder).discard()
    assert sorted(p.name for p in folder.iterdir()) == []


def test_restart_keeps_the_users_files_in_a_run_folder(image_folder, tmp_path):
    out = tmp_path / "run"
    _run(tiny_overrides(image_folder, out, **{"train.epochs": 1}))
    (out / "notes.md").write_text("what I changed")
    result = _run(tiny_overrides(image_folder, out, **{"train.epochs": 1, "seed": 3}), restart=True)
    assert result.completed and (out / "notes.md").read_text() == "what I changed"
    assert load_training_checkpoint(out / "checkpoints" / "last.pt")["config"]["seed"] == 3


def test_resume_with_more_epochs_continues_the_lr_curve(image_folder, tmp_path):
    out = tmp_path / "run"
    first = _run(tiny_overrides(image_folder, out, **{"train.epochs": 2, "train.log_every_steps": 1}))
    assert first.step == 8
    _run(tiny_overrides(image_folder, out, **{"train.epochs": 4, "train.log_every_steps": 1}))
    lrs = {row["step"]: row["lr"] for row in read_jsonl(out / "metrics.jsonl") if "lr" in row}
    assert sorted(lrs) == list(range(1, 17))  # each step logged once
    # the first run ended at the final LR; the longer run goes on from there instead of jumping back up
    assert lrs[9] <= lrs[8] * 1.5 + 1e-12
    assert max(lrs[s] for s in range(9, 17)) <= lrs[8] * 1.5 + 1e-12


def test_model_init_sets_the_starting_backbone(image_folder, tmp_path):
    torch.manual_seed(7)
    start = timm.create_model("resnet10t", num_classes=0)
    init_dir = export_backbone(start, tmp_path / "init", image_size_px=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    out = tmp_path / "run"
    result = _run(tiny_overrides(image_folder, out, **{"model.init": str(init_dir), "train.epochs": 1,
                                                       "optim.base_lr": 1e-9, "optim.warmup_epochs": 0}),
                  stop_after_steps=1)
    trained = load_training_checkpoint(result.checkpoint)["model"]
    # after one step at a negligible LR the backbone is (almost exactly) the init, not a random one
    weight = trained["backbone.conv1.0.weight"]
    torch.testing.assert_close(weight, start.conv1[0].weight.detach(), rtol=0, atol=1e-6)


def test_a_short_run_that_ends_at_ln_k_says_so(image_folder, tmp_path, capsys):
    # a huge temperature makes every prediction uniform: the loss is ln K from the first step, in a run far
    # shorter than train.collapse_patience_steps (200)
    result = _run(tiny_overrides(image_folder, tmp_path / "flat", **{"swav.temperature": 1000.0, "train.epochs": 1}))
    assert abs(result.final_loss - math.log(10)) < 0.01 * math.log(10)
    closing = capsys.readouterr().out.strip().splitlines()[-1]
    assert closing.startswith("WARNING the run ended at the collapse plateau") and "swav.epsilon" in closing
    healthy = _run(tiny_overrides(image_folder, tmp_path / "ok", **{"train.epochs": 1}))
    assert abs(healthy.final_loss - math.log(10)) > 0.01 * math.log(10)
    assert "collapse plateau" not in capsys.readouterr().out


def test_exported_card_lists_the_results_measured_on_the_run(image_folder, tmp_path, monkeypatch):
    from evaluation_fixtures import write_labelled_folders
    from swavkit.evaluation.knn import evaluate_knn

    monkeypatch.chdir(tmp_path)  # results/ is relative to the current folder, as for the CLI
    run = tmp_path / "run"
    _run(tiny_overrides(image_folder, run, **{"train.epochs": 1}))
    train_dir, val_dir = write_labelled_folders(tmp_path / "labelled", n_train=4, n_val=2, size_px=32)
    evaluate_knn(str(run), train_dir, val_dir, k=3, num_workers=0, progress=False, floors="off")
    assert main(["export", str(run), str(tmp_path / "exports" / "r")]) == 0
    card = (tmp_path / "exports" / "r" / "README.md").read_text()
    assert "k-NN (k=3" in card and "None recorded yet" not in card
