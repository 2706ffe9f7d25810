"""docker/: the image and the compose file, checked without a Docker engine.

Two kinds of checks:
  * static: docker/compose.yaml parsed as YAML (the services, scaling, exec-form commands,
    the password only ever interpolated from docker/.env, which git ignores), the Dockerfile
    (no credentials, no .env copied, copies what `pip install .` needs), .env.example.
  * end to end: the compose services' own command lines and environments, interpolated and
    with the compose host names rewritten to local ones, run as local processes against the
    local PostgreSQL (databases made by docker/postgres-init.sql, renamed to fresh ones):
    the mlflow service's server, the data service's fetch, the worker's study with a small
    budget; then both stores must hold the same two finished trials under one parent run.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
import yaml

from helpers import PG_ADMIN_URL, REPO, drop_database, free_port, stop_process, wait_for_http

DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_GPU = DOCKER / "compose.gpu.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
ENV_EXAMPLE = DOCKER / ".env.example"
INIT_SQL = DOCKER / "postgres-init.sql"
DOCKERIGNORE = REPO / ".dockerignore"

APP_SERVICES = ("mlflow", "data", "worker")  # the services built from our Dockerfile


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


# --------------------------------------------------------------------------- static checks


def test_compose_services_and_scaling():
    compose = load()
    services = compose["services"]
    assert {"postgres", "mlflow", "data", "worker"} <= set(services)

    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker, "worker must be scalable (--scale worker=N)"
    assert worker["depends_on"] == {"mlflow": {"condition": "service_healthy"},
                                    "postgres": {"condition": "service_healthy"},
                                    "data": {"condition": "service_completed_successfully"}}
    env = env_dict(worker["environment"])
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["MNIST_TUNE_STORAGE"].startswith("postgresql://") and env["MNIST_TUNE_STORAGE"].endswith(
        "@postgres:5432/optuna")
    assert env["MNIST_TUNE_DATA"] == "/data"
    assert worker["command"][:2] == ["study", "--model"]

    # One image for the three app services, built from our Dockerfile with the repo as context.
    for name in APP_SERVICES:
        build = services[name]["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert services[name]["image"] == services["worker"]["image"]
    assert services["mlflow"]["entrypoint"] == ["mlflow"]
    assert "entrypoint" not in services["worker"] and "entrypoint" not in services["data"]  # ENTRYPOINT mnist-tune

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
                    if re.search("PASSWORD|SECRET|TOKEN", str(k), re.I):
                        assert isinstance(v, str) and re.fullmatch(r"\$\{[A-Z_]+(:?[-?][^}]*)?\}", v), \
                            f"{path.name}: {k} must be set by interpolation, not {v!r}"
                    keyed(v)
            elif isinstance(tree, list):
                for v in tree:
                    keyed(v)

        keyed(compose)

    # The password reaches exactly the places that interpolate it, nowhere else.
    compose = load()
    sentinel = "sentinel" + secrets.token_hex(8)
    resolved = json.dumps(interpolate(compose, {"POSTGRES_PASSWORD": sentinel}))
    interpolations = sum(s.count("${POSTGRES_PASSWORD") for s in strings(compose))
    assert resolved.count(sentinel) == interpolations == 3  # postgres env, mlflow backend, worker storage

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
def init_databases():
    """docker/postgres-init.sql run on the local server, its databases renamed to fresh ones
    (CREATE DATABASE is cluster-wide); yields {compose name: admin URL}; drops them after."""
    import psycopg

    suffix = secrets.token_hex(5)
    sql = INIT_SQL.read_text()
    renamed = {name: f"mnist_tune_test_compose_{name}_{suffix}" for name in init_sql_databases()}
    for name, fresh in renamed.items():
        sql = re.sub(rf"\b{name}\b(?=\s*;)", fresh, sql)
    urls = {name: PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + fresh for name, fresh in renamed.items()}
    try:
        # autocommit: CREATE DATABASE cannot run in a transaction block
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=5, autocommit=True) as conn, conn.cursor() as cur:
            for statement in re.sub(r"--[^\n]*", "", sql).split(";"):
                if statement.strip():
                    cur.execute(statement)
            cur.execute("SELECT datname FROM pg_database WHERE datname = ANY(%s)", (list(renamed.values()),))
            assert {row[0] for row in cur.fetchall()} == set(renamed.values())
        yield urls
    finally:
        for url in urls.values():
            drop_database(url)  # IF EXISTS: also after a half-run script


@pytest.mark.slow
@pytest.mark.postgres
def test_compose_services_run_locally(tmp_path, real_mnist_dir, init_databases):
    import optuna
    from mlflow.tracking import MlflowClient

    # The variables compose would read from docker/.env. Trust auth on the local server
    # accepts any password for the existing role, so a random one proves it is threaded
    # through without ever being checked by the server.
    password = "pw-" + secrets.token_urlsafe(18)
    study = f"compose-test-{secrets.token_hex(4)}"
    services = interpolate(load()["services"], {"POSTGRES_USER": "postgres", "POSTGRES_PASSWORD": password,
                                                "STUDY": study})

    pg = urllib.parse.urlsplit(PG_ADMIN_URL)
    pg_hostport = f"{pg.hostname}:{pg.port or 5432}"
    port = free_port()
    server_url = f"http://127.0.0.1:{port}"
    artifacts = tmp_path / "mlartifacts"

    def localize(value: str) -> str:
        """Compose host names -> the local servers and the fresh databases."""
        for name, url in init_databases.items():
            value = value.replace(f"@postgres:5432/{name}", f"@{pg_hostport}/{url.rsplit('/', 1)[1]}")
        value = value.replace("http://mlflow:5000", server_url)
        assert "postgres:5432" not in value and "mlflow:5000" not in value, f"not rewritten: {value!r}"
        return value

    def local_path(value: str) -> str:
        return {"/data": str(real_mnist_dir), "/mlartifacts": str(artifacts)}.get(value, value)

    base_env = {k: v for k, v in os.environ.items()
                if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI_FILE", "MNIST_TUNE_STORAGE",
                             "MNIST_TUNE_STORAGE_FILE", "MNIST_TUNE_DATA", "MNIST_TUNE_CHECKSUMS")}
    base_env["MNIST_TUNE_HOME"] = str(tmp_path / "home")  # nothing may fall back to an embedded store

    # ---- mlflow: the service's command line, port/host/paths made local
    mlflow_args = list(services["mlflow"]["command"])
    assert option(mlflow_args, "--port") == "5000"
    hosts_at = mlflow_args.index("--allowed-hosts") + 1
    hosts = mlflow_args[hosts_at].replace(":5000", f":{port}")  # the Host header a local client sends
    mlflow_args = [hosts if i == hosts_at else localize(local_path(a)) for i, a in enumerate(mlflow_args)]
    mlflow_args = replace_option(mlflow_args, "--port", str(port))
    mlflow_args = replace_option(mlflow_args, "--host", "127.0.0.1")  # not 0.0.0.0 on a test machine
    assert option(mlflow_args, "--artifacts-destination") == str(artifacts)
    server_log = tmp_path / "mlflow-server.log"
    with open(server_log, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", *services["mlflow"]["entrypoint"], *mlflow_args],
                                  stdout=log, stderr=subprocess.STDOUT, env=base_env, cwd=tmp_path,
                                  start_new_session=True)
    try:
        # ---- data: runs while the server starts (compose starts them in parallel too)
        data_args = [local_path(a) for a in services["data"]["command"]]
        data = subprocess.run([sys.executable, "-m", "mnist_tune", *data_args], capture_output=True, text=True,
                              env=base_env, cwd=tmp_path, timeout=120)
        assert data.returncode == 0, data.stdout + data.stderr
        assert Path(data.stdout.strip().splitlines()[-1]).is_relative_to(real_mnist_dir)

        try:
            wait_for_http(server_url + "/health", timeout=90, proc=server)
        except Exception:
            raise AssertionError(f"mlflow service did not come up:\n{server_log.read_text()[-3000:]}") from None

        # The services' healthcheck commands themselves, against the local servers.
        health = [sys.executable if a == "python" else a.replace("localhost:5000", f"localhost:{port}")
                  for a in services["mlflow"]["healthcheck"]["test"][1:]]
        assert subprocess.run(health, capture_output=True, timeout=30).returncode == 0
        if shutil.which("pg_isready"):
            check = list(services["postgres"]["healthcheck"]["test"][1:])
            check = replace_option(check, "-d", init_databases["mlflow"].rsplit("/", 1)[1])
            check = replace_option(check, "-h", pg.hostname)
            check = replace_option(check, "-p", str(pg.port or 5432))
            assert subprocess.run(check, capture_output=True, timeout=30).returncode == 0

        # ---- worker: its command and environment as written, the budget cut to 2 short trials
        worker = services["worker"]
        worker_args = list(worker["command"])
        assert option(worker_args, "--model") == "mlp" and option(worker_args, "--trials") == "40"
        assert option(worker_args, "--study-name") == study
        worker_args = replace_option(worker_args, "--trials", "2") + ["--epochs", "1", "--no-plots"]
        worker_env = {k: localize(local_path(v)) for k, v in env_dict(worker["environment"]).items()}
        assert password in worker_env["MNIST_TUNE_STORAGE"]
        proc = subprocess.run([sys.executable, "-m", "mnist_tune", *worker_args], capture_output=True, text=True,
                              env={**base_env, **worker_env}, cwd=tmp_path, timeout=240)
        output = proc.stdout + proc.stderr
        assert password not in output, "the worker printed the database password"
        assert password not in data.stdout + data.stderr + server_log.read_text(), "a service logged the password"
        assert proc.returncode == 0, output[-4000:]

        # ---- both stores: the same two finished trials, nested under one parent run
        trials = optuna.load_study(study_name=study, storage=worker_env["MNIST_TUNE_STORAGE"]).get_trials()
        assert len(trials) == 2
        assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                   for t in trials), [t.state for t in trials]

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
    finally:
        stop_process(server)

    # Artifacts (the logged models) went to the server's --artifacts-destination: served by
    # it, so workers on other hosts need no shared filesystem.
    assert len(list(artifacts.rglob("MLmodel"))) >= 2, "the trials' models did not reach the artifacts destination"
