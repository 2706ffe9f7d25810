"""Many workers, one study: PostgreSQL storage + a real MLflow server, crashes and signals."""

import signal
import socket
import subprocess
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback

from helpers import CLI, run_cli
from test_study import check_study_matches_mlflow

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

# No divergent lr here: every trial completes or is pruned.
WORKER_SWEEP = """
name: multi
model: mlp
study:
  sampler: {name: tpe, seed: 0, n_startup_trials: 4}
  pruner: {name: median, n_startup_trials: 2, n_warmup_steps: 1}
train: {epochs: 3, val_size: 200}
fixed: {hidden_sizes: [32]}
space:
  lr: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}
  batch_size: {type: categorical, choices: [50, 100]}
"""


@pytest.fixture
def worker_env(synthetic_env, tmp_path, mlflow_server, postgres_db):
    (tmp_path / "multi.yaml").write_text(WORKER_SWEEP)
    # One torch thread each: several workers share two cores (OpenMP spinning oversubscribes them).
    return {**synthetic_env, "MNIST_TUNE_STORAGE": postgres_db, "MLFLOW_TRACKING_URI": mlflow_server,
            "OMP_NUM_THREADS": "1"}


def start_worker(env, *args, log=None):
    return subprocess.Popen([*CLI, "study", "--sweep", "multi.yaml", "--no-plots", *map(str, args)],
                            env=env, stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_running_trial(storage, name, timeout=120):
    """The first RUNNING trial that already has its MLflow run, once one exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except Exception:  # not created yet (no study, or no database file)
            study = None
        if study is not None:
            for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
                if "mlflow_run_id" in t.user_attrs and t.intermediate_values:
                    return t
        time.sleep(0.3)
    raise TimeoutError("no trial started running")


def test_three_workers_share_one_budget(worker_env, postgres_db, mlflow_server):
    workers = [start_worker(worker_env, "--trials", 12, "--threads", 1) for _ in range(3)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0], outputs
    study, client, parent, by_trial = check_study_matches_mlflow(postgres_db, mlflow_server, "multi")
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 12
    assert all(t.user_attrs.get("budget_surplus") for t in study.trials if t not in finished)
    # Workers starting together share the sampler's seed, so the others' first draws may repeat
    # the first worker's: skipped as duplicates (no run), after which each reseeds.
    duplicates = [t for t in finished if "duplicate_of" in t.user_attrs]
    assert len(duplicates) <= 2 and all(t.number not in by_trial for t in duplicates)
    assert len({r.info.run_name for r in by_trial.values()}) == 12 - len(duplicates)
    assert parent.info.status == "FINISHED"
    assert len(client.search_runs([parent.info.experiment_id], "tags.`mnist_tune.role` = 'study'")) == 1
    assert sum("this worker ran" in out for out in outputs) >= 2  # the work was shared


def test_killed_worker_trial_is_failed_retried_and_run_closed(worker_env, postgres_db, mlflow_server):
    fast_beat = ["--heartbeat-interval", 1, "--grace-period", 3, "--epochs", 300]
    victim = start_worker(worker_env, "--trials", 3, *fast_beat)
    doomed = wait_for_running_trial(postgres_db, "multi")
    victim.kill()  # SIGKILL: no handler runs, the trial and its run stay RUNNING
    victim.wait()
    survivor = start_worker(worker_env, "--trials", 3, *fast_beat)
    out = survivor.communicate(timeout=600)[0]
    assert survivor.returncode == 0, out
    assert f"trial {doomed.number}: its worker died" in out

    study = optuna.load_study(study_name="multi", storage=postgres_db)
    dead = study.trials[doomed.number]
    assert dead.state.name == "FAIL"
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == doomed.number]
    assert len(retries) == 1 and retries[0].state.name in ("COMPLETE", "PRUNED")
    assert retries[0].params == dead.params
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials) == 3  # the budget is reached

    client = MlflowClient(mlflow_server)
    dead_run = client.get_run(doomed.user_attrs["mlflow_run_id"])
    assert dead_run.info.status == "FAILED" and "heartbeat" in dead_run.data.tags["mnist_tune.error"]
    retry_run = client.get_run(retries[0].user_attrs["mlflow_run_id"])
    assert retry_run.data.tags["mnist_tune.retry_of_trial"] == str(doomed.number)
    assert retry_run.info.run_id != dead_run.info.run_id
    experiment = client.get_experiment_by_name("multi")
    assert client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'") == []


@pytest.mark.parametrize("finish", [False, True])
def test_sigterm_stops_cleanly(worker_env, postgres_db, mlflow_server, finish):
    args = ["--trials", 5, "--epochs", 300] + (["--finish-trial-on-signal"] if finish else [])
    worker = start_worker(worker_env, *args)
    trial = wait_for_running_trial(postgres_db, "multi")
    worker.send_signal(signal.SIGTERM)
    out = worker.communicate(timeout=120)[0]
    assert worker.returncode == 143, out
    assert "interrupted" in out
    study = optuna.load_study(study_name="multi", storage=postgres_db)
    run = MlflowClient(mlflow_server).get_run(trial.user_attrs["mlflow_run_id"])
    if finish:
        assert study.trials[trial.number].state.name in ("COMPLETE", "PRUNED")
        assert run.info.status in ("FINISHED", "KILLED")
        assert len(study.trials) == trial.number + 1  # no new trial was started
    else:  # stopped within the trial, not after its 300 epochs
        assert len(study.trials[trial.number].intermediate_values) < 300
        assert study.trials[trial.number].state.name == "FAIL"
        assert run.info.status == "KILLED" and run.data.tags["mnist_tune.state"] == "FAIL"
    parent = MlflowClient(mlflow_server).get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.info.status == "KILLED"


@pytest.mark.parametrize("storage, tracking, message", [
    ("postgresql://nobody:hunter2@127.0.0.1:5432/test", None, "cannot open Optuna storage"),
    ("postgresql://user:hunter2@127.0.0.1:9/optuna", None, "cannot open Optuna storage"),
    (None, "http://user:hunter2@127.0.0.1:9", "tracking server http://user:***@127.0.0.1:9 is unreachable"),
])
def test_bad_storage_or_server_fails_fast_without_leaking(synthetic_env, tmp_path, storage, tracking, message):
    env = dict(synthetic_env)
    if storage:
        env["MNIST_TUNE_STORAGE"] = storage
    if tracking:
        env["MLFLOW_TRACKING_URI"] = tracking
    started = time.monotonic()
    proc = run_cli("study", "--model", "mlp", "--trials", "1", "--val-size", "200", env=env, check=False)
    assert time.monotonic() - started < 30
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert "hunter2" not in proc.stdout + proc.stderr


def test_storage_url_from_file_is_never_stored(worker_env, postgres_db, mlflow_server, tmp_path):
    secret_url = postgres_db.replace("postgres@", "postgres:sup3rsecret@")  # trust auth ignores the password
    (tmp_path / "storage.url").write_text(secret_url + "\n")
    env = {k: v for k, v in worker_env.items() if k != "MNIST_TUNE_STORAGE"}
    env["MNIST_TUNE_STORAGE_FILE"] = str(tmp_path / "storage.url")
    proc = run_cli("study", "--sweep", "multi.yaml", "--trials", "2", env=env)
    status = run_cli("status", "--study", "multi", env=env)
    assert "sup3rsecret" not in proc.stdout + proc.stderr + status.stdout + status.stderr
    assert "2 " in status.stdout and "0 left" in status.stdout
    study = optuna.load_study(study_name="multi", storage=postgres_db)
    stored = repr(study.user_attrs) + repr([t.user_attrs for t in study.trials])
    client = MlflowClient(mlflow_server)
    for run in client.search_runs([client.get_experiment_by_name("multi").experiment_id]):
        stored += repr(run.data.params) + repr(run.data.tags)
    assert "sup3rsecret" not in stored


def test_status_shows_live_workers(worker_env, postgres_db):
    worker = start_worker(worker_env, "--trials", 3, "--epochs", 400, "--heartbeat-interval", 1, "--grace-period", 3)
    try:
        trial = wait_for_running_trial(postgres_db, "multi")
        out = run_cli("status", "--study", "multi", env=worker_env).stdout
        assert f"live workers: 1 (running trials {trial.number})" in out, out
        assert "1 running" in out and "budget: 3 trials" in out
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=60)


def test_sqlite_refuses_a_second_live_worker(synthetic_env, tmp_path):
    (tmp_path / "multi.yaml").write_text(WORKER_SWEEP)
    env = {**synthetic_env, "OMP_NUM_THREADS": "1"}
    first = start_worker(env, "--trials", 2, "--epochs", 2000, "--heartbeat-interval", 1, "--grace-period", 3)
    try:
        wait_for_running_trial(f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}", "multi")
        proc = run_cli("study", "--sweep", "multi.yaml", "--trials", "2", "--epochs", "2000", env=env, check=False)
        assert proc.returncode == 2 and "run parallel workers against PostgreSQL" in proc.stderr
        assert f"running in {socket.gethostname()}:{first.pid})" in proc.stderr  # where the live one runs
        assert proc.stderr.count("\n") == 1
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)


def test_killed_embedded_worker_is_recovered_at_once(synthetic_env, tmp_path):
    """kill -9 mid-trial on the embedded default, then the same command at once: no grace
    period to wait out (the dead worker ran on this host), the trial is FAIL and retried."""
    (tmp_path / "multi.yaml").write_text(WORKER_SWEEP)
    env = {**synthetic_env, "OMP_NUM_THREADS": "1"}
    args = ["--trials", 2, "--epochs", 150]
    storage = f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    first = start_worker(env, *args)
    try:
        killed = wait_for_running_trial(storage, "multi")
        first.kill()
    finally:
        first.communicate(timeout=60)
    # An hour's grace period: had the dead worker to be found by its stale heartbeat, this
    # worker would be refused (a live worker on SQLite) or wait an hour; it is found at once.
    proc = run_cli("study", "--sweep", "multi.yaml", "--no-plots", *args, "--heartbeat-interval", 60,
                   "--grace-period", 3600, env=env, timeout=600)
    assert f"trial {killed.number}: its worker died" in proc.stderr and "2/2 trials" in proc.stdout
    study = optuna.load_study(study_name="multi", storage=storage)
    states = {t.number: t.state.name for t in study.trials}
    assert states[killed.number] == "FAIL" and "RUNNING" not in states.values()
    retries = [t for t in study.trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == killed.number]
    assert len(retries) == 1 and retries[0].state.name in ("COMPLETE", "PRUNED")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("multi").experiment_id])
    assert "RUNNING" not in {r.info.status for r in runs}
    assert client.get_run(killed.user_attrs["mlflow_run_id"]).info.status == "FAILED"
