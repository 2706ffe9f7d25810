"""Sweep files (YAML) -> a validated ``Sweep``. The only module that reads YAML; imports no torch.

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
    enqueue:                                   # configurations tried first (trial 0, 1, ...)
      - {lr: 1.0e-3, batch_size: 128, depth: 2}

The file's shape is a pydantic schema (``SweepFile``); which hyperparameters a model takes and
which values they may have come from one table, ``TUNABLES`` below, which the training
code (models, train, optim) and the command line read too. Every problem is reported as
``<file>: <key>: <problem>`` before anything runs.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError

from mnist_tune.enqueue import check_entries, normalized
from mnist_tune.errors import MnistTuneError
from mnist_tune.tunables import MODEL_NAMES, TUNABLES, divides_problems, sweep_names, tunables_for

# The shipped sweeps are package data (mnist_tune/sweeps/; the top-level sweeps/ links to it),
# so an installed package finds them as a checkout does.
SWEEPS_DIR = Path(str(resources.files("mnist_tune").joinpath("sweeps")))
METRICS = {"val_acc": "maximize", "val_loss": "minimize"}
# What a multi-objective sweep may trade off (study.objectives), each with its only sensible
# direction: the validation metrics, trainable parameters, the exported model's median CPU
# latency for a batch of 1 (latency_ms) and of 256 (latency_256_ms), and seconds per epoch.
OBJECTIVE_METRICS = {**METRICS, "params": "minimize", "latency_ms": "minimize", "latency_256_ms": "minimize",
                     "epoch_seconds": "minimize"}
PARAM_TYPES = ("float", "int", "categorical")


DEFAULT_SWEEPS = {model: f"{model}.yaml" for model in MODEL_NAMES}  # --model's sweep, in SWEEPS_DIR


# --------------------------------------------------------------- the file's schema (pydantic)


def _problem(message: str) -> PydanticCustomError:
    """An error whose text is shown as is after ``<file>: <key>: ``."""
    return PydanticCustomError("sweep", "{message}", {"message": message})


def _number(value, kind: type = float):
    """Strict numbers: no bools or strings; an int may be written 2.0 (YAML floats)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and not (math.isfinite(value) and value == int(value))):
        raise _problem(f"{value!r} is not {'an integer' if kind is int else 'a number'}")
    return kind(value)


def _integer(value):
    return _number(value, int)


def _flag(value):
    if not isinstance(value, bool):
        raise _problem(f"{value!r} is not true or false")
    return value


def _one_of(options):
    def check(value):
        if not any(value == option for option in options):
            raise _problem(f"{value!r} is not one of {', '.join(options)}")
        return value
    return PlainValidator(check)


def _mapping_or_empty(value):
    """An absent or empty section (``study:`` with nothing after it) is an empty mapping."""
    return value or {}


Float = Annotated[float, PlainValidator(_number)]
Int = Annotated[int, PlainValidator(_integer)]
Flag = Annotated[bool, PlainValidator(_flag)]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FloatParam(_Schema):
    type: Literal["float"]
    low: Float
    high: Float
    log: Flag = False
    step: Float | None = None


class IntParam(_Schema):
    type: Literal["int"]
    low: Int
    high: Int
    log: Flag = False
    step: Int | None = None


def _scalar_choices(value):
    if not isinstance(value, list) or not value:
        raise _problem("must be a non-empty list")
    if any(isinstance(c, (dict, list)) for c in value):
        raise _problem("must be numbers, strings or booleans")
    return tuple(value)


class CategoricalParam(_Schema):
    type: Literal["categorical"]
    choices: Annotated[tuple, PlainValidator(_scalar_choices)]


def _param_mapping(value):
    if not isinstance(value, dict):
        raise _problem("must be a mapping with a 'type'")
    return value


ParamSpec = Annotated[Union[FloatParam, IntParam, CategoricalParam], Field(discriminator="type"),
                      BeforeValidator(_param_mapping)]


def _component_mapping(value):
    """``name`` or ``{name: ..., option: ...}`` for a sampler or pruner."""
    return {"name": value} if isinstance(value, str) else value


class _Component(_Schema):
    name: str


class TPE(_Component):
    name: Literal["tpe"]
    seed: Int | None = None
    n_startup_trials: Int | None = None
    multivariate: Flag | None = None
    constant_liar: Flag | None = None


class RandomSampler(_Component):
    name: Literal["random"]
    seed: Int | None = None


class GP(_Component):
    name: Literal["gp"]
    seed: Int | None = None
    n_startup_trials: Int | None = None


class CmaEs(_Component):
    name: Literal["cmaes"]
    seed: Int | None = None
    n_startup_trials: Int | None = None
    sigma0: Float | None = None


class Grid(_Component):
    name: Literal["grid"]
    seed: Int | None = None


class NSGA2(_Component):
    name: Literal["nsga2"]
    seed: Int | None = None
    population_size: Int | None = None


class Median(_Component):
    name: Literal["median"]
    n_startup_trials: Int | None = None
    n_warmup_steps: Int | None = None
    interval_steps: Int | None = None


def _resource(value):
    if value == "auto":
        return value
    return _integer(value)


class Hyperband(_Component):
    name: Literal["hyperband"]
    min_resource: Int | None = None
    max_resource: Annotated[int | str, PlainValidator(_resource)] | None = None
    reduction_factor: Int | None = None


class NoPruner(_Component):
    name: Literal["none"]


SAMPLERS = {cls.model_fields["name"].annotation.__args__[0]: cls
            for cls in (TPE, RandomSampler, GP, CmaEs, Grid, NSGA2)}
PRUNERS = {cls.model_fields["name"].annotation.__args__[0]: cls for cls in (Median, Hyperband, NoPruner)}
Sampler = Annotated[Union[tuple(SAMPLERS.values())], Field(discriminator="name"), BeforeValidator(_component_mapping)]
Pruner = Annotated[Union[tuple(PRUNERS.values())], Field(discriminator="name"), BeforeValidator(_component_mapping)]


class ObjectiveSpec(_Schema):
    metric: Annotated[str, _one_of(OBJECTIVE_METRICS)]
    direction: str | None = None  # default: the metric's

    @field_validator("direction", mode="plain")
    @classmethod
    def _direction(cls, value, info):
        return _metric_direction(value, info.data.get("metric"), OBJECTIVE_METRICS)


def _objective_list(value):
    if not isinstance(value, list) or len(value) < 2:
        raise _problem("must list two or more objectives, e.g. [{metric: val_acc}, {metric: params}]")
    return value


class StudySection(_Schema):
    metric: Annotated[str, _one_of(METRICS)] = "val_acc"
    direction: str | None = None  # default: the metric's
    objectives: Annotated[tuple[ObjectiveSpec, ...], BeforeValidator(_objective_list)] | None = None
    sampler: Sampler = TPE(name="tpe")
    pruner: Pruner = Median(name="median")

    @field_validator("direction", mode="plain")
    @classmethod
    def _direction(cls, value, info):
        return _metric_direction(value, info.data.get("metric"), METRICS)


def _metric_direction(value, metric, metrics: dict) -> str:
    if value not in ("maximize", "minimize"):
        raise _problem(f"{value!r} is not maximize or minimize")
    if metric in metrics and value != metrics[metric]:
        raise _problem(f"{metric} should be {metrics[metric]}d, not {value}d")
    return value


def _count(value):
    value = _integer(value)
    if value < 1:
        raise _problem(f"must be >= 1 (got {value})")
    return value


Count = Annotated[int, PlainValidator(_count)]


class TrainSection(_Schema):
    epochs: Count = 10
    val_size: Count = 5000
    seed: Int = 0


def _name(value):
    if not isinstance(value, str) or not value.strip():
        raise _problem("must be a non-empty string")
    return value.strip()


def _mapping(value):
    value = _mapping_or_empty(value)
    if not isinstance(value, dict):
        raise _problem("must be a mapping")
    return value


class SweepFile(_Schema):
    """The file as written; ``load_sweep`` checks the hyperparameters against ``TUNABLES``."""

    name: Annotated[str, PlainValidator(_name)]
    model: Annotated[str, _one_of(MODEL_NAMES)]
    description: Any = ""
    study: Annotated[StudySection, BeforeValidator(_mapping_or_empty)] = StudySection()
    train: Annotated[TrainSection, BeforeValidator(_mapping_or_empty)] = TrainSection()
    fixed: Annotated[dict[str, Any], BeforeValidator(_mapping)] = {}
    space: Annotated[dict[str, ParamSpec], BeforeValidator(_mapping)] = {}
    enqueue: Any = None  # checked against the space once it is known (enqueue.py)


# Which schema a key's parent is, for "unknown key (allowed: ...)": (section, union tag) -> class.
def _schema_at(loc: tuple) -> type[BaseModel] | None:
    if len(loc) == 1:
        return SweepFile
    if loc[0] == "study" and len(loc) == 2:
        return StudySection
    if loc[:2] == ("study", "objectives") and len(loc) == 4:
        return ObjectiveSpec
    if loc[0] == "train" and len(loc) == 2:
        return TrainSection
    if loc[0] == "space" and len(loc) == 4:
        return {"float": FloatParam, "int": IntParam, "categorical": CategoricalParam}.get(loc[2])
    if loc[:2] in (("study", "sampler"), ("study", "pruner")) and len(loc) == 4:
        return (SAMPLERS if loc[1] == "sampler" else PRUNERS).get(loc[2])
    return None


def _shown_key(loc: tuple) -> str:
    """The key as the user wrote it: pydantic's union tags (space.lr.*float*.low) dropped."""
    if len(loc) > 2 and (loc[0] == "space" or loc[:2] in (("study", "sampler"), ("study", "pruner"))):
        loc = loc[:2] + loc[3:]
    return ".".join(str(part) for part in loc) or "(top level)"


def _describe(error: dict) -> tuple[str, str]:
    """One pydantic error -> (key, problem) in the project's words."""
    loc, kind = tuple(error["loc"]), error["type"]
    key = _shown_key(loc)
    if kind == "missing" and loc[-1] in ("low", "high") and loc[0] == "space":
        return key.rsplit(".", 1)[0], "needs both low and high"
    if kind == "extra_forbidden":
        schema = _schema_at(loc)
        allowed = sorted(schema.model_fields) if schema else []
        return key, f"unknown key (allowed: {', '.join(allowed)})"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        if loc[0] == "space":
            return f"{key}.type", f"{error['input'].get('type')!r} is not one of {', '.join(PARAM_TYPES)}"
        options = SAMPLERS if loc[-1] == "sampler" else PRUNERS
        return key, f"{error['input'].get('name')!r} is not one of {', '.join(options)}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        if loc[:2] in (("study", "sampler"), ("study", "pruner")):
            options = SAMPLERS if loc[1] == "sampler" else PRUNERS
            return key, f"{error['input']!r} is not one of {', '.join(options)}"
        return key, "must be a mapping"
    return key, error["msg"]


# ------------------------------------------------------------------------ the loaded sweep


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
    # Multi-objective sweeps: ((metric, direction), ...); then metric/direction above are its
    # validation objective's. Empty for single-objective sweeps.
    objectives: tuple[tuple[str, str], ...] = ()
    enqueue: tuple[dict, ...] = ()  # tried first in a new study; not part of its definition

    def definition(self) -> dict:
        """What defines the study: a rerun under the same name must match it."""
        defined = {"model": self.model, "direction": self.direction, "metric": self.metric,
                   "epochs": self.epochs, "val_size": self.val_size, "fixed": self.fixed,
                   "space": [asdict(p) for p in self.space]}
        if self.objectives:  # only here, so single-objective fingerprints stay as they were
            defined["objectives"] = [{"metric": m, "direction": d} for m, d in self.objectives]
        return defined

    def fingerprint(self) -> str:
        """Stored in every study: keep this text byte for byte (tests/test_config.py pins it)."""
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


def _as_param(name: str, spec: FloatParam | IntParam | CategoricalParam) -> Param:
    if isinstance(spec, CategoricalParam):
        return Param(name, spec.type, choices=spec.choices)
    return Param(name, spec.type, low=spec.low, high=spec.high, log=spec.log, step=spec.step)


def _range_problems(problems: _Problems, key: str, param: Param) -> None:
    """What the schema cannot say about a float/int range: order, finiteness, log and step."""
    low, high = param.low, param.high
    if not (math.isfinite(low) and math.isfinite(high)):
        problems.add(key, "low and high must be finite")
    elif low > high:
        problems.add(key, f"low {low} > high {high}")
    elif param.log and low <= 0:
        problems.add(key, f"log scale needs low > 0 (got {low})")
    if param.step is not None:
        if param.step <= 0:
            problems.add(f"{key}.step", f"must be > 0 (got {param.step})")
        elif param.log:
            problems.add(f"{key}.step", "cannot be combined with log: true")


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


def _read(path: Path, what: str = "sweep file") -> Any:
    shown = str(path)
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise MnistTuneError(f"{what} {shown} does not exist") from None
    except OSError as e:
        raise MnistTuneError(f"{what} {shown}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise MnistTuneError(f"{shown}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None


_TOP_ORDER = ("model", "name", "description", "study", "train", "fixed", "space")


def _sorted_errors(errors: list[dict]) -> list[dict]:
    """In the order a reader checks the file: unknown top-level keys, then model, name and the
    sections; within a mapping its unknown keys (sorted) before its values."""
    def section(loc: tuple, extra: bool) -> int:
        if not loc or loc[0] not in _TOP_ORDER:
            return 0
        return 0 if len(loc) == 1 and extra else 1 + _TOP_ORDER.index(loc[0])

    parents = {}
    for error in errors:
        parents.setdefault(tuple(error["loc"][:-1]), len(parents))

    def order(error):
        loc, extra = tuple(error["loc"]), error["type"] == "extra_forbidden"
        return section(loc, extra), parents[loc[:-1]], not extra, str(loc[-1]) if extra else ""
    return sorted(errors, key=order)


def _stage(loc: tuple, kind: str) -> int:
    """When an error is reported: the file's keys and sections (0), then their values (1); the
    search space's parameters come later, after their names are checked (load_sweep)."""
    if loc[0] in ("fixed", "space"):
        return 1 if len(loc) == 1 else 3
    if loc[0] in ("study", "train"):
        return 0 if len(loc) == 1 or (len(loc) == 2 and kind == "extra_forbidden") else 1
    return 0


PARAM_SPEC = TypeAdapter(ParamSpec)


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file; raises MnistTuneError naming the file and key.

    In stages, each reported before the next runs: the file's keys and sections; their
    values; the hyperparameter names (against TUNABLES); the search space and the values."""
    path = Path(path)
    doc = _read(path)
    problems = _Problems(str(path))
    if not isinstance(doc, dict):
        problems.add("(top level)", "must be a mapping")
        problems.raise_if_any()
    try:
        parsed, errors = SweepFile.model_validate({"name": path.stem, **doc}), []
    except ValidationError as e:
        parsed, errors = None, e.errors()
    for stage in (0, 1):
        for error in _sorted_errors(errors):
            if _stage(tuple(error["loc"]), error["type"]) == stage:
                problems.add(*_describe(error))
        problems.raise_if_any()
    model, fixed, space_doc = doc["model"], doc.get("fixed") or {}, doc.get("space") or {}

    # The names: which this model takes (TUNABLES), none twice, something to tune.
    allowed = sweep_names(model)
    for pname in sorted(set(fixed) | set(space_doc), key=str):
        if pname not in allowed:
            where = "fixed" if pname in fixed else "space"
            problems.add(f"{where}.{pname}", f"not a hyperparameter of {model} (allowed: {', '.join(sorted(allowed))})")
        elif pname in fixed and pname in space_doc:
            problems.add(f"space.{pname}", "also given under fixed")
    if not space_doc:
        problems.add("space", "is empty: nothing to tune")
    given = set(fixed) | set(space_doc)
    for tunable in tunables_for(model):
        if tunable.name in given and set(tunable.excludes) & given:
            problems.add("space", f"give either {tunable.name} or {'/'.join(tunable.excludes)}, not both")
    problems.raise_if_any()

    # The values: fixed ones, every value of a finite range, else the range's limits.
    for pname, value in fixed.items():
        problem = TUNABLES[pname].problem(value)
        if problem:
            problems.add(f"fixed.{pname}", problem)
    space = []
    for pname, spec in space_doc.items():
        key, tunable = f"space.{pname}", TUNABLES[pname]
        try:
            param = _as_param(pname, PARAM_SPEC.validate_python(spec))
        except ValidationError as e:
            errors = _sorted_errors(e.errors())
            if any(error["type"] == "missing" for error in errors):  # a range without its limits: say only that
                errors = [error for error in errors if error["type"] in ("missing", "extra_forbidden")]
            described = [_describe({**error, "loc": ("space", pname, *error["loc"])}) for error in errors]
            for key_problem in dict.fromkeys(described):  # "needs both low and high" once
                problems.add(*key_problem)
            continue
        if param.type != "categorical":
            _range_problems(problems, key, param)
        if not tunable.searchable:
            problems.add(key, f"cannot be searched directly; {tunable.search_hint}")
            continue
        values = finite_values(param) if param.type == "categorical" or math.isfinite(
            param.high - param.low) else None
        problem = (next(filter(None, map(tunable.problem, values)), None) if values is not None
                   else tunable.range_problem(param.low, param.high, param.type))
        if problem:
            problems.add(key, problem)
        space.append(param)
    if parsed is not None and parsed.study.objectives:
        _objective_problems(problems, parsed.study)
    # A patch size must divide every image size it may meet (tunables.divides_problems).
    possible = {**{p.name: finite_values(p) for p in space}, **{k: [v] for k, v in fixed.items()}}
    for pname, problem in divides_problems({k: v for k, v in possible.items() if v is not None}):
        problems.add(f"{'fixed' if pname in fixed else 'space'}.{pname}", problem)
    if parsed is not None and parsed.study.sampler.name == "grid":
        for param in space:
            if finite_values(param) is None:
                problems.add(f"space.{param.name}", "grid sampler needs choices, an int range or a float step")
    problems.raise_if_any()
    enqueue = [] if doc.get("enqueue") is None else doc["enqueue"]  # `enqueue:` with nothing after it
    grid = parsed is not None and parsed.study.sampler.name == "grid"
    for key_problem in check_entries(enqueue, tuple(space), fixed, grid, "enqueue"):
        problems.add(*key_problem)
    problems.raise_if_any()

    study, train = parsed.study, parsed.train
    objectives = tuple((o.metric, o.direction or OBJECTIVE_METRICS[o.metric]) for o in study.objectives or ())
    metric = next((m for m, _ in objectives if m in METRICS), study.metric)
    return Sweep(name=parsed.name, model=model, path=str(path), direction=study.direction or METRICS[metric],
                 metric=metric, sampler=study.sampler.model_dump(exclude_unset=True),
                 pruner=study.pruner.model_dump(exclude_unset=True) if "pruner" in study.model_fields_set or
                 not objectives else {"name": "none"}, epochs=train.epochs, val_size=train.val_size,
                 seed=train.seed, fixed={k: (tuple(v) if isinstance(v, list) else v) for k, v in fixed.items()},
                 space=tuple(space), description=str(parsed.description), objectives=objectives,
                 enqueue=tuple(normalized(entry, tuple(space)) for entry in enqueue))


def _objective_problems(problems: _Problems, study: StudySection) -> None:
    """What a multi-objective study section cannot say alone: one validation objective (the
    champion rule picks by it), no metric twice, and what Optuna cannot do with several."""
    metrics = [o.metric for o in study.objectives]
    if {"metric", "direction"} & study.model_fields_set:
        problems.add("study.metric", "give either metric/direction or objectives, not both")
    if len(set(metrics)) < len(metrics):
        problems.add("study.objectives", f"lists a metric twice ({', '.join(metrics)})")
    if sum(m in METRICS for m in metrics) != 1:
        problems.add("study.objectives", f"needs exactly one of {', '.join(METRICS)} (the champion is chosen by it)")
    if "pruner" in study.model_fields_set and study.pruner.name != "none":
        problems.add("study.pruner", "Optuna cannot prune multi-objective studies: use none (the default there)")
    if study.sampler.name == "cmaes":
        problems.add("study.sampler", "cmaes optimises one objective only: use tpe, nsga2, random, gp or grid")


def load_enqueue_file(path: str | Path, sweep: Sweep) -> tuple[dict, ...]:
    """``study --enqueue FILE``: a YAML (or JSON) list of configurations, checked against the
    sweep's space as its ``enqueue:`` list is; problems read ``<file>: [i].<name>: <problem>``."""
    path = Path(path)
    doc = _read(path, "enqueue file")
    problems = _Problems(str(path))
    for key_problem in check_entries(doc, sweep.space, sweep.fixed, sweep.sampler["name"] == "grid", ""):
        problems.add(*key_problem)
    if doc == []:
        problems.add("(top level)", "is an empty list: nothing to enqueue")
    problems.raise_if_any()
    return tuple(normalized(entry, sweep.space) for entry in doc)


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
