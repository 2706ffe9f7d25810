"""Tracking off the training thread (``Tracker.background``): a writer thread that makes MLflow
calls in order, and a helper process for the heavy jobs (model export, plots, the champion's
report).

The writer keeps calls in the order they were made, so a run is closed only after its
metrics and model are written; ``drain`` waits for all of them (reads, the end of a study and
Ctrl-C/SIGTERM drain first). Exports run in a process, not a thread, because torch.export's
tracer patches ``torch.nn.Module.__call__`` for every thread while it traces, and because
they would hold the GIL the training loop needs. A failed call is never silent: it is
logged, its run is marked FAILED with the reason, and ``failures`` lists it.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import traceback
from dataclasses import dataclass
from typing import Callable

from mnist_tune.stores import first_line

PENDING_JOBS = 256  # calls queued before the trainer waits: about 20 trials of calls and models
WARM_UP = "warm_up_model_logging"  # the background job's name, under which ``failures`` reports it


class Background:
    """A tracker's background: none until ``start``, and then its writes are queued for the
    writer (the ``_deferred`` methods of tracking.py) and its heavy jobs go to the helper."""

    def __init__(self, tracker):
        self.tracker = tracker
        self.writer: Writer | None = None
        self.helper: Helper | None = None
        self.seconds = 0.0  # MLflow calls made by the writer thread
        self._helper_jobs = 0  # queued or running jobs that wait on the helper
        self._uploads: dict[str, int] = {}  # run id -> the number of its queued helper job
        self.log = lambda msg: print(msg, file=sys.stderr)

    def start(self, log=None, helper: bool = True) -> Background:
        """From now on, writes are queued for a writer thread (the store opens there while
        the caller loads data). With ``helper``, models are exported, and plots and reports
        drawn, by a child process (it imports meanwhile too); give it only where a core is
        spare (benchmarks/RESULTS.md). Call ``close()`` when done: it waits for every write."""
        self.log = log or self.log
        self.writer = Writer(self._failed)
        if helper:
            self.helper = Helper(self.tracker.uri)
        self.writer.submit("open the store", None, lambda: self.tracker.client)
        return self

    def queues(self) -> bool:
        """Whether a call made here is queued (not when made by the writer itself)."""
        return self.writer is not None and not self.writer.on_writer_thread()

    def submit(self, name: str, run_id: str | None, call: Callable[[], object]) -> None:
        """Run ``call`` (MLflow calls through the tracker) after the writes queued so far (a
        failure marks ``run_id``); now when nothing is queued."""
        if self.queues():
            self.writer.submit(name, run_id, call)
        else:
            call()

    def run(self, name: str, run_id: str | None, fn: Callable, *args) -> None:
        """``fn(tracker, *args)`` in the helper process after the writes queued so far (a
        failure marks ``run_id``); without one, now, here."""
        if self.helper is None:
            fn(self.tracker, *args)
        else:
            self.helper_job(name, run_id, lambda: self.tracker.timed_call(self.helper.call, fn, *args))

    def helper_job(self, name: str, run_id: str | None, call: Callable[[], object]) -> None:
        """Queue ``call``, which waits on the helper process; counted, so ``close`` knows what
        still needs the helper."""
        def counted():
            try:
                call()
            finally:
                self._helper_jobs -= 1
                self._uploads.pop(run_id, None)

        self._helper_jobs += 1
        if not self.queues():
            return counted()
        number = self.writer.submit(name, run_id, counted)
        if run_id is not None:
            self._uploads[run_id] = number

    def drain(self, but_upload_of: str | None = None) -> None:
        """Wait until every queued write is made; with ``but_upload_of`` (a run id), only until
        the writes queued before that run's job in the helper (its model upload) are made, so
        the upload, and what was queued after it, overlap the caller's next trial."""
        if self.writer is not None:
            self.writer.drain(self._uploads.get(but_upload_of))

    def close(self, stopping: bool = False) -> None:
        """Wait for the queued writes and stop the helper process. ``stopping`` (Ctrl-C,
        SIGTERM): a model-export warm-up still running is abandoned rather than waited for,
        when no export waits behind it (it keeps nothing)."""
        if self.writer is not None:
            current = self.writer.current
            if stopping and self.helper is not None and current is not None and current.name == WARM_UP \
                    and self._helper_jobs == 1:
                self.writer.cancelled.add(WARM_UP)
                self.helper.kill()
            self.writer.drain()
        if self.helper is not None:
            self.helper.close()
            self.helper = None

    @property
    def failures(self) -> dict[str, str]:
        """Run id -> the background write that failed for it (the run was marked FAILED)."""
        return self.writer.failures if self.writer is not None else {}

    def _failed(self, job: Job, error: Exception) -> None:
        """A queued write failed: say so, and mark its run FAILED with the reason."""
        self.log(f"tracking: {job.name} of run {job.run_id} failed: {first_line(error)}")
        if job.run_id:
            from mlflow.entities import RunTag

            from mnist_tune.record import ERROR

            tag = RunTag(ERROR, f"tracking failed: {job.name}: {first_line(error)}")
            self.tracker.client.log_batch(job.run_id, tags=[tag])
            self.tracker.client.set_terminated(job.run_id, status="FAILED")


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
        self.current: Job | None = None  # the job running now
        self.cancelled: set[str] = set()  # names of jobs whose failure is expected (abandoned)
        self._jobs: queue.Queue[Job] = queue.Queue(PENDING_JOBS)
        self._submitting = threading.Lock()  # job numbers follow the queue's order
        self._submitted = self._finished = 0  # jobs, counted from 1; they run in that order
        self._progress = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="mnist-tune-tracking", daemon=True)
        self._thread.start()

    def on_writer_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, name: str, run_id: str | None, call: Callable[[], object]) -> int:
        """Queue ``call``; returns its number."""
        with self._submitting:
            self._submitted += 1
            self._jobs.put(Job(name, run_id, call))  # blocks while PENDING_JOBS wait: back-pressure
            return self._submitted

    def drain(self, before: int | None = None) -> None:
        """Wait until every call queued so far has run (or failed and been reported); with
        ``before`` (a job's number), only the calls queued before that one."""
        if self.on_writer_thread():
            return
        if before is None:
            self._jobs.join()
        else:
            with self._progress:
                self._progress.wait_for(lambda: self._finished >= before - 1)

    def _work(self) -> None:
        while True:
            job = self.current = self._jobs.get()
            try:
                job.call()
            except Exception as e:
                if job.name in self.cancelled:
                    continue
                self.failures.setdefault(job.run_id or job.name, f"{job.name}: {first_line(e)}")
                try:
                    self.on_failure(job, e)
                except Exception:
                    pass  # already recorded in failures; the run is reconciled when the study resumes
            finally:
                self.current = None
                with self._progress:
                    self._finished += 1
                    self._progress.notify_all()
                self._jobs.task_done()


class Helper:
    """A child process with its own Tracker that runs ``call(fn, *args)`` = ``fn(tracker, *args)``
    (``fn`` a module-level function, the arguments picklable), one at a time; ``call`` blocks
    until it returns. For the heavy jobs: exporting models, drawing plots, the champion's report.

    It starts at once and imports torch and MLflow while the parent loads data; it exits when
    the parent closes it or dies (its pipe ends), and removes ``scratch``, a folder for its
    throwaway saves, on the way out (``close`` too, if it was killed)."""

    def __init__(self, tracking_uri: str):
        context = multiprocessing.get_context("spawn")  # no fork of a process with threads (and CUDA)
        self._conn, child = context.Pipe()
        self._lock = threading.Lock()  # one request at a time: the writer thread, or close
        self.scratch = tempfile.mkdtemp(prefix="mnist-tune-helper-")
        self.process = context.Process(target=_serve, args=(child, tracking_uri, self.scratch),
                                       name="mnist-tune-tracking", daemon=True)
        try:
            self.process.start()
        except BaseException:  # no child to remove it
            shutil.rmtree(self.scratch, ignore_errors=True)
            raise
        finally:
            child.close()

    def call(self, fn: Callable, *args):
        with self._lock:
            try:
                self._conn.send((fn, args))
                ok, value = self._conn.recv()
            except (EOFError, OSError):
                raise RuntimeError(f"the tracking process stopped (exit code {self.process.exitcode})") from None
        if not ok:
            raise RuntimeError(value)
        return value

    def kill(self) -> None:
        """Stop the child now (its current job fails in the caller)."""
        self.process.kill()
        self.process.join()

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
        shutil.rmtree(self.scratch, ignore_errors=True)


def _serve(conn, tracking_uri: str, scratch: str) -> None:
    """The helper's loop. Ctrl-C/SIGTERM go to the whole process group; the parent decides
    when to stop, after its last job is done, so the child ignores them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    code = 1
    try:
        _answer(conn, tracking_uri)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:  # also when the parent was killed: nothing of ours stays in the temp folder
        shutil.rmtree(scratch, ignore_errors=True)
        sys.stdout.flush()
        sys.stderr.flush()
        # Every job was answered and nothing is pending; the interpreter's teardown with torch
        # and MLflow loaded took ~3 s, at the end of every study, while the worker waited.
        os._exit(code)


def _answer(conn, tracking_uri: str) -> None:
    import matplotlib.backends.backend_agg  # noqa: F401  (the imports are the slow part: paid now, in parallel,
    import mlflow.pytorch  # noqa: F401                   not at the end of the study, when the plots are drawn)
    import torch.export

    from mnist_tune.tracking import Tracker

    torch.set_num_threads(1)  # the spare core: a second thread would take one of training's (the report's eval)

    tracker = Tracker(tracking_uri)
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if request is None:
            return
        fn, args = request
        try:
            # Opened at the first job, which comes after the parent created the store (two
            # processes creating one SQLite store at once collide); also points MLflow's
            # fluent API, which log_model uses, at it.
            tracker.client  # noqa: B018
            reply = (True, fn(tracker, *args))
        except Exception as e:
            reply = (False, f"{type(e).__name__}: {first_line(e)}")
        try:
            conn.send(reply)
        except OSError:
            return
        sys.stdout.flush()
