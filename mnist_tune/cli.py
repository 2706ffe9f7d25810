"""The ``mnist-tune`` command line. Thin: parse, call, turn known errors into one line.

Every user error (MnistTuneError, bad option) prints ``error: <message>`` on stderr and exits
with status 2; a diverged or interrupted run exits 1. Validation happens before training and
before anything is written to a store.
"""

from __future__ import annotations

import sys

import click

from mnist_tune.errors import MnistTuneError

DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"


def fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def tracking_option(f):
    return click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
                        help="MLflow tracking URI [default: embedded sqlite store under ./mlruns].")(f)


def data_dir_option(f):
    return click.option("--data-dir", envvar="MNIST_TUNE_DATA", type=click.Path(file_okay=False), default=None,
                        help="Where the MNIST files live [default: ~/.cache/mnist-tune].")(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="mnist-tune")
def cli():
    """Optuna sweeps over MNIST models, every trial tracked in MLflow."""


# ----------------------------------------------------------------------------- data


@cli.group()
def data():
    """The MNIST files."""


@data.command("fetch")
@data_dir_option
def data_fetch(data_dir):
    """Find or fetch MNIST, verify checksums, print where the files are."""
    from mnist_tune.data import prefetch

    folder = prefetch(data_dir, log=lambda msg: click.echo(msg, err=True))
    click.echo(str(folder))


# ---------------------------------------------------------------------------- train


def _hidden_sizes(ctx, param, value):
    if value is None:
        return None
    try:
        sizes = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{value!r}: sizes must be positive")
    return sizes


@cli.command()
@click.option("--model", "model_name", type=click.Choice(["mlp", "mixer"]), default="mlp")
@click.option("--batch-size", type=click.IntRange(min=1), default=100)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3)
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.2)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0)
@click.option("--schedule", type=click.Choice(["constant", "cosine", "onecycle"]), default="onecycle",
              help="Learning-rate schedule (onecycle peaks at --lr).")
@click.option("--epochs", type=click.IntRange(min=1), default=10)
@click.option("--seed", type=int, default=0)
@click.option("--val-size", type=click.IntRange(min=1), default=5000, help="Images held out of the 60k for validation.")
@click.option("--hidden-sizes", callback=_hidden_sizes, default=None, help="MLP hidden layers, e.g. 100,80.")
@click.option("--patch-size", type=int, default=None, help="Mixer patch size (divides 28).")
@click.option("--dim", type=click.IntRange(min=1), default=None, help="Mixer width.")
@click.option("--depth", type=click.IntRange(min=1), default=None, help="Mixer blocks.")
@click.option("--token-expansion", type=click.FloatRange(min=0, min_open=True), default=None)
@click.option("--channel-expansion", type=click.FloatRange(min=0, min_open=True), default=None)
@click.option("--device", default="auto", help=DEVICE_HELP)
@click.option("--experiment", default="mnist-tune-train", help="MLflow experiment for the run.")
@click.option("--run-name", default=None)
@data_dir_option
@tracking_option
def train(model_name, batch_size, lr, dropout, weight_decay, schedule, epochs, seed, val_size, hidden_sizes,
          patch_size, dim, depth, token_expansion, channel_expansion, device, experiment, run_name,
          data_dir, tracking_uri):
    """Train one model with explicit hyperparameters, tracked as one MLflow run."""
    from mnist_tune.data import load_mnist
    from mnist_tune.run import Diverged, check_model_hp, train_and_log
    from mnist_tune.tracking import Tracker
    from mnist_tune.train import TrainConfig, resolve_device

    model_hp = {"dropout": dropout}
    extra = {"hidden_sizes": hidden_sizes, "patch_size": patch_size, "dim": dim, "depth": depth,
             "token_expansion": token_expansion, "channel_expansion": channel_expansion}
    allowed = {"mlp": {"hidden_sizes"}, "mixer": {"patch_size", "dim", "depth", "token_expansion",
                                                  "channel_expansion"}}[model_name]
    for key, value in extra.items():
        if value is None:
            continue
        if key not in allowed:
            raise MnistTuneError(f"--{key.replace('_', '-')} does not apply to --model {model_name}")
        model_hp[key] = value
    # Validate everything before any data is fetched or anything is written.
    hp = TrainConfig(batch_size=batch_size, lr=lr, weight_decay=weight_decay, schedule=schedule,
                     epochs=epochs, seed=seed)
    check_model_hp(model_name, model_hp)
    torch_device = resolve_device(device)
    tracker = Tracker(tracking_uri)  # checks the server is reachable; writes nothing yet
    splits = load_mnist(data_dir, val_size=val_size, seed=seed)

    experiment_id = tracker.experiment(experiment)
    run_id = tracker.start_run(experiment_id, run_name or f"{model_name}-train",
                               tags={"mnist_tune.model": model_name, "mnist_tune.kind": "train"})
    try:
        outcome = train_and_log(tracker, run_id, model_name, model_hp, hp, splits, torch_device)
    except Diverged as e:
        tracker.set_tags(run_id, {"mnist_tune.error": str(e)})
        tracker.end_run(run_id, "FAILED")
        fail(f"training diverged: {e} (run {run_id} marked FAILED)", code=1)
    except BaseException as e:  # Ctrl-C or a crash: the run must not stay RUNNING
        tracker.set_tags(run_id, {"mnist_tune.error": f"{type(e).__name__}: {e}"})
        tracker.end_run(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    tracker.end_run(run_id, "FINISHED")
    final = outcome.history[-1]
    click.echo(f"run {run_id}: val_acc {final.val_acc:.4f}  test_acc {outcome.test_acc:.4f}  "
               f"({sum(m.epoch_seconds for m in outcome.history) / len(outcome.history):.2f} s/epoch)")
    click.echo(f"model: runs:/{run_id}/model   tracking: {tracker.uri}")


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except MnistTuneError as e:
        fail(str(e))
    except click.exceptions.Abort:
        fail("interrupted", code=130)
    except click.ClickException as e:
        fail(e.format_message(), code=e.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", code=130)
