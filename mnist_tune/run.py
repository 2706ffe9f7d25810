"""One tracked training run: build, fit, log every epoch, test, log the model.

Shared by ``mnist-tune train`` (a lone run, ``train_run``) and the study's objective (a
trial's child run), so both record the same params and metric names. ``record.run_lifecycle``
ends the run; only the caller knows whether it was pruned.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from mnist_tune import record, stop
from mnist_tune.data import MNISTSplits
from mnist_tune.errors import MnistTuneError
from mnist_tune.images import augmentation_text
from mnist_tune.models import as_input, build_model
from mnist_tune.progress import bar
from mnist_tune.tracking import Tracker
from mnist_tune.train import EpochMetrics, TrainConfig, evaluate, fit, seed_everything


class Diverged(Exception):
    """The loss became NaN/inf; the run is recorded as FAILED."""


@dataclass
class RunOutcome:
    test_acc: float | None = None
    model_uri: str | None = None
    history: list[EpochMetrics] = field(default_factory=list)


def model_params(model_name: str, model_hp: dict) -> dict:
    """Model hyperparameters as MLflow params; tuples (hidden sizes) as readable text."""
    params = {"model": model_name}
    for key, value in model_hp.items():
        params[key] = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
    return params


def train_and_log(tracker: Tracker, run_id: str, model_name: str, model_hp: dict, hp: TrainConfig,
                  data: MNISTSplits, device: torch.device,
                  on_epoch: Callable[[int, EpochMetrics], None] | None = None,
                  progress_position: int = 0) -> RunOutcome:
    """Train and record into ``run_id``. Raises Diverged on a NaN/inf loss, and whatever
    ``on_epoch`` raises (the study raises optuna.TrialPruned)."""
    seed_everything(hp.seed)
    model = build_model(model_name, **model_hp)
    log_run_params(tracker, run_id, model_name, model_hp, hp, data, device, model)
    epochs = bar(hp.epochs, f"{model_name} epochs", "epoch", position=progress_position, leave=False)

    def after_epoch(epoch: int, metrics: EpochMetrics) -> None:
        tracker.metrics.queue(run_id, metrics.as_dict(), step=epoch)
        epochs.update(1)
        epochs.set_postfix(val_acc=f"{metrics.val_acc:.4f}", loss=f"{metrics.train_loss:.4f}")
        if on_epoch is not None:
            on_epoch(epoch, metrics)

    try:
        result = fit(model, data, hp, device, on_epoch=after_epoch)
        if result.status == "diverged":
            raise Diverged(result.message)
        outcome = RunOutcome(history=result.history)
        # The test split is for the final report only; nothing is chosen by it.
        _, outcome.test_acc = evaluate(model, data.test_x.to(device), data.test_y.to(device))
        tracker.metrics.queue(run_id, {record.TEST_METRIC: outcome.test_acc}, step=hp.epochs)
    finally:
        epochs.close()
        _flush_epoch_metrics(tracker, run_id)
    outcome.model_uri = tracker.models.log_model(run_id, model, input_example(data))
    return outcome


def log_run_params(tracker: Tracker, run_id: str, model_name: str, model_hp: dict, hp: TrainConfig,
                   data: MNISTSplits, device: torch.device, model: torch.nn.Module) -> None:
    """The run's params and dataset inputs (a trial pack's members log theirs here too)."""
    tracker.log_params(run_id, {**model_params(model_name, model_hp), **asdict(hp),
                                "device": device.type,
                                "parameters": sum(p.numel() for p in model.parameters())})
    if data.lineage:
        tracker.files.log_datasets(run_id, dataset_inputs(data, augmentation_text(hp)))


def train_run(tracker: Tracker, experiment: str, run_name: str, model_name: str, model_hp: dict,
              hp: TrainConfig, data: MNISTSplits, device: torch.device) -> tuple[str, RunOutcome]:
    """``mnist-tune train``: one run in ``experiment``, ended FINISHED, FAILED or KILLED."""
    run_id = tracker.start_run(tracker.experiment(experiment), run_name,
                               tags={record.MODEL: model_name, record.KIND: "train",
                                     record.DESCRIPTION: record.MODEL_CARD})
    try:
        # Ctrl-C/SIGTERM stop at the next step, never mid-write (stop.py)
        with stop.signals_deferred(), record.run_lifecycle(tracker, run_id):
            return run_id, train_and_log(tracker, run_id, model_name, model_hp, hp, data, device)
    except Diverged as e:
        raise MnistTuneError(f"training diverged: {e} (run {run_id} marked FAILED)", exit_code=1) from None
    except stop.Interrupted as e:
        e.outcome = f"run {run_id} marked KILLED"
        raise


def _flush_epoch_metrics(tracker: Tracker, run_id: str) -> None:
    """Write every epoch trained, also when the run was pruned or failed; a failing write then
    only warns, so it does not replace the reason the run ended."""
    ending_with = sys.exc_info()[1]
    try:
        tracker.metrics.flush(run_id)
    except Exception as e:
        if ending_with is None:
            raise
        warnings.warn(f"run {run_id}: could not write its epoch metrics ({e}) while it ended with {ending_with!r}")


def dataset_inputs(data: MNISTSplits, augmentation: str = "none") -> list[dict]:
    """The run's three splits as MLflow dataset inputs: named, digested from the files' MD5s
    and the validation split, so runs trained on the same data show the same digest.
    ``augmentation`` (images.augmentation_text) applies to the training split only, and is
    part of its digest when there is one."""
    lineage = data.lineage
    sizes = {"training": len(data.train_y), "validation": len(data.val_y), "test": len(data.test_y)}
    inputs = []
    for context, rows in sizes.items():
        augmented = augmentation if context == "training" else "none"
        profile = {"rows": rows, **lineage, "augmentation": augmented}
        extra = {"augmentation": augmented} if augmented != "none" else {}  # unaugmented: the digest as before
        key = json.dumps({"context": context, **lineage, **extra}, sort_keys=True)
        inputs.append({"name": f"mnist-{context}", "digest": hashlib.md5(key.encode()).hexdigest()[:8],
                       "source": lineage["source"], "context": context, "profile": profile})
    return inputs


def input_example(data: MNISTSplits):
    """Four test images as the logged model's input example (batch > 1: pt2 keeps the batch
    dimension dynamic)."""
    return as_input(data.test_x[:4].cpu()).numpy()


def check_model_hp(model_name: str, model_hp: dict) -> None:
    """Build once on the meta device: rejects bad shapes (patch size) before any training."""
    with torch.device("meta"):
        build_model(model_name, **model_hp)
