"""Multi-objective studies: what a trial measures, the Pareto front, and the champion's rule.

A sweep with ``study.objectives`` (config.py) makes a multi-objective Optuna study, e.g.

    objectives: [{metric: val_acc, direction: maximize}, {metric: params, direction: minimize}]

    measure    every trial records all of OBJECTIVE_METRICS (val_acc, val_loss, params,
               latency_ms, latency_256_ms, epoch_seconds) as MLflow metrics and one trial user
               attribute, and returns the values of the sweep's objectives
    front      the completed trials no other completed trial dominates on the objectives
    champion   RULE: the most accurate trial within --max-params / --max-latency-ms (ties: the
               better on the other objectives, in the sweep's order). It is on the front of the
               trials that meet the limits. The sampler sees the limits too: each trial sets
               them as Optuna constraints (``trial.set_constraint(metric, value - limit)``, <= 0
               where met), Optuna 5's replacement for the samplers' ``constraints_func`` (which
               it deprecates with a FutureWarning); TPE, NSGA-II and GP read them from the trial.

The sampler is the sweep's (TPE unless it names another): TPE proposes from the first trials on
and takes constraints_func, while NSGA-II (``sampler: nsga2``) only leaves random search after a
generation of population_size trials (50 by default), i.e. after the 40-trial budgets used here.
Optuna cannot prune a multi-objective study (Trial.report raises), so the pruner is none.
Imports no torch at module level: ``best`` reads the front in about a second.
"""

from __future__ import annotations

import math
import statistics
import time

import optuna
from optuna.trial import FrozenTrial, TrialState

from mnist_tune import record
from mnist_tune.config import METRICS, OBJECTIVE_METRICS
from mnist_tune.errors import MnistTuneError

RULE = "the most accurate trial within the limits (ties: better on the other objectives, in order)"
LIMIT_OPTIONS = {"max_params": "params", "max_latency_ms": "latency_ms"}  # WorkerSettings field -> metric
LATENCY_BATCHES = {"latency_ms": (1, 50), "latency_256_ms": (256, 20)}  # metric -> (batch size, timed calls)


def check_settings(sweep, settings) -> None:
    """Limits need a multi-objective sweep (a single objective has one best trial, not a front)."""
    for option in LIMIT_OPTIONS:
        if getattr(settings, option) is not None and not sweep.objectives:
            flag = "--" + option.replace("_", "-")
            raise MnistTuneError(f"{flag} needs a multi-objective sweep ({sweep.path} has no study.objectives)")


def limits_of(settings) -> dict[str, float]:
    """{metric: limit} for the limits given on the command line."""
    return {metric: getattr(settings, option) for option, metric in LIMIT_OPTIONS.items()
            if getattr(settings, option) is not None}


def store_limits(study: optuna.Study, settings) -> None:
    """Keep the limits on the study: ``best`` applies them (the latest given win)."""
    limits = limits_of(settings)
    if limits:
        study.set_user_attr(record.LIMITS_ATTR, limits)


# ------------------------------------------------------------------------ the trial side


def measure(sweep, settings, tracker, trial: optuna.Trial, run_id: str, outcome, model_hp: dict) -> tuple:
    """Measure a trained trial on every objective metric, record them (MLflow metrics and a
    trial user attribute), set the limits as its constraints, return the objective values."""
    last = outcome.history[-1]
    metrics = {"val_acc": last.val_acc, "val_loss": last.val_loss,
               "params": parameter_count(sweep.model, model_hp),
               "epoch_seconds": statistics.fmean(m.epoch_seconds for m in outcome.history),
               **latencies(tracker, outcome.model_uri)}
    tracker.metrics.log(run_id, {k: metrics[k] for k in ("params", *LATENCY_BATCHES)}, step=sweep.epochs)
    trial.set_user_attr(record.OBJECTIVES_ATTR, metrics)
    for metric, limit in limits_of(settings).items():
        trial.set_constraint(metric, metrics[metric] - limit)
    return tuple(float(metrics[m]) for m, _ in sweep.objectives)


def parameter_count(model_name: str, model_hp: dict) -> int:
    """Trainable parameters, from a model built on the meta device (no memory, no time)."""
    import torch

    from mnist_tune.models import build_model

    with torch.device("meta"):
        model = build_model(model_name, **model_hp)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def latencies(tracker, model_uri: str) -> dict[str, float]:
    """Median CPU inference time (ms) of the *logged* (exported) model, as a user reloads it,
    for each batch size of LATENCY_BATCHES; the torch threads are the worker's. Loading waits
    for the trial's queued model export: a multi-objective trial pays for its export here."""
    import torch

    model = tracker.models.load_model(model_uri)
    measured = {}
    with torch.inference_mode():
        for metric, (batch, calls) in LATENCY_BATCHES.items():
            images = torch.rand(batch, 1, 28, 28)
            for _ in range(3):  # warm-up: first calls allocate
                model(images)
            times = []
            for _ in range(calls):
                started = time.perf_counter()
                model(images)
                times.append(time.perf_counter() - started)
            measured[metric] = 1000 * statistics.median(times)
    return measured


# ----------------------------------------------------------------------- the study side


def is_multi(study: optuna.Study) -> bool:
    return len(study.directions) > 1


def objectives_of(study: optuna.Study) -> list[tuple[str, str]]:
    from mnist_tune.study import SWEEP_ATTR

    return [(o["metric"], o["direction"]) for o in study.user_attrs.get(SWEEP_ATTR, {}).get("objectives", [])]


def metrics_of(trial: FrozenTrial) -> dict[str, float]:
    return trial.user_attrs.get(record.OBJECTIVES_ATTR, {})


def _dominates(a: list[float], b: list[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def _minimised(trial: FrozenTrial, objectives) -> list[float]:
    """The trial's objective values, each turned into one to minimise."""
    return [-v if d == "maximize" else v for v, (_, d) in zip(trial.values, objectives)]


def front(trials: list[FrozenTrial], objectives) -> list[FrozenTrial]:
    """The trials no other of ``trials`` dominates (ties on every objective all stay)."""
    points = [(t, _minimised(t, objectives)) for t in trials]
    return [t for t, p in points if not any(_dominates(q, p) for _, q in points)]


def feasible(trial: FrozenTrial, limits: dict[str, float]) -> bool:
    measured = metrics_of(trial)
    return all(measured.get(m, math.inf) <= limit for m, limit in limits.items())


def complete_trials(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values and all(math.isfinite(v) for v in t.values)]


def ranked(study: optuna.Study, front_only: bool = True) -> list[FrozenTrial]:
    """The trials within the limits (by default only their front) in the RULE's order, champion first."""
    objectives, limits = objectives_of(study), study.user_attrs.get(record.LIMITS_ATTR, {})
    within = [t for t in complete_trials(study) if feasible(t, limits)]
    if front_only:
        within = front(within, objectives)
    first = next(i for i, (m, _) in enumerate(objectives) if m in METRICS)  # the validation objective
    order = [first] + [i for i in range(len(objectives)) if i != first]
    return sorted(within, key=lambda t: ([_minimised(t, objectives)[i] for i in order], t.number))


def champion(study: optuna.Study) -> FrozenTrial | None:
    found = ranked(study)
    return found[0] if found else None


def _row(trial: FrozenTrial, limits: dict) -> dict:
    run_id = trial.user_attrs.get(record.RUN_ATTR)
    return {"trial": trial.number, "metrics": metrics_of(trial), "within_limits": feasible(trial, limits),
            "test_acc": trial.user_attrs.get(record.TEST_ACC_ATTR), "run_id": run_id,
            record.MODEL_URI_ATTR: f"runs:/{run_id}/model", "params": trial.params}


def best_record(study: optuna.Study) -> dict:
    """What ``best`` prints for a multi-objective study: the front, the limits and the champion."""
    objectives, limits = objectives_of(study), study.user_attrs.get(record.LIMITS_ATTR, {})
    done = complete_trials(study)
    if not done:
        raise MnistTuneError(f"study {study.study_name!r} has no completed trial yet")
    metric = next(m for m, _ in objectives if m in METRICS)
    sign = -1 if OBJECTIVE_METRICS[metric] == "maximize" else 1
    pareto = sorted(front(done, objectives), key=lambda t: (sign * metrics_of(t).get(metric, t.values[0]), t.number))
    best = champion(study)
    return {"study": study.study_name, "objectives": [{"metric": m, "direction": d} for m, d in objectives],
            "limits": limits, "rule": RULE, "trials_complete": len(done),
            "champion": _row(best, limits) if best else None, "pareto": [_row(t, limits) for t in pareto]}


def csv_rows(best: dict) -> list[dict]:
    """``best --format csv`` of a multi-objective study: one row per trial on the front."""
    champ = (best["champion"] or {}).get("trial")
    return [{"study": best["study"], "champion": row["trial"] == champ, **row} for row in best["pareto"]]


def table(best: dict) -> str:
    from mnist_tune.output import columns, short

    names = [o["metric"] for o in best["objectives"]]
    others = [m for m in OBJECTIVE_METRICS if m not in names and any(m in r["metrics"] for r in best["pareto"])]
    limits = ", ".join(f"{m} <= {short(v)}" for m, v in best["limits"].items()) or "none"
    goals = ", ".join(f"{o['metric']} {o['direction'][:3]}" for o in best["objectives"])
    lines = [f"study {best['study']}: {len(best['pareto'])} of {best['trials_complete']} completed trials on the "
             f"Pareto front ({goals}); limits: {limits}"]
    champ = best["champion"]
    if champ is None:
        lines.append("  champion: none (no completed trial within the limits)")
    else:
        shown = "  ".join(f"{m} {short(champ['metrics'].get(m))}" for m in names)
        lines += [f"  champion: trial {champ['trial']}  {shown}  test_acc {short(champ['test_acc'])}",
                  f"    rule: {best['rule']}", f"    model: {champ[record.MODEL_URI_ATTR]}",
                  "    " + ", ".join(f"{k}={short(v)}" for k, v in champ["params"].items())]
    rows = [{"trial": r["trial"], **r["metrics"], "test_acc": r["test_acc"], "in_limits": str(r["within_limits"]),
             "run_id": r["run_id"]} for r in best["pareto"]]
    score = {m: (lambda v: "-" if v is None else f"{v:.4f}") for m in ("val_acc", "test_acc")}
    return "\n".join(lines + ["  " + line for line in columns(rows, ["trial", *names, *others, "test_acc",
                                                                       "in_limits", "run_id"], score)])


# ---------------------------------------------------------------------- end of the study


def finish(worker, trials: list[FrozenTrial], count) -> None:
    """The budget is spent: log the champion on the parent run, point the registry's alias at
    it, report on it, and plot the front (Worker.finish calls this for multi-objective sweeps)."""
    from mnist_tune.worker import report_champion

    best = champion(worker.study)
    if best is not None:
        run_id = best.user_attrs.get(record.RUN_ATTR, "")
        worker.record.log_best(worker.sweep.metric, metrics_of(best)[worker.sweep.metric],
                               best.user_attrs.get(record.TEST_ACC_ATTR, math.nan), best.number, run_id,
                               step=len(trials), trials_complete=count.complete, trials_failed=count.failed,
                               pareto_size=len(front(complete_trials(worker.study), objectives_of(worker.study))))
        worker.record.promote(worker.sweep.model, run_id, best.user_attrs.get(record.MODEL_URI_ATTR))
        report_champion(worker.tracker, run_id, worker.data)
    else:
        worker.log("no completed trial within the limits: no champion")
    if worker.settings.plots:
        worker._log_plots()


def summary_lines(study: optuna.Study) -> list[str]:
    best = champion(study)
    if best is None:
        return ["no completed trial within the limits yet"]
    shown = "  ".join(f"{m} {metrics_of(best).get(m, math.nan):.4g}" for m, _ in objectives_of(study))
    run_id = best.user_attrs.get(record.RUN_ATTR, "?")
    return [f"champion (the most accurate on the Pareto front within the limits): trial {best.number}: {shown}  "
            f"test_acc "
            f"{best.user_attrs.get(record.TEST_ACC_ATTR, math.nan):.4f}  run {run_id}", f"model: runs:/{run_id}/model"]
