"""Ctrl-C and SIGTERM during training: recorded by the signal handler, acted on between steps.

Python runs a signal handler in the main thread between two bytecodes, wherever that thread
is. Raised from there, an exception can land inside SQLAlchemy's or MLflow's own bookkeeping
and leave a pooled SQLite connection mid-transaction, still holding the file's lock; closing
the trial and its run then waits on that lock until SQLite's timeout, and so does Optuna's
heartbeat thread (seen in CI: a worker still running 60 s after SIGTERM). So inside
``signals_deferred`` the handler only records the request, and the code raises
``Interrupted`` itself where no store is mid-write: between training steps (``fit`` calls
``raise_if_requested``) and between trials (the study loop).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C/SIGTERM, raised in the main thread. A KeyboardInterrupt, so Optuna marks the
    trial FAIL before re-raising it, and the CLI exits with 128 + the signal's number."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.exit_code = 128 + signum


_abort = 0  # the signal number once the work should stop now
_finish = 0  # the signal number once it should stop after the current trial


def raise_if_requested() -> None:
    """Raise Interrupted (once) if a signal asked to stop now. Cheap: called before every training step."""
    global _abort
    if _abort:
        signum, _abort = _abort, 0
        raise Interrupted(f"received signal {signum}", signum)


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


@contextmanager
def signals_deferred(finish_first: bool = False):
    """Within: SIGTERM/SIGINT are recorded instead of raised. With ``finish_first`` the first
    one only asks to stop after the current trial; the next one (or, without it, the first)
    asks to stop now. A request still pending on the way out is raised there."""
    global _abort, _finish

    def on_signal(signum, frame):
        global _abort, _finish
        if finish_first and not _finish:
            _finish = signum
            # os.write: the main thread may be inside a print to the same (buffered) stream
            os.write(sys.stderr.fileno(),
                     f"signal {signum}: finishing the current trial, then stopping (again to abort)\n".encode())
        else:
            _abort = signum

    _abort = _finish = 0
    previous = {signum: signal.signal(signum, on_signal) for signum in SIGNALS}
    try:
        yield
        raise_if_requested()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _abort = _finish = 0
