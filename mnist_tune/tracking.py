"""Everything that talks to MLflow: runs, params, per-epoch metrics, models, the registry.

Layout: one experiment per study; a parent run for the study; one child run per trial,
nested through the ``mlflow.parentRunId`` tag. Calls go through ``MlflowClient`` with explicit
run ids (the fluent API keeps global state and is not thread-safe); the one exception is
``mlflow.pytorch.log_model``, which only logs into the active run.

Time spent in MLflow calls is summed in ``Tracker.seconds`` so the overhead can be reported.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from mnist_tune.errors import MnistTuneError

# MLflow prints artifact-download progress bars and schema-migration INFO lines by default.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Fail fast on an unreachable server instead of retrying with backoff for minutes.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # one "View run" line per run

import mlflow  # noqa: E402  (after the environment settings above)
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

for _name in ("mlflow", "alembic"):  # after import: mlflow configures its logger when imported
    logging.getLogger(_name).setLevel(logging.WARNING)

MODEL_NAME = "model"  # artifact name of the logged model: runs:/<run_id>/model
CHAMPION = "champion"
# Logged explicitly: inferring requirements costs 10-25 s per log_model call here.
MODEL_REQUIREMENTS = ["torch", "numpy"]
# Per-epoch metrics are written together at most this often (and when the run ends): an MLP
# epoch takes ~0.4 s and a store write ~7 ms, so a write per epoch would cost ~2 % of a trial.
# An epoch longer than this is written as soon as it ends.
METRICS_FLUSH_SECONDS = 10.0


def default_home() -> Path:
    """The embedded store's folder: ``$MNIST_TUNE_HOME`` or ``./mlruns``."""
    return Path(os.environ.get("MNIST_TUNE_HOME", "mlruns")).absolute()


def resolve_tracking_uri(uri: str | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the embedded SQLite store."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{default_home() / 'mlflow.db'}"


def redact(url: str) -> str:
    """A URL with any password replaced by ***, safe to print or log."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _timed(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            elapsed = time.perf_counter() - started
            self.seconds += elapsed
            self.seconds_by_call[method.__name__] = self.seconds_by_call.get(method.__name__, 0.0) + elapsed

    return wrapper


class Tracker:
    """A thin, timed wrapper over MlflowClient for the layout described above."""

    def __init__(self, tracking_uri: str | None = None, model_format: str = "pt2"):
        self.uri = resolve_tracking_uri(tracking_uri)
        self.model_format = model_format
        self.seconds = 0.0
        self.seconds_by_call: dict[str, float] = {}  # method name -> seconds, for overhead reports
        self._queued: dict[str, list[Metric]] = {}  # run id -> metrics not yet written
        self._flushed_at: dict[str, float] = {}  # run id -> time.monotonic() of its last write
        self._check_reachable()

    @functools.cached_property
    def client(self) -> MlflowClient:
        """Created on first use, so a failed validation leaves no store behind."""
        if self.uri.startswith("sqlite:///"):
            Path(self.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.uri)  # log_model and load_model read the global setting
        return MlflowClient(self.uri)

    @property
    def is_embedded(self) -> bool:
        return self.uri.startswith("sqlite:")

    def _check_reachable(self) -> None:
        scheme = urllib.parse.urlsplit(self.uri).scheme
        if scheme in ("http", "https"):
            try:
                with urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=5) as reply:
                    reply.read()
            except (urllib.error.URLError, OSError, ValueError) as e:
                reason = getattr(e, "reason", e)
                raise MnistTuneError(f"MLflow tracking server {redact(self.uri)} is unreachable: {reason}") from None
        elif scheme not in ("sqlite", "postgresql", "mysql", "databricks", "file", "") and "+" not in scheme:
            raise MnistTuneError(f"unsupported tracking URI {redact(self.uri)}")

    # ------------------------------------------------------------------- experiments

    @_timed
    def experiment(self, name: str, tags: dict[str, str] | None = None) -> str:
        """Id of the experiment called ``name``, created on first use."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            return found.experiment_id
        location = None
        if self.is_embedded:  # artifacts beside the database, not in the working directory
            location = (Path(self.uri[len("sqlite:///"):]).parent / "artifacts" / name).as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location, tags=tags)
        except MlflowException:  # another worker created it first
            return self.client.get_experiment_by_name(name).experiment_id

    @_timed
    def find_experiment(self, name: str) -> str | None:
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found else None

    # -------------------------------------------------------------------------- runs

    @_timed
    def start_run(self, experiment_id: str, name: str, parent_run_id: str | None = None,
                  tags: dict[str, str] | None = None) -> str:
        tags = {k: str(v) for k, v in (tags or {}).items()}  # the REST API takes strings only
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id  # what the UI nests by
        run = self.client.create_run(experiment_id, run_name=name, tags=tags)
        self._flushed_at[run.info.run_id] = time.monotonic()  # the metrics flush clock starts now
        return run.info.run_id

    @_timed
    def log_params(self, run_id: str, params: dict) -> None:
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])

    @_timed
    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        """All metrics of one step, written now (summaries; per-epoch metrics use queue_metrics)."""
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def queue_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        """Per-epoch metrics, stamped now and written together every METRICS_FLUSH_SECONDS;
        ``flush_metrics`` writes the rest when the run ends (however it ends)."""
        now = int(time.time() * 1000)
        queue = self._queued.setdefault(run_id, [])
        queue.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        last = self._flushed_at.get(run_id, float("-inf"))
        if time.monotonic() - last >= METRICS_FLUSH_SECONDS or len(queue) >= 500:  # log_batch takes 1000
            self.flush_metrics(run_id)

    @_timed
    def flush_metrics(self, run_id: str) -> None:
        """Write the queued metrics; they stay queued if the write fails."""
        queue = self._queued.get(run_id)
        if queue:
            self.client.log_batch(run_id, metrics=queue)
        self._queued.pop(run_id, None)
        self._flushed_at[run_id] = time.monotonic()

    @_timed
    def set_tags(self, run_id: str, tags: dict[str, object]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    @_timed
    def log_artifact(self, run_id: str, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), folder)

    @_timed
    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """status: FINISHED, FAILED or KILLED."""
        self.client.set_terminated(run_id, status=status)
        self._flushed_at.pop(run_id, None)

    @_timed
    def get_run(self, run_id: str):
        try:
            return self.client.get_run(run_id)
        except MlflowException:
            pass
        recent = self.client.search_runs(self.experiment_ids(), max_results=5, order_by=["attributes.start_time DESC"])
        known = ", ".join(f"{r.info.run_id} ({r.info.run_name})" for r in recent) or "(none)"
        raise MnistTuneError(f"no MLflow run with id {run_id!r} in {redact(self.uri)}; latest runs: {known}")

    def experiment_ids(self) -> list[str]:
        return [e.experiment_id for e in self.client.search_experiments()]

    def experiment_names(self) -> list[str]:
        return sorted(e.name for e in self.client.search_experiments())

    @_timed
    def run_exists(self, run_id: str) -> bool:
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            return False

    @_timed
    def set_status(self, run_id: str, status: str) -> None:
        self.client.update_run(run_id, status=status)

    @_timed
    def delete_run(self, run_id: str) -> None:
        self.client.set_terminated(run_id, status="KILLED")
        self.client.delete_run(run_id)

    @_timed
    def find_parent_runs(self, experiment_id: str, study: str) -> list[str]:
        """The study's parent runs, oldest first (ties broken by id, so every worker agrees)."""
        runs = self.client.search_runs(
            [experiment_id], f"tags.`mnist_tune.role` = 'study' AND tags.`mnist_tune.study` = '{study}'",
            max_results=50)
        return [r.info.run_id for r in sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))]

    @_timed
    def running_trial_runs(self, experiment_id: str) -> list:
        return self.client.search_runs([experiment_id], "tags.`mnist_tune.role` = 'trial' AND "
                                                        "attributes.status = 'RUNNING'", max_results=1000)

    @_timed
    def close_stale_run(self, run_id: str, reason: str) -> None:
        """A run whose process died: FAILED, with the reason as a tag (no-op if already closed)."""
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return
        if run.info.status == "RUNNING":
            self.client.log_batch(run_id, tags=[RunTag("mnist_tune.state", "FAIL"),
                                                RunTag("mnist_tune.error", reason)])
            self.client.set_terminated(run_id, status="FAILED")

    @_timed
    def search_trial_runs(self, experiment_id: str):
        """All trial runs of an experiment as a pandas DataFrame (params.*, metrics.*, tags.*)."""
        return mlflow.search_runs([experiment_id], filter_string="tags.`mnist_tune.role` = 'trial'",
                                  output_format="pandas")

    # ------------------------------------------------------------------------ models

    @_timed
    def log_model(self, run_id: str, model, example) -> str:
        """Log a torch model under ``runs:/<run_id>/model``; returns its ``models:/`` URI.

        pt2 (torch.export) makes the artifact self-contained: loading it needs torch and
        mlflow only, not this package or einops. ``example`` is a float array (N>1, 1, 28, 28).
        """
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(
                model, name=MODEL_NAME, **self._model_options(model, example),
                # MLflow would reload the model to validate the example (+40 % per call); the
                # reload is covered by the tests instead.
                validate_serving_input=False)
        # Leaving the block marked the run FINISHED; the caller sets the final status after.
        return info.model_uri

    @_timed
    def warm_up_model_logging(self, model, example) -> None:
        """Save ``model`` once to a throwaway folder, before the first trial.

        The first pt2 save in a process imports torch.export and has MLflow scan the installed
        packages (~2.5 s here; later saves ~0.14 s): paid here, once, it is not charged to the
        first trial that completes, and an architecture that cannot be exported at all fails
        before any training (other shapes of it are still exported per trial).
        """
        with tempfile.TemporaryDirectory() as folder:
            mlflow.pytorch.save_model(model, Path(folder) / MODEL_NAME, **self._model_options(model, example))

    def _model_options(self, model, example) -> dict:
        """log_model/save_model arguments. Moves ``model`` to the CPU in eval mode (what is saved)."""
        import torch
        from mlflow.models import infer_signature

        model = model.cpu().eval()
        with torch.inference_mode():
            output = model(torch.as_tensor(example)).numpy()
        return {"signature": infer_signature(example, output), "input_example": example,
                "serialization_format": self.model_format, "pip_requirements": MODEL_REQUIREMENTS}

    @_timed
    def promote_champion(self, registered_name: str, model_uri: str, run_id: str) -> str:
        """Register ``model_uri`` as a new version of ``registered_name`` and point the
        ``champion`` alias at it; returns the version."""
        return self._register_as_champion(registered_name, model_uri, run_id)

    def _register_as_champion(self, registered_name: str, model_uri: str, run_id: str) -> str:
        try:
            self.client.create_registered_model(registered_name)
        except MlflowException:
            pass  # already registered
        model_id = model_uri[len("models:/"):] if model_uri.startswith("models:/") else None
        version = self.client.create_model_version(registered_name, source=model_uri, run_id=run_id,
                                                   model_id=model_id)
        self.client.set_registered_model_alias(registered_name, CHAMPION, version.version)
        return version.version


    @_timed
    def make_champion(self, registered_name: str, run_id: str | None, model_uri: str | None) -> None:
        """Point ``champion`` at the version registered from ``run_id`` (registering
        ``model_uri`` if none is), so the alias ends on the best trial whatever order
        concurrent workers promoted in."""
        if not run_id or not model_uri:
            return
        versions = self.client.search_model_versions(f"name = '{registered_name}' AND run_id = '{run_id}'")
        if not versions:
            self._register_as_champion(registered_name, model_uri, run_id)
            return
        version = max(versions, key=lambda v: int(v.version)).version
        self.client.set_registered_model_alias(registered_name, CHAMPION, version)


def load_model(uri: str, tracking_uri: str | None = None):
    """Load a logged model (``runs:/…``, ``models:/…``) as a torch module on the CPU."""
    tracking_uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    try:
        return mlflow.pytorch.load_model(uri, map_location="cpu")
    except (MlflowException, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MnistTuneError(f"cannot load model {uri} from {redact(tracking_uri)}: {first}") from None


def trials_table(tracker: Tracker, study: str):
    """One row per trial run of ``study``: trial, state, objective, test_acc, params, run_id;
    best first by the study's metric."""
    experiment_id = tracker.find_experiment(study)
    if experiment_id is None:
        names = ", ".join(n for n in tracker.experiment_names() if n != "Default") or "(none)"
        raise MnistTuneError(f"no study {study!r} in MLflow at {redact(tracker.uri)}; studies: {names}")
    frame = tracker.search_trial_runs(experiment_id)
    if frame.empty:
        return frame
    parents = tracker.client.search_runs([experiment_id], "tags.`mnist_tune.role` = 'study'", max_results=1)
    params = parents[0].data.params if parents else {}
    metric, ascending = params.get("metric", "val_acc"), params.get("direction") == "minimize"
    table = frame.rename(columns=lambda c: c.split(".", 1)[1] if c.startswith(("params.", "metrics.")) else c)
    table["trial"] = frame["tags.mnist_tune.trial"].astype(int)
    table["state"] = frame["tags.mnist_tune.state"]
    hyper = sorted(c[len("params."):] for c in frame.columns if c.startswith("params.")
                   and c not in ("params.device", "params.parameters", "params.epochs", "params.model"))
    scores = [c for c in (metric, "val_acc", "val_loss", "test_acc") if c in table.columns]
    columns = ["trial", "state", *dict.fromkeys(scores), *hyper, "run_id"]
    return table[columns].sort_values(metric, ascending=ascending, na_position="last").reset_index(drop=True)
