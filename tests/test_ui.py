"""`mnist-tune ui` (mnist_tune.ui.serve): refusals before anything starts, a clean process
lifecycle, and the direct links it prints."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from mnist_tune.errors import MnistTuneError
from mnist_tune.ui import SHARED_VIEW_TAG, serve, study_links

from helpers import free_port, run_cli, start_ui


def make_store(folder, study="tiny", trials=((0.003, 50, 0.91), (0.001, 100, 0.95), (1e-6, 50, 0.10),
                                            (0.01, 100, 0.93))):
    """The study layout `mnist-tune study` writes, built directly (fast): experiment, parent
    run, nested trial runs with params and metrics."""
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment(study, artifact_location=(folder / "artifacts" / study).as_uri())
    parent = client.create_run(exp, run_name=f"study-{study}", tags={"mnist_tune.role": "study",
                                                                      "mnist_tune.study": study}).info.run_id
    for k, v in {"metric": "val_acc", "direction": "maximize", "model": "mlp"}.items():
        client.log_param(parent, k, v)
    ids = []
    for n, (lr, batch, acc) in enumerate(trials):
        run = client.create_run(exp, run_name=f"trial-{n}", tags={
            "mnist_tune.role": "trial", "mnist_tune.study": study, "mnist_tune.trial": str(n),
            "mnist_tune.state": "COMPLETE", "mlflow.parentRunId": parent}).info.run_id
        for k, v in {"lr": lr, "batch_size": batch, "dropout": 0.2, "device": "cpu", "seed": n}.items():
            client.log_param(run, k, v)
        for epoch in (1, 2):
            client.log_metric(run, "val_acc", acc - 0.01 * (2 - epoch), step=epoch)
        client.log_metric(run, "test_acc", acc - 0.005)
        client.set_terminated(run)
        ids.append(run)
    client.set_terminated(parent)
    return uri, exp, parent, ids


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---------------------------------------------------------------- refusals (nothing started)


def test_importing_ui_does_not_import_mlflow():
    code = "import sys, mnist_tune.ui; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_taken_port_is_refused_within_seconds(tmp_path):
    uri, *_ = make_store(tmp_path / "mlruns")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(MnistTuneError) as e:
            serve(uri, "127.0.0.1", port)
        assert time.monotonic() - started < 5
    message = str(e.value)
    assert "\n" not in message
    assert f"port {port}" in message and "already in use" in message and "--port" in message


@pytest.mark.parametrize("how", ["default", "explicit"])
def test_missing_store_is_refused_and_nothing_is_created(tmp_path, monkeypatch, how):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MNIST_TUNE_HOME", str(tmp_path / "mlruns"))
    before = listing(tmp_path)
    uri = None if how == "default" else f"sqlite:///{tmp_path / 'nope' / 'mlflow.db'}"
    expected = tmp_path / ("mlruns" if how == "default" else "nope") / "mlflow.db"
    with pytest.raises(MnistTuneError) as e:
        serve(uri, "127.0.0.1", free_port())
    message = str(e.value)
    assert "\n" not in message
    assert f"no MLflow store at {expected}" in message and "mnist-tune study" in message
    assert listing(tmp_path) == before


# ---------------------------------------------------------------- links


def test_links_open_the_study_in_model_training_view(tmp_path):
    uri, exp, parent, ids = make_store(tmp_path / "mlruns")
    links = study_links(uri, "http://127.0.0.1:5999")
    assert links.study == "tiny" and links.experiment_id == exp
    assert links.runs == f"http://127.0.0.1:5999/#/experiments/{exp}/runs?workflowType=machine_learning"
    assert links.parent.endswith(f"/#/experiments/{exp}/runs/{parent}/artifacts?workflowType=machine_learning")
    # Compare: the top three by val_acc, best first.
    query = urllib.parse.parse_qs(links.compare.split("?", 1)[1])
    assert json.loads(query["runs"][0]) == [ids[1], ids[3], ids[0]]
    assert json.loads(query["experiments"][0]) == [exp]
    assert links.top_trials[0] == "trial-1 (val_acc 0.9500)"
    # The shared view the table/chart links name is stored on the experiment.
    key = urllib.parse.parse_qs(links.table.split("?", 1)[1])["viewStateShareKey"][0]
    state = json.loads(MlflowClient(uri).get_experiment(exp).tags[SHARED_VIEW_TAG + key])
    assert state["selectedColumns"] == ["metrics.`val_acc`", "metrics.`test_acc`", "params.`lr`",
                                        "params.`batch_size`"]  # searched params only (not device, seed)
    assert state["orderByKey"] == "metrics.`val_acc`" and state["orderByAsc"] is False
    assert "tags.`mnist_tune.role` = 'trial'" in state["searchFilter"]
    parallel = state["compareRunCharts"][0]
    assert parallel["type"] == "PARALLEL" and parallel["selectedMetrics"] == ["val_acc"]
    assert links.chart.endswith("&compareRunsMode=CHART")
    # Idempotent: a second call writes nothing new.
    tags = MlflowClient(uri).get_experiment(exp).tags
    assert study_links(uri, "http://127.0.0.1:5999") == links
    assert MlflowClient(uri).get_experiment(exp).tags == tags


def test_tracking_server_gets_links_without_a_second_ui(tmp_path, monkeypatch):
    """A server serves its own UI: nothing is started, its links are printed."""
    import mnist_tune.ui as ui

    monkeypatch.setattr(ui, "study_links", lambda uri, url, study=None: None)
    monkeypatch.setattr(subprocess, "Popen", None)  # starting anything would fail
    printed = []
    assert serve("http://user:pw@127.0.0.1:9/", out=printed.append) == 0
    assert printed[0] == "the tracking server serves its own UI: http://user:***@127.0.0.1:9"


def test_empty_store_has_no_links(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    assert study_links(uri, "http://x") is None


# ---------------------------------------------------------------- lifecycle


def processes_mentioning(text: str) -> list[str]:
    out = subprocess.run(["ps", "-ww", "-eo", "pid,pgid,args"], capture_output=True, text=True).stdout  # -ww: COLUMNS
    return [line for line in out.splitlines()[1:] if text in line and "ps -eo" not in line]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_starts_prints_links_and_leaves_nothing_behind(tmp_path, signum):
    uri, exp, *_ = make_store(tmp_path / "mlruns")
    port = free_port()
    marker = f"--port {port}"
    assert processes_mentioning(marker) == []
    started = time.monotonic()
    proc, text = start_ui(uri, port)
    try:
        ready = time.monotonic() - started
        assert "ready in" in text, text
        assert f"http://127.0.0.1:{port}/#/experiments/{exp}/runs?workflowType=machine_learning" in text
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
            assert reply.status == 200
        running = processes_mentioning(marker)
        assert len(running) >= 2, running  # mlflow ui and its uvicorn
        groups = {line.split()[1] for line in running} - {str(proc.pid)}
        assert len(groups) == 1  # the UI in its own process group, apart from serve()
        in_group = [line for line in processes_mentioning("") if line.split()[1] in groups]
        assert not any("huey" in line for line in in_group), in_group  # job workers off
        print(f"ready after {ready:.1f} s (serve: {text.split('ready in ')[1].split(';')[0]}); processes: {running}")
        os.kill(proc.pid, signum)
        assert proc.wait(timeout=60) == 0  # a bound on hanging, not a speed goal: a loaded CI machine took over 20 s
    finally:
        if proc.poll() is None:  # a failed assertion: let serve() stop its UI, then make sure
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    deadline = time.monotonic() + 5
    while processes_mentioning(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_mentioning(marker) == []
    assert [line for line in processes_mentioning("") if line.split()[1] in groups] == []
    with socket.socket() as s:  # the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_cli_on_a_busy_port_or_a_missing_store_is_one_line_and_leaves_nothing(tmp_path, synthetic_env):
    """`mnist-tune ui` itself: exit 2 within 5 s, one line, no process left (ps before/after),
    nothing created."""
    uri, *_ = make_store(tmp_path / "store")
    assert processes_mentioning(str(tmp_path)) == []
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        started = time.monotonic()
        proc = run_cli("ui", "--port", taken.getsockname()[1], "--tracking-uri", uri, env=synthetic_env, check=False)
        assert time.monotonic() - started < 5
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "already in use" in proc.stderr
    files = listing(tmp_path)
    proc = run_cli("ui", "--port", free_port(), env=synthetic_env, check=False)  # no ./mlruns here
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no MLflow store at" in proc.stderr
    assert listing(tmp_path) == files
    assert processes_mentioning(str(tmp_path)) == []  # nothing started, nothing left
