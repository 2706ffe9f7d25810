"""The ``mnist-tune`` command line. Thin: parse, call, turn known errors into one line.

Every user error (MnistTuneError, bad option) prints ``error: <message>`` on stderr and exits
with status 2; a diverged run exits 1; Ctrl-C / SIGTERM exit 130 / 143. Validation happens
before training and before anything is written to a store.
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
@click.option("--amp", is_flag=True, help="bf16 autocast (CUDA; CPUs with bf16 units).")
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the model (pays off on long GPU runs).")
@click.option("--cuda-graph/--no-cuda-graph", default=True,
              help="On CUDA, replay each training step as a recorded CUDA graph (not with --compile).")
@click.option("--experiment", default="mnist-tune-train", help="MLflow experiment for the run.")
@click.option("--run-name", default=None)
@data_dir_option
@tracking_option
def train(model_name, batch_size, lr, dropout, weight_decay, schedule, epochs, seed, val_size, hidden_sizes,
          patch_size, dim, depth, token_expansion, channel_expansion, device, amp, compile_model, cuda_graph,
          experiment, run_name, data_dir, tracking_uri):
    """Train one model with explicit hyperparameters, tracked as one MLflow run."""
    from mnist_tune.data import load_mnist
    from mnist_tune.run import Diverged, check_model_hp, train_and_log
    from mnist_tune.stop import signals_deferred
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
                     epochs=epochs, seed=seed, amp=amp, compile=compile_model,
                     cuda_graph=cuda_graph)
    check_model_hp(model_name, model_hp)
    torch_device = resolve_device(device)
    tracker = Tracker(tracking_uri)  # checks the server is reachable; writes nothing yet
    splits = load_mnist(data_dir, val_size=val_size, seed=seed)

    experiment_id = tracker.experiment(experiment)
    run_id = tracker.start_run(experiment_id, run_name or f"{model_name}-train",
                               tags={"mnist_tune.model": model_name, "mnist_tune.kind": "train"})
    try:
        with signals_deferred():  # Ctrl-C/SIGTERM stop at the next step, never mid-write (stop.py)
            outcome = train_and_log(tracker, run_id, model_name, model_hp, hp, splits, torch_device)
    except Diverged as e:
        tracker.set_tags(run_id, {"mnist_tune.error": str(e)})
        tracker.end_run(run_id, "FAILED")
        fail(f"training diverged: {e} (run {run_id} marked FAILED)", code=1)
    except BaseException as e:  # Ctrl-C, SIGTERM or a crash: the run must not stay RUNNING
        interrupted = isinstance(e, KeyboardInterrupt)  # stop.Interrupted is one
        tracker.set_tags(run_id, {"mnist_tune.error": f"{type(e).__name__}: {e}"})
        tracker.end_run(run_id, "KILLED" if interrupted else "FAILED")
        if interrupted:
            fail(f"interrupted ({e or 'Ctrl-C'}); run {run_id} marked KILLED", code=getattr(e, "exit_code", 130))
        raise
    tracker.end_run(run_id, "FINISHED")
    final = outcome.history[-1]
    click.echo(f"run {run_id}: val_acc {final.val_acc:.4f}  test_acc {outcome.test_acc:.4f}  "
               f"({sum(m.epoch_seconds for m in outcome.history) / len(outcome.history):.2f} s/epoch)")
    click.echo(f"model: runs:/{run_id}/model   tracking: {tracker.uri}")


# ---------------------------------------------------------------------------- study


def _from_file(value: str | None, file: str | None, what: str) -> str | None:
    """A URL given directly, or read from a file (keeps passwords off the command line)."""
    if value or not file:
        return value
    try:
        text = open(file).read().strip()
    except OSError as e:
        raise MnistTuneError(f"cannot read {what} file {file}: {e.strerror}") from None
    if not text:
        raise MnistTuneError(f"{what} file {file} is empty")
    return text


def storage_options(f):
    f = click.option("--tracking-uri-file", envvar="MLFLOW_TRACKING_URI_FILE", default=None,
                     type=click.Path(dir_okay=False), help="File holding the tracking URI.")(f)
    f = tracking_option(f)
    f = click.option("--storage-file", envvar="MNIST_TUNE_STORAGE_FILE", default=None,
                     type=click.Path(dir_okay=False), help="File holding the storage URL.")(f)
    f = click.option("--storage", envvar="MNIST_TUNE_STORAGE", default=None,
                     help="Optuna storage URL [default: sqlite under ./mlruns]; or $MNIST_TUNE_STORAGE.")(f)
    return f


def _urls(storage, storage_file, tracking_uri, tracking_uri_file):
    return (_from_file(storage, storage_file, "storage"),
            _from_file(tracking_uri, tracking_uri_file, "tracking URI"))


@cli.command()
@click.option("--model", "model_name", default=None, help="mlp or mixer: that model's default sweep.")
@click.option("--sweep", "sweep_file", type=click.Path(dir_okay=False), default=None, help="A sweep YAML file.")
@click.option("--trials", type=click.IntRange(min=1), default=40, help="The study's total budget of trials.")
@click.option("--study-name", default=None, help="[default: the sweep's name]")
@click.option("--device", default="auto", help=DEVICE_HELP)
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override the sweep's epochs.")
@click.option("--val-size", type=click.IntRange(min=1), default=None, help="Override the sweep's validation size.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop starting trials after this many seconds.")
@click.option("--seed", type=int, default=None, help="Sampler seed and base of the trials' seeds.")
@click.option("--heartbeat-interval", type=click.IntRange(min=1), default=10, help="Seconds between heartbeats.")
@click.option("--grace-period", type=click.IntRange(min=2), default=30,
              help="Seconds without heartbeat before a trial counts as dead.")
@click.option("--max-retry", type=click.IntRange(min=0), default=2, help="Retries of a trial whose worker died.")
@click.option("--max-failures", type=click.IntRange(min=1), default=None,
              help="Failed trials after which the worker stops [default: the budget].")
@click.option("--no-plots", is_flag=True, help="Skip the plots on the study's parent run.")
@click.option("--finish-trial-on-signal", is_flag=True,
              help="First SIGTERM/Ctrl-C finishes the current trial before stopping (a second one aborts).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch CPU threads [default: all cores]; use cores/workers when several run on one host.")
@data_dir_option
@storage_options
def study(model_name, sweep_file, trials, study_name, device, epochs, val_size, timeout, seed, heartbeat_interval,
          grace_period, max_retry, max_failures, no_plots, finish_trial_on_signal, threads, data_dir, storage,
          storage_file, tracking_uri, tracking_uri_file):
    """Run (or join, or finish) an Optuna study; every trial is a nested MLflow run."""
    import time

    from mnist_tune.config import sweep_for
    from mnist_tune.data import load_mnist
    from mnist_tune.study import Worker, WorkerSettings
    from mnist_tune.tracking import Tracker
    from mnist_tune.train import resolve_device

    started = time.perf_counter()
    if not model_name and not sweep_file:
        raise MnistTuneError("give --model mlp|mixer or --sweep FILE")
    storage, tracking_uri = _urls(storage, storage_file, tracking_uri, tracking_uri_file)
    sweep = sweep_for(model_name, sweep_file)
    sweep = sweep.with_overrides(epochs=epochs, val_size=val_size)
    if grace_period <= heartbeat_interval:
        raise MnistTuneError(f"--grace-period {grace_period} must exceed --heartbeat-interval {heartbeat_interval}")
    torch_device = resolve_device(device)
    if threads:
        import torch

        torch.set_num_threads(threads)
    tracker = Tracker(tracking_uri)
    settings = WorkerSettings(trials=trials, storage=storage, study_name=study_name, timeout=timeout, seed=seed,
                              heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                              max_retry=max_retry, max_failures=max_failures,
                              finish_trial_on_signal=finish_trial_on_signal)
    # Moved to the device once per worker, not once per trial.
    splits = load_mnist(data_dir, val_size=sweep.val_size, seed=sweep.seed).to(torch_device)
    worker = Worker(sweep, settings, tracker, splits, torch_device, log=lambda m: click.echo(m, err=True))
    worker.open()
    try:
        count = worker.run()
        worker.finish(plots=not no_plots)
    except KeyboardInterrupt as e:  # stop.Interrupted (SIGTERM 143, Ctrl-C 130), or Ctrl-C outside the loop
        worker.interrupted()
        fail(f"interrupted ({e or 'Ctrl-C'}); the current trial was closed, rerun the command to finish the study",
             code=getattr(e, "exit_code", 130))
    wall = time.perf_counter() - started
    click.echo(f"study {worker.name}: {count.finished}/{trials} trials ({count.complete} complete, "
               f"{count.pruned} pruned, {count.failed} failed) in {wall:.0f} s"
               + (f"; this worker ran {worker.trials_run}" if worker.trials_run != count.finished else ""))
    _print_best(worker.study, sweep.metric)
    top = sorted(tracker.seconds_by_call.items(), key=lambda kv: -kv[1])[:3]
    click.echo(f"tracking: {tracker.seconds:.1f} s in MLflow calls ({100 * tracker.seconds / wall:.1f} % of wall time: "
               + ", ".join(f"{name} {sec:.1f} s" for name, sec in top) + ")")
    if worker.trial_seconds:
        click.echo(f"  inside trials: {worker.trial_tracking_seconds:.1f} s of {worker.trial_seconds:.0f} s "
                   f"({100 * worker.trial_tracking_seconds / worker.trial_seconds:.1f} %)")
    click.echo("UI: mnist-tune ui" + ("" if tracker.is_embedded else f" or {tracker.uri}"))


def _best_trial(study_obj):
    try:
        return study_obj.best_trial
    except ValueError:
        return None


def _print_best(study_obj, metric: str) -> None:
    best = _best_trial(study_obj)
    if best is None:
        click.echo("no completed trial yet")
        return
    run_id = best.user_attrs.get("mlflow_run_id", "?")
    click.echo(f"best trial {best.number}: {metric} {best.value:.4f}  test_acc "
               f"{best.user_attrs.get('test_acc', float('nan')):.4f}  run {run_id}")
    click.echo(f"model: runs:/{run_id}/model")


@cli.command()
@click.option("--study", "study_name", required=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@storage_options
def best(study_name, as_json, storage, storage_file, tracking_uri, tracking_uri_file):
    """The best trial: number, params, val/test accuracy, MLflow run id."""
    import json

    from mnist_tune.study import WorkerSettings, load_existing_study, open_storage

    storage, _ = _urls(storage, storage_file, tracking_uri, tracking_uri_file)
    found = load_existing_study(open_storage(storage, WorkerSettings(trials=1)), study_name)
    trial = _best_trial(found)
    if trial is None:
        raise MnistTuneError(f"study {study_name!r} has no completed trial yet")
    metric = found.user_attrs.get("sweep", {}).get("metric", "value")
    record = {"study": study_name, "trial": trial.number, "metric": metric, "value": trial.value,
              "test_acc": trial.user_attrs.get("test_acc"), "run_id": trial.user_attrs.get("mlflow_run_id"),
              "model_uri": f"runs:/{trial.user_attrs.get('mlflow_run_id')}/model", "params": trial.params}
    if as_json:
        click.echo(json.dumps(record, indent=2))
        return
    click.echo(f"study {study_name}: best trial {trial.number}")
    click.echo(f"  {metric:<10} {trial.value:.4f}")
    click.echo(f"  test_acc   {record['test_acc']:.4f}" if record["test_acc"] is not None else "  test_acc   -")
    click.echo(f"  run_id     {record['run_id']}")
    click.echo(f"  model      {record['model_uri']}")
    for key, value in trial.params.items():
        click.echo(f"  {key:<10} {value}")


@cli.command()
@click.option("--study", "study_name", required=True)
@storage_options
def status(study_name, storage, storage_file, tracking_uri, tracking_uri_file):
    """Trials by state, live workers (by heartbeat), budget left, best so far."""
    from mnist_tune.study import WorkerSettings, open_storage, study_status

    storage, _ = _urls(storage, storage_file, tracking_uri, tracking_uri_file)
    st = study_status(open_storage(storage, WorkerSettings(trials=1)), study_name)
    states = ", ".join(f"{n} {k.lower()}" for k, n in sorted(st.by_state.items())) or "no trials"
    click.echo(f"study {st.name}: {states}")
    click.echo(f"  live workers: {len(st.live)}" + (f" (running trials {', '.join(map(str, st.live))})"
                                                     if st.live else ""))
    click.echo(f"  budget: {st.budget} trials, {st.count.used} used, {st.left} left" if st.budget is not None
               else "  budget: unknown (no worker has started)")
    if st.best is not None:
        click.echo(f"  best: trial {st.best.number}, value {st.best.value:.4f}, test_acc "
                   f"{st.best.user_attrs.get('test_acc', float('nan')):.4f}, run {st.best.user_attrs.get('mlflow_run_id')}")
    else:
        click.echo("  best: none yet")


@cli.command()
@click.option("--study", "study_name", required=True)
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table")
@storage_options
def runs(study_name, fmt, storage, storage_file, tracking_uri, tracking_uri_file):
    """All trials of a study, from MLflow, best first."""
    from mnist_tune.tracking import Tracker, trials_table

    _, tracking_uri = _urls(storage, storage_file, tracking_uri, tracking_uri_file)
    table = trials_table(Tracker(tracking_uri), study_name)
    if fmt == "csv":
        click.echo(table.to_csv(index=False), nl=False)
    elif fmt == "json":
        click.echo(table.to_json(orient="records", indent=2))
    else:
        import pandas as pd

        with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 200):
            click.echo(table.to_string(index=False))


def _model_uri(run_id, model_uri) -> str:
    if bool(run_id) == bool(model_uri):
        raise MnistTuneError("give exactly one of --run-id or --model-uri")
    return model_uri or f"runs:/{run_id}/model"


@cli.command()
@click.option("--run-id", default=None)
@click.option("--model-uri", default=None, help="e.g. models:/mnist-mlp@champion")
@data_dir_option
@tracking_option
def evaluate(run_id, model_uri, data_dir, tracking_uri):
    """Reload a logged model from MLflow and report its test accuracy."""
    from mnist_tune.data import load_test_split
    from mnist_tune.tracking import Tracker, load_model
    from mnist_tune.train import evaluate as evaluate_split

    uri = _model_uri(run_id, model_uri)
    tracker = Tracker(tracking_uri)
    logged = tracker.get_run(run_id).data.metrics.get("test_acc") if run_id else None
    model = load_model(uri, tracker.uri)
    _, acc = evaluate_split(model, *load_test_split(data_dir))
    click.echo(f"{uri}: test_acc {acc:.4f}" + (f" (logged {logged:.4f})" if logged is not None else ""))


@cli.command()
@click.option("--run-id", default=None)
@click.option("--model-uri", default=None)
@click.option("--invert", is_flag=True, help="Images are dark digits on a light background.")
@click.argument("images", nargs=-1, required=True, type=click.Path())
@tracking_option
def predict(run_id, model_uri, invert, images, tracking_uri):
    """Classify image files (grayscale; resized to 28x28): label and probability each."""
    from mnist_tune.predict import classify, read_images
    from mnist_tune.tracking import Tracker, load_model

    uri = _model_uri(run_id, model_uri)
    batch = read_images(images, invert=invert)  # unreadable files fail before the model loads
    tracker = Tracker(tracking_uri)
    if run_id:
        tracker.get_run(run_id)
    for path, (label, prob) in zip(images, classify(load_model(uri, tracker.uri), batch)):
        click.echo(f"{path}: {label} ({prob:.3f})")


@cli.command()
@click.option("--host", default="127.0.0.1", help="Loopback by default; 0.0.0.0 exposes it to the network.")
@click.option("--port", type=int, default=5000)
@tracking_option
def ui(host, port, tracking_uri):
    """Start the MLflow UI on the embedded store (or show where a server's UI is)."""
    import os

    from mnist_tune.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        click.echo(f"the tracking server serves its own UI: {uri}")
        return
    click.echo(f"MLflow UI on http://{host}:{port} for {uri}", err=True)
    os.execv(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                              "--host", host, "--port", str(port), "--workers", "1"])


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
