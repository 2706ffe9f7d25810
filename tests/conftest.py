"""Shared fixtures: synthetic IDX data sets, the real MNIST, temp stores, a real MLflow server."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnist_tune.data import MNIST_MD5, write_idx

REPO = Path(__file__).resolve().parent.parent
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


def run_cli(*args, env=None, timeout=600, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"mnist-tune {' '.join(map(str, args))} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc
