"""How long the read-only commands and argument errors take, this release against the one
before the orchestration redesign (4334aea, unpacked from git history), in one run.

    python benchmarks/cli_latency.py --repeats 5

Both releases read the same 40-trial study (made with Optuna's ask/tell in the layout the
CLI writes: no training). Each command runs --repeats times in a fresh process, alternating
releases; the table shows median wall seconds and the ratio old/new. Goal: <= 1.5 s each.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from machine import describe  # noqa: E402

PREVIOUS_RELEASE = "4334aea"
COMMANDS = {
    "--help": ["--help"],
    "best": ["best", "--study", "mlp-default"],
    "status": ["status", "--study", "mlp-default"],
    "runs": ["runs", "--study", "mlp-default"],
    "best (unknown study)": ["best", "--study", "nope"],
    "study --model cnn": ["study", "--model", "cnn"],
    "train --model cnn": ["train", "--model", "cnn"],
    "study --bad-option": ["study", "--model", "mlp", "--trials", "x"],
}


def make_study(home: Path) -> None:
    """A finished 40-trial mlp-default study as the CLI leaves it (Optuna side only)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(storage=f"sqlite:///{home}/optuna.db", study_name="mlp-default", direction="maximize")
    study.set_user_attr("sweep", {"metric": "val_acc", "fixed": {"hidden_sizes": [100, 80]}})
    study.set_user_attr("budget", 40)
    for number in range(40):
        trial = study.ask()
        for epoch in range(1, 11):
            trial.report(0.9 + number / 1000 + epoch / 10000, epoch)
        trial.suggest_categorical("batch_size", [64, 100, 128, 256])
        trial.suggest_float("lr", 3e-4, 1e-2, log=True)
        trial.suggest_float("dropout", 0.0, 0.4)
        trial.set_user_attr("mlflow_run_id", f"{number:032x}")
        trial.set_user_attr("test_acc", 0.97 + number / 10000)
        study.tell(trial, 0.9 + number / 1000)


def previous_release(folder: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", PREVIOUS_RELEASE, "mnist_tune", "sweeps"],
                             capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def timed(args: list[str], env: dict, cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mnist_tune", *args], env=env, cwd=cwd, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "mlruns").mkdir()
        make_study(tmp / "mlruns")
        base = {**os.environ, "MNIST_TUNE_HOME": str(tmp / "mlruns")}
        releases = {"previous": {**base, "PYTHONPATH": str(previous_release(tmp / "previous"))},
                    "this": {k: v for k, v in base.items() if k != "PYTHONPATH"}}
        print(f"# cli_latency on {describe()}, {os.cpu_count()} cores, median of {args.repeats} fresh processes")
        print(f"{'command':24} {'previous s':>10} {'this s':>8} {'ratio':>6}")
        for name, command in COMMANDS.items():
            seconds = {release: [] for release in releases}
            for _ in range(args.repeats):
                for release, env in releases.items():
                    seconds[release].append(timed(command, env, tmp))
            old, new = (statistics.median(seconds[r]) for r in releases)
            print(f"{name:24} {old:10.2f} {new:8.2f} {old / new:6.1f}x")


if __name__ == "__main__":
    main()
