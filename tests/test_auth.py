"""mnist_tune/auth.py against a real ``mlflow server --app-name basic-auth`` on loopback.

The server itself is started the way docker/compose.yaml starts it: through
``python -m mnist_tune.auth exec``, its admin password and Flask secret read from files
(``*_FILE``). Right credentials work (an experiment, a run, a whole ``mnist-tune train`` with
its model); wrong ones are one line naming the problem; no password ever appears in output,
the server's log, or a run's params, tags and metrics.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_tune.auth import auth_error, check_credentials, ensure_user, resolve_secret_files
from mnist_tune.errors import MnistTuneError

from helpers import CLI, free_port, stop_process, wait_for_http

AUTH_INI = """[mlflow]
default_permission = NO_PERMISSIONS
database_uri = sqlite:///{db}
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""
LOGIN_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
             "MLFLOW_TRACKING_USERNAME_FILE", "MLFLOW_TRACKING_PASSWORD_FILE", "MLFLOW_TRACKING_URI")


def secret_file(folder: Path, name: str, value: str) -> Path:
    path = folder / name
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


def clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LOGIN_ENV}
    env.update(extra)
    return env


class AuthServer:
    def __init__(self, folder: Path):
        self.folder = folder
        self.admin_password = "adm-" + secrets.token_urlsafe(18)
        self.flask_secret = "flask-" + secrets.token_urlsafe(18)
        self.worker_password = "wrk-" + secrets.token_urlsafe(18)
        self.secrets = folder / "secrets"
        self.secrets.mkdir(mode=0o700)
        self.admin_file = secret_file(self.secrets, "mlflow_admin_password", self.admin_password)
        self.flask_file = secret_file(self.secrets, "mlflow_flask_secret", self.flask_secret)
        self.worker_file = secret_file(self.secrets, "mlflow_worker_password", self.worker_password)
        (folder / "basic_auth.ini").write_text(AUTH_INI.format(db=folder / "basic_auth.db"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / "server.log"
        env = clean_env(MLFLOW_AUTH_CONFIG_PATH=str(folder / "basic_auth.ini"),
                        MLFLOW_AUTH_ADMIN_PASSWORD_FILE=str(self.admin_file),
                        MLFLOW_FLASK_SERVER_SECRET_KEY_FILE=str(self.flask_file),
                        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mnist_tune.auth", "exec", sys.executable, "-m", "mlflow", "server",
                 "--app-name", "basic-auth", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                 "--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts",
                 "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder, start_new_session=True)
        try:
            wait_for_http(self.url + "/health", timeout=120, proc=self.proc)
        except Exception:
            stop_process(self.proc)
            raise RuntimeError(self.log_path.read_text()[-3000:]) from None

    def passwords(self) -> list[str]:
        return [self.admin_password, self.flask_secret, self.worker_password]

    def login(self, monkeypatch, user: str, password: str | None = None, password_file: Path | None = None):
        for name in LOGIN_ENV:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        if password is not None:
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        if password_file is not None:
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD_FILE", str(password_file))
            resolve_secret_files()


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    server = AuthServer(tmp_path_factory.mktemp("mlflow-auth"))
    yield server
    stop_process(server.proc)
    log = server.log_path.read_text()
    for secret in server.passwords():
        assert secret not in log, "the server logged a secret"


@pytest.fixture(scope="module")
def worker_account(auth_server):
    """The worker account, made by an admin the way docker/README.md says (a subprocess,
    admin login from files)."""
    proc = subprocess.run(
        [sys.executable, "-m", "mnist_tune.auth", "ensure-user", "--tracking-uri", auth_server.url,
         "--username", "worker", "--password-file", str(auth_server.worker_file)],
        capture_output=True, text=True, timeout=120,
        env=clean_env(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD_FILE=str(auth_server.admin_file)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "user 'worker' created"
    for secret in auth_server.passwords():
        assert secret not in proc.stdout + proc.stderr
    return "worker"


# ----------------------------------------------------------------------- files -> env


def test_resolve_secret_files(tmp_path):
    env = {"MLFLOW_TRACKING_PASSWORD_FILE": str(secret_file(tmp_path, "pw", "s3cret value ")),
           "MLFLOW_TRACKING_USERNAME": "worker"}
    assert resolve_secret_files(environ=env) == ["MLFLOW_TRACKING_PASSWORD"]
    assert env["MLFLOW_TRACKING_PASSWORD"] == "s3cret value "  # one newline dropped, nothing else
    assert "MLFLOW_TRACKING_PASSWORD_FILE" not in env  # a program started from here sees it once

    crlf = tmp_path / "crlf"
    crlf.write_bytes(b"pw-windows\r\n")
    env = {"MLFLOW_FLASK_SERVER_SECRET_KEY_FILE": str(crlf)}
    resolve_secret_files(environ=env)
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == "pw-windows"

    cases = [
        ({"MLFLOW_TRACKING_PASSWORD": "x", "MLFLOW_TRACKING_PASSWORD_FILE": str(tmp_path / "pw")},
         "both MLFLOW_TRACKING_PASSWORD and MLFLOW_TRACKING_PASSWORD_FILE are set; set only one"),
        ({"MLFLOW_TRACKING_PASSWORD_FILE": str(tmp_path / "missing")},
         f"cannot read MLFLOW_TRACKING_PASSWORD_FILE {tmp_path / 'missing'}: No such file or directory"),
        ({"MLFLOW_AUTH_ADMIN_PASSWORD_FILE": str(secret_file(tmp_path, "empty", ""))},
         f"MLFLOW_AUTH_ADMIN_PASSWORD_FILE {tmp_path / 'empty'} is empty"),
        ({"MLFLOW_TRACKING_PASSWORD_FILE": str(secret_file(tmp_path, "two", "a\nb"))},
         f"MLFLOW_TRACKING_PASSWORD_FILE {tmp_path / 'two'} holds more than one line"),
    ]
    for env, message in cases:
        with pytest.raises(MnistTuneError) as caught:
            resolve_secret_files(environ=env)
        assert str(caught.value) == message
        assert "s3cret" not in str(caught.value)


def test_exec_resolves_files_for_the_program(tmp_path):
    pw = secret_file(tmp_path, "pw", "from-file-123")
    code = "import os; print(os.environ['MLFLOW_TRACKING_PASSWORD'], os.environ['MLFLOW_TRACKING_USERNAME'])"
    proc = subprocess.run([sys.executable, "-m", "mnist_tune.auth", "exec", sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=60,
                          env=clean_env(MLFLOW_TRACKING_PASSWORD_FILE=str(pw), MLFLOW_TRACKING_USERNAME="u"))
    assert proc.returncode == 0 and proc.stdout == "from-file-123 u\n", proc.stderr
    proc = subprocess.run([sys.executable, "-m", "mnist_tune.auth", "exec", sys.executable, "-c", "print(1)"],
                          capture_output=True, text=True, timeout=60,
                          env=clean_env(MLFLOW_TRACKING_PASSWORD_FILE=str(tmp_path / "nope")))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (f"error: cannot read MLFLOW_TRACKING_PASSWORD_FILE {tmp_path / 'nope'}: "
                           "No such file or directory\n")


# ------------------------------------------------------------------------ real server


def test_admin_password_from_file_and_no_default(auth_server, monkeypatch):
    auth_server.login(monkeypatch, "admin", password_file=auth_server.admin_file)
    assert check_credentials(auth_server.url) == "admin"
    auth_server.login(monkeypatch, "admin", password="password1234")  # MLflow's old default: not valid here
    with pytest.raises(MnistTuneError, match="rejected the login of user 'admin'"):
        check_credentials(auth_server.url)


def test_right_credentials_create_an_experiment_and_a_run(auth_server, worker_account, monkeypatch):
    from mlflow.tracking import MlflowClient

    auth_server.login(monkeypatch, worker_account, password_file=auth_server.worker_file)
    assert check_credentials(auth_server.url, experiment="worker-exp") == "worker"  # missing: fine
    client = MlflowClient(auth_server.url)
    experiment_id = client.create_experiment("worker-exp")
    run = client.create_run(experiment_id, run_name="r")
    client.log_param(run.info.run_id, "lr", "0.001")
    client.log_metric(run.info.run_id, "val_acc", 0.9)
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert check_credentials(auth_server.url, experiment="worker-exp") == "worker"  # its own: readable
    data = client.get_run(run.info.run_id).data
    for secret in auth_server.passwords():
        assert secret not in repr((data.params, data.tags, data.metrics))


def test_wrong_or_missing_credentials_are_one_line(auth_server, worker_account, monkeypatch, tmp_path):
    url = auth_server.url
    wrong = "wrong-" + secrets.token_urlsafe(12)
    auth_server.login(monkeypatch, worker_account, password=wrong)
    with pytest.raises(MnistTuneError) as caught:
        check_credentials(url)
    assert str(caught.value) == (f"MLflow server {url} rejected the login of user 'worker' (401 Unauthorized): "
                                 "wrong username or password; check MLFLOW_TRACKING_USERNAME and "
                                 "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_PASSWORD_FILE)")
    assert wrong not in str(caught.value)

    auth_server.login(monkeypatch, "nobody", password=auth_server.worker_password)
    with pytest.raises(MnistTuneError, match="rejected the login of user 'nobody'"):
        check_credentials(url)

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.mlflow/credentials either
    with pytest.raises(MnistTuneError) as caught:
        check_credentials(url)
    assert str(caught.value) == (f"MLflow server {url} requires a login: set MLFLOW_TRACKING_USERNAME and "
                                 "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_PASSWORD_FILE)")

    # As the CLI would run it: exit 2, one line on stderr, no password anywhere.
    proc = subprocess.run([sys.executable, "-m", "mnist_tune.auth", "check", "--tracking-uri", url],
                          capture_output=True, text=True, timeout=60,
                          env=clean_env(MLFLOW_TRACKING_USERNAME="worker", MLFLOW_TRACKING_PASSWORD=wrong))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(f"error: MLflow server {url} rejected the login of user 'worker'")
    assert len(proc.stderr.splitlines()) == 1 and wrong not in proc.stderr


def test_forbidden_is_one_line_and_grants_fix_it(auth_server, worker_account, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    auth_server.login(monkeypatch, "admin", password_file=auth_server.admin_file)
    admin_experiment = MlflowClient(auth_server.url).create_experiment("admins-own")

    auth_server.login(monkeypatch, worker_account, password_file=auth_server.worker_file)
    with pytest.raises(MnistTuneError) as caught:
        check_credentials(auth_server.url, experiment="admins-own")
    assert str(caught.value) == (f"MLflow server {auth_server.url}: user 'worker' has no permission on experiment "
                                 "'admins-own' (403 Forbidden); an admin must grant it (see docker/README.md, "
                                 "'Workers on other hosts')")
    with pytest.raises(MlflowException) as raised:  # the same refusal met in the middle of a run
        MlflowClient(auth_server.url).create_run(admin_experiment)
    mapped = auth_error(raised.value, auth_server.url)
    assert str(mapped) == (f"MLflow server {auth_server.url}: user 'worker' has no permission for "
                           "/api/2.0/mlflow/runs/create (403 Forbidden); an admin must grant it (see "
                           "docker/README.md, 'Workers on other hosts')")
    assert auth_error(ValueError("something else"), auth_server.url) is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_server.url)  # the URI named, by default, is the env's
    assert str(auth_error(raised.value)) == str(mapped)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert str(auth_error(raised.value)).startswith("the MLflow server: user 'worker' has no permission for ")

    # The admin grants MANAGE on the experiment (what a study's workers need: runs, and deleting
    # a duplicate parent run after a start-up race) and EDIT on a registered model.
    auth_server.login(monkeypatch, "admin", password_file=auth_server.admin_file)
    assert ensure_user(auth_server.url, worker_account, auth_server.worker_password,
                       [("experiment", "admins-own", "MANAGE"), ("registered_model", "mnist-mlp", "EDIT")]) == "updated"
    auth_server.login(monkeypatch, worker_account, password_file=auth_server.worker_file)
    assert check_credentials(auth_server.url, experiment="admins-own") == "worker"
    client = MlflowClient(auth_server.url)
    run_id = client.create_run(admin_experiment).info.run_id
    client.delete_run(run_id)

    # EDIT on the admin's registered model is enough for the study's champion: a new version
    # from the worker's own run, and the @champion alias moved to it.
    import torch

    from mnist_tune import record
    from mnist_tune.tracking import Tracker

    tracker = Tracker(auth_server.url)
    study = record.StudyRecord.attach(tracker, "worker-models", "mlp", "fp", {})
    own_run = study.start_trial(0, "mlp", "tpe")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    study.promote("mlp", own_run, tracker.models.log_model(own_run, model, torch.rand(4, 1, 28, 28).numpy()))
    assert client.get_model_version_by_alias("mnist-mlp", "champion").run_id == own_run
    with pytest.raises(MlflowException, match="403"):  # still no user administration
        from mlflow.server.auth.client import AuthServiceClient

        AuthServiceClient(auth_server.url).create_user("intruder", "intruder-password-1")


def test_a_tracked_training_run_with_a_file_login(auth_server, worker_account, synthetic_env, tmp_path):
    """`mnist-tune train` as compose runs a worker: through `auth exec`, the login from files;
    params, metrics and the model land on the server, the password nowhere."""
    from mlflow.tracking import MlflowClient

    env = {k: v for k, v in synthetic_env.items() if k not in LOGIN_ENV}
    env.update(MLFLOW_TRACKING_USERNAME="worker", MLFLOW_TRACKING_PASSWORD_FILE=str(auth_server.worker_file),
               MLFLOW_TRACKING_URI=auth_server.url)
    proc = subprocess.run([sys.executable, "-m", "mnist_tune.auth", "exec", *CLI, "train", "--epochs", "1",
                           "--val-size", "200", "--experiment", "auth-train"],
                          capture_output=True, text=True, env=env, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    for secret in auth_server.passwords():
        assert secret not in output
    run_id = next(line.split()[1].rstrip(":") for line in proc.stdout.splitlines() if line.startswith("run "))

    admin = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": auth_server.admin_password}
    saved = {k: os.environ.get(k) for k in admin}
    os.environ.update(admin)
    try:
        run = MlflowClient(auth_server.url).get_run(run_id)
        models = MlflowClient(auth_server.url).search_logged_models([run.info.experiment_id])
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert run.info.status == "FINISHED" and "test_acc" in run.data.metrics
    assert len(models) == 1
    dump = repr((run.data.params, run.data.tags, run.data.metrics, [m.to_dictionary() for m in models]))
    for secret in auth_server.passwords():
        assert secret not in dump
