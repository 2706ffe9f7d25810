"""Image size and augmentation (images.py): resized splits, models that resize their own 28 x 28
input, augmented training batches that leave validation and test alone, and the reload of an
image-size trial's model with plain MLflow + torch."""

import hashlib
import json
import subprocess
import sys

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from mnist_tune.data import load_mnist
from mnist_tune.errors import MnistTuneError
from mnist_tune.images import Augment, augmentation, resize
from mnist_tune.models import Resize, as_input, build_model
from mnist_tune.optim import FlatAdamW, schedule_table
from mnist_tune.run import dataset_inputs
from mnist_tune.steps import EagerSteps, GraphedSteps
from mnist_tune.train import TrainConfig, _make_train_step, evaluate, fit, seed_everything

from helpers import DEVICES, run_cli


@pytest.fixture
def splits(synthetic_env, tmp_path):
    return load_mnist(tmp_path / "data", val_size=200, seed=0)


def _fit(splits, model_hp=None, **kw):
    hp = TrainConfig(**{"batch_size": 50, "epochs": 2, "lr": 3e-3, **kw})
    seed_everything(hp.seed)
    model = build_model("mlp", **(model_hp or {}))
    return model, fit(model, splits, hp, torch.device("cpu"))


def _moved(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    out, side = torch.zeros_like(image), image.shape[-1]
    out[max(dy, 0):side + min(dy, 0), max(dx, 0):side + min(dx, 0)] = \
        image[max(-dy, 0):side + min(-dy, 0), max(-dx, 0):side + min(-dx, 0)]
    return out


def test_shift_moves_each_image_by_whole_pixels():
    torch.manual_seed(0)
    images = torch.randint(1, 256, (64, 28, 28), dtype=torch.uint8)  # no zeros: every move shows
    out = Augment(shift=2)(images.flatten(1))  # flattened rows, as the MLP's step gathers them
    assert out.dtype == torch.uint8 and out.shape == (64, 784)
    moves = []
    for image, moved in zip(images, out.view(64, 28, 28)):
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if torch.equal(_moved(image, dy, dx), moved)]
        assert len(found) == 1
        moves.append(found[0])
    assert len(set(moves)) > 10  # drawn per image, not per batch


def test_rotation_and_scale_resample_the_batch():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (32, 20, 20), dtype=torch.uint8)
    out = Augment(shift=1, rotate=10, scale=0.1)(images)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 255 and not torch.allclose(out, images.float())
    # no rotation, no scale, no shift: the identity map (bilinear at the pixel centres)
    same = Augment(rotate=1e-12)(images)
    torch.testing.assert_close(same, images.float(), atol=1e-3, rtol=0)


def test_no_augmentation_is_todays_batches(splits):
    """Shift 0 (and no rotation or scale) adds no op and draws no random number: the run is
    bit for bit the one without the settings; any shift changes the training."""
    assert augmentation(TrainConfig(shift=0, rotate=0.0, scale=0.0)) is None
    assert TrainConfig(shift=0) == TrainConfig()
    plain_model, plain = _fit(splits, seed=3)
    zero_model, zero = _fit(splits, seed=3, shift=0)
    assert [m.train_loss for m in zero.history] == [m.train_loss for m in plain.history]
    assert all(torch.equal(a, b) for a, b in zip(zero_model.parameters(), plain_model.parameters()))
    _, shifted = _fit(splits, seed=3, shift=1)
    assert shifted.history[0].train_loss != plain.history[0].train_loss


@pytest.mark.parametrize("kw", [{"shift": 2}, {"shift": 1, "rotate": 8.0, "scale": 0.1}])
def test_augmentation_changes_training_batches_only(splits, kw):
    digest = {name: hashlib.md5(getattr(splits, name).numpy().tobytes()).hexdigest()
              for name in ("train_x", "val_x", "test_x")}
    model, result = _fit(splits, model_hp={"dropout": 0.0}, seed=1, **kw)
    _, plain = _fit(splits, model_hp={"dropout": 0.0}, seed=1)
    assert result.history[0].train_loss != pytest.approx(plain.history[0].train_loss, rel=1e-3)
    for name, before in digest.items():  # the splits' bytes are untouched, the training split too
        assert hashlib.md5(getattr(splits, name).numpy().tobytes()).hexdigest() == before
    # the epoch's validation was on the plain validation images
    val_loss, val_acc = evaluate(model, splits.val_x, splits.val_y)
    assert val_acc == result.history[-1].val_acc and val_loss == pytest.approx(result.history[-1].val_loss)
    lineage = {i["context"]: i for i in dataset_inputs(splits, Augment(**kw).describe())}
    assert lineage["training"]["profile"]["augmentation"].startswith("shift up to")
    assert lineage["validation"]["profile"]["augmentation"] == lineage["test"]["profile"]["augmentation"] == "none"
    plain_lineage = {i["context"]: i for i in dataset_inputs(splits)}
    assert lineage["training"]["digest"] != plain_lineage["training"]["digest"]
    assert lineage["test"]["digest"] == plain_lineage["test"]["digest"]


@pytest.mark.parametrize("name, hp", [("mlp", {"dropout": 0.1}), ("mixer", {"patch_size": 7, "dim": 16, "depth": 1})])
def test_image_size_28_is_todays_model(name, hp):
    torch.manual_seed(0)
    today = build_model(name, **hp)
    torch.manual_seed(0)
    sized = build_model(name, **hp, image_size=28)
    assert [type(m) for m in sized.modules()] == [type(m) for m in today.modules()]
    assert not any(isinstance(m, Resize) for m in sized.modules())
    assert all(torch.equal(a, b) for a, b in zip(today.state_dict().values(), sized.state_dict().values()))


def test_smaller_images_shrink_the_first_layer_and_are_resized_inside():
    mlp = build_model("mlp", image_size=14)
    assert next(m for m in mlp if isinstance(m, torch.nn.Linear)).in_features == 196
    mixer = build_model("mixer", image_size=20, patch_size=5, dim=8, depth=1)
    for model in (mlp.eval(), mixer.eval()):
        assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    images = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    with torch.no_grad():  # the split resized once (training) == the model resizing its 28 x 28 input (reload)
        torch.testing.assert_close(mlp(as_input(resize(images, 14))), mlp(as_input(images)))
    with pytest.raises(MnistTuneError, match="must divide the image size 20"):
        build_model("mixer", image_size=20, patch_size=7)


def test_image_size_run_evaluates_as_the_logged_model_will(splits):
    model, result = _fit(splits, model_hp={"image_size": 14}, seed=2, shift=1)
    assert result.status == "completed"
    # validation in fit: resized once; here: 28 x 28 images resized by the model itself
    _, val_acc = evaluate(model, splits.val_x, splits.val_y)
    assert val_acc == pytest.approx(result.history[-1].val_acc, abs=1 / 200)


def test_patch_size_that_does_not_divide_the_image_size_is_refused(synthetic_env, tmp_path):
    proc = run_cli("train", "--model", "mixer", "--image-size", "20", "--patch-size", "7", "--epochs", "1",
                   env=synthetic_env, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["error: --patch-size patch size 7 does not divide the image size 20"]
    sweep = tmp_path / "bad.yaml"
    sweep.write_text("model: mixer\nspace:\n  patch_size: {type: categorical, choices: [4, 7]}\n"
                     "  image_size: {type: categorical, choices: [14, 28]}\n")
    proc = run_cli("study", "--sweep", sweep, "--trials", "1", env=synthetic_env, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {sweep}: space.patch_size: patch size 4 does not divide the image size 14"]
    assert not (tmp_path / "mlruns").exists()  # nothing written


IMAGE_SWEEP = """
name: small-images
model: mlp
study:
  sampler: {name: random, seed: 0}
  pruner: {name: none}
train: {epochs: 1, val_size: 200}
fixed: {hidden_sizes: [32], image_size: 14, shift: 1}
space:
  lr: {type: categorical, choices: [0.003]}
"""


@pytest.mark.slow
def test_image_size_trial_reloads_with_plain_mlflow_and_torch(synthetic_env, tmp_path):
    sweep = tmp_path / "small.yaml"
    sweep.write_text(IMAGE_SWEEP)
    run_cli("study", "--sweep", sweep, "--trials", "1", "--no-plots", env=synthetic_env)
    trial = optuna.load_study(study_name="small-images",
                              storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}").trials[0]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.data.params["image_size"] == "14" and run.data.params["shift"] == "1"
    training = next(i.dataset for i in run.inputs.dataset_inputs if i.tags[0].value == "training")
    assert json.loads(training.profile)["augmentation"].startswith("shift up to 1 px")
    test = load_mnist(tmp_path / "data", val_size=200)
    torch.save({"x": as_input(test.test_x), "y": test.test_y}, tmp_path / "test.pt")  # (N, 1, 28, 28) in [0, 1]
    # in an interpreter that cannot import mnist_tune (or einops): plain MLflow + torch
    script = RELOAD.format(uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", run_id=run.info.run_id,
                           test=tmp_path / "test.pt")
    env = {k: v for k, v in synthetic_env.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    result = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = float(result.stdout.strip().splitlines()[-1])
    assert accuracy == pytest.approx(run.data.metrics["test_acc"], abs=1e-6)


RELOAD = """
import sys
sys.modules["mnist_tune"] = None
sys.modules["einops"] = None
import mlflow, mlflow.pytorch, torch
mlflow.set_tracking_uri("{uri}")
model = mlflow.pytorch.load_model("runs:/{run_id}/model")
test = torch.load("{test}")
with torch.inference_mode():
    print((model(test["x"]).argmax(1) == test["y"]).float().mean().item())
"""


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("augment", [Augment(shift=2), Augment(shift=1, rotate=10)])
def test_augmentation_inside_the_graphed_step(device, augment):
    """The augmentation runs inside the step the CUDA graph records (its random numbers from
    the default generator, which a replayed graph advances). Off CUDA the same code runs
    unrecorded and takes exactly the eager runner's steps."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (200, 28, 28), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (200,), device=device)
    lrs, beta1s = schedule_table("constant", 3e-3, 8)
    losses = []
    for runner in (EagerSteps, GraphedSteps):
        torch.manual_seed(1)
        model = build_model("mlp", dropout=0.0).to(device).train()
        optimizer = FlatAdamW(model.parameters(), weight_decay=0.0, fused=False)
        train_step = _make_train_step(model, TrainConfig(), optimizer)
        inputs, targets = train_step.prepare(images, labels)
        loss_sum = torch.zeros((), device=device)
        extra = {"batch_size": 50, "capture": device == "cuda"} if runner is GraphedSteps else {}
        steps = runner(train_step, optimizer, inputs, targets, lrs, beta1s, loss_sum, augment=augment, **extra)
        for step, batch in enumerate(torch.arange(200, device=device).split(50)):
            steps(batch, step)
        losses.append(loss_sum.item())
        assert runner is EagerSteps or (steps.graph is not None) == (device == "cuda")
    if device == "cuda":  # other random draws (warm-up steps, the graph's generator state): alike, not equal
        assert losses[1] == pytest.approx(losses[0], rel=0.2)
    else:
        assert losses[1] == pytest.approx(losses[0], rel=1e-6)
