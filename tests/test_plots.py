"""Study plots: what is written for small and ordinary studies, and how long it takes."""

import math

import optuna
import pytest

from mnist_tune.plots import PLOTS, _log_ticks, write_study_plots

optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_study(n_trials: int, fail_first: int = 0, prune_all: bool = False, seed: int = 0) -> optuna.Study:
    """A study shaped like the project's: lr (log), batch_size (categorical), dropout, weight
    decay (log), schedule; val_acc reported per epoch; the median pruner."""
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
                                study_name="fake")

    def objective(trial):
        lr = trial.suggest_float("lr", 3e-4, 1e-2, log=True)
        batch = trial.suggest_categorical("batch_size", [64, 100, 128, 256])
        dropout = trial.suggest_float("dropout", 0.0, 0.4)
        trial.suggest_float("weight_decay", 1e-5, 1e-1, log=True)
        trial.suggest_categorical("schedule", ["constant", "cosine", "onecycle"])
        if trial.number < fail_first:
            raise RuntimeError("diverged")
        final = 0.98 - 0.02 * abs(math.log10(lr) + 2.7) - 0.01 * dropout - 0.005 * batch / 256
        for epoch in range(1, 6):
            trial.report(final - 0.05 * math.exp(-epoch), epoch)
            if prune_all or trial.should_prune():
                raise optuna.TrialPruned()
        return final - 0.05 * math.exp(-5)

    study.optimize(objective, n_trials=n_trials, catch=(RuntimeError,))
    return study


def test_full_study_writes_html_and_a_png_per_plot(tmp_path):
    study = make_study(20)
    reasons = []
    paths = write_study_plots(study, tmp_path / "plots", "val_acc", log=reasons.append)
    assert reasons == []
    names = sorted(p.name for p in paths)
    assert names == sorted(["study.html", *(f"{name}.png" for name in PLOTS)])
    html = (tmp_path / "plots" / "study.html").read_text()
    assert html.count("plotly.js v") == 1  # plotly.js embedded once (MLflow's viewer is a sandboxed blob iframe)
    assert html.count('class="plotly-graph-div"') == len(PLOTS)
    assert "<script src=" not in html  # works offline: nothing loaded from elsewhere
    for p in paths:
        assert p.stat().st_size > 5000
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert p.stat().st_size < 300_000


@pytest.mark.parametrize("study_args, expected, skipped", [
    (dict(n_trials=0), set(), set(PLOTS)),
    (dict(n_trials=3, fail_first=3), set(), set(PLOTS)),
    (dict(n_trials=1), {"history", "curves"}, {"importances", "parallel", "lr_batch"}),
    (dict(n_trials=3, prune_all=True), {"curves"}, {"history", "importances", "parallel", "lr_batch"}),
])
def test_tiny_studies_skip_with_a_reason(tmp_path, study_args, expected, skipped):
    study = make_study(**study_args)
    reasons = []
    paths = write_study_plots(study, tmp_path / "plots", "val_acc", log=reasons.append)
    assert {p.stem for p in paths if p.suffix == ".png"} == expected
    assert ("study.html" in {p.name for p in paths}) == bool(expected)
    assert {r.split()[1] for r in reasons} == skipped
    assert all("skipped: " in r and len(r.split("skipped: ")[1]) > 10 for r in reasons)
    if not expected:
        assert not (tmp_path / "plots").exists()  # nothing to show: no empty folder either


def test_parallel_coordinates_use_log_axes_for_log_params(tmp_path):
    study = make_study(12)
    from mnist_tune.plots import _StudyData, plot_parallel

    fig, _ = plot_parallel(_StudyData(study, "val_acc"))
    dims = {d["label"]: d for d in fig.data[0].dimensions}
    assert "lr (log)" in dims and "weight_decay (log)" in dims and "dropout" in dims
    assert list(dims["lr (log)"].ticktext) == ["0.0003", "0.001", "0.003", "0.01"]
    assert list(dims["batch_size"].ticktext) == ["64", "100", "128", "256"]
    assert len(dims["weight_decay (log)"].ticktext) <= 6


def test_log_ticks_are_few_and_round():
    assert _log_ticks(1e-5, 1e-1) == [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    assert _log_ticks(3e-4, 1e-2) == [3e-4, 1e-3, 3e-3, 1e-2]
    assert len(_log_ticks(1e-9, 1e3)) <= 6


def test_updates_during_a_study_write_the_page_only(tmp_path):
    """Called every few trials during a study: the HTML page only (the PNGs, ten times slower
    to draw, come at the end; benchmarks/RESULTS.md has the timings)."""
    study = make_study(40)
    page_only = write_study_plots(study, tmp_path / "html", "val_acc", png=False)
    assert [p.name for p in page_only] == ["study.html"]
    everything = write_study_plots(study, tmp_path / "all", "val_acc")
    assert {p.suffix for p in everything} == {".html", ".png"} and len(everything) > 2
