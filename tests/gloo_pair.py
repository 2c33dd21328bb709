"""Two worker processes kept for the whole test session, for the tests that run a function on two gloo ranks.

``torch.multiprocessing.spawn`` starts two fresh interpreters per test, and each pays the torch/timm import
(~4 s of CPU) before its first collective. :class:`GlooPair` pays it once: ``pair.run(fn, *args)`` calls
``fn(rank, 2, port, *args)`` on both processes at the same time (the signature ``mp.spawn`` gives its
workers), with a fresh port, and raises what a rank raised. Every job starts as a fresh worker would: the
environment as the process began, no process group, one torch thread, torch's global RNG at its initial seed;
after a failed or timed out job both processes are killed and the next job starts a new pair. Module-level
state of the test modules themselves does carry over (as in any one pytest process).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import time
import traceback

WORLD = 2


class PairTimeout(AssertionError):
    """A job did not finish on both ranks in time (for instance a collective one rank never entered)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, conn) -> None:
    """One rank's loop: run jobs until the parent goes away."""
    import torch
    import torch.distributed as dist

    environ, initial_seed = dict(os.environ), torch.initial_seed()
    torch.set_num_threads(1)
    while True:
        try:
            job = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            fn, port, args = pickle.loads(job)  # unpickling imports the test module that defines fn
            fn(rank, WORLD, port, *args)
            reply = None
        except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
            reply = traceback.format_exc()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            os.environ.clear()
            os.environ.update(environ)
            torch.set_num_threads(1)
            torch.manual_seed(initial_seed)
        conn.send(reply)


class GlooPair:
    def __init__(self) -> None:
        self._procs: list = []
        self._conns: list = []

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        for rank in range(WORLD):
            ours, theirs = context.Pipe()
            # not a daemon: a job may start DataLoader workers
            proc = context.Process(target=_serve, args=(rank, theirs), name=f"gloo-rank{rank}")
            proc.start()
            theirs.close()
            self._procs.append(proc)
            self._conns.append(ours)

    def close(self) -> None:
        """End both processes: SIGKILL, they hold nothing to save (an orderly exit of torch takes seconds)."""
        for proc in self._procs:
            proc.kill()
        for proc in self._procs:
            proc.join()
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []

    def run(self, fn, *args, timeout_s: float = 300) -> None:
        """``fn(rank, 2, port, *args)`` on both ranks; raises AssertionError with a rank's traceback when it
        raised or died, :class:`PairTimeout` when the ranks are not done within ``timeout_s``."""
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self.close()
            self._start()
        job = pickle.dumps((fn, free_port(), args))
        for conn in self._conns:
            conn.send_bytes(job)
        pending = dict(enumerate(self._conns))
        deadline = time.monotonic() + timeout_s
        while pending:
            for rank, conn in list(pending.items()):
                if conn.poll(0.05):
                    try:
                        reply = conn.recv()
                    except EOFError:
                        reply = f"rank {rank} died (exit code {self._procs[rank].exitcode})"
                    if reply is not None:  # the other rank may wait in a collective forever: end both
                        self.close()
                        raise AssertionError(f"rank {rank} failed:\n{reply}")
                    del pending[rank]
                elif not self._procs[rank].is_alive() and not conn.poll():
                    code = self._procs[rank].exitcode
                    self.close()
                    raise AssertionError(f"rank {rank} died (exit code {code})")
            if pending and time.monotonic() > deadline:
                self.close()
                raise PairTimeout(f"ranks {sorted(pending)} not done after {timeout_s:.0f} s")
