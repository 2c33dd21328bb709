"""The label-free checkpoint signal: RankMe's maths, the fixed sample, and a run that logs it at every save, keeps
the best checkpoint (best-rankme.pt), exports it on request and deletes it on --restart."""

import math

import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from swavkit.artifacts.checkpoint import backbone_state, load_training_checkpoint
from swavkit.artifacts.layout import RUN_BEST_CHECKPOINT, RUN_SIGNAL_SAMPLE
from swavkit.artifacts.rundir import RunFolder
from swavkit.cli.main import main
from swavkit.config import load_config
from swavkit.runtime.fileio import read_jsonl
from swavkit.training.checkpoint_signal import effective_rank, sample_paths
from swavkit.training.trainer import train


def test_effective_rank_counts_the_directions_the_features_use():
    g = torch.Generator().manual_seed(0)
    assert abs(effective_rank(torch.eye(8)) - 8) < 1e-3  # equal singular values: the full rank
    assert abs(effective_rank(torch.randn(1, 16, generator=g).repeat(50, 1)) - 1) < 1e-3  # one direction
    rank3 = torch.randn(200, 3, generator=g) @ torch.randn(3, 16, generator=g)
    assert 1.5 < effective_rank(rank3) <= 3.0 + 1e-3
    features = torch.randn(200, 16, generator=g)
    assert effective_rank(features) > 12  # isotropic noise uses (almost) every direction
    assert math.isclose(effective_rank(7.0 * features), effective_rank(features), rel_tol=1e-6)  # scale-free


def test_sample_is_evenly_spaced_and_fixed():
    paths = [f"img{i:03d}.png" for i in range(100)]
    assert sample_paths(paths, 4) == ["img000.png", "img025.png", "img050.png", "img075.png"]
    assert sample_paths(paths, 4) == sample_paths(list(paths), 4)
    assert sample_paths(paths[:3], 4) == paths[:3] and sample_paths(paths, 0) == []


def test_run_keeps_and_exports_the_best_rankme_checkpoint(image_folder, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(image_folder, out, **{"train.epochs": 1, "train.checkpoint_every_steps": 1,
                                                     "train.signal_images": 12, "train.export_checkpoint": "rankme",
                                                     "train.loggers": "[jsonl]"})
    result = train(load_config([], overrides), progress=False)
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "rankme" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one row per checkpoint save (4 steps)
    assert all(r["signal_images"] == 12 and 1.0 <= r["rankme"] <= 12 and r["signal_prototypes_used"] >= 1 for r in rows)
    assert (out / RUN_SIGNAL_SAMPLE).read_text().count("\n") == 12
    best_row = max(rows, key=lambda r: r["rankme"])
    assert [r["step"] for r in rows if r["best_rankme"]][-1] == best_row["step"]
    best = load_training_checkpoint(out / RUN_BEST_CHECKPOINT)
    assert best["step"] == best_row["step"]

    # train.export_checkpoint=rankme: the run's backbone/ is the best checkpoint's backbone
    exported = load_file(result.backbone_dir / "model.safetensors")
    expected = backbone_state(best["model"])
    assert all(torch.equal(exported[k], expected[k]) for k in expected)
    # swavkit export --select last | rankme
    assert main(["export", str(out), str(tmp_path / "last"), "--select", "last"]) == 0
    assert main(["export", str(out), str(tmp_path / "best"), "--select", "rankme"]) == 0
    best_export = load_file(tmp_path / "best" / "model.safetensors")
    assert all(torch.equal(best_export[k], expected[k]) for k in expected)
    if best_row["step"] != 4:  # the last checkpoint differs from the best one
        last_export = load_file(tmp_path / "last" / "model.safetensors")
        assert any(not torch.equal(last_export[k], expected[k]) for k in expected)
    assert main(["export", str(image_folder), str(tmp_path / "none"), "--select", "rankme"]) == 2

    # --restart: the run's own files go, a user's file beside them stays
    (out / "checkpoints" / "notes.txt").write_text("mine")
    RunFolder(str(out)).discard()
    assert not (out / RUN_BEST_CHECKPOINT).exists() and not (out / RUN_SIGNAL_SAMPLE).exists()
    assert (out / "checkpoints" / "notes.txt").read_text() == "mine"
