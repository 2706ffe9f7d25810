"""Accuracy of the seed configuration on real MNIST, per training path, over several seeds.

    python benchmarks/seed_accuracy.py                 # seeds 0-4, 10 epochs, both paths

The seed's configuration (MLP 784-100-80-10, batch 100, lr 1e-3, dropout 0.2) with the default
one-cycle schedule, trained by ``fit`` through the hand-written MLP step and through autograd
with torch's own ``nn.Dropout`` (``seed_model``: an independent draw of the masks, where the
model's Dropout would draw the hand-written step's). Both must land in the same accuracy
distribution (the core issue asks >= 97.8 % mean).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from seed_pipeline import seed_model  # noqa: E402

from mnist_tune.data import load_mnist  # noqa: E402
from mnist_tune.mlp_step import ExplicitMLPStep  # noqa: E402
from mnist_tune.models import build_model  # noqa: E402
from mnist_tune.train import TrainConfig, evaluate, fit, seed_everything  # noqa: E402


def train_and_test(splits, seed: int, epochs: int, torch_dropout: bool) -> tuple[float, float]:
    seed_everything(seed)
    model = build_model("mlp", dropout=0.2)
    if torch_dropout:
        model = seed_model(model)
    result = fit(model, splits, TrainConfig(batch_size=100, lr=1e-3, epochs=epochs, schedule="onecycle", seed=seed),
                 torch.device("cpu"))
    seconds = statistics.median(m.epoch_seconds for m in result.history)
    return evaluate(model, splits.test_x, splits.test_y)[1], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    splits = load_mnist()
    print(f"{'path':9} {'test accuracy per seed':48} {'mean':>7} {'std':>6} {'s/epoch':>8}")
    for path in ("explicit", "autograd"):
        if path == "autograd":  # route the MLP through the general autograd step
            ExplicitMLPStep.supports = staticmethod(lambda model: False)
        runs = [train_and_test(splits, seed, args.epochs, path == "autograd") for seed in range(args.seeds)]
        accs = [100 * a for a, _ in runs]
        print(f"{path:9} {' '.join(f'{a:.2f}' for a in accs):48} {statistics.mean(accs):7.2f} "
              f"{statistics.stdev(accs) if len(accs) > 1 else 0:6.2f} {statistics.median(s for _, s in runs):8.3f}",
              flush=True)


if __name__ == "__main__":
    main()
