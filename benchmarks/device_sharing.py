"""Several small trials on one device: N worker processes train at once, as N `mnist-tune study`
workers with the same `--device` would (the way the README suggests sharing a GPU).

    python benchmarks/device_sharing.py --device cuda --workers 1,2,4,8 --epochs 5

Each worker process loads MNIST, builds the MLP and waits at a start line; all start together,
each trains ``--epochs`` epochs with ``fit`` (batch ``--batch-size``) and the wall time runs
until the last one finishes, so start-up (imports, CUDA context) is left out. Prints total
epochs per second for each N and its ratio to N = 1, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = r"""
import json, sys, time
from pathlib import Path
import torch
from mnist_tune.data import load_mnist
from mnist_tune.models import build_model
from mnist_tune.train import TrainConfig, fit, resolve_device, seed_everything

device, epochs, batch, threads, start_line, seed = sys.argv[1:7]
torch.set_num_threads(int(threads))
device = resolve_device(device)
splits = load_mnist()
seed_everything(int(seed))
warm = build_model("mlp", dropout=0.2)
fit(warm, splits, TrainConfig(batch_size=int(batch), epochs=1), device)  # kernels, allocator
model = build_model("mlp", dropout=0.2)
print("ready", flush=True)
while not Path(start_line).exists():
    time.sleep(0.001)
result = fit(model, splits, TrainConfig(batch_size=int(batch), epochs=int(epochs), seed=int(seed)), device)
print(json.dumps({"end": time.time(), "val_acc": result.history[-1].val_acc}), flush=True)
"""


def run(n: int, device: str, epochs: int, batch: int, threads: int) -> tuple[float, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        start_line = Path(tmp) / "go"
        procs = [subprocess.Popen([sys.executable, "-c", WORKER, device, str(epochs), str(batch), str(threads),
                                   str(start_line), str(i)], stdout=subprocess.PIPE, text=True)
                 for i in range(n)]
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise SystemExit(f"worker failed to start (exit {p.wait()})")
        started = time.time()
        start_line.touch()
        results = [json.loads(p.stdout.readline()) for p in procs]
        for p in procs:
            if p.wait() != 0:
                raise SystemExit("worker failed")
    return max(r["end"] for r in results) - started, [r["val_acc"] for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    args = parser.parse_args()

    print(f"# MLP, batch {args.batch_size}, {args.epochs} epochs per worker, device {args.device}, "
          f"{args.threads} CPU thread(s) per worker")
    print(f"{'workers':>7} {'wall s':>8} {'epochs/s':>9} {'vs 1 worker':>11} {'val acc':>15}")
    base = None
    for n in map(int, args.workers.split(",")):
        wall, accs = run(n, args.device, args.epochs, args.batch_size, args.threads)
        rate = n * args.epochs / wall
        base = base or rate
        print(f"{n:>7} {wall:>8.2f} {rate:>9.2f} {rate / base:>10.2f}x {min(accs):>6.4f}-{max(accs):.4f}",
              flush=True)


if __name__ == "__main__":
    main()
