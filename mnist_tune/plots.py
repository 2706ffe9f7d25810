"""Study plots for a person to read in seconds: one interactive HTML page plus a PNG per plot.

    paths = write_study_plots(study, Path("plots"), metric="val_acc")

Plots (each skipped, with a reason passed to ``log``, when the study cannot support it yet):

- ``history``      the metric per completed trial and the running best (pruned trials grey)
- ``importances``  parameter importances (Optuna's default evaluator)
- ``parallel``     parallel coordinates, one line per completed trial coloured by the metric;
                   log-searched params on log axes with decade-style ticks, categorical
                   params as their choices
- ``curves``       the metric per epoch (trial.intermediate_values): pruned trials thin and
                   grey, completed ones coloured by their final value; no per-trial legend
- ``lr_batch``     the metric against lr and batch size, and lr x batch size coloured by it

``study.html`` holds all of them (plotly, interactive). MLflow's artifact viewer shows an HTML
artifact in a sandboxed blob iframe, so the page must carry plotly.js itself (4.6 MB): one page
pays for it once instead of once per plot. The PNGs are drawn with matplotlib (kaleido would
need a browser download) and show in the viewer and anywhere else.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

GREY = "#b0b0b0"
COLORSCALE = "Viridis"
PNG_SIZE = (9, 4.8)  # inches at 100 dpi: 900 x 480 px
PNG_DPI = 100


class Skip(Exception):
    """This plot cannot be drawn for this study (yet); the message says why."""


def write_study_plots(study: optuna.Study, folder: Path, metric: str = "val_acc", *, png: bool = True,
                      log: Callable[[str], None] | None = None) -> list[Path]:
    """Write ``study.html`` and ``<plot>.png`` files into ``folder``; returns the paths written
    (none when no plot applies). Never raises for a small or odd study: a plot that cannot be
    drawn is skipped and the reason passed to ``log``. ``png=False`` writes the HTML page only
    (~0.2 s for 40 trials instead of ~2 s: for the updates during a study; PNGs at the end)."""
    import plotly.io as pio

    folder = Path(folder)
    data = _StudyData(study, metric)
    figures, written = [], []
    for name, make in PLOTS.items():
        try:
            plotly_fig, draw_png = make(data)
        except Skip as e:
            if log:
                log(f"plot {name} skipped: {e}")
            continue
        folder.mkdir(parents=True, exist_ok=True)
        if png:
            path = folder / f"{name}.png"
            _save_png(draw_png, path)
            written.append(path)
        figures.append(plotly_fig)
    if figures:
        page = folder / "study.html"
        parts = [pio.to_html(fig, full_html=False, include_plotlyjs=(i == 0), config={"displaylogo": False})
                 for i, fig in enumerate(figures)]
        title = f"study {study.study_name}: {metric}"
        page.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head>"
                        f"<body style='font-family:sans-serif;margin:8px'><h3>{title} "
                        f"({data.n_complete} complete, {data.n_pruned} pruned, {data.n_failed} failed)</h3>"
                        + "".join(parts) + "</body></html>")
        written.insert(0, page)
    return written


# --------------------------------------------------------------------------- data


class _StudyData:
    def __init__(self, study: optuna.Study, metric: str):
        self.metric = metric
        self.maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        self.study = study
        trials = study.get_trials(deepcopy=False)
        self.complete = [t for t in trials if t.state == TrialState.COMPLETE and _finite(t.value)]
        self.pruned = [t for t in trials if t.state == TrialState.PRUNED]
        self.n_complete, self.n_pruned = len(self.complete), len(self.pruned)
        self.n_failed = sum(t.state == TrialState.FAIL for t in trials)
        # Searched params: a distribution with more than one possible value, in a stable order.
        dists: dict[str, object] = {}
        for t in self.complete:
            for k, d in t.distributions.items():
                dists.setdefault(k, d)
        self.params = sorted((k for k, d in dists.items() if not d.single()),
                             key=lambda k: ({"lr": 0, "batch_size": 1}.get(k, 2), k))
        self.dists = dists

    def need_complete(self, n: int) -> None:
        if self.n_complete < n:
            raise Skip(f"needs {n} completed trial{'s' if n > 1 else ''}, the study has {self.n_complete}")

    def best_so_far(self) -> tuple[list[int], list[float]]:
        xs, ys, best = [], [], None
        for t in sorted(self.complete, key=lambda t: t.number):
            if best is None or (t.value > best if self.maximize else t.value < best):
                best = t.value
            xs.append(t.number)
            ys.append(best)
        return xs, ys

    def value_range(self) -> tuple[float, float]:
        values = [t.value for t in self.complete]
        low, high = min(values), max(values)
        return (low, high) if high > low else (low - 0.5, high + 0.5)


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def _is_log(dist) -> bool:
    return isinstance(dist, (FloatDistribution, IntDistribution)) and dist.log


def _choices(dist) -> list:
    """Categorical choices in display order (numbers sorted, others as given)."""
    choices = list(dist.choices)
    if all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices):
        return sorted(choices)
    return choices


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _log_ticks(low: float, high: float, limit: int = 6) -> list[float]:
    """Readable ticks for a log axis: powers of ten, then 1-2-5 / 1-3 steps if too few."""
    lo, hi = math.floor(math.log10(low)), math.ceil(math.log10(high))
    for steps in ((1,), (1, 3), (1, 2, 5)):
        ticks = [float(f"{m}e{e}") for e in range(lo, hi + 1) for m in steps if low <= float(f"{m}e{e}") <= high]
        if len(ticks) >= 3 or steps == (1, 2, 5):
            break
    if len(ticks) > limit:
        ticks = ticks[:: math.ceil(len(ticks) / limit)]
    return ticks or [low, high]


def _axis(data: _StudyData, name: str) -> dict:
    """How a param is drawn on a 0..1 axis: values, tick positions and labels."""
    dist = data.dists[name]
    raw = [t.params.get(name) for t in data.complete]
    if isinstance(dist, CategoricalDistribution):
        choices = _choices(dist)
        index = {repr(c): i for i, c in enumerate(choices)}
        span = max(len(choices) - 1, 1)
        values = [index[repr(v)] / span for v in raw]
        return {"values": values, "ticks": [i / span for i in range(len(choices))],
                "labels": [_fmt(c) for c in choices], "scale": "categorical"}
    low, high = float(dist.low), float(dist.high)
    if _is_log(dist):
        lo, hi = math.log10(low), math.log10(high)
        ticks = _log_ticks(low, high)
        return {"values": [(math.log10(v) - lo) / (hi - lo) for v in raw],
                "ticks": [(math.log10(v) - lo) / (hi - lo) for v in ticks],
                "labels": [f"{v:g}" for v in ticks], "scale": "log"}
    ticks = [low + (high - low) * i / 4 for i in range(5)]
    span = (high - low) or 1.0
    return {"values": [(v - low) / span for v in raw], "ticks": [(v - low) / span for v in ticks],
            "labels": [_fmt(v) for v in ticks], "scale": "linear"}


def _colormap():
    import matplotlib

    return matplotlib.colormaps["viridis"]


def _color(cmap, value: float, low: float, high: float) -> str:
    from matplotlib.colors import to_hex

    return to_hex(cmap((value - low) / (high - low)))


def _save_png(draw, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=PNG_SIZE, dpi=PNG_DPI, layout="constrained")
    draw(fig)
    fig.savefig(path, dpi=PNG_DPI)


# --------------------------------------------------------------------------- plots


def plot_history(data: _StudyData):
    import plotly.graph_objects as go

    data.need_complete(1)
    m = data.metric
    done = sorted(data.complete, key=lambda t: t.number)
    best_x, best_y = data.best_so_far()
    pruned = [(t.number, t.intermediate_values[max(t.intermediate_values)]) for t in data.pruned
              if t.intermediate_values and _finite(t.intermediate_values[max(t.intermediate_values)])]
    fig = go.Figure()
    if pruned:
        fig.add_scatter(x=[p[0] for p in pruned], y=[p[1] for p in pruned], mode="markers", name="pruned (last epoch)",
                        marker=dict(color=GREY, symbol="x", size=7))
    fig.add_scatter(x=[t.number for t in done], y=[t.value for t in done], mode="markers", name="completed",
                    marker=dict(color="#1f77b4", size=8),
                    text=[", ".join(f"{k}={_fmt(v)}" for k, v in t.params.items()) for t in done])
    fig.add_scatter(x=best_x, y=best_y, mode="lines", name="best so far", line=dict(color="#d62728", shape="hv"))
    fig.update_layout(title=f"{m} per trial and the running best", xaxis_title="trial", yaxis_title=m,
                      height=420, margin=dict(t=50, b=40))
    fig.update_xaxes(tickformat="d", dtick=1 if len(data.study.trials) <= 12 else None)  # trials are whole

    def png(f):
        ax = f.subplots()
        if pruned:
            ax.scatter(*zip(*pruned), color=GREY, marker="x", label="pruned (last epoch)")
        ax.scatter([t.number for t in done], [t.value for t in done], color="#1f77b4", label="completed", zorder=3)
        ax.step(best_x, best_y, where="post", color="#d62728", label="best so far")
        ax.set(title=f"{m} per trial and the running best", xlabel="trial", ylabel=m)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)

    return fig, png


def plot_importances(data: _StudyData):
    import plotly.graph_objects as go

    data.need_complete(2)
    if not data.params:
        raise Skip("no parameter varies between the completed trials")
    try:  # fANOVA (Optuna's default; imports scikit-learn once, ~2.5 s), else PED-ANOVA
        from optuna.importance import FanovaImportanceEvaluator

        evaluator = FanovaImportanceEvaluator(seed=0)
    except ImportError:
        from optuna.importance import PedAnovaImportanceEvaluator

        evaluator = PedAnovaImportanceEvaluator()
    try:
        scores = optuna.importance.get_param_importances(data.study, params=data.params, evaluator=evaluator)
    except (RuntimeError, ValueError, ImportError) as e:
        raise Skip(str(e).splitlines()[0]) from None
    names = list(scores)[::-1]  # largest on top
    values = [scores[n] for n in names]
    fig = go.Figure(go.Bar(x=values, y=names, orientation="h", marker_color="#1f77b4",
                           text=[f"{v:.2f}" for v in values], textposition="auto"))
    fig.update_layout(title=f"parameter importance for {data.metric}", xaxis_title="importance (sums to 1)",
                      height=max(260, 60 + 36 * len(names)), margin=dict(t=50, b=40))

    def png(f):
        ax = f.subplots()
        ax.barh(names, values, color="#1f77b4")
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
        ax.set(title=f"parameter importance for {data.metric}", xlabel="importance (sums to 1)",
               xlim=(0, max(values) * 1.15 or 1))

    return fig, png


def plot_parallel(data: _StudyData):
    import plotly.graph_objects as go

    data.need_complete(2)
    if not data.params:
        raise Skip("no parameter varies between the completed trials")
    m = data.metric
    values = [t.value for t in data.complete]
    axes = {name: _axis(data, name) for name in data.params}
    dims = [dict(label=f"{name} (log)" if a["scale"] == "log" else name, values=a["values"], range=[0, 1],
                 tickvals=a["ticks"], ticktext=a["labels"]) for name, a in axes.items()]
    dims.append(dict(label=m, values=values))
    fig = go.Figure(go.Parcoords(line=dict(color=values, colorscale=COLORSCALE, showscale=True,
                                           colorbar=dict(title=m)), dimensions=dims,
                                 labelangle=0, labelfont=dict(size=12), tickfont=dict(size=10)))
    fig.update_layout(title=f"parameters of {len(values)} completed trials, coloured by {m}",
                      height=440, margin=dict(t=90, l=60, r=60, b=30))
    low, high = data.value_range()

    def png(f):
        cmap = _colormap()
        ax = f.subplots()
        n = len(axes) + 1
        order = sorted(range(len(values)), key=lambda i: values[i] if data.maximize else -values[i])
        for i in order:  # best drawn last, on top
            ys = [a["values"][i] for a in axes.values()] + [(values[i] - low) / (high - low)]
            ax.plot(range(n), ys, color=cmap((values[i] - low) / (high - low)), lw=1.4, alpha=0.85)
        metric_ticks = [low + (high - low) * k / 4 for k in range(5)]
        all_ticks = [(a["ticks"], a["labels"]) for a in axes.values()]
        all_ticks.append(([(v - low) / (high - low) for v in metric_ticks], [f"{v:.3g}" for v in metric_ticks]))
        for x, (ticks, labels) in enumerate(all_ticks):
            ax.axvline(x, color="black", lw=0.8)
            for y, label in zip(ticks, labels):
                ax.plot([x - 0.03, x], [y, y], color="black", lw=0.8)
                ax.text(x - 0.05, y, label, ha="right", va="center", fontsize=7)
        names = [f"{k}\n(log)" if a["scale"] == "log" else k for k, a in axes.items()] + [m]
        ax.set_xticks(range(n), names, fontsize=8)
        ax.set_yticks([])
        ax.set_xlim(-0.6, n - 0.8)
        ax.set_ylim(-0.05, 1.05)
        for side in ("left", "right", "top"):
            ax.spines[side].set_visible(False)
        ax.set_title(f"parameters of {len(values)} completed trials, coloured by {m}")
        sm = _scalar_mappable(low, high)
        f.colorbar(sm, ax=ax, label=m, fraction=0.03)

    return fig, png


def _scalar_mappable(low, high):
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    return ScalarMappable(norm=Normalize(low, high), cmap=_colormap())


def plot_curves(data: _StudyData):
    import plotly.graph_objects as go

    with_curves = [t for t in data.complete + data.pruned if t.intermediate_values]
    if not with_curves:
        raise Skip("no trial has reported per-epoch values")
    m = data.metric
    cmap = _colormap()
    complete = [t for t in data.complete if t.intermediate_values]
    low, high = data.value_range() if data.complete else (0.0, 1.0)
    fig = go.Figure()
    for t in data.pruned:
        if t.intermediate_values:
            steps = sorted(t.intermediate_values)
            fig.add_scatter(x=steps, y=[t.intermediate_values[s] for s in steps], mode="lines", showlegend=False,
                            line=dict(color=GREY, width=1), opacity=0.7, name=f"trial {t.number} (pruned)")
    for t in sorted(complete, key=lambda t: t.value if data.maximize else -t.value):
        steps = sorted(t.intermediate_values)
        fig.add_scatter(x=steps, y=[t.intermediate_values[s] for s in steps], mode="lines+markers",
                        showlegend=False, line=dict(color=_color(cmap, t.value, low, high), width=2),
                        marker=dict(size=4), name=f"trial {t.number} ({m} {t.value:.4g})")
    if complete:  # one invisible trace carries the colour bar
        fig.add_scatter(x=[None], y=[None], mode="markers", showlegend=False, hoverinfo="skip",
                        marker=dict(color=[low, high], colorscale=COLORSCALE, showscale=True,
                                    colorbar=dict(title=f"final {m}")))
    fig.update_layout(title=f"{m} per epoch: completed trials coloured by final {m}, pruned grey",
                      xaxis_title="epoch", yaxis_title=m, height=420, margin=dict(t=50, b=40))

    def png(f):
        ax = f.subplots()
        for t in data.pruned:
            if t.intermediate_values:
                steps = sorted(t.intermediate_values)
                ax.plot(steps, [t.intermediate_values[s] for s in steps], color=GREY, lw=0.8, alpha=0.8)
        for t in sorted(complete, key=lambda t: t.value if data.maximize else -t.value):
            steps = sorted(t.intermediate_values)
            ax.plot(steps, [t.intermediate_values[s] for s in steps], color=cmap((t.value - low) / (high - low)),
                    lw=1.8, marker="o", ms=2.5)
        ax.set(title=f"{m} per epoch: completed coloured by final {m}, pruned grey", xlabel="epoch", ylabel=m)
        ax.grid(alpha=0.3)
        if complete:
            f.colorbar(_scalar_mappable(low, high), ax=ax, label=f"final {m}", fraction=0.03)

    return fig, png


def plot_lr_batch(data: _StudyData):
    from plotly.subplots import make_subplots

    data.need_complete(2)
    pair = [p for p in ("lr", "batch_size") if p in data.params] or data.params[:2]
    if len(pair) < 2:
        pair = (pair + [p for p in data.params if p not in pair])[:2]
    if len(pair) < 2:
        raise Skip(f"needs two searched parameters (lr and batch_size), the study has {data.params or 'none'}")
    px, py = pair
    m = data.metric
    done = data.complete
    ax_x, ax_y = _axis(data, px), _axis(data, py)
    raw = {p: [t.params[p] for t in done] for p in pair}
    values = [t.value for t in done]
    low, high = data.value_range()
    hover = [f"trial {t.number}<br>{m} {t.value:.4g}" for t in done]

    def xaxis(a):
        if a["scale"] == "log":
            return dict(type="log")
        if a["scale"] == "categorical":
            return dict(type="category", categoryorder="array", categoryarray=a["labels"])
        return {}

    def shown(p, a):
        return [_fmt(v) for v in raw[p]] if a["scale"] == "categorical" else raw[p]

    fig = make_subplots(rows=1, cols=3, subplot_titles=(f"{m} vs {px}", f"{m} vs {py}", f"{px} x {py}"),
                        horizontal_spacing=0.08)
    marker = dict(color=values, colorscale=COLORSCALE, cmin=low, cmax=high, size=9, line=dict(width=0.5, color="white"))
    points = dict(mode="markers", marker=marker, text=hover, showlegend=False, row=1)
    fig.add_scatter(x=shown(px, ax_x), y=values, col=1, **points)
    fig.add_scatter(x=shown(py, ax_y), y=values, col=2, **points)
    fig.add_scatter(x=shown(px, ax_x), y=shown(py, ax_y), mode="markers", text=hover, showlegend=False, row=1, col=3,
                    marker={**marker, "size": 11, "showscale": True, "colorbar": dict(title=m)})
    fig.update_xaxes(title_text=px, row=1, col=1, **xaxis(ax_x))
    fig.update_xaxes(title_text=py, row=1, col=2, **xaxis(ax_y))
    fig.update_xaxes(title_text=px, row=1, col=3, **xaxis(ax_x))
    fig.update_yaxes(title_text=py, row=1, col=3, **xaxis(ax_y))
    fig.update_yaxes(title_text=m, row=1, col=1)
    fig.update_layout(title=f"{m} against {px} and {py} (completed trials)", height=420, margin=dict(t=80, b=40))

    def png(f):
        axs = f.subplots(1, 3)

        def place(ax, p, a, which):
            if a["scale"] == "categorical":
                labels = a["labels"]
                pos = [labels.index(_fmt(v)) for v in raw[p]]
                getattr(ax, f"set_{which}ticks")(range(len(labels)), labels)
                return pos
            if a["scale"] == "log":  # the readable decade ticks, no crowded minor labels
                from matplotlib.ticker import NullFormatter

                getattr(ax, f"set_{which}scale")("log")
                getattr(ax, f"set_{which}ticks")([float(t) for t in a["labels"]], a["labels"])
                getattr(ax, f"{which}axis").set_minor_formatter(NullFormatter())
            return raw[p]

        sc = dict(c=values, cmap="viridis", vmin=low, vmax=high, s=30, edgecolors="white", linewidths=0.5)
        axs[0].scatter(place(axs[0], px, ax_x, "x"), values, **sc)
        axs[0].set(xlabel=px, ylabel=m, title=f"{m} vs {px}")
        axs[1].scatter(place(axs[1], py, ax_y, "x"), values, **sc)
        axs[1].set(xlabel=py, title=f"{m} vs {py}")
        axs[2].scatter(place(axs[2], px, ax_x, "x"), place(axs[2], py, ax_y, "y"), **{**sc, "s": 45})
        axs[2].set(xlabel=px, ylabel=py, title=f"{px} x {py}")
        for ax in axs:
            ax.grid(alpha=0.3)
        f.colorbar(_scalar_mappable(low, high), ax=axs, label=m, fraction=0.02)

    return fig, png


PLOTS = {"history": plot_history, "importances": plot_importances, "parallel": plot_parallel,
         "curves": plot_curves, "lr_batch": plot_lr_batch}


# ------------------------------------------------------------- multi-objective studies


def write_pareto_plots(study: optuna.Study, folder: Path, *, png: bool = True,
                       log: Callable[[str], None] | None = None) -> list[Path]:
    """``pareto.html`` (Optuna's plot_pareto_front: hover shows each trial) and ``pareto.png``:
    the validation objective against the first other one, every completed trial grey, the
    front as a line, the champion (pareto.RULE) starred, a limit on the x metric dashed."""
    from mnist_tune import pareto, record

    objectives = pareto.objectives_of(study)
    trials = pareto.complete_trials(study)
    if not trials:
        if log:
            log("plot pareto skipped: needs 1 completed trial, the study has 0")
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    y = next(m for m, _ in objectives if m in ("val_acc", "val_loss"))
    x = next(m for m, _ in objectives if m != y)
    limits = study.user_attrs.get(record.LIMITS_ATTR, {})
    names = [m for m, _ in objectives]
    fig = optuna.visualization.plot_pareto_front(study, target_names=names) if len(names) <= 3 else \
        optuna.visualization.plot_pareto_front(study, target_names=[x, y], targets=lambda t: (
            t.values[names.index(x)], t.values[names.index(y)]))
    fig.update_layout(title=f"study {study.study_name}: Pareto front ({', '.join(names)})")
    page = folder / "pareto.html"
    page.write_text(fig.to_html(include_plotlyjs=True, full_html=True, config={"displaylogo": False}))
    written = [page]
    if not png:
        return written
    on_front = sorted(pareto.front(trials, objectives), key=lambda t: pareto.metrics_of(t)[x])
    best = pareto.champion(study)

    def draw(f):
        ax = f.subplots()
        ax.scatter([pareto.metrics_of(t)[x] for t in trials], [pareto.metrics_of(t)[y] for t in trials],
                   color=GREY, s=18, label=f"completed trials ({len(trials)})")
        ax.plot([pareto.metrics_of(t)[x] for t in on_front], [pareto.metrics_of(t)[y] for t in on_front],
                "o-", color="#1f77b4", drawstyle="steps-post" if len(objectives) == 2 else "default",
                label=f"Pareto front ({len(on_front)})")
        for t in on_front:
            ax.annotate(str(t.number), (pareto.metrics_of(t)[x], pareto.metrics_of(t)[y]), fontsize=7,
                        xytext=(3, -9), textcoords="offset points")
        if best is not None:
            ax.scatter([pareto.metrics_of(best)[x]], [pareto.metrics_of(best)[y]], marker="*", s=220,
                       color="#d62728", zorder=4, label=f"champion: trial {best.number}")
        if x in limits:
            ax.axvline(limits[x], color="#d62728", linestyle="--", linewidth=1, label=f"{x} <= {limits[x]:g}")
        if y == "val_acc" and on_front:  # failed-to-learn trials would squash the front into a line
            ax.set_ylim(bottom=max(min(pareto.metrics_of(t)[y] for t in trials),
                                   min(pareto.metrics_of(t)[y] for t in on_front) - 0.02))
        if x in ("params", "latency_ms", "latency_256_ms"):
            ax.set_xscale("log")
        ax.set(title=f"study {study.study_name}: {y} vs {x}", xlabel=x, ylabel=y)
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="lower right" if y == "val_acc" else "upper right", fontsize=8)

    path = folder / "pareto.png"
    _save_png(draw, path)
    return written + [path]
