"""Trial packs: trials per hour and search quality, sequential (K = 1) vs packs, in one run.

    python benchmarks/pack_throughput.py                 # full: mlp and mixer, K = 1,4,16,64,auto, 3 seeds
    python benchmarks/pack_throughput.py --quick         # a minute or two: shows it works, numbers are not results
    python benchmarks/pack_throughput.py --sweeps mlp --packs 1,16 --trials 32 --epochs 3 --train-subset 20000

For each sweep (the default ``mlp`` and ``mixer`` sweep files), pack size and study seed it runs
a whole study in this process (Worker, fresh embedded stores, MLflow tracking and model export
included, as ``mnist-tune study --pack K``), on whatever device is present, and prints trials
per hour with its ratio to the sequential K = 1 baseline of the same run (also without the time
spent in MLflow calls, a fixed cost per trial that packs do not shrink), and the best
validation / test accuracy at the equal trial budget (mean ± std over the seeds). Then the
pruning question on this device: a pack of 16 of the sweep's first shape after half its members
were pruned, stepping all 16 with the dead ones masked vs compacted to 8 (compaction's own
cost included), and a refilled pack of 16 vs the compacted 8 (throughput per member-step).
Raw results go to --out/pack_throughput.json.
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


def subset(data, n: int | None):
    from mnist_tune.data import MNISTSplits

    if not n:
        return data
    return MNISTSplits(data.train_x[:n], data.train_y[:n], data.val_x, data.val_y, data.test_x, data.test_y,
                       data.lineage)


def run_study(sweep, pack, seed: int, trials: int, data, device, log) -> dict:
    from mnist_tune.packed_worker import resolve_pack
    from mnist_tune.tracking import Tracker
    from mnist_tune.worker import Worker, WorkerSettings

    with tempfile.TemporaryDirectory() as home:
        os.environ["MNIST_TUNE_HOME"] = home
        started = time.perf_counter()
        tracker = Tracker(f"sqlite:///{home}/mlflow.db")
        worker = Worker(sweep, WorkerSettings(trials=trials, storage=f"sqlite:///{home}/optuna.db", seed=seed,
                                              plots=False), tracker, data, device, log=lambda m: None)
        worker.pack = resolve_pack(pack, sweep, data, device, log, trials)
        worker.open()
        count = worker.run()
        worker.finish()
        wall = time.perf_counter() - started
        best = worker.study.best_trial
    return {"pack": pack, "resolved": worker.pack, "seed": seed, "trials": trials, "wall_s": wall,
            "trials_per_hour": count.finished / wall * 3600,
            # what the study would reach if tracking were free: MLflow's calls are a fixed cost per trial
            "untracked_per_hour": count.finished / (wall - tracker.seconds) * 3600, "best_val": best.value,
            "best_test": best.user_attrs["test_acc"], "complete": count.complete, "pruned": count.pruned,
            "failed": count.failed, "mlflow_s": tracker.seconds}


CLOCK = time.perf_counter  # --clock process: this process's CPU time (steadier on a busy CPU, with --threads 1)


def step_seconds(pack, steps, order, n: int) -> float:
    def sync():
        if pack.device.type == "cuda":
            torch.cuda.synchronize(pack.device)

    for s in range(2):
        steps(pack.batch(order, s % pack.steps_per_epoch), s)
    sync()
    started = CLOCK()
    for s in range(n):
        steps(pack.batch(order, s % pack.steps_per_epoch), s % (pack.epochs * pack.steps_per_epoch))
    sync()
    return (CLOCK() - started) / n


def pruning_costs(sweep, data, device, k: int = 16, n: int = 30) -> dict:
    """Masked (all K keep stepping) vs compacted (K/2, after compaction and, on CUDA, a new
    graph) vs refilled (K again, K/2 of them new): seconds per step and per member-step."""
    import optuna

    from mnist_tune.pack import Pack
    from mnist_tune.space import suggest
    from mnist_tune.train import TrainConfig
    from mnist_tune.tunables import split_hyperparameters

    point = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    model_hp, train_hp = split_hyperparameters({**suggest(point, sweep), "epochs": sweep.epochs, "seed": 0})
    hps = [TrainConfig(**{**train_hp, "seed": i}) for i in range(k)]
    pack = Pack(sweep.model, [model_hp] * k, hps, len(data.train_x), device)
    order = pack.epoch_order()
    full = step_seconds(pack, pack.steps(data.train_x, data.train_y), order, n)
    started = CLOCK()
    pack.keep_members(list(range(k // 2)))
    steps = pack.steps(data.train_x, data.train_y)
    compaction = CLOCK() - started
    half = step_seconds(pack, steps, order[:k // 2], n)
    started = CLOCK()
    pack.add_members([model_hp] * (k - k // 2), hps[k // 2:])
    steps = pack.steps(data.train_x, data.train_y)
    refill = CLOCK() - started
    refilled = step_seconds(pack, steps, pack.epoch_order(), n)
    return {"shape": {**model_hp, "batch_size": train_hp.get("batch_size")}, "k": k,
            "masked_step_s": full, "masked_member_step_s": full / (k // 2),
            "compacted_step_s": half, "compacted_member_step_s": half / (k // 2), "compaction_s": compaction,
            "compaction_pays_after_steps": compaction / (full - half) if full > half else None,
            "refilled_step_s": refilled, "refilled_member_step_s": refilled / k, "refill_s": refill}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", default="mlp,mixer", help="default sweep files, by model")
    parser.add_argument("--packs", default="1,4,16,64,auto", help="pack sizes; 1 is the sequential baseline")
    parser.add_argument("--seeds", default="0,1,2", help="study seeds (accuracy: mean ± std over them)")
    parser.add_argument("--trials", type=int, default=64, help="the budget of every study")
    parser.add_argument("--epochs", type=int, default=None, help="override the sweeps' epochs")
    parser.add_argument("--train-subset", type=int, default=None, help="train on the first N training images")
    parser.add_argument("--val-size", type=int, default=None, help="override the sweeps' validation size")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prune-pack", type=int, default=16, help="pack size of the pruning measurement")
    parser.add_argument("--prune-steps", type=int, default=30, help="steps timed per variant there")
    parser.add_argument("--pruning-only", action="store_true", help="only the pruning measurement, no studies")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="the pruning measurement's clock: process = this process's CPU time")
    parser.add_argument("--quick", action="store_true",
                        help="--packs 1,4 --seeds 0 --trials 8 --epochs 1 --train-subset 2000 --val-size 500 "
                             "--prune-pack 8 --prune-steps 5")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    if args.quick:
        args.packs, args.seeds, args.trials, args.epochs, args.train_subset, args.val_size = \
            "1,4", "0", 8, 1, 2000, 500
        args.prune_pack, args.prune_steps = 8, 5

    from mnist_tune.config import sweep_for
    from mnist_tune.data import load_mnist
    from mnist_tune.packed_worker import parse_pack
    from mnist_tune.train import resolve_device

    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    packs = [parse_pack(p) for p in args.packs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    print(describe(device))
    print(f"trials {args.trials}, epochs {args.epochs or 'sweep'}, train subset {args.train_subset or 'all'}, "
          f"val size {args.val_size or 'sweep'}, seeds {seeds}, packs {packs}", flush=True)
    results = {"device": str(device), "args": vars(args), "studies": [], "pruning": []}
    for model in args.sweeps.split(","):
        sweep = sweep_for(model, None).with_overrides(epochs=args.epochs, val_size=args.val_size)
        data = subset(load_mnist(args.data_dir, val_size=sweep.val_size, seed=sweep.seed), args.train_subset)
        data = data.to(device)
        rows = {}
        # seed by seed, every pack size in turn: the VM's drift hits all sizes alike
        studies = [] if args.pruning_only else [(s, p) for s in seeds for p in packs]
        if studies:  # untimed: the process's one-time costs (imports, the first export and store)
            run_study(sweep, 1, 0, 1, data, device, log=print)  # would go to whichever study ran first
        for seed, pack in studies:
            row = run_study(sweep, pack, seed, args.trials, data, device, log=print)
            row["sweep"] = sweep.name
            results["studies"].append(row)
            rows.setdefault(pack, []).append(row)
            print(f"{sweep.name} pack {pack} (K={row['resolved']}) seed {seed}: {row['wall_s']:.0f} s, "
                  f"{row['trials_per_hour']:.0f} trials/h, best val {row['best_val']:.4f} test "
                  f"{row['best_test']:.4f} ({row['complete']} complete, {row['pruned']} pruned, "
                  f"{row['failed']} failed; MLflow {row['mlflow_s']:.0f} s)", flush=True)
        if rows:
            print_table(sweep.name, args.trials, packs, rows)
        costs = pruning_costs(sweep, data, device, args.prune_pack, args.prune_steps)
        costs["sweep"] = sweep.name
        results["pruning"].append(costs)
        print_pruning(sweep.name, costs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pack_throughput.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"raw results: {out / 'pack_throughput.json'}")


def print_table(name: str, trials: int, packs: list, rows: dict) -> None:
    base = statistics.mean(r["trials_per_hour"] for r in rows[packs[0]])
    base_untracked = statistics.mean(r["untracked_per_hour"] for r in rows[packs[0]])
    print(f"\n{name}: {trials} trials per study, ratios against pack {packs[0]} of this run")
    print(f"{'pack':>6} {'K':>4} {'trials/h':>10} {'ratio':>6} {'w/o MLflow':>11} {'ratio':>6}  "
          f"{'best val':>17}  {'best test':>17}")
    for pack, runs in rows.items():
        tph = statistics.mean(r["trials_per_hour"] for r in runs)
        untracked = statistics.mean(r["untracked_per_hour"] for r in runs)
        print(f"{pack!s:>6} {runs[0]['resolved']:>4} {tph:>10.0f} {tph / base:>6.2f} {untracked:>11.0f} "
              f"{untracked / base_untracked:>6.2f}  {mean_std([r['best_val'] for r in runs]):>17}  "
              f"{mean_std([r['best_test'] for r in runs]):>17}")


def print_pruning(name: str, costs: dict) -> None:
    repaid = costs["compaction_pays_after_steps"]
    print(f"\n{name}: a pack of {costs['k']} ({costs['shape']}) after half its members were pruned:\n"
          f"  masked     {costs['masked_step_s'] * 1e3:8.2f} ms/step  "
          f"{costs['masked_member_step_s'] * 1e3:8.3f} ms per live member-step\n"
          f"  compacted  {costs['compacted_step_s'] * 1e3:8.2f} ms/step  "
          f"{costs['compacted_member_step_s'] * 1e3:8.3f} ms per live member-step  "
          f"(compaction {costs['compaction_s'] * 1e3:.1f} ms, repaid after "
          + (f"{repaid:.1f} steps)" if repaid is not None else "never: the compacted step was not faster)")
          + f"\n  refilled   {costs['refilled_step_s'] * 1e3:8.2f} ms/step  "
          f"{costs['refilled_member_step_s'] * 1e3:8.3f} ms per member-step  "
          f"(adding {costs['k'] - costs['k'] // 2} members {costs['refill_s'] * 1e3:.1f} ms)\n", flush=True)


if __name__ == "__main__":
    main()
