"""SIGTERM / SIGINT for long commands (``pretrain``, ``finetune``): save the resumable state, exit with 3.

Schedulers send SIGTERM before a preemption. While the work is in a phase that can save its state (the
training steps), a signal only sets a flag that the loop reads after its current step; in any other phase
(start-up, export, evaluation) it raises :class:`StopRequested` at once. Either way the command line exits
with ``swavkit.errors.EXIT_STOPPED`` (3): run the same command again to continue.

Stdlib only.
"""

from __future__ import annotations

import contextlib
import signal


class StopRequested(Exception):
    """SIGTERM/SIGINT outside the training steps, or after their state was saved: resumable (exit 3)."""


class StopRequest:
    """SIGTERM/SIGINT (what schedulers send before preemption), for as long as the ``with`` block runs.

    Inside ``deferred()`` (the training steps) a signal only sets a flag (``signal_name``): the loop saves a
    checkpoint at the end of the step and exits cleanly. In any other phase (start-up, export) it raises
    StopRequested at once, which ``distributed.fail_together`` passes to the other processes: nothing hangs,
    exit code 3.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._deferred = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    @contextlib.contextmanager
    def deferred(self):
        self._deferred = True
        try:
            yield
        finally:
            self._deferred = False

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means "now"
        self.signal_name = signal.Signals(signum).name
        if not self._deferred:
            raise StopRequested(f"stopped by {self.signal_name} outside the training steps; nothing is lost: run "
                                "the same command again to continue")

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


__all__ = ["StopRequest", "StopRequested"]
