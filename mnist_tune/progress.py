"""Progress bars on a terminal, silence in logs and CI (stderr not a TTY)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def interactive() -> bool:
    return sys.stderr.isatty()


def bar(total: int | None, desc: str, unit: str, position: int = 0, leave: bool = True, initial: int = 0):
    return tqdm(total=total, desc=desc, unit=unit, position=position, leave=leave, initial=initial,
                disable=not interactive(), dynamic_ncols=True)
