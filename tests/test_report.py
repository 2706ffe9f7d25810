"""mnist_tune/report.py: per-class report of a classifier, on a synthetic model whose every
answer is known, so every number is checked exactly."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import torch
from torch import nn

from mnist_tune.report import (
    classifier_report,
    format_report,
    log_report,
    report_from_confusion,
    report_metrics,
    write_confusion_png,
)

# (true digit, predicted digit, how many images): 21 images, 16 right.
CASES = [
    (0, 0, 5),
    (1, 1, 3), (1, 7, 1),
    (2, 2, 2),
    (3, 3, 1), (3, 5, 2),
    (4, 4, 1), (5, 5, 1), (6, 6, 1), (7, 7, 1),
    (8, 8, 1), (8, 3, 1),
    # no image of a 9; one image is predicted as 9
    (6, 9, 1),
]


class Scripted(nn.Module):
    """Answers the digit written in pixel (0, 0) of each image (nearest of 0..9): a model
    whose every prediction the test chooses. Dropout on the scores makes a forgotten eval() visible."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        value = x[:, 0, 0, 0] * 255
        # the right class scores 0, the others -1, -4, ...; in train mode dropout would zero
        # some wrong scores too, so a report made without eval() would miscount
        return self.drop(-(torch.arange(10, dtype=x.dtype, device=x.device) - value[:, None]) ** 2)


def scripted_data():
    truth, predicted = [], []
    for t, p, count in CASES:
        truth += [t] * count
        predicted += [p] * count
    images = torch.randint(0, 256, (len(truth), 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images[:, 0, 0] = torch.tensor(predicted, dtype=torch.uint8)
    return images, torch.tensor(truth)


EXPECTED_CONFUSION = [[0] * 10 for _ in range(10)]
for _t, _p, _count in CASES:
    EXPECTED_CONFUSION[_t][_p] += _count


def check_report(report):
    assert report["confusion"] == EXPECTED_CONFUSION
    assert report["n"] == 21 and report["correct"] == 16 and report["accuracy"] == 16 / 21
    rows = {r["class"]: r for r in report["per_class"]}
    assert [rows[k]["support"] for k in range(10)] == [5, 4, 2, 3, 1, 1, 2, 1, 2, 0]
    assert [rows[k]["predicted"] for k in range(10)] == [5, 3, 2, 2, 1, 3, 1, 2, 1, 1]
    # accuracy of digit k = its recall
    assert [rows[k]["accuracy"] for k in range(10)] == [1.0, 0.75, 1.0, 1 / 3, 1.0, 1.0, 0.5, 1.0, 0.5, None]
    assert [rows[k]["precision"] for k in range(10)] == [1.0, 1.0, 1.0, 0.5, 1.0, 1 / 3, 1.0, 0.5, 1.0, 0.0]


def test_report_on_a_torch_module_in_batches():
    images, labels = scripted_data()
    model = Scripted().train()
    for batch_size in (3, 7, 5000):  # batching, including a last partial batch, changes nothing
        check_report(classifier_report(model, images, labels, batch_size=batch_size))
    assert model.training, "the model's training mode is restored"
    # float input shaped (N, 1, 28, 28) in [0, 1] is taken as given
    check_report(classifier_report(model, images.unsqueeze(1).float() / 255, labels))


def test_report_on_an_exported_module():
    """A model reloaded from MLflow is a torch.export module: .eval() raises NotImplementedError."""
    images, labels = scripted_data()
    model = Scripted().eval()
    batch = torch.export.Dim("batch")
    exported = torch.export.export(model, (torch.rand(4, 1, 28, 28),), dynamic_shapes=({0: batch},)).module()
    with pytest.raises(NotImplementedError):
        exported.eval()
    check_report(classifier_report(exported, images, labels, batch_size=8))


def test_report_on_a_model_reloaded_from_mlflow(tmp_path):
    import mlflow

    images, labels = scripted_data()
    example = torch.rand(4, 1, 28, 28).numpy()
    mlflow.pytorch.save_model(Scripted().eval(), tmp_path / "model", serialization_format="pt2",
                              input_example=example, pip_requirements=["torch"])
    reloaded = mlflow.pytorch.load_model(str(tmp_path / "model"), map_location="cpu")
    check_report(classifier_report(reloaded, images, labels, batch_size=6))


def test_metrics_names_and_values():
    images, labels = scripted_data()
    metrics = report_metrics(classifier_report(Scripted(), images, labels))
    assert metrics["test_recall_3"] == 1 / 3 and metrics["test_precision_5"] == 1 / 3
    assert metrics["test_precision_9"] == 0.0 and "test_recall_9" not in metrics  # no 9 in the data: undefined
    assert len(metrics) == 19 and all(isinstance(v, float) for v in metrics.values())
    assert set(report_metrics(report_from_confusion(EXPECTED_CONFUSION), prefix="val")) == {
        k.replace("test_", "val_") for k in metrics}


def test_text_format():
    images, labels = scripted_data()
    text = format_report(classifier_report(Scripted(), images, labels))
    lines = text.splitlines()
    assert len(lines) == 12  # header, ten digits, overall
    assert lines[1].split()[:4] == ["0", "100.00", "100.00", "5"]
    assert lines[4].split() == ["3", "33.33", "50.00", "3", "5", "(2)"]
    assert lines[2].split() == ["1", "75.00", "100.00", "4", "7", "(1)"]
    assert lines[10].split() == ["9", "-", "0.00", "0", "-"]
    assert lines[-1] == "overall accuracy 76.19 % (16/21)"


def test_report_is_json_and_rejects_bad_input():
    images, labels = scripted_data()
    report = classifier_report(Scripted(), images, labels)
    assert json.loads(json.dumps(report)) == report
    with pytest.raises(ValueError, match="labels"):
        classifier_report(Scripted(), images, labels[:-1])
    with pytest.raises(ValueError, match="0-9"):
        classifier_report(Scripted(), images, torch.full_like(labels, 10))
    with pytest.raises(ValueError, match="10x10"):
        report_from_confusion([[1, 2], [3, 4]])


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height, data


def test_confusion_png(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    images, labels = scripted_data()
    report = classifier_report(Scripted(), images, labels)
    path = write_confusion_png(report, tmp_path / "sub" / "confusion.png")
    width, height, data = _png_size(path)
    assert (width, height) == (840, 780)
    assert zlib.crc32(data) and len(data) > 10_000  # a real picture, not an empty canvas
    assert matplotlib.get_backend() == backend, "no global backend switch"

    # The texts drawn: every non-zero count in its cell, digits 0-9 on both axes (the figure
    # is caught on its way to savefig).
    from matplotlib.figure import Figure

    drawn = []
    saved = Figure.savefig

    def grab(self, *args, **kwargs):
        drawn.append(self)
        return saved(self, *args, **kwargs)

    Figure.savefig = grab
    try:
        write_confusion_png(report, tmp_path / "again.png")
    finally:
        Figure.savefig = saved
    ax = drawn[0].axes[0]
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert cells == {(i, j): str(c) for i, row in enumerate(EXPECTED_CONFUSION) for j, c in enumerate(row) if c}
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(k) for k in range(10)]
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(k) for k in range(10)]
    assert ax.get_xlabel() == "predicted digit" and ax.get_ylabel() == "true digit"


def test_log_report_to_mlflow(tmp_path):
    from mnist_tune.tracking import Tracker

    images, labels = scripted_data()
    report = classifier_report(Scripted(), images, labels)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = tracker.start_run(tracker.experiment("report-test"), "evaluate")
    log_report(tracker, run_id, report)
    tracker.end_run(run_id)
    run = tracker.get_run(run_id)
    assert run.data.metrics == report_metrics(report)
    listed = {a.path for a in tracker.client.list_artifacts(run_id, "evaluation")}
    assert listed == {"evaluation/classifier_report.json", "evaluation/confusion_matrix.png"}
    local = tracker.client.download_artifacts(run_id, "evaluation", str(tmp_path / "down"))
    assert json.loads((tmp_path / "down" / "evaluation" / "classifier_report.json").read_text()) == report
    assert _png_size(tmp_path / "down" / "evaluation" / "confusion_matrix.png")[:2] == (840, 780)
    assert local
