"""Is the second core spare? One-thread MLP epochs (mnist_tune's fit, batch 100) timed with the
other core idle and with it busy, alternating, in one process: what tracking's helper process
costs training where it runs on "the spare core".

    python benchmarks/spare_core.py                 # 5 rounds: idle, a Python loop, torch.export
    python benchmarks/spare_core.py --rounds 3 --epochs 2

The load runs in a child process pinned to the other core (``os.sched_setaffinity``; training
is pinned to the first): ``python`` spins a pure-Python loop (no memory traffic), ``export``
exports and saves the seed MLP over and over, as the helper does for each trial's model.
Prints each round's median epoch and the ratio busy / idle of the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe  # noqa: E402

from mnist_tune.data import default_data_dir, load_mnist  # noqa: E402
from mnist_tune.models import build_model  # noqa: E402
from mnist_tune.train import TrainConfig, fit, seed_everything  # noqa: E402

LOADS = {
    "python": "while True: pass",
    "export": """
import torch
from mnist_tune.models import build_model
torch.set_num_threads(1)
example = (torch.rand(2, 1, 28, 28),)
while True:  # killed, so it saves into its working folder, which the parent removes
    program = torch.export.export(build_model("mlp", dropout=0.2).eval(), example,
                                  dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(program, "m.pt2")
""",
}


def epochs(splits, n: int) -> list[float]:
    seed_everything(0)
    hp = TrainConfig(batch_size=100, epochs=n + 1)
    result = fit(build_model("mlp", dropout=0.2), splits, hp, torch.device("cpu"))
    return [m.epoch_seconds for m in result.history[1:]]  # the first warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--loads", default="python,export")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        sys.exit("needs two cores")
    torch.set_num_threads(1)
    os.sched_setaffinity(0, {cores[0]})
    splits = load_mnist(default_data_dir(), val_size=5000, seed=0)
    print(f"# spare core: seed MLP, batch 100, 1 torch thread on core {cores[0]}, load on core {cores[1]}; "
          f"{describe()}")
    loads = args.loads.split(",")
    medians: dict[str, list[float]] = {name: [] for name in ["idle", *loads]}
    with tempfile.TemporaryDirectory() as scratch:
        for r in range(args.rounds):
            for name in ["idle", *loads]:
                child = None
                if name != "idle":
                    code = f"import os; os.sched_setaffinity(0, {{{cores[1]}}})\n" + LOADS[name]
                    child = subprocess.Popen([sys.executable, "-c", code], cwd=scratch)
                try:
                    if child is not None:
                        time.sleep(8)  # let it import and settle
                    seconds = statistics.median(epochs(splits, args.epochs))
                finally:
                    if child is not None:
                        child.kill()
                        child.wait()
                medians[name].append(seconds)
                print(f"round {r} {name:7s} {seconds:.3f} s per epoch", flush=True)
    idle = statistics.median(medians["idle"])
    for name in loads:
        busy = statistics.median(medians[name])
        print(f"{name}: median {busy:.3f} s vs idle {idle:.3f} s -> {busy / idle:.3f}x")


if __name__ == "__main__":
    main()
