"""Fixtures: synthetic data in a temp store, the real MNIST, a real MLflow server, PostgreSQL
databases. Plain helpers are in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mnist_tune.data import MNIST_MD5

from helpers import (
    NoPostgres,
    choose_pg_server,
    create_database,
    drop_database,
    make_synthetic_mnist,
    set_pg_admin_url,
    start_mlflow_server,
    stop_process,
)


@pytest.fixture
def synthetic_env(tmp_path, monkeypatch):
    """Synthetic data dir + checksum manifest + empty embedded store, for this process and
    the CLI subprocesses it starts. Returns the environment for subprocesses."""
    data = tmp_path / "data"
    make_synthetic_mnist(data)
    monkeypatch.setenv("MNIST_TUNE_DATA", str(data))
    monkeypatch.setenv("MNIST_TUNE_CHECKSUMS", str(data / "md5sums.txt"))
    monkeypatch.setenv("MNIST_TUNE_HOME", str(tmp_path / "mlruns"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return dict(os.environ)


@pytest.fixture(scope="session")
def real_mnist_dir() -> Path:
    """The real MNIST through the fetch chain (cached in the user's cache dir across runs)."""
    from mnist_tune.data import default_data_dir, ensure_mnist

    saved = os.environ.pop("MNIST_TUNE_CHECKSUMS", None)
    try:
        files = ensure_mnist(default_data_dir())
    finally:
        if saved is not None:
            os.environ["MNIST_TUNE_CHECKSUMS"] = saved
    assert set(files) == set(MNIST_MD5)
    return default_data_dir()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real tracking server for the whole session (starting one takes 10-30 s here)."""
    proc, url = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    yield url
    stop_process(proc)


@pytest.fixture(scope="session")
def pg_admin_url():
    """Admin URL of the session's PostgreSQL: $MNIST_TUNE_TEST_PG, else the server on
    127.0.0.1:5432, else a throwaway cluster started here (first use only) and removed at the
    end of the session. Skips the tests that need it only where none can be had at all."""
    try:
        url, cluster = choose_pg_server()
    except NoPostgres as e:
        pytest.skip(str(e))
    set_pg_admin_url(url)
    yield url
    set_pg_admin_url(None)
    if cluster is not None:
        cluster.stop()


@pytest.fixture
def postgres_db(pg_admin_url):
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    url = create_database(admin_url=pg_admin_url)
    yield url
    drop_database(url, admin_url=pg_admin_url)
