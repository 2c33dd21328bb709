"""The memory plan (swavkit/training/memory_plan.py), the pre-flight check built on it, ``pretrain --plan``, and
what a plain folder gets without a recipe (issue 28; issue 30 point 4). Accuracy against measured peaks is
benchmarks/bench_memory_estimate.py's (a timed claim, not a test)."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
import torch
import yaml

import swavkit
from conftest import tiny_overrides, write_images
from swavkit.artifacts.layout import RUN_CONFIG_HEADER
from swavkit.api import build_config, pretrain_config
from swavkit.cli.main import main
from swavkit.config import ConfigError, load_config
from swavkit.core.model import build_model
from swavkit.training import memory_plan
from swavkit.training.memory_plan import ENV_HOST, format_bytes, parse_bytes, plan_memory

REPO = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path, out_dir: str = "run", **extra):
    return load_config([], tiny_overrides(tmp_path / "images", tmp_path / out_dir, **extra))


def test_model_state_is_counted_on_the_meta_device_and_split_by_fsdp(tmp_path):
    cfg = tiny_config(tmp_path)
    real = build_model("resnet10t", 10, 32, 16)
    n_params = sum(p.numel() for p in real.parameters())
    plan = plan_memory(cfg)
    assert plan.parameters_bytes == plan.gradients_bytes == plan.optimizer_bytes == 4 * n_params  # LARS: momentum
    # the head is built as training builds it: a second hidden layer (Linear 32->32 + BN) lands in the plan
    deeper = plan_memory(tiny_config(tmp_path, **{"model.head_dims": "[32,32]", "model.hidden_dim": 2048}))
    assert deeper.parameters_bytes - plan.parameters_bytes == 4 * (32 * 32 + 32 + 2 * 32)
    cfg.dist.strategy = "fsdp"
    cfg.train.batch_size = 16
    four, eight = plan_memory(cfg, processes=4), plan_memory(cfg, processes=8)
    prototypes = 4 * 10 * 16
    # 1/N of backbone and head per process, the prototypes whole (plus the full weights of the running units)
    shard_4, shard_8 = -(-(4 * n_params - prototypes) // 4), -(-(4 * n_params - prototypes) // 8)
    assert four.optimizer_bytes == shard_4 + prototypes and eight.optimizer_bytes == shard_8 + prototypes
    assert four.parameters_bytes - eight.parameters_bytes == shard_4 - shard_8
    assert four.gradients_bytes - eight.gradients_bytes == shard_4 - shard_8
    assert (four.per_process_batch, eight.per_process_batch) == (4, 2)


def test_activation_estimate_scales_with_batch_crops_precision_and_checkpointing(tmp_path):
    base = plan_memory(tiny_config(tmp_path))
    double = plan_memory(tiny_config(tmp_path, **{"train.batch_size": 16}))
    assert 1.8 < double.activations_bytes / base.activations_bytes < 2.2
    bigger = plan_memory(tiny_config(tmp_path, **{"crops.sizes_px": "[64,32]"}))
    assert bigger.activations_bytes > 3 * base.activations_bytes  # 4x the pixels
    checkpointed = plan_memory(tiny_config(tmp_path, **{"model.activation_checkpointing": "on"}))
    assert checkpointed.activations_bytes < 0.8 * base.activations_bytes
    # per image, bf16 autocast keeps about half the bytes (its cast weights are a constant: small batches lose)
    bf16 = [plan_memory(tiny_config(tmp_path, **{"train.batch_size": b}), precision="bf16") for b in (8, 16)]
    per_image_bf16 = bf16[1].activations_bytes - bf16[0].activations_bytes
    assert 0.3 < per_image_bf16 / (double.activations_bytes - base.activations_bytes) < 0.75
    workers = plan_memory(tiny_config(tmp_path, **{"data.num_workers": 2}))
    assert workers.workers_bytes > 0 == base.workers_bytes and workers.host_bytes > base.host_bytes


def test_a_recipe_that_does_not_fit_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys,
                                                                                     monkeypatch):
    write_images(tmp_path / "images", 16)
    monkeypatch.setenv(ENV_HOST, "200MB")
    assert main(["pretrain", *tiny_overrides(tmp_path / "images", tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "memory: one training step needs" in err and f"200.0 MiB is available ({ENV_HOST})" in err
    levers = ["--auto", "train.batch_size", "crops.sizes_px", "model.backbone", "model.activation_checkpointing=on",
              "more processes", "train.memory_check=false"]
    assert [err.index(lever) for lever in levers] == sorted(err.index(lever) for lever in levers)
    assert not (tmp_path / "run").exists()
    # the same run with memory to spare, and with the check switched off where it would refuse, trains
    monkeypatch.setenv(ENV_HOST, "64GB")
    assert swavkit.train(tiny_config(tmp_path), stop_after_steps=1, progress=False).step == 1
    monkeypatch.setenv(ENV_HOST, "200MB")  # the explicit key overrides the check
    unchecked = tiny_config(tmp_path, "b", **{"train.memory_check": "false"})
    assert memory_plan.check_memory(unchecked, torch.device("cpu"), 1, 1, "fp32") is None
    with pytest.raises(memory_plan.MemoryPlanError):
        memory_plan.check_memory(tiny_config(tmp_path), torch.device("cpu"), 1, 1, "fp32")


@pytest.mark.slow
def test_the_issues_plain_command_completes_on_this_machine(tmp_path, capsys):
    """Issue 28's command: the bundled sample's 500-image val split, one epoch, nothing else (derived: resnet10t,
    2x32 px, batch 64, 7 steps; it was the paper's recipe and killed at 23.9 GB)."""
    out = tmp_path / "oomtest"
    assert main(["pretrain", "--no-progress", f"out_dir={out}",
                 f"data.path={REPO / 'swavkit' / 'sample_data' / 'fashion_mnist' / 'val'}", "train.epochs=1"]) == 0
    assert "derived for this machine from 500 images" in capsys.readouterr().out
    assert (out / "backbone" / "model.safetensors").is_file()


def test_a_cuda_out_of_memory_error_in_the_step_is_the_same_one_line(tmp_path, capsys, monkeypatch):
    write_images(tmp_path / "images", 16)

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                          "capacity of 79.1 GiB\nof which 1.2 GiB is free.")

    monkeypatch.setattr("swavkit.training.loop.train_step", out_of_memory)
    assert main(["pretrain", "--no-progress", *tiny_overrides(tmp_path / "images", tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "out of GPU memory" in err and "at step 0" in err and "Traceback" not in err
    assert "model.activation_checkpointing=on" in err


def test_the_plan_of_seer_prints_per_process_bytes_without_allocating_the_model(capsys):
    rss_before_kib = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                              if line.startswith("VmRSS:")))
    argv = ["pretrain", "--config", str(REPO / "configs" / "seer_regnety_1.3b.yaml"), "--plan", "--procs", "512"]
    assert main([*argv, "--gpu-memory", "80GB"]) == 0  # SEER's 16 images per GPU
    out = capsys.readouterr().out
    assert "batch 16 per process, bf16, model on cuda" in out and "fits 80.0 GiB per GPU: yes" in out
    for row in ("parameters", "gradients", "optimiser state", "activations"):
        assert row in out
    assert main([*argv, "--gpu-memory", "2GB"]) == 1  # the same plan (traced once) against a small GPU
    assert "fits 2.00 GiB per GPU: NO" in capsys.readouterr().out
    # regnety_2560 is 1.3B parameters (5 GB in fp32): built for real it would show in the peak
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert peak_kib - rss_before_kib < 1.5 * 2**20


def test_sizes_parse_and_print_in_binary_units():
    assert parse_bytes("80GB", "x") == parse_bytes("80g", "x") == parse_bytes("80GiB", "x") == 80 * 2**30
    assert parse_bytes("4000000000", "x") == 4_000_000_000 and parse_bytes("1.5T", "x") == int(1.5 * 2**40)
    with pytest.raises(ConfigError, match="--gpu-memory: 'lots' is not a size"):
        parse_bytes("lots", "--gpu-memory")
    assert format_bytes(80 * 2**30) == "80.0 GiB" and format_bytes(3 * 2**20) == "3.00 MiB"
    available, source = memory_plan.host_available_bytes()
    assert available is None or available > 0 and source


def test_a_plain_folder_gets_derived_keys_and_a_recipe_or_no_auto_keeps_its_own(tmp_path, capsys):
    write_images(tmp_path / "images", 40)
    plain = pretrain_config(tmp_path / "images", tmp_path / "run", epochs=1)
    printed = capsys.readouterr().out
    assert "no recipe given (--config): derived for this machine" in printed and "model.backbone" in printed
    assert plain.model.backbone == "resnet10t" and plain.crops.sizes_px == [32] and plain.train.epochs == 1
    assert plain.model.n_prototypes == 10 and plain.train.batch_size == 8  # 40 images: a quarter of the data
    paper = pretrain_config(tmp_path / "images", config=REPO / "configs" / "imagenet_resnet50.yaml")
    assert paper.model.backbone == "resnet50" and paper.crops.sizes_px == [224, 96]
    schema = pretrain_config(tmp_path / "images", auto=False)
    assert schema.model.backbone == "resnet50" and schema.train.batch_size == 256
    set_by_user = pretrain_config(tmp_path / "images", backbone="resnet18", batch_size=4)
    assert set_by_user.model.backbone == "resnet18" and set_by_user.train.batch_size == 4
    with pytest.raises(ConfigError, match="unknown config key 'swav.epsilo'"):  # before the folder is read
        pretrain_config(tmp_path / "nowhere", **{"swav.epsilo": 0.1})
    assert main(["pretrain", "--auto", "--no-auto", f"data.path={tmp_path / 'images'}"]) == 2


def test_a_resume_takes_the_saved_config_instead_of_deriving_again(tmp_path, capsys):
    write_images(tmp_path / "images", 40)
    first = pretrain_config(tmp_path / "images", tmp_path / "run")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"")  # only its presence is read here
    # swavkit's own config.yaml (its header proves the run); another tool's is never read (test_run_folder.py)
    (tmp_path / "run" / "config.yaml").write_text(RUN_CONFIG_HEADER + yaml.safe_dump(swavkit.config.to_dict(first)))
    write_images(tmp_path / "images" / "more", 460, size_px=8, seed=1)  # derivation would now differ
    again = build_config([], [f"data.path={tmp_path / 'images'}", f"out_dir={tmp_path / 'run'}", "train.epochs=3"])
    assert "resuming the run" in capsys.readouterr().out
    assert again.model.n_prototypes == first.model.n_prototypes and again.train.batch_size == first.train.batch_size
    assert again.train.epochs == 3  # a key set now still wins
    restarted = build_config([], [f"data.path={tmp_path / 'images'}", f"out_dir={tmp_path / 'run'}"], restart=True)
    assert restarted.train.batch_size == 64 != first.train.batch_size  # derived again from 500 images
