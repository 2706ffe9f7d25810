"""A study started by the release before the orchestration redesign is resumed by this one:
same sweep fingerprint, same parent run, one child run per trial, read commands work."""

import io
import json
import subprocess
import tarfile

import optuna
import pytest

from helpers import REPO, run_cli
from test_study import TINY_SWEEP, check_study_matches_mlflow, embedded_tracking, optuna_storage

PREVIOUS_RELEASE = "4334aea"  # main before the redesign (record.py, worker.py, tunables.py)


@pytest.fixture
def previous_release(tmp_path):
    """The previous release's package, unpacked from git history."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", PREVIOUS_RELEASE, "mnist_tune", "sweeps"],
                             capture_output=True)
    if archive.returncode:
        pytest.skip(f"commit {PREVIOUS_RELEASE} is not in this checkout's history")
    folder = tmp_path / "previous"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(folder, filter="data")
    return folder


@pytest.mark.slow
def test_study_from_the_previous_release_resumes(synthetic_env, tmp_path, previous_release):
    (tmp_path / "tiny.yaml").write_text(TINY_SWEEP)
    old = run_cli("study", "--sweep", "tiny.yaml", "--trials", "3",
                  env={**synthetic_env, "PYTHONPATH": str(previous_release)})
    assert "3/3 trials" in old.stdout
    before = optuna.load_study(study_name="tiny", storage=optuna_storage(tmp_path))
    assert "sweep_fingerprint" in before.user_attrs

    new = run_cli("study", "--sweep", "tiny.yaml", "--trials", "5", env=synthetic_env)
    assert "5/5 trials" in new.stdout and "this worker ran 2" in new.stdout
    study, client, parent, _ = check_study_matches_mlflow(optuna_storage(tmp_path), embedded_tracking(tmp_path),
                                                          expect_trials=5, lineage_from=3)
    assert parent.info.run_id == before.user_attrs["mlflow_parent_run_id"] and parent.info.status == "FINISHED"
    # the old layout is kept: its artifact folder was named after the study (new ones are not)
    assert client.get_experiment_by_name("tiny").artifact_location.endswith("/artifacts/tiny")
    shown = json.loads(run_cli("best", "--study", "tiny", "--format", "json", env=synthetic_env).stdout)
    assert shown["trial"] == study.best_trial.number
    assert len(json.loads(run_cli("runs", "--study", "tiny", "--format", "json", env=synthetic_env).stdout)) == 5
