"""Warm starts and duplicates, the Optuna side (no torch, no MLflow).

    enqueue        ``study --enqueue FILE``: configurations added to the study as WAITING trials
                   (``study.enqueue_trial(skip_if_exists=True)``); they count against the budget
                   once they run, so those past it wait for a larger ``--trials``.
    warm start     ``study --warm-start-from NAME``: the finished trials (COMPLETE, and PRUNED with
                   their intermediate values) of another study in the same storage, with the same
                   model, metric, epochs, validation size, fixed values and searched parameters,
                   and values inside this sweep's space, are copied in (``create_trial`` +
                   ``add_trials``), marked ``copied_from``; no MLflow runs, no budget. Rerunning
                   the command copies only what was not copied before.
    duplicates     a trial whose parameters equal an earlier finished or running trial's is not
                   trained (``skip_duplicate``).
"""

from __future__ import annotations

import json
from collections import Counter

import optuna
from optuna.trial import FrozenTrial, TrialState

from mnist_tune import record
from mnist_tune.config import Sweep
from mnist_tune.enqueue import value_problem
from mnist_tune.errors import MnistTuneError
from mnist_tune.space import distributions
from mnist_tune.study import (
    COPIED_ATTR,
    DUPLICATE_ATTR,
    SWEEP_ATTR,
    count_budget,
    load_existing_study,
    study_names,
)

COMPARED = ("metric", "epochs", "val_size", "fixed")  # a source's values mean the same only if these match
KEPT_ATTRS = (record.RUN_ATTR, record.TEST_ACC_ATTR, record.MODEL_URI_ATTR)  # the copy links to its run


# ---------------------------------------------------------------------------- enqueue


def enqueue(study: optuna.Study, entries, where: str, budget: int, log) -> None:
    """Add configurations (checked already: config.load_enqueue_file) as WAITING trials."""
    if not entries:
        return
    before = len(study.get_trials(deepcopy=False))
    for params in entries:
        study.enqueue_trial(dict(params), skip_if_exists=True)
    added = len(study.get_trials(deepcopy=False)) - before
    line = f"{where}: {added} configuration(s) enqueued" + (
        f", {len(entries) - added} already in study {study.study_name!r}" if added < len(entries) else "")
    count = count_budget(study.get_trials(deepcopy=False))
    if count.queued > budget - count.used:
        line += (f"; {count.queued - max(0, budget - count.used)} of the {count.queued} waiting exceed the budget "
                 f"({budget} trials, {count.used} used): raise --trials to run them")
    log(line)


# ------------------------------------------------------------------------- warm start


def _comparable(definition: dict) -> dict:
    """The settings to compare, as JSON has them (tuples become lists)."""
    return json.loads(json.dumps({k: definition.get(k) for k in COMPARED}, default=list))


def warm_start_trials(storage, source: str, sweep: Sweep, target: str) -> tuple[list[FrozenTrial], str]:
    """The trials of study ``source`` to copy into study ``target`` (not copied there before), and
    one line saying what was copied and what skipped. Raises MnistTuneError, before anything is
    written, when the source cannot warm-start this sweep."""
    if source == target:
        raise MnistTuneError(f"--warm-start-from {source}: a study cannot warm-start itself")
    found = load_existing_study(storage, source)
    theirs = found.user_attrs.get(SWEEP_ATTR)
    if not theirs:
        raise MnistTuneError(f"--warm-start-from {source}: the study records no sweep (not made by mnist-tune)")
    if theirs.get("model") != sweep.model:
        raise MnistTuneError(f"--warm-start-from {source}: it tuned model {theirs.get('model')}, "
                             f"this sweep tunes {sweep.model}")
    their_names, our_names = [p["name"] for p in theirs.get("space", [])], [p.name for p in sweep.space]
    if not set(their_names) & set(our_names):
        raise MnistTuneError(f"--warm-start-from {source}: no searched parameter in common (it searched "
                             f"{', '.join(their_names)}; this sweep {', '.join(our_names)})")
    if set(their_names) != set(our_names):
        only_there = sorted(set(their_names) - set(our_names)) or ["-"]
        only_here = sorted(set(our_names) - set(their_names)) or ["-"]
        raise MnistTuneError(f"--warm-start-from {source}: it searched other parameters (only there: "
                             f"{', '.join(only_there)}; only here: {', '.join(only_here)}): a warm start "
                             "needs the same ones")
    ours, stored = _comparable(sweep.definition()), _comparable(theirs)
    differ = [f"{k} {stored[k]} there, {ours[k]} here" for k in COMPARED if stored[k] != ours[k]]
    if differ:
        raise MnistTuneError(f"--warm-start-from {source}: its results are not comparable ({'; '.join(differ)})")

    copied_before = set()
    if target in study_names(storage):
        for t in load_existing_study(storage, target).get_trials(deepcopy=False):
            origin = t.user_attrs.get(COPIED_ATTR) or {}
            if origin.get("study") == source:
                copied_before.add(origin.get("trial"))
    by_name, space = {p.name: p for p in sweep.space}, distributions(sweep)
    copies, skipped, outside = [], Counter(), Counter()
    for t in found.get_trials(deepcopy=False):
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            skipped["not finished (failed, running or waiting)"] += 1
        elif t.user_attrs.get(DUPLICATE_ATTR) is not None:
            skipped["duplicates, never trained"] += 1
        elif set(t.params) != set(by_name):
            skipped["without every searched parameter"] += 1
        elif bad := [name for name, value in t.params.items() if value_problem(by_name[name], value)]:
            skipped["outside this sweep's space"] += 1
            outside.update(bad)
        elif t.number not in copied_before:
            copies.append(optuna.trial.create_trial(
                state=t.state, value=t.value, params=dict(t.params), distributions=space,
                intermediate_values=dict(t.intermediate_values),
                user_attrs={**{k: t.user_attrs[k] for k in KEPT_ATTRS if k in t.user_attrs},
                            COPIED_ATTR: {"study": source, "trial": t.number}}))
    if "outside this sweep's space" in skipped:
        skipped[f"outside this sweep's space ({', '.join(f'{k} {n}' for k, n in outside.most_common())})"] = \
            skipped.pop("outside this sweep's space")
    if not copies and not copied_before:
        why = "; ".join(f"{n} {reason}" for reason, n in skipped.items()) or "it has no trials"
        raise MnistTuneError(f"--warm-start-from {source}: no trial to copy ({why})")
    states = Counter(t.state.name.lower() for t in copies)
    line = (f"warm start from study {source!r}: {len(copies)} trial(s) copied ("
            + (", ".join(f"{n} {s}" for s, n in states.items()) or "none new") + ")"
            + (f", {len(copied_before)} copied before" if copied_before else "")
            + ("; skipped " + "; ".join(f"{n} {reason}" for reason, n in skipped.items()) if skipped else ""))
    return copies, line


# -------------------------------------------------------------------------- duplicates


def earlier_same(study: optuna.Study, trial: optuna.Trial) -> FrozenTrial | None:
    """The first earlier trial, finished or running, with exactly ``trial``'s parameters (failed
    ones do not count: they have no result, and a retry repeats its failed trial on purpose)."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)):
        if t.number < trial.number and t.user_attrs.get(DUPLICATE_ATTR) is None and t.params == trial.params:
            return t
    return None


def skip_duplicate(trial: optuna.Trial, earlier: FrozenTrial, metric: str, log) -> float | list[float]:
    """End ``trial`` without training it. A repeat of a completed trial completes with its value,
    as Optuna's FAQ does for duplicates: the sampler sees a consistent point, the budget counts
    the trial (so a small or exhausted grid cannot loop forever), and ``best`` shows the earlier
    one. A repeat of a pruned trial is pruned with its intermediate values; of a running one,
    pruned without values (TPE ranks it last, as its constant liar ranks the running one).

    The sampler is reseeded: workers that start together on a new study share a seed, and would
    otherwise keep drawing each other's points."""
    trial.set_user_attr(DUPLICATE_ATTR, earlier.number)
    trial.study.sampler.reseed_rng()
    origin = earlier.user_attrs.get(COPIED_ATTR)
    which = f"trial {earlier.number}" + (f" (copied from study {origin['study']!r})" if origin else "")
    if earlier.state == TrialState.COMPLETE:
        log(f"trial {trial.number}: same parameters as {which}; not trained again, "
            f"ends with its {'values' if len(earlier.values) > 1 else metric} "
            + ", ".join(f"{v:.4f}" for v in earlier.values))
        return earlier.values if len(earlier.values) > 1 else earlier.value  # a multi-objective study's: all
    for step, value in sorted(earlier.intermediate_values.items()):
        trial.report(value, step)
    reason = f"same parameters as {which}, which " + ("was pruned" if earlier.state == TrialState.PRUNED
                                                      else "is still running")
    log(f"trial {trial.number}: {reason}; not trained, ends pruned")
    raise optuna.TrialPruned(reason)
