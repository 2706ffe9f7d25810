"""optuna-dashboard on a study's storage: ``mnist-tune dashboard --study NAME``.

    serve(None, "mlp-default")                       # embedded store: sqlite:///mlruns/optuna.db
    serve("postgresql://…/optuna", "mlp-compose", host="0.0.0.0", port=8080)
    python -m mnist_tune.dashboard --study mlp-default [--storage URL | --storage-file FILE]

The server runs in this process (optuna-dashboard's WSGI app on a threaded wsgiref server):
Ctrl-C or SIGTERM stops it and nothing is left running. It only *reads* the storage: an
unknown study or a missing store is refused before anything is created (Optuna would
otherwise create an empty SQLite file and its tables), and by default the dashboard's
write endpoints (delete or rename a study, tell a trial, notes) answer 403, because the port
may be reachable by others while every worker depends on that storage. The dashboard lists
every study of the storage; the printed URL opens the named one.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from mnist_tune.errors import MnistTuneError
from mnist_tune.stores import first_line
from mnist_tune.study import NotThereYet, check_study_exists, open_existing_storage

DEFAULT_PORT = 8080  # optuna-dashboard's own default; MLflow's UI has 5000
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
READ_METHODS = ("GET", "HEAD", "OPTIONS")


def find_study(storage, study_name: str, wait: float = 0.0) -> int:
    """The study's id; an unknown name is a MnistTuneError listing the studies there are.
    ``wait`` > 0: poll that many seconds for the study to appear (a dashboard started beside
    the workers that will create it)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            check_study_exists(storage, study_name)
            return storage.get_study_id_from_name(study_name)
        except NotThereYet:
            if time.monotonic() >= deadline:
                raise
        except MnistTuneError:
            raise
        except Exception as e:
            raise MnistTuneError(f"cannot read the studies: {first_line(e)}") from None
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


class _ThreadedServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow browser request never keeps the process alive
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002  (one line per request would drown the log)
        pass


def _read_only(app):
    def guarded(environ, start_response):
        if environ.get("REQUEST_METHOD", "GET").upper() not in READ_METHODS:
            start_response("403 Forbidden", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"this dashboard is read-only (mnist-tune dashboard)\n"]
        return app(environ, start_response)

    return guarded


class Dashboard:
    """A bound (listening) dashboard server; ``serve_forever`` answers requests until
    ``shutdown``; ``close`` releases the socket and the storage's connections."""

    def __init__(self, storage, study_id: int, study_name: str, host: str, port: int, read_only: bool = True):
        import optuna_dashboard

        self.storage, self.study_id, self.study_name = storage, study_id, study_name
        app = optuna_dashboard.wsgi(storage)
        try:
            self.server = make_server(host, port, _read_only(app) if read_only else app,
                                      server_class=_ThreadedServer, handler_class=_QuietHandler)
        except OSError as e:
            self._dispose()
            raise MnistTuneError(f"cannot listen on {host or '*'}:{port}: {e.strerror or e} (try another --port)") \
                from None
        self.host = host
        self.port = self.server.server_address[1]  # port 0: the one the OS chose

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in WILDCARD_HOSTS else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base_url}/dashboard/studies/{self.study_id}"

    def serve_forever(self) -> None:
        self.server.serve_forever(poll_interval=0.2)

    def shutdown(self) -> None:
        """Stop ``serve_forever`` (from another thread)."""
        self.server.shutdown()

    def close(self) -> None:
        self.server.server_close()
        self._dispose()

    def _dispose(self) -> None:
        engine = getattr(self.storage, "engine", None)
        if engine is not None:
            engine.dispose()


def open_dashboard(storage_url: str | None, study_name: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                   *, wait: float = 0.0, read_only: bool = True) -> Dashboard:
    """Check the storage and the study, then bind the server (not serving yet). ``wait``:
    seconds to wait for the storage's tables and the study to appear (a dashboard started
    beside the workers that create them); other errors are raised at once."""
    deadline = time.monotonic() + wait
    while True:
        try:
            storage = open_existing_storage(storage_url)
            break
        except NotThereYet:
            if time.monotonic() >= deadline:
                raise
            time.sleep(2.0)
    try:
        study_id = find_study(storage, study_name, max(0.0, deadline - time.monotonic()))
    except BaseException:
        storage.engine.dispose()
        raise
    return Dashboard(storage, study_id, study_name, host, port, read_only)


def serve(storage_url: str | None, study_name: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
          wait: float = 0.0, read_only: bool = True, log: Callable[[str], None] = print,
          ready: Callable[[Dashboard], None] | None = None) -> None:
    """Serve optuna-dashboard for ``study_name`` until Ctrl-C / SIGTERM, then return.

    ``storage_url``: None for the embedded store (``mnist_tune.stores.default_storage()``).
    Prints the study's URL through ``log`` once the port is bound. Raises MnistTuneError
    (one line, password redacted) for a missing store, an unknown study or a taken port."""
    dashboard = open_dashboard(storage_url, study_name, host, port, wait=wait, read_only=read_only)
    previous = None
    if threading.current_thread() is threading.main_thread():
        def on_sigterm(signum, frame):
            raise KeyboardInterrupt  # leaves serve_forever like Ctrl-C does

        previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        log(f"optuna-dashboard for study {study_name!r}: {dashboard.url}"
            + (f"  (listening on {host}:{dashboard.port})" if host in WILDCARD_HOSTS else "")
            + "  (Ctrl-C stops it)")
        if ready is not None:
            ready(dashboard)
        dashboard.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        dashboard.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _storage_from(args) -> str | None:
    if args.storage or not args.storage_file:
        return args.storage
    try:
        text = Path(args.storage_file).read_text().strip()
    except OSError as e:
        raise MnistTuneError(f"cannot read storage file {args.storage_file}: {e.strerror}") from None
    if not text:
        raise MnistTuneError(f"storage file {args.storage_file} is empty")
    return text


def main(argv: list[str] | None = None) -> None:
    """``python -m mnist_tune.dashboard``: the same options as ``mnist-tune dashboard``."""
    parser = argparse.ArgumentParser(prog="python -m mnist_tune.dashboard", description=serve.__doc__.split("\n")[0])
    parser.add_argument("--study", required=True, help="study name")
    parser.add_argument("--storage", default=os.environ.get("MNIST_TUNE_STORAGE"),
                        help="Optuna storage URL [$MNIST_TUNE_STORAGE; default: sqlite under ./mlruns]")
    parser.add_argument("--storage-file", default=os.environ.get("MNIST_TUNE_STORAGE_FILE"),
                        help="file holding the storage URL [$MNIST_TUNE_STORAGE_FILE]")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 exposes it to the network")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--wait", type=float, default=0.0,
                        help="seconds to wait for the storage and the study to appear (started beside the workers)")
    args = parser.parse_args(argv)
    try:
        serve(_storage_from(args), args.study, args.host, args.port, wait=args.wait,
              log=lambda m: print(m, flush=True))
    except MnistTuneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
