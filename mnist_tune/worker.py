"""One worker's share of a study: an objective that trains a trial into its own MLflow run,
and a loop that keeps to the study's budget. Any number of workers (processes, hosts) may
run on the same study at once; study.py says how the budget and dead workers are handled.

    worker = Worker(sweep, WorkerSettings(trials=40), Tracker(), data, device)
    worker.open(); worker.run(); worker.finish()
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from mnist_tune import confirm, pareto, record, stop, warm
from mnist_tune.config import Sweep
from mnist_tune.errors import MnistTuneError
from mnist_tune.packed_worker import pack_problem, resolve_pack, run_pack_round
from mnist_tune.progress import bar
from mnist_tune.space import suggest
from mnist_tune.stores import first_line, resolve_storage, sqlite_path
from mnist_tune.study import (
    BUDGET_ATTR,
    SURPLUS_ATTR,
    WORKER_ATTR,
    BudgetCount,
    WorkerSettings,
    best_trial,
    count_budget,
    create_or_load,
    dead_local_trials,
    live_trials,
    make_sampler,
    open_storage,
    sampler_seed,
    still_recording,
    this_worker,
)
from mnist_tune.tracking import WARM_UP, Tracker
from mnist_tune.tunables import split_hyperparameters

PLOTS_EVERY = 10  # trials between updates of the parent run's plots (by the helper only; all at the end)


class BudgetSurplus(Exception):
    """This trial started after the budget was used up by others; it ends FAIL, untrained."""


class Objective:
    """A trial: sample hyperparameters, train them into the trial's own child run, report each
    epoch (Optuna may prune), and promote the model if it is the best so far."""

    def __init__(self, worker: Worker):
        self.sweep, self.settings, self.study = worker.sweep, worker.settings, worker.study
        self.record, self.tracker, self.data, self.device = worker.record, worker.tracker, worker.data, worker.device
        self.log = worker.log
        self.seconds = self.tracking_seconds = 0.0  # inside trials: wall time, and MLflow's share of it

    def __call__(self, trial: optuna.Trial) -> float:
        started, tracked, self.run_id = time.perf_counter(), self.tracker.seconds, None
        try:
            return self._train(trial)
        except BaseException as e:  # keep the reason on the trial; Optuna records only FAIL
            if not isinstance(e, (BudgetSurplus, optuna.TrialPruned)) and record.ERROR_ATTR not in trial.user_attrs:
                trial.set_user_attr(record.ERROR_ATTR, record.error_text(e)[:1000])
            raise
        finally:
            self.tracker.background.drain(but_upload_of=self.run_id)  # record.tracking_failure says why
            self.seconds += time.perf_counter() - started
            self.tracking_seconds += self.tracker.seconds - tracked

    def _train(self, trial: optuna.Trial) -> float:
        from mnist_tune.run import train_and_log  # torch: only where trials train
        from mnist_tune.train import TrainConfig

        trials = self.study.get_trials(deepcopy=False)
        retry_of = RetryHeartbeatStaleTrialCallback.retried_trial_number(
            next(t for t in trials if t.number == trial.number))  # a live Trial has no system attrs
        if retry_of is None and count_budget(trials, below=trial.number).used >= self.settings.trials:
            trial.set_user_attr(SURPLUS_ATTR, True)  # lost a race for the last slot: not run
            raise BudgetSurplus
        trial.set_user_attr(WORKER_ATTR, this_worker())
        seed = (self.settings.seed or 0) + trial.number
        hp = {**suggest(trial, self.sweep), "epochs": self.sweep.epochs, "seed": seed}
        if (earlier := warm.earlier_same(self.study, trial)) is not None:  # never train a configuration twice
            return warm.skip_duplicate(trial, earlier, self.sweep.metric, self.log)
        model_hp, train_hp = split_hyperparameters(hp)
        run_id = self.run_id = self.record.start_trial(trial.number, self.sweep.model, self.sweep.sampler["name"],
                                                       retry_of)
        trial.set_user_attr(record.RUN_ATTR, run_id)  # overwrites the one a retry inherits

        def report(epoch, metrics):
            if self.sweep.objectives:  # Optuna cannot report or prune multi-objective trials
                return
            value = getattr(metrics, self.sweep.metric)
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch} ({self.sweep.metric} {value:.4f})")

        with record.run_lifecycle(self.tracker, run_id, pruned=(optuna.TrialPruned,)):
            outcome = train_and_log(self.tracker, run_id, self.sweep.model, model_hp, TrainConfig(**train_hp),
                                    self.data, self.device, on_epoch=report, progress_position=1)
            trial.set_user_attr(record.TEST_ACC_ATTR, outcome.test_acc)
            trial.set_user_attr(record.MODEL_URI_ATTR, outcome.model_uri)
            if self.sweep.objectives:  # measured before the run closes, so a failure here fails it
                values = pareto.measure(self.sweep, self.settings, self.tracker, trial, run_id, outcome, model_hp)
        if failed := record.tracking_failure(self.tracker, run_id):
            raise MnistTuneError(f"its MLflow run {run_id} is FAILED: tracking failed ({failed})")
        if self.sweep.objectives:
            return values
        value = getattr(outcome.history[-1], self.sweep.metric)
        done = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if all(self._better(value, t.value) for t in done if t.number != trial.number):
            self.record.best_so_far(self.sweep.model, self.sweep.metric, value, outcome.test_acc, trial.number, run_id,
                                    outcome.model_uri)
        return value

    def _better(self, value: float, than: float) -> bool:
        return value > than if self.sweep.direction == "maximize" else value < than


def second_sqlite_worker(name: str, live: FrozenTrial) -> MnistTuneError:
    """The refusal of a second worker on SQLite, naming where the live one runs."""
    where = live.user_attrs.get(WORKER_ATTR, "another process")
    return MnistTuneError(
        f"study {name!r} already has a live worker (trial {live.number} running in {where}) on "
        "SQLite storage; SQLite serialises writers, so run parallel workers against PostgreSQL "
        "(--storage postgresql://…)")


class Worker:
    """One process's share of a study: the objective and the budget loop."""

    def __init__(self, sweep: Sweep, settings: WorkerSettings, tracker: Tracker, data, device, log=None):
        self.sweep, self.settings, self.tracker, self.data, self.device = sweep, settings, tracker, data, device
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.name = settings.study_name or sweep.name
        self.retry = RetryHeartbeatStaleTrialCallback(max_retry=settings.max_retry)
        self.storage = open_storage(settings.storage, settings.heartbeat_interval, settings.grace_period,
                                    on_stale=self._on_stale_trial)
        self.study: optuna.Study | None = None
        self.record: record.StudyRecord | None = None
        self.objective: Objective | None = None
        self.trials_run = 0
        self.pack = 1  # trials per pack (run_study resolves --pack); 1: one trial at a time, optimize

    def open(self) -> None:
        copies, line = ((), None) if not self.settings.warm_start_from else warm.warm_start_trials(
            self.storage, self.settings.warm_start_from, self.sweep, self.name)
        self.study = create_or_load(self.storage, self.sweep, self.name, self.settings.seed, first_trials=copies)
        if line:
            self.log(line)
        study_id = self.storage.get_study_id_from_name(self.name)
        dead = dead_local_trials(self.study)  # no grace period to wait out for these
        for trial in dead:
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            if self.storage.set_trial_state_values(trial_id, TrialState.FAIL):
                self._on_stale_trial(self.study, trial)  # its run is closed once the record is attached
        live = live_trials(self.storage, self.study)
        if live and sqlite_path(resolve_storage(self.settings.storage)):
            raise second_sqlite_worker(self.name, live[0])
        warm.enqueue(self.study, self.settings.enqueue, "--enqueue", self.settings.trials, self.log)
        seed = sampler_seed(self.sweep, self.settings.seed, len(self.study.get_trials(deepcopy=False)), bool(live))
        self.study.sampler = make_sampler(self.sweep, seed)
        pareto.store_limits(self.study, self.settings)
        self.record = record.StudyRecord.attach(
            self.tracker, self.name, self.sweep.model, self.sweep.fingerprint(),
            study_params(self.sweep, self.name, self.settings.trials),
            self.sweep.path if os.path.isfile(self.sweep.path) else None,
            self.study.user_attrs.get(record.PARENT_ATTR))
        self.study.set_user_attr(record.PARENT_ATTR, self.record.parent_run_id)
        self.study.set_user_attr(record.EXPERIMENT_ATTR, self.record.experiment_id)
        for trial in dead:
            self._close_dead_run(trial)
        self._reconcile(self.study.get_trials(deepcopy=False))
        self.objective = Objective(self)

    def _reconcile(self, trials: list[FrozenTrial]) -> None:
        self.record.reconcile({t.number: t.state.name for t in trials},
                              still_recording(trials, self.settings.grace_period))

    def _on_stale_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """The trial's worker died: close its run, then queue a retry."""
        if self.record is not None:
            self._close_dead_run(trial)
        self.log(f"trial {trial.number}: its worker died; marked FAIL and queued for retry")
        self.retry(study, trial)

    def _close_dead_run(self, trial: FrozenTrial) -> None:
        if trial.user_attrs.get(record.RUN_ATTR):
            self.record.close_stale(trial.user_attrs[record.RUN_ATTR],
                                    f"worker stopped sending heartbeats (trial {trial.number})")

    # ---- the loop -----------------------------------------------------------------------

    def run(self) -> BudgetCount:
        """Run trials until the study's budget is used, the timeout passes or failures pile up."""
        started, budget = time.monotonic(), self.settings.trials
        max_failures = self.settings.max_failures or budget
        count = count_budget(self.study.get_trials(deepcopy=False))
        self.study.set_user_attr(BUDGET_ATTR, budget)  # for `mnist-tune status`
        trials_bar = bar(budget, f"study {self.name}", "trial", initial=min(count.finished, budget))
        # Signals are acted on between training steps and between trials (stop.py says why).
        with stop.signals_deferred(finish_first=self.settings.finish_trial_on_signal), trials_bar:
            if count.used < budget:  # trials to run: model logging's start-up cost, once, now
                warm_up_model_logging(self.tracker, self.sweep.model, self.data)
            while not stop.finish_requested():
                stop.raise_if_requested()
                if error := self.tracker.background.failures.get(WARM_UP):  # no model could be saved
                    raise MnistTuneError(f"cannot save a {self.sweep.model} model with MLflow: {error}")
                if self.settings.timeout and time.monotonic() - started > self.settings.timeout:
                    break
                count = count_budget(self.study.get_trials(deepcopy=False))
                if count.waiting == 0 and count.used >= budget:
                    if not count.running:
                        break
                    # Budget taken, but trials still run: wait until they finish or their worker is
                    # found dead (then they are retried here), so the study always completes.
                    stop.sleep(self.settings.heartbeat_interval)
                    optuna.storages.fail_stale_trials(self.study)
                    continue
                if count.failed >= max_failures:
                    raise MnistTuneError(f"study {self.name!r}: {count.failed} trials failed (limit {max_failures}); "
                                         f"see the {record.ERROR} tags of their MLflow runs")
                if self.pack > 1:  # K trials at once as fused packs (packed_worker.py)
                    run_pack_round(self, self.pack, trials_bar)
                    continue
                self.study.optimize(self.objective, n_trials=1, catch=(Exception,),
                                    callbacks=[lambda study, trial: self._after_trial(trial, trials_bar)])
            if stop.finish_requested():
                raise stop.Interrupted("stopped after finishing the current trial, as asked", stop.finish_requested())
        return count_budget(self.study.get_trials(deepcopy=False))

    def _after_trial(self, trial: FrozenTrial, trials_bar) -> None:
        if trial.user_attrs.get(SURPLUS_ATTR):
            return
        self.trials_run += 1
        trials_bar.update(1)
        if trial.state == TrialState.FAIL:
            self.log(f"trial {trial.number} failed: {trial.user_attrs.get(record.ERROR_ATTR, 'see its MLflow run')}")
        if (best := best_trial(self.study)) is not None:
            trials_bar.set_postfix(best=f"{best.value:.4f}")
        # The parent's plots follow the study where the helper process draws them (which also
        # pays their imports before the end); on the training thread they would cost ~2.5 s each.
        if self.settings.plots and self.tracker.background.helper and self.trials_run % PLOTS_EVERY == 0 \
                and count_budget(self.study.get_trials(deepcopy=False)).used < self.settings.trials:  # else: finish
            self._log_plots()

    # ---- the end --------------------------------------------------------------------------

    def finish(self) -> None:
        """Close the parent run when the study's budget is spent and nothing runs; attach
        plots. Idempotent, so every worker may call it."""
        trials = self.study.get_trials(deepcopy=False)
        self._reconcile(trials)
        count = count_budget(trials)
        if count.running or count.waiting or count.used < self.settings.trials:
            return
        best = best_trial(self.study)
        if best is not None:
            run_id = best.user_attrs.get(record.RUN_ATTR, "")
            self.record.log_best(self.sweep.metric, best.value, best.user_attrs.get(record.TEST_ACC_ATTR, math.nan),
                                 best.number, run_id, step=len(trials), trials_complete=count.complete,
                                 trials_pruned=count.pruned, trials_failed=count.failed)
            if run_id in self.tracker.background.failures:  # its model upload failed (record.tracking_failure)
                self.log(f"trial {best.number}: its model was not stored; the champion alias stays where it was")
            else:
                self.record.promote(self.sweep.model, run_id, best.user_attrs.get(record.MODEL_URI_ATTR))
                report_champion(self.tracker, run_id, self.data)
            if self.settings.plots:
                self._log_plots()
        if self.sweep.objectives:
            pareto.finish(self, trials, count)
        if not confirm.run(self):
            return  # another worker confirms the top configurations, then closes the parent run
        self.record.end("FINISHED")

    def _log_plots(self, png: bool = True) -> None:
        self.tracker.background.run("plots", None, log_study_plots, resolve_storage(self.settings.storage),
                                   self.name, self.sweep.metric, self.record.parent_run_id, png)

    def interrupted(self) -> None:
        """After Ctrl-C/SIGTERM: if no other worker is mid-trial, the parent run is KILLED."""
        if self.record and not count_budget(self.study.get_trials(deepcopy=False)).running:
            self.record.end("KILLED")


def run_study(sweep: Sweep, settings: WorkerSettings, tracking_uri: str | None, data_dir, device: str,
              threads: int | None = None, log=None, tracker: Tracker | None = None) -> list[str]:
    """``mnist-tune study``: join the study, run trials until its budget is spent, close it.
    Returns the summary lines to print. ``tracker`` replaces the one made for ``tracking_uri``
    (the benchmarks pass a NullTracker)."""
    import torch

    from mnist_tune.data import load_mnist
    from mnist_tune.train import resolve_device

    started = time.perf_counter()
    if settings.pack not in (1, "auto") and (problem := pack_problem(sweep)):
        raise MnistTuneError(problem)
    torch_device = resolve_device(device)
    if threads:
        torch.set_num_threads(threads)
    tracker = tracker or Tracker(tracking_uri)  # checks a server is reachable; writes nothing yet
    worker = Worker(sweep, settings, tracker, None, torch_device, log)  # a bad storage fails here, nothing written
    # MLflow writes leave the training thread; model exports, plots and the report leave the
    # process too where a core is spare: training's OpenMP threads stall whenever one of them
    # loses its core (epochs 2-3x slower on 2 cores with the helper, benchmarks/RESULTS.md).
    spare_core = torch_device.type != "cpu" or (os.cpu_count() or 1) > torch.get_num_threads()
    tracker.background.start(log, helper=spare_core)
    try:
        # Moved to the device once per worker, not once per trial; meanwhile the MLflow store
        # opens and the helper process imports.
        worker.data = load_mnist(data_dir, val_size=sweep.val_size, seed=sweep.seed).to(torch_device)
        worker.pack = resolve_pack(settings.pack, sweep, worker.data, torch_device, worker.log, settings.trials)
        worker.open()
        try:
            count = worker.run()
        except KeyboardInterrupt as e:  # stop.Interrupted (SIGTERM, Ctrl-C), or Ctrl-C outside the loop
            worker.interrupted()
            tracker.background.close(stopping=True)
            e.outcome = "the current trial was closed, rerun the command to finish the study"
            raise
        with stop.signals_deferred():  # the trials are done: a signal now waits for their record to be complete
            worker.finish()
            tracker.background.close()
        return summary(worker, count, time.perf_counter() - started)
    finally:
        tracker.background.close()  # everything queued is written (a second Ctrl-C stops waiting)


def summary(worker: Worker, count: BudgetCount, wall: float) -> list[str]:
    """What the study did, its best trial, and what tracking cost."""
    budget, tracker = worker.settings.trials, worker.tracker
    lines = [f"study {worker.name}: {count.finished}/{budget} trials ({count.complete} complete, "
             f"{count.pruned} pruned, {count.failed} failed) in {wall:.0f} s"
             + (f"; this worker ran {worker.trials_run}" if worker.trials_run != count.finished else "")]
    best = best_trial(worker.study)
    if worker.sweep.objectives:
        lines += pareto.summary_lines(worker.study)
    elif best is None:
        lines.append("no completed trial yet")
    else:
        run_id = best.user_attrs.get(record.RUN_ATTR, "?")
        lines += [f"best trial {best.number}: {worker.sweep.metric} {best.value:.4f}  test_acc "
                  f"{best.user_attrs.get(record.TEST_ACC_ATTR, math.nan):.4f}  run {run_id}",
                  f"model: runs:/{run_id}/model"]
    lines += confirm.summary_lines(worker.study)
    top = sorted(tracker.seconds_by_call.items(), key=lambda kv: -kv[1])[:3]
    background = tracker.background
    lines.append(f"tracking: {tracker.seconds:.1f} s in MLflow calls ({100 * tracker.seconds / wall:.1f} % of wall "
                 "time: " + ", ".join(f"{name} {sec:.1f} s" for name, sec in top) + ")"
                 + (f"; {background.seconds:.1f} s more in the background" if background.writer else ""))
    if background.failures:
        lines.append(f"tracking failed for {len(background.failures)} run(s), marked FAILED: "
                     + "; ".join(f"{run} {why}" for run, why in background.failures.items()))
    inside = worker.objective
    if inside.seconds:
        lines.append(f"  inside trials: {inside.tracking_seconds:.1f} s of {inside.seconds:.0f} s "
                     f"({100 * inside.tracking_seconds / inside.seconds:.1f} %)")
    lines.append("UI: mnist-tune ui" + ("" if tracker.is_embedded else f" or {tracker.uri}"))
    return lines


def study_params(sweep: Sweep, name: str, budget: int) -> dict:
    """The parent run's params: what the study is."""
    return {"study_name": name, "sweep": sweep.name, "model": sweep.model, "metric": sweep.metric,
            "direction": sweep.direction, "sampler": sweep.sampler["name"], "pruner": sweep.pruner["name"],
            "epochs": sweep.epochs, "val_size": sweep.val_size, "budget": budget,
            **({"objectives": ",".join(f"{m}:{d}" for m, d in sweep.objectives)} if sweep.objectives else {}),
            **{f"fixed.{k}": v for k, v in sweep.fixed.items()}}


def warm_up_model_logging(tracker: Tracker, model: str, data) -> None:
    """Pay model logging's one-time start-up before the first trial; a model that cannot be
    saved would fail every trial the same way, so it stops the worker before any training."""
    from mnist_tune.models import build_model
    from mnist_tune.run import input_example

    try:
        tracker.models.warm_up_model_logging(build_model(model), input_example(data))
    except Exception as e:
        raise MnistTuneError(f"cannot save a {model} model with MLflow: {first_line(e)}") from e


def report_champion(tracker: Tracker, run_id: str, data) -> None:
    """Per-class precision/recall and the confusion matrix on the best trial's run, from its
    logged model (as `mnist-tune evaluate` does), so the UI shows where the champion errs."""
    if run_id:
        # As numpy: tensors would be pickled through shared memory on the writer thread (tracking.to_bytes says why not)
        tracker.background.run("champion report", None, _report, run_id, data.test_x.cpu().numpy(),
                              data.test_y.cpu().numpy())


def _report(tracker: Tracker, run_id: str, images, labels) -> None:
    import torch

    from mnist_tune.report import classifier_report, log_report

    model = tracker.models.load_model(f"runs:/{run_id}/model")
    if model is not None:
        log_report(tracker, run_id, classifier_report(model, torch.from_numpy(images), torch.from_numpy(labels)))


def log_study_plots(tracker: Tracker, storage: str, name: str, metric: str, run_id: str, png: bool) -> None:
    """Draw the study's plots (plots.py; a multi-objective study: its Pareto front) and log
    them to its parent run."""
    from mnist_tune.plots import write_pareto_plots, write_study_plots

    study = optuna.load_study(study_name=name, storage=storage)
    with tempfile.TemporaryDirectory() as folder:
        paths = (write_pareto_plots(study, Path(folder), png=png) if pareto.is_multi(study)
                 else write_study_plots(study, Path(folder), metric, png=png))
        for path in paths:
            tracker.files.log_artifact(run_id, path, "plots")
