"""Tracking off the training thread: a writer thread that makes MLflow calls in order, and an
exporter process that saves and logs models.

The writer keeps calls in the order they were made, so a run is closed only after its
metrics and model are written; ``drain`` waits for all of them (reads, the end of a study and
Ctrl-C/SIGTERM drain first). The export runs in a process, not a thread, because
torch.export's tracer patches ``torch.nn.Module.__call__`` for every thread while it traces,
and because it would hold the GIL the training loop needs. A failed call is never silent: it
is logged, its run is marked FAILED with the reason, and ``failures`` lists it.
"""

from __future__ import annotations

import multiprocessing
import queue
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Callable

from mnist_tune.stores import first_line

PENDING_JOBS = 256  # calls queued before the trainer waits: about 20 trials of calls and models


@dataclass
class Job:
    name: str  # the Tracker method, for reports
    run_id: str | None
    call: Callable[[], object]


class Writer:
    """One daemon thread that runs queued calls in order."""

    def __init__(self, on_failure: Callable[[Job, Exception], None]):
        self.on_failure = on_failure
        self.failures: dict[str, str] = {}  # run id (or the job's name) -> what failed first
        self._jobs: queue.Queue[Job] = queue.Queue(PENDING_JOBS)
        self._thread = threading.Thread(target=self._work, name="mnist-tune-tracking", daemon=True)
        self._thread.start()

    def on_writer_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, name: str, run_id: str | None, call: Callable[[], object]) -> None:
        self._jobs.put(Job(name, run_id, call))  # blocks while PENDING_JOBS wait: back-pressure

    def drain(self) -> None:
        """Wait until every call queued so far has run (or failed and been reported)."""
        if not self.on_writer_thread():
            self._jobs.join()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job.call()
            except Exception as e:
                self.failures.setdefault(job.run_id or job.name, f"{job.name}: {first_line(e)}")
                try:
                    self.on_failure(job, e)
                except Exception:
                    pass  # already recorded in failures; the run is reconciled when the study resumes
            finally:
                self._jobs.task_done()


class Exporter:
    """A child process that saves models with MLflow (``export(...)`` blocks until it is logged).

    It starts at once and imports torch and MLflow while the parent loads data; it exits when
    the parent closes it or dies (its pipe ends)."""

    def __init__(self, tracking_uri: str):
        context = multiprocessing.get_context("spawn")  # no fork of a process with threads (and CUDA)
        self._conn, child = context.Pipe()
        self._lock = threading.Lock()  # one request at a time: the writer thread, or drain/close
        self.process = context.Process(target=_serve, args=(child, tracking_uri),
                                       name="mnist-tune-exporter", daemon=True)
        self.process.start()
        child.close()

    def export(self, run_id: str, model_id: str, model, example) -> str:
        """Log ``model`` (on the CPU) into ``run_id`` as logged model ``model_id``; its URI."""
        return self._ask(("log", run_id, model_id, model, example))

    def warm_up(self, model, example) -> None:
        """Save ``model`` to a throwaway folder (the first save's start-up cost)."""
        self._ask(("warm", model, example))

    def _ask(self, request):
        with self._lock:
            try:
                self._conn.send(request)
                ok, value = self._conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                raise RuntimeError(f"the model exporter process stopped (exit code {self.process.exitcode})") \
                    from None
        if not ok:
            raise RuntimeError(value)
        return value

    def close(self, timeout: float = 30.0) -> None:
        with self._lock:
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._conn.close()
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def _serve(conn, tracking_uri: str) -> None:
    """The exporter's loop. Ctrl-C/SIGTERM go to the whole process group; the parent decides
    when to stop, after its last model is written, so the child ignores them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from mnist_tune.tracking import Tracker

    models = Tracker(tracking_uri).models
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if request is None:
            return
        try:
            if request[0] == "warm":
                reply = (True, models.warm_up_model_logging(*request[1:]))
            else:
                _, run_id, model_id, model, example = request
                reply = (True, models.log_model(run_id, model, example, model_id=model_id))
        except Exception as e:
            reply = (False, f"{type(e).__name__}: {first_line(e)}")
        try:
            conn.send(reply)
        except (OSError, BrokenPipeError):
            return
        sys.stdout.flush()
