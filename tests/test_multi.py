"""Multi-objective studies (Pareto front, champion within a limit) and confirmed champions
(top configurations retrained with new seeds), end to end on synthetic data in temporary stores."""

from __future__ import annotations

import json
import statistics
import threading

import optuna
import pytest
from mlflow.tracking import MlflowClient

from helpers import run_cli, write_file
from test_study import embedded_tracking, optuna_storage

# Parameters of the MLP 784-w(-w)-10: w=16: 12,730; w=64: 50,890 (depth 2: +4,160); w=256: 203,530.
MULTI_SWEEP = """
name: pareto
model: mlp
study:
  objectives: [{metric: val_acc, direction: maximize}, {metric: params}]
  sampler: {name: tpe, seed: 0, n_startup_trials: 2}
train: {epochs: 1, val_size: 200}
space:
  width: {type: categorical, choices: [16, 64, 256]}
  depth: {type: int, low: 1, high: 2}
  lr: {type: categorical, choices: [0.003, 0.01]}
  batch_size: {type: categorical, choices: [50]}
  dropout: {type: float, low: 0.0, high: 0.2}
"""
SINGLE_SWEEP = """
name: single
model: mlp
study: {sampler: {name: random, seed: 0}, pruner: none}
train: {epochs: 1, val_size: 200}
fixed: {hidden_sizes: [32]}
space:
  lr: {type: float, low: 1.0e-3, high: 3.0e-2, log: true}
  batch_size: {type: categorical, choices: [50]}
  dropout: {type: float, low: 0.0, high: 0.3}
"""
MAX_PARAMS = 60_000


def dominated(a: dict, by: dict) -> bool:
    """On (val_acc max, params min)."""
    at_least = by["val_acc"] >= a["val_acc"] and by["params"] <= a["params"]
    return at_least and (by["val_acc"] > a["val_acc"] or by["params"] < a["params"])


@pytest.mark.slow
def test_multi_objective_study_front_and_champion_within_the_limit(synthetic_env, tmp_path):
    storage, tracking = optuna_storage(tmp_path), embedded_tracking(tmp_path)
    sweep = write_file(tmp_path, "pareto.yaml", MULTI_SWEEP)
    out = run_cli("study", "--sweep", sweep, "--trials", 5, "--max-params", MAX_PARAMS, "--device", "cpu",
                  env=synthetic_env).stdout
    assert "champion (the most accurate on the Pareto front within the limits): trial" in out

    study = optuna.load_study(study_name="pareto", storage=storage)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 5
    measured = {t.number: t.user_attrs["objective_metrics"] for t in done}
    for t in done:  # the values Optuna holds are the measured ones; the sampler saw the constraint
        assert t.values == [measured[t.number]["val_acc"], measured[t.number]["params"]]
        assert t.constraints == {"params": measured[t.number]["params"] - MAX_PARAMS}
        assert measured[t.number]["latency_ms"] > 0 and measured[t.number]["latency_256_ms"] > 0

    best = json.loads(run_cli("best", "--study", "pareto", "--format", "json", env=synthetic_env).stdout)
    front = {row["trial"] for row in best["pareto"]}
    expected = {n for n, m in measured.items() if not any(dominated(m, o) for k, o in measured.items() if k != n)}
    assert front == expected and front
    champion = best["champion"]
    assert champion["metrics"]["params"] <= MAX_PARAMS and champion["within_limits"]
    feasible = {n: m for n, m in measured.items() if m["params"] <= MAX_PARAMS}
    top = max(m["val_acc"] for m in feasible.values())
    assert champion["metrics"]["val_acc"] == top  # the most accurate within the limit ...
    assert champion["metrics"]["params"] == min(m["params"] for m in feasible.values() if m["val_acc"] == top)
    assert best["limits"] == {"params": MAX_PARAMS}

    table = run_cli("best", "--study", "pareto", env=synthetic_env).stdout
    assert f"champion: trial {champion['trial']}" in table and "Pareto front" in table
    csv_lines = run_cli("best", "--study", "pareto", "--format", "csv", env=synthetic_env).stdout.splitlines()
    assert len(csv_lines) == 1 + len(front) and "champion" in csv_lines[0].split(",")
    status = json.loads(run_cli("status", "--study", "pareto", "--format", "json", env=synthetic_env).stdout)
    assert status["best"]["trial"] == champion["trial"]
    runs = run_cli("runs", "--study", "pareto", "--format", "json", env=synthetic_env).stdout
    assert len(json.loads(runs)) == 5

    client = MlflowClient(tracking)
    parent = study.user_attrs["mlflow_parent_run_id"]
    assert {a.path for a in client.list_artifacts(parent, "plots")} >= {"plots/pareto.png", "plots/pareto.html"}
    assert client.get_run(parent).data.tags["best_trial"] == str(champion["trial"])
    run = client.get_run(champion["run_id"])
    assert run.data.metrics["params"] == champion["metrics"]["params"] and "latency_256_ms" in run.data.metrics


@pytest.mark.slow
def test_confirmation_runs_are_nested_tagged_counted_and_pick_the_best_mean(synthetic_env, tmp_path):
    storage, tracking = optuna_storage(tmp_path), embedded_tracking(tmp_path)
    sweep = write_file(tmp_path, "single.yaml", SINGLE_SWEEP)
    args = ("study", "--sweep", sweep, "--trials", 4, "--confirm-top", 2, "--confirm-seeds", 2, "--device", "cpu",
            "--no-plots")
    out = run_cli(*args, env=synthetic_env).stdout
    assert "confirmed champion: trial" in out

    study = optuna.load_study(study_name="single", storage=storage)
    parent = study.user_attrs["mlflow_parent_run_id"]
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("single").experiment_id
    confirmations = client.search_runs([experiment], "tags.`mnist_tune.role` = 'confirmation'")
    assert len(confirmations) == 2 * 2  # K configurations x S seeds
    top2 = sorted((t for t in study.trials if t.value is not None), key=lambda t: -t.value)[:2]
    assert {int(r.data.tags["mnist_tune.confirms_trial"]) for r in confirmations} == {t.number for t in top2}
    seeds = {r.data.tags["mnist_tune.confirm_seed"] for r in confirmations}
    assert len(seeds) == 2 and not seeds & {str(t.number) for t in study.trials}  # new seeds
    means = {}
    for run in confirmations:
        assert run.data.tags["mlflow.parentRunId"] == parent and run.info.status == "FINISHED"
        means.setdefault(int(run.data.tags["mnist_tune.confirms_trial"]), []).append(run.data.metrics["val_acc"])
    winner = max(means, key=lambda n: (statistics.fmean(means[n]), -n))

    best = json.loads(run_cli("best", "--study", "single", "--format", "json", env=synthetic_env).stdout)
    assert best["trial"] == top2[0].number  # the best single trial, still shown
    confirmed = best["confirmed"]
    assert confirmed["state"] == "done" and confirmed["champion"]["trial"] == winner
    assert confirmed["champion"]["mean"] == pytest.approx(statistics.fmean(means[winner]))
    assert confirmed["champion"]["std"] == pytest.approx(statistics.stdev(means[winner]))
    trial_run = client.get_run(confirmed["champion"]["run_id"])
    assert trial_run.data.metrics["confirm_val_acc_mean"] == pytest.approx(statistics.fmean(means[winner]))
    assert client.get_run(parent).data.tags["confirmed_trial"] == str(winner)
    assert client.get_run(parent).info.status == "FINISHED"
    assert "confirmed champion" in run_cli("best", "--study", "single", env=synthetic_env).stdout

    run_cli(*args, env=synthetic_env)  # a rerun finds it done: no new runs
    assert len(client.search_runs([experiment], "tags.`mnist_tune.role` = 'confirmation'")) == 4


def test_only_one_of_racing_workers_claims_the_confirmation(tmp_path):
    from mnist_tune import confirm, record

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="race", storage=storage)
    won = {}

    def worker(name):
        study = optuna.load_study(study_name="race", storage=optuna.storages.RDBStorage(
            storage, engine_kwargs={"connect_args": {"timeout": 30}}))
        won[name] = confirm.claim(study, name)

    threads = [threading.Thread(target=worker, args=(f"host:{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(won.values()) == 1, won
    study = optuna.load_study(study_name="race", storage=storage)
    owner = study.user_attrs[record.CONFIRM_ATTR]["owner"]
    assert won[owner]
    assert not confirm.claim(study, "host:late")  # a later worker sees the running confirmation


@pytest.mark.parametrize("change, flags, mention", [
    ("objectives: [{metric: accuracy}, {metric: params}]", (), "study.objectives.0.metric: 'accuracy' is not one of"),
    ("objectives: [{metric: val_acc, direction: minimize}, {metric: params}]", (), "val_acc should be maximized"),
    ("objectives: [{metric: params}, {metric: latency_ms}]", (), "needs exactly one of val_acc, val_loss"),
    ("objectives: [{metric: val_acc}, {metric: params}]\n  pruner: median", (), "cannot prune multi-objective"),
    ("objectives: [{metric: val_acc}]", (), "two or more objectives"),
    (None, ("--max-params", 1000), "--max-params needs a multi-objective sweep"),
    (None, ("--max-latency-ms", 0), "--max-latency-ms"),
    ("objectives: [{metric: val_acc}, {metric: params}]", ("--max-params", -3), "--max-params"),
    (None, ("--confirm-seeds", 2), "--confirm-seeds needs --confirm-top"),
])
def test_bad_objectives_and_limits_are_refused_before_anything_is_written(synthetic_env, tmp_path, change, flags,
                                                                           mention):
    text = SINGLE_SWEEP if change is None else SINGLE_SWEEP.replace(
        "study: {sampler: {name: random, seed: 0}, pruner: none}", "study:\n  " + change)
    sweep = write_file(tmp_path, "bad.yaml", text)
    proc = run_cli("study", "--sweep", sweep, "--trials", 1, *flags, env=synthetic_env, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and mention in lines[0], proc.stderr
    assert not (tmp_path / "mlruns").exists()
