"""Confirmed champions: after the budget, the top K configurations retrained with S new seeds.

    mnist-tune study --model mlp --trials 40 --confirm-top 3 --confirm-seeds 3

A trial's validation accuracy is one draw of its seed's noise, and the best of 40 draws is
biased upwards (the winner's curse). So the K best distinct configurations (a multi-objective
study: the most accurate within the limits, pareto.ranked) are trained again with the
same S new seeds each (shared seeds: the configurations are compared on equal draws), and the
*confirmed champion* is the configuration with the best mean validation metric over those S
runs; the trial's own run is left out of the mean, as it is the draw that was selected.

Where it lives: each retraining is an MLflow run nested under the study's parent run
(record.start_confirmation: role ``confirmation``, the trial and seed as tags); the mean and
std go on the trial's own run and the parent; the state and results are one study user
attribute (record.CONFIRM_ATTR). They are not Optuna trials: those would count against the
budget and hand the sampler repeats of its own points.

Only one worker confirms. Every worker that sees the budget spent writes a claim (a study user
attribute of its own, record.CONFIRM_CLAIM_PREFIX + worker), waits SETTLE_S, and reads them all:
workers that both read after both wrote see the same claims and agree on the lowest name; one
that read before another wrote has marked the state ``running`` within milliseconds of reading,
long before the later one reads (SETTLE_S later). The others leave the study's parent run to it.
A rerun after a crash takes over a ``running`` state whose owner is gone (same host) or silent
for STALE_S, and keeps the runs already done.
"""

from __future__ import annotations

import math
import statistics
import time

import optuna
from optuna.trial import FrozenTrial, TrialState

from mnist_tune import pareto, record, stop
from mnist_tune.errors import MnistTuneError

SEED_BASE = 1_000_000  # confirmation seeds: far from the trials' own (--seed + trial number)
DEFAULT_SEEDS = 3  # --confirm-seeds when only --confirm-top is given
SETTLE_S = 2.0  # between writing a claim and reading the others
CLAIM_WINDOW_S = 60.0  # older claims are from workers long gone
STALE_S = 1800.0  # a running confirmation not updated for this long is taken over


def check_settings(settings) -> None:
    if settings.confirm_seeds is not None and not settings.confirm_top:
        raise MnistTuneError("--confirm-seeds needs --confirm-top K (how many configurations to retrain)")


def seeds_for(settings) -> list[int]:
    return [SEED_BASE + (settings.seed or 0) + i for i in range(settings.confirm_seeds or DEFAULT_SEEDS)]


def single_value(study: optuna.Study, trial: FrozenTrial, metric: str) -> float:
    return pareto.metrics_of(trial)[metric] if pareto.is_multi(study) else trial.value


def candidates(study: optuna.Study, metric: str, top: int) -> list[FrozenTrial]:
    """The ``top`` best distinct configurations (a repeated configuration counts once)."""
    if pareto.is_multi(study):
        ranked = pareto.ranked(study, front_only=False)  # the runners-up by the champion's rule
    else:
        sign = -1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.value is not None and math.isfinite(t.value)]
        ranked = sorted(done, key=lambda t: (sign * t.value, t.number))
    chosen, seen = [], set()
    for trial in ranked:
        key = repr(sorted(trial.params.items()))
        if key not in seen:
            seen.add(key)
            chosen.append(trial)
    return chosen[:top]


# ------------------------------------------------------------------------- one worker


def _owned_elsewhere(state: dict, me: str) -> bool:
    from mnist_tune.study import _process_gone

    if state.get("state") != "running" or state.get("owner") == me:
        return False
    return not (_process_gone(state.get("owner"), None) or time.time() - state.get("updated", 0) > STALE_S)


def claim(study: optuna.Study, me: str) -> bool:
    """Whether worker ``me`` is the one to confirm (the module docstring says why only one is)."""
    if _owned_elsewhere(study.user_attrs.get(record.CONFIRM_ATTR) or {}, me):
        return False
    study.set_user_attr(record.CONFIRM_CLAIM_PREFIX + me, time.time())
    stop.sleep(SETTLE_S)
    attrs = study.user_attrs
    if _owned_elsewhere(attrs.get(record.CONFIRM_ATTR) or {}, me):
        won = False
    else:
        now = time.time()
        claims = sorted(k[len(record.CONFIRM_CLAIM_PREFIX):] for k, v in attrs.items()
                        if k.startswith(record.CONFIRM_CLAIM_PREFIX) and v and now - v < CLAIM_WINDOW_S)
        won = claims[0] == me
    if won:
        state = attrs.get(record.CONFIRM_ATTR) or {}
        study.set_user_attr(record.CONFIRM_ATTR, {**state, "state": "running", "owner": me, "updated": time.time()})
    else:
        study.set_user_attr(record.CONFIRM_CLAIM_PREFIX + me, 0)  # released: it no longer competes
    return won


def run(worker) -> bool:
    """Confirm the top configurations if asked (Worker.finish, once the budget is spent).
    Returns False when another worker does it (and so closes the study's parent run)."""
    from mnist_tune.study import this_worker

    settings, study = worker.settings, worker.study
    if not settings.confirm_top:
        return True
    seeds = seeds_for(settings)
    state = study.user_attrs.get(record.CONFIRM_ATTR) or {}
    if state.get("state") == "done" and state.get("top") == settings.confirm_top and state.get("seeds") == seeds:
        return True
    me = this_worker()
    if not claim(study, me):
        worker.log("another worker is confirming the top configurations; it closes the study")
        return False
    try:
        _confirm(worker, study.user_attrs.get(record.CONFIRM_ATTR) or {}, settings.confirm_top, seeds, me)
    finally:
        study.set_user_attr(record.CONFIRM_CLAIM_PREFIX + me, 0)
    return True


def _confirm(worker, state: dict, top: int, seeds: list[int], me: str) -> None:
    study, metric, tracker = worker.study, worker.sweep.metric, worker.tracker
    results = state.get("results", {}) if state.get("metric") == metric else {}
    state = {"state": "running", "owner": me, "metric": metric, "top": top, "seeds": seeds, "results": results}

    def save():
        study.set_user_attr(record.CONFIRM_ATTR, {**state, "updated": time.time()})

    save()
    running = tracker.search_runs(worker.record.experiment_id, f"tags.`{record.ROLE}` = '{record.CONFIRMATION}' "
                                  "AND attributes.status = 'RUNNING'")
    for run in running:  # left by a worker that died mid-confirmation
        worker.record.close_stale(run.info.run_id, "the worker confirming died; retrained by another")
    chosen = candidates(study, metric, top)
    for dropped in set(results) - {str(t.number) for t in chosen}:  # a rerun with a smaller K; its runs stay
        del results[dropped]
    worker.log(f"confirming the top {len(chosen)} configurations (trials "
               f"{', '.join(str(t.number) for t in chosen)}) with {len(seeds)} new seeds each")
    for trial in chosen:
        entry = results.setdefault(str(trial.number), {
            "value": single_value(study, trial, metric), "run_id": trial.user_attrs.get(record.RUN_ATTR),
            "model_uri": trial.user_attrs.get(record.MODEL_URI_ATTR), "runs": {}})
        for seed in seeds:
            if str(seed) not in entry["runs"]:
                entry["runs"][str(seed)] = _retrain(worker, trial, seed)
                save()
        entry.update(_stats(entry, metric, seeds))
        tracker.metrics.log(entry["run_id"], {f"confirm_{metric}_mean": entry["mean"],
                                              f"confirm_{metric}_std": entry["std"],
                                              "confirm_test_acc_mean": entry["test_acc_mean"],
                                              "confirm_runs": entry["n"]})
    sign = -1 if metric == "val_acc" else 1
    scored = [(n, e) for n, e in results.items() if int(n) in {t.number for t in chosen} and e.get("n")]
    best_n, best = min(scored, key=lambda ne: (sign * ne[1]["mean"], int(ne[0]))) if scored else (None, None)
    state.update(state="done", champion=None if best_n is None else int(best_n))
    save()
    if best is not None:
        worker.record.tracker.metrics.log(worker.record.parent_run_id, {
            f"confirmed_{metric}_mean": best["mean"], f"confirmed_{metric}_std": best["std"],
            "confirmed_test_acc_mean": best["test_acc_mean"], "confirmed_trial": int(best_n)})
        tracker.set_tags(worker.record.parent_run_id, {record.CONFIRMED_TRIAL: best_n,
                                                       record.CONFIRMED_RUN_ID: best["run_id"]})
        worker.record.promote(worker.sweep.model, best["run_id"], best["model_uri"])


def _retrain(worker, trial: FrozenTrial, seed: int) -> dict:
    """One confirmation run: the trial's configuration, a new seed, its own nested run."""
    from mnist_tune.run import Diverged, train_and_log
    from mnist_tune.train import TrainConfig
    from mnist_tune.tunables import split_hyperparameters

    model_hp, train_hp = split_hyperparameters({**worker.sweep.fixed, **trial.params,
                                                "epochs": worker.sweep.epochs, "seed": seed})
    run_id = worker.record.start_confirmation(trial.number, seed, worker.sweep.model)
    try:
        with record.run_lifecycle(worker.tracker, run_id):
            outcome = train_and_log(worker.tracker, run_id, worker.sweep.model, model_hp, TrainConfig(**train_hp),
                                    worker.data, worker.device, progress_position=1)
    except Diverged as e:  # a configuration that diverges on some seeds: counted, left out of the mean
        return {"run_id": run_id, "error": str(e)}
    last = outcome.history[-1]
    return {"run_id": run_id, "val_acc": last.val_acc, "val_loss": last.val_loss, "test_acc": outcome.test_acc}


def _stats(entry: dict, metric: str, seeds: list[int]) -> dict:
    runs = [entry["runs"][str(s)] for s in seeds if metric in entry["runs"].get(str(s), {})]
    values, tests = [r[metric] for r in runs], [r["test_acc"] for r in runs]
    return {"n": len(values), "failed": len(seeds) - len(values),
            "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "test_acc_mean": statistics.fmean(tests) if tests else None}


# ------------------------------------------------------------------------- reading it


def summary(study: optuna.Study) -> dict | None:
    """The confirmation as ``best`` shows it (None if the study had none)."""
    state = study.user_attrs.get(record.CONFIRM_ATTR)
    if not state:
        return None
    metric = state.get("metric", "val_acc")
    rows = [{"trial": int(n), "single": e["value"], "mean": e.get("mean"), "std": e.get("std"),
             "test_acc_mean": e.get("test_acc_mean"), "runs": e.get("n", len(e["runs"])),
             "failed": e.get("failed", 0), "run_id": e["run_id"]} for n, e in state.get("results", {}).items()]
    sign = -1 if metric == "val_acc" else 1
    rows.sort(key=lambda r: (r["mean"] is None, sign * (r["mean"] or 0), r["trial"]))
    champion = next((r for r in rows if r["trial"] == state.get("champion")), None)
    return {"state": state.get("state"), "metric": metric, "top": state.get("top"), "seeds": state.get("seeds"),
            "champion": champion and {**champion, record.MODEL_URI_ATTR: f"runs:/{champion['run_id']}/model"},
            "candidates": rows}


def table_lines(confirmed: dict | None) -> list[str]:
    if not confirmed:
        return []
    metric, champ = confirmed["metric"], confirmed["champion"]
    lines = [f"confirmed champion ({confirmed['state']}; top {confirmed['top']} configurations x "
             f"{len(confirmed['seeds'])} new seeds, best mean {metric}):"]
    if champ:
        lines.append(f"  trial {champ['trial']}  {metric} {champ['mean']:.4f} ± {champ['std']:.4f} over "
                     f"{champ['runs']} runs  test_acc mean {champ['test_acc_mean']:.4f}  run {champ['run_id']}")
    for row in confirmed["candidates"]:
        mean = "-" if row["mean"] is None else f"{row['mean']:.4f} ± {row['std']:.4f}"
        lines.append(f"    trial {row['trial']:>4}: single run {row['single']:.4f}, confirmed {mean} "
                     f"({row['runs']} runs" + (f", {row['failed']} failed)" if row["failed"] else ")"))
    return lines


def summary_lines(study: optuna.Study) -> list[str]:
    confirmed = summary(study)
    if not confirmed or not confirmed["champion"]:
        return []
    champ = confirmed["champion"]
    return [f"confirmed champion: trial {champ['trial']}: {confirmed['metric']} {champ['mean']:.4f} ± "
            f"{champ['std']:.4f} over {champ['runs']} new seeds (single run {champ['single']:.4f})  "
            f"run {champ['run_id']}"]
