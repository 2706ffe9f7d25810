"""`mnist-tune ui`: the MLflow UI on a store, started safely, with direct links to the newest study.

    serve(tracking_uri=None, host="127.0.0.1", port=5000)

Before anything starts: a taken port and a store that does not exist are refused with one line
(nothing is created). The UI runs as ``python -m mlflow ui`` in its own process group with
MLflow's job workers off (3.17 starts huey workers that outlive a failed start); the whole group
is ended on return, Ctrl-C and SIGTERM, so nothing is left behind.

Once ``/health`` answers, the links below are printed. They use the MLflow 3 UI's own URL
state: ``workflowType=machine_learning`` (the *Model training* view; a fresh browser opens in
*GenAI*), ``viewStateShareKey`` (a saved view: which columns the runs table shows; the UI's
*Share* button stores it as the experiment tag ``mlflow.sharedViewState.<key>``), and
``#/compare-runs?runs=[...]&experiments=[...]``.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from mnist_tune.errors import MnistTuneError
from mnist_tune.record import ROLE, STUDY, TEST_METRIC
from mnist_tune.stores import redact, resolve_tracking_uri, sqlite_path

# The runs table's saved view: parent expanded to its trials, these columns visible.
SHARED_VIEW_TAG = "mlflow.sharedViewState."
HIDDEN_PARAMS = {"device", "parameters", "seed"}  # differ between trials but are not searched
COMPARE_TOP = 3


@dataclass
class StudyLinks:
    """Direct UI links for one study (all absolute URLs)."""

    study: str
    experiment_id: str
    runs: str  # the experiment's runs, Model training view
    table: str  # the same with params, val_acc and test_acc as columns (a shared view)
    chart: str  # the chart view (val_acc per epoch, params) of the same runs
    parent: str  # the study's parent run page (plots under Artifacts)
    compare: str | None  # Compare page of the top trials by the study metric
    top_trials: list[str] = field(default_factory=list)  # "trial-3 (val_acc 0.981)"
    params: list[str] = field(default_factory=list)  # the searched params
    metric: str = "val_acc"


# mnist_tune.tracking imports mlflow (~2-4 s here): serve() starts the UI first and imports it
# (for the links) while the UI starts. These two mirror tracking.resolve_tracking_uri / redact;
# tests/test_ui.py checks that they agree.
def check_store(uri: str) -> None:
    """Refuse a SQLite store that does not exist; create nothing (MLflow would create it)."""
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise MnistTuneError(
            f"no MLflow store at {path} (from {redact(uri)}); create one with "
            f"`mnist-tune study --model mlp` (or `mnist-tune train`), or point --tracking-uri at an existing store")
    if uri.startswith("sqlite:") and path is None:
        raise MnistTuneError(f"unsupported SQLite URI {uri}: use sqlite:///<absolute or relative path>")


def check_port(host: str, port: int) -> None:
    """Raise if ``host:port`` cannot be bound now (the same test uvicorn makes, in milliseconds)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind((host, port))
        except OSError as e:
            hint = f", e.g. --port {_free_port(host)}" if e.errno == 98 else ""
            what = "is already in use" if e.errno == 98 else f"cannot be used ({e.strerror})"
            raise MnistTuneError(f"port {port} on {host} {what}; pick another with --port{hint}") from None


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host if ":" not in host else "127.0.0.1", 0))
        return s.getsockname()[1]


def base_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def shared_view(study: str, metric: str, descending: bool, params: list[str]) -> tuple[str, str]:
    """The experiment tag (name, JSON value) of a runs-table view: the study's trials only (a
    flat list, best first by ``metric``) with ``params`` and the scores as columns. Its key goes
    in the URL as ``viewStateShareKey`` (search facets in the URL itself would override it)."""
    metrics = list(dict.fromkeys([metric, "val_acc", TEST_METRIC]))
    state = {
        "searchFilter": f"tags.`{ROLE}` = 'trial' AND tags.`{STUDY}` = '{study}'",
        "orderByKey": f"metrics.`{metric}`",
        "orderByAsc": not descending,
        "selectedColumns": [f"metrics.`{m}`" for m in metrics] + [f"params.`{p}`" for p in params],
        # The chart view (compareRunsMode=CHART): one section "Study" with parallel coordinates
        # of the params coloured by the metric, then the metric per epoch, val_loss, test_acc.
        "compareRunSections": [{"uuid": "mnist-tune-study", "name": "Study", "display": True,
                                "isReordered": False, "deleted": False, "isGenerated": False}],
        "compareRunCharts": [
            _chart("PARALLEL", "parallel", selectedParams=params, selectedMetrics=[metric], showAllRuns=False),
            *(_chart("LINE", m, metricKey=m, selectedMetricKeys=[m], lineSmoothness=0, xAxisKey="step",
                     xAxisScaleType="linear", scaleType="linear", yAxisKey="metric", range={})
              for m in dict.fromkeys([metric, "val_acc", "val_loss"])),
            _chart("BAR", TEST_METRIC, metricKey=TEST_METRIC),
        ],
        "isAccordionReordered": True,
    }
    value = json.dumps(state, separators=(",", ":"))
    key = "mnist-tune-" + hashlib.sha256(value.encode()).hexdigest()[:12]
    return SHARED_VIEW_TAG + key, value


def _chart(kind: str, name: str, **fields) -> dict:
    return {"uuid": f"mnist-tune-{name}", "type": kind, "runsCountToCompare": 20,
            "metricSectionId": "mnist-tune-study", "deleted": False, "isGenerated": False, **fields}


def searched_params(trials) -> list[str]:
    """Params whose values differ between trials (the searched ones), lr and batch_size first."""
    values: dict[str, set[str]] = {}
    for r in trials:
        for k, v in r.data.params.items():
            values.setdefault(k, set()).add(v)
    varied = [k for k, v in values.items() if len(v) > 1 and k not in HIDDEN_PARAMS]
    if not varied:
        varied = [k for k in ("lr", "batch_size") if k in values]
    return sorted(varied, key=lambda k: ({"lr": 0, "batch_size": 1}.get(k, 2), k))


def study_links(tracking_uri: str, url: str, study: str | None = None, save_view: bool = True) -> StudyLinks | None:
    """Links for ``study`` (default: the study whose parent run started last), or None if the
    store holds no study. ``save_view`` writes the shared-view experiment tag if missing."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    where = f"tags.`{ROLE}` = 'study'" + (f" AND tags.`{STUDY}` = '{study}'" if study else "")
    parents = client.search_runs(experiments, where, order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        return None
    parent = parents[0]
    name, experiment_id = parent.data.tags.get(STUDY, parent.info.run_name), parent.info.experiment_id
    metric = parent.data.params.get("metric", "val_acc")
    descending = parent.data.params.get("direction", "maximize") != "minimize"
    trials = client.search_runs([experiment_id], f"tags.`{ROLE}` = 'trial'",
                                order_by=[f"metrics.`{metric}` {'DESC' if descending else 'ASC'}"], max_results=200)
    params = searched_params(trials)
    scored = [r for r in trials if metric in r.data.metrics and r.info.status == "FINISHED"]
    top = scored[:COMPARE_TOP]

    tag, value = shared_view(name, metric, descending, params)
    if save_view:
        experiment = client.get_experiment(experiment_id)
        if experiment.tags.get(tag) != value:
            client.set_experiment_tag(experiment_id, tag, value)
    ml = "workflowType=machine_learning"
    plots_page = "/artifacts"  # the study's plots page when it has one, else its artifacts
    try:
        if any(a.path == "plots/study.html" for a in client.list_artifacts(parent.info.run_id, "plots")):
            plots_page = "/artifacts/plots/study.html"
    except Exception:  # artifacts elsewhere (a server's store we cannot list): the folder view
        pass
    runs = f"{url}/#/experiments/{experiment_id}/runs?{ml}"
    key = tag[len(SHARED_VIEW_TAG):]
    compare = None
    if len(top) >= 2:
        query = urllib.parse.urlencode({"runs": json.dumps([r.info.run_id for r in top], separators=(",", ":")),
                                        "experiments": json.dumps([experiment_id], separators=(",", ":"))})
        compare = f"{url}/#/compare-runs?{query}"
    return StudyLinks(
        study=name, experiment_id=experiment_id, runs=runs,
        table=f"{runs}&viewStateShareKey={key}",
        chart=f"{runs}&viewStateShareKey={key}&compareRunsMode=CHART",
        parent=f"{url}/#/experiments/{experiment_id}/runs/{parent.info.run_id}{plots_page}?{ml}",
        compare=compare,
        top_trials=[f"{r.info.run_name} ({metric} {r.data.metrics[metric]:.4f})" for r in top],
        params=params, metric=metric)


def format_links(links: StudyLinks | None, url: str) -> str:
    if links is None:
        return f"MLflow UI: {url}  (no study in this store yet: `mnist-tune study --model mlp`)"
    lines = [
        f"MLflow UI: {url}",
        f"study {links.study!r} (experiment {links.experiment_id}), Model training view:",
        f"  runs:            {links.runs}",
        f"  params + scores: {links.table}",
        f"  charts:          {links.chart}",
        f"  study plots:     {links.parent}",
    ]
    if links.compare:
        lines.append(f"  compare top {len(links.top_trials)}:   {links.compare}")
        lines.append(f"                   {', '.join(links.top_trials)}; the page keeps no plot choice in its URL:"
                     f" Clear All, then Parameters {', '.join(links.params) or '...'} and Metrics {links.metric}")
    return "\n".join(lines)


def ui_command(uri: str, host: str, port: int, artifacts: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host,
           "--port", str(port), "--workers", "1"]
    if artifacts is not None:  # else `mlflow ui` puts new artifacts under ./mlartifacts
        cmd += ["--artifacts-destination", str(artifacts)]
    return cmd


def ui_env() -> dict[str, str]:
    """No huey job workers (they serve GenAI jobs, outlive a failed start, and cost startup time)."""
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group of ``proc`` (started with start_new_session), then SIGKILL."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:  # the group may outlive its leader (a worker that ignores SIGTERM)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> float:
    """Seconds until ``url/health`` answers 200; raises if the process exits or time runs out."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise MnistTuneError(f"the MLflow UI exited with status {proc.returncode} before answering on {url}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as reply:
                if reply.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.1)
    raise MnistTuneError(f"the MLflow UI did not answer on {url} within {timeout:.0f} s")


class _Terminated(Exception):
    pass


def serve(tracking_uri: str | None = None, host: str = "127.0.0.1", port: int = 5000, *,
          study: str | None = None, out=print, ready_timeout: float = 120.0, on_ready=None) -> int:
    """Run the MLflow UI for ``tracking_uri`` until it exits, Ctrl-C or SIGTERM; returns its
    exit status (0 after Ctrl-C/SIGTERM). Raises MnistTuneError, before starting anything, for
    a taken port or a missing store. ``on_ready(url, links)`` is called once it answers (tests)."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        url = redact(uri).rstrip("/")
        out(f"the tracking server serves its own UI: {url}")
        try:  # its links, if it can be asked
            links = study_links(uri, url, study)
        except Exception:
            return 0
        out(format_links(links, url))
        return 0
    check_store(uri)
    check_port(host, port)
    path = sqlite_path(uri)
    artifacts = path.parent / "artifacts" if path is not None else None
    url = base_url(host, port)

    proc = subprocess.Popen(ui_command(uri, host, port, artifacts), env=ui_env(), start_new_session=True,
                            stdin=subprocess.DEVNULL)

    def on_sigterm(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    # The links need the store (a few seconds on a busy machine): found while the UI starts.
    pool = concurrent.futures.ThreadPoolExecutor(1)
    finding = pool.submit(study_links, uri, url, study)
    try:
        seconds = wait_ready(url, proc, ready_timeout)
        try:
            links = finding.result()
        except Exception as e:  # the links are a convenience; the UI is up either way
            links = None
            out(f"(no study links: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})")
        out(f"ready in {seconds:.1f} s; Ctrl-C stops it")
        out(format_links(links, url))
        if on_ready is not None:
            on_ready(url, links)
        return proc.wait()
    except (KeyboardInterrupt, _Terminated):
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_group(proc)
        pool.shutdown(wait=True, cancel_futures=True)
