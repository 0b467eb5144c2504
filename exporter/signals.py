"""SIGTERM and SIGHUP behave as Ctrl-C does: they raise in the main thread, so every cleanup that
runs for KeyboardInterrupt (staging folders, locks) runs for them too.

The handlers are installed by the command-line entry point only; a library caller keeps its own.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
EXIT_CODES = frozenset(128 + s for s in HANDLED)


class Interrupted(KeyboardInterrupt):
    """A termination signal, raised where the main thread was; `signum` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def install() -> None:
    """Turn SIGTERM and SIGHUP into Interrupted (SIGINT already raises KeyboardInterrupt)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise)


def ignore_further() -> None:
    """The process is exiting on a signal: further ones are ignored, where install() set ours (the
    command line), so a second Ctrl-C cannot interrupt the exit with a traceback."""
    if signal.getsignal(signal.SIGTERM) is _raise:
        for sig in HANDLED:
            signal.signal(sig, signal.SIG_IGN)


def exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal number, as shells report a process ended by a signal (Ctrl-C: 130)."""
    return 128 + getattr(exc, "signum", signal.SIGINT)


def signal_name(exc: KeyboardInterrupt) -> str:
    return signal.Signals(getattr(exc, "signum", signal.SIGINT)).name


@contextmanager
def deferred() -> Iterator[Callable[[], bool]]:
    """Hold termination signals back while the block runs (a rename, a cleanup) and deliver them
    after it; the yielded function tells whether one is already waiting."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    try:
        yield lambda: bool(signal.sigpending() & set(HANDLED))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
