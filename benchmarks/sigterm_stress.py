"""SIGTERM stress: does a study worker always stop promptly and cleanly, wherever the signal
lands?

    python benchmarks/sigterm_stress.py --runs 80

Each run starts a worker on a small synthetic MNIST (the test suite's) with trials of 20
epochs of a few ms each, so the worker is as often writing to Optuna's and MLflow's SQLite
stores, or closing one trial and opening the next, as it is training. Once it has reported
an epoch, it gets SIGTERM at a random moment within the next --spread seconds. A run passes
when the worker exits with 143 within --slow seconds, leaves no trial or MLflow run RUNNING,
and neither store is locked afterwards. Prints one line per run and a summary; exits 1 if
any run failed.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import CLI, make_synthetic_mnist  # noqa: E402
from test_workers import WORKER_SWEEP  # noqa: E402


def count(db: Path, sql: str) -> int:
    """Read straight from the file (an Optuna storage object would write its schema)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute(sql).fetchone()[0]
    except sqlite3.Error:  # not created yet, or locked for a moment
        return 0


def unlocked(db: Path) -> bool:
    try:
        conn = sqlite3.connect(db, timeout=1)
        conn.execute("BEGIN IMMEDIATE")
        conn.rollback()
        conn.close()
        return True
    except sqlite3.OperationalError:
        return False


def one_run(folder: Path, args, rng: random.Random) -> tuple[str | None, float]:
    """(what went wrong or None, seconds from SIGTERM to exit)."""
    make_synthetic_mnist(folder / "data")
    (folder / "multi.yaml").write_text(WORKER_SWEEP)
    env = {**os.environ, "MNIST_TUNE_DATA": str(folder / "data"),
           "MNIST_TUNE_CHECKSUMS": str(folder / "data" / "md5sums.txt"),
           "MNIST_TUNE_HOME": str(folder / "mlruns"), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    optuna_db, mlflow_db = folder / "mlruns" / "optuna.db", folder / "mlruns" / "mlflow.db"
    worker = subprocess.Popen([*CLI, "study", "--sweep", "multi.yaml", "--no-plots", "--trials", "1000",
                               "--epochs", "20", "--heartbeat-interval", "1", "--grace-period", "3"],
                              cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while count(optuna_db, "SELECT COUNT(*) FROM trial_intermediate_values") == 0:
        if time.monotonic() > deadline or worker.poll() is not None:
            worker.kill()
            raise SystemExit(f"the worker never started training (exit {worker.poll()})")
        time.sleep(0.2)
    time.sleep(rng.uniform(0, args.spread))
    sent = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    try:
        code = worker.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
        return f"hung (> {args.timeout:.0f} s)", time.monotonic() - sent
    seconds = time.monotonic() - sent
    problems = []
    if code != 143:
        problems.append(f"exit {code}")
    if seconds > args.slow:
        problems.append(f"slow ({seconds:.1f} s)")
    if count(optuna_db, "SELECT COUNT(*) FROM trials WHERE state = 'RUNNING'"):
        problems.append("a trial left RUNNING")
    if count(mlflow_db, "SELECT COUNT(*) FROM runs WHERE status = 'RUNNING'"):
        problems.append("an MLflow run left RUNNING")
    problems += [f"{db.name} locked" for db in (optuna_db, mlflow_db) if not unlocked(db)]
    return ", ".join(problems) or None, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=80)
    parser.add_argument("--spread", type=float, default=5.0, help="SIGTERM within this many seconds of the first epoch")
    parser.add_argument("--slow", type=float, default=10.0, help="an exit later than this fails the run")
    parser.add_argument("--timeout", type=float, default=150.0, help="then the worker is killed and counted as hung")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    failed, times = 0, []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            problem, seconds = one_run(Path(tmp), args, rng)
        failed += problem is not None
        times.append(seconds)
        print(f"run {i}: {problem or 'ok'}, exit after {seconds:.1f} s", flush=True)
    times.sort()
    print(f"{args.runs} SIGTERMs: {failed} failed; exit after median {times[len(times) // 2]:.1f} s, "
          f"max {times[-1]:.1f} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
