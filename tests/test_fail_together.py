"""A failure on one process ends the whole job in seconds, with that process's message."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

WORKER = textwrap.dedent("""
    import sys, time, torch
    from swavkit import distributed
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
