"""Test helpers shared by test modules and benchmarks: synthetic IDX data, the CLI as a
subprocess, real MLflow servers and PostgreSQL databases. Fixtures live in conftest.py."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import torch
import yaml

from mnist_tune.data import write_idx

REPO = Path(__file__).resolve().parent.parent
# Device-agnostic code paths run on every device this machine has: the CPU everywhere (CI),
# plus CUDA / MPS where present, so a GPU machine runs the same tests on its device.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (
    ["mps"] if torch.backends.mps.is_available() else [])
CLI = [sys.executable, "-m", "mnist_tune"]


def make_synthetic_mnist(folder: Path, n_train: int = 1200, n_test: int = 300, seed: int = 0) -> dict[str, str]:
    """Learnable fake MNIST: class k lights up a bar at row 2k+4, plus noise. Returns MD5s."""
    rng = np.random.default_rng(seed)

    def images_for(labels):
        x = rng.integers(0, 60, size=(len(labels), 28, 28), dtype=np.uint8)
        for i, k in enumerate(labels):
            x[i, 2 * k + 4 : 2 * k + 6, 4:24] = 255
        return x

    train_y = rng.integers(0, 10, n_train).astype(np.uint8)
    test_y = rng.integers(0, 10, n_test).astype(np.uint8)
    arrays = {
        "train-images-idx3-ubyte": images_for(train_y),
        "train-labels-idx1-ubyte": train_y,
        "t10k-images-idx3-ubyte": images_for(test_y),
        "t10k-labels-idx1-ubyte": test_y,
    }
    folder.mkdir(parents=True, exist_ok=True)
    sums = {}
    for name, array in arrays.items():
        raw = write_idx(array)
        (folder / name).write_bytes(raw)
        sums[name] = hashlib.md5(raw).hexdigest()
    (folder / "md5sums.txt").write_text("".join(f"{md5}  {name}\n" for name, md5 in sums.items()))
    return sums


def write_file(folder: Path, name: str, text) -> Path:
    """``folder/name`` holding ``text`` (a mapping is written as YAML); returns its path."""
    path = Path(folder) / name
    path.write_text(text if isinstance(text, str) else yaml.safe_dump(text))
    return path


def run_cli(*args, env=None, timeout=600, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"mnist-tune {' '.join(map(str, args))} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc



# ----------------------------------------------------------------- real servers



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float = 90, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def start_mlflow_server(workdir: Path, backend_uri: str | None = None, extra_env=None):
    """A real `mlflow server` process on a free loopback port, artifacts served by it."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    backend_uri = backend_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    log = open(workdir / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
         "--artifacts-destination", str(workdir / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(extra_env or {})}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/health", proc=proc)
    except Exception:
        proc.kill()
        raise RuntimeError((workdir / "server.log").read_text()[-3000:])
    return proc, url


def stop_process(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -------------------------------------------------------------------------- PostgreSQL
#
# Where the tests marked `postgres` find a server, in this order (pg_admin_url()):
#   1. $MNIST_TUNE_TEST_PG, an admin URL (a role that may CREATE/DROP DATABASE), used as given;
#   2. a PostgreSQL answering on 127.0.0.1:5432 as postgres@postgres (the CI/dev default);
#   3. a throwaway cluster the session starts itself from the installed binaries (initdb,
#      pg_ctl: Debian's /usr/lib/postgresql/<v>/bin, else on PATH) in a temporary folder,
#      trust auth, a free loopback port, its socket in that folder; stopped and removed when
#      the session ends (the `pg_admin_url` fixture in conftest.py starts it lazily).
# Only where none of these is possible are those tests skipped, with one reason.

PG_DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
# Kept for modules that import it; only right for cases 1 and 2 above. Use pg_admin_url()
# (or the `pg_admin_url` fixture), which also knows the throwaway cluster's address.
PG_ADMIN_URL = os.environ.get("MNIST_TUNE_TEST_PG", PG_DEFAULT_URL)

_active_admin_url: str | None = None  # set while the session's server is chosen (see pg_admin_url)


class NoPostgres(RuntimeError):
    """No server configured or running and none can be started here: skip, with this reason."""


def with_database(url: str, name: str) -> str:
    """The same server URL (user, host, port, query) pointing at database ``name``."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


def pg_answers(url: str, timeout: int = 3) -> bool:
    """Whether a PostgreSQL server accepts this URL (connects and runs SELECT 1)."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=timeout, autocommit=True) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def pg_bindir() -> Path | None:
    """The newest installed PostgreSQL server binaries (initdb, pg_ctl, postgres), or None."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                        key=lambda p: [int(x) if x.isdigit() else 0 for x in p.parent.name.split(".")], reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for folder in candidates:
        if all((folder / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


class ThrowawayPostgres:
    """A private PostgreSQL cluster in a temporary folder: ``start()`` -> admin URL, ``stop()``.

    initdb refuses to run as root, so as root every server command runs as the ``postgres``
    system user (runuser, else su) and the folder is handed to that user.
    """

    def __init__(self, bindir: Path, user: str = "postgres"):
        self.bindir = bindir
        self.run_as = user if os.geteuid() == 0 else None
        self.folder: Path | None = None
        self.port: int | None = None
        self.url: str | None = None

    def _command(self, *args: str) -> list[str]:
        if self.run_as is None:
            return list(args)
        if shutil.which("runuser"):
            return ["runuser", "-u", self.run_as, "--", *args]
        import shlex

        return ["su", self.run_as, "-s", "/bin/sh", "-c", shlex.join(args)]

    def _run(self, *args: str, timeout: float = 120) -> None:
        proc = subprocess.run(self._command(*args), capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            log = self.folder / "server.log" if self.folder else None
            tail = log.read_text()[-2000:] if log and log.is_file() else ""
            raise RuntimeError(f"{' '.join(args[:2])} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}{tail}")

    def start(self) -> str:
        if self.run_as is not None:
            import pwd

            try:
                account = pwd.getpwnam(self.run_as)
            except KeyError:
                raise NoPostgres(f"running as root and there is no {self.run_as!r} user to run initdb as") from None
        # Not under pytest's tmp_path: that is private to root (0700) and the server user
        # must reach its data directory and socket.
        self.folder = Path(tempfile.mkdtemp(prefix="mnist-tune-pg-"))
        if self.run_as is not None:
            os.chown(self.folder, account.pw_uid, account.pw_gid)
        data, sockets = self.folder / "data", self.folder / "sock"
        self._run(str(self.bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                  "-E", "UTF8", "--locale=C", "--no-sync")
        self._run("mkdir", str(sockets))
        for attempt in range(3):  # the free port can be taken between free_port() and bind
            self.port = free_port()
            options = (f"-p {self.port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
            try:
                self._run(str(self.bindir / "pg_ctl"), "-D", str(data), "-l", str(self.folder / "server.log"),
                          "-o", options, "-w", "-t", "60", "start")
                break
            except RuntimeError:
                if attempt == 2:
                    self.stop()
                    raise
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        return self.url

    def stop(self) -> None:
        if self.folder is None:
            return
        data = self.folder / "data"
        if (data / "postmaster.pid").exists():
            try:
                self._run(str(self.bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                self._run(str(self.bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None


def choose_pg_server() -> tuple[str, ThrowawayPostgres | None]:
    """(admin URL, the throwaway cluster to stop at the end or None): see the order above.
    Raises NoPostgres where none is configured, none answers and none can be started."""
    configured = os.environ.get("MNIST_TUNE_TEST_PG")
    if configured:
        return configured, None
    if pg_answers(PG_DEFAULT_URL):
        return PG_DEFAULT_URL, None
    bindir = pg_bindir()
    if bindir is None:
        raise NoPostgres("no PostgreSQL: $MNIST_TUNE_TEST_PG is unset, nothing answers on 127.0.0.1:5432 and "
                         "no PostgreSQL server binaries (initdb, pg_ctl) are installed to start a throwaway one")
    cluster = ThrowawayPostgres(bindir)
    return cluster.start(), cluster


def set_pg_admin_url(url: str | None) -> None:
    global _active_admin_url
    _active_admin_url = url


def pg_admin_url() -> str:
    """The admin URL of the session's server (the `pg_admin_url` fixture sets it); before the
    fixture ran, the configured or default one (PG_ADMIN_URL)."""
    return _active_admin_url or PG_ADMIN_URL


def create_database(prefix: str = "mnist_tune_test", admin_url: str | None = None) -> str:
    """A new, empty database on the session's server; returns its URL."""
    import psycopg

    admin_url = admin_url or pg_admin_url()
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, connect_timeout=5, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return with_database(admin_url, name)


def drop_database(url: str, admin_url: str | None = None) -> None:
    """Drop the database ``url`` names (IF EXISTS, closing its connections), connected as the
    admin database of the same server."""
    import psycopg

    name = urllib.parse.urlsplit(url).path.lstrip("/")
    admin_db = urllib.parse.urlsplit(admin_url or pg_admin_url()).path.lstrip("/") or "postgres"
    with psycopg.connect(admin_url or with_database(url, admin_db), connect_timeout=5, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sigint_as_in_a_terminal() -> None:
    """For a child that a test stops with SIGINT: pytest-xdist's workers ignore SIGINT, and a
    process that starts with it ignored keeps ignoring it (Python installs no handler then)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_ui(tracking_uri: str, port: int, env=None) -> tuple[subprocess.Popen, str]:
    """``mnist_tune.ui.serve`` in its own process session, as `mnist-tune ui` runs it; returns
    the process and what it printed up to its last link (the caller stops it)."""
    code = f"from mnist_tune.ui import serve; raise SystemExit(serve({tracking_uri!r}, '127.0.0.1', {port}))"
    proc = subprocess.Popen([sys.executable, "-u", "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env, start_new_session=True, preexec_fn=sigint_as_in_a_terminal)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("  compare top"):
            break
    return proc, "".join(lines)

