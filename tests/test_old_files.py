"""Files written before the package became layered still load (issue 22): a run folder written by swavkit
0.1 at commit 4acebc9 (flat modules), kept in tests/data/v0_1_run: test_resnet (372k parameters), 2x32 +
2x16 px crops, 16 prototypes, one epoch of the bundled sample, 125 steps."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import timm
import torch
import yaml

import swavkit
from swavkit.artifacts.checkpoint import load_training_checkpoint
from swavkit.config import ConfigError, from_dict

OLD_RUN = Path(__file__).parent / "data" / "v0_1_run"


def test_an_export_written_before_the_move_loads_strictly_in_swavkit_and_timm():
    ours = swavkit.load_backbone(OLD_RUN / "backbone")  # strict: a missing or extra key raises
    theirs = timm.create_model(f"local-dir:{OLD_RUN / 'backbone'}", pretrained=True, num_classes=0).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(images))
    assert ours(images).shape == (2, 96)


def test_a_checkpoint_written_before_the_move_resumes(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    saved = load_training_checkpoint(run / "checkpoints" / "last.pt")
    assert saved["step"] == 125
    tree = yaml.safe_load((run / "config.yaml").read_text())
    tree["out_dir"] = str(run)
    tree["train"]["epochs"] = 2  # a resumable change: the run goes on
    result = swavkit.train(from_dict(tree), stop_after_steps=128, progress=False)
    assert result.step == 128 and not result.completed
    resumed = load_training_checkpoint(run / "checkpoints" / "last.pt")
    changed = [k for k, v in saved["model"].items() if v.is_floating_point() and not torch.equal(v, resumed["model"][k])]
    assert changed, "the resumed steps must have trained the old weights"


@pytest.mark.parametrize("proof", ["config.yaml", "checkpoints/last.pt"])
def test_an_old_run_folder_still_counts_as_a_run_by_either_proof(tmp_path, proof):
    from swavkit.artifacts.rundir import RunFolder

    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    (run / ("checkpoints/last.pt" if proof == "config.yaml" else "config.yaml")).unlink()  # only `proof` left
    assert RunFolder(str(run)).holds_run()
    (run / proof).unlink()
    with pytest.raises(ConfigError, match="not a swavkit run"):  # backbone/ alone proves nothing
        RunFolder(str(run))


@pytest.mark.parametrize("old", ["swavkit.train", "swavkit.pretrained", "swavkit.rundir"])
def test_old_import_paths_of_the_run_machinery_still_work(old):
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = importlib.import_module(old)
    assert module.__name__.startswith("swavkit.") and module.__name__ != old
