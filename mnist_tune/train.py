"""One training run: ``fit(model, data, hp, device, on_epoch)``. No Optuna, no MLflow.

The data set lives on the device as uint8 and is iterated by a shuffled index (no DataLoader,
no per-sample transforms): each step is one gather, one uint8->float conversion, the model's
forward and backward (by hand for the MLP, mlp_step.py; autograd otherwise) and one AdamW
update over all parameters at once (optim.py: torch's fused kernel, or with the CUDA graph the
same update in plain ops, because there the whole step is replayed as one graph, steps.py).
The loss is summed on the device and read back once per epoch, so a GPU never syncs per step.

    hp = TrainConfig(batch_size=100, lr=1e-3, epochs=10)
    result = fit(build_model("mlp", dropout=0.2), load_mnist(), hp, resolve_device("cpu"))
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mnist_tune.data import MNISTSplits
from mnist_tune.errors import MnistTuneError
from mnist_tune.images import augmentation, model_image_size, resize
from mnist_tune.mlp_step import ExplicitMLPStep
from mnist_tune.models import as_input, eval_mode
from mnist_tune.optim import FlatAdamW, schedule_table
from mnist_tune.steps import EagerSteps, GraphedSteps
from mnist_tune.stop import raise_if_requested
from mnist_tune.tunables import SCHEDULES, TRAIN_SETTINGS, TUNABLES

EVAL_BATCH = 5000  # large batches: evaluation is a handful of matmuls, not hundreds of steps


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one run (model shape settings go to build_model); its fields
    are the training tunables of tunables.TUNABLES, which also say what values they may take."""

    batch_size: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "constant"  # the seed used a fixed lr and concluded a variable one would help
    epochs: int = 10
    seed: int = 0
    shift: int = 0  # augmentation of the training batches (images.py); all 0: none
    rotate: float = 0.0
    scale: float = 0.0
    amp: bool = False  # bf16 autocast: for CUDA (and CPUs with bf16 units); off by default
    compile: bool = False  # torch.compile the model: pays off for long runs on GPUs (compiling takes a while)
    cuda_graph: bool = True  # on CUDA, replay each step as one recorded graph (steps.py); not with compile

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise MnistTuneError(f"unknown lr schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        problems = [f"{name}: {problem}" for name in TRAIN_SETTINGS
                    if (problem := TUNABLES[name].problem(getattr(self, name)))]
        if problems:
            raise MnistTuneError(f"invalid training settings {asdict(self)} ({'; '.join(problems)})")


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    val_loss: float
    val_acc: float
    epoch_seconds: float

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if k != "epoch"}


@dataclass
class FitResult:
    status: str  # "completed" or "diverged" (NaN/inf loss)
    history: list[EpochMetrics] = field(default_factory=list)
    message: str = ""
    setup_seconds: float = 0.0  # before the first epoch: data to the device, step set-up, CUDA graph capture


def resolve_device(name: str = "auto") -> torch.device:
    """``auto|cpu|cuda|cuda:N|mps`` -> a torch.device that exists here, else a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MnistTuneError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise MnistTuneError(f"device {name!r} is not available here ({count} CUDA device(s) found)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise MnistTuneError("device 'mps' is not available here (no Apple Metal GPU)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise MnistTuneError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def seed_everything(seed: int) -> None:
    """Seed torch's global RNG (weight init, dropout); shuffling has its own generator."""
    torch.manual_seed(seed)


@torch.inference_mode()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a split, in large batches."""
    was_training = eval_mode(model)
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.long)
    for start in range(0, len(images), EVAL_BATCH):
        logits = model(as_input(images[start:start + EVAL_BATCH]))
        target = labels[start:start + EVAL_BATCH]
        loss_sum += F.cross_entropy(logits, target, reduction="sum")
        correct += (logits.argmax(1) == target).sum()
    if was_training:
        model.train()
    n = len(images)
    return loss_sum.item() / n, correct.item() / n


class AutogradStep:
    """``step(rows, labels) -> summed batch loss``; the mean loss's gradients go to ``optimizer.grad``.

    The general path: any model, optional bf16 autocast and torch.compile. The training
    images stay uint8 on the device and each batch is converted as it is gathered.
    """

    def __init__(self, model: nn.Module, hp: TrainConfig, optimizer: FlatAdamW):
        self.forward = torch.compile(model) if hp.compile else model
        self.optimizer = optimizer
        device_type = next(model.parameters()).device.type
        # no weight-cast cache: it is not allowed inside a CUDA graph, and each weight is cast once per step anyway
        self.autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=hp.amp, cache_enabled=False)

    def prepare(self, images_u8: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images_u8, labels

    def __call__(self, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad()
        with self.autocast:
            logits = self.forward(as_input(rows))
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        return loss.detach() * len(rows)


def _make_train_step(model: nn.Module, hp: TrainConfig, optimizer: FlatAdamW):
    # The plain MLP gets its hand-written step (mlp_step.py: same maths, far less per-step
    # overhead); other models, and runs asking for autocast or torch.compile, use autograd.
    if ExplicitMLPStep.supports(model) and not hp.amp and not hp.compile:
        return ExplicitMLPStep(model)
    return AutogradStep(model, hp, optimizer)


def fit(model: nn.Module, data: MNISTSplits, hp: TrainConfig, device: torch.device,
        on_epoch: Callable[[int, EpochMetrics], None] | None = None) -> FitResult:
    """Train ``model`` in place on ``data.train_*``, validating on ``data.val_*`` each epoch.

    ``on_epoch(epoch, metrics)`` runs after every epoch (epochs count from 1); it may raise to
    stop the run (the study raises optuna.TrialPruned there). A NaN/inf loss ends the run with
    status "diverged" instead of training on garbage.
    """
    set_up = time.perf_counter()
    model.to(device).train()
    size = model_image_size(model)  # resized once here, so the model's own Resize passes them through
    train_x, train_y = resize(data.train_x.to(device), size), data.train_y.to(device)
    val_x, val_y = resize(data.val_x.to(device), size), data.val_y.to(device)
    n = len(train_x)
    steps = math.ceil(n / hp.batch_size)
    # AdamW: the seed's Adam with decoupled weight decay; lr (and beta1) follow a precomputed table.
    optimizer = FlatAdamW(model.parameters(), hp.weight_decay)
    # CUDA streams and graphs belong to the current device: make it the data's (cuda:N included)
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    try:
        with on_device:
            lrs, beta1s = schedule_table(hp.schedule, hp.lr, hp.epochs * steps)
            train_step = _make_train_step(model, hp, optimizer)
            train_inputs, train_targets = train_step.prepare(train_x, train_y)  # what batches are gathered from
            loss_sum = torch.zeros((), device=device)  # one buffer: a CUDA graph adds into it
            augment = augmentation(hp)  # None: the batches as gathered
            if device.type == "cuda" and hp.cuda_graph and not hp.compile:
                run_step = GraphedSteps(train_step, optimizer, train_inputs, train_targets, lrs, beta1s, loss_sum,
                                        hp.batch_size, augment=augment)
            else:
                run_step = EagerSteps(train_step, optimizer, train_inputs, train_targets, lrs, beta1s, loss_sum,
                                      augment=augment)
            shuffle = torch.Generator(device=device).manual_seed(hp.seed)
            result = FitResult(status="completed", setup_seconds=time.perf_counter() - set_up)
            step = 0
            for epoch in range(1, hp.epochs + 1):
                started = time.perf_counter()
                order = torch.randperm(n, device=device, generator=shuffle)
                loss_sum.zero_()
                for batch in order.split(hp.batch_size):
                    raise_if_requested()  # Ctrl-C/SIGTERM stop training here, never mid-write (stop.py)
                    run_step(batch, step)
                    step += 1
                train_loss = loss_sum.item() / n  # the one host sync of the epoch
                if not math.isfinite(train_loss):
                    result.status, result.message = "diverged", f"training loss became {train_loss} in epoch {epoch}"
                    break
                val_loss, val_acc = evaluate(model, val_x, val_y)
                metrics = EpochMetrics(epoch, train_loss, val_loss, val_acc, time.perf_counter() - started)
                result.history.append(metrics)
                if on_epoch is not None:
                    on_epoch(epoch, metrics)
    finally:
        optimizer.release()  # the parameters get their own storage back (for saving, reuse)
    return result
