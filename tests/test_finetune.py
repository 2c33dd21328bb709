"""Fine-tuning with few labels: the labelled subset, the two LR groups, the whole backbone trained, resume,
the result files, the run folder rule and the command line."""

import json
import os
import signal
import subprocess
from dataclasses import replace

import pytest
import torch
from PIL import Image

from evaluation_fixtures import one_thread, write_labelled_folders  # noqa: F401
from swavkit.artifacts.checkpoint import export_backbone, load_state
from swavkit.config import ConfigError
from swavkit.evaluation.finetune import (CHECKPOINT_FILE, FLOOR_FOLDER, FinetuneFolder, FinetuneOptions, build_finetune_optimizer,
                              evaluate_classifier, finetune, label_list_text, load_labelled_data, parse_label_spec, read_label_list,
                              resolve_recipe, run_finetune, select_labelled)
from swavkit.artifacts.preprocessing import resolve_preprocessing
from swavkit.artifacts.pretrained import load_backbone
from swavkit.evaluation.report import RESULT_KEYS
from swavkit.runtime.signals import StopRequest, StopRequested

# Seconds-long runs: 32 px images, batch 4, an explicit epoch count (the default would raise it to 500 steps).
TINY = dict(epochs=2, batch_size=4, image_size_px=32, num_workers=0, device="cpu", progress=False,
            checkpoint_interval_s=3600.0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_labelled_folders(tmp_path_factory.mktemp("data"), n_train=8, n_val=4, size_px=32)


def _classes(sizes: dict) -> tuple[list[str], list[int]]:
    relative, labels = [], []
    for label, (name, n) in enumerate(sizes.items()):
        relative += [f"{name}/img{i:03d}.png" for i in range(n)]
        labels += [label] * n
    return relative, labels


# ----------------------------------------------------------------------------------------------------
# the labelled subset

def test_label_spec_accepts_fraction_percent_and_per_class_and_refuses_the_rest():
    assert parse_label_spec("0.1").fraction == 0.1 and parse_label_spec("1%").fraction == 0.01
    assert parse_label_spec("1").fraction == 1.0 and parse_label_spec("10/class").per_class == 10
    for bad in ("0", "1.5", "-0.1", "ten", "0/class", "150%", ""):
        with pytest.raises(ConfigError, match="label-fraction"):
            parse_label_spec(bad)


def test_subset_is_stratified_seeded_and_respects_the_fraction():
    relative, labels = _classes({"a": 40, "b": 20, "c": 10, "d": 3})
    chosen = select_labelled(relative, labels, parse_label_spec("0.1"), seed=0)
    per_class = [sum(labels[i] == c for i in chosen) for c in range(4)]
    assert per_class == [4, 2, 1, 1]  # round(10 %), and every class keeps at least one image
    assert chosen == select_labelled(relative, labels, parse_label_spec("10%"), seed=0)  # same seed, same list
    assert chosen != select_labelled(relative, labels, parse_label_spec("0.1"), seed=1)
    ten_percent = set(select_labelled(relative, labels, parse_label_spec("0.25"), seed=0))
    assert set(chosen) <= ten_percent  # the smaller budget is part of the larger one (same seed)
    five = select_labelled(relative, labels, parse_label_spec("5/class"), seed=0)
    assert [sum(labels[i] == c for i in five) for c in range(4)] == [5, 5, 5, 3]  # a small class gives all


def test_subset_does_not_depend_on_the_other_files():
    relative, labels = _classes({"a": 40, "b": 20})
    spec = parse_label_spec("5/class")
    chosen = {relative[i] for i in select_labelled(relative, labels, spec, seed=3)}
    # delete every second file that was not chosen: a file's rank is its own, so the choice stays
    kept = [i for i, name in enumerate(relative) if name in chosen or i % 2]
    fewer = {relative[kept[j]] for j in select_labelled([relative[i] for i in kept], [labels[i] for i in kept],
                                                         spec, seed=3)}
    assert len(chosen) == 10 and fewer == chosen


def test_label_list_round_trip_and_unknown_file(tmp_path):
    relative = ["a/x.png", "a/line\nbreak.png", "b/y.png"]
    text = label_list_text(relative, [1, 2])
    assert text.count("\n") == 2  # a name with a newline stays on one line
    (tmp_path / "labels.txt").write_text(text, encoding="utf-8")
    assert read_label_list(tmp_path / "labels.txt", relative) == [1, 2]
    (tmp_path / "other.txt").write_text("a/x.png\nc/z.png\n", encoding="utf-8")
    from swavkit.data import DataError

    with pytest.raises(DataError, match="line 2: c/z.png"):
        read_label_list(tmp_path / "other.txt", relative)


# ----------------------------------------------------------------------------------------------------
# recipe and optimiser

def test_trunk_and_head_get_different_lrs_in_two_groups():
    backbone = load_backbone("timm:resnet10t")
    head = torch.nn.Linear(512, 10)
    ten = resolve_recipe(FinetuneOptions(batch_size=64, epochs=20), n_labelled=500, n_train=5000)
    one = resolve_recipe(FinetuneOptions(batch_size=64, epochs=20), n_labelled=50, n_train=5000)
    assert (ten.trunk_lr, ten.head_lr) == pytest.approx((0.01 * 64 / 256, 0.2 * 64 / 256))
    # the 10 % pair for every budget (the 1 % pair's head LR diverged on CIFAR, see the module docstring)
    assert (one.batch_size, one.trunk_lr, one.head_lr) == (50, pytest.approx(0.01 * 50 / 256),
                                                           pytest.approx(0.2 * 50 / 256))
    given = resolve_recipe(FinetuneOptions(batch_size=64, trunk_lr=0.02, head_lr=5.0), 500, 5000)
    assert (given.trunk_lr, given.head_lr, given.reference_lrs) == (0.02 / 4, 5.0 / 4, "given")
    assert ten.decay_epochs == [12, 16]  # the reference's epochs of a 20-epoch run
    optimizer = build_finetune_optimizer(backbone, head, ten)
    trunk, head_group = optimizer.param_groups
    assert trunk["lr"] != head_group["lr"] and head_group["lr"] / trunk["lr"] == pytest.approx(20.0)
    assert {id(p) for p in trunk["params"]} == {id(p) for p in backbone.parameters()}
    assert {id(p) for p in head_group["params"]} == {id(p) for p in head.parameters()}
    assert trunk["momentum"] == 0.9 and trunk["weight_decay"] == 0.0


def test_small_label_sets_get_enough_steps():
    recipe = resolve_recipe(FinetuneOptions(batch_size=64, min_steps=500), n_labelled=500, n_train=5000)
    assert recipe.epochs * (500 // 64) >= 500 and recipe.epochs == 72
    assert recipe.decay_epochs == [round(0.6 * 72), round(0.8 * 72)] and recipe.notes


# ----------------------------------------------------------------------------------------------------
# training

def _data(folders, options):
    train_dir, val_dir = folders
    return load_labelled_data(train_dir, val_dir, resolve_preprocessing("timm:resnet10t", 32), options)[0]


def _run(folders, out_dir, stop_request=None, **changes):
    options = FinetuneOptions(label_fraction="0.5", **{**TINY, **changes})
    data = _data(folders, options)
    recipe = resolve_recipe(options, len(data.indices), len(data.train))
    torch.manual_seed(0)
    backbone = load_backbone("timm:resnet10t")
    folder = FinetuneFolder(out_dir)
    folder.start({"test": 1}, label_list_text(data.relative, data.indices))
    return backbone, run_finetune(backbone, data, recipe, folder, options, "test", stop_request)


def test_the_whole_backbone_is_trained(folders, tmp_path):
    torch.manual_seed(0)
    before = {name: p.detach().clone() for name, p in load_backbone("timm:resnet10t").named_parameters()}
    # timm zero-initialises each block's last BN, so the first BN of a block only gets a gradient once that
    # one has moved: a few epochs at a larger trunk LR make sure the updates show in fp32.
    backbone, outcome = _run(folders, tmp_path / "run", epochs=3, trunk_lr=2.0)
    unchanged = [name for name, p in backbone.named_parameters() if torch.equal(p.detach(), before[name])]
    assert not unchanged, f"parameters that did not move: {unchanged[:5]}"
    assert outcome["completed"] and len(outcome["history"]) == 3
    assert outcome["metrics"]["top1"] >= 66.0  # colour classes, chance is 33 %


# Resume after kill -9 equals an uninterrupted run: tests/test_supervised.py (the loop fine-tuning shares with the
# reference linear probe); a SIGTERM saves after the batch and exits 3: test_cli_sigterm_exits_3_... below.


# ----------------------------------------------------------------------------------------------------
# the library call: result, label list, floors, run folder

def _sigterm_at_training_forward(n: int):
    """A forward hook that sends this process SIGTERM during the n-th training-mode forward pass."""
    calls = []

    def hook(module, inputs, output):
        if module.training:
            calls.append(1)
            if len(calls) == n:
                os.kill(os.getpid(), signal.SIGTERM)
    return hook


def test_a_checkpoint_with_the_old_rng_keys_still_resumes_to_the_same_result(folders, tmp_path):
    # checkpoints written before swavkit.runtime.rng saved a part epoch's RNG as {"cpu", "cuda"}; they must still resume
    _, straight = _run(folders, tmp_path / "straight", epochs=2)
    options = FinetuneOptions(label_fraction="0.5", **{**TINY, "epochs": 2})
    data = _data(folders, options)
    torch.manual_seed(0)
    backbone = load_backbone("timm:resnet10t")
    backbone.register_forward_hook(_sigterm_at_training_forward(2))  # the middle of epoch 1
    folder = FinetuneFolder(tmp_path / "resumed")
    folder.start({"test": 1}, label_list_text(data.relative, data.indices))
    with StopRequest() as stop_request, pytest.raises(StopRequested):
        run_finetune(backbone, data, resolve_recipe(options, 12, 24), folder, options, "test", stop_request)
    saved = load_state(folder.checkpoint)
    rng = saved["part_epoch"]["rng"]
    assert set(rng) == {"rng_cpu", "rng_cuda"}  # what swavkit.runtime.rng writes, like pretraining's TrainState
    saved["part_epoch"]["rng"] = {"cpu": rng["rng_cpu"], "cuda": rng["rng_cuda"]}
    torch.save(saved, folder.checkpoint)
    _, resumed = _run(folders, tmp_path / "resumed", epochs=2)
    assert resumed["resumed_from_epoch"] == 0 and resumed["history"] == straight["history"]
    assert resumed["metrics"] == straight["metrics"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 needs a GPU")
def test_fp16_fine_tunes_on_a_gpu_with_a_loss_scaler_and_resumes(folders, tmp_path):
    _, first = _run(folders, tmp_path / "run", epochs=2, device="cuda", precision="fp16", stop_after_epochs=1)
    saved = load_state(tmp_path / "run" / CHECKPOINT_FILE)
    assert not first["completed"] and saved["scaler"]["scale"] > 0  # the loss scale is part of the state
    _, second = _run(folders, tmp_path / "run", epochs=2, device="cuda", precision="fp16")
    assert second["completed"] and second["resumed_from_epoch"] == 1
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in second["history"])
    assert 0.0 <= second["metrics"]["top1"] <= 100.0


def test_finetune_writes_result_and_labels_with_the_random_init_floor(folders, tmp_path):
    export = export_backbone(load_backbone("timm:resnet10t"), tmp_path / "export", image_size_px=32,
                             mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    options = FinetuneOptions(label_fraction="0.5", out_dir=str(tmp_path / "run"),
                              out_json=str(tmp_path / "res" / "ft.json"), **{**TINY, "image_size_px": None})
    result = finetune(export, *folders, options)
    saved = json.loads((tmp_path / "res" / "ft.json").read_text())
    assert set(RESULT_KEYS) <= set(saved) and saved["evaluation"] == "finetune"
    assert saved["preprocessing"]["image_size_px"] == 32 and saved["preprocessing"]["mean"] == [0.5] * 3
    protocol = saved["protocol"]
    assert protocol["n_labelled"] == 12 and protocol["labelled_per_class"] == [4, 4, 4]
    assert protocol["trunk_lr"] < protocol["head_lr"] and protocol["epochs"] == 2
    labels = (tmp_path / "res" / "ft.labels.txt").read_text().splitlines()
    assert result["labels_path"] == str(tmp_path / "res" / "ft.labels.txt") and len(labels) == 12
    assert all((folders[0] / line).is_file() for line in labels)
    floor = saved["floors"]["random_init"]
    assert floor["source"] == "timm:resnet10t" and "top1" in floor
    assert (tmp_path / "run" / FLOOR_FOLDER / CHECKPOINT_FILE).is_file()
    # the written list reproduces the subset
    again = finetune(export, *folders, replace(options, labels_file=str(tmp_path / "res" / "ft.labels.txt"),
                                               out_json="", floors="off"))
    assert again["protocol"]["n_labelled"] == 12 and again["metrics"] == result["metrics"]


def test_auto_floors_count_the_labelled_images(folders, tmp_path, monkeypatch):
    import swavkit.evaluation.floors

    export = export_backbone(load_backbone("timm:resnet10t"), tmp_path / "export", image_size_px=32,
                             mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    monkeypatch.setattr(swavkit.evaluation.floors, "AUTO_MAX_TRAIN_IMAGES", 11)  # 12 labelled images: one too many
    result = finetune(export, *folders, FinetuneOptions(label_fraction="0.5", out_dir=str(tmp_path / "run"),
                                                        out_json="", **{**TINY, "image_size_px": None}))
    assert result["protocol"]["n_labelled"] == 12 and result["floors"] == {}
    assert not (tmp_path / "run" / FLOOR_FOLDER).exists()


def test_val_accuracy_is_scored_like_every_evaluation():
    # logits [4, 7] as the "images" of an identity model, over two batches; ties go to the lower class
    logits = torch.tensor([[0, 0, 0, 1, 0, 0, 0], [0, 1, 0, 0, 1, 0, 0], [6, 5, 4, 3, 2, 1, 0], [6, 5, 4, 3, 2, 1, 0]],
                          dtype=torch.float32)
    dataset = list(zip(logits, [3, 4, 6, 0]))  # hit, tie lost (top-5 hit), rank 7, hit
    metrics = evaluate_classifier(torch.nn.Identity(), dataset, torch.device("cpu"), batch_size=2, num_workers=0,
                                  dtype=None)
    assert metrics == {"top1": 50.0, "top5": 75.0}


def test_foreign_or_different_out_dir_is_refused_and_restart_deletes_only_its_own_files(folders, tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a swavkit fine-tune"):
        finetune("timm:resnet10t", *folders, FinetuneOptions(out_dir=str(user), out_json="", **TINY))
    assert (user / "notes.txt").read_text() == "keep me" and len(list(user.iterdir())) == 1

    run = tmp_path / "run"
    finetune("timm:resnet10t", *folders, FinetuneOptions(label_fraction="0.5", out_dir=str(run), out_json="", **TINY))
    with pytest.raises(ConfigError, match="different fine-tune.*--restart"):
        finetune("timm:resnet10t", *folders, FinetuneOptions(label_fraction="0.25", out_dir=str(run), out_json="",
                                                             **TINY))
    (run / "user.txt").write_text("mine")
    finetune("timm:resnet10t", *folders, FinetuneOptions(label_fraction="0.25", out_dir=str(run), out_json="",
                                                         restart=True, **TINY))
    assert (run / "user.txt").read_text() == "mine" and (run / CHECKPOINT_FILE).is_file()


def test_restart_keeps_a_users_own_random_init_folder(tmp_path):
    run = FinetuneFolder(tmp_path / "run")
    run.start({"test": 1}, "a/x.png\n")
    run.checkpoint.write_bytes(b"state")
    (run.path / FLOOR_FOLDER).mkdir()
    (run.path / FLOOR_FOLDER / "mine.txt").write_text("keep")  # not a fine-tune: the restart leaves it
    (run.path / "notes.txt").write_text("keep too")
    FinetuneFolder(run.path).discard()
    assert sorted(p.name for p in run.path.iterdir()) == ["notes.txt", FLOOR_FOLDER]
    assert (run.path / FLOOR_FOLDER / "mine.txt").read_text() == "keep"


def test_the_floor_is_discarded_with_its_run(tmp_path):
    run = FinetuneFolder(tmp_path / "run")
    run.start({"test": 1}, "")
    floor = FinetuneFolder(run.path / FLOOR_FOLDER)
    floor.start({"test": 2}, "")
    floor.checkpoint.write_bytes(b"state")
    FinetuneFolder(run.path).discard()
    assert list(run.path.iterdir()) == []


def _finetune_worker(rank, world, port, folders, tmp_path):
    from test_distributed import _set_env

    from swavkit.runtime import distributed

    _set_env(rank, world, port)
    distributed.init("cpu")
    options = FinetuneOptions(label_fraction="0.5", out_dir=str(tmp_path / "run"), out_json=str(tmp_path / "ft.json"),
                              floors="off", **TINY)
    result = finetune("timm:resnet10t", *folders, options)
    torch.save({"completed": result["completed"], "history": result["history"]}, tmp_path / f"rank{rank}.pt")
    distributed.shutdown()


@pytest.mark.slow
def test_two_gloo_processes_fine_tune_with_the_batch_split_and_one_writer(folders, tmp_path):
    import torch.multiprocessing as mp
    from test_distributed import free_port

    # forked, not spawned: the workers need no second import of torch
    mp.start_processes(_finetune_worker, args=(2, free_port(), folders, tmp_path), nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert ranks[0]["completed"] and ranks[0]["history"] == ranks[1]["history"]  # losses all-reduced every step
    saved = json.loads((tmp_path / "ft.json").read_text())
    assert saved["protocol"]["n_labelled"] == 12 and saved["history"] == ranks[0]["history"]
    assert load_state(tmp_path / "run" / CHECKPOINT_FILE)["epoch"] == 2  # 12 images at global batch 4: 3 steps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft.json", "ft.labels.txt", "rank0.pt", "rank1.pt", "run"]


def test_fine_tuning_augments_like_the_linear_probe(folders):
    from swavkit.evaluation.linear_probe import train_transform

    preprocessing = resolve_preprocessing("timm:resnet10t", 32)
    options = FinetuneOptions(label_fraction="0.5", min_crop_scale=0.3, **TINY)
    train_dir, val_dir = folders
    data = load_labelled_data(train_dir, val_dir, preprocessing, options)[0]
    probe = train_transform(preprocessing, min_crop_scale=0.3)
    image = Image.open(data.train.paths[0]).convert("RGB")
    torch.manual_seed(5)
    ours = data.train.transform(image)
    torch.manual_seed(5)
    assert torch.equal(ours, probe(image))  # the same crop for the same seed: one definition


# ----------------------------------------------------------------------------------------------------
# command line

def _cli(*args, cwd, monkeypatch, capsys):
    """``swavkit finetune ARGS`` in this process (a subprocess would spend ~10 s importing torch here)."""
    from swavkit.cli.main import main

    monkeypatch.chdir(cwd)
    code = main(["finetune", *args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def test_cli_runs_and_prints_a_table(folders, tmp_path, monkeypatch, capsys):
    train_dir, val_dir = folders
    done = _cli("--backbone", "timm:resnet10t", "--train", str(train_dir), "--val", str(val_dir), "--label-fraction",
                "2/class", "--epochs", "1", "--batch-size", "4", "--image-size", "32", "--workers", "0",
                "--no-progress", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert done.returncode == 0, done.stderr
    assert "2/class: 6 of 24 train images" in done.stdout and "top1 %" in done.stdout
    results = sorted((tmp_path / "results").iterdir())
    assert [p.suffixes[-2:] for p in results] == [[".json"], [".labels", ".txt"]]
    assert (tmp_path / "runs" / "finetune-timm-resnet10t-2-class-seed0" / CHECKPOINT_FILE).is_file()


def test_cli_sigterm_exits_3_with_the_state_saved_and_the_same_command_resumes(folders, tmp_path, monkeypatch,
                                                                               capsys):
    import swavkit.evaluation.supervised

    train_dir, val_dir = folders
    args = ("--backbone", "timm:resnet10t", "--train", str(train_dir), "--val", str(val_dir), "--label-fraction",
            "4/class", "--epochs", "2", "--batch-size", "4", "--image-size", "32", "--workers", "0", "--no-progress",
            "--out-dir", "ft")
    one_step = swavkit.evaluation.supervised._step

    def signalled_step(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # caught, deferred: the run stops after this batch
        return one_step(*a, **k)

    handler_before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(swavkit.evaluation.supervised, "_step", signalled_step)
    done = _cli(*args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert done.returncode == 3, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("swavkit finetune: stopped by SIGTERM at epoch 1, batch 1/3")
    assert load_state(tmp_path / "ft" / CHECKPOINT_FILE)["part_epoch"]["batches"] == 1
    assert not (tmp_path / "results").exists()
    monkeypatch.setattr(swavkit.evaluation.supervised, "_step", one_step)
    done = _cli(*args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert done.returncode == 0, done.stderr
    assert signal.getsignal(signal.SIGTERM) == handler_before  # swavkit's handler only while it runs
    saved = load_state(tmp_path / "ft" / CHECKPOINT_FILE)
    assert saved["epoch"] == 2 and "part_epoch" not in saved


@pytest.mark.parametrize("args, message", [
    (["--label-fraction", "2"], "--label-fraction '2': expected a fraction"),
    (["--label-fraction", "0.5", "--train", "missing"], "missing: folder does not exist"),
])
def test_cli_user_errors_are_one_line(folders, tmp_path, monkeypatch, capsys, args, message):
    train_dir, val_dir = folders
    base = ["--backbone", "timm:resnet10t", "--train", str(train_dir), "--val", str(val_dir), "--image-size", "32"]
    done = _cli(*base, *args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("swavkit finetune: error:") and message in lines[0], done.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--workers", "-1", "expected an integer >= 0"), ("--workers", "two", "expected an integer >= 0"),
    ("--batch-size", "0", "expected a positive integer"), ("--head-lr", "-0.1", "expected a positive number"),
    ("--precision", "fp8", "invalid choice"),
])
def test_cli_argument_types_are_the_shared_ones(flag, value, message, capsys):
    from swavkit.cli.main import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["finetune", "--backbone", "b", "--train", "t", "--val", "v", flag, value])
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_cli_offers_the_precisions_of_the_other_evaluations():
    from swavkit.cli.main import build_parser

    def choices(command: str) -> tuple:
        sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
        return tuple(next(a for a in sub._actions if a.dest == "precision").choices)

    assert choices("finetune") == choices("knn") == choices("linear") == ("auto", "fp32", "bf16", "fp16")
    args = build_parser().parse_args(["finetune", "--backbone", "b", "--train", "t", "--val", "v", "--workers", "0",
                                      "--precision", "fp16"])
    assert (args.workers, args.precision) == (0, "fp16")


def test_fp16_on_a_cpu_is_refused_in_one_line_before_anything_is_written(folders, tmp_path, monkeypatch, capsys):
    train_dir, val_dir = folders
    done = _cli("--backbone", "timm:resnet10t", "--train", str(train_dir), "--val", str(val_dir), "--image-size",
                "32", "--workers", "0", "--device", "cpu", "--precision", "fp16", cwd=tmp_path,
                monkeypatch=monkeypatch, capsys=capsys)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "fp16 needs a GPU" in lines[0], done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["finetune", "knn"])
@pytest.mark.parametrize("given, wanted", [([], "auto"), (["--floors"], "on"), (["--floors", "off"], "off"),
                                           (["--floors", "on"], "on"), (["--no-floors"], "off")])
def test_floors_flag_is_the_same_auto_on_off_choice_as_knn(command, given, wanted):
    from swavkit.cli.main import build_parser

    args = build_parser().parse_args([command, "--backbone", "b", "--train", "t", "--val", "v", *given])
    assert args.floors == wanted


def test_floors_flag_refuses_other_values(capsys):
    from swavkit.cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--backbone", "b", "--train", "t", "--val", "v", "--floors", "yes"])
    assert "invalid choice: 'yes' (choose from" in capsys.readouterr().err
