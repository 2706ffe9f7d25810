"""Per-class test report of a classifier: accuracy of each digit, precision, the confusion matrix.

No Optuna, no MLflow import: ``log_report`` records a report through a ``Tracker``.

    report = classifier_report(model, *load_test_split())   # a torch module or a reloaded one
    print(format_report(report))                             # the ten per-class accuracies
    write_confusion_png(report, "confusion_matrix.png")

Definitions (rows of the confusion matrix are the true digit, columns the predicted one):
    accuracy_k  = confusion[k][k] / sum(confusion[k])        the share of digit k's images
                  classified as k, i.e. the recall of class k (not the one-vs-rest accuracy,
                  which is >= 0.98 for every digit of any decent model and says little)
    precision_k = confusion[k][k] / sum(column k)            the share of the "k" answers that are right
A class with no images (or no predictions) has accuracy (precision) ``None`` in the report.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch

from mnist_tune.models import NUM_CLASSES, eval_mode

BATCH = 5000  # like train.evaluate: a handful of large batches, never one per image


def _as_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) as stored -> float (N, 1, 28, 28) in [0, 1]; float input as given."""
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    return images


def predict_labels(model, images: torch.Tensor, batch_size: int = BATCH) -> torch.Tensor:
    """The predicted digit of every image (int64, on the images' device), in batches."""
    was_training = eval_mode(model)
    try:
        out = []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                out.append(model(_as_batch(images[start:start + batch_size])).argmax(1))
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=images.device)
    finally:
        if was_training:
            model.train()


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def report_from_confusion(confusion) -> dict:
    """The report of a 10x10 confusion matrix (rows true, columns predicted); plain JSON types."""
    confusion = [[int(c) for c in row] for row in confusion]
    if len(confusion) != NUM_CLASSES or any(len(row) != NUM_CLASSES for row in confusion):
        raise ValueError("the confusion matrix must be 10x10")
    n = sum(map(sum, confusion))
    correct = sum(confusion[k][k] for k in range(NUM_CLASSES))
    per_class = []
    for k in range(NUM_CLASSES):
        support = sum(confusion[k])
        predicted = sum(row[k] for row in confusion)
        per_class.append({"class": k, "support": support, "predicted": predicted, "correct": confusion[k][k],
                          "accuracy": _ratio(confusion[k][k], support),
                          "precision": _ratio(confusion[k][k], predicted)})
    return {"n": n, "correct": correct, "accuracy": _ratio(correct, n), "per_class": per_class,
            "confusion": confusion}


def classifier_report(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = BATCH) -> dict:
    """Overall accuracy, per-class accuracy (recall) / precision / support and the 10x10
    confusion matrix of ``model`` on ``images`` (uint8 (N, 28, 28) as ``load_test_split``
    returns them, or float (N, 1, 28, 28) in [0, 1]) with true ``labels``.

    ``model`` is any callable returning (N, 10) logits: a torch module, or a model reloaded
    from MLflow (torch.export). Images and model must be on the same device."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    predicted = predict_labels(model, images, batch_size)
    labels = labels.to(predicted.device, torch.long)
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError("labels must be digits 0-9")
    counts = torch.bincount(labels * NUM_CLASSES + predicted, minlength=NUM_CLASSES * NUM_CLASSES)
    return report_from_confusion(counts.view(NUM_CLASSES, NUM_CLASSES).tolist())


def report_metrics(report: dict, prefix: str = "test") -> dict[str, float]:
    """Flat MLflow metrics: ``<prefix>_recall_<k>`` (the per-class accuracy) and
    ``<prefix>_precision_<k>`` for the ten digits. Undefined values (no images of a class)
    are left out rather than logged as NaN."""
    metrics = {}
    for row in report["per_class"]:
        for key, name in (("accuracy", "recall"), ("precision", "precision")):
            if row[key] is not None:
                metrics[f"{prefix}_{name}_{row['class']}"] = row[key]
    return metrics


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def format_report(report: dict) -> str:
    """The ten per-class accuracies as a small table, and the overall accuracy."""
    lines = ["digit  accuracy %  precision %  images  most often taken for"]
    for row in report["per_class"]:
        k = row["class"]
        wrong = [(count, j) for j, count in enumerate(report["confusion"][k]) if j != k and count]
        taken_for = ", ".join(f"{j} ({count})" for count, j in sorted(wrong, key=lambda t: (-t[0], t[1]))[:2])
        lines.append(f"{k:>5}  {_pct(row['accuracy']):>10}  {_pct(row['precision']):>11}  {row['support']:>6}"
                     f"  {taken_for or '-'}")
    lines.append(f"overall accuracy {_pct(report['accuracy'])} % ({report['correct']}/{report['n']})")
    return "\n".join(lines)


def write_confusion_png(report: dict, path: str | Path, title: str | None = None) -> Path:
    """The confusion matrix as a PNG: counts in the cells (mistakes in red), digits 0-9 on
    both axes, the per-class accuracy beside each row; colour on a log scale. Uses matplotlib's
    Agg canvas directly (no pyplot, so no global backend state and no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    confusion = report["confusion"]
    path = Path(path)
    fig = Figure(figsize=(7, 6.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # Log colour scale: the diagonal holds ~1000 images a cell, the mistakes 0-20; on a linear
    # scale every mistake would look alike.
    shown = [[c if c else math.nan for c in row] for row in confusion]
    peak = max((c for row in confusion for c in row), default=1) or 1
    ax.imshow(shown, cmap="Blues", norm=LogNorm(vmin=1, vmax=max(peak, 2)))
    for i, row in enumerate(confusion):
        for j, count in enumerate(row):
            if count:
                dark = count > math.sqrt(max(peak, 1))  # past the middle of the log scale
                ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                        color="white" if dark else ("black" if i == j else "firebrick"))
    ticks = list(range(NUM_CLASSES))
    ax.set_xticks(ticks, [str(k) for k in ticks])
    ax.set_yticks(ticks, [str(k) for k in ticks])
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit")
    ax.set_xticks([t - 0.5 for t in ticks[1:]], minor=True)
    ax.set_yticks([t - 0.5 for t in ticks[1:]], minor=True)
    ax.grid(which="minor", color="0.85", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    # The accuracy of each digit (its row's diagonal share) beside its row, on the right.
    right = ax.secondary_yaxis("right")
    right.set_yticks(ticks, [f"{_pct(r['accuracy'])} %" for r in report["per_class"]])
    right.set_ylabel("accuracy of the true digit")
    ax.set_title(title or f"confusion matrix: {report['correct']}/{report['n']} correct "
                          f"({_pct(report['accuracy'])} %)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


REPORT_ARTIFACT_DIR = "evaluation"  # runs:/<id>/evaluation/{classifier_report.json,confusion_matrix.png}


def log_report(tracker, run_id: str, report: dict, prefix: str = "test") -> None:
    """Record ``report`` on an MLflow run through a ``tracking.Tracker``: the 20 per-class
    metrics (``report_metrics``), the whole report as ``evaluation/classifier_report.json``
    and the confusion matrix as ``evaluation/confusion_matrix.png``."""
    tracker.metrics.log(run_id, report_metrics(report, prefix))
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "classifier_report.json").write_text(json.dumps(report, indent=1))
        write_confusion_png(report, folder / "confusion_matrix.png")
        tracker.files.log_artifact(run_id, folder / "classifier_report.json", REPORT_ARTIFACT_DIR)
        tracker.files.log_artifact(run_id, folder / "confusion_matrix.png", REPORT_ARTIFACT_DIR)
