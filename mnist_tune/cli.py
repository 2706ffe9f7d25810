"""The ``mnist-tune`` command line: each command parses, calls one function, prints.

Every user error (MnistTuneError, bad option) prints ``error: <message>`` on stderr and exits
with status 2 (a diverged run: 1); Ctrl-C / SIGTERM exit 130 / 143. Validation happens before
training and before anything is written to a store. Modules load inside the commands, so
``--help``, errors and the read-only commands do not pay for torch or MLflow.
"""

from __future__ import annotations

import sys

import click

from mnist_tune.errors import MnistTuneError
from mnist_tune.output import FORMATS
from mnist_tune.tunables import MODEL_NAMES

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


def format_option(f):
    return click.option("--format", "fmt", type=click.Choice(FORMATS), default="table",
                        help="table for people; json/csv with full precision for machines.")(f)


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
    from mnist_tune.stores import from_file

    return from_file(storage, storage_file, "storage"), from_file(tracking_uri, tracking_uri_file, "tracking URI")


def _existing_study(storage_url: str | None, name: str):
    from mnist_tune.study import load_existing_study, open_existing_storage

    return load_existing_study(open_existing_storage(storage_url), name)


def _pack_size(value: str):
    from mnist_tune.packed_worker import parse_pack

    try:
        return parse_pack(value)
    except MnistTuneError as e:
        raise click.BadParameter(str(e)) from None


class _Stopped(Exception):
    """Carries Ctrl-C/SIGTERM past click, which would turn it into a bare Abort."""


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            raise _Stopped from e


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
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

    click.echo(str(prefetch(data_dir, log=lambda msg: click.echo(msg, err=True))))


# ---------------------------------------------------------------------------- train


def tunable_options(f):
    """``train``'s hyperparameter options, one per entry of the tunables table."""
    from mnist_tune.tunables import TUNABLES, click_option

    for tunable in reversed(TUNABLES.values()):
        decls, attrs = click_option(tunable)
        f = click.option(*decls, **attrs)(f)
    return f


@cli.command()
@click.option("--model", "model_name", type=click.Choice(MODEL_NAMES), default="mlp")
@click.option("--val-size", type=click.IntRange(min=1), default=5000, help="Images held out of the 60k for validation.")
@tunable_options
@click.option("--device", default="auto", help=DEVICE_HELP)
@click.option("--experiment", default="mnist-tune-train", help="MLflow experiment for the run.")
@click.option("--run-name", default=None)
@data_dir_option
@tracking_option
def train(model_name, device, val_size, experiment, run_name, data_dir, tracking_uri, **hp):
    """Train one model with explicit hyperparameters, tracked as one MLflow run."""
    from mnist_tune.checks import check_name
    from mnist_tune.tunables import TUNABLES, hyperparameter_problems, split_hyperparameters

    check_name(experiment, "--experiment")
    if run_name is not None:
        check_name(run_name, "--run-name")
    source = click.get_current_context().get_parameter_source
    given = {k: v for k, v in hp.items() if v is not None and source(k) is not click.core.ParameterSource.DEFAULT}
    for name, problem in hyperparameter_problems(model_name, given):
        raise MnistTuneError(f"{TUNABLES[name].flag} {problem}")
    model_hp, train_hp = split_hyperparameters(
        {k: v for k, v in hp.items() if v is not None and model_name in TUNABLES[k].models})
    from mnist_tune.data import load_mnist  # torch: only once the input is known good
    from mnist_tune.run import check_model_hp, train_run
    from mnist_tune.tracking import Tracker
    from mnist_tune.train import TrainConfig, resolve_device

    hp = TrainConfig(**train_hp)
    check_model_hp(model_name, model_hp)
    torch_device = resolve_device(device)
    tracker = Tracker(tracking_uri)  # checks the server is reachable; writes nothing yet
    splits = load_mnist(data_dir, val_size=val_size, seed=hp.seed)
    run_id, outcome = train_run(tracker, experiment, run_name or f"{model_name}-train", model_name, model_hp, hp,
                                splits, torch_device)
    seconds = sum(m.epoch_seconds for m in outcome.history) / len(outcome.history)
    click.echo(f"run {run_id}: val_acc {outcome.history[-1].val_acc:.4f}  test_acc {outcome.test_acc:.4f}  "
               f"({seconds:.2f} s/epoch)")
    click.echo(f"model: runs:/{run_id}/model   tracking: {tracker.uri}")


# ---------------------------------------------------------------------------- study


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
@click.option("--pack", default="auto", callback=lambda ctx, param, value: _pack_size(value),
              help="Trials trained at once as one fused model (same shapes); auto: 1 on the CPU, on CUDA "
                   "the most that fit a short dry run (1 where the sweep searches the architecture).")
@click.option("--max-params", type=click.IntRange(min=1), default=None,
              help="Multi-objective sweeps: the champion's limit on trainable parameters (also the sampler's).")
@click.option("--max-latency-ms", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Multi-objective sweeps: the champion's limit on batch-1 CPU latency (also the sampler's).")
@click.option("--confirm-top", type=click.IntRange(min=0), default=0,
              help="After the budget, retrain the top K configurations with new seeds (0: off).")
@click.option("--confirm-seeds", type=click.IntRange(min=1), default=None,
              help="New seeds per confirmed configuration; the champion is the best mean  [default: 3].")
@click.option("--enqueue", type=click.Path(dir_okay=False), default=None,
              help="A YAML/JSON list of configurations to try first (added to a new or existing study).")
@click.option("--warm-start-from", default=None,
              help="Copy the finished trials of this study (same storage, compatible sweep) in first.")
@data_dir_option
@storage_options
def study(model_name, sweep_file, epochs, val_size, device, no_plots, threads, data_dir, storage, storage_file,
          tracking_uri, tracking_uri_file, **settings):
    """Run (or join, or finish) an Optuna study; every trial is a nested MLflow run."""
    from mnist_tune.checks import check_name

    if settings["study_name"] is not None:  # "" too: it must not fall back to the sweep's name
        check_name(settings["study_name"], "--study-name")
    if not model_name and not sweep_file:
        raise MnistTuneError("give --model mlp|mixer or --sweep FILE")
    from mnist_tune.config import sweep_for
    from mnist_tune.study import WorkerSettings

    storage, tracking_uri = _urls(storage, storage_file, tracking_uri, tracking_uri_file)
    sweep = sweep_for(model_name, sweep_file).with_overrides(epochs=epochs, val_size=val_size)
    if settings["study_name"] is None:
        check_name(sweep.name, f"{sweep.path}: name")
    from mnist_tune.config import load_enqueue_file

    settings["enqueue"] = load_enqueue_file(settings["enqueue"], sweep) if settings["enqueue"] else ()
    if settings["warm_start_from"] is not None:  # refused here, before any store is written
        from mnist_tune.study import open_existing_storage
        from mnist_tune.warm import warm_start_trials

        check_name(settings["warm_start_from"], "--warm-start-from")
        warm_start_trials(open_existing_storage(storage), settings["warm_start_from"], sweep,
                          settings["study_name"] or sweep.name)
    settings = WorkerSettings(storage=storage, plots=not no_plots, **settings)
    from mnist_tune import confirm, pareto

    pareto.check_settings(sweep, settings)
    confirm.check_settings(settings)
    from mnist_tune.worker import run_study  # torch and MLflow: only once the input is known good

    for line in run_study(sweep, settings, tracking_uri, data_dir, device, threads,
                          log=lambda m: click.echo(m, err=True)):
        click.echo(line)


@cli.command()
@click.option("--study", "study_name", required=True)
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@format_option
@storage_options
def best(study_name, as_json, fmt, storage, storage_file, tracking_uri, tracking_uri_file):
    """The best trial: number, params, val/test accuracy, MLflow run id."""
    from mnist_tune.output import best_table, render
    from mnist_tune.pareto import csv_rows
    from mnist_tune.study import best_record

    found = _existing_study(_urls(storage, storage_file, tracking_uri, tracking_uri_file)[0], study_name)
    shown, fmt = best_record(found), "json" if as_json else fmt
    click.echo(render(csv_rows(shown) if fmt == "csv" and "pareto" in shown else shown, fmt, best_table))


@cli.command()
@click.option("--study", "study_name", required=True)
@format_option
@storage_options
def status(study_name, fmt, storage, storage_file, tracking_uri, tracking_uri_file):
    """Trials by state, live workers (by heartbeat), budget left, best so far."""
    from mnist_tune.output import render, status_table
    from mnist_tune.study import open_existing_storage, status_record

    storage_url, _ = _urls(storage, storage_file, tracking_uri, tracking_uri_file)
    click.echo(render(status_record(open_existing_storage(storage_url), study_name), fmt, status_table))


@cli.command()
@click.option("--study", "study_name", required=True)
@format_option
@storage_options
def runs(study_name, fmt, storage, storage_file, tracking_uri, tracking_uri_file):
    """All trials of a study, best first (from the Optuna storage)."""
    from mnist_tune.output import render, trials_table
    from mnist_tune.study import SWEEP_ATTR, study_metric, trial_rows

    found = _existing_study(_urls(storage, storage_file, tracking_uri, tracking_uri_file)[0], study_name)
    fixed = found.user_attrs.get(SWEEP_ATTR, {}).get("fixed", {})
    click.echo(render(trial_rows(found), fmt, lambda rows: trials_table(rows, study_name, study_metric(found), fixed)))


# ------------------------------------------------------------------------ models


def _model_uri(run_id, model_uri) -> str:
    if bool(run_id) == bool(model_uri):
        raise MnistTuneError("give exactly one of --run-id or --model-uri")
    return model_uri or f"runs:/{run_id}/model"


@cli.command()
@click.option("--run-id", default=None)
@click.option("--model-uri", default=None, help="e.g. models:/mnist-mlp@champion")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.option("--log/--no-log", "log_to_run", default=True,
              help="Record per-class metrics and the confusion matrix on the run (--run-id).")
@data_dir_option
@tracking_option
def evaluate(run_id, model_uri, fmt, log_to_run, data_dir, tracking_uri):
    """Reload a logged model from MLflow: test accuracy, per digit too, confusion matrix."""
    import json

    from mnist_tune.data import load_test_split
    from mnist_tune.record import MODEL_URI_ATTR, TEST_METRIC
    from mnist_tune.report import classifier_report, format_report, log_report
    from mnist_tune.tracking import Tracker, load_model

    uri = _model_uri(run_id, model_uri)
    tracker = Tracker(tracking_uri)
    logged = tracker.get_run(run_id).data.metrics.get(TEST_METRIC) if run_id else None
    report = classifier_report(load_model(uri, tracker.uri), *load_test_split(data_dir))
    if run_id and log_to_run:
        log_report(tracker, run_id, report)
    if fmt == "json":
        click.echo(json.dumps({MODEL_URI_ATTR: uri, "run_id": run_id, "logged_test_acc": logged, **report}, indent=2))
        return
    click.echo(f"{uri}: test_acc {report['accuracy']:.4f}" + (f" (logged {logged:.4f})" if logged is not None else ""))
    click.echo(format_report(report))


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
@click.option("--study", "study_name", default=None, help="Study to link to [default: the newest].")
@tracking_option
def ui(host, port, study_name, tracking_uri):
    """Start the MLflow UI on the embedded store and print links into the study (or show
    where a server's UI is)."""
    from mnist_tune.ui import serve

    sys.exit(serve(tracking_uri, host, port, study=study_name, out=click.echo))


@cli.command()
@click.option("--study", "study_name", required=True)
@click.option("--host", default="127.0.0.1", help="Loopback by default; 0.0.0.0 exposes it (no login!).")
@click.option("--port", type=int, default=8080)
@click.option("--wait", type=click.FloatRange(min=0), default=0, help="Seconds to wait for the study to appear.")
@storage_options
def dashboard(study_name, host, port, wait, storage, storage_file, tracking_uri, tracking_uri_file):
    """optuna-dashboard on the study's storage (read-only); Ctrl-C stops it."""
    from mnist_tune.dashboard import serve

    serve(_urls(storage, storage_file, tracking_uri, tracking_uri_file)[0], study_name, host, port, wait=wait,
          log=click.echo)


def main() -> None:
    from mnist_tune.auth import CLIENT_SECRETS, auth_error, resolve_secret_files

    try:
        resolve_secret_files(CLIENT_SECRETS)  # MLFLOW_TRACKING_*_FILE -> the variables MLflow reads
        cli.main(standalone_mode=False)
    except MnistTuneError as e:
        fail(str(e), e.exit_code)
    except click.exceptions.Abort:
        fail("interrupted", code=130)
    except click.ClickException as e:
        fail(e.format_message(), code=e.exit_code)
    except _Stopped as stopped:  # stop.Interrupted (SIGTERM 143, Ctrl-C 130), or a plain Ctrl-C
        e = stopped.__cause__
        outcome = getattr(e, "outcome", "")
        fail(f"interrupted ({e or 'Ctrl-C'})" + (f"; {outcome}" if outcome else ""), code=getattr(e, "exit_code", 130))
    except KeyboardInterrupt:
        fail("interrupted", code=130)
    except Exception as e:  # a 401/403 met after the start-up check (a grant missing or revoked)
        refused = auth_error(e)
        if refused is None:
            raise
        fail(str(refused))
