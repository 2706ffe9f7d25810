"""Names are not paths, and a corrupt store is bad input: end to end through the CLI on the
embedded default store.

Each bad input must end in exit status 2 and exactly one stderr line ``error: …``, before
anything is written: no file or folder appears or changes under the test's folder (or next
to it: ``../../escape`` once wrote two levels above ``mlruns/artifacts/``), no Optuna study
is created, a corrupt store file keeps its bytes and mtime.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import run_cli

BAD_STUDY_NAMES = {
    "dotdot-escape": "../../escape",
    "deeper-escape": "../../../../../../tmp/mnist-tune-escape",
    "dotdot": "..",
    "nested": "a/b",
    "absolute": "/tmp/mnist-tune-absolute",
    "backslash": "a\\b",
    "too-long-300": "x" * 300,
    "too-long-101": "n" * 101,
    "empty": "",
    "blank": "   ",
    "newline": "mlp\ndefault",
    "tab": "mlp\tdefault",
    "escape-sequence": "mlp\x1b[2Jdefault",
    "hidden": ".mlp",
    "colon": "mnist:mlp",
    "at": "mlp@champion",
    "space": "mlp default",
}


def snapshot(folder: Path) -> dict[str, tuple[bytes, int] | None]:
    """Every path under folder: files with their bytes and mtime, folders as None."""
    found = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        found[key] = (path.read_bytes(), path.stat().st_mtime_ns) if path.is_file() else None
    return found


def neighbours(tmp_path: Path) -> set[str]:
    """What lies beside the test's folder, in this session's base folder (higher up, other
    sessions come and go; the absolute paths a deeper escape would reach are checked by name)."""
    return {p.name for p in tmp_path.parent.iterdir()}


def assert_refused(proc, *, mention: str | None = None) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"{len(lines)} stderr lines:\n{proc.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    if mention is not None:
        assert mention in lines[0], lines[0]
    return lines[0]


# Valid in every other way (the synthetic data has 1200 training images): only the name is wrong.
STUDY = ["study", "--model", "mlp", "--trials", "1", "--epochs", "1", "--val-size", "200", "--no-plots"]
TRAIN = ["train", "--epochs", "1", "--val-size", "200"]


@pytest.fixture
def untouched(synthetic_env, tmp_path):
    """Yields the CLI's environment; afterwards, checks nothing was written anywhere near."""
    before, beside = snapshot(tmp_path), neighbours(tmp_path)
    yield synthetic_env
    assert snapshot(tmp_path) == before, "files were written or changed"
    assert neighbours(tmp_path) == beside, "something appeared next to the test's folder"
    assert not Path("/tmp/mnist-tune-escape").exists() and not Path("/tmp/mnist-tune-absolute").exists()


@pytest.mark.parametrize("name", list(BAD_STUDY_NAMES.values()), ids=list(BAD_STUDY_NAMES))
def test_study_refuses_bad_study_name(untouched, tmp_path, name):
    proc = run_cli(*STUDY, "--study-name", name, env=untouched, check=False, timeout=300)
    line = assert_refused(proc, mention="--study-name")
    assert "Traceback" not in proc.stderr and len(line) < 300
    assert not (tmp_path / "mlruns").exists()  # no store created, so no Optuna study either


@pytest.mark.parametrize(("option", "value"), [
    ("--experiment", "../../escape"),
    ("--experiment", "a/b"),
    ("--experiment", ""),
    ("--experiment", "e" * 300),
    ("--run-name", "run\nname"),
    ("--run-name", "../../run"),
    ("--run-name", ""),
], ids=["experiment-escape", "experiment-nested", "experiment-empty", "experiment-300", "run-newline",
        "run-escape", "run-empty"])
def test_train_refuses_bad_names(untouched, tmp_path, option, value):
    proc = run_cli(*TRAIN, option, value, env=untouched, check=False, timeout=300)
    assert_refused(proc, mention=option)
    assert not (tmp_path / "mlruns").exists()


def corrupt_store(tmp_path: Path, name: str) -> Path:
    home = tmp_path / "mlruns"
    home.mkdir()
    path = home / name
    path.write_bytes(b"this is no database\n" + os.urandom(8192))
    os.utime(path, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))  # a fixed, old mtime
    return path


@pytest.mark.parametrize("command", ["study", "train"])
def test_corrupt_mlflow_db_is_bad_input(synthetic_env, tmp_path, command):
    db = corrupt_store(tmp_path, "mlflow.db")
    before, beside = snapshot(tmp_path), neighbours(tmp_path)
    proc = run_cli(*(STUDY if command == "study" else TRAIN), env=synthetic_env, check=False, timeout=300)
    assert_refused(proc, mention=str(db))
    assert sorted(p.name for p in db.parent.iterdir()) == ["mlflow.db"]  # no optuna.db, no artifacts/
    assert snapshot(tmp_path) == before  # the corrupt file keeps its bytes and mtime
    assert neighbours(tmp_path) == beside


def test_corrupt_optuna_db_is_bad_input(synthetic_env, tmp_path):
    db = corrupt_store(tmp_path, "optuna.db")
    before = snapshot(tmp_path)
    proc = run_cli(*STUDY, env=synthetic_env, check=False, timeout=300)
    assert_refused(proc, mention="optuna.db")
    assert sorted(p.name for p in db.parent.iterdir()) == ["optuna.db"]  # no mlflow.db created
    assert snapshot(tmp_path) == before


def test_the_same_commands_run_with_good_names(synthetic_env, tmp_path):
    """Control: the arguments above are valid but for the name, and names in use stay valid."""
    run_cli(*STUDY, "--study-name", "mlp-default", env=synthetic_env, timeout=600)
    run_cli(*TRAIN, "--experiment", "mnist-tune-train", "--run-name", "mlp-train.v2_1", env=synthetic_env,
            timeout=600)
    artifacts = tmp_path / "mlruns" / "artifacts"
    folders = [p.name for p in artifacts.iterdir()]  # one per experiment, never named after it
    assert len(folders) == 2 and all(len(name) == 32 and int(name, 16) >= 0 for name in folders)
