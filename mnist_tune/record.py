"""A study's record in MLflow, and every tag and attribute name of it, spelled once.

    experiment  <study name>                      one per study
    parent run  study-<study name>                role=study; best trial, plots, the sweep file
    child run   trial-<n>  (mlflow.parentRunId)   role=trial; params, per-epoch metrics, model
    child run   confirm-<n>-seed<s>               role=confirmation; trial n retrained with seed s
    registry    mnist-<model>@champion            the best trial's model

The Optuna study links back with user attributes (``PARENT_ATTR`` on the study, ``RUN_ATTR``
on each trial). This module talks to MLflow only through a ``Tracker`` and imports neither
MLflow nor Optuna, so the read-only commands can use its names cheaply.
"""

from __future__ import annotations

import contextlib
import warnings

# MLflow run tags
ROLE = "mnist_tune.role"  # "study" (parent), "trial" or "confirmation" (children)
CONFIRMATION = "confirmation"  # ROLE of a run retraining a top trial with a new seed (confirm.py)
CONFIRMS_TRIAL = "mnist_tune.confirms_trial"  # on a confirmation run: the trial it retrains
CONFIRM_SEED = "mnist_tune.confirm_seed"
STUDY = "mnist_tune.study"
TRIAL = "mnist_tune.trial"
MODEL = "mnist_tune.model"
SAMPLER = "mnist_tune.sampler"
STATE = "mnist_tune.state"  # the trial's Optuna state: RUNNING, COMPLETE, PRUNED or FAIL
ERROR = "mnist_tune.error"
PRUNED = "mnist_tune.pruned"
RETRY_OF = "mnist_tune.retry_of_trial"
KIND = "mnist_tune.kind"  # "train" for a lone `mnist-tune train` run
FINGERPRINT = "mnist_tune.sweep_fingerprint"
BEST_TRIAL, BEST_RUN_ID = "best_trial", "best_run_id"  # on the parent run
CONFIRMED_TRIAL, CONFIRMED_RUN_ID = "confirmed_trial", "confirmed_run_id"  # on the parent: the best mean
DESCRIPTION = "mlflow.note.content"  # the run's description in the UI
TEST_METRIC = "test_acc"  # logged once, after the last epoch (also the trial's user attribute)
# How to use a trial's model without this package (README "What lands in MLflow"; tested there).
MODEL_CARD = ("Model: `runs:/<this run's id>/model` (a torch.export module). Reload with "
              "`mlflow.pytorch.load_model(uri)` - no mnist_tune or einops needed. It takes images shaped "
              "(N, 1, 28, 28) with pixels in [0, 1], any N, and normalises them itself. It is already in "
              "inference mode (dropout off): do not call `.eval()` or `.train()` (torch.export modules raise "
              "NotImplementedError); `.to(device)` works.")
# Optuna user attributes that link the two stores
PARENT_ATTR = "mlflow_parent_run_id"  # study -> its parent run
EXPERIMENT_ATTR = "mlflow_experiment_id"
RUN_ATTR = "mlflow_run_id"  # trial -> its child run
MODEL_URI_ATTR = "model_uri"
TEST_ACC_ATTR = TEST_METRIC
ERROR_ATTR = "error"
OBJECTIVES_ATTR = "objective_metrics"  # trial (multi-objective): every metric measured, by name
LIMITS_ATTR = "champion_limits"  # study: --max-params / --max-latency-ms, as {metric: limit}
CONFIRM_ATTR = "confirmation"  # study: the confirmation's state, seeds and results (confirm.py)
CONFIRM_CLAIM_PREFIX = "confirmation_claim:"  # study: + "<host>:<pid>" -> when that worker claimed it
CHAMPION = "champion"

# How a run ends, as (MLflow status, Optuna state)
FINISHED, PRUNED_END, FAILED, KILLED = ("FINISHED", "COMPLETE"), ("KILLED", "PRUNED"), ("FAILED", "FAIL"), \
    ("KILLED", "FAIL")


def registered_name(model: str) -> str:
    return f"mnist-{model}"


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def close_run(tracker, run_id: str, end: tuple[str, str], message: str = "") -> None:
    """Write the run's final state (and why) and end it."""
    status, state = end
    tags = {STATE: state}
    if message:
        tags[PRUNED if end == PRUNED_END else ERROR] = message
    tracker.set_tags(run_id, tags)
    tracker.end_run(run_id, status)


@contextlib.contextmanager
def run_lifecycle(tracker, run_id: str, pruned: tuple[type[BaseException], ...] = ()):
    """End ``run_id`` exactly once, however the block ends: FINISHED; KILLED if pruned (an
    exception of a ``pruned`` type) or interrupted (Ctrl-C, SIGTERM); FAILED with the error.
    A failure to close never hides the exception that ended the block."""
    try:
        yield
    except BaseException as e:
        if isinstance(e, pruned):
            end, message = PRUNED_END, str(e)
        else:
            end, message = (KILLED if isinstance(e, KeyboardInterrupt) else FAILED), error_text(e)
        try:
            close_run(tracker, run_id, end, message)
        except Exception as close_error:
            warnings.warn(f"run {run_id}: could not record how it ended ({close_error}); it ended with {e!r}")
        raise
    close_run(tracker, run_id, FINISHED)


def tracking_failure(tracker, run_id: str | None) -> str | None:
    """Once the writes queued before the run's model upload are made, why tracking failed for
    ``run_id`` (its run is then FAILED), or None. Asked before Optuna ends a trial: a trial
    whose run FAILED must not end COMPLETE. The upload itself overlaps the next trial; if it
    fails, the run is FAILED and the trial is not crowned (``StudyRecord.best_so_far``)."""
    tracker.background.drain(but_upload_of=run_id)
    return tracker.background.failures.get(run_id)


class StudyRecord:
    """The study's experiment and parent run, and the runs of its trials."""

    def __init__(self, tracker, study: str, experiment_id: str, parent_run_id: str):
        self.tracker, self.study = tracker, study
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id

    @classmethod
    def attach(cls, tracker, study: str, model: str, fingerprint: str, params: dict,
               sweep_file=None, known_parent: str | None = None) -> StudyRecord:
        """The study's one parent run, reopened: the known one if it still exists, else the
        oldest one found; when workers race to create it, the losers delete theirs."""
        experiment_id = tracker.experiment(study, tags={STUDY: study})
        if known_parent and tracker.run_status(known_parent) is not None:
            parent = known_parent
        else:
            found = cls._parent_runs(tracker, experiment_id, study)
            if not found:
                mine = tracker.start_run(experiment_id, f"study-{study}", tags={
                    ROLE: "study", STUDY: study, MODEL: model, FINGERPRINT: fingerprint})
                tracker.log_params(mine, params)
                if sweep_file is not None:
                    tracker.files.log_artifact(mine, sweep_file, "sweep")
                found = cls._parent_runs(tracker, experiment_id, study) or [mine]
                if mine in found[1:]:
                    tracker.delete_run(mine)
            parent = found[0]
        tracker.set_status(parent, "RUNNING")
        return cls(tracker, study, experiment_id, parent)

    @staticmethod
    def _parent_runs(tracker, experiment_id: str, study: str) -> list[str]:
        """Oldest first, ties broken by id, so every worker agrees on the winner."""
        runs = tracker.search_runs(experiment_id, f"tags.`{ROLE}` = 'study' AND tags.`{STUDY}` = '{study}'", 50)
        return [r.info.run_id for r in sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))]

    # ---- trials ---------------------------------------------------------------------

    def start_trial(self, number: int, model: str, sampler: str, retry_of: int | None = None) -> str:
        tags = {ROLE: "trial", STUDY: self.study, TRIAL: number, MODEL: model, SAMPLER: sampler, STATE: "RUNNING",
                DESCRIPTION: MODEL_CARD}
        if retry_of is not None:
            tags[RETRY_OF] = retry_of
        return self.tracker.start_run(self.experiment_id, f"trial-{number}", self.parent_run_id, tags)

    def start_confirmation(self, number: int, seed: int, model: str) -> str:
        tags = {ROLE: CONFIRMATION, STUDY: self.study, CONFIRMS_TRIAL: number, CONFIRM_SEED: seed, MODEL: model,
                DESCRIPTION: MODEL_CARD}
        return self.tracker.start_run(self.experiment_id, f"confirm-{number}-seed{seed}", self.parent_run_id, tags)

    def close_stale(self, run_id: str, reason: str) -> None:
        """A run whose worker died: FAILED with the reason (nothing if already closed)."""
        if self.tracker.run_status(run_id) == "RUNNING":
            close_run(self.tracker, run_id, FAILED, reason)

    def reconcile(self, states: dict[int, str], recording: frozenset[int] = frozenset()) -> None:
        """Trial runs still RUNNING whose trial (number -> Optuna state name) has ended, as
        after a crash between the two stores, are closed as FAILED; except the ``recording``
        trials, whose live worker may still be uploading their model."""
        running = self.tracker.search_runs(
            self.experiment_id, f"tags.`{ROLE}` = 'trial' AND attributes.status = 'RUNNING'")
        for run in running:
            number = int(run.data.tags.get(TRIAL, -1))
            if states.get(number, "RUNNING") != "RUNNING" and number not in recording:
                self.close_stale(run.info.run_id, f"trial {number} ended as {states[number]}")

    # ---- the best trial ---------------------------------------------------------------

    def promote(self, model: str, run_id: str, model_uri: str | None) -> None:
        """Point mnist-<model>@champion at the version registered from ``run_id``, registering
        ``model_uri`` first unless done already (so the alias ends on the best trial whatever
        order concurrent workers promoted in)."""
        if not run_id or not model_uri:
            return

        def promote():
            name = registered_name(model)
            versions = self.tracker.models.model_versions(name, run_id)
            version = versions[-1] if versions else self.tracker.models.register_model(name, model_uri)
            self.tracker.models.set_alias(name, CHAMPION, version)

        self.tracker.background.submit("promote", None, promote)  # after the model's upload, when that is queued

    def best_so_far(self, model: str, metric: str, value: float, test_acc: float, number: int, run_id: str,
                    model_uri: str | None) -> None:
        """A trial that beat every completed one: once its model is uploaded (the upload may
        still be running), promote it and log it on the parent; not if its tracking failed."""
        def crown():
            if run_id not in self.tracker.background.failures:
                self.promote(model, run_id, model_uri)
                self.log_best(metric, value, test_acc, number, run_id, step=number)

        self.tracker.background.submit("best so far", None, crown)

    def log_best(self, metric: str, value: float, test_acc: float, number: int, run_id: str,
                 step: int, **counts: int) -> None:
        self.tracker.metrics.log(self.parent_run_id, {f"best_{metric}": value, "best_test_acc": test_acc,
                                                      "best_trial": number, **counts}, step=step)
        self.tracker.set_tags(self.parent_run_id, {BEST_TRIAL: number, BEST_RUN_ID: run_id})

    def log_files(self, paths, folder: str) -> None:
        for path in paths:
            self.tracker.files.log_artifact(self.parent_run_id, path, folder)

    def end(self, status: str) -> None:
        self.tracker.end_run(self.parent_run_id, status)
