"""SIGTERM handled like Ctrl-C, so that a stop from `timeout`, a job scheduler or `docker stop` runs the cleanup
and partial-result paths Ctrl-C runs (temporary exports removed, eval state saved, bench figures printed)
instead of killing the process with its temporary files in place."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass

EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, what the commands exit with after Ctrl-C
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, the shell's status for a process SIGTERM stopped


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM; a KeyboardInterrupt, so every Ctrl-C handler also handles it."""


@dataclass
class SignalState:
    received: bool = False


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[SignalState]:
    """Within the block, the first SIGTERM raises Terminated; later ones are ignored so that cleanup finishes.

    Outside the main thread (where Python cannot install handlers) the block runs unchanged.
    """
    state = SignalState()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def raise_terminated(_signum, _frame):
        if state.received:
            return
        state.received = True
        raise Terminated

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, previous)
