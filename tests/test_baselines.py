"""--baselines: cached timm pretrained weights (never downloaded) and other swavkit exports evaluated beside the
user's backbone with the same split, size and protocol; the closing sentence; the model card."""

import json
import socket

import pytest
import torch
from safetensors.torch import save_file

from evaluation_fixtures import one_thread, write_labelled_folders, write_labelled_split  # noqa: F401
from swavkit.artifacts.checkpoint import export_backbone
from swavkit.evaluation.baselines import verdict_sentence

TIMM_NAME = "test_resnet.r160_in1k"  # a tiny timm model whose pretrained cfg points at the Hugging Face Hub
TIMM_SIZE_PX = 160  # its pretrained cfg's input_size
# Four nearly equal colours under heavy noise: backbones score apart (not all 100 %), so the sentence has a winner
CLOSE_COLOURS = {"c0": (120, 120, 120), "c1": (132, 120, 120), "c2": (120, 132, 120), "c3": (120, 120, 132)}


@pytest.fixture
def offline_hf_cache(tmp_path, monkeypatch):
    """A Hugging Face cache in tmp_path holding fake "downloaded" weights of TIMM_NAME, the hub offline, and any
    socket connection recorded (and refused): returns (the weights saved, the list of attempted connections)."""
    import timm
    from huggingface_hub import constants

    hub = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))  # read at import: the env alone is too late here
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    torch.manual_seed(7)
    weights = timm.create_model("test_resnet", num_classes=1000).state_dict()  # a classifier, as released
    revision = "0" * 40
    repo = hub / f"models--{timm.models.get_pretrained_cfg(TIMM_NAME).hf_hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, repo / "snapshots" / revision / "model.safetensors")
    return weights, attempts


def test_the_sentence_names_the_winner_its_margin_and_each_comparison():
    lost = verdict_sentence("a", 71.8, {"resnet50.a1_in1k": 80.25, "b": 65.0}, 32, {"resnet50.a1_in1k": 224, "b": 32})
    assert lost.startswith("The best is resnet50.a1_in1k at 80.25 % top-1, 8.45 points above your backbone (a, 71.80 %)")
    assert "beats b (65.00 %)" in lost and "does not beat resnet50.a1_in1k (80.25 %)" in lost
    assert lost.endswith("evaluated here at 32 px: resnet50.a1_in1k (224 px).") and ". " not in lost  # one sentence
    won = verdict_sentence("a", 90.0, {"x": 89.0, "y": 12.5}, 32, {"x": 32, "y": 32})
    assert won == ("Your backbone (a) is best at 90.00 % top-1, 1.00 point above the best baseline x (89.00 %); "
                   "your backbone beats x (89.00 %) and y (12.50 %).")
    tied = verdict_sentence("a", 50.004, {"x": 50.0}, 32)
    assert tied.startswith("Your backbone (a) ties with the best baseline x at 50.00 %") and "ties with x" in tied


def test_cached_timm_weights_and_another_export_are_evaluated_beside_the_backbone(tmp_path, capsys,
                                                                                  offline_hf_cache):
    import timm

    from swavkit.artifacts.pretrained import load_backbone
    from swavkit.cli.main import main

    weights, attempts = offline_hf_cache
    train_dir = write_labelled_split(tmp_path / "data" / "train", 8, 6, seed=0, classes=CLOSE_COLOURS)
    val_dir = write_labelled_split(tmp_path / "data" / "val", 6, 6, seed=1, classes=CLOSE_COLOURS)
    torch.manual_seed(0)
    own = export_backbone(timm.create_model("resnet10t", num_classes=0), tmp_path / "runs" / "a" / "backbone",
                          image_size_px=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    torch.manual_seed(1)
    other = export_backbone(timm.create_model("test_resnet", num_classes=0), tmp_path / "runs" / "b" / "backbone",
                            image_size_px=24, mean=(0.5,) * 3, std=(0.25,) * 3)
    # the cached file itself, not timm's random init, is what a baseline name loads
    loaded = load_backbone(TIMM_NAME).state_dict()
    assert all(torch.equal(loaded[k], weights[k]) for k in loaded)

    out = tmp_path / "knn.json"
    assert main(["knn", "--backbone", str(own), "--train", str(train_dir), "--val", str(val_dir), "--k", "3",
                 "--workers", "0", "--no-progress", "--floors", "off", "--out", str(out),
                 "--baselines", f"{TIMM_NAME},{other}"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    record = json.loads(out.read_text())
    baselines = record["baselines"]
    assert list(baselines) == [TIMM_NAME, str(other)]
    assert baselines[TIMM_NAME]["kind"] == "timm pretrained (cached)" and baselines[str(other)]["kind"] == "swavkit export"
    # same split and size as the backbone; each baseline's own training resolution recorded and said
    assert {b["image_size_px"] for b in baselines.values()} == {record["preprocessing"]["image_size_px"]} == {32}
    assert baselines[TIMM_NAME]["trained_size_px"] == TIMM_SIZE_PX and baselines[str(other)]["trained_size_px"] == 24
    assert printed[-1] == record["verdict"] and printed[-1].count(". ") == 0
    scores = {"a": record["metrics"]["top1"], **{b["name"]: b["top1"] for b in baselines.values()}}
    assert baselines[str(other)]["name"] == "b" and baselines[TIMM_NAME]["name"] == TIMM_NAME  # no home folders
    assert len(set(scores.values())) == 3, scores  # the data lets them differ: a winner and a margin to check
    best = max(scores, key=scores.get)
    # the margin: the best baseline over your backbone, or your backbone over the best baseline
    margin = scores[best] - (scores["a"] if best != "a" else max(v for name, v in scores.items() if name != "a"))
    assert f"{margin:.2f} points above" in printed[-1]
    assert (printed[-1].startswith(f"The best is {best} at {scores[best]:.2f} % top-1") if best != "a"
            else printed[-1].startswith("Your backbone (a) is best"))
    for name, value in scores.items():
        if name != "a":
            word = "beats" if scores["a"] > value else "ties with" if scores["a"] == value else "does not beat"
            assert word in printed[-1] and f"{name} ({value:.2f} %)" in printed[-1]
    assert f"{TIMM_NAME} ({TIMM_SIZE_PX} px)" in printed[-1]
    assert any(line.startswith(f"baseline: {TIMM_NAME} (timm pretrained (cached), trained at 160 px, evaluated at 32")
               for line in printed)

    # a name whose weights are not cached: one line saying how to fetch them, exit 2, nothing evaluated
    assert main(["knn", "--backbone", str(own), "--train", str(train_dir), "--val", str(val_dir), "--workers", "0",
                 "--no-progress", "--floors", "off", "--out", str(tmp_path / "missing.json"),
                 "--baselines", "resnet18.a1_in1k"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "--baselines resnet18.a1_in1k" in error
    assert "timm.create_model('resnet18.a1_in1k', pretrained=True)" in error
    assert not (tmp_path / "missing.json").exists()
    assert attempts == []  # nothing tried the network


def test_linear_probe_records_a_baseline_and_the_card_lists_it(tmp_path, monkeypatch):
    import timm

    from swavkit.artifacts.modelcard import card_for_training
    from swavkit.config import Config, to_dict
    from swavkit.evaluation.linear_probe import evaluate_linear

    train_dir, val_dir = write_labelled_folders(tmp_path / "data", n_train=6, n_val=3, size_px=32)
    torch.manual_seed(0)
    own = export_backbone(timm.create_model("resnet10t", num_classes=0), tmp_path / "runs" / "a" / "backbone",
                          image_size_px=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    other = export_backbone(timm.create_model("test_resnet", num_classes=0), tmp_path / "b", image_size_px=32,
                            mean=(0.5,) * 3, std=(0.25,) * 3)
    monkeypatch.chdir(tmp_path)  # results/ here
    result = evaluate_linear(own, train_dir, val_dir, baselines=str(other), floors="off", num_workers=0,
                             progress=False, weight_decays=(0.1,))
    assert set(result["baselines"]) == {str(other)} and result["verdict"].endswith(".")
    assert json.loads(open(result["result_path"]).read())["baselines"] == result["baselines"]
    config = to_dict(Config())
    config["crops"]["sizes_px"] = [32, 16]
    card = card_for_training(config, architecture="resnet10t", feature_dim=512, backbone_dir=own, steps=1,
                             final_loss=1.0)
    row = next(line for line in card.splitlines() if line.startswith("| this backbone | linear probe"))
    assert f"b {result['baselines'][str(other)]['top1']:.2f}" in row
    assert result["verdict"] in card


def test_finetune_fine_tunes_each_baseline_on_the_same_labelled_files(tmp_path):
    import timm

    from swavkit.evaluation.finetune import FinetuneOptions, finetune

    folders = write_labelled_folders(tmp_path / "data", n_train=4, n_val=2, size_px=32)
    torch.manual_seed(0)
    own = export_backbone(timm.create_model("resnet10t", num_classes=0), tmp_path / "own", image_size_px=32,
                          mean=(0.5,) * 3, std=(0.25,) * 3)
    other = export_backbone(timm.create_model("test_resnet", num_classes=0), tmp_path / "other", image_size_px=64,
                            mean=(0.4,) * 3, std=(0.2,) * 3)
    result = finetune(own, *folders, FinetuneOptions(label_fraction="0.5", out_dir=str(tmp_path / "run"), out_json="",
                                                     floors="off", baselines=(str(other),), epochs=1, batch_size=4,
                                                     num_workers=0, device="cpu", progress=False))
    baseline = result["baselines"][str(other)]
    assert baseline["image_size_px"] == 32 and baseline["trained_size_px"] == 64 and "top1" in baseline
    assert (tmp_path / "run" / f"baseline-{str(other).strip('/').replace('/', '-')}"[:200]).is_dir() or any(
        p.name.startswith("baseline-") for p in (tmp_path / "run").iterdir())
    assert "(64 px)" in result["verdict"] and "evaluated here at 32 px" in result["verdict"]
