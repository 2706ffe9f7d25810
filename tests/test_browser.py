"""The MLflow UI as a person sees it, through Chromium: a real 4-trial study made with the CLI,
served by `mnist_tune.ui.serve`, checked on the pages its printed links open.

Needs Chromium at /usr/bin/chromium (`apt-get install -y chromium`) and the `playwright`
package (no browser download); skipped with the reason otherwise. Screenshots go to
tests/screenshots/ (git-ignored). About a minute on a 2-core machine.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from helpers import free_port, make_synthetic_mnist, run_cli, start_ui

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(__file__).parent / "screenshots"
TIMEOUT_MS = 30_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"),
]
playwright_api = pytest.importorskip("playwright.sync_api",
                                     reason="playwright is not installed (pip install playwright)")

# Every trial completes (no pruner, sane learning rates), so three can be compared.
SWEEP = """
name: browser
model: mlp
study:
  sampler: {name: random, seed: 1}
  pruner: {name: none}
train: {epochs: 3, val_size: 200}
fixed: {hidden_sizes: [16]}
space:
  lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
  batch_size: {type: categorical, choices: [50, 100]}
  dropout: {type: float, low: 0.0, high: 0.3}
"""


@pytest.fixture(scope="module")
def study_store(tmp_path_factory):
    """A real study made by the CLI on synthetic data, its parent run carrying the plots."""
    import optuna
    from mlflow.tracking import MlflowClient

    from mnist_tune.plots import write_study_plots

    root = tmp_path_factory.mktemp("browser")
    make_synthetic_mnist(root / "data")
    (root / "sweep.yaml").write_text(SWEEP)
    env = {**os.environ, "MNIST_TUNE_DATA": str(root / "data"),
           "MNIST_TUNE_CHECKSUMS": str(root / "data" / "md5sums.txt"),
           "MNIST_TUNE_HOME": str(root / "mlruns")}
    env.pop("MLFLOW_TRACKING_URI", None)
    run_cli("study", "--sweep", root / "sweep.yaml", "--trials", "4", env=env)
    tracking = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    study = optuna.load_study(study_name="browser", storage=f"sqlite:///{root / 'mlruns' / 'optuna.db'}")
    parent = study.user_attrs["mlflow_parent_run_id"]
    client = MlflowClient(tracking)
    if not any(a.path == "plots/study.html" for a in client.list_artifacts(parent, "plots")):
        for path in write_study_plots(study, root / "plots", "val_acc"):
            client.log_artifact(parent, str(path), "plots")
    return {"root": root, "tracking": tracking, "env": env, "parent": parent, "study": study, "client": client}


@pytest.fixture(scope="module")
def ui(study_store):
    """`serve()` in a subprocess, as `mnist-tune ui` runs it; its printed links."""
    port = free_port()
    proc, text = start_ui(study_store["tracking"], port, env=study_store["env"])
    try:
        assert "compare top 3" in text, text
        links = dict(re.findall(r"^\s+(runs|params \+ scores|charts|study plots|compare top 3):\s+(\S+)", text, re.M))
        yield {"url": f"http://127.0.0.1:{port}", "links": links, "text": text}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh browser profile (so MLflow opens in its default GenAI mode), 1280x800, with
    MLflow's assistant side panel kept closed (it opens itself on first load, taking a third
    of the width)."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.add_init_script("localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
                            "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');")
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    yield page
    context.close()


def shot(page, name: str) -> Path:
    SHOTS.mkdir(exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=path)
    return path


def grid_row(page, text: str):
    return page.locator("[role=row]", has_text=text).first


def test_runs_view_nests_trials_under_the_study(ui, page):
    page.goto(ui["links"]["runs"])
    parent = grid_row(page, "study-browser")
    parent.wait_for()
    assert page.get_by_text("Model training").first.is_visible()
    parent.locator('[col-id="attributes.`Run Name`"] button').first.click()  # expand the parent
    for n in range(4):
        grid_row(page, f"trial-{n}").wait_for()
    shot(page, "runs-nested")


def test_shared_view_shows_params_and_scores(ui, page, study_store):
    page.goto(ui["links"]["params + scores"])
    best = max((t for t in study_store["study"].trials if t.value is not None), key=lambda t: t.value)
    grid_row(page, "trial-").wait_for()
    headers = page.locator("[role=columnheader]").all_inner_texts()
    for column in ("val_acc", "test_acc", "lr", "batch_size", "dropout"):
        assert any(column == h.strip() for h in headers), (column, headers)
    # Best first: row 0 holds the best val_acc (ties possible) and that trial's batch size.
    row_text = " ".join(page.locator("[role=row][row-index='0']").all_inner_texts())
    name = re.search(r"trial-(\d+)", row_text)
    assert name, row_text
    trial = study_store["study"].trials[int(name.group(1))]
    assert trial.value == best.value
    numbers = [float(x) for x in re.findall(r"\d+\.\d+|\b1\b", row_text)]
    assert any(abs(x - best.value) < 1e-3 for x in numbers), (best.value, row_text)
    assert str(trial.params["batch_size"]) in row_text.split()
    shot(page, "runs-table")


def test_compare_three_trials_draws_parallel_coordinates_with_val_acc(ui, page):
    page.goto(ui["links"]["compare top 3"])
    page.get_by_text("Comparing 3 Runs").first.wait_for()
    plot = page.locator(".js-plotly-plot").first
    plot.wait_for()
    assert plot.locator(".parcoords").count() >= 1
    # The page picks its own params and metric (no URL state holds the choice): the click path
    # the README gives, Clear All, then the params and val_acc.
    page.get_by_role("button", name="Clear All").click()
    for index, names in ((0, ("lr", "batch_size", "dropout")), (1, ("val_acc",))):
        page.locator(".du-bois-light-select").nth(index).click()
        for name in names:
            page.locator(".du-bois-light-select-item-option", has_text=re.compile(f"^{name}$")).first.click()
        page.keyboard.press("Escape")
    page.wait_for_function("() => [...document.querySelectorAll('.parcoords .axis-title')]"
                           ".some(e => e.textContent === 'val_acc')")
    labels = plot.locator(".axis-title").all_text_contents()
    assert "val_acc" in labels and "lr" in labels, labels
    shot(page, "compare")


def test_chart_view_has_study_parallel_coordinates(ui, page):
    page.goto(ui["links"]["charts"])
    page.get_by_text("Study", exact=False).first.wait_for()
    page.locator(".parcoords").first.wait_for()
    shot(page, "charts")


def test_parent_run_html_plot_renders(ui, page, study_store):
    assert "/artifacts/plots/study.html?workflowType=machine_learning" in ui["links"]["study plots"]
    page.goto(ui["links"]["study plots"])
    frame = page.frame_locator("iframe.mlflow-html-iframe, iframe#html").first
    # at least four graphs; plotly draws them one after another, so wait for the fourth (a
    # count right after the first appeared read 3 once under load)
    frame.locator(".plotly-graph-div").nth(3).locator(".main-svg").first.wait_for()
    assert frame.get_by_text("study browser").first.is_visible()
    shot(page, "parent-plots")


def test_champion_version_and_logged_model_link_each_other(ui, page, study_store):
    client = study_store["client"]
    version = client.get_model_version_by_alias("mnist-mlp", "champion")
    run = client.get_run(version.run_id)
    found = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                        filter_string=f"source_run_id = '{version.run_id}'")
    assert len(found) == 1
    logged = found[0]
    model_id = logged.model_id
    experiment_id = logged.experiment_id
    page.goto(f"{ui['url']}/#/models/mnist-mlp/versions/{version.version}")
    link = page.locator(f"a[href*='{model_id}']").first
    link.wait_for()
    shot(page, "champion-version")
    page.goto(f"{ui['url']}/#/experiments/{experiment_id}/models/{model_id}")
    back = page.locator(f"a[href*='/models/mnist-mlp/versions/{version.version}']").first
    back.wait_for()
    assert "mnist-mlp" in back.inner_text()
    shot(page, "logged-model")
