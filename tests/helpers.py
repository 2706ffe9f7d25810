"""Test helpers shared by test modules and benchmarks: synthetic IDX data, the CLI as a
subprocess, real MLflow servers and PostgreSQL databases. Fixtures live in conftest.py."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import torch

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


def run_cli(*args, env=None, timeout=600, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"mnist-tune {' '.join(map(str, args))} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc



# ----------------------------------------------------------------- real servers

PG_ADMIN_URL = os.environ.get("MNIST_TUNE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


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


def create_database(prefix: str = "mnist_tune_test") -> str:
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    conn = psycopg.connect(PG_ADMIN_URL, connect_timeout=5, autocommit=True)
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def drop_database(url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    conn = psycopg.connect(PG_ADMIN_URL, connect_timeout=5, autocommit=True)
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()
