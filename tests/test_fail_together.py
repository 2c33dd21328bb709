"""A failure on one process ends the whole job in seconds, with that process's message."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

from conftest import tiny_overrides
from swavkit.artifacts.checkpoint import load_training_checkpoint
from swavkit.runtime.fileio import read_jsonl

WORKER = textwrap.dedent("""
    import sys, time, torch
    from swavkit.runtime import distributed
    torch.set_num_threads(1)
    distributed.init("cpu")
    with distributed.fail_together(lambda err: 2, poll_s=0.2):
        if distributed.rank() == 1:
            time.sleep(0.5)
            raise OSError(28, "No space left on device: runs/a/metrics.jsonl")
        distributed.barrier()  # rank 0 waits here for a rank that will never come
    print("rank 0 passed the barrier", flush=True)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_rank_raising_ends_the_other_within_seconds(tmp_path):
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    start = time.monotonic()
    outputs = [proc.communicate(timeout=120) for proc in procs]
    waited_s = time.monotonic() - start
    assert procs[1].returncode != 0 and "No space left" in outputs[1][1]
    # rank 0 did not sit in the barrier until the 30-minute timeout: it ended with rank 1's message and code
    assert procs[0].returncode == 2, outputs[0]
    assert "rank 1: [Errno 28] No space left on device" in outputs[0][1]
    assert "passed the barrier" not in outputs[0][0]
    assert waited_s < 60


# --------------------------------------------------------------------------------------------------
# SIGTERM to one process of a 2-process training run, in each phase: every process ends, exit code 3

def _launch_pair(overrides: list[str], port: int) -> list[subprocess.Popen]:
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
               "PYTHONUNBUFFERED": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "swavkit", "pretrain", "--no-progress", *overrides],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _lines_of(proc: subprocess.Popen, lines: list[str]) -> threading.Thread:
    thread = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    thread.start()
    return thread


def _wait_until(condition, procs, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the run did not reach the phase to interrupt"
        assert all(p.poll() is None for p in procs), "a process ended before the signal"
        time.sleep(0.02)


def _assert_all_stop_with_code_3(procs, signalled_at: float) -> None:
    errors = [proc.communicate(timeout=90)[1] for proc in procs]
    assert time.monotonic() - signalled_at < 60  # seconds, not the 30-minute collective timeout
    assert [p.returncode for p in procs] == [3, 3], errors
    assert not any("Traceback" in e for e in errors), errors


def test_sigterm_during_start_up_ends_both_processes(image_folder, tmp_path):
    out = tmp_path / "run"
    procs = _launch_pair(tiny_overrides(image_folder, out, **{"train.epochs": 50}), _free_port())
    lines: list[str] = []
    _lines_of(procs[0], lines)
    _wait_until(lambda: any(line.startswith("data:") for line in lines), procs)  # rank 1 builds its model now
    procs[1].send_signal(signal.SIGTERM)
    _assert_all_stop_with_code_3(procs, time.monotonic())


def test_sigterm_during_the_knn_monitor_ends_both_processes(image_folder, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(image_folder, out, **{"train.epochs": 50, "monitor.knn_data": "bundled",
                                                     "monitor.max_images": 2000, "monitor.every_epochs": 1})
    procs = _launch_pair(overrides, _free_port())
    # the row of the epoch's last step is written just before the monitor starts
    _wait_until(lambda: any(row.get("step") == 4 for row in read_jsonl(out / "metrics.jsonl")), procs)
    procs[1].send_signal(signal.SIGTERM)
    signalled_at = time.monotonic()
    _assert_all_stop_with_code_3(procs, signalled_at)
    assert load_training_checkpoint(out / "checkpoints" / "last.pt")["step"] >= 4  # resumable from there
