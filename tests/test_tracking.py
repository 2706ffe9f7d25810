"""The generic MLflow adapter (tracking.py) and the study's layout on it (record.py), against
real SQLite stores."""

import json

import pytest
import torch

from mnist_tune import record, tracking
from mnist_tune.errors import MnistTuneError
from mnist_tune.models import as_input, build_model


@pytest.fixture
def tracker(tmp_path):
    return tracking.Tracker(f"sqlite:///{tmp_path}/mlruns/mlflow.db")


def example():
    return as_input(torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)).numpy()


def test_epoch_metrics_are_written_together(tmp_path, monkeypatch):
    """Per-epoch metrics wait in the tracker until the flush interval or the run's end."""


    tracker = tracking.Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = tracker.start_run(tracker.experiment("batching"), "run")

    def history():
        return [(m.step, m.value) for m in tracker.client.get_metric_history(run_id, "val_acc")]

    for epoch in (1, 2):
        tracker.metrics.queue(run_id, {"val_acc": epoch / 10}, step=epoch)
    assert history() == []
    tracker.metrics.flush(run_id)
    assert history() == [(1, 0.1), (2, 0.2)]
    monkeypatch.setattr(tracking, "METRICS_FLUSH_SECONDS", 0.0)  # a slow epoch: due at once
    tracker.metrics.queue(run_id, {"val_acc": 0.3}, step=3)
    assert history() == [(1, 0.1), (2, 0.2), (3, 0.3)]


def test_model_logging_warm_up_writes_nothing(tmp_path, monkeypatch):
    """The study's one-time export warm-up saves to a throwaway folder, not into the store."""
    import tempfile

    import torch




    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the throwaway folder goes here
    tracker = tracking.Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = tracker.experiment("warm-up")
    example = as_input(torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)).numpy()
    tracker.models.warm_up_model_logging(build_model("mixer", patch_size=7, dim=16, depth=1), example)
    assert tracker.seconds_by_call["warm_up_model_logging"] > 0
    assert tracker.client.search_runs([experiment_id]) == []
    assert not list(tmp_path.glob("**/MLmodel"))  # the throwaway copy is gone, nothing else written


def test_calls_are_timed_and_runs_nest(tracker):
    experiment_id = tracker.experiment("timing")
    assert tracker.experiment("timing") == experiment_id  # found, not created twice
    parent = tracker.start_run(experiment_id, "parent")
    child = tracker.start_run(experiment_id, "child", parent, tags={"k": 1})
    run = tracker.client.get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["k"] == "1"
    assert {"experiment", "start_run"} <= set(tracker.seconds_by_call)
    assert tracker.seconds == pytest.approx(sum(tracker.seconds_by_call.values()))
    assert tracker.run_status(child) == "RUNNING"
    tracker.delete_run(child)
    assert tracker.run_status(child) is None and tracker.run_status("0" * 32) is None


def test_artifacts_never_live_under_a_path_made_of_the_name(tracker, tmp_path):
    experiment = tracker.client.get_experiment(tracker.experiment("escape"))
    location = experiment.artifact_location
    assert location.startswith((tmp_path / "mlruns" / "artifacts").as_uri()) and "escape" not in location
    with pytest.raises(MnistTuneError, match="names are not paths"):
        tracker.experiment("../../escape")


def test_registered_version_and_logged_model_link_both_ways(tracker):
    run_id = tracker.start_run(tracker.experiment("registry"), "run")
    model_uri = tracker.models.log_model(run_id, build_model("mlp", hidden_sizes=(8,)), example())
    version = tracker.models.register_model("mnist-test", model_uri)
    tracker.models.set_alias("mnist-test", "champion", version)
    assert tracker.models.model_versions("mnist-test", run_id) == [version]
    champion = tracker.client.get_model_version_by_alias("mnist-test", "champion")
    assert champion.run_id == run_id and champion.source == model_uri
    logged = tracker.client.get_logged_model(model_uri.split("/")[-1])  # what the UI reads for "Registered"
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "mnist-test", "version": int(version)}]


def test_loading_a_model_leaves_nothing_in_the_temp_folder(tracker, tmp_path, monkeypatch):
    """evaluate, predict, the champion's report and latency objectives load logged models;
    MLflow's own download folder would stay behind in the temp folder, one per load."""
    import tempfile

    run_id = tracker.start_run(tracker.experiment("reload"), "run")
    tracker.models.log_model(run_id, build_model("mlp", hidden_sizes=(8,)), example())
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    model = tracker.models.load_model(f"runs:/{run_id}/model")  # as the champion's report loads it
    assert model(torch.as_tensor(example())).shape == (4, 10)  # usable once its files are gone
    assert list(temp.iterdir()) == []


# ------------------------------------------------------------------ record.py


def test_run_lifecycle_ends_each_run_once_with_its_reason(tracker):
    experiment_id = tracker.experiment("lifecycle")

    class Pruned(Exception):
        pass

    ends = {}
    for name, error in [("ok", None), ("pruned", Pruned("pruned after epoch 2")), ("crash", ValueError("boom")),
                        ("ctrl-c", KeyboardInterrupt())]:
        run_id = tracker.start_run(experiment_id, name)
        with pytest.raises(type(error)) if error else _nothing():
            with record.run_lifecycle(tracker, run_id, pruned=(Pruned,)):
                if error:
                    raise error
        run = tracker.client.get_run(run_id)
        ends[name] = (run.info.status, run.data.tags[record.STATE], run.data.tags.get(record.ERROR),
                      run.data.tags.get(record.PRUNED))
    assert ends == {"ok": ("FINISHED", "COMPLETE", None, None),
                    "pruned": ("KILLED", "PRUNED", None, "pruned after epoch 2"),
                    "crash": ("FAILED", "FAIL", "ValueError: boom", None),
                    "ctrl-c": ("KILLED", "FAIL", "KeyboardInterrupt: ", None)}


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def test_a_failure_to_close_does_not_hide_why_the_run_ended(tracker):
    with pytest.warns(UserWarning, match="could not record how it ended"), pytest.raises(ValueError, match="boom"):
        with record.run_lifecycle(tracker, "0" * 32):  # no such run: closing it fails
            raise ValueError("boom")


def test_study_record_has_one_parent_whoever_attaches(tracker, tmp_path):
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text("name: s\n")
    first = record.StudyRecord.attach(tracker, "s", "mlp", "fp", {"budget": 3}, sweep_file)
    again = record.StudyRecord.attach(tracker, "s", "mlp", "fp", {"budget": 3}, None, first.parent_run_id)
    lost = record.StudyRecord.attach(tracker, "s", "mlp", "fp", {"budget": 3})  # parent not known: found by tag
    assert first.parent_run_id == again.parent_run_id == lost.parent_run_id
    parent = tracker.client.get_run(first.parent_run_id)
    assert parent.info.run_name == "study-s" and parent.data.tags[record.ROLE] == "study"
    assert parent.data.params["budget"] == "3"


def test_reconcile_closes_runs_of_trials_that_ended(tracker):
    study = record.StudyRecord.attach(tracker, "r", "mlp", "fp", {})
    runs = {n: study.start_trial(n, "mlp", "tpe") for n in range(3)}
    study.reconcile({0: "COMPLETE", 1: "RUNNING"})  # trial 2 unknown to Optuna: left alone
    status = {n: tracker.run_status(run_id) for n, run_id in runs.items()}
    assert status == {0: "FAILED", 1: "RUNNING", 2: "RUNNING"}
    assert tracker.client.get_run(runs[0]).data.tags[record.ERROR] == "trial 0 ended as COMPLETE"
    assert tracker.client.get_run(runs[1]).data.tags["mlflow.parentRunId"] == study.parent_run_id


def test_reconcile_leaves_runs_that_are_still_recording(tracker):
    study = record.StudyRecord.attach(tracker, "u", "mlp", "fp", {})
    runs = {n: study.start_trial(n, "mlp", "tpe") for n in range(2)}
    study.reconcile({0: "COMPLETE", 1: "COMPLETE"}, recording=frozenset({1}))  # trial 1's upload still runs
    assert {n: tracker.run_status(run_id) for n, run_id in runs.items()} == {0: "FAILED", 1: "RUNNING"}


def test_champion_moves_to_the_promoted_run_and_reuses_its_version(tracker):
    study = record.StudyRecord.attach(tracker, "c", "mlp", "fp", {})
    uris = {}
    for n in range(2):
        run_id = study.start_trial(n, "mlp", "tpe")
        uris[run_id] = tracker.models.log_model(run_id, build_model("mlp", hidden_sizes=(8,)), example())
    first, second = uris
    study.promote("mlp", first, uris[first])
    study.promote("mlp", second, uris[second])
    study.promote("mlp", first, uris[first])  # a concurrent worker's late promotion: no new version
    champion = tracker.client.get_model_version_by_alias(record.registered_name("mlp"), record.CHAMPION)
    assert champion.run_id == first and str(champion.version) == "1"
    assert len(tracker.client.search_model_versions("name = 'mnist-mlp'")) == 2


# ------------------------------------------------------------------ background writes


@pytest.fixture(scope="module")
def queued(tmp_path_factory):
    """One tracker with a background for these tests (its helper process takes seconds to start);
    ``said`` keeps what it printed."""
    said = []
    tracker = tracking.Tracker(f"sqlite:///{tmp_path_factory.mktemp('background')}/mlflow.db")
    tracker.background.start(log=said.append)
    tracker.said = said
    yield tracker
    tracker.background.close()


def test_background_writes_land_in_order_and_reads_see_them(queued):
    """Writes return at once and are made in order: the run ends after its model is logged,
    and a read waits for what was queued before it."""
    run_id = queued.start_run(queued.experiment("async"), "run")
    queued.log_params(run_id, {"lr": 0.01})
    queued.metrics.queue(run_id, {"val_acc": 0.5}, step=1)
    queued.metrics.flush(run_id)
    uri = queued.models.log_model(run_id, build_model("mlp", hidden_sizes=(8,)), example())
    queued.end_run(run_id, "KILLED")
    run = queued.get_run(run_id)  # waits for the queue
    assert run.data.params["lr"] == "0.01" and run.data.metrics["val_acc"] == 0.5
    assert run.info.status == "KILLED" and run.outputs.model_outputs[0].model_id == uri.split("/")[-1]
    logged = queued.client.get_logged_model(uri.split("/")[-1])
    assert logged.status.name == "READY" and logged.params["lr"] == "0.01" and logged.source_run_id == run_id
    assert queued.background.seconds > 0 and run_id not in queued.background.failures
    model = tracking.load_model(uri, queued.uri)
    assert model(torch.as_tensor(example())).shape == (4, 10)


def test_a_failed_background_write_marks_its_run_and_is_reported(queued):
    """A write that fails in the background is never lost silently: it is logged, listed in
    ``failures``, and its run ends FAILED with the reason, whatever status was asked."""
    run_id = queued.start_run(queued.experiment("fails"), "run")
    queued.log_params(run_id, {"lr": 0.01})
    queued.log_params(run_id, {"lr": 0.02})  # MLflow refuses to change a logged param
    queued.end_run(run_id, "FINISHED")
    queued.background.drain()
    run = queued.client.get_run(run_id)
    assert run.info.status == "FAILED" and "tracking failed: _write_params" in run.data.tags[record.ERROR]
    assert queued.background.failures[run_id].startswith("_write_params")
    assert [line for line in queued.said if run_id in line] != []


class NotExportable(torch.nn.Module):
    """Data-dependent control flow: torch.export refuses it."""

    def forward(self, x):
        return x.flatten(1)[:, :10] if x.sum() > 0 else x.flatten(1)[:, 10:20]


def test_a_failed_model_export_leaves_the_model_and_run_failed(queued):
    run_id = queued.start_run(queued.experiment("export"), "run")
    uri = queued.models.log_model(run_id, NotExportable(), example())
    queued.end_run(run_id)
    queued.background.drain()
    assert queued.client.get_logged_model(uri.split("/")[-1]).status.name == "FAILED"
    assert queued.client.get_run(run_id).info.status == "FAILED"
    assert "log_model" in queued.background.failures[run_id]


def test_the_helper_process_ends_with_its_parent(tmp_path):
    """kill -9 of the worker leaves no helper process behind: its pipe closes and it exits,
    removing its scratch folder from the temp folder."""
    import os
    import subprocess
    import sys
    import time

    code = ("import os, sys; from mnist_tune.tracking import Tracker; "
            f"t = Tracker('sqlite:///{tmp_path}/mlflow.db').background.start(); "
            "print(t.helper.process.pid, t.helper.scratch, flush=True); sys.stdin.readline()")
    parent = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pid, scratch = parent.stdout.readline().split()
    child = int(pid)
    assert os.path.isdir(scratch)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.2)
    assert not _alive(child)
    assert not os.path.exists(scratch)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_a_helper_that_cannot_start_leaves_no_folder(tmp_path, monkeypatch):
    import multiprocessing.context
    import tempfile

    from mnist_tune.background import Helper

    def refuse(self):
        raise OSError("refused by the test")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", refuse)
    with pytest.raises(OSError, match="refused by the test"):
        Helper("sqlite:///unused.db")
    assert list(tmp_path.iterdir()) == []
