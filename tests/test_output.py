"""What `best`, `runs` and `status` print: one helper, three formats, a table for people."""

import csv
import io
import json

import optuna

from mnist_tune import output, study

optuna.logging.set_verbosity(optuna.logging.ERROR)


def default_like_study(tmp_path, trials=40):
    """A finished mlp-default-shaped study (Optuna only, no training), with a constant param."""
    found = optuna.create_study(storage=f"sqlite:///{tmp_path}/optuna.db", study_name="s", direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    found.set_user_attr(study.SWEEP_ATTR, {"metric": "val_acc", "fixed": {"hidden_sizes": [100, 80]}})
    for n in range(trials):
        t = found.ask()
        t.suggest_categorical("batch_size", [64, 100, 128, 256])
        t.suggest_float("lr", 3e-4, 1e-2, log=True)
        t.suggest_float("dropout", 0.0, 0.4)
        t.suggest_float("weight_decay", 1e-5, 1e-1, log=True)
        t.suggest_categorical("schedule", ["constant", "cosine", "onecycle"])
        t.suggest_categorical("amp", [False])  # never varies: folded into the header
        t.set_user_attr("mlflow_run_id", f"{n:032x}")
        for epoch in range(1, 4):
            t.report(0.95 + n / 1000 + epoch / 10000, epoch)
        if n % 4 == 3:
            found.tell(t, state=optuna.trial.TrialState.PRUNED)
        else:
            t.set_user_attr("test_acc", 0.97 + n / 10000)
            found.tell(t, 0.9801234 + n / 100000)
    return found


def test_runs_table_is_for_people(tmp_path):
    found = default_like_study(tmp_path)
    rows = study.trial_rows(found)
    text = output.trials_table(rows, "s", "val_acc", {"hidden_sizes": [100, 80]})
    lines = text.splitlines()
    assert lines[0] == "study s: 40 trials, best val_acc first; same in every trial: hidden_sizes=100,80, amp=False"
    assert lines[1].split() == ["trial", "state", "val_acc", "test_acc", "batch_size", "lr", "dropout",
                                "weight_decay", "schedule", "run_id"]
    assert max(map(len, lines)) <= 120
    best = lines[2].split()
    assert best[0] == "38" and best[1] == "0.9805" and best[2] == "0.9738"  # 4 decimals, best first
    pruned = next(line for line in lines[2:] if line.split()[0] == "39")
    assert pruned.split()[1:4] == ["pruned", "0.9893", "-"]  # its last reported value; no test_acc
    assert all(len(cell) <= 9 for line in lines[2:] for cell in line.split()[:-1])  # ~4 significant digits


def test_csv_and_json_keep_full_precision(tmp_path):
    rows = study.trial_rows(default_like_study(tmp_path, trials=5))
    records = list(csv.DictReader(io.StringIO(output.render(rows, "csv", None))))
    assert [int(r["trial"]) for r in records] == [r["trial"] for r in rows]
    assert float(records[0]["lr"]) == rows[0]["lr"] and records[0]["state"] == "COMPLETE"
    assert json.loads(output.render(rows, "json", None)) == json.loads(json.dumps(rows))


def test_best_and_status_share_the_formats(tmp_path):
    found = default_like_study(tmp_path, trials=3)
    record = study.best_record(found)
    assert output.render(record, "table", output.best_table).splitlines()[0] == "study s: best trial 2"
    flat = next(csv.DictReader(io.StringIO(output.render(record, "csv", None))))
    assert flat["params.lr"] == str(found.best_trial.params["lr"]) and flat["run_id"] == f"{2:032x}"
    status = study.status_record(study.open_storage(f"sqlite:///{tmp_path}/optuna.db"), "s")
    assert json.loads(output.render(status, "json", None))["trials"] == {"COMPLETE": 3}
    assert "budget: unknown" in output.render(status, "table", output.status_table)
