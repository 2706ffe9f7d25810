"""`mnist-tune study --pack 4` on the CPU records what a sequential study records: one child
run per member under the one parent, trial states, params, per-epoch metrics and reloadable
models, checked trial by trial against Optuna as for a sequential study (test_study.py)."""

import dataclasses
import os

import mlflow
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from mnist_tune.data import load_test_split
from mnist_tune.models import as_input

from helpers import REPO, run_cli, write_file
from test_study import TINY_SWEEP, check_study_matches_mlflow, embedded_tracking, optuna_storage

SWEEP = TINY_SWEEP.replace("epochs: 3", "epochs: 2")  # test_study's tiny sweep, one epoch shorter


def child_layout(client, run_id):
    run = client.get_run(run_id)
    return sorted(run.data.params), sorted(run.data.metrics), sorted(run.data.tags), run.info.status


@pytest.mark.slow  # two studies through the CLI: ~1 min each on a shared 2-core machine
def test_pack_study_records_what_a_sequential_one_does(synthetic_env, tmp_path):
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(SWEEP)
    packed = run_cli("study", "--sweep", sweep, "--trials", 6, "--pack", 4, env=synthetic_env)
    assert "6/6 trials" in packed.stdout
    run_cli("study", "--sweep", sweep, "--trials", 6, "--pack", 1, "--study-name", "seq", env=synthetic_env)
    storage, tracking = optuna_storage(tmp_path), embedded_tracking(tmp_path)
    study, client, parent, runs = check_study_matches_mlflow(storage, tracking, "tiny", expect_trials=6)
    seq, _, seq_parent, seq_runs = check_study_matches_mlflow(storage, tracking, "seq", expect_trials=6)
    assert parent.info.status == seq_parent.info.status == "FINISHED"
    assert {t.state.name for t in study.trials} == {t.state.name for t in seq.trials} == {"COMPLETE", "PRUNED", "FAIL"}
    # a round's members share its first trial's batch size (one pack); the sampler proposed the rest
    rounds = [study.trials[:4], study.trials[4:]]
    assert all(len({t.params["batch_size"] for t in r}) == 1 for r in rounds)
    assert len({t.params["lr"] for t in study.trials}) > 1
    # the champion's run also gets the classifier report: compare the other runs, state by state
    champions = {parent.data.tags["best_run_id"], seq_parent.data.tags["best_run_id"]}
    layouts = {s.state: child_layout(client, seq_runs[s.number].info.run_id) for s in seq.trials
               if seq_runs[s.number].info.run_id not in champions}
    for t in study.trials:
        assert sorted(t.params) == sorted(seq.trials[0].params)
        assert sorted(t.user_attrs) == sorted(next(s for s in seq.trials if s.state == t.state).user_attrs)
        if runs[t.number].info.run_id in champions:
            continue
        mine, theirs = child_layout(client, runs[t.number].info.run_id), layouts[t.state]
        assert mine[0] == theirs[0] and mine[1] == theirs[1] and mine[3] == theirs[3]
        assert set(mine[2]) - {"mlflow.loggedArtifacts"} == set(theirs[2]) - {"mlflow.loggedArtifacts"}
    # every completed member's model reloads with plain MLflow and scores its logged test accuracy
    mlflow.set_tracking_uri(tracking)
    images, labels = load_test_split()
    for t in study.trials:
        if t.state != optuna.trial.TrialState.COMPLETE:
            continue
        model = mlflow.pytorch.load_model(f"runs:/{t.user_attrs['mlflow_run_id']}/model")
        with torch.no_grad():
            acc = (model(as_input(images)).argmax(1) == labels).float().mean().item()
        assert acc == pytest.approx(t.user_attrs["test_acc"], abs=1e-6)


def test_auto_packs_never_share_an_architecture_and_keep_ten_rounds():
    from mnist_tune.config import sweep_for
    from mnist_tune.packed_worker import auto_limit

    assert auto_limit(sweep_for("mlp", None), 40) == (4, "at least 10 rounds of 40 trials")
    assert auto_limit(sweep_for("mlp", None), 19)[0] == 1
    assert auto_limit(sweep_for("mlp", None), 10_000)[0] == 256
    limit, why = auto_limit(sweep_for("mixer", None), 64)
    assert limit == 1 and why.startswith("the sweep searches patch_size, dim, depth, token_expansion")
    assert auto_limit(sweep_for(None, str(REPO / "sweeps" / "mlp-wide.yaml")), 64)[0] == 1  # width, depth


def test_tpe_proposes_around_running_trials_and_alone_as_before():
    """A round's members are asked while the others run: TPE's constant liar (on unless
    the sweep sets it) keeps them apart; alone it proposes what it would without."""
    from mnist_tune.config import sweep_for
    from mnist_tune.study import make_sampler

    sweep = sweep_for("mlp", None)
    no_liar = dataclasses.replace(sweep, sampler={**sweep.sampler, "constant_liar": False})

    def proposals(sweep, sequential: bool) -> list[float]:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(sampler=make_sampler(sweep, 0), direction="maximize")
        for _ in range(12):
            trial = study.ask()
            lr = trial.suggest_float("lr", 3e-4, 1e-2, log=True)
            study.tell(trial, -abs(lr - 1e-3))
        asked = []
        for _ in range(3):  # a round of three: asked together, or one after another
            trial = study.ask()
            asked.append(trial.suggest_float("lr", 3e-4, 1e-2, log=True))
            if sequential:
                study.tell(trial, -abs(asked[-1] - 1e-3))
        return asked

    assert proposals(sweep, sequential=True) == proposals(no_liar, sequential=True)
    liar, plain = proposals(sweep, sequential=False), proposals(no_liar, sequential=False)
    assert liar[0] == plain[0] and liar[1:] != plain[1:]


def test_pack_option_rejects_bad_values(synthetic_env, tmp_path):
    proc = run_cli("study", "--model", "mlp", "--pack", "0", env=synthetic_env, check=False)
    assert proc.returncode == 2
    assert "'0' is not auto or a positive integer" in proc.stderr
    assert not (tmp_path / "mlruns").exists()  # nothing written


SIGNAL_SWEEP = """
name: signal
model: mlp
study: {sampler: {name: random, seed: 0}}
train: {epochs: 50, val_size: 200}
fixed: {hidden_sizes: [32], batch_size: 50}
space:
  lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
"""


def test_sigterm_ends_every_member_as_a_single_trial(synthetic_env, tmp_path):
    """SIGTERM during a pack: every member's trial FAIL (Interrupted), its run KILLED, as the
    one trial of a sequential worker; nothing left RUNNING in either store."""
    import signal

    from sqlalchemy import event

    from mnist_tune.config import sweep_for
    from mnist_tune.data import load_mnist
    from mnist_tune.stop import Interrupted
    from mnist_tune.tracking import Tracker
    from mnist_tune.worker import Worker, WorkerSettings

    (tmp_path / "signal.yaml").write_text(SIGNAL_SWEEP)
    worker = Worker(sweep_for(None, str(tmp_path / "signal.yaml")),
                    WorkerSettings(trials=3, storage=optuna_storage(tmp_path), plots=False), Tracker(None),
                    load_mnist(tmp_path / "data", val_size=200), torch.device("cpu"))
    worker.pack = 3
    worker.open()
    sent = []

    @event.listens_for(worker.storage.engine, "before_cursor_execute")
    def signal_mid_write(conn, cursor, statement, *args):
        if statement.startswith("INSERT INTO trial_intermediate_values") and not sent:
            sent.append(statement)
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted):
        worker.run()
    worker.interrupted()
    trials = optuna.load_study(study_name="signal", storage=optuna_storage(tmp_path)).trials
    assert len(trials) == 3 and len({t.params["lr"] for t in trials}) == 3
    client = MlflowClient(embedded_tracking(tmp_path))
    for trial in trials:
        assert trial.state.name == "FAIL" and "Interrupted" in trial.user_attrs["error"]
        assert list(trial.intermediate_values) == [1]  # each member reported its first epoch
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "KILLED" and run.data.tags["mnist_tune.state"] == "FAIL"
    assert client.get_run(worker.record.parent_run_id).info.status == "KILLED"


ONE_POINT_SWEEP = """
name: one-point
model: mlp
study: {sampler: {name: tpe, seed: 0}}
train: {epochs: 1, val_size: 200}
fixed: {hidden_sizes: [32]}
space:
  lr: {type: categorical, choices: [0.003]}
  batch_size: {type: categorical, choices: [50]}
"""


def test_pack_members_that_repeat_a_trial_are_not_trained(synthetic_env, tmp_path):
    """A space of one point, packs of 2: the round's second member repeats the running first
    (pruned, untrained), the next round's repeats the completed one (its value): one run."""
    from mnist_tune.config import sweep_for
    from mnist_tune.data import load_mnist
    from mnist_tune.tracking import Tracker
    from mnist_tune.worker import Worker, WorkerSettings

    logged = []
    worker = Worker(sweep_for(None, str(write_file(tmp_path, "one.yaml", ONE_POINT_SWEEP))),
                    WorkerSettings(trials=3, storage=optuna_storage(tmp_path), plots=False), Tracker(None),
                    load_mnist(tmp_path / "data", val_size=200), torch.device("cpu"), log=logged.append)
    worker.pack = 2
    worker.open()
    assert worker.run().finished == 3
    worker.finish()
    trials = optuna.load_study(study_name="one-point", storage=optuna_storage(tmp_path)).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert [t.user_attrs.get("duplicate_of") for t in trials] == [None, 0, 0]
    assert trials[2].value == trials[0].value and worker.trials_run == 3
    assert "trial 1: same parameters as trial 0, which is still running; not trained, ends pruned" in logged
    check_study_matches_mlflow(optuna_storage(tmp_path), embedded_tracking(tmp_path), "one-point", expect_trials=1)


@pytest.mark.slow  # two workers through the CLI
def test_killed_pack_worker_members_are_failed_and_retried(synthetic_env, tmp_path):
    """kill -9 mid-pack, then the same command: every member is FAIL, its run FAILED, and
    retried once (a retry is trained in a pack of its own shape) as a single trial is."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    from helpers import run_cli as cli
    from test_workers import WORKER_SWEEP, start_worker, wait_for_running_trial

    (tmp_path / "multi.yaml").write_text(WORKER_SWEEP)
    env = {**synthetic_env, "OMP_NUM_THREADS": "1"}
    args = ["--trials", 2, "--epochs", 150, "--pack", 2]
    storage = optuna_storage(tmp_path)
    first = start_worker(env, *args)
    try:
        wait_for_running_trial(storage, "multi")
        first.kill()
    finally:
        first.communicate(timeout=60)
    killed = [t for t in optuna.load_study(study_name="multi", storage=storage).trials]
    assert [t.state.name for t in killed] == ["RUNNING", "RUNNING"]
    proc = cli("study", "--sweep", "multi.yaml", "--no-plots", *args, env=env, check=False)
    assert "2/2 trials" in proc.stdout, proc.stderr
    study = optuna.load_study(study_name="multi", storage=storage)
    client = MlflowClient(embedded_tracking(tmp_path))
    for dead in killed:
        assert f"trial {dead.number}: its worker died" in proc.stderr
        assert study.trials[dead.number].state.name == "FAIL"
        assert client.get_run(dead.user_attrs["mlflow_run_id"]).info.status == "FAILED"
        retries = [t for t in study.trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == dead.number]
        assert len(retries) == 1 and retries[0].state.name in ("COMPLETE", "PRUNED")
    assert "RUNNING" not in {t.state.name for t in study.trials}
