"""SIGTERM and SIGINT drain the job instead of killing it; a second signal stops it at once.

A scheduler's SIGTERM, Ctrl-C or a spot instance's notice: on the first signal the shard in flight
admits no new request, the requests in flight get `runner.drain_s` to finish, the finished rows are
written (as part files, parts.py), the shard's claim is released and the run is marked
interrupted; the CLI then exits with 128 + the signal number and one line. On a second signal the
handler raises KeyboardInterrupt where the job is: the rows checkpointed so far are kept.

The state is per process (signals reach the main thread only); shard code reads it through
`current()`, which the io layer sees as a StopSignal. Prefect's flow engine installs a SIGTERM
handler of its own for the flow run (it raises TerminationSignal, which would crash the shard in
flight): the flow calls `reclaim()` first thing, and Prefect puts ours back when the run ends.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None
        self.deadline: float | None = None

    def request(self, signum: int, drain_s: float) -> None:
        self.signum = signum
        self.deadline = time.monotonic() + drain_s

    def draining(self) -> bool:
        return self.signum is not None

    def aborted(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)


_current = StopRequest()
_handler = None   # ours, while drain_on_signals is active


def current() -> StopRequest:
    return _current


def reclaim() -> None:
    """Re-install our handlers over ones installed since (Prefect's), in the main thread only."""
    if _handler is not None and threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _handler)


@contextlib.contextmanager
def drain_on_signals(drain_s: float):
    """Install the handlers for the block (main thread only); restores the previous ones after."""
    global _current, _handler
    _current = StopRequest()

    def handle(signum, frame):
        if _current.draining():
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once")
        _current.request(signum, drain_s)
        print(f"lmbatch: {signal.Signals(signum).name}: finishing the rows in flight (up to {drain_s:g} s), "
              "then stopping; send it again to stop at once", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, handle) for s in SIGNALS}
    _handler = handle
    try:
        yield _current
    finally:
        _handler = None
        for s, h in previous.items():
            signal.signal(s, h)
