"""A generic, timed MLflow adapter: runs, params, metrics, artifacts, models, the registry.

It knows nothing of studies or trials (record.py lays a study out on top of it). Calls go
through ``MlflowClient`` with explicit run ids, because the fluent API keeps global state; the
exceptions are ``log_model`` and ``register_model``, which only exist in fluent form.
Time spent in MLflow calls is summed in ``Tracker.seconds`` so the overhead can be reported.

``Tracker.background.start()`` takes writes off the caller's thread: they are queued in order
for a writer thread, and models are exported by a child process (background.py says why);
reads wait for the queued writes first, so a caller always reads what it wrote.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from mnist_tune.background import WARM_UP, Background
from mnist_tune.checks import check_name, check_sqlite_store
from mnist_tune.errors import MnistTuneError
from mnist_tune.stores import redact, resolve_tracking_uri, sqlite_path

# MLflow prints artifact-download progress bars and one "View run" line per run by default.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Fail fast on an unreachable server instead of retrying with backoff for minutes.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

import mlflow  # noqa: E402  (after the environment settings above)
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT  # noqa: E402

for _name in ("mlflow", "alembic"):  # after import: mlflow configures its logger when imported
    logging.getLogger(_name).setLevel(logging.WARNING)

MODEL_NAME = "model"  # artifact name of a logged model: runs:/<run_id>/model
# Logged explicitly: inferring requirements costs 10-25 s per log_model call here.
MODEL_REQUIREMENTS = ["torch", "numpy"]
# Per-epoch metrics are written together at most this often (and when the run ends): a store
# write per short epoch would cost a few % of a trial (benchmarks/RESULTS.md).
METRICS_FLUSH_SECONDS = 10.0


def _timed(method):
    """Add the call's wall time to its Tracker's totals (per method name, for overhead reports);
    on the writer thread to ``background.seconds``: that time is not the caller's."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            elapsed = time.perf_counter() - started
            owner = getattr(self, "tracker", self)
            background = owner.background
            if background.writer is not None and background.writer.on_writer_thread():
                background.seconds += elapsed
            else:
                owner.seconds += elapsed
                owner.seconds_by_call[method.__name__] = owner.seconds_by_call.get(method.__name__, 0.0) + elapsed

    return wrapper


def _deferred(method):
    """A write: with a background writer, queued in order (returns None at once); else made now.
    The first argument is the run id, so a failure marks that run."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        background = getattr(self, "tracker", self).background
        if not background.queues():
            return method(self, *args, **kwargs)
        run_id = args[0] if args and isinstance(args[0], str) else None
        background.submit(method.__name__, run_id, lambda: method(self, *args, **kwargs))

    return wrapper


def _reads(method):
    """A read: waits for the queued writes, so it sees them."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        getattr(self, "tracker", self).background.drain()
        return method(self, *args, **kwargs)

    return wrapper


def check_reachable(uri: str) -> None:
    """A tracking server answers /health; other URIs have a scheme MLflow knows."""
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as reply:
                reply.read()
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise MnistTuneError(f"MLflow tracking server {redact(uri)} is unreachable: {reason}") from None
        from mnist_tune.auth import check_credentials

        check_credentials(uri)  # a wrong or missing login: one line now, not a 401 traceback later
    elif scheme.startswith("sqlite"):
        check_sqlite_store(uri, "MLflow store")
    elif scheme not in ("postgresql", "mysql", "databricks", "file", "") and "+" not in scheme:
        raise MnistTuneError(f"unsupported tracking URI {redact(uri)}")


class Tracker:
    """A thin, timed wrapper over MlflowClient."""

    def __init__(self, tracking_uri: str | None = None):
        self.uri = resolve_tracking_uri(tracking_uri)
        self.seconds = 0.0
        self.seconds_by_call: dict[str, float] = {}  # method name -> seconds, for overhead reports
        self._runs: dict[str, tuple[str, dict]] = {}  # run id -> (experiment id, params) of runs started here
        self.background = Background(self)  # writes made here until background.start()
        check_reachable(self.uri)

    @_timed
    def timed_call(self, call, *args):
        return call(*args)

    @functools.cached_property
    def client(self) -> MlflowClient:
        """Created on first use, so a failed validation leaves no store behind."""
        if self.is_embedded:
            sqlite_path(self.uri).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.uri)  # log_model, register_model and load_model read the global setting
        return MlflowClient(self.uri)

    @property
    def is_embedded(self) -> bool:
        return sqlite_path(self.uri) is not None

    @functools.cached_property
    def models(self) -> Models:
        return Models(self)

    @functools.cached_property
    def metrics(self) -> Metrics:
        return Metrics(self)

    @functools.cached_property
    def files(self) -> Files:
        return Files(self)

    # ------------------------------------------------------------------- experiments

    @_reads
    @_timed
    def experiment(self, name: str, tags: dict[str, str] | None = None) -> str:
        """Id of the experiment called ``name``, created on first use."""
        check_name(name, "experiment name")
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            return found.experiment_id
        location = None
        if self.is_embedded:  # artifacts beside the database; the folder name is ours, never the user's text
            location = (sqlite_path(self.uri).absolute().parent / "artifacts" / uuid.uuid4().hex).as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location, tags=tags)
        except MlflowException:  # another worker created it first
            return self.client.get_experiment_by_name(name).experiment_id

    # -------------------------------------------------------------------------- runs

    @_timed
    def start_run(self, experiment_id: str, name: str, parent_run_id: str | None = None,
                  tags: dict[str, object] | None = None) -> str:
        tags = {k: str(v) for k, v in (tags or {}).items()}  # the REST API takes strings only
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id  # what the UI nests by
        run = self.client.create_run(experiment_id, run_name=name, tags=tags)
        self.metrics.started(run.info.run_id)
        self._runs[run.info.run_id] = (experiment_id, {})
        return run.info.run_id

    def log_params(self, run_id: str, params: dict) -> None:
        if run_id in self._runs:  # its logged model gets them too, as MLflow's log_model does
            self._runs[run_id][1].update({k: str(v) for k, v in params.items()})
        self._write_params(run_id, params)

    @_deferred
    @_timed
    def _write_params(self, run_id: str, params: dict) -> None:
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])

    @_deferred
    @_timed
    def set_tags(self, run_id: str, tags: dict[str, object]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """status: FINISHED, FAILED or KILLED."""
        self.metrics.ended(run_id)
        self._runs.pop(run_id, None)
        self._terminate(run_id, status)

    @_deferred
    @_timed
    def _terminate(self, run_id: str, status: str) -> None:
        if run_id in self.background.failures:  # a background write for it failed: it stays FAILED
            status = "FAILED"
        self.client.set_terminated(run_id, status=status)

    @_deferred
    @_timed
    def set_status(self, run_id: str, status: str) -> None:
        self.client.update_run(run_id, status=status)

    @_reads
    @_timed
    def get_run(self, run_id: str):
        """The run, or a one-line error listing the latest runs there are."""
        try:
            return self.client.get_run(run_id)
        except MlflowException:
            pass
        ids = [e.experiment_id for e in self.client.search_experiments()]
        recent = self.client.search_runs(ids, max_results=5, order_by=["attributes.start_time DESC"])
        known = ", ".join(f"{r.info.run_id} ({r.info.run_name})" for r in recent) or "(none)"
        raise MnistTuneError(f"no MLflow run with id {run_id!r} in {redact(self.uri)}; latest runs: {known}")

    @_reads
    @_timed
    def run_status(self, run_id: str) -> str | None:
        """RUNNING, FINISHED, ... of an active run; None if it does not exist or was deleted."""
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return None
        return run.info.status if run.info.lifecycle_stage == "active" else None

    @_reads
    @_timed
    def delete_run(self, run_id: str) -> None:
        self.client.set_terminated(run_id, status="KILLED")
        self.client.delete_run(run_id)

    @_reads
    @_timed
    def search_runs(self, experiment_id: str, filter_string: str, max_results: int = 1000) -> list:
        return self.client.search_runs([experiment_id], filter_string, max_results=max_results)


class Metrics:
    """A run's metrics, timed on the tracker: ``log`` writes one step's values now (summaries);
    ``queue`` stamps per-epoch values now and writes them together every METRICS_FLUSH_SECONDS;
    ``flush`` writes the rest when the run ends (however it ends)."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker
        self._queued: dict[str, list[Metric]] = {}  # run id -> metrics not yet written
        self._flushed_at: dict[str, float] = {}  # run id -> time.monotonic() of its last write

    def started(self, run_id: str) -> None:
        self._flushed_at[run_id] = time.monotonic()  # the flush clock starts with the run

    def ended(self, run_id: str) -> None:
        self._flushed_at.pop(run_id, None)

    def log(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self._write_metrics(run_id, [Metric(k, float(v), now, step) for k, v in metrics.items()])

    def queue(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        queue = self._queued.setdefault(run_id, [])
        queue.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        last = self._flushed_at.get(run_id, float("-inf"))
        if time.monotonic() - last >= METRICS_FLUSH_SECONDS or len(queue) >= 500:  # log_batch takes 1000
            self.flush(run_id)

    def flush(self, run_id: str) -> None:
        """Write the queued metrics (in the background, with a writer); without one they stay
        queued if the write fails."""
        if self._queued.get(run_id):
            self._write_metrics(run_id, self._queued[run_id])
        self._queued.pop(run_id, None)
        self._flushed_at[run_id] = time.monotonic()

    @_deferred
    @_timed
    def _write_metrics(self, run_id: str, metrics: list[Metric]) -> None:
        self.tracker.client.log_batch(run_id, metrics=metrics)


class Files:
    """What a run wrote and read besides numbers: artifacts, and its dataset inputs (lineage)."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker

    def log_artifact(self, run_id: str, path: str | Path, folder: str | None = None) -> None:
        """With a writer, a copy of the file is queued: the caller may delete it at once."""
        staged = None
        if self.tracker.background.queues():
            staged = Path(tempfile.mkdtemp(prefix="mnist-tune-")) / Path(path).name
            path = shutil.copy2(path, staged)
        self._write_artifact(run_id, str(path), folder, staged)

    @_deferred
    @_timed
    def _write_artifact(self, run_id: str, path: str, folder: str | None, staged: Path | None) -> None:
        try:
            self.tracker.client.log_artifact(run_id, path, folder)
        finally:
            if staged is not None:
                shutil.rmtree(staged.parent, ignore_errors=True)

    @_deferred
    @_timed
    def log_datasets(self, run_id: str, datasets: list[dict]) -> None:
        """Dataset inputs (the UI's *Dataset* column): each a dict with name, digest, source
        (a path or URI), context (training, validation, test) and profile (shown as is)."""
        inputs = [DatasetInput(
            Dataset(name=d["name"], digest=d["digest"], source_type="local", source=json.dumps({"uri": d["source"]}),
                    profile=json.dumps(d["profile"])), tags=[InputTag(MLFLOW_DATASET_CONTEXT, d["context"])])
            for d in datasets]
        try:
            self.tracker.client.log_inputs(run_id, datasets=inputs)
        except MlflowException:
            # Workers logging a dataset new to the experiment at once race on its unique key
            # (the loser gets BAD_REQUEST: IntegrityError); a second try finds it.
            time.sleep(0.5)
            self.tracker.client.log_inputs(run_id, datasets=inputs)


class Models:
    """Logged models and the registry; calls are timed on the tracker."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker

    @_timed
    def log_model(self, run_id: str, model, example, model_id: str | None = None) -> str:
        """Log a torch model under ``runs:/<run_id>/model``; returns its ``models:/`` URI.

        pt2 (torch.export) makes the artifact self-contained: loading it needs torch and
        mlflow only, not this package or einops. ``example`` is a float array (N>1, 1, 28, 28).
        With a helper process, the logged model is created now (so its URI is known) and
        the export is queued: the caller does not touch ``model`` again.
        """
        tracker = self.tracker
        if tracker.background.helper is not None and model_id is None and run_id in tracker._runs:
            experiment_id, params = tracker._runs[run_id]
            model_id = tracker.client.create_logged_model(experiment_id, MODEL_NAME, run_id, params=params).model_id
            payload = to_bytes(model)
            tracker.background.helper_job("log_model", run_id, lambda: self._export(run_id, model_id, payload, example))
            return f"models:/{model_id}"
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(
                model, name=MODEL_NAME, model_id=model_id, **_model_options(model, example),
                # MLflow would reload the model to validate the example; the tests cover the reload.
                validate_serving_input=False)
        # Leaving the block marked the run FINISHED; the caller sets the final status after.
        return info.model_uri

    @_timed
    def _export(self, run_id: str, model_id: str, model, example) -> None:
        """On the writer thread: the child process saves and logs the model; a failure leaves
        the logged model FAILED (and, through the writer, its run)."""
        try:
            self.tracker.background.helper.call(_log_model, run_id, model_id, model, example)
        except Exception:
            self.tracker.client.finalize_logged_model(model_id, "FAILED")
            raise

    def load_model(self, uri: str):
        """The logged model ``uri`` (after the queued writes), as a torch module on the CPU."""
        self.tracker.background.drain()
        return load_model(uri, self.tracker.uri)

    @_timed
    def warm_up_model_logging(self, model, example, scratch: str | None = None) -> None:
        """Save ``model`` once to a throwaway folder and load it back, before the first trial:
        the first pt2 save and load in a process pay torch.export's import, its loader's set-up
        and MLflow's package scan, which should not be charged to a trial or to the end of the
        study (the champion's report loads its model); an architecture that cannot be exported
        fails here (with a helper process: there, queued, and ``failures`` says so under WARM_UP)."""
        background = self.tracker.background
        if background.helper is not None:
            return background.run(WARM_UP, None, _warm_up, to_bytes(model), example, background.helper.scratch)
        with tempfile.TemporaryDirectory(dir=scratch) as folder:
            mlflow.pytorch.save_model(model, Path(folder) / MODEL_NAME, **_model_options(model, example))
            mlflow.pytorch.load_model(str(Path(folder) / MODEL_NAME), map_location="cpu")

    @_timed
    def register_model(self, name: str, model_uri: str) -> str:
        """A new version of registered model ``name`` from a logged model; returns the version.
        mlflow.register_model also tags the logged model, so the UI links both ways."""
        self.tracker.client  # noqa: B018  (sets the global tracking URI the fluent call reads)
        with contextlib.redirect_stderr(io.StringIO()):  # it prints two lines per call
            return str(mlflow.register_model(model_uri, name).version)

    @_timed
    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.tracker.client.set_registered_model_alias(name, alias, version)

    @_reads
    @_timed
    def model_versions(self, name: str, run_id: str) -> list[str]:
        """Versions of ``name`` registered from ``run_id``, oldest first."""
        found = self.tracker.client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
        return sorted((str(v.version) for v in found), key=int)


class NullTracker:
    """Tracker's interface, recording nothing: the baseline that benchmarks/tracking_overhead.py
    measures tracking's cost against (a study run with it leaves no trace in MLflow)."""

    uri, is_embedded, writer, helper = "(no tracking)", False, None, None
    seconds = 0.0

    def __init__(self):
        self.seconds_by_call, self.failures = {}, {}
        self.models = self.metrics = self.files = self.background = self  # nothing queued, failed, waited for

    def start_run(self, *args, **kwargs) -> str:
        return uuid.uuid4().hex

    def experiment(self, *args, **kwargs) -> str:
        return "0"

    def log_model(self, run_id: str, *args, **kwargs) -> str:
        return f"runs:/{run_id}/{MODEL_NAME}"

    def run(self, *args) -> None:
        """Plots and the champion's report are drawn only to be logged: not drawn."""

    def search_runs(self, *args, **kwargs) -> list:
        return []

    def model_versions(self, *args) -> list:
        return []

    def __getattr__(self, name: str):  # every other call: nothing to do, nothing returned
        return lambda *args, **kwargs: None


def to_bytes(model) -> bytes:
    """A torch module serialised here, on the CPU, for the helper process. Not pickled by the
    writer thread: torch ops there (multiprocessing pickles tensors through shared memory)
    start a second OpenMP team in this process, and libgomp then stops spinning and makes
    every parallel region of training a futex round trip (epochs 2-3x slower, measured)."""
    import torch

    buffer = io.BytesIO()
    torch.save(model.cpu(), buffer)
    return buffer.getvalue()


def from_bytes(payload: bytes):
    import torch

    return torch.load(io.BytesIO(payload), weights_only=False)  # our own module, from our own process


def _log_model(tracker: Tracker, run_id: str, model_id: str, payload: bytes, example) -> str:
    return tracker.models.log_model(run_id, from_bytes(payload), example, model_id=model_id)


def _warm_up(tracker: Tracker, payload: bytes, example, scratch: str) -> None:
    tracker.models.warm_up_model_logging(from_bytes(payload), example, scratch)


def _model_options(model, example) -> dict:
    """log_model/save_model arguments. Moves ``model`` to the CPU in eval mode (what is saved)."""
    import torch
    from mlflow.models import infer_signature

    model = model.cpu().eval()
    with torch.inference_mode():
        output = model(torch.as_tensor(example)).numpy()
    return {"signature": infer_signature(example, output), "input_example": example,
            "serialization_format": "pt2", "pip_requirements": MODEL_REQUIREMENTS}


def load_model(uri: str, tracking_uri: str | None = None):
    """Load a logged model (``runs:/…``, ``models:/…``) as a torch module on the CPU. Its
    download goes to a folder removed afterwards (MLflow's own would stay in the temp folder)."""
    tracking_uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    try:
        with tempfile.TemporaryDirectory(prefix="mnist-tune-model-") as folder:
            return mlflow.pytorch.load_model(uri, dst_path=folder, map_location="cpu")
    except (MlflowException, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MnistTuneError(f"cannot load model {uri} from {redact(tracking_uri)}: {first}") from None
