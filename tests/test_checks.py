"""checks.py (names are not paths; a corrupt SQLite store is bad input) and predict's refusal
of decompression bombs. Fast: no training, no MLflow or Optuna store is opened."""

from __future__ import annotations

import os
import sqlite3
import struct
import zlib
from pathlib import Path

import pytest

from mnist_tune.checks import MAX_NAME_LENGTH, check_name, check_sqlite_store
from mnist_tune.errors import MnistTuneError
from mnist_tune.stores import sqlite_path

from helpers import run_cli

# Names in use by the shipped sweeps, the registry, the train command, tests and docker/.
GOOD_NAMES = ["mlp-default", "mixer-default", "mlp-wide", "tiny", "tiny-server", "multi", "mnist-tune-train",
              "mnist-mlp", "mnist-mixer", "mlp-compose", "compose-test-0a1b2c3d", "bench-one", "mlp_v2.1",
              "trial-12", "study-mlp-default", "A", "x" * MAX_NAME_LENGTH]

# (name, a phrase the one-line message must contain)
BAD_NAMES = [
    ("../../escape", "path separators"),
    ("..", "'..'"),
    ("a..b", "'..'"),
    ("a/b", "path separators"),
    ("/abs", "path separators"),
    ("a\\b", "path separators"),
    ("x" * 300, "at most 100"),
    ("x" * (MAX_NAME_LENGTH + 1), "at most 100"),
    ("", "empty"),
    ("   ", "empty"),
    ("\t", "empty"),
    ("a\nb", "control characters"),
    ("a\x00b", "control characters"),
    ("a\x1b[31mred", "control characters"),
    ("tab\there", "control characters"),
    ("a\x85b", "control characters"),
    (".hidden", "starting with a letter or digit"),
    ("-rf", "starting with a letter or digit"),
    ("a b", "not allowed: ' '"),
    ("mnist:mlp", "not allowed: ':'"),
    ("name@alias", "not allowed: '@'"),
    ("semi;colon", "not allowed: ';'"),
    ("quote'd", "not allowed"),
    ("ünïcode", "not allowed"),
    ("a*b?", "not allowed"),
    ("%2e%2e", "not allowed: '%'"),
]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names_pass(name):
    assert check_name(name, "--study-name") == name


@pytest.mark.parametrize(("name", "rule"), BAD_NAMES, ids=lambda v: repr(v)[:30])
def test_bad_names_are_refused_with_the_rule(name, rule):
    with pytest.raises(MnistTuneError) as info:
        check_name(name, "--study-name")
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    assert message.startswith("--study-name "), message
    assert rule in message, message
    assert len(message) < 200, message  # a 300-character name is shortened in the message


@pytest.mark.parametrize("value", [None, 3, b"tiny"])
def test_non_strings_are_refused(value):
    with pytest.raises(MnistTuneError, match="must be a string"):
        check_name(value, "--experiment")


# ----------------------------------------------------------------------- sqlite stores


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under folder: its bytes and mtime (ns)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def make_db(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE experiments (id INTEGER PRIMARY KEY, name TEXT)")
        conn.executemany("INSERT INTO experiments (name) VALUES (?)", [(f"e{i}",) for i in range(500)])
    conn.close()


@pytest.mark.parametrize("form", ["url", "relative-url", "path", "Path"])
def test_good_and_missing_stores_pass(tmp_path, monkeypatch, form):
    monkeypatch.chdir(tmp_path)
    make_db(tmp_path / "mlflow.db")
    (tmp_path / "empty.db").touch()  # SQLite's empty database
    before = snapshot(tmp_path)
    for name in ("mlflow.db", "empty.db", "missing.db", "no/such/folder/x.db"):
        target = {"url": f"sqlite:///{tmp_path / name}", "relative-url": f"sqlite:///{name}",
                  "path": str(tmp_path / name), "Path": tmp_path / name}[form]
        check_sqlite_store(target, "MLflow store")
    assert snapshot(tmp_path) == before  # nothing written, no journal left behind


@pytest.mark.parametrize("url", ["postgresql://u@h/db", "http://127.0.0.1:5000", "sqlite://",
                                 "sqlite:///:memory:", "mysql+pymysql://u@h/db", ""])
def test_other_urls_are_not_sqlite_files(url):
    assert sqlite_path(url) is None
    check_sqlite_store(url, "store")


def test_sqlite_path_forms(tmp_path):
    assert sqlite_path(f"sqlite:///{tmp_path}/a.db") == tmp_path / "a.db"
    assert sqlite_path("sqlite:///rel/a.db") == Path("rel/a.db")
    assert sqlite_path("sqlite+pysqlite:///rel/a.db?timeout=60") == Path("rel/a.db")


def corrupt_variants(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, phrase expected in the message)"""
    files = {}
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(os.urandom(4096))
    files["garbage"] = (garbage, "not an SQLite database")
    text = tmp_path / "text.db"
    text.write_text("this is not a database\n")
    files["text"] = (text, "not an SQLite database")
    short = tmp_path / "short.db"
    short.write_bytes(b"SQLite")
    files["short"] = (short, "not an SQLite database")
    # A real database whose pages after the header were overwritten: header is right,
    # the schema or the b-trees are not.
    broken = tmp_path / "broken.db"
    make_db(broken)
    raw = bytearray(broken.read_bytes())
    raw[100:] = os.urandom(len(raw) - 100)
    broken.write_bytes(bytes(raw))
    files["broken pages"] = (broken, "not a readable SQLite database")
    # Truncated in the middle of its pages.
    truncated = tmp_path / "truncated.db"
    make_db(truncated)
    raw = truncated.read_bytes()
    truncated.write_bytes(raw[: len(raw) // 2 + 17])
    files["truncated"] = (truncated, "not a readable SQLite database")
    folder = tmp_path / "folder.db"
    folder.mkdir()
    files["folder"] = (folder, "is a folder")
    return files


def test_corrupt_stores_are_refused_without_modification(tmp_path):
    variants = corrupt_variants(tmp_path)
    before = snapshot(tmp_path)
    listing = sorted(p.name for p in tmp_path.iterdir())
    for name, (path, phrase) in variants.items():
        for target in (f"sqlite:///{path}", path):
            with pytest.raises(MnistTuneError) as info:
                check_sqlite_store(target, "MLflow store")
            message = str(info.value)
            assert "\n" not in message, (name, message)
            assert message.startswith(f"MLflow store {path}: "), (name, message)
            assert phrase in message, (name, message)
    assert snapshot(tmp_path) == before  # bytes and mtimes unchanged
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no -journal/-wal/-shm files


def test_busy_store_is_not_called_corrupt(tmp_path):
    """A writer holding the database (another worker, `status` during a run) is no corruption."""
    db = tmp_path / "optuna.db"
    make_db(db)
    writer = sqlite3.connect(db, isolation_level=None)
    try:
        writer.execute("BEGIN EXCLUSIVE")
        writer.execute("INSERT INTO experiments (name) VALUES ('held')")
        check_sqlite_store(f"sqlite:///{db}", "Optuna storage")
    finally:
        writer.execute("ROLLBACK")
        writer.close()


# ------------------------------------------------------------------- decompression bombs


def png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit grayscale PNG of width x height zeros, built without holding its pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bombs")
    return {"error": png(folder / "bomb-20000.png", 20000, 20000),   # over 2x the limit: PIL raises
            "warning": png(folder / "bomb-10000.png", 10000, 10000)}  # between 1x and 2x: PIL only warns


@pytest.mark.parametrize("kind", ["error", "warning"])
def test_decompression_bomb_is_one_clear_error(bombs, kind):
    from mnist_tune.predict import read_images

    path = bombs[kind]
    assert path.stat().st_size < 1_000_000  # a small file...
    with pytest.raises(MnistTuneError) as info:  # ...that declares 10^8 or 4x10^8 pixels
        read_images([path])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: refused as a possible decompression bomb: "), message
    assert "exceeds limit" in message, message


def test_small_png_still_reads(tmp_path):
    from mnist_tune.predict import read_images

    batch = read_images([png(tmp_path / "digit.png", 28, 28), png(tmp_path / "big.png", 280, 140)])
    assert tuple(batch.shape) == (2, 1, 28, 28)


def test_predict_refuses_a_bomb_before_loading_a_model(bombs, tmp_path):
    """The CLI: exit 2, one line, before the (non-existent) run is looked up."""
    env = {**os.environ, "MNIST_TUNE_HOME": str(tmp_path / "mlruns")}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = run_cli("predict", "--run-id", "0123456789abcdef", bombs["error"], env=env, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "decompression bomb" in lines[0], proc.stderr
    assert not (tmp_path / "mlruns").exists()
