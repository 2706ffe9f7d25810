"""`mnist-tune train` end to end into a temp embedded store, and its bad-input errors."""

import json
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from helpers import run_cli

# Loads a logged model in a fresh interpreter where mnist_tune and einops cannot be imported,
# and prints its accuracy on the given IDX test set: proves the artifact is self-contained.
RELOAD = r"""
import sys, json
sys.modules["mnist_tune"] = None; sys.modules["einops"] = None
import mlflow, numpy as np, torch
uri, tracking, images, labels = sys.argv[1:5]
mlflow.set_tracking_uri(tracking)
model = mlflow.pytorch.load_model(uri)
x = np.frombuffer(open(images, "rb").read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
y = np.frombuffer(open(labels, "rb").read(), np.uint8, offset=8)
with torch.no_grad():
    pred = model(torch.from_numpy(x.astype(np.float32) / 255)).argmax(1).numpy()
print(json.dumps({"acc": float((pred == y).mean())}))
"""


def reload_accuracy(model_uri, tracking_uri, data_dir):
    proc = subprocess.run([sys.executable, "-c", RELOAD, model_uri, tracking_uri,
                           str(data_dir / "t10k-images-idx3-ubyte"), str(data_dir / "t10k-labels-idx1-ubyte")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])["acc"]


@pytest.mark.parametrize("model_args", [["--model", "mlp"],
                                        ["--model", "mixer", "--patch-size", "7", "--dim", "16", "--depth", "1"]])
def test_train_logs_run_and_self_contained_model(synthetic_env, tmp_path, model_args):
    proc = run_cli("train", *model_args, "--epochs", "3", "--batch-size", "50", "--lr", "3e-3",
                   "--val-size", "200", env=synthetic_env)
    assert proc.stderr == ""  # quiet when not on a terminal
    run_id = proc.stdout.split()[1].rstrip(":")
    tracking = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    run = MlflowClient(tracking).get_run(run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model"] == model_args[1] and params["batch_size"] == "50" and params["lr"] == "0.003"
    assert params["epochs"] == "3" and params["dropout"] == "0.2" and params["schedule"] == "onecycle"
    client = MlflowClient(tracking)
    for metric in ("train_loss", "val_loss", "val_acc", "epoch_seconds"):
        history = client.get_metric_history(run_id, metric)
        assert sorted(m.step for m in history) == [1, 2, 3], metric
    test_acc = run.data.metrics["test_acc"]
    assert test_acc > 0.5
    assert reload_accuracy(f"runs:/{run_id}/model", tracking, tmp_path / "data") == pytest.approx(test_acc, abs=1e-9)


@pytest.mark.parametrize("args, message", [
    (["--model", "cnn"], "Invalid value for '--model'"),
    (["--device", "cuda:7"], "not available"),
    (["--device", "gpu"], "unknown device"),
    (["--model", "mixer", "--patch-size", "5"], "does not divide the image size 28"),
    (["--hidden-sizes", "100,x"], "comma-separated list"),
    (["--patch-size", "7"], "does not apply to --model mlp"),
    (["--lr", "0"], "--lr"),
    (["--val-size", "5000"], "validation size 5000"),
    (["--tracking-uri", "http://user:hunter2@127.0.0.1:9"], "unreachable"),
])
def test_bad_input_is_one_line_error_and_writes_nothing(synthetic_env, tmp_path, args, message):
    if args[:2] == ["--device", "cuda:7"]:
        import torch
        if torch.cuda.device_count() > 7:
            pytest.skip("this machine has 8 GPUs")
    proc = run_cli("train", "--epochs", "1", *args, env=synthetic_env, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert "hunter2" not in proc.stderr + proc.stdout
    assert not (tmp_path / "mlruns").exists()


def test_nan_loss_fails_the_run_with_one_line(synthetic_env, tmp_path):
    proc = run_cli("train", "--epochs", "2", "--lr", "inf", "--val-size", "200", "--schedule", "constant",
                   env=synthetic_env, check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "training diverged" in proc.stderr
    runs = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}").search_runs(
        [e.experiment_id for e in MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}").search_experiments()])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "nan" in runs[0].data.tags["mnist_tune.error"].lower()


def test_data_fetch_prints_folder(synthetic_env, tmp_path):
    proc = run_cli("data", "fetch", env=synthetic_env)
    assert proc.stdout.strip() == str(tmp_path / "data")


@pytest.mark.parametrize("signum", [15, 2])  # SIGTERM, Ctrl-C
def test_signal_stops_training_and_kills_the_run(synthetic_env, tmp_path, signum):
    import time

    from helpers import CLI

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")  # creates the store first
    proc = subprocess.Popen([*CLI, "train", "--epochs", "5000", "--val-size", "200", "--hidden-sizes", "32"],
                            env=synthetic_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:  # until the first epoch is logged
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            if runs and "val_acc" in runs[0].data.metrics:
                break
            time.sleep(0.3)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, err
    assert err.count("\n") == 1 and f"interrupted (received signal {signum})" in err
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED" and "Interrupted" in run.data.tags["mnist_tune.error"]
    epochs = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
    assert epochs == list(range(1, len(epochs) + 1)) and 0 < len(epochs) < 5000  # queued epochs written too
