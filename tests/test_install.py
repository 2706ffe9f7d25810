"""The project as a user gets it: a regular (non-editable) install into a fresh environment,
run from another folder, finds its built-in sweeps and finishes a study.

The fresh venv sees this environment's packages through a .pth file (no network, no copies of
torch), and ``pip install --no-deps --no-build-isolation .`` builds and installs only the
project; the checkout is kept off the import path, so the installed copy is the one tested."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _fresh_venv(where: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # this environment's dependencies (pip, torch, mlflow, ...), after the venv's own site-packages
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.slow
def test_regular_install_runs_a_study_from_elsewhere(synthetic_env, tmp_path):
    env = {k: v for k, v in synthetic_env.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    python = _fresh_venv(tmp_path / "venv")
    build = tmp_path / "src"  # what the Dockerfile copies: the build writes build/ and *.egg-info there
    shutil.copytree(REPO / "mnist_tune", build / "mnist_tune", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, build / name)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", str(build)], check=True, env=env, cwd=tmp_path, timeout=300)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import mnist_tune.config as c; print(c.__file__); "
                            "print(c.sweep_for('mlp', None).path)"],
                           capture_output=True, text=True, env=env, cwd=elsewhere, check=True).stdout.split("\n")
    assert where[0].startswith(str(tmp_path / "venv")), where  # the installed copy, not the checkout
    assert where[1].startswith(str(tmp_path / "venv")) and where[1].endswith("mlp.yaml"), where

    proc = subprocess.run([str(python.parent / "mnist-tune"), "study", "--model", "mlp", "--trials", "1",
                           "--epochs", "1", "--val-size", "200", "--no-plots"],
                          capture_output=True, text=True, env=env, cwd=elsewhere, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "study mlp-default: 1/1 trials (1 complete" in proc.stdout, proc.stdout


def test_wheel_contents_declare_the_sweeps():
    """What setuptools packs comes from setup.cfg: the sweeps are package data there."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    assert "sweeps/*.yaml" in cfg["options.package_data"]["mnist_tune"]
    assert os.path.realpath(REPO / "sweeps") == os.path.realpath(REPO / "mnist_tune" / "sweeps")
