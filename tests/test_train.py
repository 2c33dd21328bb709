"""End-to-end training contracts: resume == uninterrupted, export round trip, run-directory layout."""

import json
import math
import shutil
import subprocess
import sys

import pytest
import timm
import torch

from conftest import tiny_overrides
from swavkit import load_backbone
from swavkit.cli.main import main
from swavkit.artifacts.checkpoint import load_training_checkpoint
from swavkit.config import ConfigError, load_config
from swavkit.training.trainer import train


def run(overrides, **kwargs):
    return train(load_config([], overrides), progress=False, **kwargs)


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{key} differs")


def test_resume_equals_uninterrupted(image_folder, tmp_path):
    # Queue of 16 (2 batches) from epoch 0, used once full; 3 epochs x 4 steps; interruptions mid-epoch.
    extra = {"train.epochs": 3, "swav.queue_length": 16, "swav.queue_start_epoch": 0}
    full = run(tiny_overrides(image_folder, tmp_path / "full", **extra))
    assert full.completed and full.step == 12

    parts = tmp_path / "parts"
    first = run(tiny_overrides(image_folder, parts, **extra), stop_after_steps=3)
    assert not first.completed and first.step == 3
    second = run(tiny_overrides(image_folder, parts, **extra), stop_after_steps=6)
    assert second.step == 6
    last = run(tiny_overrides(image_folder, parts, **extra))
    assert last.completed and last.step == 12

    a = load_training_checkpoint(full.checkpoint)
    b = load_training_checkpoint(last.checkpoint)
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["per_rank"][0]["queue"], b["per_rank"][0]["queue"])
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert_same_state(pa, pb)
    assert full.final_loss == pytest.approx(last.final_loss, abs=1e-6)


def test_run_directory_and_export_round_trip(image_folder, tmp_path):
    result = run(tiny_overrides(image_folder, tmp_path / "run"))
    out = tmp_path / "run"
    assert (out / "config.yaml").is_file() and result.checkpoint == out / "checkpoints" / "last.pt"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and {"step", "epoch", "loss", "lr", "images_per_s", "data_wait_fraction", "prototypes_used",
                     "ln_k"} <= rows[-1].keys()
    assert all(0.0 <= r["data_wait_fraction"] <= 1.0 for r in rows)

    # timm loads the export by itself, strictly, with identical outputs
    net = timm.create_model(f"local-dir:{out / 'backbone'}", pretrained=True).eval()
    ours = load_backbone(out / "backbone")
    from_checkpoint = load_backbone(out / "checkpoints" / "last.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ours(x), rtol=0, atol=0)
        torch.testing.assert_close(net(x), from_checkpoint(x), rtol=0, atol=0)
    missing, unexpected = net.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and not unexpected

    # `swavkit export` gives the same folder layout from the checkpoint (in this process: test_cli_end_to_end
    # runs `python -m swavkit` itself)
    exported = tmp_path / "exported"
    assert main(["export", str(result.checkpoint), str(exported)]) == 0
    again = timm.create_model(f"local-dir:{exported}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), net(x), rtol=0, atol=0)


def test_same_out_dir_with_other_config_refuses_then_restart(image_folder, tmp_path):
    run(tiny_overrides(image_folder, tmp_path / "r", **{"train.epochs": 1}))
    with pytest.raises(ConfigError, match="different config.*model.n_prototypes"):
        run(tiny_overrides(image_folder, tmp_path / "r", **{"model.n_prototypes": 7}))
    restarted = train(load_config([], tiny_overrides(image_folder, tmp_path / "r", **{"model.n_prototypes": 7,
                                                                                        "train.epochs": 1})),
                      restart=True, progress=False)
    assert restarted.completed and restarted.step == 4


@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_cli_end_to_end(layout, image_folder, nested_image_folder, tmp_path, capsys):
    data = image_folder if layout == "flat" else nested_image_folder
    out = tmp_path / "cli"
    argv = ["pretrain", "--no-progress", *tiny_overrides(data, out, **{"train.epochs": 1})]
    if layout == "flat":  # a real `python -m swavkit` process
        proc = subprocess.run([sys.executable, "-m", "swavkit", *argv], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        stdout = proc.stdout
    else:  # the same command in this process: what the nested layout changes is the folder walk, not the process
        assert main(argv) == 0
        stdout = capsys.readouterr().out
    assert "32 images" in stdout
    assert f"checkpoint: {out / 'checkpoints' / 'last.pt'}" in stdout
    assert f"backbone:   {out / 'backbone'}" in stdout
    assert (out / "backbone" / "model.safetensors").is_file() and (out / "backbone" / "config.json").is_file()


def test_bf16_channels_last_and_vit_with_adamw(image_folder, tmp_path, capsys):
    # 40/32 px crops: no 1x1 map reaches a stride-2 convolution (see test_cpu_bf16_tiny_crops_are_guarded)
    result = run(tiny_overrides(image_folder, tmp_path / "bf16", **{"train.epochs": 1, "train.precision": "bf16",
                                                                     "model.channels_last": "true",
                                                                     "crops.sizes_px": "[40,32]"}))
    assert result.completed and math.isfinite(result.final_loss) and result.final_loss < 2 * math.log(10)
    assert "warning: train.precision=bf16 on CPU" not in capsys.readouterr().out
    vit = run(tiny_overrides(image_folder, tmp_path / "vit", **{"train.epochs": 1, "model.backbone": "test_vit"}))
    printed = capsys.readouterr().out
    assert vit.completed and "optimiser: adamw, peak LR 1.563e-05" in printed
    assert "AdamW reference 0.0005 x 8/256" in printed
    assert "warning: crops.sizes_px[0]" not in printed
    net = timm.create_model(f"local-dir:{vit.backbone_dir}", pretrained=True).eval()
    with torch.no_grad():  # the export keeps dynamic_img_size: both crop sizes still work
        assert net(torch.randn(1, 3, 32, 32)).shape == net(torch.randn(1, 3, 16, 16)).shape


def test_cpu_bf16_tiny_crops_are_guarded(image_folder, tmp_path, capsys):
    """torch's CPU bf16 weight gradient of a stride-2 3x3 convolution on a 1x1 map (resnet10t's last stage
    on 16 px crops) is mostly garbage: the run warns up front, and the gradient check keeps every bad
    step out of the weights."""
    result = run(tiny_overrides(image_folder, tmp_path / "bf16", **{"train.epochs": 1, "train.precision": "bf16",
                                                                     "train.skip_nonfinite_steps": 100}))
    printed = capsys.readouterr().out
    assert "warning: train.precision=bf16 on CPU with 16 px crops" in printed
    state = load_training_checkpoint(result.checkpoint)["model"]
    assert result.completed and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_online_knn_monitoring_is_logged(image_folder, tmp_path):
    from evaluation_fixtures import write_labelled_folders

    write_labelled_folders(tmp_path / "labelled", n_train=6, n_val=3, size_px=32)
    run(tiny_overrides(image_folder, tmp_path / "mon", **{"train.epochs": 2, "monitor.knn_data": tmp_path / "labelled",
                                                           "monitor.every_epochs": 1, "monitor.k": 5}))
    rows = [json.loads(line) for line in (tmp_path / "mon" / "metrics.jsonl").read_text().splitlines()]
    knn_rows = [r for r in rows if "knn_top1" in r]
    assert [r["epoch"] for r in knn_rows] == [1, 2]
    assert all(r["knn_top1"] >= 66.0 for r in knn_rows)  # colour classes: far above chance (33 %)
    with pytest.raises(Exception, match="missing"):
        run(tiny_overrides(image_folder, tmp_path / "mon2", **{"monitor.knn_data": tmp_path / "missing"}))


def test_colour_on_device_trains_the_same_model(image_folder, tmp_path):
    """The colour half moved from the collate function to the training loop: same crops, same weights."""
    extra = {"crops.blur_probability": 0.5, "train.device": "cpu"}  # bitwise: the same arithmetic on one device
    workers = run(tiny_overrides(image_folder, tmp_path / "workers", **extra))
    device = run(tiny_overrides(image_folder, tmp_path / "device", **extra, **{"data.colour_on_device": "true"}))
    assert_same_state(load_training_checkpoint(workers.checkpoint)["model"],
                      load_training_checkpoint(device.checkpoint)["model"])


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_backbone_trains_like_eager(image_folder, tmp_path):
    """model.compile=true (static shapes, one graph per crop resolution) learns what eager learns."""
    from torch._dynamo.utils import counters

    extra = {"train.epochs": 1, "train.device": "cpu"}
    eager = run(tiny_overrides(image_folder, tmp_path / "eager", **extra))
    torch._dynamo.reset()
    counters.clear()
    compiled = run(tiny_overrides(image_folder, tmp_path / "compiled", **extra, **{"model.compile": "true"}))
    assert compiled.completed and compiled.step == eager.step == 4
    assert counters["stats"]["unique_graphs"] == 2  # one static graph per crop resolution (32 and 16 px)
    a = load_training_checkpoint(eager.checkpoint)["model"]
    b = load_training_checkpoint(compiled.checkpoint)["model"]
    assert a.keys() == b.keys()  # compile must not rename the saved weights (no _orig_mod. prefix)
    worst = max(float((b[k].float() - a[k].float()).abs().max()) for k in a)
    assert worst <= 1e-4, worst
