"""Where an MLP training step's time goes on this machine (CPU), measured by taking parts away.

    python benchmarks/step_breakdown.py                 # batch 100, dropout 0.2, all cores
    python benchmarks/step_breakdown.py --threads 1 --rounds 12

Each round runs one epoch (550 steps at batch 100, no validation) of each loop below, in
alternating order, on real MNIST; the medians over rounds are printed per step:

    full           fit's step: gather, hand-written forward/backward (mlp_step.py), fused AdamW
    no AdamW       the same without the optimizer call  -> AdamW's cost inside the loop
    no dropout     the same model with dropout 0         -> the dropout masks' cost
    matmuls only   the step's eight matmuls on its shapes, nothing else

and, outside the loop, the fused AdamW call repeated on its own (its buffers stay in cache).
The difference between AdamW in the loop and alone is what reloading its four buffers costs
once the rest of the step has run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe  # noqa: E402

from mnist_tune.data import load_mnist  # noqa: E402
from mnist_tune.models import build_model  # noqa: E402
from mnist_tune.optim import FlatAdamW, schedule_table  # noqa: E402
from mnist_tune.steps import EagerSteps  # noqa: E402
from mnist_tune.train import TrainConfig, _make_train_step  # noqa: E402


def training_loop(splits, batch_size: int, dropout: float, with_optimizer: bool):
    """One epoch's worth of fit's steps as a callable (same objects fit builds)."""
    torch.manual_seed(0)
    model = build_model("mlp", dropout=dropout).train()
    optimizer = FlatAdamW(model.parameters(), weight_decay=0.01)
    train_step = _make_train_step(model, TrainConfig(), optimizer)
    inputs, targets = train_step.prepare(splits.train_x, splits.train_y)
    steps_per_epoch = -(-len(inputs) // batch_size)
    lrs, beta1s = schedule_table("constant", 1e-4, steps_per_epoch)
    loss_sum = torch.zeros(())
    steps = EagerSteps(train_step, optimizer, inputs, targets, lrs, beta1s, loss_sum)
    shuffle = torch.Generator().manual_seed(0)

    def epoch() -> int:
        order = torch.randperm(len(inputs), generator=shuffle)
        for step, batch in enumerate(order.split(batch_size)):
            if with_optimizer:
                steps(batch, step)
            else:
                steps._train_on(batch)
        loss_sum.item()
        return steps_per_epoch
    return epoch


def matmuls_only(batch_size: int, n: int):
    """The step's matmuls with its shapes: 3 forward, 3 weight gradients, 2 input gradients."""
    linears = [m for m in build_model("mlp") if isinstance(m, torch.nn.Linear)]
    sizes = [linears[0].in_features] + [linear.out_features for linear in linears]  # 784, 100, 80, 10
    acts = [torch.randn(batch_size, s) for s in sizes]
    weights = [torch.randn(o, i) for i, o in zip(sizes, sizes[1:])]
    grads = [torch.empty(o, i) for i, o in zip(sizes, sizes[1:])]

    def epoch() -> int:
        for _ in range(n):
            for layer, w in enumerate(weights):
                torch.mm(acts[layer], w.t(), out=acts[layer + 1])
            for layer in range(len(weights) - 1, -1, -1):
                grads[layer].addmm_(acts[layer + 1].t(), acts[layer], beta=0)
                if layer > 0:
                    torch.mm(acts[layer + 1], weights[layer], out=acts[layer])
        return n
    return epoch


def adamw_alone(n: int):
    optimizer = FlatAdamW(build_model("mlp").parameters(), weight_decay=0.01)
    optimizer.grad.normal_()

    def epoch() -> int:
        for _ in range(n):
            optimizer.step(1e-4)
        return n
    return epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: all cores]")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    splits = load_mnist(args.data_dir)
    n = -(-len(splits.train_x) // args.batch_size)
    loops = {
        "full": training_loop(splits, args.batch_size, args.dropout, with_optimizer=True),
        "no AdamW": training_loop(splits, args.batch_size, args.dropout, with_optimizer=False),
        "no dropout": training_loop(splits, args.batch_size, 0.0, with_optimizer=True),
        "matmuls only": matmuls_only(args.batch_size, n),
        "AdamW alone": adamw_alone(n),
    }
    per_step = {name: [] for name in loops}
    for round_ in range(args.rounds + 1):  # round 0 warms up and is not counted
        for name in (list(loops) if round_ % 2 else list(loops)[::-1]):
            started = time.perf_counter()
            steps = loops[name]()
            if round_:
                per_step[name].append((time.perf_counter() - started) / steps * 1e6)
    us = {name: statistics.median(times) for name, times in per_step.items()}
    print(f"# {describe()}, {torch.get_num_threads()} threads, torch {torch.__version__}; MLP batch "
          f"{args.batch_size}, dropout {args.dropout}; median of {args.rounds} rounds, microseconds per step")
    for name, value in us.items():
        print(f"{name:>14} {value:8.1f}")
    print(f"# AdamW in the loop {us['full'] - us['no AdamW']:.1f} (alone {us['AdamW alone']:.1f}); "
          f"dropout masks {us['full'] - us['no dropout']:.1f}; matmuls {us['matmuls only']:.1f}; "
          f"everything else {us['no dropout'] - us['matmuls only'] - (us['full'] - us['no AdamW']):.1f}")


if __name__ == "__main__":
    main()
