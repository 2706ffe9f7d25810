"""torch.profiler over a few training steps of fit's CPU step: which ops take the time.

    python benchmarks/profile_step.py --model mixer                  # the models' own Dropout
    python benchmarks/profile_step.py --model mixer --torch-dropout  # with torch's nn.Dropout

Builds the step ``fit`` would build (the hand-written one for the MLP, autograd otherwise),
runs 5 warm-up steps and profiles ``--steps`` more at ``--batch-size`` on random uint8 images,
then prints the ops sorted by their own CPU time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from epoch_time import MODEL_HP  # noqa: E402  (the same model settings as the epoch times)
from machine import describe  # noqa: E402
from seed_pipeline import seed_model  # noqa: E402

from mnist_tune.models import build_model  # noqa: E402
from mnist_tune.optim import FlatAdamW  # noqa: E402
from mnist_tune.train import TrainConfig, _make_train_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODEL_HP), default="mixer")
    parser.add_argument("--torch-dropout", action="store_true", help="use nn.Dropout (what the seed ran)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=15, help="ops to print")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(args.model, **MODEL_HP[args.model]).train()
    if args.torch_dropout:
        model = seed_model(model)
    optimizer = FlatAdamW(model.parameters(), weight_decay=0.01)
    train_step = _make_train_step(model, TrainConfig(), optimizer)
    images = torch.randint(0, 256, (10 * args.batch_size, 28, 28), dtype=torch.uint8)
    inputs, targets = train_step.prepare(images, torch.randint(0, 10, (len(images),)))
    batch = torch.arange(args.batch_size)

    def step() -> None:
        train_step(inputs.index_select(0, batch), targets.index_select(0, batch))
        optimizer.step(1e-4)

    for _ in range(5):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    print(f"# {describe()}, {torch.get_num_threads()} threads, torch {torch.__version__}; {args.model} "
          f"{MODEL_HP[args.model]}, {'nn.Dropout' if args.torch_dropout else 'mnist_tune Dropout'}, "
          f"batch {args.batch_size}, {args.steps} profiled steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
