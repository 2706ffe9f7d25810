"""Ctrl-C and SIGTERM during training: recorded by the signal handler, acted on between steps.

Python runs a signal handler in the main thread between two bytecodes, wherever that thread
is. Raised from there, an exception can land inside SQLAlchemy's or MLflow's own bookkeeping
and leave a pooled SQLite connection mid-transaction, still holding the file's lock; closing
the trial and its run then waits on that lock until SQLite's timeout, and so does Optuna's
heartbeat thread (seen in CI: a worker still running 60 s after SIGTERM). So inside
``signals_deferred`` the handler only records the request, and the code raises
``Interrupted`` itself where no store is mid-write: between training steps (``fit`` calls
``raise_if_requested``) and between trials (the study loop). Only a further signal, once
a stop is under way, raises at once: the user insists.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C/SIGTERM, raised in the main thread. A KeyboardInterrupt, so Optuna marks the
    trial FAIL before re-raising it, and the CLI exits with 128 + the signal's number."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.exit_code = 128 + signum
        self.outcome = ""  # what was closed on the way out, for the CLI's one line


_requested = 0  # the signal that asked to stop now
_raised = False  # Interrupted was raised for it (once; the clean-up that follows must run)
_finish = 0  # the signal that asked to stop after the current trial


def raise_if_requested() -> None:
    """Raise Interrupted (once) if a signal asked to stop now. Cheap: called before every training step."""
    global _raised
    if _requested and not _raised:
        _raised = True
        raise Interrupted(f"received signal {_requested}", _requested)


def finish_requested() -> int:
    """The signal that asked to stop after the current trial, or 0."""
    return _finish


def sleep(seconds: float) -> None:
    """time.sleep that ends early (raising Interrupted) when a signal asks to stop now."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        raise_if_requested()
        time.sleep(min(left, 0.1))
    raise_if_requested()


def _say(message: str) -> None:
    try:  # os.write: the main thread may be inside a print to the same (buffered) stream
        os.write(2, f"{message}\n".encode())
    except OSError:  # stderr closed, or its reader gone: the handler must not raise
        pass


@contextmanager
def signals_deferred(finish_first: bool = False):
    """Within: SIGTERM/SIGINT are recorded instead of raised. With ``finish_first`` the first
    one only asks to stop after the current trial (callers check ``finish_requested``); the
    next one (without it, the first) asks to stop at the next check; any signal after that
    raises at once, wherever it lands (the user insists). A request that no check saw before
    the block ends is dropped: the work it would have stopped is done. Not re-entrant."""
    global _requested, _raised, _finish

    def on_signal(signum, frame):
        global _requested, _finish
        if _requested:  # asked again: the user insists, stop now rather than cleanly
            raise Interrupted(f"received signal {signum} again", signum)
        if finish_first and not _finish:
            _finish = signum
            _say(f"signal {signum}: finishing the current trial, then stopping (again to abort)")
        else:
            _requested = signum

    _requested, _raised, _finish = 0, False, 0
    previous = {}
    try:
        for signum in SIGNALS:
            previous[signum] = signal.signal(signum, on_signal)
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _requested, _raised, _finish = 0, False, 0
