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
    received: bool = False  # SIGTERM
    interrupted: bool = False  # SIGINT (Ctrl-C)

    def stopped(self) -> bool:
        return self.received or self.interrupted


_ACTIVE: list[SignalState] = []  # the state of the enclosing `sigterm_as_interrupt`, for `raise_if_stopped`


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[SignalState]:
    """Within the block, the first SIGTERM raises Terminated; later ones are ignored so that cleanup finishes.
    Ctrl-C raises KeyboardInterrupt as Python's own handler does, and is recorded too (`raise_if_stopped`).

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

    def raise_interrupt(_signum, _frame):
        state.interrupted = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is signal.default_int_handler:  # one that someone else set is left alone
        signal.signal(signal.SIGINT, raise_interrupt)
    _ACTIVE.append(state)
    try:
        yield state
    finally:
        _ACTIVE.remove(state)
        signal.signal(signal.SIGTERM, previous)
        if previous_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous_int)


def raise_if_stopped() -> None:
    """Raise again a stop that library code swallowed. The interrupt is raised wherever Python happens to be; inside
    torch's tracer that can be a lazy import or a cleanup block, which turns it into an error of torch's own that
    torch's exporter then catches and carries on from. Long commands call this between their steps."""
    if _ACTIVE and _ACTIVE[-1].received:
        raise Terminated
    if _ACTIVE and _ACTIVE[-1].interrupted:
        raise KeyboardInterrupt
