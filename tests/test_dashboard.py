"""mnist_tune/dashboard.py: optuna-dashboard on a real small study, read through its HTTP API
(/api/studies, /api/studies/<id>), on SQLite (in process) and PostgreSQL (as the
``python -m mnist_tune.dashboard`` process, stopped by SIGTERM / SIGINT)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import optuna
import pytest

from mnist_tune.dashboard import find_study, open_dashboard, serve
from mnist_tune.errors import MnistTuneError
from mnist_tune.study import open_existing_storage

from helpers import free_port, sigint_as_in_a_terminal

optuna.logging.set_verbosity(optuna.logging.ERROR)

VALUES = [0.91, 0.95, 0.93]  # the complete trials' objective values, in order


def make_study(url: str, name: str) -> None:
    """3 complete trials with known values and params, 1 pruned (with intermediate values)."""
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    for i, value in enumerate(VALUES):
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
        trial.report(value - 0.01, step=1)
        study.tell(trial, value)
    pruned = study.ask()
    pruned.report(0.5, step=1)
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)


def get_json(url: str, timeout: float = 30):
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return json.loads(reply.read())


def check_api(base_url: str, name: str, study_id: int) -> None:
    """The study's trials, as the dashboard's HTTP API serves them."""
    listed = get_json(f"{base_url}/api/studies")["study_summaries"]
    summary = next(s for s in listed if s["study_name"] == name)
    assert summary["study_id"] == study_id
    detail = get_json(f"{base_url}/api/studies/{study_id}")
    assert detail["name"] == name and detail["directions"] == ["maximize"]
    trials = sorted(detail["trials"], key=lambda t: t["number"])
    assert [t["state"] for t in trials] == ["Complete"] * 3 + ["Pruned"]
    assert [t["values"] for t in trials[:3]] == [[v] for v in VALUES]
    assert all(t["params"][0]["name"] == "lr" for t in trials[:3])
    assert [t["number"] for t in detail["best_trials"]] == [1]
    assert detail["has_intermediate_values"] is True


def check_read_only(base_url: str, study_id: int) -> None:
    for method, path in (("DELETE", f"/api/studies/{study_id}"), ("POST", "/api/studies"),
                         ("POST", f"/api/studies/{study_id}/rename")):
        request = urllib.request.Request(base_url + path, method=method, data=b"{}",
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        assert caught.value.code == 403, (method, path)


def test_dashboard_on_sqlite_in_process(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    make_study(url, "dash-sqlite")
    optuna.create_study(study_name="other", storage=url)

    printed = []
    ready = threading.Event()
    holder = {}

    def on_ready(dashboard):
        holder["dashboard"] = dashboard
        ready.set()

    thread = threading.Thread(target=serve, args=(url, "dash-sqlite", "127.0.0.1", 0),
                              kwargs={"log": printed.append, "ready": on_ready}, daemon=True)
    thread.start()
    assert ready.wait(60), "the dashboard did not start"
    dashboard = holder["dashboard"]
    try:
        assert printed == [f"optuna-dashboard for study 'dash-sqlite': {dashboard.url}  (Ctrl-C stops it)"]
        assert dashboard.url == f"http://127.0.0.1:{dashboard.port}/dashboard/studies/{dashboard.study_id}"
        with urllib.request.urlopen(dashboard.url, timeout=30) as page:  # the single-page app itself
            assert page.status == 200 and b"<html" in page.read().lower()
        check_api(dashboard.base_url, "dash-sqlite", dashboard.study_id)
        check_read_only(dashboard.base_url, dashboard.study_id)
        assert {s.study_name for s in optuna.get_all_study_summaries(url)} == {"dash-sqlite", "other"}
    finally:
        dashboard.shutdown()
        thread.join(30)
    assert not thread.is_alive()
    with pytest.raises(OSError):  # the port is released
        urllib.request.urlopen(dashboard.base_url + "/api/studies", timeout=2)


def test_embedded_default_store(tmp_path, monkeypatch):
    """No URL: the embedded store under $MNIST_TUNE_HOME (stores.default_storage())."""
    monkeypatch.setenv("MNIST_TUNE_HOME", str(tmp_path / "home"))
    with pytest.raises(MnistTuneError, match=r"no Optuna storage at .*home/optuna\.db: run a study first"):
        open_dashboard(None, "anything", port=0)
    assert not (tmp_path / "home").exists(), "a missing store must not be created"

    (tmp_path / "home").mkdir()
    make_study(f"sqlite:///{tmp_path / 'home' / 'optuna.db'}", "embedded")
    dashboard = open_dashboard(None, "embedded", port=0)
    thread = threading.Thread(target=dashboard.serve_forever, daemon=True)
    thread.start()
    try:
        check_api(dashboard.base_url, "embedded", dashboard.study_id)
    finally:
        dashboard.shutdown()
        dashboard.close()
        thread.join(10)


def test_refusals_are_one_line(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    make_study(url, "known")
    with pytest.raises(MnistTuneError) as caught:
        open_dashboard(url, "nope", port=0)
    assert str(caught.value) == "no study named 'nope' in this storage; studies: known"

    not_optuna = tmp_path / "empty.db"
    import sqlite3

    sqlite3.connect(not_optuna).close()
    with pytest.raises(MnistTuneError, match="holds no Optuna storage"):
        open_dashboard(f"sqlite:///{not_optuna}", "known", port=0)
    with pytest.raises(MnistTuneError, match="unsupported storage URL"):
        open_dashboard("redis://localhost/0", "known", port=0)

    taken = open_dashboard(url, "known", port=0)
    try:
        with pytest.raises(MnistTuneError, match=rf"cannot listen on 127\.0\.0\.1:{taken.port}: .*try another --port"):
            open_dashboard(url, "known", port=taken.port)
    finally:
        taken.close()

    # --wait: a study created a moment later is found.
    storage = open_existing_storage(url)
    threading.Timer(1.0, lambda: optuna.create_study(study_name="late", storage=url)).start()
    started = time.monotonic()
    assert find_study(storage, "late", wait=30) > 0
    assert time.monotonic() - started < 20
    storage.engine.dispose()


def _start(args, env):
    return subprocess.Popen([sys.executable, "-m", "mnist_tune.dashboard", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
                            preexec_fn=sigint_as_in_a_terminal)


@pytest.mark.postgres
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_dashboard_process_on_postgres(postgres_db, tmp_path, stop_signal):
    make_study(postgres_db, "dash-pg")
    # Trust auth on the local server accepts any password: a random one must never be printed.
    password = "pw-" + secrets.token_urlsafe(12)
    parts = urllib.parse.urlsplit(postgres_db)
    with_password = parts._replace(netloc=f"{parts.username}:{password}@{parts.hostname}:{parts.port or 5432}")
    url_file = tmp_path / "storage-url"
    url_file.write_text(urllib.parse.urlunsplit(with_password) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MNIST_TUNE_STORAGE", "MNIST_TUNE_STORAGE_FILE")}
    env["MNIST_TUNE_STORAGE_FILE"] = str(url_file)

    port = free_port()
    proc = _start(["--study", "dash-pg", "--port", str(port)], env)
    try:
        line = proc.stdout.readline()  # printed once the port is bound
        assert line.startswith("optuna-dashboard for study 'dash-pg': http://127.0.0.1:"), \
            line + proc.stderr.read() if proc.poll() is not None else line
        url = line.split(": ", 1)[1].split()[0]
        study_id = int(url.rsplit("/", 1)[1])
        check_api(f"http://127.0.0.1:{port}", "dash-pg", study_id)
        check_read_only(f"http://127.0.0.1:{port}", study_id)
    finally:
        proc.send_signal(stop_signal)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("the dashboard did not stop on " + stop_signal.name)
    assert proc.returncode == 0, err
    assert password not in line + out + err
    # Nothing left behind: no process of its group, the port free again.
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2)


@pytest.mark.postgres
def test_dashboard_process_refusals(postgres_db, tmp_path):
    make_study(postgres_db, "dash-pg")
    env = {k: v for k, v in os.environ.items() if k not in ("MNIST_TUNE_STORAGE", "MNIST_TUNE_STORAGE_FILE")}
    env["MNIST_TUNE_HOME"] = str(tmp_path / "home")
    parts = urllib.parse.urlsplit(postgres_db)
    password = "pw-" + secrets.token_urlsafe(12)
    with_password = urllib.parse.urlunsplit(parts._replace(
        netloc=f"{parts.username}:{password}@{parts.hostname}:{parts.port or 5432}"))
    cases = [
        (["--study", "nope", "--storage", with_password],
         "error: no study named 'nope' in this storage; studies: dash-pg"),
        (["--study", "x"],
         f"error: no Optuna storage at {tmp_path / 'home' / 'optuna.db'}: run a study first, or give --storage"),
        (["--study", "x", "--storage", with_password.rsplit("/", 1)[0] + "/no_such_db_" + secrets.token_hex(4)],
         "error: cannot open Optuna storage postgresql://postgres:***@"),
        (["--study", "x", "--storage-file", str(tmp_path / "missing")], "error: cannot read storage file"),
    ]
    for args, expected in cases:
        proc = subprocess.run([sys.executable, "-m", "mnist_tune.dashboard", *args], capture_output=True, text=True,
                              env=env, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(expected), \
            proc.stderr
        assert password not in proc.stderr
    assert not (tmp_path / "home").exists()
