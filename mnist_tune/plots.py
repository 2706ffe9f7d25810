"""Plots of a study for its parent run (placeholder: Optuna's matplotlib figures)."""

from __future__ import annotations

from pathlib import Path

from mnist_tune.stores import first_line


def write_study_plots(study, folder, metric: str, log=print) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    makers = {"optimization_history": ovm.plot_optimization_history,
              "param_importances": ovm.plot_param_importances,
              "parallel_coordinate": ovm.plot_parallel_coordinate,
              "intermediate_values": ovm.plot_intermediate_values}
    paths = []
    for name, make in makers.items():
        try:
            axes = make(study)
        except Exception as e:  # e.g. importances need two completed trials
            log(f"plot {name} skipped: {first_line(e)}")
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.set_size_inches(10, 6)
        path = Path(folder) / f"{name}.png"
        figure.savefig(path, dpi=90, bbox_inches="tight")
        plt.close(figure)
        paths.append(path)
    return paths
