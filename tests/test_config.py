"""Sweep-file validation: every rejected case names the file, the key and the problem."""

import os
import subprocess
import sys

import pytest
import yaml

from mnist_tune.config import SWEEPS_DIR, load_sweep, sweep_for
from mnist_tune.errors import MnistTuneError
from mnist_tune.tunables import TUNABLES, click_option, hyperparameter_problems, split_hyperparameters

VALID = {
    "name": "t", "model": "mlp",
    "study": {"sampler": {"name": "tpe", "seed": 1}, "pruner": {"name": "median", "n_warmup_steps": 1}},
    "train": {"epochs": 2, "val_size": 100},
    "space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
              "batch_size": {"type": "categorical", "choices": [32, 64]}},
}


def write(tmp_path, doc, name="sweep.yaml"):
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def mutate(**changes):
    doc = yaml.safe_load(yaml.safe_dump(VALID))
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = doc
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            node.pop(last)
        else:
            node[last] = value
    return doc


DELETE = object()


def test_shipped_sweeps_are_valid():
    names = {p.name for p in SWEEPS_DIR.glob("*.yaml")}
    assert {"mlp.yaml", "mlp-wide.yaml", "mixer.yaml"} <= names
    for path in SWEEPS_DIR.glob("*.yaml"):
        sweep = load_sweep(path)
        assert {"batch_size", "lr", "dropout"} <= {p.name for p in sweep.space}, path
    mixer = load_sweep(SWEEPS_DIR / "mixer.yaml")
    assert {"patch_size", "dim", "depth", "token_expansion", "channel_expansion"} <= {p.name for p in mixer.space}
    assert sweep_for("mlp", None).model == "mlp" and sweep_for("mixer", None).model == "mixer"


@pytest.mark.parametrize("changes, key, problem", [
    ({"bogus": 1}, "bogus", "unknown key"),
    ({"study__samplr": "tpe"}, "study.samplr", "unknown key"),
    ({"space__lr__lowest": 1}, "space.lr.lowest", "unknown key"),
    ({"space__lr__low": 0.1, "space__lr__high": 0.01}, "space.lr", "low 0.1 > high 0.01"),
    ({"space__lr__low": 0.0}, "space.lr", "log scale needs low > 0"),
    ({"space__batch_size__choices": []}, "space.batch_size.choices", "non-empty list"),
    ({"space__patch_size": {"type": "categorical", "choices": [4, 5]}, "model": "mixer"},
     "space.patch_size", "does not divide the image size 28"),
    ({"space__patch_size": {"type": "int", "low": 2, "high": 8}, "model": "mixer"},
     "space.patch_size", "patch size 3 does not divide"),
    ({"study__sampler": {"name": "bayes"}}, "study.sampler", "'bayes' is not one of"),
    ({"study__pruner": "sometimes"}, "study.pruner", "'sometimes' is not one of"),
    ({"study__pruner": {"name": "median", "patience": 3}}, "study.pruner.patience", "unknown key"),
    ({"model": "cnn"}, "model", "'cnn' is not one of"),
    ({"space__momentum": {"type": "float", "low": 0, "high": 1}}, "space.momentum", "not a hyperparameter of mlp"),
    ({"space__dropout": {"type": "float", "low": 0.1, "high": 1.5}}, "space.dropout", "dropout must lie in [0, 1)"),
    ({"space__lr__type": "complex"}, "space.lr.type", "not one of float, int, categorical"),
    ({"space__batch_size": {"type": "int", "low": 0, "high": 64}}, "space.batch_size", "must be a positive integer"),
    ({"train__epochs": 0}, "train.epochs", "must be >= 1"),
    ({"study__metric": "test_acc"}, "study.metric", "'test_acc' is not one of"),
    ({"study__direction": "minimize"}, "study.direction", "val_acc should be maximized"),
    ({"space": {}}, "space", "nothing to tune"),
    ({"study__sampler": {"name": "grid"}}, "space.lr", "grid sampler needs"),
    ({"space__schedule": {"type": "categorical", "choices": ["step"]}}, "space.schedule", "is not a schedule"),
])
def test_rejected_sweeps_name_file_key_and_problem(tmp_path, changes, key, problem):
    path = write(tmp_path, mutate(**changes))
    with pytest.raises(MnistTuneError) as err:
        load_sweep(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {key}"), message
    assert problem in message and "\n" not in message


def test_unreadable_files(tmp_path):
    with pytest.raises(MnistTuneError, match="does not exist"):
        load_sweep(tmp_path / "missing.yaml")
    with pytest.raises(MnistTuneError, match=r"not valid YAML \(line 2\)"):
        load_sweep(write(tmp_path, "name: x\n  model: [mlp\n"))
    with pytest.raises(MnistTuneError, match="must be a mapping"):
        load_sweep(write(tmp_path, "- just\n- a list\n"))


def test_fingerprint_tracks_the_search_space(tmp_path):
    a = load_sweep(write(tmp_path, VALID, "a.yaml"))
    b = load_sweep(write(tmp_path, mutate(**{"space__lr__high": 0.1}), "b.yaml"))
    c = load_sweep(write(tmp_path, mutate(**{"study__sampler": {"name": "random"}}), "c.yaml"))
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == c.fingerprint()  # the sampler may change between reruns; the space may not


def test_model_flag_must_match_sweep(tmp_path):
    with pytest.raises(MnistTuneError, match="contradicts"):
        sweep_for("mixer", str(write(tmp_path, VALID)))


# Fingerprints as the code before the pydantic schema computed them (commit 924ff12): they are
# stored in existing studies, which must resume unchanged.
PINNED_FINGERPRINTS = {"mlp.yaml": "20030a388a05b770", "mlp-wide.yaml": "972bb024a553864f",
                       "mixer.yaml": "3038ed52f2d7c325"}
PINNED_SWEEP = """\
name: pinned
model: mixer
study: {sampler: {name: grid}, pruner: none}
train: {epochs: 3, val_size: 100, seed: 2}
fixed: {schedule: cosine, amp: false, dropout: 0}
space:
  depth: {type: int, low: 1, high: 4}
  dim: {type: int, low: 16, high: 64, step: 16}
  lr: {type: float, low: 1.0e-4, high: 1.0e-2, step: 1.0e-4}
  weight_decay: {type: float, low: 0, high: 1, step: 0.25}
  patch_size: {type: categorical, choices: [4, 7, 14]}
  token_expansion: {type: categorical, choices: [0.5, 1, 2.0]}
  batch_size: {type: categorical, choices: [32, 64]}
"""


def test_fingerprints_match_the_ones_stored_in_existing_studies(tmp_path):
    for name, fingerprint in PINNED_FINGERPRINTS.items():
        assert load_sweep(SWEEPS_DIR / name).fingerprint() == fingerprint, name
    pinned = load_sweep(write(tmp_path, PINNED_SWEEP))
    assert pinned.fingerprint() == "eb910d26b485baa0"
    assert pinned.with_overrides(epochs=1).fingerprint() == "50dccf17cbb5a286"
    assert pinned.sampler == {"name": "grid"} and pinned.pruner == {"name": "none"}
    assert pinned.fixed == {"schedule": "cosine", "amp": False, "dropout": 0}
    assert [type(p.low) for p in pinned.space[:4]] == [int, int, float, float]  # as the fingerprint saw them


def test_reading_a_sweep_imports_neither_torch_nor_mlflow():
    code = ("import sys, mnist_tune.config, mnist_tune.space; mnist_tune.config.sweep_for('mixer', None); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'mlflow', 'click'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                         check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("changes, key, problem", [
    ({"space__depth": {"type": "float", "low": 1, "high": 3}}, "space.depth", "depth takes integers"),
    ({"space__amp": {"type": "categorical", "choices": [0, 1]}}, "space.amp", "0 is not true or false"),
    ({"space__schedule": {"type": "float", "low": 0, "high": 1}}, "space.schedule", "use type categorical"),
    ({"fixed": {"hidden_sizes": [100, 0]}}, "fixed.hidden_sizes", "must be a list of positive integers"),
    ({"space__hidden_sizes": {"type": "categorical", "choices": [1]}}, "space.hidden_sizes",
     "cannot be searched directly"),
    ({"fixed": {"hidden_sizes": [100]}, "space__width": {"type": "int", "low": 8, "high": 16}}, "space",
     "give either hidden_sizes or width/depth"),
    ({"space__epochs": {"type": "int", "low": 1, "high": 3}}, "space.epochs", "not a hyperparameter of mlp"),
    ({"space__lr__high": None}, "space.lr", "needs both low and high"),
    ({"study__pruner": {"name": "hyperband", "max_resource": "all"}}, "study.pruner.max_resource", "not an integer"),
    ({"study__sampler": {"name": "tpe", "multivariate": "yes"}}, "study.sampler.multivariate", "not true or false"),
    ({"train__seed": 1.5}, "train.seed", "1.5 is not an integer"),
])
def test_values_are_checked_against_the_tunables(tmp_path, changes, key, problem):
    doc = mutate(**changes)
    if changes.get("space__lr__high", 0) is None:
        del doc["space"]["lr"]["high"]
    path = write(tmp_path, doc)
    with pytest.raises(MnistTuneError) as err:
        load_sweep(path)
    assert str(err.value).startswith(f"{path}: {key}: ") and problem in str(err.value), str(err.value)


def test_several_problems_are_counted(tmp_path):
    path = write(tmp_path, mutate(bogus=1, other=2))
    with pytest.raises(MnistTuneError, match=r": bogus: unknown key \(allowed: .*\) \(and 1 more\)$"):
        load_sweep(path)


def test_split_hyperparameters_follows_the_table():
    model_hp, train_hp = split_hyperparameters({"lr": 0.1, "dropout": 0.2, "hidden_sizes": (4,), "schedule": "cosine",
                                                "epochs": 2, "seed": 1, "amp": True, "unknown": 3})
    assert model_hp == {"dropout": 0.2, "hidden_sizes": (4,), "unknown": 3}  # the builder names unknown ones
    assert train_hp == {"lr": 0.1, "schedule": "cosine", "epochs": 2, "seed": 1, "amp": True}


def test_hyperparameter_problems_for_command_lines():
    assert hyperparameter_problems("mlp", {"lr": 1e-3, "hidden_sizes": (100, 80), "cuda_graph": True}) == []
    problems = dict(hyperparameter_problems("mlp", {"patch_size": 7, "dropout": 1.0, "momentum": 0.9,
                                                    "hidden_sizes": (10,), "width": 8}))
    assert problems["patch_size"] == "does not apply to --model mlp"
    assert problems["dropout"] == "dropout 1.0 must be in [0, 1)"
    assert problems["momentum"] == "is not a hyperparameter"
    assert "give either hidden_sizes or width/depth" in problems["hidden_sizes"]
    assert dict(hyperparameter_problems("mixer", {"patch_size": 5}))["patch_size"].startswith(
        "patch size 5 does not divide the image size 28")


def test_click_options_come_from_the_table():
    import click
    from click.testing import CliRunner

    @click.command()
    def command(**kwargs):
        click.echo(repr(sorted(kwargs.items())))

    for tunable in reversed(TUNABLES.values()):
        decls, attrs = click_option(tunable)
        command = click.option(*decls, **attrs)(command)
    runner = CliRunner()
    result = runner.invoke(command, ["--lr", "0.01", "--hidden-sizes", "64,32", "--no-cuda-graph", "--amp"])
    assert result.exit_code == 0, result.output
    given = dict(eval(result.output))
    assert given["lr"] == 0.01 and given["hidden_sizes"] == (64, 32) and given["cuda_graph"] is False
    assert given["amp"] is True and given["compile"] is False and given["schedule"] == "onecycle"
    assert given["batch_size"] == 100 and given["patch_size"] is None
    for bad in (["--lr", "0"], ["--dropout", "1"], ["--schedule", "step"], ["--hidden-sizes", "4,x"],
                ["--batch-size", "0"], ["--weight-decay", "-1"]):
        assert runner.invoke(command, bad).exit_code == 2, bad
