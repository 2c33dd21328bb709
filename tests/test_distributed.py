"""Two gloo processes on CPU: distributed results equal single-process results."""

import importlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import tiny_overrides
from gloo_pair import PairTimeout
from swavkit.runtime import distributed
from swavkit.artifacts.checkpoint import load_training_checkpoint
from swavkit.config import load_config
from swavkit.core.sinkhorn import sinkhorn
from swavkit.training.trainer import train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_env(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)


def _sinkhorn_worker(rank, world, port, scores, out_dir):
    _set_env(rank, world, port)
    distributed.init("cpu")
    half = scores.shape[0] // world
    codes = sinkhorn(scores[rank * half:(rank + 1) * half], 0.05, 3)
    torch.save(codes, os.path.join(out_dir, f"codes{rank}.pt"))
    distributed.shutdown()


def test_sinkhorn_two_ranks_equals_one(tmp_path, gloo_pair):
    g = torch.Generator().manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(64, 8, generator=g), dim=1) @ \
        torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=1).t()
    gloo_pair.run(_sinkhorn_worker, scores, str(tmp_path))
    together = torch.cat([torch.load(tmp_path / f"codes{r}.pt") for r in range(2)])
    torch.testing.assert_close(together, sinkhorn(scores, 0.05, 3), rtol=0, atol=1e-6)


def _sinkhorn_one_rank_falls_back_worker(rank, world, port, scores, out_dir):
    _set_env(rank, world, port)
    distributed.init("cpu")
    module = importlib.import_module("swavkit.core.sinkhorn")  # the package's `sinkhorn` attribute is the function

    scaled = module._scaled_codes
    if rank == 1:  # this rank's scalings "overflow": it needs the log-domain fallback, rank 0 does not
        def overflowing(*args, **kwargs):
            codes, check = scaled(*args, **kwargs)
            return codes.fill_(float("nan")), check.fill_(float("nan"))

        module._scaled_codes = overflowing
    try:
        half = scores.shape[0] // world
        codes = module.sinkhorn(scores[rank * half:(rank + 1) * half], 0.05, 3)
    finally:
        module._scaled_codes = scaled  # the process runs later tests' jobs (tests/gloo_pair.py)
    torch.save(codes, os.path.join(out_dir, f"codes{rank}.pt"))
    distributed.shutdown()


def test_sinkhorn_fallback_on_one_rank_is_taken_by_all(tmp_path, gloo_pair):
    """The fallback runs its own all-reduces: if only one rank took it, the ranks' collectives would not
    match (gloo then fails at once; NCCL can wait forever)."""
    g = torch.Generator().manual_seed(1)
    scores = torch.nn.functional.normalize(torch.randn(64, 8, generator=g), dim=1) @ \
        torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=1).t()
    try:
        gloo_pair.run(_sinkhorn_one_rank_falls_back_worker, scores, str(tmp_path), timeout_s=90)
    except PairTimeout:
        pytest.fail("the ranks deadlocked: one took the fallback, the other did not")
    # (a rank that raised, e.g. on a collective mismatch, makes run() above raise instead)
    together = torch.cat([torch.load(tmp_path / f"codes{r}.pt") for r in range(2)])
    torch.testing.assert_close(together, sinkhorn(scores, 0.05, 3), rtol=0, atol=1e-5)


# BatchNorm statistics are per process without SyncBN (which needs GPUs), so the equivalence test uses a
# GroupNorm backbone and a head without BN: then the only cross-rank coupling is what we test, namely
# Sinkhorn's sums, DDP's gradient averaging and the sampler's split of the global batch.
EQUIVALENCE = {"model.backbone": "test_efficientnet_gn", "model.hidden_dim": 0, "train.epochs": 1,
               "swav.freeze_prototypes_epochs": 0, "train.checkpoint_every_steps": 1}


def _train_worker(rank, world, port, overrides, stop_after_steps):
    _set_env(rank, world, port)
    train(load_config([], overrides), progress=False, stop_after_steps=stop_after_steps)
    distributed.shutdown()


def test_training_steps_two_ranks_equal_one(image_folder, tmp_path, gloo_pair):
    single = train(load_config([], tiny_overrides(image_folder, tmp_path / "one", **EQUIVALENCE)), progress=False,
                   stop_after_steps=2)
    # The two ranks also take the route GPUs take by default (colour ops in the training loop, not the
    # workers); it gives the same views, so the weights must still match the one-process run.
    two_ranks = tiny_overrides(image_folder, tmp_path / "two", **EQUIVALENCE, **{"data.colour_on_device": "true"})
    gloo_pair.run(_train_worker, two_ranks, 2)
    a = load_training_checkpoint(single.checkpoint)
    b = load_training_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 2 and len(b["per_rank"]) == 2
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-4, atol=1e-5, msg=key)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    todo, tree = [pid], []
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def torchrun_pretrain(overrides: list[str]) -> tuple[list[str], dict]:
    """(command, environment) of ``swavkit pretrain`` under torchrun with 2 CPU processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "swavkit",
               "pretrain", "--no-progress", "--no-auto", *overrides]
    return command, dict(os.environ, OMP_NUM_THREADS="1")


def killed_after(command: list[str], checkpoint, min_step: int, env: dict | None = None, timeout_s: float = 120,
                 poll_s: float = 0.2) -> int:
    """``command`` (a training run) killed with SIGKILL, with every process it started, once ``checkpoint`` holds
    step ``min_step`` or later: no chance to save anything. Returns the step of the checkpoint it left."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        if checkpoint.exists() and load_training_checkpoint(checkpoint)["step"] >= min_step:
            break
        time.sleep(poll_s)
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    kill_tree(proc.pid)
    proc.wait()
    return load_training_checkpoint(checkpoint)["step"]


def torchrun_killed_after(overrides: list[str], checkpoint, min_step: int) -> int:
    """:func:`torchrun_pretrain`, killed by :func:`killed_after`."""
    command, env = torchrun_pretrain(overrides)
    return killed_after(command, checkpoint, min_step, env=env)


def test_torchrun_cli_killed_then_resumed(image_folder, tmp_path):
    out = tmp_path / "tr"
    overrides = tiny_overrides(image_folder, out, **{"train.epochs": 3, "train.checkpoint_every_steps": 1})
    checkpoint = out / "checkpoints" / "last.pt"
    killed_at = torchrun_killed_after(overrides, checkpoint, min_step=2)
    assert 2 <= killed_at < 12

    command, env = torchrun_pretrain(overrides)
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"resume: {checkpoint} at step {killed_at}/12" in done.stdout, done.stdout
    final = load_training_checkpoint(checkpoint)
    assert final["step"] == 12 and len(final["per_rank"]) == 2
    assert (out / "backbone" / "model.safetensors").is_file()


def test_launch_detection_torchrun_and_slurm(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.detect_launch().launcher == "none"
    monkeypatch.setenv("SLURM_PROCID", "9")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "8(x2)")
    assert distributed.detect_launch() == distributed.ProcessInfo(9, 16, 1, 8, "slurm")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed.detect_launch() == distributed.ProcessInfo(3, 4, 1, 2, "torchrun")  # torchrun wins


def test_preflight_refuses_more_processes_than_gpus(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(distributed.LaunchError, match="8 processes per node but only 4 GPU"):
        distributed.init("cuda")
