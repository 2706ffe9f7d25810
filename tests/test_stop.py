"""Ctrl-C/SIGTERM during training: recorded by the handler, acted on between steps and trials."""

import os
import signal
import sqlite3
import time

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from mnist_tune import stop
from mnist_tune.data import load_mnist
from mnist_tune.models import build_model
from mnist_tune.stop import Interrupted, signals_deferred
from mnist_tune.train import TrainConfig, fit

from test_study import embedded_tracking, optuna_storage


def send(signum):
    os.kill(os.getpid(), signum)  # Python runs the handler before the next line


def test_signal_is_recorded_then_raised_at_the_next_check():
    before = signal.getsignal(signal.SIGTERM)
    with signals_deferred():
        send(signal.SIGTERM)
        with pytest.raises(Interrupted) as raised:
            stop.raise_if_requested()
    assert raised.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) == before
    stop.raise_if_requested()  # outside the block nothing is pending


def test_unseen_request_is_dropped_at_the_end_of_the_block():
    with signals_deferred():
        send(signal.SIGINT)
    stop.raise_if_requested()  # the work it would have stopped is done; nothing carried over
    with signals_deferred():
        stop.raise_if_requested()


def test_signal_during_the_stop_raises_at_once():
    with signals_deferred():
        send(signal.SIGTERM)
        with pytest.raises(Interrupted):
            stop.raise_if_requested()
        stop.raise_if_requested()  # raised once: the clean-up that follows runs undisturbed
        with pytest.raises(Interrupted) as raised:
            send(signal.SIGINT)  # ...unless the user insists
    assert raised.value.exit_code == 130


def test_finish_first_then_abort(capfd):
    with signals_deferred(finish_first=True):
        send(signal.SIGTERM)
        stop.raise_if_requested()  # only asked to finish the current trial
        assert stop.finish_requested() == signal.SIGTERM
        assert "finishing the current trial" in capfd.readouterr().err
        send(signal.SIGTERM)
        with pytest.raises(Interrupted):
            stop.raise_if_requested()


def test_sleep_ends_early_on_a_request():
    previous = signal.signal(signal.SIGALRM, lambda *_: send(signal.SIGTERM))
    started = time.monotonic()
    try:
        with signals_deferred():
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            with pytest.raises(Interrupted):
                stop.sleep(60)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - started < 30  # not the full minute


@pytest.fixture
def splits(synthetic_env, tmp_path):
    return load_mnist(tmp_path / "data", val_size=200, seed=0)


def test_fit_stops_before_the_next_step(splits):
    model = build_model("mixer", patch_size=7, dim=16, depth=1)
    steps = []

    def count_step(module, inputs, output):
        steps.append(1)
        if len(steps) == 3:
            send(signal.SIGTERM)

    model.register_forward_hook(count_step)
    epochs = []
    with pytest.raises(Interrupted), signals_deferred():
        fit(model, splits, TrainConfig(batch_size=50, epochs=2), torch.device("cpu"),
            on_epoch=lambda e, m: epochs.append(e))
    assert len(steps) == 3 and epochs == []  # an epoch here is 20 steps


SIGNAL_SWEEP = """
name: signal
model: mlp
study: {sampler: {name: random, seed: 0}}
train: {epochs: 50, val_size: 200}
fixed: {hidden_sizes: [32], lr: 0.003}
space:
  batch_size: {type: categorical, choices: [50]}
"""


def test_signal_inside_a_storage_write_lets_it_finish(synthetic_env, tmp_path):
    """SIGTERM arriving while Optuna writes the first epoch's value: the write completes, the
    trial stops at the next training step (FAIL, run KILLED), and no store is left locked."""
    from sqlalchemy import event

    from mnist_tune.config import sweep_for
    from mnist_tune.tracking import Tracker
    from mnist_tune.worker import Worker, WorkerSettings

    (tmp_path / "signal.yaml").write_text(SIGNAL_SWEEP)
    worker = Worker(sweep_for(None, str(tmp_path / "signal.yaml")),
                    WorkerSettings(trials=2, storage=optuna_storage(tmp_path)), Tracker(None),
                    load_mnist(tmp_path / "data", val_size=200), torch.device("cpu"))
    worker.open()
    sent = []

    @event.listens_for(worker.storage.engine, "before_cursor_execute")
    def signal_mid_write(conn, cursor, statement, *args):
        if statement.startswith("INSERT INTO trial_intermediate_values") and not sent:
            sent.append(statement)
            send(signal.SIGTERM)

    with pytest.raises(Interrupted):
        worker.run()
    worker.interrupted()

    assert sent
    [trial] = optuna.load_study(study_name="signal", storage=optuna_storage(tmp_path)).trials  # none started after
    assert trial.state.name == "FAIL" and "Interrupted" in trial.user_attrs["error"]
    assert list(trial.intermediate_values) == [1]  # the interrupted write is there
    run = MlflowClient(embedded_tracking(tmp_path)).get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["mnist_tune.state"] == "FAIL"
    for db in ("optuna.db", "mlflow.db"):  # nothing holds a write lock
        sqlite3.connect(tmp_path / "mlruns" / db, timeout=1).execute("BEGIN IMMEDIATE").connection.rollback()
