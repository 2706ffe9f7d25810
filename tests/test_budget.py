"""The Optuna side of a study, in-process: what counts against the budget, which workers are
dead, settings that check themselves. No training."""

import socket
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from mnist_tune import study
from mnist_tune.errors import MnistTuneError

optuna.logging.set_verbosity(optuna.logging.ERROR)


@pytest.fixture
def storage(tmp_path):
    return study.open_storage(f"sqlite:///{tmp_path}/optuna.db")


def test_budget_counts_finished_and_running_but_not_surplus_or_retried(storage):
    s = optuna.create_study(storage=storage, study_name="b")
    s.tell(s.ask(), 0.5)
    s.tell(s.ask(), state=TrialState.PRUNED)
    s.tell(s.ask(), state=TrialState.FAIL)  # a real failure counts
    surplus = s.ask()
    surplus.set_user_attr(study.SURPLUS_ATTR, True)
    s.tell(surplus, state=TrialState.FAIL)
    died = s.ask()
    s.tell(died, state=TrialState.FAIL)
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)(s, s.trials[died.number])  # queues a retry
    s.ask()  # running: the retry
    count = study.count_budget(s.trials)
    assert (count.complete, count.pruned, count.failed, count.running, count.waiting) == (1, 1, 1, 1, 0)
    assert count.used == 4 and count.finished == 3
    assert study.count_budget(s.trials, below=2).used == 2


def test_a_local_worker_whose_process_is_gone_is_dead_at_once(storage):
    s = optuna.create_study(storage=storage, study_name="d")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for worker in (f"{socket.gethostname()}:{gone.pid}", study.this_worker(), f"other-host:{gone.pid}", None):
        trial = s.ask()
        if worker:
            trial.set_user_attr(study.WORKER_ATTR, worker)
    reused = s.ask()  # its worker's pid now belongs to a process started after the trial
    time.sleep(1.5)
    newer = subprocess.Popen(["sleep", "30"])
    try:
        reused.set_user_attr(study.WORKER_ATTR, f"{socket.gethostname()}:{newer.pid}")
        assert [t.number for t in study.dead_local_trials(s)] == [0, 4]  # exited, or pid reused, on this host
        assert [t.number for t in study.live_trials(storage, s)] == [1, 2, 3]
    finally:
        newer.kill()


def test_trials_a_live_worker_may_still_be_recording(storage):
    """Reconciliation leaves alone the runs of trials that ended within the grace period in a
    worker not known to be gone: their model upload may still be running."""
    s = optuna.create_study(storage=storage, study_name="r")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for worker in (study.this_worker(), f"{socket.gethostname()}:{gone.pid}", f"other-host:{gone.pid}"):
        trial = s.ask()
        trial.set_user_attr(study.WORKER_ATTR, worker)
        s.tell(trial, 0.5)
    s.ask().set_user_attr(study.WORKER_ATTR, study.this_worker())  # still running: not ended
    assert study.still_recording(s.trials, grace_period=60) == {0, 2}  # not the local worker that exited
    time.sleep(1.1)
    assert study.still_recording(s.trials, grace_period=1) == set()  # ended longer ago than the grace period


def test_worker_settings_check_themselves():
    with pytest.raises(MnistTuneError, match="--grace-period 10 must exceed --heartbeat-interval 10"):
        study.WorkerSettings(trials=1, heartbeat_interval=10, grace_period=10)
    assert study.WorkerSettings(trials=1).grace_period > study.WorkerSettings(trials=1).heartbeat_interval


def test_read_queries_never_need_torch_or_mlflow():
    code = ("import sys, mnist_tune.cli, mnist_tune.study, mnist_tune.output, mnist_tune.record; "
            "print(sorted(m for m in ('torch', 'mlflow', 'pandas') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"
