"""Input checks that run before anything is written: names that become paths, stores that
must be what they claim to be.

Every check raises ``MnistTuneError`` with one line naming the value and the rule it breaks
(the CLI prints it as ``error: …`` and exits 2), and writes nothing.

- ``check_name``: study, experiment, registered-model and run names. A study name becomes the
  MLflow experiment name, a folder under the embedded store's ``artifacts/`` and part of the
  registry URI ``models:/<name>@<alias>``, so it must be a plain file-name-safe token.
- ``check_sqlite_store``: a ``sqlite:///`` store that exists must be a readable SQLite
  database; checked read-only with the standard library before MLflow or Optuna open it
  (they would create tables in it, or fail deep inside SQLAlchemy after other writes).
"""

from __future__ import annotations

import re
import sqlite3
import urllib.request
from pathlib import Path

from mnist_tune.errors import MnistTuneError
from mnist_tune.stores import first_line, sqlite_path

MAX_NAME_LENGTH = 100
# ASCII letters and digits, then also "." "_" "-": accepted as an MLflow experiment name, an
# MLflow registered-model name (which refuses "/" and ":"), inside "models:/<name>@<alias>"
# (hence no "@"), as one path component on every file system, by Optuna (any string) and in a
# PostgreSQL text column. Starting with a letter or digit keeps names from looking like hidden
# files (".x") or command-line options ("-x").
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit"


def check_name(text: str | None, what: str) -> str:
    """``text`` if it is a safe name for ``what`` (e.g. ``"--study-name"``); else MnistTuneError.

    The rules, checked in this order so the message names the first one broken: a string;
    not empty or blank; no control characters; no path separators ("/", "\\"); no ".."; at
    most MAX_NAME_LENGTH characters; only NAME_RULE's characters.
    """
    if not isinstance(text, str):
        raise MnistTuneError(f"{what} {text!r}: must be a string")
    shown = _show(text)
    if not text.strip():
        raise MnistTuneError(f"{what} {shown}: must not be empty")
    if any(ord(c) < 32 or ord(c) == 127 or 0x80 <= ord(c) < 0xA0 for c in text):
        raise MnistTuneError(f"{what} {shown}: must not contain control characters")
    if "/" in text or "\\" in text:
        raise MnistTuneError(f"{what} {shown}: must not contain path separators ('/' or '\\'); "
                             "names are not paths")
    if ".." in text:
        raise MnistTuneError(f"{what} {shown}: must not contain '..'; names are not paths")
    if len(text) > MAX_NAME_LENGTH:
        raise MnistTuneError(f"{what} {shown}: {len(text)} characters, at most {MAX_NAME_LENGTH} allowed")
    if not NAME_PATTERN.fullmatch(text):
        bad = sorted({c for c in text if not re.fullmatch(r"[A-Za-z0-9._-]", c)})
        detail = f" (not allowed: {' '.join(map(repr, bad))})" if bad else ""
        raise MnistTuneError(f"{what} {shown}: use only {NAME_RULE}{detail}")
    return text


def _show(text: str, limit: int = 40) -> str:
    """The value for an error message: repr (control characters escaped, one line), shortened."""
    if len(text) > limit:
        return repr(text[:limit]) + "…"
    return repr(text)


# ------------------------------------------------------------------------ sqlite stores


def check_sqlite_store(url_or_path: str | Path, what: str) -> None:
    """Refuse a SQLite store whose file exists but is not a readable SQLite database.

    A missing file (or a non-SQLite URL) passes: it will be created, or is checked elsewhere.
    Read-only: the file is opened with ``mode=ro`` (shared lock only, nothing written, no
    journal created) and read through ``sqlite_master`` and ``PRAGMA quick_check``.
    A database that is merely busy or needs a writer to recover (hot journal) passes: that is
    not corruption, and the store's own opener deals with it.
    """
    text = str(url_or_path)
    path = Path(text) if text and "://" not in text else sqlite_path(text)  # a plain path, or a URL
    if path is None or not (path.exists() or path.is_symlink()):
        return
    if path.is_dir():
        raise MnistTuneError(f"{what} {path}: is a folder, not an SQLite database file")
    if not path.is_file():
        raise MnistTuneError(f"{what} {path}: not a regular file")
    try:
        size = path.stat().st_size
        if size == 0:
            return  # SQLite treats an empty file as an empty database
        with open(path, "rb") as f:
            header = f.read(16)
    except OSError as e:
        raise MnistTuneError(f"{what} {path}: cannot read it: {e.strerror}") from None
    if header != b"SQLite format 3\x00":
        raise MnistTuneError(f"{what} {path}: not an SQLite database (its first bytes are not the SQLite header)")
    uri = "file:" + urllib.request.pathname2url(str(path.absolute())) + "?mode=ro"
    problem = None
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=1, isolation_level=None)
    except sqlite3.Error as e:
        raise MnistTuneError(f"{what} {path}: cannot open it read-only: {first_line(e)}") from None
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        rows = conn.execute("PRAGMA quick_check(5)").fetchall()
        if [r[0] for r in rows] != ["ok"]:
            problem = "corrupt: " + "; ".join(str(r[0]) for r in rows)
    except sqlite3.OperationalError as e:
        message = str(e).lower()
        if not any(s in message for s in ("locked", "busy", "readonly", "read-only")):
            problem = first_line(e)
    except sqlite3.DatabaseError as e:  # "file is not a database", "database disk image is malformed"
        problem = first_line(e)
    finally:
        conn.close()
    if problem:
        raise MnistTuneError(f"{what} {path}: not a readable SQLite database ({problem})")
