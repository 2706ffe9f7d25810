"""`mnist-tune study --pack 4` on the CPU records what a sequential study records: one child
run per member under the one parent, trial states, params, per-epoch metrics and reloadable
models, checked trial by trial against Optuna as for a sequential study (test_study.py)."""

import mlflow
import optuna
import pytest
import torch

from mnist_tune.data import load_test_split
from mnist_tune.models import as_input

from helpers import run_cli
from test_study import check_study_matches_mlflow, embedded_tracking, optuna_storage

SWEEP = """
name: tiny
model: mlp
study:
  sampler: {name: random, seed: 0}
  pruner: {name: median, n_startup_trials: 1, n_warmup_steps: 0}
train: {epochs: 2, val_size: 200}
fixed: {hidden_sizes: [32]}
space:
  lr: {type: categorical, choices: [0.003, 1.0e-6, .inf]}
  batch_size: {type: categorical, choices: [50, 100]}
  dropout: {type: float, low: 0.0, high: 0.3}
"""


def child_layout(client, run_id):
    run = client.get_run(run_id)
    return sorted(run.data.params), sorted(run.data.metrics), sorted(run.data.tags), run.info.status


@pytest.mark.slow  # two studies through the CLI: ~1 min each on a shared 2-core machine
def test_pack_study_records_what_a_sequential_one_does(synthetic_env, tmp_path):
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(SWEEP)
    packed = run_cli("study", "--sweep", sweep, "--trials", 6, "--pack", 4, env=synthetic_env)
    assert "6/6 trials" in packed.stdout
    run_cli("study", "--sweep", sweep, "--trials", 6, "--pack", 1, "--study-name", "seq", env=synthetic_env)
    storage, tracking = optuna_storage(tmp_path), embedded_tracking(tmp_path)
    study, client, parent, runs = check_study_matches_mlflow(storage, tracking, "tiny", expect_trials=6)
    seq, _, seq_parent, seq_runs = check_study_matches_mlflow(storage, tracking, "seq", expect_trials=6)
    assert parent.info.status == seq_parent.info.status == "FINISHED"
    assert {t.state.name for t in study.trials} == {t.state.name for t in seq.trials} == {"COMPLETE", "PRUNED", "FAIL"}
    # a round's members share its first trial's batch size (one pack); the sampler proposed the rest
    rounds = [study.trials[:4], study.trials[4:]]
    assert all(len({t.params["batch_size"] for t in r}) == 1 for r in rounds)
    assert len({t.params["lr"] for t in study.trials}) > 1
    layouts = {s.state: child_layout(client, seq_runs[s.number].info.run_id) for s in seq.trials}
    for t in study.trials:
        assert sorted(t.params) == sorted(seq.trials[0].params)
        assert sorted(t.user_attrs) == sorted(next(s for s in seq.trials if s.state == t.state).user_attrs)
        mine, theirs = child_layout(client, runs[t.number].info.run_id), layouts[t.state]
        assert mine[0] == theirs[0] and mine[1] == theirs[1] and mine[3] == theirs[3]
        assert set(mine[2]) - {"mlflow.loggedArtifacts"} == set(theirs[2]) - {"mlflow.loggedArtifacts"}
    # every completed member's model reloads with plain MLflow and scores its logged test accuracy
    mlflow.set_tracking_uri(tracking)
    images, labels = load_test_split()
    for t in study.trials:
        if t.state != optuna.trial.TrialState.COMPLETE:
            continue
        model = mlflow.pytorch.load_model(f"runs:/{t.user_attrs['mlflow_run_id']}/model")
        with torch.no_grad():
            acc = (model(as_input(images)).argmax(1) == labels).float().mean().item()
        assert acc == pytest.approx(t.user_attrs["test_acc"], abs=1e-6)


def test_pack_option_rejects_bad_values(synthetic_env, tmp_path):
    proc = run_cli("study", "--model", "mlp", "--pack", "0", env=synthetic_env, check=False)
    assert proc.returncode == 2
    assert "'0' is not auto or a positive integer" in proc.stderr
    assert not (tmp_path / "mlruns").exists()  # nothing written
