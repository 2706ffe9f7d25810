"""One way to print results: ``--format table|json|csv`` for every read command.

json and csv keep full precision for machines; the table is for a person: about four
significant digits, what never varies folded into one header line.
"""

from __future__ import annotations

import csv
import io
import json
import math

from mnist_tune.record import MODEL_URI_ATTR

FORMATS = ("table", "json", "csv")


def render(data, fmt: str, table) -> str:
    """``data``: one record (dict) or rows (list of dicts); ``table(data)`` renders the table."""
    if fmt == "json":
        return json.dumps(data, indent=2, default=str)
    if fmt == "csv":
        rows = [_flat(r) for r in (data if isinstance(data, list) else [data])]
        columns = list(dict.fromkeys(k for r in rows for k in r))
        out = io.StringIO()
        writer = csv.DictWriter(out, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue().rstrip("\n")
    return table(data)


def _flat(record: dict, prefix: str = "") -> dict:
    """Nested dicts (a trial's params) become ``params.lr``-style columns."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def short(value, digits: int = 4) -> str:
    """A value for a person: floats to ``digits`` significant digits, None as '-'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def columns(rows: list[dict], names: list[str], formats: dict | None = None, gap: str = "  ") -> list[str]:
    """Aligned text columns (numbers right-aligned), one line per row plus a header."""
    formats = formats or {}
    cells = [[formats.get(n, short)(r.get(n)) for n in names] for r in rows]
    widths = [max([len(n)] + [len(c[i]) for c in cells]) for i, n in enumerate(names)]
    numeric = [all(isinstance(r.get(n), (int, float)) or r.get(n) is None for r in rows) for n in names]

    def line(values):
        return gap.join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return [line(names)] + [line(c) for c in cells]


# ---- the read commands' tables ---------------------------------------------------------


def best_table(best: dict) -> str:
    from mnist_tune.confirm import table_lines
    from mnist_tune.pareto import table

    if "pareto" in best:  # a multi-objective study: its front and champion
        return "\n".join([table(best), *table_lines(best.get("confirmed"))])
    lines = [f"study {best['study']}: best trial {best['trial']}", f"  {best['metric']:<10} {best['value']:.4f}",
             f"  test_acc   {best['test_acc']:.4f}" if best["test_acc"] is not None else "  test_acc   -",
             *_anchor_lines(best), f"  run_id     {best['run_id']}", f"  model      {best[MODEL_URI_ATTR]}"]
    return "\n".join(lines + [f"  {key:<10} {value}" for key, value in best["params"].items()]
                     + table_lines(best.get("confirmed")))


def _anchor_lines(best: dict) -> list[str]:
    """Beside the best test accuracy: the seed's, and its configuration's trial in this study."""
    if best.get("seed_test_acc") is None:
        return []
    lines = [f"  seed       {_score(best['seed_test_acc'])}  (the seed's published test accuracy)"]
    if best.get("seed_trial") is not None:
        state = best["seed_trial_state"]
        how = "" if state == "COMPLETE" else f", {STATE_MARK.get(state, state) or state.lower()}"
        lines.append(f"  seed here  {_score(best['seed_trial_test_acc'])}  (trial {best['seed_trial']}, "
                     f"the seed's configuration in this study{how})")
    return lines


def status_table(status: dict) -> str:
    states = ", ".join(f"{n} {k.lower()}" for k, n in sorted(status["trials"].items())) or "no trials"
    live = status["live_trials"]
    lines = [f"study {status['study']}: {states}",
             f"  live workers: {len(status['live_workers'])}"
             + (f" (running trials {', '.join(map(str, live))})" if live else "")]
    if status["budget"] is None:
        lines.append("  budget: unknown (no worker has started)")
    else:
        lines.append(f"  budget: {status['budget']} trials, {status['used']} used, {status['left']} left")
    best = status["best"]
    lines.append(f"  best: trial {best['trial']}, value {best['value']:.4f}, test_acc {short(best['test_acc'])}, "
                 f"run {best['run_id']}" if best else "  best: none yet")
    return "\n".join(lines)


STATE_MARK = {"COMPLETE": "", "PRUNED": "pruned", "FAIL": "FAILED", "RUNNING": "running", "WAITING": "waiting"}


def trials_table(rows: list[dict], study: str, metric: str, fixed: dict) -> str:
    """Best first; params that never vary (and the sweep's fixed ones) folded into the header."""
    if not rows:
        return f"study {study}: no trials yet"
    names = [k for k in rows[0] if k not in ("trial", "state", metric, "test_acc", "run_id")]
    params = sorted({k for r in rows for k in r} - {"trial", "state", metric, "test_acc", "run_id"},
                    key=lambda k: names.index(k) if k in names else len(names))
    constant = {k: rows[0].get(k) for k in params if len({repr(r.get(k)) for r in rows}) == 1}
    header = f"study {study}: {len(rows)} trials, best {metric} first"
    folded = {**fixed, **constant}
    if folded:
        header += "; same in every trial: " + ", ".join(f"{k}={_text(v)}" for k, v in folded.items())
    varying = [k for k in params if k not in constant]
    marked = [{**r, "state": STATE_MARK.get(r["state"], r["state"])} for r in rows]
    score = {metric: _score, "test_acc": _score}
    # one space between columns: the default sweep's table fits 120 columns with full run ids
    table = columns(marked, ["trial", "state", metric, "test_acc", *varying, "run_id"], score, gap=" ")
    return "\n".join([header] + table)


def _score(value) -> str:
    """Accuracies differ in the 4th decimal (1 image in 5000 is 0.0002): show 4 decimals."""
    return "-" if value is None else f"{value:.4f}"


def _text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else short(value)
