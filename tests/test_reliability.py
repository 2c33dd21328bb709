"""Issue 6: bad images, bad checkpoints, kills, signals, non-finite losses, dying workers."""

from __future__ import annotations

import importlib
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from bad_images import make_bad_folder
from conftest import tiny_overrides, write_images
from swavkit.artifacts.checkpoint import CheckpointError, load_state, load_training_checkpoint, save_atomic
from swavkit.config import load_config
from swavkit.data import DataError, UnlabeledImageFolder, find_images, read_rgb, read_skipped_report
from swavkit.runtime.cores import cpu_training_threads
from swavkit.runtime.fileio import read_jsonl
from swavkit.training.trainer import TrainingDiverged, train


def cli(*args, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "swavkit", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def one_line_error(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def in_process_error(capsys, *args) -> str:
    """Like one_line_error, without paying a new interpreter for every case."""
    from swavkit.cli.main import main

    assert main([str(a) for a in args]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


# --------------------------------------------------------------------------------------------------
# bad input

def test_unusual_images_decode_to_rgb(tmp_path):
    readable, unreadable = make_bad_folder(tmp_path / "bad")
    found = {str(Path(p).relative_to(tmp_path / "bad")) for p in find_images(tmp_path / "bad")}
    assert readable | unreadable == found  # every file once, the loop not followed twice
    for name in readable:
        image = read_rgb(tmp_path / "bad" / name)
        assert image.mode == "RGB" and min(image.size) >= 1
    assert read_rgb(tmp_path / "bad" / "exif_rotated.jpg").size == (20, 40)  # orientation applied
    grey16 = read_rgb(tmp_path / "bad" / "sixteen_bit.png")
    assert 0 < max(grey16.getextrema()[0]) <= 255 and grey16.getextrema()[0][1] > 200  # scaled, not clipped


def test_dataset_skips_exactly_the_unreadable_files(tmp_path):
    readable, unreadable = make_bad_folder(tmp_path / "bad")
    dataset = UnlabeledImageFolder(tmp_path / "bad")
    skipped = {Path(p).name for i in range(len(dataset)) for p, _ in dataset[i][2]}
    assert skipped == unreadable


def test_training_on_a_dirty_folder_skips_and_lists(tmp_path):
    root = tmp_path / "dirty"
    readable, unreadable = make_bad_folder(root)
    write_images(root / "good", 16)
    out = tmp_path / "run"
    result = train(load_config([], tiny_overrides(root, out, **{"train.epochs": 2})), progress=False)
    assert result.completed
    listed = {Path(path).name for path, _ in read_skipped_report(out / "skipped.txt")}
    assert listed and listed <= unreadable
    assert all("\t" in line for line in (out / "skipped.txt").read_text().splitlines())  # path <TAB> reason


@pytest.mark.parametrize("case", ["missing", "file", "empty", "all_broken"])
def test_unusable_data_folder_is_one_line_exit_2(tmp_path, capsys, case):
    target = tmp_path / "data"
    if case == "file":
        target.write_text("x")
    elif case == "empty":
        (target / "sub").mkdir(parents=True)
        (target / "readme.txt").write_text("no images")
    elif case == "all_broken":
        target.mkdir()
        for i in range(3):
            (target / f"x{i}.jpg").write_text("not an image")
    message = in_process_error(capsys, "pretrain", *tiny_overrides(target, tmp_path / "out"))
    assert str(target) in message


# --------------------------------------------------------------------------------------------------
# checkpoints

class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "swavkit-train-v1", "payload": _RunsCode(marker)}, evil, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="refused"):
        load_state(evil)
    message = in_process_error(capsys, "export", evil, tmp_path / "out")
    assert "refused" in message
    assert not marker.exists()


def test_truncated_and_tampered_checkpoints_are_refused(tmp_path):
    good = save_atomic({"format": "swavkit-train-v1", "w": torch.randn(4096)}, tmp_path / "good.pt")
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    tampered = bytearray(data)
    tampered[len(data) // 2] ^= 0x01  # one bit inside the tensor data
    (tmp_path / "tampered.pt").write_bytes(bytes(tampered))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_state(tmp_path / "truncated.pt")
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_state(tmp_path / "tampered.pt")
    assert torch.equal(load_state(good)["w"], torch.load(good)["w"])


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_atomic({"format": "swavkit-train-v1", "step": 1}, tmp_path / "last.pt")

    def disk_full(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        save_atomic({"format": "swavkit-train-v1", "step": 2}, path)
    monkeypatch.undo()
    assert load_state(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


# --------------------------------------------------------------------------------------------------
# faults during training

def _wait_for_step(checkpoint: Path, proc, at_least: int, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            return
        try:
            if checkpoint.exists() and load_training_checkpoint(checkpoint)["step"] >= at_least:
                return
        except CheckpointError:
            pass  # caught between writes of a very small file: try again
        time.sleep(0.05)
    raise AssertionError("training made no progress")


def test_sigkill_at_random_points_then_resume_equals_uninterrupted(image_folder, tmp_path):
    extra = {"train.epochs": 3, "train.checkpoint_every_steps": 1, "swav.queue_length": 16,
             "swav.queue_start_epoch": 1}
    reference = train(load_config([], tiny_overrides(image_folder, tmp_path / "ref", **extra)), progress=False)
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "swavkit", "pretrain", "--no-progress", *tiny_overrides(image_folder, out, **extra)]
    # bitwise equality needs the reference's thread count in the child processes too: the count train() ran
    # the reference with (OMP_NUM_THREADS when set, else swavkit's own rule), not this process's (conftest's),
    # which differ on a machine with more than 2 cores
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(cpu_training_threads())}
    checkpoint = out / "checkpoints" / "last.pt"
    rng = random.Random(1234)
    kills = 0
    for target in (2, 5, 8):
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        _wait_for_step(checkpoint, proc, target)
        time.sleep(rng.uniform(0.0, 0.3))  # anywhere in the next step, saving included
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.wait()
    assert kills >= 2
    final = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert final.returncode == 0, final.stderr[-2000:]
    a, b = load_training_checkpoint(reference.checkpoint), load_training_checkpoint(checkpoint)
    assert b["step"] == a["step"] == 12
    # every step has at most one metrics row, whatever the kills repeated, and they are the reference's
    logged = [row["step"] for row in read_jsonl(out / "metrics.jsonl") if "loss" in row]
    assert logged == sorted(set(logged)) == [row["step"] for row in read_jsonl(reference.out_dir / "metrics.jsonl")
                                             if "loss" in row]
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=0, atol=0, msg=key)


def test_sigterm_saves_and_exits_cleanly(image_folder, tmp_path):
    out = tmp_path / "term"
    command = [sys.executable, "-m", "swavkit", "pretrain", "--no-progress",
               *tiny_overrides(image_folder, out, **{"train.epochs": 20, "train.checkpoint_every_steps": 1})]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(out / "checkpoints" / "last.pt", proc, 2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 3, stderr[-2000:]
    assert "Traceback" not in stderr and "stopped at step" in stdout and "SIGTERM" in stdout
    saved = load_training_checkpoint(out / "checkpoints" / "last.pt")["step"]
    assert f"stopped at step {saved}/80" in stdout


def _assert_saved_equals_clean_run(image_folder, tmp_path, steps: int) -> None:
    """The checkpoint a refused step left in tmp_path/nan holds exactly the weights of a clean run stopped
    after ``steps`` steps: nothing of the bad step reached the model."""
    saved = load_training_checkpoint(tmp_path / "nan" / "checkpoints" / "last.pt")
    good = train(load_config([], tiny_overrides(image_folder, tmp_path / "good")), progress=False,
                 stop_after_steps=steps)
    reference = load_training_checkpoint(good.checkpoint)
    assert saved["step"] == steps
    for key in reference["model"]:
        torch.testing.assert_close(saved["model"][key], reference["model"][key], rtol=0, atol=0)


def test_non_finite_loss_stops_after_saving_last_good_state(image_folder, tmp_path, monkeypatch):
    import swavkit.training.step as step_module  # the training step computes the loss

    real_loss = step_module.swapped_prediction_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(step_module, "swapped_prediction_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="step 2.*learning rate"):
        train(load_config([], tiny_overrides(image_folder, tmp_path / "nan")), progress=False)
    monkeypatch.setattr(step_module, "swapped_prediction_loss", real_loss)
    _assert_saved_equals_clean_run(image_folder, tmp_path, steps=2)

    # with skip_nonfinite_steps=1 the bad step is skipped and training finishes
    calls["n"] = 0
    monkeypatch.setattr(step_module, "swapped_prediction_loss", poisoned)
    result = train(load_config([], tiny_overrides(image_folder, tmp_path / "skip", **{"train.skip_nonfinite_steps": 1})),
                   progress=False)
    assert result.completed and load_training_checkpoint(result.checkpoint)["nonfinite_skipped"] == 1


def test_non_finite_gradient_is_never_applied(image_folder, tmp_path, monkeypatch):
    """A finite loss whose backward returns NaN (a broken kernel, an fp overflow in one layer): the step is
    refused like a non-finite loss, naming the parameter, and the saved state is the last good one."""
    train_module = importlib.import_module("swavkit.training.trainer")  # the module (swavkit.train is the function)

    real_build = train_module.build_model
    calls = {"n": 0}

    def build_with_poisoned_gradient(*args, **kwargs):
        model = real_build(*args, **kwargs)

        def poison(grad):
            calls["n"] += 1
            return grad * float("nan") if calls["n"] == 3 else grad

        model.head.layers[0].weight.register_hook(poison)
        return model

    monkeypatch.setattr(train_module, "build_model", build_with_poisoned_gradient)
    with pytest.raises(TrainingDiverged, match=r"non-finite gradient \(head\.layers\.0\.weight\) at step 2"):
        train(load_config([], tiny_overrides(image_folder, tmp_path / "nan")), progress=False)
    monkeypatch.setattr(train_module, "build_model", real_build)
    _assert_saved_equals_clean_run(image_folder, tmp_path, steps=2)


def test_dying_worker_names_the_file(image_folder, tmp_path):
    write_images(image_folder / "z", 1)
    poison = next((image_folder / "z").iterdir())
    script = textwrap.dedent(f"""
        import os, sys
        import swavkit.data.datasets as datasets  # the module whose read_rgb the training dataset calls
        real = datasets.read_rgb
        def read(path):
            if str(path) == {str(poison)!r}:
                os.kill(os.getpid(), 9)  # what a decoder segfault looks like from outside
            return real(path)
        datasets.read_rgb = read
        from swavkit.cli.main import main
        sys.exit(main(sys.argv[1:]))
    """)
    proc = subprocess.run([sys.executable, "-c", script, "pretrain", "--no-progress",
                           *tiny_overrides(image_folder, tmp_path / "w", **{"data.num_workers": 1})],
                          capture_output=True, text=True, timeout=180)
    message = one_line_error(proc)
    assert "worker" in message and str(poison) in message
