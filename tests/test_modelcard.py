"""The README.md model card: Hub-readable front matter, every section, results next to their floors."""

from __future__ import annotations

import json

import pytest
import yaml

from swavkit.artifacts.checkpoint import EXPORT_TAG, CheckpointError, check_export_target
from swavkit.config import Config, to_dict
from swavkit.artifacts.modelcard import (MODEL_CARD_FILE, MODEL_CARD_MARKER, front_matter, is_swavkit_model_card,
                               render_model_card, results_for_backbone)

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def result(source: str, architecture: str, top1: float, *, evaluation: str = "knn", val_dir: str = "/d/fmnist/val",
           size_px: int = 32, top5: float | None = None, floors: dict | None = None) -> dict:
    """A record shaped like swavkit.evaluation.report.build_result's."""
    record = {"schema": "swavkit-eval-v1", "evaluation": evaluation,
              "metrics": {"top1": top1, **({"top5": top5} if top5 is not None else {})}, "metrics_unit": "percent",
              "protocol": {"k": 20, "temperature": 0.07} if evaluation == "knn" else {"recipe": "fast"},
              "backbone": {"source": source, "architecture": architecture, "feature_dim": 512},
              "data": {"train_dir": "/d/fmnist/train", "val_dir": val_dir, "n_train": 1000, "n_val": 200,
                       "n_classes": 10},
              "preprocessing": {"image_size_px": size_px, "mean": MEAN, "std": STD}, "environment": {},
              "started_at": "2026-11-30T12:00:00+00:00", "wall_time_s": 3.2}
    if floors is not None:
        record["floors"] = floors
    return record


def full_card(results: list[dict]) -> str:
    config = to_dict(Config())
    config["model"]["backbone"] = "resnet18"
    return render_model_card(
        architecture="resnet18", config=config, data={"path": "/home/alice/data/fmnist/train", "n_images": 1000},
        training={"steps": 400, "epochs": 10, "final_loss": 3.2, "ln_k": 8.006, "global_batch_size": 256,
                  "optimizer": "lars", "peak_lr": 0.6},
        results=results, image_size_px=32, mean=MEAN, std=STD, feature_dim=512, folder_path="runs/swav/backbone")


def section(card: str, title: str) -> str:
    start = card.index(f"## {title}\n")
    end = card.find("\n## ", start + 1)
    return card[start:end if end > 0 else None]


def test_card_with_results_lists_each_number_with_its_protocol_and_floors():
    results = [result("runs/swav/backbone", "resnet18", 71.8, top5=98.1,
                      floors={"random_init": {"top1": 60.1}, "raw_pixels": 79.8}),
               result("runs/swav/backbone", "resnet18", 84.25, evaluation="linear"),
               result("timm:resnet18", "resnet18", 60.1)]
    card = full_card(results)

    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "timm"
    assert meta["pipeline_tag"] == "image-feature-extraction"
    assert {"swav", "self-supervised-learning", "resnet18"} <= set(meta["tags"])
    assert "license" not in meta  # left to the user: the Hub refuses an empty licence value
    assert "# license: FILL IN" in card.split("---\n")[1]
    assert card.split("---\n")[2].startswith(MODEL_CARD_MARKER + "\n")

    table = section(card, "Benchmark results")
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 3
    assert "k-NN (k=20, T=0.07)" in rows[0] and "| 71.80 | 98.10 |" in rows[0]
    assert "random init 60.10, raw pixels 79.80" in rows[0]
    assert "**not above the raw pixels floor**" in rows[0]  # 71.8 % under raw pixels: the card says so
    assert "linear probe (fast recipe)" in rows[1] and "| 84.25 |" in rows[1] and "below" not in rows[1]
    assert rows[2].startswith("| random init (floor) |")
    assert "`fmnist/val`: 1000 train / 200 val, 10 classes" in rows[0]

    assert "timm.create_model(\"local-dir:runs/swav/backbone\", pretrained=True)" in card
    assert "swavkit.load_backbone(\"runs/swav/backbone\")" in card
    assert 'HfApi().upload_folder(folder_path="runs/swav/backbone", repo_id=' in card
    assert "1,000 images of the folder `fmnist/train`" in card and "alice" not in section(card, "Training data")
    assert "60.0 % below ln K = 8.006" in section(card, "Training length")
    assert "lars, peak LR 0.6" in section(card, "Training recipe")
    # the resolved config is in the card, complete, as YAML that loads back to the same dict
    recipe = section(card, "Training recipe")
    embedded = recipe.split("```yaml\n")[1].split("\n```")[0]
    assert yaml.safe_load(embedded)["model"]["backbone"] == "resnet18"
    for title in ("Architecture", "How to load", "Training data", "Training length", "Training recipe",
                  "Intended use and limitations", "Licence", "Upload to the Hugging Face Hub"):
        assert f"\n## {title}\n" in card, title


def test_card_without_results_or_history_still_renders_and_parses():
    card = render_model_card(architecture="vit_small_patch16_224", config=None, data=None, training=None, results=[],
                             image_size_px=224, mean=MEAN, std=STD, license="apache-2.0")
    assert front_matter(card) == {"library_name": "timm", "pipeline_tag": "image-feature-extraction",
                                  "tags": ["image-feature-extraction", "self-supervised-learning", "swav", "swavkit",
                                           "timm", "vit_small_patch16_224"], "license": "apache-2.0"}
    assert "None recorded yet" in section(card, "Benchmark results")
    assert "Not recorded for this export." in section(card, "Training recipe")
    assert "path/to/backbone" in card  # placeholder in the snippets


def test_the_hub_client_reads_the_card_metadata():
    pytest.importorskip("huggingface_hub", reason="huggingface_hub (a timm dependency) is not installed")
    from huggingface_hub import ModelCard

    card = ModelCard(full_card([result("runs/swav/backbone", "resnet18", 71.8)]))
    assert card.data.library_name == "timm"
    assert "swavkit" in card.data.tags
    assert card.text.lstrip().startswith(MODEL_CARD_MARKER)


def test_only_a_card_swavkit_wrote_is_recognised_and_replaced(tmp_path):
    # export (checkpoint.check_export_target) replaces a folder with our card and refuses one with the user's
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "config.json").write_text(json.dumps({"pretrained_cfg": {"tag": EXPORT_TAG}}))
    (ours / MODEL_CARD_FILE).write_text(full_card([]))
    assert is_swavkit_model_card(ours / MODEL_CARD_FILE)
    assert check_export_target(ours) == ours

    user_readme = tmp_path / "user" / "README.md"
    user_readme.parent.mkdir()
    user_readme.write_text("---\nlicense: mit\n---\n# My notes\n" + MODEL_CARD_MARKER + "\n")
    assert not is_swavkit_model_card(user_readme)  # the marker must follow the front matter directly
    assert not is_swavkit_model_card(tmp_path / "missing" / "README.md")
    (user_readme.parent / "config.json").write_text(json.dumps({"pretrained_cfg": {"tag": EXPORT_TAG}}))
    with pytest.raises(CheckpointError, match="did not write.*README.md"):
        check_export_target(user_readme.parent)
    assert user_readme.read_text().startswith("---\nlicense: mit")


def test_results_for_backbone_finds_its_own_records_and_matching_floors(tmp_path):
    run = tmp_path / "runs" / "swav"
    backbone = run / "backbone"
    backbone.mkdir(parents=True)
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    records = {
        "own-export": result(str(backbone), "resnet18", 71.8),
        "own-run-folder": result(str(run), "resnet18", 84.0, evaluation="linear"),
        "other-run": result(str(tmp_path / "runs" / "other" / "backbone"), "resnet18", 50.0),
        "floor-random": result("timm:resnet18", "resnet18", 60.1),
        "floor-pixels": result("pixels", "pixels", 79.8),
        "floor-wrong-size": result("timm:resnet18", "resnet18", 55.0, size_px=224),
        "floor-wrong-arch": result("timm:resnet50", "resnet50", 58.0),
        "floor-other-data": result("pixels", "pixels", 30.0, val_dir="/d/cifar/val"),
    }
    for name, record in records.items():
        (results_dir / f"{name}.json").write_text(json.dumps(record))
    (results_dir / "torn.json").write_text('{"schema": "swavkit-eval-v1", "metr')
    (results_dir / "foreign.json").write_text(json.dumps({"accuracy": 99}))

    found = results_for_backbone(backbone, results_dir)
    top1 = sorted(record["metrics"]["top1"] for record in found)
    assert top1 == [60.1, 71.8, 79.8, 84.0]
    assert {record["backbone"]["source"] for record in found[:2]} == {str(backbone), str(run)}  # own ones first
