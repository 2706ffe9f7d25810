"""Logging in to an MLflow server that runs ``mlflow server --app-name basic-auth``.

MLflow's client reads ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (or
``MLFLOW_TRACKING_TOKEN``) from the environment; MLflow's server reads
``MLFLOW_AUTH_ADMIN_PASSWORD`` and ``MLFLOW_FLASK_SERVER_SECRET_KEY``. None of them has a
``_FILE`` variant in MLflow, so secrets would sit in the environment of every container
definition (``docker inspect`` shows them). Here each may be given as ``NAME_FILE=/path``
instead (like ``MNIST_TUNE_STORAGE_FILE``, and the ``POSTGRES_PASSWORD_FILE`` convention of
the official images): ``resolve_secret_files`` reads the file into ``NAME`` for this process
and its children, at start-up, before MLflow reads its settings.

    resolve_secret_files()                          # at CLI start-up
    check_credentials("http://mlflow:5000")        # one clear line instead of a 401 traceback

    python -m mnist_tune.auth exec mlflow server --app-name basic-auth ...   # compose: the server
    python -m mnist_tune.auth exec python -m mnist_tune study ...            # compose: a worker
    python -m mnist_tune.auth ensure-user --username worker --password-file F   # admin, once
    python -m mnist_tune.auth check --tracking-uri URI [--experiment NAME]

No password is ever printed, logged, or put into an error message; messages name the
variable or file to fix instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.parse

from mnist_tune.errors import MnistTuneError
from mnist_tune.stores import redact

# What a client (worker, CLI) may take from files.
CLIENT_SECRETS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
# What the tracking server may take from files (MLFLOW_AUTH_ADMIN_* need MLflow >= 3.x with
# bootstrap variables; older servers read admin_password from the auth ini only).
SERVER_SECRETS = ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")
ALL_SECRETS = CLIENT_SECRETS + SERVER_SECRETS

CURRENT_USER = "/api/2.0/mlflow/users/current"
GET_EXPERIMENT_BY_NAME = "/api/2.0/mlflow/experiments/get-by-name"
LOGIN_VARS = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_PASSWORD_FILE)"


def resolve_secret_files(names: tuple[str, ...] = ALL_SECRETS, environ=None) -> list[str]:
    """For every ``NAME`` in ``names`` whose ``NAME_FILE`` is set, read that file into
    ``NAME`` (one trailing newline dropped) and drop ``NAME_FILE``, so a program started
    from here sees the value once; returns the names set. Setting both ``NAME`` and
    ``NAME_FILE`` is refused (which one wins would be a guess), as is an unreadable or empty
    file. The values are never printed."""
    environ = os.environ if environ is None else environ
    resolved = []
    for name in names:
        path = environ.get(f"{name}_FILE")
        if not path:
            continue
        if environ.get(name):
            raise MnistTuneError(f"both {name} and {name}_FILE are set; set only one")
        try:
            with open(path, encoding="utf-8") as f:
                value = f.read()
        except OSError as e:
            raise MnistTuneError(f"cannot read {name}_FILE {path}: {e.strerror}") from None
        value = value[:-1] if value.endswith("\n") else value
        value = value[:-1] if value.endswith("\r") else value
        if not value.strip():
            raise MnistTuneError(f"{name}_FILE {path} is empty")
        if "\n" in value:
            raise MnistTuneError(f"{name}_FILE {path} holds more than one line")
        environ[name] = value
        del environ[f"{name}_FILE"]
        resolved.append(name)
    return resolved


def _host_creds(tracking_uri: str):
    from mlflow.utils.credentials import get_default_host_creds

    return get_default_host_creds(tracking_uri)


def _login():
    """The login MLflow's client sends (username/password from the env or
    ~/.mlflow/credentials, token from the env), without needing a host."""
    from types import SimpleNamespace

    from mlflow.utils.credentials import read_mlflow_creds

    creds = read_mlflow_creds()
    return SimpleNamespace(username=creds.username, password=creds.password,
                           token=os.environ.get("MLFLOW_TRACKING_TOKEN"))


def _request(tracking_uri: str, endpoint: str, params: dict | None = None, timeout: float = 10):
    """One GET with the login MLflow's client would send (env vars, ~/.mlflow/credentials,
    token, TLS settings); no retries. Returns the response, or raises MnistTuneError when
    the server cannot be reached."""
    from mlflow.utils.rest_utils import http_request

    try:
        return http_request(_host_creds(tracking_uri), endpoint, "GET", max_retries=0, timeout=timeout,
                            raise_on_status=False, params=params)
    except Exception as e:  # connection refused, DNS, TLS: MlflowException wrapping requests' errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MnistTuneError(f"MLflow tracking server {redact(tracking_uri)} is unreachable: {first}") from None


def _who(creds) -> str:
    if creds.username:
        return f"user {creds.username!r}"
    return "the token in MLFLOW_TRACKING_TOKEN" if creds.token else "no login"


def _refusal(tracking_uri: str | None, status: int, creds, what: str = "") -> MnistTuneError:
    where = f"MLflow server {redact(tracking_uri)}" if tracking_uri else "the MLflow server"
    if status == 401:
        if not (creds.username or creds.token):
            return MnistTuneError(f"{where} requires a login: set {LOGIN_VARS}")
        if creds.username and not creds.password:
            return MnistTuneError(f"{where} rejected {_who(creds)}: no password set "
                                  "(MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_PASSWORD_FILE)")
        return MnistTuneError(f"{where} rejected the login of {_who(creds)} (401 Unauthorized): wrong username or "
                              f"password; check {LOGIN_VARS}")
    return MnistTuneError(f"{where}: {_who(creds)} has no permission {what or 'for this request'} (403 Forbidden); "
                          "an admin must grant it (see docker/README.md, 'Workers on other hosts')")


def check_credentials(tracking_uri: str, experiment: str | None = None, timeout: float = 10) -> str | None:
    """Check that the server at ``tracking_uri`` accepts this process's MLflow login.

    Returns the user name the server knows (None for a server without authentication, or a
    non-HTTP URI, which is not checked). With ``experiment``, also checks that this user may
    read that experiment if it exists (a missing one is fine: the worker creates it and owns
    it). A 401 or 403 becomes one MnistTuneError line naming the user and what to fix, never
    the password."""
    if urllib.parse.urlsplit(tracking_uri).scheme not in ("http", "https"):
        return None
    creds = _host_creds(tracking_uri)
    reply = _request(tracking_uri, CURRENT_USER, timeout=timeout)
    if reply.status_code in (401, 403):
        raise _refusal(tracking_uri, reply.status_code, creds)
    username = None
    if reply.status_code == 200:
        try:
            username = reply.json().get("user", {}).get("username")
        except ValueError:
            username = None
    elif reply.status_code != 404:  # 404: a server without the auth app has no such endpoint
        raise MnistTuneError(f"MLflow server {redact(tracking_uri)} answered {reply.status_code} to {CURRENT_USER}")
    if experiment:
        reply = _request(tracking_uri, GET_EXPERIMENT_BY_NAME, params={"experiment_name": experiment},
                         timeout=timeout)
        if reply.status_code in (401, 403):
            raise _refusal(tracking_uri, reply.status_code, creds, f"on experiment {experiment!r}")
    return username


def auth_error(error: BaseException, tracking_uri: str | None = None) -> MnistTuneError | None:
    """An MlflowException raised by a 401/403 (a permission revoked mid-study, a grant
    missing on a registered model), as one MnistTuneError line; None for anything else.
    For the CLI's last-resort handler: ``mapped = auth_error(e); if mapped: fail(str(mapped))``.
    ``tracking_uri``: named in the message; default $MLFLOW_TRACKING_URI."""
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    text = str(error)
    code = getattr(error, "error_code", "")
    if "error code 401" in text or code == "UNAUTHENTICATED":
        status = 401
    elif "error code 403" in text or code == "PERMISSION_DENIED":
        status = 403
    else:
        return None
    endpoint = ""
    if "endpoint " in text:
        endpoint = "for " + text.split("endpoint ", 1)[1].split()[0]
    return _refusal(tracking_uri, status, _login(), endpoint)


# ------------------------------------------------------------------ accounts (admin side)

def ensure_user(tracking_uri: str, username: str, password: str,
                grants: list[tuple[str, str, str]] = ()) -> str:
    """Create ``username`` (or set its password if it exists) through the auth REST API,
    logged in as an admin (this process's MLflow login); then grant each
    ``(resource_type, name, permission)``: ``("experiment", "mlp-compose", "MANAGE")``,
    ``("registered_model", "mnist-mlp", "EDIT")``. A granted experiment or registered model
    that does not exist yet is created first (owned by the admin). Returns "created" or
    "updated"."""
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient
    from mlflow.tracking import MlflowClient

    check_credentials(tracking_uri)
    auth = AuthServiceClient(tracking_uri)
    try:
        try:
            auth.get_user(username)
            exists = True
        except MlflowException as e:
            if "RESOURCE_DOES_NOT_EXIST" not in str(e) and "404" not in str(e):
                raise
            exists = False
        if exists:
            auth.update_user_password(username, password)
        else:
            auth.create_user(username, password)
        client = MlflowClient(tracking_uri)
        for resource_type, name, permission in grants:
            if resource_type == "experiment":
                found = client.get_experiment_by_name(name)
                resource_id = found.experiment_id if found else client.create_experiment(name)
            elif resource_type == "registered_model":
                try:
                    client.get_registered_model(name)
                except MlflowException:
                    client.create_registered_model(name)
                resource_id = name
            else:
                raise MnistTuneError(f"unknown resource type {resource_type!r} (experiment or registered_model)")
            auth.grant_user_permission(username, resource_type, resource_id, permission)
    except MlflowException as e:
        mapped = auth_error(e, tracking_uri)
        if mapped:
            raise mapped from None
        first = str(e).strip().splitlines()[0]
        raise MnistTuneError(f"cannot set up user {username!r}: {first.replace(password, '***')}") from None
    return "updated" if exists else "created"


# ---------------------------------------------------------------------------- commands

def _read_password(path: str) -> str:
    env = {"PASSWORD_FILE": path}
    resolve_secret_files(("PASSWORD",), env)
    return env["PASSWORD"]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["exec"]:  # not argparse: everything after "exec" belongs to the program
        program = argv[1:]
        if not program:
            print("error: exec needs a program to run", file=sys.stderr)
            sys.exit(2)
        try:
            resolve_secret_files()
        except MnistTuneError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        sys.stdout.flush()
        try:
            os.execvp(program[0], program)
        except OSError as e:
            print(f"error: cannot run {program[0]}: {e.strerror}", file=sys.stderr)
            sys.exit(2)

    parser = argparse.ArgumentParser(prog="python -m mnist_tune.auth", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("exec", help="resolve the *_FILE secrets, then run a program (exec PROGRAM ARGS...)")
    add = sub.add_parser("ensure-user", help="create a user (or reset its password); run with admin login")
    add.add_argument("--username", required=True)
    add.add_argument("--password-file", required=True, help="file holding the new user's password")
    add.add_argument("--experiment", action="append", default=[], metavar="NAME[=PERMISSION]",
                     help="grant on this experiment (created if missing); permission default MANAGE")
    add.add_argument("--registered-model", action="append", default=[], metavar="NAME[=PERMISSION]",
                     help="grant on this registered model (created if missing); permission default EDIT")
    check = sub.add_parser("check", help="check this process's MLflow login")
    for p in (add, check):
        p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                       required=not os.environ.get("MLFLOW_TRACKING_URI"))
    check.add_argument("--experiment", default=None)
    args = parser.parse_args(argv)
    try:
        resolve_secret_files(CLIENT_SECRETS)
        if args.command == "check":
            user = check_credentials(args.tracking_uri, args.experiment)
            print(f"{redact(args.tracking_uri)}: logged in as {user!r}" if user
                  else f"{redact(args.tracking_uri)}: no authentication")
        else:
            grants = []
            for spec, kind, default in [(s, "experiment", "MANAGE") for s in args.experiment] + \
                                       [(s, "registered_model", "EDIT") for s in args.registered_model]:
                name, _, permission = spec.partition("=")
                grants.append((kind, name, (permission or default).upper()))
            outcome = ensure_user(args.tracking_uri, args.username, _read_password(args.password_file), grants)
            print(f"user {args.username!r} {outcome}" + "".join(f"; {p} on {k} {n!r}" for k, n, p in grants))
    except MnistTuneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
