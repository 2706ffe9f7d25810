"""Where the two stores are: Optuna's storage URL and MLflow's tracking URI.

No heavy imports here: the read-only commands (``best``, ``runs``, ``status``) resolve their
store through this module without loading MLflow or torch.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

from mnist_tune.errors import MnistTuneError


def default_home() -> Path:
    """The embedded store's folder: ``$MNIST_TUNE_HOME`` or ``./mlruns``."""
    return Path(os.environ.get("MNIST_TUNE_HOME", "mlruns")).absolute()


def default_storage() -> str:
    return f"sqlite:///{default_home() / 'optuna.db'}"


def resolve_storage(url: str | None = None) -> str:
    return url or default_storage()


def resolve_tracking_uri(uri: str | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the embedded SQLite store."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{default_home() / 'mlflow.db'}"


def sqlite_path(url: str) -> Path | None:
    """The file behind a ``sqlite:///`` URL; None for other URLs and for SQLite in memory."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+")[0].lower() != "sqlite":
        return None
    # sqlite:///relative/file, sqlite:////absolute/file; a query (?timeout=…) is not the path.
    path = rest.removeprefix("/").split("?", 1)[0]
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    return Path(path)


def redact(url: str) -> str:
    """A URL with any password replaced by ***, safe to print or log."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def from_file(value: str | None, file: str | None, what: str) -> str | None:
    """A URL given directly, or read from a file (keeps passwords off the command line)."""
    if value or not file:
        return value
    try:
        text = Path(file).read_text().strip()
    except OSError as e:
        raise MnistTuneError(f"cannot read {what} file {file}: {e.strerror}") from None
    if not text:
        raise MnistTuneError(f"{what} file {file} is empty")
    return text


def first_line(error: BaseException) -> str:
    """The first line of an error (a driver's own error if wrapped), for one-line messages."""
    text = str(getattr(error, "orig", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__
