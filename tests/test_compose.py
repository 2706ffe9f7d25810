"""docker/: the image and the compose file, checked without a Docker engine.

Two kinds of checks:
  * static: docker/compose.yaml parsed as YAML (the services, scaling, exec-form commands,
    the database password only ever interpolated from docker/.env, the MLflow secrets only
    ever files under docker/secrets/, both git-ignored), the Dockerfile (no credentials, no
    .env copied, copies what `pip install .` needs), .env.example, mlflow-auth.ini.
  * end to end: the compose services' own command lines and environments, interpolated and
    with the compose host names, secrets and volumes rewritten to local ones, run as local
    processes against the local PostgreSQL (databases made by docker/postgres-init.sql,
    renamed to fresh ones): the mlflow service's basic-auth server, the mlflow-users account
    set-up, the data service's fetch, the worker's study with a small budget (logged in as the
    workers' account); then both stores must hold the same two finished trials under one
    parent run, and the dashboard service must serve them. Another test starts the dashboard
    service before its study exists.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from helpers import REPO, drop_database, free_port, stop_process, wait_for_http
from helpers import pg_admin_url as admin_url

DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_GPU = DOCKER / "compose.gpu.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
ENV_EXAMPLE = DOCKER / ".env.example"
INIT_SQL = DOCKER / "postgres-init.sql"
AUTH_INI = DOCKER / "mlflow-auth.ini"
DOCKERIGNORE = REPO / ".dockerignore"

APP_SERVICES = ("mlflow", "mlflow-users", "data", "worker", "dashboard")  # built from our Dockerfile
AUTH_EXEC = ["python", "-m", "mnist_tune.auth", "exec"]  # NAME_FILE secrets -> NAME, then the program
MLFLOW_SECRETS = ("mlflow_admin_password", "mlflow_flask_secret", "mlflow_worker_password")


# ------------------------------------------------------------------ compose interpolation

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_REFERENCE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<bare>" + _NAME + "))")


def interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation on a parsed compose tree (strings inside dicts and
    lists; keys too): ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
    ``${VAR:?error}``, ``${VAR?error}``, ``${VAR:+other}``. Stricter than compose in one way:
    a plain ``${VAR}`` that is unset raises instead of quietly becoming ''."""
    if isinstance(value, dict):
        return {interpolate(k, env): interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        if match.group("escaped"):
            return "$"
        if match.group("bare"):
            name, op, arg = match.group("bare"), None, None
        else:
            parts = re.fullmatch(rf"({_NAME})(?:(:?[-?+])(.*))?", match.group("braced"), re.S)
            if parts is None:
                raise ValueError(f"bad interpolation {match.group(0)!r}")
            name, op, arg = parts.groups()
        current = env.get(name)
        if op is None:
            if current is None:
                raise KeyError(f"${{{name}}} is not set and has no default")
            return current
        missing = current is None or (op.startswith(":") and current == "")
        if op.endswith("-"):
            return interpolate(arg, env) if missing else current
        if op.endswith("?"):
            if missing:
                raise KeyError(f"{name}: {arg}")
            return current
        return "" if missing else interpolate(arg, env)  # ":+" / "+"

    return _REFERENCE.sub(one, value)


def references(value) -> list[tuple[str, str | None]]:
    """(variable, operator) for every ``${...}``/``$VAR`` in a parsed compose tree."""
    found = []
    if isinstance(value, dict):
        for k, v in value.items():
            found += references(k) + references(v)
    elif isinstance(value, list):
        for v in value:
            found += references(v)
    elif isinstance(value, str):
        for match in _REFERENCE.finditer(value):
            if match.group("bare"):
                found.append((match.group("bare"), None))
            elif match.group("braced") is not None:
                parts = re.fullmatch(rf"({_NAME})(?:(:?[-?+])(.*))?", match.group("braced"), re.S)
                assert parts, f"bad interpolation {match.group(0)!r}"
                found.append((parts.group(1), parts.group(2)))
    return found


def strings(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)
    elif isinstance(value, str):
        yield value


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            env[key.strip()] = value.strip()
    return env


def load(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())  # SafeLoader resolves the x-app anchor and <<: merges


def env_dict(environment) -> dict[str, str]:
    """A service's ``environment:``, mapping or list form, as a dict of strings."""
    if environment is None:
        return {}
    if isinstance(environment, list):
        return dict(item.split("=", 1) for item in environment)
    return {k: "" if v is None else str(v) for k, v in environment.items()}


def option(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def replace_option(args: list[str], name: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(name) + 1] = value
    return args


def volume_targets(service: dict) -> dict[str, str]:
    """container path -> source, for the short volume syntax."""
    targets = {}
    for spec in service.get("volumes", []):
        source, target, *_ = spec.split(":")
        targets[target] = source
    return targets


def local_argv(service: dict) -> list[str]:
    """A service's entrypoint + command as a local command line: the image's programs
    (python, mlflow, mnist-tune) as this interpreter and its modules."""
    programs = {"python": [sys.executable], "mlflow": [sys.executable, "-m", "mlflow"],
                "mnist-tune": [sys.executable, "-m", "mnist_tune"]}
    argv = [*service.get("entrypoint", ["mnist-tune"]), *service.get("command", [])]
    out = []
    for i, arg in enumerate(argv):
        # a program: the first word, or the one `mnist_tune.auth exec` runs
        is_program = i == 0 or (argv[:i] == AUTH_EXEC and arg in programs)
        out += programs[arg] if is_program and arg in programs else [arg]
    return out


def read_ini(path: Path) -> dict[str, str]:
    import configparser

    parser = configparser.ConfigParser()
    parser.read(path)
    return dict(parser["mlflow"])


# --------------------------------------------------------------------------- static checks


def test_compose_services_and_scaling():
    compose = load()
    services = compose["services"]
    assert {"postgres", "mlflow", "mlflow-users", "data", "worker", "dashboard"} <= set(services)

    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker, "worker must be scalable (--scale worker=N)"
    assert worker["depends_on"] == {"mlflow": {"condition": "service_healthy"},
                                    "postgres": {"condition": "service_healthy"},
                                    "mlflow-users": {"condition": "service_completed_successfully"},
                                    "data": {"condition": "service_completed_successfully"}}
    env = env_dict(worker["environment"])
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["MNIST_TUNE_STORAGE"].startswith("postgresql://") and env["MNIST_TUNE_STORAGE"].endswith(
        "@postgres:5432/optuna")
    assert env["MNIST_TUNE_DATA"] == "/data"
    assert worker["command"][:2] == ["study", "--model"]
    # The worker logs in to MLflow as the workers' account, its password from a secret file.
    assert worker["entrypoint"] == [*AUTH_EXEC, "mnist-tune"]
    assert env["MLFLOW_TRACKING_USERNAME"] == "${MLFLOW_WORKER_USER:-worker}"
    assert env["MLFLOW_TRACKING_PASSWORD_FILE"] == "/run/secrets/mlflow_worker_password"
    assert worker["secrets"] == ["mlflow_worker_password"]

    # One image for the three app services, built from our Dockerfile with the repo as context.
    for name in APP_SERVICES:
        build = services[name]["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert services[name]["image"] == services["worker"]["image"]
    assert services["mlflow"]["entrypoint"] == [*AUTH_EXEC, "mlflow"]
    assert "entrypoint" not in services["data"]  # the image's ENTRYPOINT mnist-tune

    # Exec form everywhere (no shell), and healthchecks as CMD lists.
    for name, service in services.items():
        for key in ("command", "entrypoint"):
            if key in service:
                assert isinstance(service[key], list) and all(isinstance(a, str) for a in service[key]), \
                    f"{name}.{key} must be a list of strings (exec form)"
        if "healthcheck" in service:
            assert service["healthcheck"]["test"][0] == "CMD", f"{name}: healthcheck in exec form"

    # mlflow: loopback-only port, host protection on with the compose name allowed, served artifacts.
    mlflow = services["mlflow"]
    assert mlflow["ports"] == ["127.0.0.1:5000:5000"]
    args = mlflow["command"]
    assert args[0] == "server" and "--serve-artifacts" in args
    assert "--disable-security-middleware" not in args
    hosts = option(args, "--allowed-hosts").split(",")
    assert "mlflow:5000" in hosts and "127.0.0.1:5000" in hosts and "*" not in hosts
    assert option(args, "--port") == "5000" and option(args, "--host") == "0.0.0.0"
    assert option(args, "--backend-store-uri").endswith("@postgres:5432/mlflow")
    assert "http://localhost:5000/health" in " ".join(mlflow["healthcheck"]["test"])
    assert volume_targets(mlflow)[option(args, "--artifacts-destination")] in compose["volumes"]

    # mlflow: basic auth, configured by a committed ini with no secret in it; the admin
    # password and the Flask secret come from secret files.
    assert option(args, "--app-name") == "basic-auth"
    mlflow_env = env_dict(mlflow["environment"])
    assert (COMPOSE.parent / volume_targets(mlflow)[mlflow_env["MLFLOW_AUTH_CONFIG_PATH"]]).resolve() == AUTH_INI
    assert mlflow_env["MLFLOW_AUTH_ADMIN_PASSWORD_FILE"] == "/run/secrets/mlflow_admin_password"
    assert mlflow_env["MLFLOW_FLASK_SERVER_SECRET_KEY_FILE"] == "/run/secrets/mlflow_flask_secret"
    assert mlflow["secrets"] == ["mlflow_admin_password", "mlflow_flask_secret"]
    ini = read_ini(AUTH_INI)
    assert "admin_password" not in ini and ini["admin_username"] == "admin"
    assert ini["default_permission"] == "NO_PERMISSIONS"  # an account sees what it owns or is granted
    auth_db = ini["database_uri"][len("sqlite:///"):]
    assert ini["database_uri"].startswith("sqlite:////")
    assert volume_targets(mlflow)[str(Path(auth_db).parent)] in compose["volumes"], "users must survive a restart"

    # mlflow-users: one-shot, as admin, makes the workers' account with the workers' secret.
    users = services["mlflow-users"]
    assert users["entrypoint"] == ["python", "-m", "mnist_tune.auth"]
    assert users["command"][0] == "ensure-user"
    assert option(users["command"], "--username") == env["MLFLOW_TRACKING_USERNAME"]
    assert option(users["command"], "--password-file") == env["MLFLOW_TRACKING_PASSWORD_FILE"]
    users_env = env_dict(users["environment"])
    assert users_env == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "MLFLOW_TRACKING_USERNAME": ini["admin_username"],
                         "MLFLOW_TRACKING_PASSWORD_FILE": "/run/secrets/mlflow_admin_password"}
    assert sorted(users["secrets"]) == ["mlflow_admin_password", "mlflow_worker_password"]
    assert users["depends_on"] == {"mlflow": {"condition": "service_healthy"}} and users["restart"] == "no"

    # dashboard: the worker's storage URL, the study the workers run, loopback only.
    dashboard = services["dashboard"]
    assert dashboard["entrypoint"] == ["python", "-m", "mnist_tune.dashboard"]
    assert env_dict(dashboard["environment"]) == {"MNIST_TUNE_STORAGE": env["MNIST_TUNE_STORAGE"]}
    assert option(dashboard["command"], "--study") == option(worker["command"], "--study-name")
    assert option(dashboard["command"], "--host") == "0.0.0.0"
    assert dashboard["ports"] == [f"127.0.0.1:{option(dashboard['command'], '--port')}:"
                                  f"{option(dashboard['command'], '--port')}"]
    assert float(option(dashboard["command"], "--wait")) >= 300  # started with the workers
    assert dashboard["depends_on"] == {"postgres": {"condition": "service_healthy"}}

    # data and worker share the MNIST volume; the worker only reads it.
    data = services["data"]
    assert data["command"] == ["data", "fetch", "--data-dir", "/data"]
    assert volume_targets(data)["/data"] == volume_targets(worker)["/data"] in compose["volumes"]
    assert any(v.startswith(volume_targets(worker)["/data"] + ":/data:ro") for v in worker["volumes"])

    # postgres: official image, named volume, healthcheck, the init script mounted.
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:")
    assert postgres["healthcheck"]["test"][1] == "pg_isready"
    volumes = volume_targets(postgres)
    assert volumes["/var/lib/postgresql/data"] in compose["volumes"]
    init = [src for target, src in volumes.items() if target.startswith("/docker-entrypoint-initdb.d/")]
    assert init and all((COMPOSE.parent / src).resolve() == INIT_SQL for src in init)

    # The databases the URLs name are exactly the ones the init script creates.
    named = {urllib.parse.urlsplit(u).path.lstrip("/") for u in strings(services) if u.startswith("postgresql://")}
    assert named == set(init_sql_databases()) == {"optuna", "mlflow"}


def test_password_only_interpolated():
    for path in (COMPOSE, COMPOSE_GPU):
        compose = load(path)
        text = path.read_text()
        assert "change-me" not in text
        for value in strings(compose):
            # Every mention of POSTGRES_PASSWORD is an interpolation (or the postgres env key).
            for match in re.finditer("POSTGRES_PASSWORD", value):
                before = value[max(0, match.start() - 2):match.start()]
                assert before == "${" or value == "POSTGRES_PASSWORD", f"{path.name}: {value!r}"
        # Every URL with credentials gets its password from ${POSTGRES_PASSWORD}, nothing else.
        sentinel = "sentinel" + secrets.token_hex(8)
        for value in strings(interpolate(compose, {"POSTGRES_PASSWORD": sentinel, "POSTGRES_USER": "u"})):
            for url in re.findall(r"[a-z][a-z0-9+.-]*://\S+", value):
                parts = urllib.parse.urlsplit(url)
                if "@" in parts.netloc:
                    assert parts.username == "u" and parts.password == sentinel, f"{path.name}: {url}"

        def keyed(tree):
            if isinstance(tree, dict):
                for k, v in tree.items():
                    if str(k) == "secrets":
                        continue  # compose secrets: names of files (test_mlflow_secrets_are_files)
                    if str(k).endswith("_FILE"):  # NAME_FILE: a path to a mounted secret, never a value
                        assert re.fullmatch(r"/run/secrets/\w+", v), f"{path.name}: {k}: {v!r}"
                    elif re.search("PASSWORD|SECRET|TOKEN", str(k), re.I):
                        assert isinstance(v, str) and re.fullmatch(r"\$\{[A-Z_]+(:?[-?][^}]*)?\}", v), \
                            f"{path.name}: {k} must be set by interpolation, not {v!r}"
                    keyed(v)
            elif isinstance(tree, list):
                for v in tree:
                    keyed(v)

        keyed(compose)
        assert "password1234" not in text, "never MLflow's old default admin password"

    # The password reaches exactly the places that interpolate it, nowhere else.
    compose = load()
    sentinel = "sentinel" + secrets.token_hex(8)
    resolved = json.dumps(interpolate(compose, {"POSTGRES_PASSWORD": sentinel}))
    interpolations = sum(s.count("${POSTGRES_PASSWORD") for s in strings(compose))
    # postgres env, mlflow backend, worker storage, dashboard storage
    assert resolved.count(sentinel) == interpolations == 4

    # Without a password the file does not interpolate at all (the :? guard).
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        interpolate(compose, {})


def test_env_example_and_gitignore():
    example = read_env_file(ENV_EXAMPLE)
    assert example["POSTGRES_PASSWORD"] == "change-me" and example["POSTGRES_USER"] == "mnist"
    assert {"MODEL", "TRIALS", "STUDY"} <= set(example)

    compose = load()
    required = {name for name, op in references(compose) if op is None or op.endswith("?")}
    assert required <= set(example), f"variables without a default missing from .env.example: {required - set(example)}"
    # The example documents the defaults: with it, only the password differs from no .env at all.
    assert interpolate(compose, example) == interpolate(compose, {"POSTGRES_PASSWORD": "change-me"})

    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)

    assert git("check-ignore", "-q", "docker/.env").returncode == 0, "docker/.env must be git-ignored"
    assert git("check-ignore", "-q", "docker/.env.example").returncode == 1, ".env.example must be committable"
    assert git("ls-files", "--", "docker/.env").stdout == "", "docker/.env is tracked"


def test_mlflow_secrets_are_files():
    """The MLflow secrets are compose secrets: files under docker/secrets/ that git ignores,
    mounted only into the services that read them, named there by NAME_FILE variables."""
    compose = load()
    assert set(compose["secrets"]) == set(MLFLOW_SECRETS)
    for name, spec in compose["secrets"].items():
        assert spec == {"file": f"./secrets/{name}"}
        relative = f"docker/secrets/{name}"
        ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", relative])
        assert ignored.returncode == 0, f"{relative} must be git-ignored"
        assert subprocess.run(["git", "-C", str(REPO), "ls-files", "--", relative], capture_output=True,
                              text=True).stdout == ""
    # Not in the image: the Dockerfile copies named paths only, none of them docker/ or the
    # whole context (.dockerignore, not this project's to change here, does not list them).
    for word, args in _dockerfile_instructions():
        if word in ("COPY", "ADD"):
            sources = [p for p in shlex.split(args) if not p.startswith("--")][:-1]
            assert not any(src in (".", "./") or src.startswith(("docker", "./docker")) for src in sources), args

    # Each service mounts exactly the secrets its NAME_FILE variables and arguments name.
    for name, service in compose["services"].items():
        named = {v.rsplit("/", 1)[1] for k, v in env_dict(service.get("environment")).items() if k.endswith("_FILE")}
        named |= {a.rsplit("/", 1)[1] for a in service.get("command", []) if a.startswith("/run/secrets/")}
        assert set(service.get("secrets", [])) == named, name
        if named:  # and something turns the files into the variables MLflow reads
            argv = [*service["entrypoint"], *service.get("command", [])]
            assert argv[:3] == ["python", "-m", "mnist_tune.auth"], name


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip().startswith("#") and not current:
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            word, _, rest = current.strip().partition(" ")
            joined.append((word.upper(), rest.strip()))
        current = ""
    return joined


def _dockerignore_patterns() -> list[str]:
    if not DOCKERIGNORE.is_file():
        return []
    return [p.strip().rstrip("/") for p in DOCKERIGNORE.read_text().splitlines()
            if p.strip() and not p.strip().startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) or path.startswith(p + "/") for p in patterns)


def test_dockerfile():
    text = DOCKERFILE.read_text()
    assert not re.search(r"password|passwd|secret", text, re.I), "no credentials in the Dockerfile"
    instructions = _dockerfile_instructions()
    words = [w for w, _ in instructions]

    assert ("FROM", "python:3.11-slim") in instructions
    assert ("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in instructions
    assert re.search(r"download\.pytorch\.org/whl/cu12\d", text), "the CUDA variant is documented"
    entrypoint = [json.loads(a) for w, a in instructions if w == "ENTRYPOINT"]
    assert entrypoint == [["mnist-tune"]]

    runs = [a for w, a in instructions if w == "RUN"]
    torch_step = next(i for i, a in enumerate(runs) if '--index-url "${TORCH_INDEX_URL}"' in a and "torch==" in a)
    project_step = next(i for i, a in enumerate(runs) if re.search(r"pip install \.(\s|$)", a))
    assert torch_step < project_step, "torch from the chosen index before the project"

    # What is copied: never an env file; everything `pip install .` needs (the sweeps are package
    # data inside mnist_tune/), copied before that step, and not dropped by .dockerignore.
    patterns = _dockerignore_patterns()
    copied = []
    for i, (word, args) in enumerate(instructions):
        if word in ("COPY", "ADD"):
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            sources = parts[:-1]
            assert not any(".env" in s for s in sources), f"{word} {args}: no env file in the image"
            if "." in sources:
                assert _ignored("docker/.env", patterns), "COPY . needs .dockerignore to drop docker/.env"
            copied += [(i, s) for s in sources]
    install_at = next(i for i, (w, a) in enumerate(instructions)
                      if w == "RUN" and re.search(r"pip install \.(\s|$)", a))
    for needed in ("setup.cfg", "pyproject.toml", "README.md", "mnist_tune"):
        assert any(i < install_at and s.rstrip("/") in (needed, ".") for i, s in copied), f"{needed} not copied"
        assert (REPO / needed).exists() and not _ignored(needed, patterns)
    assert list((REPO / "mnist_tune" / "sweeps").glob("*.yaml")) and not _ignored("mnist_tune/sweeps", patterns)
    for local in (".venv", "mlruns", ".git", "docker/.env"):
        assert _ignored(local, patterns), f".dockerignore should drop {local}"
    assert words.index("USER") > install_at, "runs as an unprivileged user"


def test_gpu_override():
    gpu = load(COMPOSE_GPU)
    assert set(gpu["services"]) == {"worker"}
    worker = gpu["services"]["worker"]
    assert re.search(r"whl/cu12\d", worker["build"]["args"]["TORCH_INDEX_URL"])
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    base = load()["services"]["worker"]["command"]
    assert worker["command"][:len(base)] == base and option(worker["command"], "--device") == "cuda"
    assert "container_name" not in worker and "ports" not in worker


# ------------------------------------------------------------------------ end to end


def init_sql_databases() -> list[str]:
    """The database names docker/postgres-init.sql creates (it must do nothing else)."""
    statements = [s.strip() for s in re.sub(r"--[^\n]*", "", INIT_SQL.read_text()).split(";") if s.strip()]
    names = []
    for statement in statements:
        match = re.fullmatch(r"CREATE DATABASE\s+(\w+)", statement, re.I)
        assert match, f"unexpected statement in {INIT_SQL.name}: {statement!r}"
        names.append(match.group(1))
    return names


@pytest.fixture
def init_databases(pg_admin_url):
    """docker/postgres-init.sql run on the local server, its databases renamed to fresh ones
    (CREATE DATABASE is cluster-wide); yields {compose name: admin URL}; drops them after."""
    import psycopg

    suffix = secrets.token_hex(5)
    sql = INIT_SQL.read_text()
    renamed = {name: f"mnist_tune_test_compose_{name}_{suffix}" for name in init_sql_databases()}
    for name, fresh in renamed.items():
        sql = re.sub(rf"\b{name}\b(?=\s*;)", fresh, sql)
    urls = {name: pg_admin_url.rsplit("/", 1)[0] + "/" + fresh for name, fresh in renamed.items()}
    try:
        # autocommit: CREATE DATABASE cannot run in a transaction block
        with psycopg.connect(pg_admin_url, connect_timeout=5, autocommit=True) as conn, conn.cursor() as cur:
            for statement in re.sub(r"--[^\n]*", "", sql).split(";"):
                if statement.strip():
                    cur.execute(statement)
            cur.execute("SELECT datname FROM pg_database WHERE datname = ANY(%s)", (list(renamed.values()),))
            assert {row[0] for row in cur.fetchall()} == set(renamed.values())
        yield urls
    finally:
        for url in urls.values():
            drop_database(url)  # IF EXISTS: also after a half-run script


class Local:
    """Compose names -> local ones, for running services' command lines as local processes:
    host names -> the local servers (fresh databases), named volumes -> folders, secrets ->
    files, the mounted mlflow-auth.ini -> a copy whose paths are made local the same way."""

    def __init__(self, tmp_path: Path, compose: dict, databases: dict[str, str], mnist_dir: Path | None = None,
                 server_url: str | None = None):
        pg = urllib.parse.urlsplit(admin_url())
        self.pg_hostport = f"{pg.hostname}:{pg.port or 5432}"
        self.databases, self.server_url, self.tmp = databases, server_url, tmp_path
        self.volumes = {name: tmp_path / "volumes" / name for name in compose.get("volumes", {})}
        if mnist_dir is not None:
            self.volumes["mnist"] = mnist_dir
        for folder in self.volumes.values():
            folder.mkdir(parents=True, exist_ok=True)
        self.secret_values = {name: f"{name}-" + secrets.token_urlsafe(18) for name in compose.get("secrets", {})}
        (tmp_path / "secrets").mkdir(mode=0o700, exist_ok=True)
        self.secret_files = {}
        for name, value in self.secret_values.items():
            path = tmp_path / "secrets" / name
            path.write_text(value + "\n")
            path.chmod(0o600)
            self.secret_files[f"/run/secrets/{name}"] = str(path)

    def mounts(self, service: dict) -> dict[str, str]:
        """container path -> local path, for this service's volumes."""
        found = {}
        for target, source in volume_targets(service).items():
            if source in self.volumes:
                found[target] = str(self.volumes[source])
            else:  # a bind mount of a file in docker/: ini files get their paths made local too
                local = (COMPOSE.parent / source).resolve()
                if local.suffix == ".ini":
                    copy = self.tmp / local.name
                    copy.write_text(self.value(local.read_text(), service, files=False))
                    local = copy
                found[target] = str(local)
        return found

    def value(self, value: str, service: dict, files: bool = True) -> str:
        for name, url in self.databases.items():
            value = value.replace(f"@postgres:5432/{name}", f"@{self.pg_hostport}/{url.rsplit('/', 1)[1]}")
        if self.server_url:
            value = value.replace("http://mlflow:5000", self.server_url)
        value = self.secret_files.get(value, value)
        mounts = self.mounts(service) if files else {t: str(self.volumes[s]) for t, s in volume_targets(service).items()
                                                     if s in self.volumes}
        for target, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
            if value == target or value.startswith(target + "/"):
                value = local + value[len(target):]
                break
            value = value.replace(f"sqlite:///{target}/", f"sqlite:///{local}/")
        assert "@postgres:5432" not in value and "://mlflow:5000" not in value, f"not rewritten: {value!r}"
        return value

    def argv(self, service: dict) -> list[str]:
        return [self.value(a, service) for a in local_argv(service)]

    def env(self, service: dict) -> dict[str, str]:
        return {k: self.value(v, service) for k, v in env_dict(service.get("environment")).items()}


def base_environment(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI_FILE", "MNIST_TUNE_STORAGE",
                        "MNIST_TUNE_STORAGE_FILE", "MNIST_TUNE_DATA", "MNIST_TUNE_CHECKSUMS",
                        "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                        "MLFLOW_TRACKING_USERNAME_FILE", "MLFLOW_TRACKING_PASSWORD_FILE")}
    env["MNIST_TUNE_HOME"] = str(tmp_path / "home")  # nothing may fall back to an embedded store
    env["HOME"] = str(tmp_path / "user-home")  # no ~/.mlflow/credentials of the user's
    return env


class LineReader:
    """A process's stdout lines, read in a thread (so a test can wait with a timeout)."""

    def __init__(self, stream):
        import queue
        import threading

        self.lines, self.seen = queue.Queue(), []

        def pump():
            for line in stream:
                self.lines.put(line)
                self.seen.append(line)

        threading.Thread(target=pump, daemon=True).start()

    def next(self, timeout: float) -> str:
        import queue

        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout} s") from None


def start_dashboard(local: Local, service: dict, env: dict[str, str]):
    """The dashboard service on a free loopback port; returns (process, its URL line reader, port)."""
    port = free_port()
    argv = replace_option(replace_option(local.argv(service), "--port", str(port)), "--host", "127.0.0.1")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, **local.env(service)}, cwd=local.tmp, start_new_session=True)
    return proc, LineReader(proc.stdout), port


def stop_dashboard(proc) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        raise AssertionError("the dashboard service did not stop on SIGTERM")
    return proc.returncode, proc.stderr.read()


@pytest.mark.postgres
def test_compose_dashboard_runs_locally(tmp_path, init_databases):
    """The dashboard service's command, started before the workers have made the study (or
    even Optuna's tables), serves the study once it appears; it never prints the password."""
    import optuna

    password = "pw-" + secrets.token_urlsafe(18)
    study = f"compose-dash-{secrets.token_hex(4)}"
    compose = load()
    services = interpolate(compose["services"], {"POSTGRES_USER": "postgres", "POSTGRES_PASSWORD": password,
                                                 "STUDY": study})
    local = Local(tmp_path, compose, init_databases)
    proc, out, port = start_dashboard(local, services["dashboard"], base_environment(tmp_path))
    try:
        time.sleep(3)
        assert proc.poll() is None, proc.stderr.read()  # waiting (--wait), not refusing
        storage = local.env(services["dashboard"])["MNIST_TUNE_STORAGE"]
        created = optuna.create_study(study_name=study, storage=storage, direction="maximize")
        created.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
        line = out.next(timeout=60)
        assert line.startswith(f"optuna-dashboard for study '{study}': http://127.0.0.1:{port}/dashboard/studies/")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=30) as reply:
            listed = json.loads(reply.read())["study_summaries"]
        study_id = next(s["study_id"] for s in listed if s["study_name"] == study)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study_id}", timeout=30) as reply:
            detail = json.loads(reply.read())
        assert [t["state"] for t in detail["trials"]] == ["Complete", "Complete"]
    finally:
        code, err = stop_dashboard(proc)
    assert code == 0, err
    assert password not in "".join(out.seen) + err


@pytest.mark.slow
@pytest.mark.postgres
def test_compose_services_run_locally(tmp_path, real_mnist_dir, init_databases, monkeypatch):
    import optuna
    from mlflow.tracking import MlflowClient

    # The variables compose would read from docker/.env. Trust auth on the local server
    # accepts any password for the existing role, so a random one proves it is threaded
    # through without ever being checked by the server.
    password = "pw-" + secrets.token_urlsafe(18)
    study = f"compose-test-{secrets.token_hex(4)}"
    compose = load()
    services = interpolate(compose["services"], {"POSTGRES_USER": "postgres", "POSTGRES_PASSWORD": password,
                                                 "STUDY": study})

    pg = urllib.parse.urlsplit(admin_url())
    port = free_port()
    server_url = f"http://127.0.0.1:{port}"
    local = Local(tmp_path, compose, init_databases, mnist_dir=real_mnist_dir, server_url=server_url)
    artifacts = local.volumes["mlartifacts"]
    all_secrets = [password, *local.secret_values.values()]
    base_env = base_environment(tmp_path)

    # ---- mlflow: the service's command line, port/host/paths/secrets made local
    mlflow_service = services["mlflow"]
    mlflow_args = local.argv(mlflow_service)
    assert mlflow_args[:7] == [sys.executable, "-m", "mnist_tune.auth", "exec", sys.executable, "-m", "mlflow"]
    assert option(mlflow_args, "--port") == "5000"
    hosts_at = mlflow_args.index("--allowed-hosts") + 1
    mlflow_args[hosts_at] = mlflow_args[hosts_at].replace(":5000", f":{port}")  # the Host header a local client sends
    mlflow_args = replace_option(mlflow_args, "--port", str(port))
    mlflow_args = replace_option(mlflow_args, "--host", "127.0.0.1")  # not 0.0.0.0 on a test machine
    assert option(mlflow_args, "--artifacts-destination") == str(artifacts)
    mlflow_env = local.env(mlflow_service)
    assert read_ini(Path(mlflow_env["MLFLOW_AUTH_CONFIG_PATH"]))["database_uri"] == \
        f"sqlite:///{local.volumes['mlauth']}/basic_auth.db"
    server_log = tmp_path / "mlflow-server.log"
    with open(server_log, "w") as log:
        server = subprocess.Popen(mlflow_args, stdout=log, stderr=subprocess.STDOUT, env={**base_env, **mlflow_env},
                                  cwd=tmp_path, start_new_session=True)
    try:
        # ---- data: runs while the server starts (compose starts them in parallel too)
        data_args = local.argv(services["data"])
        data = subprocess.run(data_args, capture_output=True, text=True, env=base_env, cwd=tmp_path, timeout=120)
        assert data.returncode == 0, data.stdout + data.stderr
        assert Path(data.stdout.strip().splitlines()[-1]).is_relative_to(real_mnist_dir)

        try:
            wait_for_http(server_url + "/health", timeout=120, proc=server)
        except Exception:
            raise AssertionError(f"mlflow service did not come up:\n{server_log.read_text()[-3000:]}") from None

        # The services' healthcheck commands themselves, against the local servers.
        health = [sys.executable if a == "python" else a.replace("localhost:5000", f"localhost:{port}")
                  for a in mlflow_service["healthcheck"]["test"][1:]]
        assert subprocess.run(health, capture_output=True, timeout=30).returncode == 0
        if shutil.which("pg_isready"):
            check = list(services["postgres"]["healthcheck"]["test"][1:])
            check = replace_option(check, "-d", init_databases["mlflow"].rsplit("/", 1)[1])
            check = replace_option(check, "-h", pg.hostname)
            check = replace_option(check, "-p", str(pg.port or 5432))
            assert subprocess.run(check, capture_output=True, timeout=30).returncode == 0

        # ---- the server wants a login: none, MLflow's old default, or a wrong one are refused
        for user, secret in ((None, None), ("admin", "password1234"), ("admin", "wrong-" + secrets.token_hex(6))):
            login = {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": secret} if user else {}
            env = {**base_env, **login}
            refused = subprocess.run([sys.executable, "-m", "mnist_tune.auth", "check", "--tracking-uri", server_url],
                                     capture_output=True, text=True, env=env, timeout=60)
            assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1, refused.stderr
            assert ("requires a login" if user is None else "rejected the login of user 'admin'") in refused.stderr

        # ---- mlflow-users: the workers' account, made by the admin from the secret files
        users = services["mlflow-users"]
        made = subprocess.run(local.argv(users), capture_output=True, text=True, env={**base_env, **local.env(users)},
                              cwd=tmp_path, timeout=120)
        assert made.returncode == 0 and made.stdout.strip() == "user 'worker' created", made.stdout + made.stderr

        # ---- worker: its command and environment as written, the budget cut to 2 short trials
        worker = services["worker"]
        worker_args = local.argv(worker)
        assert worker_args[:7] == [sys.executable, "-m", "mnist_tune.auth", "exec", sys.executable, "-m", "mnist_tune"]
        assert option(worker_args, "--model") == "mlp" and option(worker_args, "--trials") == "40"
        assert option(worker_args, "--study-name") == study
        worker_args = replace_option(worker_args, "--trials", "2") + ["--epochs", "1", "--no-plots"]
        worker_env = local.env(worker)
        assert password in worker_env["MNIST_TUNE_STORAGE"]
        assert worker_env["MLFLOW_TRACKING_USERNAME"] == "worker"
        proc = subprocess.run(worker_args, capture_output=True, text=True, env={**base_env, **worker_env},
                              cwd=tmp_path, timeout=300)
        output = proc.stdout + proc.stderr
        logs = data.stdout + data.stderr + made.stdout + made.stderr + server_log.read_text()
        for secret in all_secrets:
            assert secret not in output, "the worker printed a secret"
            assert secret not in logs, "a service logged a secret"
        assert proc.returncode == 0, output[-3000:] + "\n--- server log:\n" + server_log.read_text()[-4000:]

        # ---- both stores: the same two finished trials, nested under one parent run
        trials = optuna.load_study(study_name=study, storage=worker_env["MNIST_TUNE_STORAGE"]).get_trials()
        assert len(trials) == 2
        assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                   for t in trials), [t.state for t in trials]

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")  # the test reads MLflow as the admin
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", local.secret_values["mlflow_admin_password"])
        client = MlflowClient(server_url)
        experiment = client.get_experiment_by_name(study)
        assert experiment is not None, "no experiment named after the study"
        runs = client.search_runs([experiment.experiment_id], filter_string="tags.`mnist_tune.role` = 'trial'")
        assert len(runs) == 2
        assert {r.info.status for r in runs} <= {"FINISHED", "KILLED"}
        parents = {r.data.tags.get("mlflow.parentRunId") for r in runs}
        assert len(parents) == 1 and None not in parents
        parent = client.get_run(parents.pop())
        assert parent.data.tags.get("mnist_tune.role") == "study"
        assert parent.info.status == "FINISHED"  # the budget is spent: the worker closed the study
        assert {t.user_attrs.get("mlflow_run_id") for t in trials} == {r.info.run_id for r in runs}
        recorded = repr([(r.data.params, r.data.tags, r.data.metrics) for r in [*runs, parent]])
        recorded += repr([(t.params, t.user_attrs, t.system_attrs) for t in trials])
        for secret in all_secrets:
            assert secret not in recorded, "a secret was recorded in a store"

        # ---- dashboard: the service's command serves the study's two trials
        dash, out, dash_port = start_dashboard(local, services["dashboard"], base_env)
        try:
            assert f"http://127.0.0.1:{dash_port}/dashboard/studies/" in out.next(timeout=90)
            with urllib.request.urlopen(f"http://127.0.0.1:{dash_port}/api/studies", timeout=30) as reply:
                listed = {s["study_name"]: s for s in json.loads(reply.read())["study_summaries"]}
            with urllib.request.urlopen(f"http://127.0.0.1:{dash_port}/api/studies/{listed[study]['study_id']}",
                                        timeout=30) as reply:
                assert len(json.loads(reply.read())["trials"]) == 2
        finally:
            code, err = stop_dashboard(dash)
        assert code == 0, err
    finally:
        stop_process(server)

    # Artifacts (the logged models) went to the server's --artifacts-destination: served by
    # it, so workers on other hosts need no shared filesystem.
    assert len(list(artifacts.rglob("MLmodel"))) >= 2, "the trials' models did not reach the artifacts destination"
    assert (local.volumes["mlauth"] / "basic_auth.db").is_file(), "users live on the mlauth volume"
    for secret in all_secrets:
        assert secret not in server_log.read_text()
