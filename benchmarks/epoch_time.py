"""Epoch time: the seed's pipeline vs mnist_tune.train, same model, same batch size, one process.

    python benchmarks/epoch_time.py                         # MLP, batch 100, CPU, 3 epochs each
    python benchmarks/epoch_time.py --epochs 5 --repeats 10   # ten pairs, median of the ratios
    python benchmarks/epoch_time.py --models mlp,mixer --batch-sizes 32,100,256 --device cuda
    python benchmarks/epoch_time.py --models mixer --mixer-dim 128 --mixer-depth 8 --device cuda \
        --variants default,nograph,amp,compile
    python benchmarks/epoch_time.py --models mixer --variants default,torchdropout   # the CPU dropout's gain

Seed epoch = one pass of torchvision MNIST + ToTensor + DataLoader + Adam (what the seed ran).
Ours = one ``fit`` epoch (data resident on the device, index batches, the MLP's hand-written
step, one fused AdamW call per step) *including* its validation pass, so the comparison is
conservative. Prints medians and the ratio. ``--threads`` sets torch's CPU threads for both.
``--repeats N`` measures the pair N times in a row (each time the seed's epochs, all timed, then
ours after an untimed first epoch) and then prints the median of the N ratios, and separately
the median absolute times: a shared VM's speed drifts, so one pair proves little.
``--variants`` times our loop with its default settings (``default``: on CUDA that is with the
CUDA graph) and/or with bf16 autocast (``amp``), ``torch.compile``, without the CUDA graph
(``nograph``), with torch's ``nn.Dropout`` instead of the model's CPU mask dropout
(``torchdropout``; not for the MLP, whose hand-written step draws its own masks), or ``+`` of
them. Also printed: the set-up before the first epoch (data to the device, CUDA graph capture)
and the first, untimed epoch's extra seconds over the median (where torch.compile compiles).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe  # noqa: E402
from seed_pipeline import seed_loaders, seed_model, seed_train_epoch  # noqa: E402

from mnist_tune.data import load_mnist, prefetch  # noqa: E402
from mnist_tune.models import build_model  # noqa: E402
from mnist_tune.train import TrainConfig, fit, resolve_device, seed_everything  # noqa: E402

MODEL_HP = {"mlp": {"dropout": 0.2}, "mixer": {"patch_size": 7, "dim": 64, "depth": 4, "dropout": 0.1}}


def seed_epochs(model_name: str, data_root: Path, batch_size: int, epochs: int, device) -> list[float]:
    seed_everything(0)
    model = seed_model(build_model(model_name, **MODEL_HP[model_name])).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_loader, _ = seed_loaders(str(data_root), batch_size)

    class OnDevice:  # the seed moved each batch to the device inside its loop
        def __iter__(self):
            for x, y in train_loader:
                yield x.to(device), y.to(device)

    return [seed_train_epoch(model, OnDevice(), optimizer) for _ in range(epochs)]


def our_epochs(model_name: str, splits, batch_size: int, epochs: int, device, variant: str = "default"):
    """-> (timed epoch seconds, first epoch seconds, set-up seconds); the first epoch warms up
    allocators and kernels (and compiles, with torch.compile)."""
    seed_everything(0)
    model = build_model(model_name, **MODEL_HP[model_name])
    flags = set(variant.split("+")) - {"default"}
    if "torchdropout" in flags:
        model = seed_model(model)
    hp = TrainConfig(batch_size=batch_size, epochs=epochs + 1, schedule="onecycle",
                     amp="amp" in flags, compile="compile" in flags, cuda_graph="nograph" not in flags)
    result = fit(model, splits, hp, device)
    return [m.epoch_seconds for m in result.history[1:]], result.history[0].epoch_seconds, result.setup_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp")
    parser.add_argument("--batch-sizes", default="100")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per pipeline")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: all cores]")
    parser.add_argument("--mixer-dim", type=int, default=MODEL_HP["mixer"]["dim"])
    parser.add_argument("--mixer-depth", type=int, default=MODEL_HP["mixer"]["depth"])
    parser.add_argument("--repeats", type=int, default=1, help="measure each seed/ours pair this many times")
    parser.add_argument("--variants", default="default",
                        help="our loop's settings: default, amp, compile, nograph (no CUDA graph), torchdropout "
                             "(nn.Dropout), or '+' of them, e.g. amp+nograph")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    MODEL_HP["mixer"].update(dim=args.mixer_dim, depth=args.mixer_depth)
    variants = args.variants.split(",")
    unknown = set("+".join(variants).split("+")) - {"default", "amp", "compile", "nograph", "torchdropout"}
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}; use default, amp, compile, nograph, torchdropout "
                     "or '+' of them")
    if "mlp" in args.models.split(",") and any("torchdropout" in v and "compile" not in v for v in variants):
        parser.error("torchdropout changes nothing for the mlp: its hand-written step draws its own masks "
                     "(combine it with compile, which trains the mlp through autograd in float32)")

    device = resolve_device(args.device)
    root = prefetch(args.data_dir, log=lambda m: print(m, file=sys.stderr)).parent.parent  # .../MNIST/raw -> root
    splits = load_mnist(args.data_dir)
    print(f"# {describe(device)}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}, device {device}, "
          f"{args.epochs} timed epochs each; mixer = {MODEL_HP['mixer']}")
    print(f"{'model':6} {'batch':>5} {'seed s/epoch':>12} {'variant':>12} {'ours s/epoch':>12} {'speed-up':>9} "
          f"{'1st epoch extra s':>17} {'set-up s':>8}")
    for model_name in args.models.split(","):
        for batch_size in map(int, args.batch_sizes.split(",")):
            seeds, ours = [], {variant: [] for variant in variants}
            for _ in range(args.repeats):
                seeds.append(statistics.median(seed_epochs(model_name, root, batch_size, args.epochs, device)))
                for variant in variants:
                    timed, first, setup = our_epochs(model_name, splits, batch_size, args.epochs, device, variant)
                    ours[variant].append(median := statistics.median(timed))
                    print(f"{model_name:6} {batch_size:>5} {seeds[-1]:>12.3f} {variant:>12} {median:>12.4f} "
                          f"{seeds[-1] / median:>8.1f}x {first - median:>17.2f} {setup:>8.2f}", flush=True)
            if args.repeats > 1:
                for variant in variants:
                    ratios = sorted(seed / our for seed, our in zip(seeds, ours[variant]))
                    print(f"# {model_name} batch {batch_size} {variant}, {args.repeats} repeats: median of the "
                          f"speed-ups {statistics.median(ratios):.1f}x (range {ratios[0]:.1f}-{ratios[-1]:.1f}x); "
                          f"median s/epoch: seed {statistics.median(seeds):.3f}, "
                          f"ours {statistics.median(ours[variant]):.4f}", flush=True)


if __name__ == "__main__":
    main()
