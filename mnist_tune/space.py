"""The search space meets Optuna here, and only here: ``suggest(trial, sweep)``."""

from __future__ import annotations

import optuna

from mnist_tune.config import Param, Sweep, finite_values


def suggest(trial: optuna.Trial, sweep: Sweep) -> dict:
    """Sample one point of the sweep's space; returns fixed + suggested hyperparameters."""
    params = dict(sweep.fixed)
    for p in sweep.space:
        params[p.name] = _suggest_one(trial, p)
    return params


def _suggest_one(trial: optuna.Trial, p: Param):
    if p.type == "categorical":
        return trial.suggest_categorical(p.name, list(p.choices))
    if p.type == "int":
        return trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)


def grid(sweep: Sweep) -> dict[str, list]:
    """The grid sampler's search space (config validation made sure every value list is finite)."""
    return {p.name: finite_values(p) for p in sweep.space}


def distributions(sweep: Sweep) -> dict[str, optuna.distributions.BaseDistribution]:
    """What ``suggest`` would record for each parameter: for trials made elsewhere (warm starts)."""
    found = {}
    for p in sweep.space:
        if p.type == "categorical":
            found[p.name] = optuna.distributions.CategoricalDistribution(list(p.choices))
        elif p.type == "int":
            found[p.name] = optuna.distributions.IntDistribution(int(p.low), int(p.high), log=p.log,
                                                                 step=int(p.step or 1))
        else:
            found[p.name] = optuna.distributions.FloatDistribution(p.low, p.high, log=p.log, step=p.step)
    return found
