"""The Optuna side of a study: storage, sampler, pruner, the budget, and read-only queries.

The only module that creates Optuna objects. It imports neither torch nor MLflow, so
``best``, ``runs`` and ``status`` answer in about a second; worker.py trains.

    budget     --trials is the study's *total*: what is finished or in flight counts, except
               trials a race let start past the budget (closed at once as FAIL, user attr
               ``budget_surplus``, never trained or tracked), failures that were retried,
               trials copied from another study (warm start, ``copied_from``) and enqueued
               configurations not started yet (they count once they run).
    heartbeat  RDB storages get Optuna heartbeats; a trial whose worker died is failed by the
               next worker that looks and retried (RetryHeartbeatStaleTrialCallback) under a
               new number. A worker on the same host whose process is gone is dead at once.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from mnist_tune import record
from mnist_tune.checks import check_sqlite_store
from mnist_tune.errors import MnistTuneError
from mnist_tune.shims import stale_trial_ids
from mnist_tune.stores import first_line, redact, resolve_storage, sqlite_path

if TYPE_CHECKING:
    from mnist_tune.config import Sweep

optuna.logging.set_verbosity(optuna.logging.ERROR)  # we report trials ourselves, once each
# Heartbeats and retries are marked experimental since Optuna 2.8; they are what we rely on.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

# Optuna attributes of this project (those linking to MLflow are in record.py)
SURPLUS_ATTR = "budget_surplus"  # trial: started past the budget, never trained
COPIED_ATTR = "copied_from"  # trial: {"study": name, "trial": number} it was copied from (warm.py)
DUPLICATE_ATTR = "duplicate_of"  # trial: number of the earlier trial with the same params (not trained)
WORKER_ATTR = "worker"  # trial: "<host>:<pid>" of the process running it
BUDGET_ATTR = "budget"  # study: the last --trials, for `status`
FINGERPRINT_ATTR = "sweep_fingerprint"  # study: what the sweep must match on every rerun
SWEEP_ATTR = "sweep"  # study: the sweep's definition, metric included
SQLITE_TIMEOUT_S = 60  # a second process on the same SQLite file waits instead of failing
# Heartbeat defaults: a reader judges staleness with the same grace period as the workers.
HEARTBEAT_INTERVAL, GRACE_PERIOD = 10, 30


@dataclass(frozen=True)
class WorkerSettings:
    trials: int
    storage: str | None = None
    study_name: str | None = None
    timeout: float | None = None
    seed: int | None = None
    heartbeat_interval: int = HEARTBEAT_INTERVAL
    grace_period: int = GRACE_PERIOD
    max_retry: int = 2
    max_failures: int | None = None  # real failures (exceptions, NaN) that stop the worker
    finish_trial_on_signal: bool = False  # first SIGTERM/SIGINT: finish the current trial, then stop
    plots: bool = True  # on the parent run: updated as trials finish (HTML), PNGs too at the end
    pack: int | str = 1  # trials trained at once as one fused model, or "auto" (packed_worker.py)
    max_params: int | None = None  # multi-objective constraints (pareto.py): the champion's limits,
    max_latency_ms: float | None = None  # also the sampler's constraints_func
    confirm_top: int = 0  # after the budget, retrain the top K configurations ... (confirm.py)
    confirm_seeds: int | None = None  # ... with S new seeds each; the champion is the best mean
    enqueue: tuple[dict, ...] = ()  # configurations to add (study --enqueue; checked against the sweep)
    warm_start_from: str | None = None  # a study whose finished trials are copied in (warm.py)

    def __post_init__(self):
        if self.grace_period <= self.heartbeat_interval:  # else live workers would be declared dead
            raise MnistTuneError(f"--grace-period {self.grace_period} must exceed "
                                 f"--heartbeat-interval {self.heartbeat_interval}")



# -------------------------------------------------------------------------- storage


def open_storage(url: str | None, heartbeat_interval: int = HEARTBEAT_INTERVAL, grace_period: int = GRACE_PERIOD,
                 on_stale=None) -> optuna.storages.RDBStorage:
    """Connect to the RDB storage (checks it is reachable), with heartbeats on."""
    url = resolve_storage(url)
    scheme = urllib.parse.urlsplit(url).scheme
    if not scheme or scheme.split("+")[0] not in ("sqlite", "postgresql", "mysql"):
        raise MnistTuneError(f"unsupported storage URL {redact(url)} (use sqlite:///… or postgresql://…)")
    if sqlite_path(url) is not None:
        check_sqlite_store(url, "Optuna storage")
        sqlite_path(url).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    else:
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 5}}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                grace_period=grace_period, heartbeat_stale_trial_callback=on_stale)
        except Exception as e:  # sqlalchemy's OperationalError, a missing driver, a bad URL
            # Workers starting together on a fresh database race to create Optuna's tables;
            # the losers see "already exists"/"duplicate key" and simply open it again.
            racing = any(s in str(e) for s in ("already exists", "duplicate key"))
            if not racing or attempt == 4:
                raise MnistTuneError(f"cannot open Optuna storage {redact(url)}: {first_line(e)}") from None
            time.sleep(0.5 * (attempt + 1))


class NotThereYet(MnistTuneError):
    """The storage has no Optuna tables or no such study yet: worth waiting for (dashboard --wait)."""


def open_existing_storage(url: str | None) -> optuna.storages.RDBStorage:
    """The storage for a read command: a missing SQLite file or a database without Optuna's
    tables is an error, and nothing is created."""
    import sqlalchemy

    url = resolve_storage(url)
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme.split("+")[0] not in ("sqlite", "postgresql", "mysql"):
        raise MnistTuneError(f"unsupported storage URL {redact(url)} (use sqlite:///… or postgresql://…)")
    path = sqlite_path(url)
    if scheme.startswith("sqlite"):
        if path is None or not path.is_file():
            raise NotThereYet(f"no Optuna storage at {path or url}: run a study first, or give --storage")
        check_sqlite_store(url, "Optuna storage")
        engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    else:
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 5}}
    try:
        engine = sqlalchemy.create_engine(url, **engine_kwargs)
        try:
            has_studies = sqlalchemy.inspect(engine).has_table("studies")
        finally:
            engine.dispose()
        if not has_studies:
            raise NotThereYet(f"{redact(url)} holds no Optuna storage (no studies table): run a study first")
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, skip_table_creation=True,
                                          heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=GRACE_PERIOD)
    except MnistTuneError:
        raise
    except Exception as e:  # unreachable server, bad credentials, missing driver, not a database
        raise MnistTuneError(f"cannot open Optuna storage {redact(url)}: {first_line(e)}") from None


def study_names(storage) -> list[str]:
    return sorted(s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))


def check_study_exists(storage, name: str) -> None:
    """An unknown study name is an error listing the studies there are."""
    names = study_names(storage)
    if name not in names:
        raise NotThereYet(f"no study named {name!r} in this storage; studies: {', '.join(names) or '(none)'}")


def load_existing_study(storage, name: str) -> optuna.Study:
    check_study_exists(storage, name)
    return optuna.load_study(study_name=name, storage=storage)


# ----------------------------------------------------------------- live and dead workers


def this_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_gone(worker: str | None, since: datetime.datetime | None) -> bool:
    """True if ``worker`` ("host:pid") ran on this host and that process has exited (or its pid
    now belongs to a process started after ``since``, the trial's start)."""
    host, _, pid = (worker or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    started = _process_start(int(pid))
    return started is not None and since is not None and started > since.timestamp() + 1


def _process_start(pid: int) -> float | None:
    """When a process started (epoch seconds), from /proc; None where there is no /proc."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        # Boot time from the uptime, not /proc/stat's btime: that one is whole seconds, and the
        # wall clock drifts from it on a VM (seen: a 1.5 s margin failed under load).
        boot = time.time() - float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def dead_local_trials(study: optuna.Study) -> list[FrozenTrial]:
    """RUNNING trials whose worker ran on this host and has exited (killed, crashed)."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if _process_gone(t.user_attrs.get(WORKER_ATTR), t.datetime_start)]


def still_recording(trials: list[FrozenTrial], grace_period: float) -> frozenset[int]:
    """Ended trials whose run a live worker may still be writing (a model upload overlaps that
    worker's next trial): ended less than ``grace_period`` s ago by a worker not known gone."""
    now = datetime.datetime.now()  # Optuna's datetimes are naive local time
    return frozenset(t.number for t in trials if t.datetime_complete is not None
                     and (now - t.datetime_complete).total_seconds() < grace_period
                     and not _process_gone(t.user_attrs.get(WORKER_ATTR), t.datetime_start))


def live_trials(storage: optuna.storages.RDBStorage, study: optuna.Study) -> list[FrozenTrial]:
    """RUNNING trials whose worker still sends heartbeats and, on this host, still exists."""
    study_id = storage.get_study_id_from_name(study.study_name)
    stale = {storage.get_trial_number_from_id(i) for i in stale_trial_ids(storage, study_id)}
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.number not in stale and not _process_gone(t.user_attrs.get(WORKER_ATTR), t.datetime_start)]


# --------------------------------------------------------------------- study set-up


def sampler_seed(sweep: Sweep, seed: int | None, trials: int, live: bool) -> int:
    """The sampler's seed for a worker joining a study of ``trials`` trials (``seed``: --seed).
    Reproducible for a fresh study; a rerun continues with new draws instead of replaying the
    first ones; concurrent workers (``live`` trials) draw different points. Not the grid's:
    its seed shuffles the grid, which numbers the points that trials record, so it stays the
    same in every worker and rerun (else points are repeated and missed)."""
    seed = sweep.sampler.get("seed", 0) if seed is None else seed
    if sweep.sampler["name"] != "grid":
        seed += trials
        seed = seed * 100_003 + os.getpid() if live else seed
    return seed % 2**32


def make_sampler(sweep: Sweep, seed: int | None) -> optuna.samplers.BaseSampler:
    from mnist_tune.space import grid

    options = {k: v for k, v in sweep.sampler.items() if k != "name"}
    if seed is not None:
        options["seed"] = seed
    name = sweep.sampler["name"]
    if name == "grid":
        return optuna.samplers.GridSampler(grid(sweep), **options)
    if name == "tpe":  # packs and parallel workers ask while trials run (Optuna 5's default; 4.x's is off)
        options.setdefault("constant_liar", True)
    return {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
            "gp": optuna.samplers.GPSampler, "cmaes": optuna.samplers.CmaEsSampler,
            "nsga2": optuna.samplers.NSGAIISampler}[name](**options)


def make_pruner(sweep: Sweep) -> optuna.pruners.BasePruner:
    options = {k: v for k, v in sweep.pruner.items() if k != "name"}
    name = sweep.pruner["name"]
    if name == "median":
        return optuna.pruners.MedianPruner(**options)
    if name == "hyperband":
        options.setdefault("max_resource", sweep.epochs)
        return optuna.pruners.HyperbandPruner(**options)
    return optuna.pruners.NopPruner()


def create_or_load(storage, sweep: Sweep, name: str, seed: int | None, first_trials=()) -> optuna.Study:
    """The study, created on first use; its definition must match the sweep on every rerun.
    ``first_trials`` (copied from another study) go in before a new study's enqueued ones."""
    if name in study_names(storage):
        stored = optuna.load_study(study_name=name, storage=storage).user_attrs.get(FINGERPRINT_ATTR)
        if stored is not None and stored != sweep.fingerprint():
            raise MnistTuneError(
                f"study {name!r} was created from a different sweep (search space or settings differ from "
                f"{sweep.path}); use another --study-name or the original sweep file")
    directions = [d for _, d in sweep.objectives] or None  # several: a multi-objective study
    study = optuna.create_study(storage=storage, study_name=name, direction=None if directions else sweep.direction,
                                directions=directions,
                                sampler=make_sampler(sweep, seed), pruner=make_pruner(sweep), load_if_exists=True)
    study.add_trials(first_trials)
    if FINGERPRINT_ATTR not in study.user_attrs:
        for params in sweep.enqueue:  # trials 0, 1, ... of a new study (a copied equal one is enough)
            study.enqueue_trial(params, skip_if_exists=True)
        study.set_user_attr(FINGERPRINT_ATTR, sweep.fingerprint())
        study.set_user_attr(SWEEP_ATTR, {**sweep.definition(), "name": sweep.name, "sampler": sweep.sampler,
                                         "pruner": sweep.pruner, "file": Path(sweep.path).name,
                                         "enqueue": list(sweep.enqueue)})
    return study


# --------------------------------------------------------------------------- budget


@dataclass
class BudgetCount:
    complete: int = 0
    pruned: int = 0
    failed: int = 0  # real failures, counted against the budget
    running: int = 0
    waiting: int = 0  # retries queued by the heartbeat callback
    queued: int = 0  # enqueued configurations not started yet: not used until they run

    @property
    def used(self) -> int:
        return self.complete + self.pruned + self.failed + self.running + self.waiting

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed


def count_budget(trials: list[FrozenTrial], below: int | None = None) -> BudgetCount:
    """What counts against the budget: everything but surplus trials and retried failures."""
    retried = {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}
    count = BudgetCount()
    for t in trials:
        if (below is not None and t.number >= below) or t.user_attrs.get(SURPLUS_ATTR):
            continue
        if t.user_attrs.get(COPIED_ATTR):  # another study's work (warm start)
            continue
        if t.state == TrialState.FAIL and t.number in retried:
            continue
        if t.state == TrialState.WAITING and RetryHeartbeatStaleTrialCallback.retried_trial_number(t) is None:
            count.queued += 1  # so configurations enqueued past the budget wait for a larger one
            continue
        field = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
                 TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}[t.state]
        setattr(count, field, getattr(count, field) + 1)
    return count


# ------------------------------------------------------------------------- queries


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best trial of a single-objective study; None for a multi-objective one (pareto.py)."""
    if len(study.directions) > 1:
        return None
    try:
        best = study.best_trial
    except ValueError:  # no completed trial yet
        return None
    # A skipped duplicate ties with the trial it repeats (Optuna breaks ties either way): that one.
    original = best.user_attrs.get(DUPLICATE_ATTR)
    return best if original is None else next(t for t in study.get_trials() if t.number == original)


def study_metric(study: optuna.Study) -> str:
    return study.user_attrs.get(SWEEP_ATTR, {}).get("metric", "value")


@dataclass
class StudyStatus:
    name: str
    budget: int | None
    count: BudgetCount
    by_state: dict[str, int]
    live: list[FrozenTrial]
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
        key = "COPIED" if t.user_attrs.get(COPIED_ATTR) else key  # a warm start's, not this study's work
        by_state[key] = by_state.get(key, 0) + 1
    return StudyStatus(name, study.user_attrs.get(BUDGET_ATTR), count_budget(trials), by_state,
                       live_trials(storage, study), best_trial(study))


def best_record(study: optuna.Study) -> dict:
    """The best trial as ``best`` prints it (a multi-objective study: its Pareto front), with
    the anchors beside it (anchors.py), and the confirmed champion where the study confirmed
    its top configurations."""
    from mnist_tune import confirm, pareto
    from mnist_tune.anchors import anchors

    if pareto.is_multi(study):
        return {**pareto.best_record(study), "confirmed": confirm.summary(study)}
    trial = best_trial(study)
    if trial is None:
        raise MnistTuneError(f"study {study.study_name!r} has no completed trial yet")
    run_id = trial.user_attrs.get(record.RUN_ATTR)
    return {"study": study.study_name, "trial": trial.number, "metric": study_metric(study), "value": trial.value,
            "test_acc": trial.user_attrs.get(record.TEST_ACC_ATTR), "run_id": run_id,
            record.MODEL_URI_ATTR: f"runs:/{run_id}/model", "params": trial.params, **anchors(study),
            **({"confirmed": confirmed} if (confirmed := confirm.summary(study)) else {})}


def status_record(storage, name: str) -> dict:
    from mnist_tune import pareto

    st = study_status(storage, name)
    study = optuna.load_study(study_name=name, storage=storage)
    if pareto.is_multi(study):  # its champion (pareto.RULE) stands for the best, by its validation metric
        st.best = pareto.champion(study)
    value = st.best and (pareto.metrics_of(st.best).get(study_metric(study)) if pareto.is_multi(study)
                         else st.best.value)
    best = st.best and {"trial": st.best.number, "value": value,
                        "test_acc": st.best.user_attrs.get(record.TEST_ACC_ATTR),
                        "run_id": st.best.user_attrs.get(record.RUN_ATTR)}
    return {"study": name, "trials": st.by_state, "live_trials": [t.number for t in st.live],
            "live_workers": [t.user_attrs.get(WORKER_ATTR, "?") for t in st.live],
            "budget": st.budget, "used": st.count.used, "left": st.left, "best": best}


def trial_rows(study: optuna.Study) -> list[dict]:
    """One row per trial: number, state, the study metric (its last reported value for a
    trial that did not complete), test accuracy, params, MLflow run id; completed trials
    first, best first, then the others by their last value."""
    metric = study_metric(study)
    multi = len(study.directions) > 1
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get(SURPLUS_ATTR):
            continue
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        if multi and t.state == TrialState.COMPLETE:  # a multi-objective trial has one value per objective
            last = t.user_attrs.get(record.OBJECTIVES_ATTR, {}).get(metric)
        rows.append({"trial": t.number, "state": t.state.name,
                     metric: t.value if t.state == TrialState.COMPLETE and not multi else last,
                     "test_acc": t.user_attrs.get(record.TEST_ACC_ATTR), **t.params,
                     "run_id": t.user_attrs.get(record.RUN_ATTR)})
    if multi:
        from mnist_tune.pareto import objectives_of

        maximize = dict(objectives_of(study)).get(metric) == "maximize"
    else:
        maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    sign = -1 if maximize else 1
    return sorted(rows, key=lambda r: (r["state"] != "COMPLETE", r[metric] is None, sign * (r[metric] or 0),
                                       r["trial"]))
