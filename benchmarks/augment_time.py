"""Epoch time with on-device augmentation vs without, same model, same batch size, one process.

    python benchmarks/augment_time.py                              # MLP, batch 100, CPU
    python benchmarks/augment_time.py --device cuda --models mlp,mixer
    python benchmarks/augment_time.py --variants none,shift=2,shift=2+rotate=10+scale=0.1 --repeats 5

Each variant is one ``fit`` (an untimed first epoch, then ``--epochs`` timed ones, validation
included) with the augmentation settings given as ``name=value`` joined by ``+``; the variants
take turns ``--repeats`` times, so a shared machine's drift hits them alike. Prints each
run's median epoch and, per variant, the median of its ratios to the ``none`` run of the same
round (the issue 14 goal: at most 1.5x).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe  # noqa: E402

from mnist_tune.data import load_mnist  # noqa: E402
from mnist_tune.models import build_model  # noqa: E402
from mnist_tune.train import TrainConfig, fit, resolve_device, seed_everything  # noqa: E402

MODEL_HP = {"mlp": {"dropout": 0.2}, "mixer": {"patch_size": 7, "dim": 64, "depth": 4, "dropout": 0.1}}


def settings(variant: str) -> dict:
    """``"shift=2+rotate=10"`` -> {"shift": 2, "rotate": 10.0}; ``"none"`` -> {}."""
    if variant == "none":
        return {}
    pairs = dict(part.split("=") for part in variant.split("+"))
    return {k: (int(v) if k == "shift" else float(v)) for k, v in pairs.items()}


def epoch_seconds(model_name: str, splits, batch_size: int, epochs: int, device, variant: str) -> float:
    seed_everything(0)
    hp = TrainConfig(batch_size=batch_size, epochs=epochs + 1, schedule="onecycle", **settings(variant))
    result = fit(build_model(model_name, **MODEL_HP[model_name]), splits, hp, device)
    return statistics.median(m.epoch_seconds for m in result.history[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: all cores]")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--variants", default="none,shift=2,shift=2+rotate=10+scale=0.1")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    if variants[0] != "none":
        parser.error("the first variant must be none (the ratios' base)")
    device = resolve_device(args.device)
    splits = load_mnist(args.data_dir)
    print(f"# {describe(device)}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}, device {device}, "
          f"batch {args.batch_size}, {args.epochs} timed epochs per run, {args.repeats} rounds")
    for model_name in args.models.split(","):
        ratios: dict[str, list[float]] = {v: [] for v in variants[1:]}
        for round_ in range(1, args.repeats + 1):
            base = None
            for variant in variants:
                seconds = epoch_seconds(model_name, splits, args.batch_size, args.epochs, device, variant)
                base = seconds if base is None else base
                if variant != "none":
                    ratios[variant].append(seconds / base)
                print(f"{model_name:6} round {round_} {variant:>28} {seconds:8.4f} s/epoch {seconds / base:6.2f}x",
                      flush=True)
        for variant, values in ratios.items():
            print(f"# {model_name} {variant}: median ratio to none {statistics.median(values):.2f}x "
                  f"(range {min(values):.2f}-{max(values):.2f}x)", flush=True)


if __name__ == "__main__":
    main()
