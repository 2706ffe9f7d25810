"""Sweep-file validation: every rejected case names the file, the key and the problem."""

import pytest
import yaml

from mnist_tune.config import SWEEPS_DIR, load_sweep, sweep_for
from mnist_tune.errors import MnistTuneError

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
