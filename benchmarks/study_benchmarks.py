"""Study throughput and accuracy: whole studies, run in this process on real MNIST, each into a
fresh embedded store, with the time split into training, MLflow calls and Optuna.

    python benchmarks/study_benchmarks.py                      # the set recorded in RESULTS.md
    python benchmarks/study_benchmarks.py --runs mlp:tpe:0:40  # sweep:sampler:seed:trials[:epochs]

For each run it prints wall time, trials/hour, best val/test accuracy, pruned count, and the
share of wall time spent in MLflow calls and in Optuna (sampler, pruner, storage). It writes
``results.json`` and ``best_val_vs_time.png`` (best validation accuracy against wall time,
TPE vs random at equal budget) into --out. Summaries are mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe  # noqa: E402

DEFAULT_RUNS = ["mlp:tpe:0:40", "mlp:random:0:40", "mlp:tpe:1:40", "mlp:random:1:40", "mlp:tpe:2:40", "mlp:random:2:40",
                "mlp-wide:tpe:0:20", "mixer:tpe:0:4:2"]  # ~25 min on a 2-core CPU


def run_one(spec: str, data_dir: str | None, device: str) -> dict:
    sweep_name, sampler, seed, trials, *epochs = spec.split(":")
    with tempfile.TemporaryDirectory() as home:
        os.environ["MNIST_TUNE_HOME"] = home  # a fresh embedded store per run
        from mnist_tune.config import SWEEPS_DIR, load_sweep
        from mnist_tune.data import load_mnist
        from mnist_tune.tracking import Tracker
        from mnist_tune.train import resolve_device
        from mnist_tune.worker import Worker, WorkerSettings

        sweep = load_sweep(SWEEPS_DIR / f"{sweep_name}.yaml")
        sampler_spec = {"name": sampler, "seed": sweep.sampler.get("seed", 0)}  # random takes a seed only
        sweep = sweep.with_overrides(sampler=sampler_spec if sampler != sweep.sampler["name"] else sweep.sampler,
                                     epochs=int(epochs[0]) if epochs else None)
        started = time.perf_counter()
        tracker = Tracker(f"sqlite:///{home}/mlflow.db")
        worker = Worker(sweep, WorkerSettings(trials=int(trials), storage=f"sqlite:///{home}/optuna.db",
                                              seed=int(seed)),
                        tracker, load_mnist(data_dir, val_size=sweep.val_size, seed=sweep.seed),
                        resolve_device(device), log=lambda m: None)
        worker.open()
        in_objective, mlflow_in_objective, trajectory = [0.0], [0.0], []
        objective = worker.objective

        def timed_objective(trial):
            t0, m0 = time.perf_counter(), tracker.seconds
            try:
                value = objective(trial)
                trajectory.append((time.perf_counter() - started, value))
                return value
            finally:
                in_objective[0] += time.perf_counter() - t0
                mlflow_in_objective[0] += tracker.seconds - m0

        worker.objective = timed_objective
        loop_started = time.perf_counter()
        count = worker.run()
        loop = time.perf_counter() - loop_started
        worker.finish()
        wall = time.perf_counter() - started
        best = worker.study.best_trial
    return {"spec": spec, "sweep": sweep_name, "sampler": sampler, "seed": int(seed), "trials": int(trials),
            "epochs": sweep.epochs, "wall_s": wall, "trials_per_hour": count.finished / wall * 3600,
            "best_val": best.value, "best_test": best.user_attrs["test_acc"], "best_trial": best.number,
            "complete": count.complete, "pruned": count.pruned, "failed": count.failed,
            "mlflow_share": tracker.seconds / wall,
            "mlflow_seconds_by_call": tracker.seconds_by_call,
            # time in study.optimize that was not the objective: sampler, pruner, storage
            "optuna_share": (loop - in_objective[0]) / wall,
            "training_share": (in_objective[0] - mlflow_in_objective[0]) / wall,
            "trajectory": [(t, max(v for _, v in trajectory[: i + 1])) for i, (t, _) in enumerate(trajectory)]}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0] * 100:.2f} %"
    return f"{statistics.mean(values) * 100:.2f} ± {statistics.stdev(values) * 100:.2f} %"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colours = {"tpe": "tab:blue", "random": "tab:orange"}
    for r in results:
        if r["sweep"] != "mlp" or r["sampler"] not in colours or not r["trajectory"]:
            continue
        times, best = zip(*r["trajectory"])
        ax.step(times, [b * 100 for b in best], where="post", color=colours[r["sampler"]],
                alpha=0.5 + 0.5 * (r["seed"] == 0), label=f"{r['sampler']} seed {r['seed']}")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("best validation accuracy (%)")
    ax.set_ylim(97.0, 98.6)
    ax.set_title("mlp sweep: TPE vs random search, equal budget")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="*", default=DEFAULT_RUNS, help="sweep:sampler:seed:trials[:epochs]")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"# {describe(torch.device(args.device))}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), device {args.device}, {time.strftime('%Y-%m-%d')}")
    print(f"{'run':22} {'wall s':>7} {'trials/h':>8} {'best val':>8} {'test':>7} {'pruned':>6} "
          f"{'mlflow':>6} {'optuna':>6} {'train':>6}")
    results = []
    for spec in args.runs:
        r = run_one(spec, args.data_dir, args.device)
        results.append(r)
        print(f"{spec:22} {r['wall_s']:7.0f} {r['trials_per_hour']:8.0f} {r['best_val'] * 100:7.2f}% "
              f"{r['best_test'] * 100:6.2f}% {r['pruned']:6d} {r['mlflow_share'] * 100:5.1f}% "
              f"{r['optuna_share'] * 100:5.1f}% {r['training_share'] * 100:5.1f}%", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    print("\nsummary (mean ± std over seeds):")
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["sweep"], r["sampler"], r["trials"]), []).append(r)
    for (sweep, sampler, trials), rs in groups.items():
        print(f"  {sweep:9} {sampler:7} {trials:3d} trials x{len(rs)}: "
              f"best test {mean_std([r['best_test'] for r in rs])}, best val {mean_std([r['best_val'] for r in rs])}, "
              f"wall {statistics.mean(r['wall_s'] for r in rs):.0f} s")
    plot(results, out / "best_val_vs_time.png")
    print(f"wrote {out / 'results.json'} and {out / 'best_val_vs_time.png'}")


if __name__ == "__main__":
    sys.exit(main())
