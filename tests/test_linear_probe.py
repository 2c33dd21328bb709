"""Linear probe: ceilings and floors, no selection on the reported split, both recipes, CLI end to end."""

import json
import subprocess
import sys

import torch
import torch.nn.functional as F

from evaluation_fixtures import ONE_THREAD_ENV, clusters, one_thread, write_labelled_folders  # noqa: F401
from swavkit.cli.main import main
from swavkit.evaluation.linear_probe import (REFERENCE_PROBE_FORMAT, evaluate_linear, fit_softmax_regression,
                                             linear_probe_fast, stratified_holdout)
from swavkit.evaluation.report import RESULT_KEYS


def test_stratified_holdout_is_a_deterministic_per_class_partition():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 10 + [3])
    fit, held = stratified_holdout(labels, 0.2, seed=3)
    assert sorted(torch.cat([fit, held]).tolist()) == list(range(len(labels)))
    assert [int((labels[held] == c).sum()) for c in range(4)] == [10, 6, 2, 0]  # a lone image stays in fit
    again_fit, again_held = stratified_holdout(labels, 0.2, seed=3)
    assert torch.equal(fit, again_fit) and torch.equal(held, again_held)
    assert not torch.equal(held, stratified_holdout(labels, 0.2, seed=4)[1])


def test_lbfgs_reaches_the_regularised_optimum():
    features, labels = clusters(600, 4, 16, spread=2.0, seed=0)
    weight, bias = fit_softmax_regression(features, labels, 4, weight_decay=1e-2)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    loss = F.cross_entropy(features @ weight.T + bias, labels) + 0.5 * 1e-2 * weight.pow(2).sum()
    loss.backward()
    assert weight.grad.abs().max() < 1e-4 and bias.grad.abs().max() < 1e-4


def test_fast_probe_separable_reaches_100_and_random_labels_chance():
    train, train_labels = clusters(2000, 10, 64, spread=0.5, seed=0)
    val, val_labels = clusters(500, 10, 64, spread=0.5, seed=1)
    separable = linear_probe_fast(train, train_labels, val, val_labels)
    assert separable["top1"] == 100.0 and separable["top5"] == 100.0
    shuffled = train_labels[torch.randperm(2000, generator=torch.Generator().manual_seed(0))]
    chance = linear_probe_fast(train, shuffled, val, val_labels)
    assert 4.0 < chance["top1"] < 17.0  # chance is 10 %
    assert chance["train_top1"] > chance["top1"] + 5  # it did fit the noise it was given


def test_fast_probe_never_looks_at_val_labels_for_selection():
    train, train_labels = clusters(1000, 5, 32, spread=3.0, seed=0)
    val, val_labels = clusters(300, 5, 32, spread=3.0, seed=1)
    honest = linear_probe_fast(train, train_labels, val, val_labels)
    scrambled = linear_probe_fast(train, train_labels, val, (val_labels + 1) % 5)
    assert honest["selected_weight_decay"] == scrambled["selected_weight_decay"]
    assert honest["holdout_top1"] == scrambled["holdout_top1"]
    assert honest["n_fit"] + honest["n_holdout"] == 1000 and honest["n_holdout"] == 200
    assert honest["top1"] > 60.0 and scrambled["top1"] < 40.0  # the same classifier, judged differently


# The reference recipe's loop (frozen trunk, resume after kill -9, two processes): tests/test_supervised.py.


def test_evaluate_linear_reference_writes_its_protocol(tmp_path, monkeypatch):
    train_dir, val_dir = write_labelled_folders(tmp_path / "data", n_train=4, n_val=2)
    common = dict(recipe="reference", epochs=2, batch_size=4, image_size_px=32, num_workers=0, device="cpu",
                  progress=False, checkpoint=str(tmp_path / "probe.pt"))
    result = evaluate_linear("timm:resnet10t", train_dir, val_dir, out_json=tmp_path / "ref.json", **common)
    # the same call again reads the finished state from its checkpoint: the same head, the same numbers
    from test_supervised import _record_saves

    saved_steps = _record_saves(monkeypatch)
    again = evaluate_linear("timm:resnet10t", train_dir, val_dir, out_json=tmp_path / "again.json", **common)
    assert all(step == 6 for step in saved_steps), saved_steps  # nothing trained again (6 steps: 2 epochs of 3)
    assert again["metrics"] == result["metrics"] and torch.load(tmp_path / "probe.pt")["format"] == REFERENCE_PROBE_FORMAT
    assert json.loads((tmp_path / "ref.json").read_text()) == json.loads(json.dumps(result))
    assert set(RESULT_KEYS) <= set(result)
    protocol = result["protocol"]
    assert protocol["recipe"] == "reference" and protocol["epochs"] == 2 and protocol["steps"] == 6
    assert protocol["momentum"] == 0.9 and protocol["base_lr_at_batch_256"] == 0.3
    assert result["data"]["n_train"] == 12 and result["backbone"]["feature_dim"] == 512


def test_cli_linear_end_to_end(tmp_path, capsys):
    # the run in this process (no second torch import); the refused one below as a real process
    train_dir, val_dir = write_labelled_folders(tmp_path / "data", n_train=10, n_val=4)
    out = tmp_path / "linear.json"
    assert main(["linear", "--backbone", "timm:resnet10t", "--train", str(train_dir), "--val", str(val_dir),
                 "--image-size", "32", "--workers", "0", "--weight-decays", "1e-4", "1e-2", "--out", str(out),
                 "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert "top1 %" in stdout and "held-out train" in stdout
    result = json.loads(out.read_text())
    assert set(RESULT_KEYS) <= set(result) and result["evaluation"] == "linear"
    protocol = result["protocol"]
    assert protocol["recipe"] == "fast" and protocol["weight_decay_grid"] == [1e-4, 1e-2]
    assert protocol["selected_weight_decay"] in (1e-4, 1e-2)
    assert set(protocol["holdout_top1"]) == {"0.0001", "0.01"}
    assert protocol["n_fit"] + protocol["n_holdout"] == result["data"]["n_train"] == 30
    assert result["metrics"]["top1"] > 90.0 and "top5" not in result["metrics"]  # 3 colour classes

    # a checkpoint is the reference recipe's: the fast one refuses it in one line before any work
    assert main(["linear", "--backbone", "timm:resnet10t", "--train", str(train_dir), "--val", str(val_dir),
                 "--checkpoint", str(tmp_path / "probe.pt")]) == 2 and not (tmp_path / "probe.pt").exists()

    bad = subprocess.run([sys.executable, "-m", "swavkit", "linear", "--backbone", "timm:resnet10t", "--train",
                          str(train_dir), "--val", str(tmp_path / "missing")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env=ONE_THREAD_ENV)
    assert bad.returncode == 2 and "missing" in bad.stderr and "Traceback" not in bad.stderr
