"""CPU cores: how many this process may use, and the one rule for data workers and compute threads.

Every caller (training, --auto, evaluations, fine-tuning, the CLI defaults) asks here, so that the
numbers agree across commands. Stdlib at import time (``swavkit.config`` and ``swavkit --help`` import
this module): torch is imported inside the two thread helpers, which only run where torch already is.
"""

from __future__ import annotations

import contextlib
import os

# DataLoader workers per process: the library default, and --auto's (which times the machine and may
# afford more decoders for larger crops). More workers than usable cores only contend, and torch warns.
DEFAULT_WORKER_CAP = 4
AUTO_WORKER_CAP = 8
# Below this many multiply-adds per pass, one CPU thread is faster: small solvers (the linear probe's
# L-BFGS) make hundreds of passes, each paying a thread synchronisation, and on a busy machine a thread
# that waits for a core stalls the others, so the fit time swings by an order of magnitude.
SINGLE_THREAD_MAX_MACS = 300_000_000


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_num_workers(cap: int = DEFAULT_WORKER_CAP, local_world_size: int = 1,
                        leave_one_for_main: bool = True) -> int:
    """DataLoader worker processes for this process: its share of the usable cores (the node's cores split
    over ``local_world_size`` processes), one left to the main process unless ``leave_one_for_main`` is
    False (--auto, which measured that the step and the decoders share a core well), at most ``cap``."""
    share = usable_cores() // max(1, local_world_size)
    return max(0, min(cap, share - (1 if leave_one_for_main else 0)))


def cpu_training_threads(local_world_size: int = 1) -> int:
    """Intra-op threads for training on a CPU: this process's share of the usable cores, at least 1 (torch's
    default gives every process all cores, which oversubscribes a node running several CPU processes).
    Data workers are not subtracted: on the quiet 2-core benchmark machine 2 threads beside 2 workers
    trained at 318 images/s and 1 thread at 225 (cifar10_cpu_budget recipe); an earlier reading the other
    way round was taken while other work held a core."""
    return max(1, usable_cores() // max(1, local_world_size))


@contextlib.contextmanager
def training_threads(device, local_world_size: int = 1):
    """Within: torch's intra-op threads set by :func:`cpu_training_threads` when training on a CPU and
    OMP_NUM_THREADS does not say otherwise; the previous count is restored on exit (a library call leaves
    the caller's process as it found it). Yields the thread count in use. ``device``: a torch.device."""
    import torch  # heavy; see the module docstring

    previous = torch.get_num_threads()
    if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(cpu_training_threads(local_world_size))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def threads_for_size(device, macs_per_pass: int):
    """One torch CPU thread for problems below SINGLE_THREAD_MAX_MACS per pass, restored afterwards;
    nothing changes on GPUs or for larger problems."""
    import torch  # heavy; see the module docstring

    previous = torch.get_num_threads()
    small = device.type == "cpu" and macs_per_pass < SINGLE_THREAD_MAX_MACS
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(previous)


__all__ = ["usable_cores", "default_num_workers", "cpu_training_threads", "training_threads", "threads_for_size",
           "DEFAULT_WORKER_CAP", "AUTO_WORKER_CAP", "SINGLE_THREAD_MAX_MACS"]
