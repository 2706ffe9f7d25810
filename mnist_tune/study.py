"""Optuna studies: create or load, keep to the budget, run trials, recover from dead workers.

The only module that creates Optuna objects. One call of ``run_study`` is one worker; any
number of workers (processes, hosts) may run it on the same study and storage at once:

    budget     --trials is the study's *total*. Before each trial a worker counts what is
               finished or in flight; a trial that a race let start past the budget is closed
               at once as FAIL (user attr ``budget_surplus``) and never trained or tracked.
    heartbeat  RDB storages get Optuna heartbeats; a trial whose worker died is failed by the
               next worker that looks, its MLflow run closed as FAILED, and it is retried
               (RetryHeartbeatStaleTrialCallback, bounded) under a new number.
    tracking   every trial has exactly one child run under the study's one parent run.
"""

from __future__ import annotations

import math
import os
import sys
import time
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from mnist_tune import stop
from mnist_tune.config import Sweep
from mnist_tune.errors import MnistTuneError
from mnist_tune.models import build_model
from mnist_tune.progress import bar
from mnist_tune.run import Diverged, input_example, split_hyperparameters, train_and_log
from mnist_tune.space import grid, suggest
from mnist_tune.tracking import Tracker, default_home, redact

optuna.logging.set_verbosity(optuna.logging.ERROR)  # we report trials ourselves, once each
# Heartbeats and retries are marked experimental since Optuna 2.8; they are what we rely on.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

PARENT_ATTR = "mlflow_parent_run_id"
RUN_ATTR = "mlflow_run_id"
SURPLUS_ATTR = "budget_surplus"
SQLITE_TIMEOUT_S = 60  # a second process on the same SQLite file waits instead of failing


@dataclass(frozen=True)
class WorkerSettings:
    trials: int
    storage: str | None = None
    study_name: str | None = None
    timeout: float | None = None
    seed: int | None = None
    heartbeat_interval: int = 10
    grace_period: int = 30
    max_retry: int = 2
    max_failures: int | None = None  # real failures (exceptions, NaN) that stop the worker
    finish_trial_on_signal: bool = False  # first SIGTERM/SIGINT: finish the current trial, then stop


def default_storage() -> str:
    return f"sqlite:///{default_home() / 'optuna.db'}"


# -------------------------------------------------------------------------- storage


def open_storage(url: str | None, settings: WorkerSettings, on_stale=None) -> optuna.storages.RDBStorage:
    """Connect to the RDB storage (checks it is reachable) with heartbeats on."""
    url = url or default_storage()
    scheme = urllib.parse.urlsplit(url).scheme
    if not scheme or scheme.split("+")[0] not in ("sqlite", "postgresql", "mysql"):
        raise MnistTuneError(f"unsupported storage URL {redact(url)} (use sqlite:///… or postgresql://…)")
    engine_kwargs = {}
    if scheme == "sqlite":
        path = Path(url[len("sqlite:///"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    else:
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 5}}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=settings.heartbeat_interval,
                grace_period=settings.grace_period, heartbeat_stale_trial_callback=on_stale)
        except Exception as e:  # sqlalchemy's OperationalError, a missing driver, a bad URL
            # Workers starting together on a fresh database race to create Optuna's tables;
            # the losers see "already exists"/"duplicate key" and simply open it again.
            racing = any(s in str(e) for s in ("already exists", "duplicate key"))
            if not racing or attempt == 4:
                raise MnistTuneError(f"cannot open Optuna storage {redact(url)}: {_first_line(e)}") from None
            time.sleep(0.5 * (attempt + 1))


def _first_line(error: Exception) -> str:
    text = str(getattr(error, "orig", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def study_names(storage) -> list[str]:
    return sorted(s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))


def load_existing_study(storage, name: str) -> optuna.Study:
    """Load a study by name; an unknown name is an error listing the studies there are."""
    names = study_names(storage)
    if name not in names:
        raise MnistTuneError(f"no study named {name!r} in this storage; studies: {', '.join(names) or '(none)'}")
    return optuna.load_study(study_name=name, storage=storage)


def live_trials(storage: optuna.storages.RDBStorage, study: optuna.Study) -> list[int]:
    """Numbers of RUNNING trials whose worker still sends heartbeats."""
    # Optuna has no public "stale trials" query; this is the one fail_stale_trials uses.
    stale = set(storage._get_stale_trial_ids(study._study_id))
    return [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t._trial_id not in stale]


# --------------------------------------------------------------------- study set-up


def make_sampler(sweep: Sweep, seed: int | None) -> optuna.samplers.BaseSampler:
    options = {k: v for k, v in sweep.sampler.items() if k != "name"}
    if seed is not None:
        options["seed"] = seed
    name = sweep.sampler["name"]
    if name == "tpe":
        return optuna.samplers.TPESampler(**options)
    if name == "random":
        return optuna.samplers.RandomSampler(**options)
    if name == "gp":
        return optuna.samplers.GPSampler(**options)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(**options)
    return optuna.samplers.GridSampler(grid(sweep), **options)


def make_pruner(sweep: Sweep) -> optuna.pruners.BasePruner:
    options = {k: v for k, v in sweep.pruner.items() if k != "name"}
    name = sweep.pruner["name"]
    if name == "median":
        return optuna.pruners.MedianPruner(**options)
    if name == "hyperband":
        options.setdefault("max_resource", sweep.epochs)
        return optuna.pruners.HyperbandPruner(**options)
    return optuna.pruners.NopPruner()


def create_or_load(storage, sweep: Sweep, name: str, seed: int | None) -> optuna.Study:
    """The study, created on first use; its definition must match the sweep on every rerun."""
    if name in study_names(storage):
        existing = optuna.load_study(study_name=name, storage=storage)
        stored = existing.user_attrs.get("sweep_fingerprint")
        if stored is not None and stored != sweep.fingerprint():
            raise MnistTuneError(
                f"study {name!r} was created from a different sweep (search space or settings differ from "
                f"{sweep.path}); use another --study-name or the original sweep file")
    study = optuna.create_study(storage=storage, study_name=name, direction=sweep.direction,
                                sampler=make_sampler(sweep, seed), pruner=make_pruner(sweep), load_if_exists=True)
    if "sweep_fingerprint" not in study.user_attrs:
        study.set_user_attr("sweep_fingerprint", sweep.fingerprint())
        study.set_user_attr("sweep", {**sweep.definition(), "name": sweep.name, "sampler": sweep.sampler,
                                      "pruner": sweep.pruner, "file": Path(sweep.path).name})
    return study


# --------------------------------------------------------------------------- budget


@dataclass
class BudgetCount:
    complete: int = 0
    pruned: int = 0
    failed: int = 0  # real failures, counted against the budget
    running: int = 0
    waiting: int = 0  # retries queued by the heartbeat callback

    @property
    def used(self) -> int:
        return self.complete + self.pruned + self.failed + self.running + self.waiting

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed


def _retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    return {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}


def count_budget(trials: list[FrozenTrial], below: int | None = None) -> BudgetCount:
    """What counts against the budget: everything but surplus trials and retried failures."""
    retried = _retried_numbers(trials)
    count = BudgetCount()
    for t in trials:
        if (below is not None and t.number >= below) or t.user_attrs.get(SURPLUS_ATTR):
            continue
        if t.state == TrialState.COMPLETE:
            count.complete += 1
        elif t.state == TrialState.PRUNED:
            count.pruned += 1
        elif t.state == TrialState.FAIL and t.number not in retried:
            count.failed += 1
        elif t.state == TrialState.RUNNING:
            count.running += 1
        elif t.state == TrialState.WAITING:
            count.waiting += 1
    return count


# --------------------------------------------------------------------------- worker


class Worker:
    """One process's share of a study: the objective, tracking, and the budget loop."""

    def __init__(self, sweep: Sweep, settings: WorkerSettings, tracker: Tracker, data, device, log=None):
        self.sweep, self.settings, self.tracker = sweep, settings, tracker
        self.data, self.device = data, device
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.name = settings.study_name or sweep.name
        self.retry = RetryHeartbeatStaleTrialCallback(max_retry=settings.max_retry)
        self.storage = open_storage(settings.storage, settings, on_stale=self._on_stale_trial)
        self.is_sqlite = (settings.storage or default_storage()).startswith("sqlite")
        self.study: optuna.Study | None = None
        self.experiment_id = self.parent_run_id = None
        self.trials_run = 0
        self.trial_seconds = self.trial_tracking_seconds = 0.0

    # ---- set-up -------------------------------------------------------------------

    def open(self) -> None:
        self.study = create_or_load(self.storage, self.sweep, self.name, self.settings.seed)
        if self.is_sqlite:
            self._refuse_second_sqlite_worker()
        self.study.sampler = make_sampler(self.sweep, self._sampler_seed())
        self.experiment_id = self.tracker.experiment(self.name, tags={"mnist_tune.study": self.name})
        self.parent_run_id = self._attach_parent_run()
        self.reconcile_runs()

    def _sampler_seed(self) -> int:
        """Reproducible for a fresh study; a rerun continues with new draws instead of
        replaying the first ones; concurrent workers (live trials) draw different points."""
        base = self.settings.seed if self.settings.seed is not None else self.sweep.sampler.get("seed", 0)
        seed = base + len(self.study.get_trials(deepcopy=False))
        if live_trials(self.storage, self.study):
            seed = seed * 100_003 + os.getpid()
        return seed % 2**32

    def _refuse_second_sqlite_worker(self) -> None:
        live = live_trials(self.storage, self.study)
        if live:
            raise MnistTuneError(
                f"study {self.name!r} already has a live worker (trial {live[0]} running) on SQLite storage; "
                "SQLite serialises writers, so run parallel workers against PostgreSQL (--storage postgresql://…)")

    def _attach_parent_run(self) -> str:
        """The study's one parent run: kept on the study; if workers race to create it, the
        earliest one wins and the others delete theirs."""
        known = self.study.user_attrs.get(PARENT_ATTR)
        if known and self.tracker.run_exists(known):
            self.tracker.set_status(known, "RUNNING")
            return known
        found = self.tracker.find_parent_runs(self.experiment_id, self.name)
        if not found:
            mine = self.tracker.start_run(self.experiment_id, f"study-{self.name}", tags={
                "mnist_tune.role": "study", "mnist_tune.study": self.name, "mnist_tune.model": self.sweep.model,
                "mnist_tune.sweep_fingerprint": self.sweep.fingerprint()})
            self.tracker.log_params(mine, self._study_params())
            if Path(self.sweep.path).is_file():
                self.tracker.log_artifact(mine, self.sweep.path, "sweep")
            found = self.tracker.find_parent_runs(self.experiment_id, self.name)
            for loser in found[1:]:
                if loser == mine:
                    self.tracker.delete_run(mine)
        parent = found[0]
        self.tracker.set_status(parent, "RUNNING")
        self.study.set_user_attr(PARENT_ATTR, parent)
        self.study.set_user_attr("mlflow_experiment_id", self.experiment_id)
        return parent

    def _study_params(self) -> dict:
        return {"study_name": self.name, "sweep": self.sweep.name, "model": self.sweep.model,
                "metric": self.sweep.metric, "direction": self.sweep.direction,
                "sampler": self.sweep.sampler["name"], "pruner": self.sweep.pruner["name"],
                "epochs": self.sweep.epochs, "val_size": self.sweep.val_size, "budget": self.settings.trials,
                **{f"fixed.{k}": v for k, v in self.sweep.fixed.items()}}

    # ---- reconciliation -------------------------------------------------------------

    def _on_stale_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Heartbeat callback: the trial's worker died. Close its run, then queue a retry."""
        run_id = trial.user_attrs.get(RUN_ATTR)
        if run_id:
            self.tracker.close_stale_run(run_id, f"worker stopped sending heartbeats (trial {trial.number})")
        self.log(f"trial {trial.number}: its worker died; marked FAIL and queued for retry")
        self.retry(study, trial)

    def reconcile_runs(self) -> None:
        """Child runs still RUNNING whose trial is no longer running (a crash between the two
        stores) are closed as FAILED."""
        states = {t.number: t.state for t in self.study.get_trials(deepcopy=False)}
        for run in self.tracker.running_trial_runs(self.experiment_id):
            number = int(run.data.tags.get("mnist_tune.trial", -1))
            if states.get(number) not in (TrialState.RUNNING, None):
                self.tracker.close_stale_run(run.info.run_id, f"trial {number} ended as {states[number].name}")

    # ---- the objective ----------------------------------------------------------------

    def objective(self, trial: optuna.Trial) -> float:
        started, tracked = time.perf_counter(), self.tracker.seconds
        try:
            return self._objective(trial)
        except Exception as e:  # keep the reason on the trial; Optuna records only FAIL
            if "error" not in trial.user_attrs and not isinstance(e, BudgetSurplus):
                trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:1000])
            raise
        finally:  # the tracking-overhead figure: MLflow time inside trials / trial wall time
            self.trial_seconds += time.perf_counter() - started
            self.trial_tracking_seconds += self.tracker.seconds - tracked

    def _objective(self, trial: optuna.Trial) -> float:
        trials = self.study.get_trials(deepcopy=False)
        frozen = next(t for t in trials if t.number == trial.number)  # a live Trial has no system attrs
        retry_of = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
        if retry_of is None and count_budget(trials, below=trial.number).used >= self.settings.trials:
            trial.set_user_attr(SURPLUS_ATTR, True)  # lost a race for the last slot: not run
            raise BudgetSurplus
        hp = suggest(trial, self.sweep)
        seed = (self.settings.seed or 0) + trial.number
        model_hp, train_hp = split_hyperparameters({**hp, "epochs": self.sweep.epochs, "seed": seed})
        tags = {"mnist_tune.role": "trial", "mnist_tune.study": self.name, "mnist_tune.trial": trial.number,
                "mnist_tune.model": self.sweep.model, "mnist_tune.sampler": self.sweep.sampler["name"],
                "mnist_tune.state": "RUNNING"}
        if retry_of is not None:
            tags["mnist_tune.retry_of_trial"] = retry_of
        run_id = self.tracker.start_run(self.experiment_id, f"trial-{trial.number}", self.parent_run_id, tags)
        trial.set_user_attr(RUN_ATTR, run_id)  # overwrites the one a retry inherits

        def report(epoch, metrics):
            value = getattr(metrics, self.sweep.metric)
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch} ({self.sweep.metric} {value:.4f})")

        try:
            outcome = train_and_log(self.tracker, run_id, self.sweep.model, model_hp, train_hp, self.data,
                                    self.device, on_epoch=report, progress_position=1)
        except optuna.TrialPruned as e:
            self._close(run_id, "KILLED", "PRUNED", str(e))
            raise
        except Diverged as e:
            trial.set_user_attr("error", str(e))
            self._close(run_id, "FAILED", "FAIL", str(e))
            raise
        except BaseException as e:  # a crash, Ctrl-C, SIGTERM: never leave the run RUNNING
            message = f"{type(e).__name__}: {e}"
            trial.set_user_attr("error", message[:1000])
            self._close(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", "FAIL", message)
            raise
        value = getattr(outcome.history[-1], self.sweep.metric)
        trial.set_user_attr("test_acc", outcome.test_acc)
        trial.set_user_attr("model_uri", outcome.model_uri)
        self._close(run_id, "FINISHED", "COMPLETE")
        self._maybe_promote(trial.number, value, outcome, run_id)
        return value

    def _close(self, run_id: str, status: str, state: str, message: str = "") -> None:
        tags = {"mnist_tune.state": state}
        if message:
            tags["mnist_tune.error" if state == "FAIL" else "mnist_tune.pruned"] = message
        self.tracker.set_tags(run_id, tags)
        self.tracker.end_run(run_id, status)

    def _is_better(self, value: float, than: float) -> bool:
        return value > than if self.sweep.direction == "maximize" else value < than

    def _maybe_promote(self, number: int, value: float, outcome, run_id: str) -> None:
        """Register the model as mnist-<model>@champion when this trial beats every completed one."""
        done = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if any(not self._is_better(value, t.value) for t in done if t.number != number):
            return
        self.tracker.promote_champion(f"mnist-{self.sweep.model}", outcome.model_uri, run_id)
        self.tracker.log_metrics(self.parent_run_id, {
            f"best_{self.sweep.metric}": value, "best_test_acc": outcome.test_acc, "best_trial": number}, step=number)
        self.tracker.set_tags(self.parent_run_id, {"best_trial": number, "best_run_id": run_id})

    # ---- the loop -----------------------------------------------------------------------

    def run(self) -> BudgetCount:
        """Run trials until the study's budget is used, the timeout passes or failures pile up."""
        started = time.monotonic()
        max_failures = self.settings.max_failures if self.settings.max_failures is not None else self.settings.trials
        count = count_budget(self.study.get_trials(deepcopy=False))
        trials_bar = bar(self.settings.trials, f"study {self.name}", "trial", initial=min(count.finished,
                                                                                             self.settings.trials))
        self.study.set_user_attr("budget", self.settings.trials)  # for `mnist-tune status`
        # Signals are acted on between training steps and between trials (stop.py says why).
        with stop.signals_deferred(finish_first=self.settings.finish_trial_on_signal), trials_bar:
            if count.used < self.settings.trials:  # trials to run: model logging's start-up cost, once, now
                self._warm_up_model_logging()
            while not stop.finish_requested():
                stop.raise_if_requested()
                if self.settings.timeout and time.monotonic() - started > self.settings.timeout:
                    break
                trials = self.study.get_trials(deepcopy=False)
                count = count_budget(trials)
                if count.waiting == 0 and count.used >= self.settings.trials:
                    if not count.running:
                        break
                    # Budget taken, but trials still run: wait until they finish or their worker is
                    # found dead (then they are retried here), so the study always completes.
                    stop.sleep(self.settings.heartbeat_interval)
                    optuna.storages.fail_stale_trials(self.study)
                    continue
                if count.failed >= max_failures:
                    raise MnistTuneError(f"study {self.name!r}: {count.failed} trials failed (limit {max_failures}); "
                                         "see the mnist_tune.error tags of their MLflow runs")
                self.study.optimize(self.objective, n_trials=1, catch=(Exception,),
                                    callbacks=[self._after_trial(trials_bar)])
            if stop.finish_requested():
                raise stop.Interrupted("stopped after finishing the current trial, as asked", stop.finish_requested())
        return count_budget(self.study.get_trials(deepcopy=False))

    def _warm_up_model_logging(self) -> None:
        try:
            self.tracker.warm_up_model_logging(build_model(self.sweep.model), input_example(self.data))
        except Exception as e:  # every trial's model would fail the same way: stop before training
            raise MnistTuneError(f"cannot save a {self.sweep.model} model with MLflow: {_first_line(e)}") from e

    def _after_trial(self, trials_bar):
        def callback(study: optuna.Study, trial: FrozenTrial) -> None:
            if trial.user_attrs.get(SURPLUS_ATTR):
                return
            self.trials_run += 1
            trials_bar.update(1)
            if trial.state == TrialState.FAIL:
                self.log(f"trial {trial.number} failed: {trial.user_attrs.get('error', 'see its MLflow run')}")
            try:
                trials_bar.set_postfix(best=f"{study.best_value:.4f}")
            except ValueError:
                pass  # no completed trial yet
        return callback

    # ---- the end --------------------------------------------------------------------------

    def finish(self, plots: bool = True) -> None:
        """Close the parent run when the study's budget is spent and nothing runs; attach
        plots. Idempotent, so every worker may call it."""
        self.reconcile_runs()
        count = count_budget(self.study.get_trials(deepcopy=False))
        if count.running or count.waiting or count.used < self.settings.trials:
            return
        completed = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if completed:
            best = self.study.best_trial
            self.tracker.log_metrics(self.parent_run_id, {
                f"best_{self.sweep.metric}": best.value, "best_test_acc": best.user_attrs.get("test_acc", math.nan),
                "best_trial": best.number, "trials_complete": count.complete, "trials_pruned": count.pruned,
                "trials_failed": count.failed}, step=len(self.study.trials))
            self.tracker.set_tags(self.parent_run_id, {"best_trial": best.number,
                                                       "best_run_id": best.user_attrs.get(RUN_ATTR, "")})
            self.tracker.make_champion(f"mnist-{self.sweep.model}", best.user_attrs.get(RUN_ATTR),
                                       best.user_attrs.get("model_uri"))
            if plots:
                self._log_plots()
        self.tracker.end_run(self.parent_run_id, "FINISHED")

    def _log_plots(self) -> None:
        import tempfile

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as ovm

        makers = {"optimization_history": ovm.plot_optimization_history,
                  "param_importances": ovm.plot_param_importances,
                  "parallel_coordinate": ovm.plot_parallel_coordinate,
                  "intermediate_values": ovm.plot_intermediate_values}
        with tempfile.TemporaryDirectory() as tmp:
            for name, make in makers.items():
                try:
                    axes = make(self.study)
                except Exception as e:  # e.g. importances need two completed trials
                    self.log(f"plot {name} skipped: {_first_line(e)}")
                    continue
                figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
                figure.set_size_inches(10, 6)
                path = Path(tmp) / f"{name}.png"
                figure.savefig(path, dpi=90, bbox_inches="tight")
                plt.close(figure)
                self.tracker.log_artifact(self.parent_run_id, path, "plots")

    def interrupted(self) -> None:
        """After Ctrl-C/SIGTERM: if no other worker is mid-trial, the parent run is KILLED."""
        if self.parent_run_id and not count_budget(self.study.get_trials(deepcopy=False)).running:
            self.tracker.end_run(self.parent_run_id, "KILLED")


class BudgetSurplus(Exception):
    """This trial started after the budget was used up by others; it ends FAIL, untrained."""


@dataclass
class StudyStatus:
    name: str
    budget: int | None
    count: BudgetCount
    by_state: dict[str, int]
    live: list[int]
    best: FrozenTrial | None

    @property
    def left(self) -> int | None:
        return None if self.budget is None else max(0, self.budget - self.count.used)


def study_status(storage, name: str) -> StudyStatus:
    """Trials by state, live trials (by heartbeat), budget left and best so far."""
    study = load_existing_study(storage, name)
    trials = study.get_trials(deepcopy=False)
    by_state: dict[str, int] = {}
    for t in trials:
        key = "SURPLUS" if t.user_attrs.get(SURPLUS_ATTR) else t.state.name
        by_state[key] = by_state.get(key, 0) + 1
    try:
        best = study.best_trial
    except ValueError:
        best = None
    live = live_trials(storage, study) if storage.get_heartbeat_interval() else []
    return StudyStatus(name, study.user_attrs.get("budget"), count_budget(trials), by_state, live, best)
