"""Scale-out costs: the same study on the embedded stores vs PostgreSQL + an MLflow server,
and 1 vs 2 workers on the same budget. Real processes, real servers, real MNIST.

    python benchmarks/scale_out.py --trials 12 --epochs 5

Needs PostgreSQL on 127.0.0.1:5432 (trust auth; override with --pg-admin-url). Starts its own
`mlflow server` (PostgreSQL backend store) on a free loopback port, creates and drops its own
databases. Prints wall times, the per-trial overhead of PostgreSQL + server against the
embedded default, and the 2-worker / 1-worker wall-time ratio.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import psycopg

CLI = [sys.executable, "-m", "mnist_tune"]


def admin(url: str, sql: str) -> None:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(n: int, args: list[str], env: dict, threads: int) -> tuple[float, list[str]]:
    started = time.perf_counter()
    procs = [subprocess.Popen([*CLI, "study", *args, "--threads", str(threads)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(n)]
    outputs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - started
    for p, out in zip(procs, outputs):
        if p.returncode != 0:
            raise SystemExit(f"worker failed:\n{out}")
    return wall, outputs


def tracking_seconds(outputs: list[str]) -> float:
    return sum(float(m.group(1)) for out in outputs for m in re.finditer(r"tracking: ([\d.]+) s", out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--pg-admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    base = args.pg_admin_url.rsplit("/", 1)[0]
    tag = uuid.uuid4().hex[:8]
    dbs = {k: f"mnist_tune_bench_{k}_{tag}" for k in ("mlflow", "one", "two")}
    for db in dbs.values():
        admin(args.pg_admin_url, f'CREATE DATABASE "{db}"')
    server = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            port = free_port()
            server = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"{base}/{dbs['mlflow']}",
                 "--artifacts-destination", f"{tmp}/artifacts", "--host", "127.0.0.1", "--port", str(port),
                 "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            url = f"http://127.0.0.1:{port}"
            for _ in range(240):
                try:
                    urllib.request.urlopen(url + "/health", timeout=2)
                    break
                except OSError:
                    time.sleep(0.5)
            study = ["--model", args.model, "--trials", str(args.trials), "--epochs", str(args.epochs),
                     "--no-plots"]
            env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MNIST_TUNE_STORAGE")}
            embedded_env = {**env, "MNIST_TUNE_HOME": f"{tmp}/embedded"}
            cores = os.cpu_count() or 2
            embedded, out_e = run_workers(1, [*study, "--study-name", "bench-embedded"], embedded_env, cores)
            remote_env = {**env, "MLFLOW_TRACKING_URI": url}
            remote, out_r = run_workers(1, [*study, "--study-name", "bench-one", "--storage", f"{base}/{dbs['one']}"],
                                        remote_env, cores)
            two, out_2 = run_workers(2, [*study, "--study-name", "bench-two", "--storage", f"{base}/{dbs['two']}"],
                                     remote_env, max(1, cores // 2))
    finally:
        if server is not None:
            server.terminate()
            server.wait()
        for db in dbs.values():
            admin(args.pg_admin_url, f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    n = args.trials
    print(f"# {n} trials of the {args.model} sweep, {args.epochs} epochs each, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"embedded (SQLite + SQLite), 1 worker x{cores} threads : {embedded:6.1f} s wall, "
          f"{tracking_seconds(out_e):5.1f} s in MLflow calls")
    print(f"PostgreSQL + MLflow server, 1 worker x{cores} threads: {remote:6.1f} s wall, "
          f"{tracking_seconds(out_r):5.1f} s in MLflow calls")
    print(f"  per-trial overhead vs embedded: {(remote - embedded) / n:+.2f} s "
          f"(MLflow calls {(tracking_seconds(out_r) - tracking_seconds(out_e)) / n:+.2f} s)")
    print(f"PostgreSQL + MLflow server, 2 workers x{max(1, cores // 2)} threads: {two:6.1f} s wall "
          f"-> {two / remote:.2f}x the 1-worker wall time")


if __name__ == "__main__":
    main()
