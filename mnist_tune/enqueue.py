"""Configurations to try first: a sweep file's ``enqueue:`` list and ``study --enqueue FILE``,
checked against the search space before anything runs. Plain Python (no torch, no Optuna).

    enqueue:                      # in a sweep file; or, in a file of its own, just the list
      - {batch_size: 100, lr: 1.0e-3, dropout: 0.2, weight_decay: 1.0e-5, schedule: constant}

Each entry maps searched parameters to values inside their ranges or choices; a parameter an
entry leaves out is sampled as usual (the grid sampler needs them all). warm.py hands the
entries to Optuna (``study.enqueue_trial``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mnist_tune.config import Param


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _on_step(value: float, low: float, step: float) -> bool:
    steps = (value - low) / step
    return math.isclose(steps, round(steps), abs_tol=1e-9)


def value_problem(param: Param, value) -> str | None:
    """Why ``value`` is not a point of ``param``'s range or choices, or None."""
    if param.type == "categorical":
        # 1 == True in Python: a choice matches only a value of the same kind
        if any(value == c and isinstance(value, bool) == isinstance(c, bool) and isinstance(value, str) ==
               isinstance(c, str) for c in param.choices):
            return None
        return f"{value!r} is not one of the choices ({', '.join(map(str, param.choices))})"
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            pass
        else:  # YAML 1.1 reads 1e-3 (no dot) as text
            return f"{value!r} is text, not a number (YAML wants a dot: 1.0e-3)"
    if not _is_number(value) or not math.isfinite(value):
        return f"{value!r} is not a number"
    if param.type == "int" and not isinstance(value, int):
        return f"{value!r} is not an integer"
    if not param.low <= value <= param.high:
        return f"{value!r} is outside the range [{param.low}, {param.high}]"
    if param.step and not _on_step(value, param.low, param.step):
        return f"{value!r} is not on the range's steps ({param.low} + k * {param.step})"
    return None


def normalized(entry: dict, space: tuple[Param, ...]) -> dict:
    """A checked entry with float parameters as floats (YAML reads 0 as an int), as Optuna stores
    them, so equal configurations compare equal (duplicates, skip_if_exists)."""
    floats = {p.name for p in space if p.type == "float"}
    return {name: float(value) if name in floats else value for name, value in entry.items()}


def entry_problems(entry, space: tuple[Param, ...], fixed: dict, grid: bool) -> list[tuple[str, str]]:
    """(key under the entry, problem) for one configuration; the key is '' for the entry itself."""
    if not isinstance(entry, dict):
        return [("", "must be a mapping of searched parameters to values")]
    if not entry:
        return [("", "is empty: give at least one searched parameter")]
    by_name = {p.name: p for p in space}
    problems = []
    for name, value in entry.items():
        if name in fixed:
            problems.append((f".{name}", f"is fixed by the sweep ({fixed[name]!r}), not searched"))
        elif name not in by_name:
            problems.append((f".{name}", f"not a searched parameter (searched: {', '.join(by_name)})"))
        elif (problem := value_problem(by_name[name], value)) is not None:
            problems.append((f".{name}", problem))
    missing = [name for name in by_name if name not in entry]
    if grid and missing and not problems:
        problems.append(("", f"the grid sampler needs every searched parameter (missing: {', '.join(missing)})"))
    return problems


def check_entries(entries, space: tuple[Param, ...], fixed: dict, grid: bool, key: str) -> list[tuple[str, str]]:
    """(key, problem) for a list of configurations; ``key`` names the list ('enqueue', or '' for a
    file that is only the list). Entries come back as ``<key>[i].<name>``."""
    if not isinstance(entries, list):
        return [(key or "(top level)", "must be a list of parameter mappings")]
    return [(f"{key}[{i}]{sub}", problem) for i, entry in enumerate(entries)
            for sub, problem in entry_problems(entry, space, fixed, grid)]
