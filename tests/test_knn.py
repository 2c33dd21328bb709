"""k-NN: the vote formula, faiss == brute force, accuracy floors/ceilings, monitoring, CLI end to end."""

import json
import math
import subprocess
import sys

import pytest
import torch

from evaluation_fixtures import ONE_THREAD_ENV, clusters, one_thread, write_labelled_folders  # noqa: F401
from swavkit.evaluation.features import load_eval_backbone
from swavkit.evaluation.knn import build_index, knn_accuracy, knn_classify, knn_classify_bruteforce, knn_monitor, monitor_folders
from swavkit.evaluation.metrics import topk_accuracy
from swavkit.evaluation.report import RESULT_KEYS


def test_vote_weights_are_exp_similarity_over_temperature():
    # Train features on the unit circle at known angles; the query sits at angle 0.
    angles = torch.tensor([0.1, 0.5, 1.0, 2.0])
    train = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1) * torch.tensor([[3.0], [1.0], [0.5], [2.0]])
    labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[5.0, 0.0]])  # norms must not matter: features are L2-normalised
    T = 0.5
    scores = knn_classify(train, labels, query, k=3, temperature=T, n_classes=2)
    weights = torch.exp(torch.cos(angles[:3]) / T)
    expected = torch.tensor([weights[0], weights[1] + weights[2]])  # the 4th neighbour is outside k=3
    torch.testing.assert_close(scores[0] / scores[0].sum(), expected / expected.sum())
    assert scores.argmax().item() == (0 if expected[0] > expected[1] else 1)


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (20, 0.07), (7, 0.5)])
def test_faiss_equals_bruteforce(k, temperature):
    train, train_labels = clusters(3000, 7, 64, spread=4.0, seed=0)  # overlapping classes: votes matter
    queries, query_labels = clusters(400, 7, 64, spread=4.0, seed=1)
    fast = knn_classify(train, train_labels, queries, k, temperature)
    reference = knn_classify_bruteforce(train, train_labels, queries, k, temperature)
    assert fast.shape == reference.shape == (400, 7)
    assert torch.equal(fast.argmax(1), reference.argmax(1))
    torch.testing.assert_close(fast, reference, rtol=1e-3, atol=1e-5)
    assert topk_accuracy(fast, query_labels) == topk_accuracy(reference, query_labels)
    assert 20.0 < topk_accuracy(fast, query_labels)["top1"] < 100.0  # a non-trivial case


def test_ivf_searching_every_list_is_exact():
    train, train_labels = clusters(2000, 5, 32, spread=3.0, seed=0)
    queries, _ = clusters(200, 5, 32, spread=3.0, seed=1)
    index = build_index(torch.nn.functional.normalize(train, dim=1), "ivf", n_lists=16)
    assert index.nlist == 16 and index.ntotal == 2000
    exhaustive = knn_classify(train, train_labels, queries, 20, 0.07, index="ivf", n_lists=16, n_probe=16)
    exact = knn_classify(train, train_labels, queries, 20, 0.07)
    assert torch.equal(exhaustive.argmax(1), exact.argmax(1))
    torch.testing.assert_close(exhaustive, exact, rtol=1e-3, atol=1e-5)


def test_separable_features_reach_100_and_random_labels_chance():
    train, train_labels = clusters(2000, 10, 32, spread=0.3, seed=0)
    val, val_labels = clusters(500, 10, 32, spread=0.3, seed=1)
    separable = knn_accuracy(train, train_labels, val, val_labels)
    assert separable == {"top1": 100.0, "top5": 100.0}
    shuffled = train_labels[torch.randperm(2000, generator=torch.Generator().manual_seed(0))]
    chance = knn_accuracy(train, shuffled, val, val_labels)
    assert 4.0 < chance["top1"] < 17.0  # chance is 10 %; 500 queries give a ~1.3 % standard error
    assert 40.0 < chance["top5"] < 60.0


def test_top5_only_with_more_than_five_classes_and_k_capped_at_train_size():
    train, labels = clusters(10, 5, 8, spread=0.1, seed=0)
    metrics = knn_accuracy(train, labels, train, labels, k=50)  # k > N uses all 10 neighbours
    assert set(metrics) == {"top1"} and metrics["top1"] == 100.0


def test_knn_monitor_restores_the_training_mode(tmp_path):
    train_dir, val_dir = write_labelled_folders(tmp_path, n_train=6, n_val=3)
    backbone = load_eval_backbone("timm:resnet10t").train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    metrics = knn_monitor(backbone, train_dir, val_dir, image_size_px=32, k=5, device="cpu", max_images=12,
                          batch_size=8)
    assert backbone.training
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
    assert metrics["n_train"] == 12 and metrics["n_val"] == 3  # 12 / 3 classes = 4 per class; val a fifth
    # the classes differ by colour, which even a random convnet separates: well above chance (33 %)
    assert metrics["top1"] >= 66.0 and "top5" not in metrics
    # a single folder of class folders: a fifth of each class becomes the queries
    assert monitor_folders(tmp_path) == (train_dir, val_dir)
    assert monitor_folders(train_dir) == (train_dir, None)
    single = knn_monitor(backbone, train_dir, None, image_size_px=32, k=5, device="cpu", max_images=0)
    assert (single["n_train"], single["n_val"]) == (15, 3)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "swavkit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=ONE_THREAD_ENV)


def test_cli_knn_end_to_end(tmp_path, capsys, monkeypatch):
    from swavkit.cli.main import main

    # the two runs in this process (no second torch import); the refused one below as a real process
    monkeypatch.chdir(tmp_path)
    train_dir, val_dir = write_labelled_folders(tmp_path / "data", n_train=8, n_val=4)
    out = tmp_path / "result.json"
    assert main(["knn", "--backbone", "timm:resnet10t", "--train", str(train_dir), "--val", str(val_dir),
                 "--image-size", "32", "--k", "5", "--workers", "0", "--out", str(out), "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert "top1 %" in stdout and str(out) in stdout
    result = json.loads(out.read_text())
    assert set(RESULT_KEYS) <= set(result) and result["evaluation"] == "knn"
    assert result["protocol"]["k"] == 5 and math.isclose(result["protocol"]["temperature"], 0.07)
    assert result["protocol"]["index"] == "exact"
    assert result["data"]["n_train"] == 24 and result["data"]["n_val"] == 12 and result["data"]["n_classes"] == 3
    assert result["backbone"] == {"source": "timm:resnet10t", "architecture": "resnet10t", "feature_dim": 512,
                                  "random_init_seed": 0}
    assert result["preprocessing"]["image_size_px"] == 32 and result["preprocessing"]["crop_fraction"] == 1.0
    assert {"swavkit_version", "git_commit", "device", "torch_version"} <= set(result["environment"])
    assert result["metrics"]["top1"] > 90.0  # colour classes: even random conv features separate them

    assert main(["knn", "--backbone", "pixels", "--train", str(train_dir), "--val", str(val_dir),
                 "--image-size", "16", "--workers", "0", "--no-progress"]) == 0
    written = list((tmp_path / "results").glob("knn-pixels-*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["backbone"]["feature_dim"] == 3 * 16 * 16

    missing = _cli("knn", "--backbone", "pixels", "--train", str(tmp_path / "nope"), "--val", str(val_dir),
                   cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "nope" in missing.stderr and "Traceback" not in missing.stderr


def test_floors_are_evaluated_and_recorded_beside_the_result(tmp_path, capsys):
    import json

    import timm

    from swavkit.artifacts.checkpoint import export_backbone
    from swavkit.cli.main import main

    train_dir, val_dir = write_labelled_folders(tmp_path / "data", n_train=6, n_val=3, size_px=32)
    torch.manual_seed(0)
    exported = export_backbone(timm.create_model("resnet10t", num_classes=0), tmp_path / "runs" / "a" / "backbone",
                               image_size_px=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    out = tmp_path / "knn.json"
    assert main(["knn", "--backbone", str(exported), "--train", str(train_dir), "--val", str(val_dir), "--k", "5",
                 "--workers", "0", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert set(record["floors"]) == {"random_init", "raw_pixels"}
    assert record["floors"]["random_init"]["source"] == "timm:resnet10t"
    assert "floor: raw pixels (pixels) top1 %" in printed and "floor: random init" in printed
    # the floors were measured at the result's own image size (32 px), not timm's default 224
    assert record["preprocessing"]["image_size_px"] == 32
    assert {floor["image_size_px"] for floor in record["floors"].values()} == {32}
    # a floor has no floors of its own, and --floors off leaves them out
    assert main(["knn", "--backbone", "timm:resnet10t", "--train", str(train_dir), "--val", str(val_dir), "--k", "5",
                 "--workers", "0", "--no-progress", "--out", str(tmp_path / "floor.json"), "--image-size", "32"]) == 0
    assert "floors" not in json.loads((tmp_path / "floor.json").read_text())
    assert main(["knn", "--backbone", str(exported), "--train", str(train_dir), "--val", str(val_dir), "--k", "5",
                 "--workers", "0", "--no-progress", "--out", str(tmp_path / "off.json"), "--floors", "off"]) == 0
    assert "floors" not in json.loads((tmp_path / "off.json").read_text())


def test_a_result_at_or_below_a_floor_is_flagged():
    from swavkit.evaluation.floors import below_floors

    result = {"metrics": {"top1": 71.8}, "floors": {"random_init": {"source": "timm:r", "top1": 67.2},
                                                    "raw_pixels": {"source": "pixels", "top1": 79.8}}}
    assert below_floors(result) == ["raw pixels 79.80 %"]
