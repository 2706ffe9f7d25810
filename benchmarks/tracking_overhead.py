"""What tracking costs a study: the same study (same sweep, seed and trials) run with MLflow
tracking on and with tracking replaced by a no-op (tracking.NullTracker: no runs, models,
plots or report), back to back, each in a fresh process and a fresh store; then the tracked
store is checked for anything lost, and a third tracked study is stopped with SIGTERM and
checked the same way.

    python benchmarks/tracking_overhead.py                    # default mlp sweep, 40 trials
    python benchmarks/tracking_overhead.py --trials 6 --epochs 2 --repeats 1   # a quick look
    python benchmarks/tracking_overhead.py --modes tracked,sync,null  # also: MLflow on the training thread
    python benchmarks/tracking_overhead.py --threads 1 --repeats 2    # a core spare: exports in the helper

Prints each wall time (the process's, as a user sees `mnist-tune study`), where it went
(before the first trial, in trials, after the last), the ratio tracked / no-op, and the
checks. With --repeats N the order alternates (ratios of the sums and of the medians). Each
study's temporary store is removed once checked.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe  # noqa: E402


def child(mode: str, home: str, model: str, trials: int, epochs: int | None, seed: int,
          threads: int | None = None) -> None:
    """One study in this process: ``tracked`` exactly as `mnist-tune study` runs it; ``sync``
    the same with every MLflow call on the training thread (as before the background writer);
    ``null`` with no tracking."""
    from mnist_tune.config import sweep_for
    from mnist_tune.study import WorkerSettings
    from mnist_tune.tracking import NullTracker, Tracker
    from mnist_tune.worker import run_study

    sweep = sweep_for(model, None).with_overrides(epochs=epochs)
    settings = WorkerSettings(trials=trials, storage=f"sqlite:///{home}/optuna.db", seed=seed,
                              plots=mode != "null")
    tracker = None
    if mode == "null":
        tracker = NullTracker()
    elif mode == "sync":
        tracker = Tracker(f"sqlite:///{home}/mlflow.db")
        tracker.background.start = lambda log=None, helper=True: None  # stays synchronous
    try:
        lines = run_study(sweep, settings, f"sqlite:///{home}/mlflow.db", None, "cpu", threads=threads,
                          log=lambda m: None, tracker=tracker)
    except KeyboardInterrupt as e:  # SIGTERM: the CLI's exit code (128 + signal)
        sys.exit(getattr(e, "exit_code", 130))
    print("\n".join(lines))


def start(mode: str, home: str, args) -> subprocess.Popen:
    command = [sys.executable, __file__, "--child", mode, "--home", home, "--model", args.model,
               "--trials", str(args.trials), "--seed", str(args.seed)] + \
              (["--epochs", str(args.epochs)] if args.epochs else []) + \
              (["--threads", str(args.threads)] if args.threads else [])
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def timed(mode: str, args) -> tuple[float, str, str, str]:
    """Wall time, store folder, output and phases of one study in a fresh process."""
    home = tempfile.mkdtemp(prefix=f"tracking-{mode}-")
    started, started_at = time.perf_counter(), time.time()
    proc = start(mode, home, args)
    out = proc.communicate()[0]
    wall = time.perf_counter() - started
    if proc.returncode:
        sys.exit(f"{mode} study failed ({proc.returncode}):\n{out}")
    return wall, home, out, phases(home, args.study_name, started_at, started_at + wall)


def phases(home: str, study_name: str, started_at: float, ended_at: float) -> str:
    """Where the wall time went, from Optuna's trial timestamps: before the first trial (imports,
    data, stores), inside trials, and after the last one (the end of the study: plots, report)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = optuna.load_study(study_name=study_name, storage=f"sqlite:///{home}/optuna.db").trials
    first = min(t.datetime_start.timestamp() for t in trials)
    last = max(t.datetime_complete.timestamp() for t in trials)
    inside = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials)
    return (f"before the first trial {first - started_at:.1f} s, in trials {inside:.1f} s, "
            f"after the last {ended_at - last:.1f} s")


def check_nothing_lost(home: str, study_name: str, stopped: bool = False) -> list[str]:
    """Every trial's run has its params, per-epoch metrics, final status, and (if COMPLETE) its
    model, READY; returns the problems found."""
    import optuna
    from mlflow.tracking import MlflowClient

    from mnist_tune import record

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{home}/optuna.db")
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    problems = []
    status_of = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": ("FAILED", "KILLED")}
    for t in study.trials:
        if t.user_attrs.get("budget_surplus"):
            continue
        run = client.get_run(t.user_attrs[record.RUN_ATTR])
        where = f"trial {t.number} ({t.state.name}, run {run.info.status})"
        if run.info.status not in status_of.get(t.state.name, ()):
            problems.append(f"{where}: status")
        if any(run.data.params.get(k) != str(v) for k, v in t.params.items()):
            problems.append(f"{where}: params")
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
        if sorted(steps) != sorted(t.intermediate_values):
            problems.append(f"{where}: val_acc steps {steps} vs {sorted(t.intermediate_values)}")
        if t.state.name == "COMPLETE":
            model_id = t.user_attrs[record.MODEL_URI_ATTR].split("/")[-1]
            if client.get_logged_model(model_id).status.name != "READY" or "test_acc" not in run.data.metrics:
                problems.append(f"{where}: model or test_acc")
    parent = client.get_run(study.user_attrs[record.PARENT_ATTR])
    if parent.info.status != ("KILLED" if stopped else "FINISHED"):
        problems.append(f"parent run {parent.info.status}")
    return problems


def sigterm_check(args) -> str:
    """A tracked study stopped by SIGTERM once a few trials are done: nothing queued is lost."""
    import optuna

    home = tempfile.mkdtemp(prefix="tracking-sigterm-")
    proc = start("tracked", home, args)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        try:
            study = optuna.load_study(study_name=args.study_name, storage=f"sqlite:///{home}/optuna.db")
            if sum(t.state.is_finished() for t in study.trials) >= 3 and study.trials[-1].intermediate_values:
                break
        except Exception:  # not created yet
            pass
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    proc.communicate()
    problems = check_nothing_lost(home, args.study_name, stopped=True)
    shutil.rmtree(home, ignore_errors=True)
    return (f"SIGTERM after {len(study.trials)} trials: exit {proc.returncode} in {time.monotonic() - sent:.1f} s; "
            + ("nothing lost" if not problems else "LOST: " + "; ".join(problems)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=None, help="override the sweep's epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of each study; fewer than the cores leaves one for the helper process")
    parser.add_argument("--no-sigterm", action="store_true", help="skip the SIGTERM check")
    parser.add_argument("--modes", default="tracked,null", help="which to run, in order: tracked, sync, null")
    parser.add_argument("--child", choices=["tracked", "sync", "null"], help=argparse.SUPPRESS)
    parser.add_argument("--home", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.home, args.model, args.trials, args.epochs, args.seed, args.threads)

    from mnist_tune.config import sweep_for

    args.study_name = sweep_for(args.model, None).name
    print(f"# tracking overhead: {args.model} sweep, {args.trials} trials, seed {args.seed}, "
          f"epochs {args.epochs or 'the sweep'}s, torch threads {args.threads or 'default'}; "
          f"{describe()}, {os.cpu_count()} cores", flush=True)
    modes = args.modes.split(",")
    walls = {mode: [] for mode in modes}
    for repeat in range(args.repeats):
        for mode in modes if repeat % 2 == 0 else modes[::-1]:
            wall, home, out, where = timed(mode, args)
            walls[mode].append(wall)
            summary = [line for line in out.splitlines() if line.startswith(("study ", "tracking"))]
            print(f"{mode:8s} {wall:7.1f} s   " + " | ".join(summary), flush=True)
            print(f"         {where}")
            if mode != "null":
                problems = check_nothing_lost(home, args.study_name)
                print("         check: " + ("nothing lost" if not problems else "LOST: " + "; ".join(problems)))
            shutil.rmtree(home, ignore_errors=True)
    for mode in modes:
        if mode != "null" and "null" in walls:
            print(f"ratio {mode} / no-op: {sum(walls[mode]) / sum(walls['null']):.3f} (sums), "
                  f"{statistics.median(walls[mode]) / statistics.median(walls['null']):.3f} (medians)")
    if not args.no_sigterm:
        print(sigterm_check(args), flush=True)


if __name__ == "__main__":
    main()
