"""`mnist-tune study` end to end on synthetic data: Optuna and MLflow agree trial by trial."""

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from helpers import run_cli

# lr 1e-6 learns nothing (pruned once a good trial exists), lr inf diverges (FAIL).
TINY_SWEEP = """
name: tiny
model: mlp
study:
  sampler: {name: random, seed: 0}
  pruner: {name: median, n_startup_trials: 1, n_warmup_steps: 0}
train: {epochs: 3, val_size: 200}
fixed: {hidden_sizes: [32]}
space:
  lr: {type: categorical, choices: [0.003, 1.0e-6, .inf]}
  batch_size: {type: categorical, choices: [50, 100]}
  dropout: {type: float, low: 0.0, high: 0.3}
"""
STATUS_OF = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


@pytest.fixture
def tiny_sweep(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_SWEEP)
    return path


def optuna_storage(tmp_path):
    return f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"


def embedded_tracking(tmp_path):
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


def check_study_matches_mlflow(storage: str, tracking: str, study_name: str = "tiny", expect_trials=None,
                               lineage_from: int = 0):
    """The invariants of the MLflow layout, checked against Optuna's own record."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    # surplus trials and skipped duplicates (warm.py) are never trained, so they have no run
    trials = [t for t in study.trials if not t.user_attrs.get("budget_surplus") and "duplicate_of" not in t.user_attrs]
    if expect_trials is not None:
        assert len(trials) == expect_trials
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name(study_name)
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.data.tags["mnist_tune.role"] == "study"
    children = client.search_runs([experiment.experiment_id], "tags.`mnist_tune.role` = 'trial'", max_results=1000)
    assert len(children) == len(trials)
    by_trial = {int(r.data.tags["mnist_tune.trial"]): r for r in children}
    digests = set()
    assert sorted(by_trial) == sorted(t.number for t in trials)  # one run per trial, no duplicates
    for t in trials:
        run = by_trial[t.number]
        assert run.info.run_name == f"trial-{t.number}"
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        assert run.data.tags["mnist_tune.state"] == t.state.name
        assert run.info.status == STATUS_OF[t.state.name], (t.number, t.state, run.info.status, run.data.tags)
        assert t.user_attrs["mlflow_run_id"] == run.info.run_id
        for name, value in t.params.items():
            assert run.data.params[name] == str(value)
        # data lineage: the three splits, named, with the files' MD5s and the validation split
        inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
        if t.number >= lineage_from:  # trials of releases before it have neither
            assert "do not call `.eval()`" in run.data.tags["mlflow.note.content"]  # the run's description
            assert sorted(inputs) == ["test", "training", "validation"]
            profile = json.loads(inputs["validation"].profile)
            assert profile["rows"] == 200 and profile["val_seed"] == 0 and len(profile["md5"]) == 4
            digests.add(tuple(sorted((k, d.digest) for k, d in inputs.items())))
        epochs = len(t.intermediate_values)
        for metric in ("train_loss", "val_loss", "val_acc", "epoch_seconds"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
            assert sorted(steps) == list(range(1, epochs + 1)), (t.number, metric, steps)
        if t.state.name == "COMPLETE":
            assert run.data.metrics["test_acc"] == pytest.approx(t.user_attrs["test_acc"])
            assert run.data.metrics["val_acc"] == pytest.approx(t.value)
        if t.state.name == "FAIL":
            assert "nan" in run.data.tags["mnist_tune.error"].lower()
    running = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
    assert running == []
    assert len(digests) <= 1  # every trial trained and validated on the same data
    return study, client, parent, by_trial


def test_study_budget_is_total_and_runs_match(synthetic_env, tmp_path, tiny_sweep):
    first = run_cli("study", "--sweep", tiny_sweep, "--trials", "4", env=synthetic_env)
    assert "4/4 trials" in first.stdout
    second = run_cli("study", "--sweep", tiny_sweep, "--trials", "4", env=synthetic_env)
    assert "4/4 trials" in second.stdout and "this worker ran 0" in second.stdout
    check_study_matches_mlflow(optuna_storage(tmp_path), embedded_tracking(tmp_path), expect_trials=4)
    run_cli("study", "--sweep", tiny_sweep, "--trials", "7", env=synthetic_env)
    study, client, parent, by_trial = check_study_matches_mlflow(
        optuna_storage(tmp_path), embedded_tracking(tmp_path), expect_trials=7)
    states = {t.state.name for t in study.trials}
    assert {"COMPLETE", "PRUNED", "FAIL"} <= states, states
    # a resumed random sampler must not replay the first draws
    draws = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(draws)) > 4
    # parent run: finished, sweep file and plots attached, best trial recorded
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/study.html", "plots/history.png", "plots/curves.png"} <= artifacts
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "sweep")] == ["sweep/tiny.yaml"]
    best = study.best_trial
    assert parent.data.tags["best_run_id"] == best.user_attrs["mlflow_run_id"]
    assert parent.data.metrics["best_val_acc"] == pytest.approx(best.value)
    champion = client.get_model_version_by_alias("mnist-mlp", "champion")
    assert champion.run_id == best.user_attrs["mlflow_run_id"]
    # the champion's classifier report: per-class metrics and the confusion matrix on its run
    champion_run = client.get_run(champion.run_id)
    assert {f"test_recall_{k}" for k in range(10)} <= set(champion_run.data.metrics)
    assert "evaluation/confusion_matrix.png" in {a.path for a in client.list_artifacts(champion.run_id, "evaluation")}


def test_changed_search_space_is_refused_untouched(synthetic_env, tmp_path, tiny_sweep):
    run_cli("study", "--sweep", tiny_sweep, "--trials", "1", "--no-plots", env=synthetic_env)
    before = (tmp_path / "mlruns" / "optuna.db").read_bytes()
    tiny_sweep.write_text(TINY_SWEEP.replace("high: 0.3", "high: 0.5"))
    proc = run_cli("study", "--sweep", tiny_sweep, "--trials", "2", env=synthetic_env, check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "created from a different sweep" in proc.stderr
    assert (tmp_path / "mlruns" / "optuna.db").read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["--model", "cnn"], "unknown model 'cnn'"),
    (["--sweep", "nope.yaml"], "does not exist"),
    (["--model", "mlp", "--device", "cuda:5"], "not available"),
    (["--model", "mlp", "--storage", "postgresql://u:s3cret@127.0.0.1:9/x"], "cannot open Optuna storage"),
    (["--model", "mlp", "--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
    (["--model", "mlp", "--storage", "redis://x"], "unsupported storage URL"),
    ([], "give --model"),
])
def test_study_bad_input(synthetic_env, tmp_path, args, message):
    proc = run_cli("study", "--trials", "1", "--val-size", "200", *args, env=synthetic_env, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert "s3cret" not in proc.stderr + proc.stdout
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()


def write_pngs(folder, images):
    from PIL import Image

    folder.mkdir()
    paths = []
    for i, image in enumerate(images):
        path = folder / f"digit{i}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    big = folder / "big.png"  # other sizes are resized to 28x28
    Image.fromarray(images[0]).resize((56, 56), Image.Resampling.NEAREST).save(big)
    return paths + [big]


@pytest.mark.slow
def test_study_against_real_mlflow_server(synthetic_env, tmp_path, tiny_sweep, mlflow_server):
    env = {**synthetic_env, "MLFLOW_TRACKING_URI": mlflow_server}
    storage = optuna_storage(tmp_path)
    run_cli("study", "--sweep", tiny_sweep, "--trials", "5", "--study-name", "tiny-server", "--seed", "2",
            "--storage", storage, env=env)
    study, client, parent, by_trial = check_study_matches_mlflow(storage, mlflow_server, "tiny-server", 5)
    best = study.best_trial
    assert best.value > 0.9  # seed 2 draws a learning rate that learns
    run_id = best.user_attrs["mlflow_run_id"]
    assert client.get_run(run_id).info.artifact_uri.startswith("mlflow-artifacts:")  # uploaded through the server

    shown = json.loads(run_cli("best", "--study", "tiny-server", "--storage", storage, "--json", env=env).stdout)
    assert shown["trial"] == best.number and shown["run_id"] == run_id and shown["params"] == best.params

    table = json.loads(run_cli("runs", "--study", "tiny-server", "--format", "json", env=env).stdout)
    assert len(table) == 5 and table[0]["trial"] == best.number
    assert {"lr", "batch_size", "dropout", "val_acc", "test_acc", "run_id"} <= set(table[0])
    csv = run_cli("runs", "--study", "tiny-server", "--format", "csv", env=env).stdout
    assert csv.splitlines()[0].startswith("trial,state,val_acc") and len(csv.splitlines()) == 6

    logged = client.get_run(run_id).data.metrics["test_acc"]
    out = run_cli("evaluate", "--run-id", run_id, env=env).stdout
    assert f"test_acc {logged:.4f} (logged {logged:.4f})" in out
    out = run_cli("evaluate", "--model-uri", "models:/mnist-mlp@champion", env=env).stdout
    assert f"test_acc {logged:.4f}" in out

    from mnist_tune.data import load_mnist

    splits = load_mnist(tmp_path / "data", val_size=200)
    pngs = write_pngs(tmp_path / "png", splits.test_x[:4].numpy())
    out = run_cli("predict", "--run-id", run_id, *pngs, env=env).stdout.splitlines()
    labels = [int(line.split(": ")[1].split()[0]) for line in out]
    assert labels == splits.test_y[:4].tolist() + [splits.test_y[0].item()]  # synthetic digits are easy
    assert all(0 < float(line.split("(")[1].rstrip(")")) <= 1 for line in out)

    # Optuna's own tools read the same storage
    proc = subprocess.run([str(Path(sys.executable).parent / "optuna"), "best-trial", "--study-name", "tiny-server",
                           "--storage", storage, "-f", "json"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["number"] == best.number


DATASET_FAILS = """
name: dsfail
model: mlp
study: {sampler: {name: random, seed: 0}}
train: {epochs: 1, val_size: 200}
fixed: {hidden_sizes: [32], lr: 0.003}
space:
  dropout: {type: float, low: 0.0, high: 0.3}
"""


def test_a_trial_whose_tracking_failed_fails_too(synthetic_env, tmp_path):
    """A background write that fails for a trial's run (here: the store refuses the datasets,
    as a concurrent worker's insert once made it do) leaves that run FAILED; the trial then
    ends FAIL with the reason, not COMPLETE, and is never the champion."""
    import torch
    from sqlalchemy import event

    from mnist_tune.config import sweep_for
    from mnist_tune.data import load_mnist
    from mnist_tune.tracking import Tracker
    from mnist_tune.worker import Worker, WorkerSettings

    (tmp_path / "dsfail.yaml").write_text(DATASET_FAILS)
    tracker = Tracker(None)
    tracker.background.start(helper=False)
    worker = Worker(sweep_for(None, str(tmp_path / "dsfail.yaml")),
                    WorkerSettings(trials=2, storage=optuna_storage(tmp_path), plots=False), tracker,
                    load_mnist(tmp_path / "data", val_size=200), torch.device("cpu"))
    worker.open()
    refused = []

    @event.listens_for(tracker.client._tracking_client.store.engine, "before_cursor_execute")
    def refuse_datasets(conn, cursor, statement, *args):
        if statement.startswith("INSERT INTO datasets") and len(refused) < 2:  # the first try and its retry
            refused.append(statement)
            raise RuntimeError("refused by the test")

    worker.run()
    worker.finish()
    tracker.background.close()

    assert len(refused) == 2
    study = optuna.load_study(study_name="dsfail", storage=optuna_storage(tmp_path))
    failed, good = study.trials
    client = MlflowClient(embedded_tracking(tmp_path))
    run = client.get_run(failed.user_attrs["mlflow_run_id"])
    assert failed.state.name == "FAIL" and "tracking failed (log_datasets" in failed.user_attrs["error"]
    assert run.info.status == "FAILED" and "refused by the test" in run.data.tags["mnist_tune.error"]
    assert good.state.name == "COMPLETE"
    assert client.get_run(good.user_attrs["mlflow_run_id"]).info.status == "FINISHED"
    champion = client.get_model_version_by_alias("mnist-mlp", "champion")
    assert champion.run_id == good.user_attrs["mlflow_run_id"]


def test_read_commands_reject_unknown_names(synthetic_env, tmp_path, tiny_sweep):
    run_cli("study", "--sweep", tiny_sweep, "--trials", "1", "--no-plots", env=synthetic_env)
    for args, message in [(["best", "--study", "nope"], "no study named 'nope' in this storage; studies: tiny"),
                          (["runs", "--study", "nope"], "no study named 'nope' in this storage; studies: tiny"),
                          (["evaluate", "--run-id", "0123abc"], "no MLflow run with id '0123abc'"),
                          (["predict", "--run-id", "x", "missing.png"], "missing.png: no such file")]:
        proc = run_cli(*args, env=synthetic_env, check=False)
        assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    proc = run_cli("evaluate", "--run-id", "0123abc", env=synthetic_env, check=False)
    assert "trial-0" in proc.stderr  # lists the runs that exist


def run_worker(tmp_path, sweep: str, trials: int, helper: bool, log=None, after_open=None):
    """A study worker in this process (as `mnist-tune study` runs it), on the synthetic data
    and the embedded stores; ``after_open(tracker)`` runs once the stores are open."""
    import torch

    from mnist_tune.config import sweep_for
    from mnist_tune.data import load_mnist
    from mnist_tune.tracking import Tracker
    from mnist_tune.worker import Worker, WorkerSettings

    (tmp_path / "sweep.yaml").write_text(sweep)
    tracker = Tracker(None)
    tracker.background.start(helper=helper)
    worker = Worker(sweep_for(None, str(tmp_path / "sweep.yaml")),
                    WorkerSettings(trials=trials, storage=optuna_storage(tmp_path), plots=False), tracker,
                    load_mnist(tmp_path / "data", val_size=200), torch.device("cpu"), log)
    try:
        worker.open()
        if after_open:
            after_open(tracker)
        worker.run()
        worker.finish()
    finally:
        tracker.background.close()


OVERLAP = """
name: overlap
model: mlp
study: {sampler: {name: random, seed: 0}, pruner: {name: none}}
train: {epochs: 1, val_size: 200}
fixed: {hidden_sizes: [32], lr: 0.003}
space:
  dropout: {type: float, low: 0.0, high: 0.3}
"""


def test_model_uploads_overlap_the_next_trial_and_nothing_is_lost(synthetic_env, tmp_path):
    """With the helper process (a spare core), a trial ends in Optuna once its run's writes
    before the model upload are made; the upload, and the run's end behind it, go on while the
    next trial trains. Still every run ends FINISHED with its model, and the champion is the
    best trial's."""
    from mlflow.entities import LoggedModelStatus

    from mnist_tune import record

    run_worker(tmp_path, OVERLAP, trials=3, helper=True)
    study, client, parent, by_trial = check_study_matches_mlflow(optuna_storage(tmp_path), embedded_tracking(tmp_path),
                                                                 "overlap", expect_trials=3)
    first, second, _ = study.trials
    # the first run ended (after its upload) once the second trial had started
    assert by_trial[first.number].info.end_time > second.datetime_start.timestamp() * 1000
    for t in study.trials:
        assert t.state.name == "COMPLETE"
        model_id = t.user_attrs["model_uri"].removeprefix("models:/")
        assert client.get_logged_model(model_id).status == LoggedModelStatus.READY
    best = max(study.trials, key=lambda t: t.value)
    assert client.get_model_version_by_alias("mnist-mlp", "champion").run_id == best.user_attrs["mlflow_run_id"]
    assert parent.info.status == "FINISHED" and parent.data.tags[record.BEST_TRIAL] == str(best.number)


BEST_IS_SECOND = """
name: overlap
model: mlp
study: {sampler: {name: random, seed: 0}, pruner: {name: none}}
train: {epochs: 1, val_size: 200}
fixed: {hidden_sizes: [32], dropout: 0.1}
space:
  lr: {type: categorical, choices: [1.0e-6, 0.003, 1.0e-5]}
enqueue: [{lr: 1.0e-6}, {lr: 0.003}, {lr: 1.0e-5}]
"""


def test_a_failed_model_upload_fails_the_run_and_never_crowns_the_trial(synthetic_env, tmp_path):
    """The upload that overlaps the next trial fails (here: the store gives the trial's logged
    model an artifact location nothing can write to): the trial keeps its value, its run ends
    FAILED with the reason, and it is never the champion, not even as the best trial at the end."""
    from sqlalchemy import event

    inserted, lines = [], []

    def misplace_the_second_model(tracker):
        @event.listens_for(tracker.client._tracking_client.store.engine, "after_cursor_execute")
        def misplace(conn, cursor, statement, *args):
            if statement.startswith("INSERT INTO logged_models"):
                inserted.append(cursor.lastrowid)
                if len(inserted) == 2:  # trial 1's, before the helper uploads into it
                    cursor.execute("UPDATE logged_models SET artifact_location = 'nowhere://x' WHERE rowid = ?",
                                   (cursor.lastrowid,))

    run_worker(tmp_path, BEST_IS_SECOND, trials=3, helper=True, log=lines.append, after_open=misplace_the_second_model)

    study = optuna.load_study(study_name="overlap", storage=optuna_storage(tmp_path))
    client = MlflowClient(embedded_tracking(tmp_path))
    runs = {t.number: client.get_run(t.user_attrs["mlflow_run_id"]) for t in study.trials}
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert [runs[n].info.status for n in range(3)] == ["FINISHED", "FAILED", "FINISHED"]
    assert "tracking failed: log_model" in runs[1].data.tags["mnist_tune.error"]
    champion = client.get_model_version_by_alias("mnist-mlp", "champion")
    assert champion.run_id != runs[1].info.run_id and client.get_run(champion.run_id).info.status == "FINISHED"
    assert max(study.trials, key=lambda t: t.value).number == 1  # lr 0.003 learns; 1e-6 and 1e-5 barely
    assert champion.run_id == runs[0].info.run_id  # crowned first; trial 1 never was
    assert "trial 1: its model was not stored; the champion alias stays where it was" in lines
