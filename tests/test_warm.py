"""Warm starts (enqueued configurations, trials copied from another study), no configuration
trained twice, and the anchors `best` prints: real tiny studies on synthetic data, plus the
Optuna-only cases in-process."""

import csv
import io
import json

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from mnist_tune import study as study_module
from mnist_tune import warm
from mnist_tune.anchors import SEED_TEST_ACC
from mnist_tune.config import SWEEPS_DIR, load_enqueue_file, load_sweep
from mnist_tune.errors import MnistTuneError
from mnist_tune.space import suggest

from helpers import run_cli, write_file
from test_study import embedded_tracking, optuna_storage

optuna.logging.set_verbosity(optuna.logging.ERROR)

QUICK = ["--no-plots"]
SOURCE_SWEEP = """
name: source
model: mlp
study: {sampler: {name: random, seed: 0}, pruner: none}
train: {epochs: 1, val_size: 200}
fixed: {hidden_sizes: [32]}
space:
  lr: {type: categorical, choices: [0.003, 0.01]}
  batch_size: {type: categorical, choices: [50, 100]}
  dropout: {type: float, low: 0.0, high: 0.3}
enqueue:
  - {lr: 0.003, batch_size: 50, dropout: 0.1}
  - {lr: 0.003, batch_size: 100, dropout: 0.25}
"""
MORE = [{"lr": 0.01, "batch_size": 50, "dropout": 0.05}, {"lr": 0.003, "batch_size": 100, "dropout": 0.25}]
# The same study narrowed: dropout up to 0.2 leaves out the source's 0.25 trial.
NARROW_SWEEP = SOURCE_SWEEP.replace("name: source", "name: narrow").replace("high: 0.3", "high: 0.2") \
    .replace("seed: 0}", "seed: 1}").split("enqueue:")[0]
GRID_SWEEP = """
name: grid
model: mlp
study: {sampler: grid, pruner: none}
train: {epochs: 1, val_size: 200}
fixed: {hidden_sizes: [32], dropout: 0.1}
space:
  lr: {type: categorical, choices: [0.003, 0.01]}
  batch_size: {type: categorical, choices: [50]}
enqueue:
  - {lr: 0.003, batch_size: 50}
"""


def child_runs(tracking, experiment):
    client = MlflowClient(tracking)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], "tags.`mnist_tune.role` = 'trial'") if found else []


def store_bytes(tmp_path):
    return {p.name: p.read_bytes() for p in (tmp_path / "mlruns").glob("*.db")}


def test_default_study_starts_with_the_seed_configuration_and_best_shows_anchors(synthetic_env, tmp_path):
    run_cli("study", "--model", "mlp", "--trials", "1", "--epochs", "1", "--val-size", "200", *QUICK,
            env=synthetic_env)
    found = optuna.load_study(study_name="mlp-default", storage=optuna_storage(tmp_path))
    seed = load_sweep(SWEEPS_DIR / "mlp.yaml").enqueue[0]
    assert seed == {"batch_size": 100, "lr": 1e-3, "dropout": 0.2, "weight_decay": 1e-5, "schedule": "constant"}
    trial0 = found.trials[0]
    assert len(found.trials) == 1 and trial0.params == seed and trial0.state == TrialState.COMPLETE
    assert len(child_runs(embedded_tracking(tmp_path), "mlp-default")) == 1  # trained and tracked

    shown = json.loads(run_cli("best", "--study", "mlp-default", "--format", "json", env=synthetic_env).stdout)
    assert shown["seed_test_acc"] == SEED_TEST_ACC == 0.9798
    assert shown["seed_trial"] == 0 and shown["seed_trial_state"] == "COMPLETE"
    assert shown["seed_trial_test_acc"] == trial0.user_attrs["test_acc"] and shown["seed_trial_value"] == trial0.value
    table = run_cli("best", "--study", "mlp-default", env=synthetic_env).stdout.splitlines()
    assert table[2] == f"  test_acc   {shown['test_acc']:.4f}"
    assert table[3] == "  seed       0.9798  (the seed's published test accuracy)"
    assert table[4] == (f"  seed here  {trial0.user_attrs['test_acc']:.4f}  (trial 0, the seed's configuration "
                        "in this study)")
    flat = next(csv.DictReader(io.StringIO(run_cli("best", "--study", "mlp-default", "--format", "csv",
                                                   env=synthetic_env).stdout)))
    assert float(flat["seed_test_acc"]) == 0.9798 and flat["seed_trial"] == "0"


def test_warm_start_copies_compatible_trials_and_runs_its_own_budget(synthetic_env, tmp_path):
    source_sweep = write_file(tmp_path, "source.yaml", SOURCE_SWEEP)
    narrow_sweep = write_file(tmp_path, "narrow.yaml", NARROW_SWEEP)
    more = write_file(tmp_path, "more.yaml", MORE)
    first = run_cli("study", "--sweep", source_sweep, "--trials", "3", "--enqueue", more, *QUICK, env=synthetic_env)
    assert "--enqueue: 1 configuration(s) enqueued, 1 already in study 'source'" in first.stderr
    storage, tracking = optuna_storage(tmp_path), embedded_tracking(tmp_path)
    source = optuna.load_study(study_name="source", storage=storage)
    assert [t.params["dropout"] for t in source.trials] == [0.1, 0.25, 0.05]  # the sweep's two, then the file's
    assert all(t.state == TrialState.COMPLETE for t in source.trials)

    second = run_cli("study", "--sweep", narrow_sweep, "--trials", "1", "--warm-start-from", "source", *QUICK,
                     env=synthetic_env)
    assert ("warm start from study 'source': 2 trial(s) copied (2 complete); skipped 1 outside this sweep's "
            "space (dropout 1)") in second.stderr
    assert "1/1 trials (1 complete" in second.stdout and "this worker ran" not in second.stdout
    narrow = optuna.load_study(study_name="narrow", storage=storage)
    copied, own = narrow.trials[:2], narrow.trials[2:]
    assert [t.user_attrs["copied_from"] for t in copied] == [{"study": "source", "trial": 0},
                                                             {"study": "source", "trial": 2}]
    for copy, original in zip(copied, (source.trials[0], source.trials[2])):
        assert (copy.params, copy.value, copy.state) == (original.params, original.value, original.state)
        assert copy.user_attrs["mlflow_run_id"] == original.user_attrs["mlflow_run_id"]  # the source's run
    assert len(own) == 1 and "copied_from" not in own[0].user_attrs
    runs = child_runs(tracking, "narrow")  # the copies get none
    assert [int(r.data.tags["mnist_tune.trial"]) for r in runs] == [2]
    assert study_module.count_budget(narrow.trials).used == 1
    status = json.loads(run_cli("status", "--study", "narrow", "--format", "json", env=synthetic_env).stdout)
    assert status["trials"] == {"COPIED": 2, "COMPLETE": 1} and (status["used"], status["left"]) == (1, 0)

    # A rerun copies nothing again; a source that cannot warm-start this sweep is refused
    # with one line before anything is written.
    copies, line = warm.warm_start_trials(study_module.open_storage(storage), "source", load_sweep(narrow_sweep),
                                          "narrow")
    assert copies == [] and "0 trial(s) copied (none new), 2 copied before" in line
    mixer = write_file(tmp_path, "mixer.yaml", "name: m\nmodel: mixer\ntrain: {epochs: 1, val_size: 200}\n"
                                               "space: {lr: {type: float, low: 1.0e-3, high: 1.0e-2}}\n")
    other_text = (NARROW_SWEEP.replace("  dropout: {type: float, low: 0.0, high: 0.2}\n", "")
                  .replace("lr: {type: categorical, choices: [0.003, 0.01]}",
                           "weight_decay: {type: float, low: 0.0, high: 0.1}")
                  .replace("  batch_size: {type: categorical, choices: [50, 100]}\n", ""))
    other = write_file(tmp_path, "other.yaml", other_text)
    before = store_bytes(tmp_path)
    for args, message in [
        (["--sweep", mixer], "--warm-start-from source: it tuned model mlp, this sweep tunes mixer"),
        (["--sweep", other], "--warm-start-from source: no searched parameter in common"),
        (["--sweep", narrow_sweep, "--epochs", "2", "--study-name", "n2"],
         "--warm-start-from source: its results are not comparable (epochs 1 there, 2 here)"),
        (["--sweep", source_sweep], "--warm-start-from source: a study cannot warm-start itself"),
    ]:
        proc = run_cli("study", *args, "--trials", "1", "--warm-start-from", "source", env=synthetic_env, check=False)
        assert proc.returncode == 2 and proc.stderr.startswith(f"error: {message}"), proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr
    proc = run_cli("study", "--sweep", narrow_sweep, "--trials", "1", "--warm-start-from", "nope",
                   "--study-name", "n3", env=synthetic_env, check=False)
    assert proc.returncode == 2 and "no study named 'nope' in this storage; studies: narrow, source" in proc.stderr
    assert store_bytes(tmp_path) == before
    assert sorted(s.study_name for s in optuna.get_all_study_summaries(storage)) == ["narrow", "source"]


def test_grid_and_enqueued_duplicates_are_not_trained_twice(synthetic_env, tmp_path):
    """The grid sampler does not count an enqueued trial as a grid point, so it proposes the
    enqueued configuration again: that trial ends with the earlier value, untrained. A rerun
    goes on with the same grid (its points keep their numbers) and tries the point left."""
    sweep = write_file(tmp_path, "grid.yaml", GRID_SWEEP)
    first = run_cli("study", "--sweep", sweep, "--trials", "2", *QUICK, env=synthetic_env)
    second = run_cli("study", "--sweep", sweep, "--trials", "3", *QUICK, env=synthetic_env)
    assert "3/3 trials (3 complete" in second.stdout
    storage, tracking = optuna_storage(tmp_path), embedded_tracking(tmp_path)
    found = optuna.load_study(study_name="grid", storage=storage)
    assert {t.params["lr"] for t in found.trials} == {0.003, 0.01}  # both points tried
    duplicate = next(t for t in found.trials if "duplicate_of" in t.user_attrs)
    assert duplicate.user_attrs["duplicate_of"] == 0 and duplicate.params == found.trials[0].params
    assert duplicate.value == found.trials[0].value and "mlflow_run_id" not in duplicate.user_attrs
    assert (f"trial {duplicate.number}: same parameters as trial 0; not trained again, ends with its val_acc "
            f"{found.trials[0].value:.4f}") in first.stderr + second.stderr
    assert len(child_runs(tracking, "grid")) == 2  # one run per configuration
    shown = json.loads(run_cli("best", "--study", "grid", "--format", "json", env=synthetic_env).stdout)
    assert "duplicate_of" not in found.trials[shown["trial"]].user_attrs and shown["run_id"]
    # The same configurations enqueued again (study --enqueue) are not added twice.
    log = []
    warm.enqueue(found, ({"lr": 0.01, "batch_size": 50}, {"lr": 0.003, "batch_size": 50}), "--enqueue", 4, log.append)
    assert log == ["--enqueue: 0 configuration(s) enqueued, 2 already in study 'grid'"]
    assert len(found.trials) == 3


# ------------------------------------------------------------------- Optuna only, in-process


@pytest.fixture
def storage(tmp_path):
    return study_module.open_storage(f"sqlite:///{tmp_path}/optuna.db")


def test_duplicates_of_pruned_and_running_trials_end_pruned(storage):
    s = optuna.create_study(storage=storage, study_name="d", direction="maximize")

    def trial_with(x):
        s.enqueue_trial({"x": x})
        trial = s.ask()
        trial.suggest_categorical("x", [1, 2, 3])
        return trial

    pruned = trial_with(1)
    pruned.report(0.5, 1)
    pruned.report(0.6, 2)
    s.tell(pruned, state=TrialState.PRUNED)
    running = trial_with(2)
    s.tell(trial_with(3), state=TrialState.FAIL)  # a failed trial is no reason to skip: it has no result
    assert warm.earlier_same(s, trial_with(3)) is None
    log = []
    for x, expected in [(1, pruned.number), (2, running.number)]:
        trial = trial_with(x)
        assert warm.earlier_same(s, trial).number == expected
        with pytest.raises(optuna.TrialPruned):
            warm.skip_duplicate(trial, warm.earlier_same(s, trial), "val_acc", log.append)
        s.tell(trial, state=TrialState.PRUNED)
    repeats = s.trials[-2:]
    assert repeats[0].intermediate_values == {1: 0.5, 2: 0.6} and repeats[1].intermediate_values == {}
    assert [t.user_attrs["duplicate_of"] for t in repeats] == [pruned.number, running.number]
    assert log[0].endswith("which was pruned; not trained, ends pruned") and "still running" in log[1]


def test_budget_ignores_copied_and_not_yet_started_enqueued_trials(storage, tmp_path):
    sweep = load_sweep(write_file(tmp_path, "source.yaml", SOURCE_SWEEP))
    s = study_module.create_or_load(storage, sweep, "source", None)
    assert [t.state for t in s.trials] == [TrialState.WAITING] * 2  # the sweep's enqueue list
    copied = optuna.trial.create_trial(params={}, distributions={}, value=0.9,
                                       user_attrs={study_module.COPIED_ATTR: {"study": "x", "trial": 0}})
    s.add_trial(copied)
    count = study_module.count_budget(s.trials)
    assert (count.used, count.queued, count.waiting) == (0, 2, 0)
    trial = s.ask()  # the first enqueued configuration
    suggest(trial, sweep)
    s.tell(trial, 0.5)
    count = study_module.count_budget(s.trials)
    assert (count.used, count.complete, count.queued) == (1, 1, 1)
    assert s.trials[0].params == {"lr": 0.003, "batch_size": 50, "dropout": 0.1}


def test_pruned_trials_are_copied_with_their_intermediate_values(storage, tmp_path):
    sweep = load_sweep(write_file(tmp_path, "source.yaml", SOURCE_SWEEP))
    s = study_module.create_or_load(storage, sweep, "source", None)
    first = s.ask()  # the first enqueued configuration
    suggest(first, sweep)
    first.report(0.7, 1)
    s.tell(first, state=TrialState.PRUNED)
    narrow = load_sweep(write_file(tmp_path, "n.yaml", NARROW_SWEEP))
    copies, line = warm.warm_start_trials(storage, "source", narrow, "n")
    assert len(copies) == 1 and copies[0].state == TrialState.PRUNED and copies[0].intermediate_values == {1: 0.7}
    assert line == ("warm start from study 'source': 1 trial(s) copied (1 pruned); skipped 1 not finished "
                    "(failed, running or waiting)")


@pytest.mark.parametrize("entries, key, problem", [
    ("nope", "enqueue", "must be a list of parameter mappings"),
    ([3], "enqueue[0]", "must be a mapping of searched parameters to values"),
    ([{}], "enqueue[0]", "is empty"),
    ([{"lr": 0.5}], "enqueue[0].lr", "0.5 is not one of the choices (0.003, 0.01)"),
    ([{"dropout": 0.1}, {"dropout": 0.9}], "enqueue[1].dropout", "0.9 is outside the range [0.0, 0.3]"),
    ([{"dropout": "1e-3"}], "enqueue[0].dropout", "is text, not a number (YAML wants a dot: 1.0e-3)"),
    ([{"momentum": 0.9}], "enqueue[0].momentum", "not a searched parameter (searched: "),
    ([{"hidden_sizes": [32]}], "enqueue[0].hidden_sizes", "is fixed by the sweep"),
    ([{"batch_size": True}], "enqueue[0].batch_size", "True is not one of the choices"),
])
def test_bad_enqueue_entries_name_file_key_and_problem(tmp_path, entries, key, problem):
    doc = {**yaml.safe_load(SOURCE_SWEEP), "enqueue": entries}
    path = write_file(tmp_path, "bad.yaml", doc)
    with pytest.raises(MnistTuneError) as err:
        load_sweep(path)
    assert str(err.value).startswith(f"{path}: {key}: ") and problem in str(err.value), str(err.value)


def test_enqueue_checks_grid_steps_and_fingerprint(tmp_path):
    grid = write_file(tmp_path, "grid.yaml", GRID_SWEEP.replace("  - {lr: 0.003, batch_size: 50}", "  - {lr: 0.003}"))
    with pytest.raises(MnistTuneError, match=r"enqueue\[0\]: the grid sampler needs every searched parameter "
                                             r"\(missing: batch_size\)"):
        load_sweep(grid)
    stepped = SOURCE_SWEEP.replace("high: 0.3}", "high: 0.3, step: 0.05}")
    with pytest.raises(MnistTuneError, match=r"enqueue\[0\]\.dropout: 0\.12 is not on the range's steps"):
        load_sweep(write_file(tmp_path, "s.yaml", stepped.replace("dropout: 0.1}", "dropout: 0.12}")))
    # an enqueue list is not part of the study's definition: adding one keeps the fingerprint
    plain = load_sweep(write_file(tmp_path, "p.yaml", SOURCE_SWEEP.split("enqueue:")[0]))
    assert load_sweep(write_file(tmp_path, "q.yaml", SOURCE_SWEEP)).fingerprint() == plain.fingerprint()


def test_enqueue_file_refused_with_one_line_and_nothing_written(synthetic_env, tmp_path):
    sweep = load_sweep(write_file(tmp_path, "source.yaml", SOURCE_SWEEP))
    assert load_enqueue_file(write_file(tmp_path, "ok.yaml", "[{lr: 0.01, dropout: 0}]"), sweep) == (
        {"lr": 0.01, "dropout": 0.0},)
    with pytest.raises(MnistTuneError, match=r"e\.yaml: \(top level\): is an empty list"):
        load_enqueue_file(write_file(tmp_path, "e.yaml", "[]"), sweep)
    bad = write_file(tmp_path, "bad.json", json.dumps([{"lr": 0.01}, {"lr": 0.5}]))
    proc = run_cli("study", "--sweep", tmp_path / "source.yaml", "--trials", "1", "--enqueue", bad,
                   env=synthetic_env, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr == f"error: {bad}: [1].lr: 0.5 is not one of the choices (0.003, 0.01)\n"
    assert not (tmp_path / "mlruns").exists()
