"""The one table of hyperparameters (``TUNABLES``): type, limits, the models each fits, and
whether it shapes the model or the training. Sweep validation (config.py), the command line
(``mnist-tune train``'s options), the model/training split and the training code all read it.
Plain Python: importing it costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

IMAGE_SIZE = 28  # MNIST images are 28 x 28 pixels
MODEL_NAMES = ("mlp", "mixer")  # models.MODELS builds them, in this order
SCHEDULES = ("constant", "cosine", "onecycle")  # optim.schedule_table computes them


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Tunable:
    """One hyperparameter: its type, the values it may take, the models it fits, where it goes.

    ``setting`` says who takes it: "model" (a ``build_model`` keyword) or "train" (a
    ``TrainConfig`` field). ``sweep`` says where a sweep file may set it: "space" (fixed or
    searched), "fixed" (fixed only) or "train" (the file's ``train:`` section, not a
    hyperparameter there). ``default`` is ``mnist-tune train``'s; None leaves the model's own.
    """

    name: str
    type: type  # int, float, str, bool; tuple: a list of positive integers
    setting: Literal["model", "train"]
    help: str
    models: tuple[str, ...] = MODEL_NAMES
    default: Any = None
    low: float | None = None  # the lowest value allowed; excluded itself when low_open
    low_open: bool = False
    high: float | None = None  # excluded
    choices: tuple | None = None
    divides: str | None = None  # values must divide this tunable's value (image_size; absent: IMAGE_SIZE)
    sweep: Literal["space", "fixed", "train"] = "space"
    excludes: tuple[str, ...] = ()  # tunables that may not be given with this one
    search_hint: str = ""  # what to search instead, when it cannot be searched

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def searchable(self) -> bool:
        return self.sweep == "space"

    def _bound(self) -> str:
        if self.high is not None:
            return f"in [{self.low}, {self.high})"
        if self.type is int:  # positive integers: "> 0"
            return f"> {self.low - 1}"
        return f"> {self.low}" if self.low_open else f">= {self.low}"

    def _inside(self, value) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value < self.high

    def problem(self, value) -> str | None:
        """Why ``value`` cannot be used, or None."""
        if self.type is tuple:
            ok = isinstance(value, (list, tuple)) and value and all(_is_int(v) and v > 0 for v in value)
            return None if ok else "must be a list of positive integers"
        if self.choices is not None:
            return None if value in self.choices else f"{value!r} is not a {self.name} ({', '.join(self.choices)})"
        if self.type is bool:
            return None if isinstance(value, bool) else f"{value!r} is not true or false"
        if self.type is int:
            if _is_int(value) and self._inside(value):
                return None
            if _is_int(value) and self.high is not None:
                return f"{self.name} {value!r} must be {self._bound()}"
            return f"{value!r} must be a positive integer" if self.low == 1 else f"{value!r} is not an integer"
        if _is_number(value) and self._inside(value):
            return None
        return f"{self.name} {value!r} must be {self._bound()}"

    def range_problem(self, low: float, high: float, param_type: str) -> str | None:
        """Why a searched range (too wide to list its values) cannot be used, or None."""
        if self.type in (bool, str, tuple):
            return f"{self.name} cannot be searched as a {param_type} range; use type categorical"
        if self.type is int and param_type == "float":
            return f"{self.name} takes integers: search it with type int or categorical"
        if self.high is not None and not (self._inside(low) and high < self.high):
            return f"{self.name} must lie {self._bound()}"
        if not self._inside(low):
            return f"{self.name} must be {self._bound()} (low is {low})"
        return None


TUNABLES: dict[str, Tunable] = {t.name: t for t in (
    # in the order `mnist-tune train --help` lists them
    Tunable("batch_size", int, "train", "Training images per optimizer step.", default=100, low=1),
    Tunable("lr", float, "train", "Learning rate (the peak of the schedule).", default=1e-3, low=0, low_open=True),
    Tunable("dropout", float, "model", "Dropout probability in every hidden layer.", default=0.2, low=0, high=1),
    Tunable("weight_decay", float, "train", "AdamW's decoupled weight decay.", default=0.0, low=0),
    Tunable("schedule", str, "train", "Learning-rate schedule (onecycle peaks at --lr).", default="onecycle",
            choices=SCHEDULES),
    Tunable("epochs", int, "train", "Passes over the training split.", default=10, low=1, sweep="train"),
    Tunable("seed", int, "train", "Seed of the weights, dropout and shuffling.", default=0, sweep="train"),
    Tunable("hidden_sizes", tuple, "model", "MLP hidden layers, e.g. 100,80.", models=("mlp",), sweep="fixed",
            excludes=("width", "depth"), search_hint="search width and depth"),
    Tunable("width", int, "model", "MLP units per hidden layer (a uniform stack; with --depth).", models=("mlp",),
            low=1),
    Tunable("patch_size", int, "model", "Mixer patch size (divides --image-size).", models=("mixer",), low=1,
            divides="image_size"),
    Tunable("dim", int, "model", "Mixer width.", models=("mixer",), low=1),
    Tunable("depth", int, "model", "Mixer blocks, or MLP hidden layers (a uniform stack; with --width).", low=1),
    Tunable("token_expansion", float, "model", "Mixer token-mixing MLP size, in multiples of the patch count.",
            models=("mixer",), low=0),
    Tunable("channel_expansion", float, "model", "Mixer channel-mixing MLP size, in multiples of --dim.",
            models=("mixer",), low=0),
    Tunable("image_size", int, "model", f"Side the {IMAGE_SIZE} x {IMAGE_SIZE} images are resized to (area "
            "averaging) before the model's first layer.", low=1, high=IMAGE_SIZE + 1),
    Tunable("shift", int, "train", "Training images moved by up to this many pixels (at --image-size) each way "
            "(augmentation).",
            default=0, low=0, high=4),
    Tunable("rotate", float, "train", "Training images rotated by up to this many degrees (augmentation).",
            default=0.0, low=0, high=30),
    Tunable("scale", float, "train", "Training images scaled by a factor within 1 +- this (augmentation).",
            default=0.0, low=0, high=0.5),
    Tunable("amp", bool, "train", "bf16 autocast (CUDA; CPUs with bf16 units).", default=False),
    Tunable("compile", bool, "train", "torch.compile the model (pays off on long GPU runs).", default=False),
    Tunable("cuda_graph", bool, "train", "On CUDA, replay each training step as a recorded CUDA graph "
            "(not with --compile).", default=True),
)}
TRAIN_SETTINGS = tuple(name for name, t in TUNABLES.items() if t.setting == "train")  # TrainConfig's fields


def tunables_for(model: str) -> tuple[Tunable, ...]:
    """The tunables ``model`` takes (its own and the training ones), in table order."""
    return tuple(t for t in TUNABLES.values() if model in t.models)


def sweep_names(model: str) -> set[str]:
    """The names a sweep file for ``model`` may give under ``fixed:`` or ``space:``."""
    return {t.name for t in tunables_for(model) if t.sweep != "train"}


def split_hyperparameters(params: dict) -> tuple[dict, dict]:
    """Flat hyperparameters -> (``build_model`` keywords, ``TrainConfig`` keywords); names the
    table does not know go to the model, whose builder rejects them by name."""
    train = {k: v for k, v in params.items() if k in TRAIN_SETTINGS}
    return {k: v for k, v in params.items() if k not in train}, train


def hyperparameter_problems(model: str, params: dict) -> list[tuple[str, str]]:
    """(name, problem) for each given hyperparameter that ``model`` does not take, has a value
    it cannot use or conflicts with another one; for command lines (names as given)."""
    problems, fits = [], {t.name for t in tunables_for(model)}
    for name, value in params.items():
        if name not in TUNABLES:
            problems.append((name, "is not a hyperparameter"))
        elif name not in fits:
            problems.append((name, f"does not apply to --model {model}"))
        elif (problem := TUNABLES[name].problem(value)) is not None:
            problems.append((name, problem))
    for name in params:
        excluded = [other for other in TUNABLES[name].excludes if other in params] if name in fits else []
        if excluded:
            problems.append((name, f"give either {name} or {'/'.join(TUNABLES[name].excludes)}, not both"))
    if not problems:
        problems = divides_problems({name: [value] for name, value in params.items()})
    return problems


def divides_problems(values: dict[str, list]) -> list[tuple[str, str]]:
    """(name, problem) for a tunable whose value does not divide the value of the tunable it
    must divide (patch_size / image_size), over all the values each may take (``values``: name
    -> possible values; the image size defaults to IMAGE_SIZE)."""
    problems = []
    for name, options in values.items():
        other = TUNABLES[name].divides if name in TUNABLES else None
        if other is None:
            continue
        for size in values.get(other, [IMAGE_SIZE]):
            bad = [v for v in options if _is_int(v) and v >= 1 and _is_int(size) and size % v]
            if bad:
                problems.append((name, f"{name.replace('_', ' ')} {bad[0]} does not divide the "
                                       f"{other.replace('_', ' ')} {size}"))
                break
    return problems


def parse_int_list(text: str) -> tuple[int, ...]:
    """``"100,80"`` -> (100, 80): a list-valued tunable (hidden_sizes) on a command line."""
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of integers") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"{text!r}: sizes must be positive")
    return sizes


def click_option(tunable: Tunable) -> tuple[tuple[str, ...], dict]:
    """``click.option(*decls, **attrs)`` for a tunable: its flag, type and limits, default and
    help; the parameter is named as the tunable. Imports click only when called."""
    import click

    t = tunable
    attrs: dict[str, Any] = {"default": t.default, "help": t.help}
    decls: tuple[str, ...] = (t.flag, t.name)
    if t.type is bool:
        if t.default:
            decls = (f"{t.flag}/--no-{t.flag[2:]}", t.name)
        else:
            attrs["is_flag"] = True
    elif t.choices is not None:
        attrs["type"] = click.Choice(t.choices)
    elif t.type is tuple:
        attrs["metavar"] = "N,N,..."

        def parse(ctx, param, value):
            try:
                return None if value is None else parse_int_list(value)
            except ValueError as e:
                raise click.BadParameter(str(e)) from None
        attrs["callback"] = parse
    elif t.type is int:
        attrs["type"] = click.IntRange(min=t.low, max=t.high, max_open=t.high is not None) if t.low is not None else int
    else:
        attrs["type"] = click.FloatRange(min=t.low, max=t.high, min_open=t.low_open, max_open=t.high is not None)
    return decls, attrs
