"""Pictures of training reports: one line a run, so methods compare at a glance."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def plot_report(report: dict[str, Any], path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw the curves of every run of a report and save them as a PNG.

    Three panels share one legend: training loss against step, test accuracy against step, and
    test accuracy against wall-clock seconds (where a cheaper method shows its saving in time).
    Points where a value is missing (a rank that did not evaluate) are left out.

    Args:
        report: a report from :func:`sparsetrain.train.launch` (or its JSON, loaded back).
        path: where the PNG goes; parent folders are created.
        title: the figure's title; None: the task and the number of workers.

    Returns:
        The path written.

    Example:
        >>> plot_report(json.load(open("out.json")), "out.png")  # doctest: +SKIP
    """
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed; keeps working on headless machines
    import matplotlib.pyplot as plt

    runs = report.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ValueError("report has no runs to plot (expected a non-empty list under 'runs')")
    fig, (ax_loss, ax_acc, ax_time) = plt.subplots(1, 3, figsize=(15, 4.2))
    for run in runs:
        c = run["curves"]
        label = run.get("label", run.get("compressor", "?"))
        for ax, x_key, y_key in (
            (ax_loss, "step", "train_loss"),
            (ax_acc, "step", "test_accuracy"),
            (ax_time, "wall_seconds", "test_accuracy"),
        ):
            pts = [(x, y) for x, y in zip(c[x_key], c[y_key]) if y is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker=".", label=label)
    ax_loss.set(xlabel="step", ylabel="training loss", title="training loss")
    ax_loss.set_yscale("log")
    ax_acc.set(xlabel="step", ylabel="test accuracy", title="test accuracy")
    ax_time.set(xlabel="wall-clock seconds", ylabel="test accuracy", title="test accuracy vs time")
    for ax in (ax_loss, ax_acc, ax_time):
        ax.grid(alpha=0.3)
    ax_acc.legend()
    first = runs[0]
    fig.suptitle(
        title
        or f"{first.get('task', '')}, {report.get('world_size', first.get('world_size', '?'))} workers"
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["plot_report"]
