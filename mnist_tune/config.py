"""Sweep files (YAML) -> validated dataclasses. The only module that reads YAML.

A sweep file names the model, the study settings and the search space:

    name: mlp-default            # default study name
    model: mlp
    study:
      direction: maximize        # of `metric`, the validation metric reported every epoch
      metric: val_acc            # val_acc (maximize) or val_loss (minimize)
      sampler: {name: tpe, seed: 0, n_startup_trials: 10}
      pruner: {name: median, n_startup_trials: 5, n_warmup_steps: 2}
    train: {epochs: 10, val_size: 5000}
    fixed: {hidden_sizes: [100, 80]}           # hyperparameters held constant
    space:
      lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      batch_size: {type: categorical, choices: [32, 64, 128, 256]}
      depth: {type: int, low: 1, high: 4}

Every problem is reported as ``<file>: <key>: <problem>`` before anything runs.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mnist_tune.errors import MnistTuneError
from mnist_tune.models import IMAGE_SIZE, MODELS
from mnist_tune.train import SCHEDULES

SWEEPS_DIR = Path(__file__).resolve().parent.parent / "sweeps"
DEFAULT_SWEEPS = {"mlp": "mlp.yaml", "mixer": "mixer.yaml"}

SAMPLERS = {"tpe": {"seed", "n_startup_trials", "multivariate", "constant_liar"},
            "random": {"seed"},
            "gp": {"seed", "n_startup_trials"},
            "cmaes": {"seed", "n_startup_trials", "sigma0"},
            "grid": {"seed"}}
PRUNERS = {"median": {"n_startup_trials", "n_warmup_steps", "interval_steps"},
           "hyperband": {"min_resource", "max_resource", "reduction_factor"},
           "none": set()}
METRICS = {"val_acc": "maximize", "val_loss": "minimize"}

# Hyperparameters each model accepts (besides the TrainConfig ones, shared by both).
MODEL_PARAMS = {"mlp": {"dropout", "hidden_sizes", "width", "depth"},
                "mixer": {"dropout", "patch_size", "dim", "depth", "token_expansion", "channel_expansion"}}
TRAIN_PARAMS = {"batch_size", "lr", "weight_decay", "schedule", "amp", "compile", "cuda_graph"}
TOP_KEYS = {"name", "model", "description", "study", "train", "fixed", "space"}
STUDY_KEYS = {"direction", "metric", "sampler", "pruner"}
TRAIN_KEYS = {"epochs", "val_size", "seed"}


@dataclass(frozen=True)
class Param:
    """One search-space dimension."""

    name: str
    type: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None


@dataclass(frozen=True)
class Sweep:
    name: str
    model: str
    path: str
    direction: str = "maximize"
    metric: str = "val_acc"
    sampler: dict = field(default_factory=lambda: {"name": "tpe"})
    pruner: dict = field(default_factory=lambda: {"name": "median"})
    epochs: int = 10
    val_size: int = 5000
    seed: int = 0
    fixed: dict = field(default_factory=dict)
    space: tuple[Param, ...] = ()
    description: str = ""

    def definition(self) -> dict:
        """What defines the study: a rerun under the same name must match it."""
        return {"model": self.model, "direction": self.direction, "metric": self.metric,
                "epochs": self.epochs, "val_size": self.val_size, "fixed": self.fixed,
                "space": [asdict(p) for p in self.space]}

    def fingerprint(self) -> str:
        text = json.dumps(self.definition(), sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def with_overrides(self, **overrides) -> "Sweep":
        values = {**asdict(self), "space": self.space, **{k: v for k, v in overrides.items() if v is not None}}
        return Sweep(**values)


class _Problems:
    def __init__(self, path: str):
        self.path, self.items = path, []

    def add(self, key: str, problem: str) -> None:
        self.items.append(f"{key}: {problem}")

    def raise_if_any(self) -> None:
        if self.items:
            more = f" (and {len(self.items) - 1} more)" if len(self.items) > 1 else ""
            raise MnistTuneError(f"{self.path}: {self.items[0]}{more}")


def _unknown(problems: _Problems, where: str, given: dict, allowed: set) -> None:
    for key in sorted(set(given) - allowed):
        problems.add(f"{where}{key}" if where else key, f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _number(problems, key, value, kind=float):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        problems.add(key, f"{value!r} is not {'an integer' if kind is int else 'a number'}")
        return None
    return kind(value)


def _parse_param(problems: _Problems, name: str, spec: Any) -> Param | None:
    key = f"space.{name}"
    if not isinstance(spec, dict):
        problems.add(key, "must be a mapping with a 'type'")
        return None
    kind = spec.get("type")
    allowed = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
               "categorical": {"type", "choices"}}
    if kind not in allowed:
        problems.add(f"{key}.type", f"{kind!r} is not one of float, int, categorical")
        return None
    _unknown(problems, f"{key}.", spec, allowed[kind])
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            problems.add(f"{key}.choices", "must be a non-empty list")
            return None
        if any(isinstance(c, (dict, list)) for c in choices):
            problems.add(f"{key}.choices", "must be numbers, strings or booleans")
            return None
        return Param(name, kind, choices=tuple(choices))
    number = int if kind == "int" else float
    if "low" not in spec or "high" not in spec:
        problems.add(key, "needs both low and high")
        return None
    low, high = _number(problems, f"{key}.low", spec["low"], number), _number(problems, f"{key}.high", spec["high"], number)
    if low is None or high is None:
        return None
    log = spec.get("log", False)
    step = spec.get("step")
    if not isinstance(log, bool):
        problems.add(f"{key}.log", f"{log!r} is not true or false")
    if not (math.isfinite(low) and math.isfinite(high)):
        problems.add(key, "low and high must be finite")
    elif low > high:
        problems.add(key, f"low {low} > high {high}")
    elif log and low <= 0:
        problems.add(key, f"log scale needs low > 0 (got {low})")
    if step is not None:
        step = _number(problems, f"{key}.step", step, number)
        if step is not None and step <= 0:
            problems.add(f"{key}.step", f"must be > 0 (got {step})")
        elif step is not None and log:
            problems.add(f"{key}.step", "cannot be combined with log: true")
    return Param(name, kind, low=low, high=high, log=log, step=step)


def finite_values(param: Param) -> list | None:
    """All values a parameter can take, where finite and small (for checks and grid search)."""
    if param.type == "categorical":
        return list(param.choices)
    if param.type == "int":
        step = int(param.step or 1)
        if (param.high - param.low) / step <= 1000:
            return list(range(int(param.low), int(param.high) + 1, step))
    if param.type == "float" and param.step:
        count = int(round((param.high - param.low) / param.step))
        return [param.low + i * param.step for i in range(count + 1)]
    return None


def _check_values(problems: _Problems, key: str, name: str, values: list) -> None:
    """Per-hyperparameter sanity: values that cannot train are errors here, not crashes later."""
    def bad(problem):
        problems.add(key, problem)

    for value in values:
        if name == "patch_size" and (not isinstance(value, int) or value < 1 or IMAGE_SIZE % value):
            return bad(f"patch size {value!r} does not divide the image size {IMAGE_SIZE}")
        if name == "schedule" and value not in SCHEDULES:
            return bad(f"{value!r} is not a schedule ({', '.join(SCHEDULES)})")
        if name == "dropout" and not (isinstance(value, (int, float)) and 0 <= value < 1):
            return bad(f"dropout {value!r} must be in [0, 1)")
        if name in ("batch_size", "dim", "depth", "width") and not (isinstance(value, int) and value >= 1):
            return bad(f"{value!r} must be a positive integer")
        if name in ("lr",) and not (isinstance(value, (int, float)) and value > 0):
            return bad(f"lr {value!r} must be > 0")
        if name in ("weight_decay", "token_expansion", "channel_expansion") and not (
                isinstance(value, (int, float)) and value >= 0):
            return bad(f"{value!r} must be >= 0")


def _check_range(problems, key, name, param: Param) -> None:
    if param.type == "categorical" or param.low is None:
        return
    positive = {"batch_size", "dim", "depth", "width", "lr", "patch_size"}
    if name in positive and param.low <= 0:
        problems.add(key, f"{name} must be > 0 (low is {param.low})")
    if name == "dropout" and not (0 <= param.low and param.high < 1):
        problems.add(key, "dropout must lie in [0, 1)")
    if name in ("weight_decay", "token_expansion", "channel_expansion") and param.low < 0:
        problems.add(key, f"{name} must be >= 0 (low is {param.low})")


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file; raises MnistTuneError naming the file and key."""
    path = Path(path)
    shown = str(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise MnistTuneError(f"sweep file {shown} does not exist") from None
    except OSError as e:
        raise MnistTuneError(f"sweep file {shown}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise MnistTuneError(f"{shown}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    problems = _Problems(shown)
    if not isinstance(doc, dict):
        problems.add("(top level)", "must be a mapping")
        problems.raise_if_any()
    _unknown(problems, "", doc, TOP_KEYS)

    model = doc.get("model")
    if model not in MODELS:
        problems.add("model", f"{model!r} is not one of {', '.join(MODELS)}")
        problems.raise_if_any()
    name = doc.get("name", path.stem)
    if not isinstance(name, str) or not name.strip():
        problems.add("name", "must be a non-empty string")

    study = doc.get("study") or {}
    train = doc.get("train") or {}
    for where, section, allowed in (("study.", study, STUDY_KEYS), ("train.", train, TRAIN_KEYS)):
        if not isinstance(section, dict):
            problems.add(where.rstrip("."), "must be a mapping")
        else:
            _unknown(problems, where, section, allowed)
    problems.raise_if_any()

    metric = study.get("metric", "val_acc")
    if metric not in METRICS:
        problems.add("study.metric", f"{metric!r} is not one of {', '.join(METRICS)}")
    direction = study.get("direction", METRICS.get(metric, "maximize"))
    if direction not in ("maximize", "minimize"):
        problems.add("study.direction", f"{direction!r} is not maximize or minimize")
    elif metric in METRICS and direction != METRICS[metric]:
        problems.add("study.direction", f"{metric} should be {METRICS[metric]}d, not {direction}d")
    sampler = _component(problems, "study.sampler", study.get("sampler", "tpe"), SAMPLERS)
    pruner = _component(problems, "study.pruner", study.get("pruner", "median"), PRUNERS)

    epochs = _number(problems, "train.epochs", train.get("epochs", 10), int)
    val_size = _number(problems, "train.val_size", train.get("val_size", 5000), int)
    seed = _number(problems, "train.seed", train.get("seed", 0), int)
    if epochs is not None and epochs < 1:
        problems.add("train.epochs", f"must be >= 1 (got {epochs})")
    if val_size is not None and val_size < 1:
        problems.add("train.val_size", f"must be >= 1 (got {val_size})")

    allowed_params = MODEL_PARAMS[model] | TRAIN_PARAMS
    fixed = doc.get("fixed") or {}
    space_doc = doc.get("space") or {}
    for key, section in (("fixed", fixed), ("space", space_doc)):
        if not isinstance(section, dict):
            problems.add(key, "must be a mapping")
    problems.raise_if_any()
    for pname in sorted(set(fixed) | set(space_doc)):
        if pname not in allowed_params:
            where = "fixed" if pname in fixed else "space"
            problems.add(f"{where}.{pname}", f"not a hyperparameter of {model} "
                                             f"(allowed: {', '.join(sorted(allowed_params))})")
        elif pname in fixed and pname in space_doc:
            problems.add(f"space.{pname}", "also given under fixed")
    if not space_doc:
        problems.add("space", "is empty: nothing to tune")
    if model == "mlp" and ("hidden_sizes" in fixed or "hidden_sizes" in space_doc) and (
            {"width", "depth"} & (set(fixed) | set(space_doc))):
        problems.add("space", "give either hidden_sizes or width/depth, not both")
    problems.raise_if_any()

    for pname, value in fixed.items():
        if pname == "hidden_sizes":
            if not (isinstance(value, list) and value and all(isinstance(v, int) and v > 0 for v in value)):
                problems.add("fixed.hidden_sizes", "must be a list of positive integers")
        else:
            _check_values(problems, f"fixed.{pname}", pname, [value])
    space = []
    for pname, spec in space_doc.items():
        param = _parse_param(problems, pname, spec)
        if param is None:
            continue
        if pname == "hidden_sizes":
            problems.add(f"space.{pname}", "cannot be searched directly; search width and depth")
            continue
        values = finite_values(param)
        if values is not None:
            _check_values(problems, f"space.{pname}", pname, values)
        else:
            _check_range(problems, f"space.{pname}", pname, param)
        space.append(param)
    if sampler and sampler["name"] == "grid":
        for param in space:
            if finite_values(param) is None:
                problems.add(f"space.{param.name}", "grid sampler needs choices, an int range or a float step")
    problems.raise_if_any()

    fixed = {k: (tuple(v) if isinstance(v, list) else v) for k, v in fixed.items()}
    return Sweep(name=name.strip(), model=model, path=shown, direction=direction, metric=metric, sampler=sampler,
                 pruner=pruner, epochs=epochs, val_size=val_size, seed=seed, fixed=fixed, space=tuple(space),
                 description=str(doc.get("description", "")))


def _component(problems: _Problems, key: str, spec: Any, known: dict[str, set]) -> dict | None:
    """``name`` or ``{name: ..., option: ...}`` for a sampler or pruner."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or spec.get("name") not in known:
        shown = spec.get("name") if isinstance(spec, dict) else spec
        problems.add(key, f"{shown!r} is not one of {', '.join(known)}")
        return None
    _unknown(problems, f"{key}.", spec, known[spec["name"]] | {"name"})
    for option, value in spec.items():
        if option not in ("name", "multivariate", "constant_liar", "max_resource") and _number(
                problems, f"{key}.{option}", value, float if option == "sigma0" else int) is None:
            return None
    return dict(spec)


def sweep_for(model: str | None, sweep_file: str | None) -> Sweep:
    """--model picks that model's default sweep; --sweep picks any file."""
    if sweep_file:
        sweep = load_sweep(sweep_file)
        if model and model != sweep.model:
            raise MnistTuneError(f"--model {model} contradicts {sweep_file} (model: {sweep.model})")
        return sweep
    if model not in DEFAULT_SWEEPS:
        raise MnistTuneError(f"unknown model {model!r}; choose one of {', '.join(DEFAULT_SWEEPS)} or pass --sweep")
    return load_sweep(SWEEPS_DIR / DEFAULT_SWEEPS[model])
