"""Pictures: training reports (one line a run, so methods compare at a glance) and the cost
model's predictions against measured times."""

from __future__ import annotations

import os
import tempfile
import textwrap
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
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure to ``path`` (format by its suffix; parent folders are made) and
    close it, also when the write fails. Returns the path written."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def fitted_title(fig: Any, text: str) -> str:
    """``text`` wrapped to the figure's width (about 10 characters an inch at the default
    font size), so that a long title over a narrow figure is not cut off at both sides."""
    return textwrap.fill(text, width=max(30, int(fig.get_figwidth() * 10)))


def legend_outside(fig: Any, axes: Any) -> None:
    """One legend for all panels, right of them (a figure made with ``layout="constrained"``):
    every label once, from whichever panel has it."""
    legend: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="outside right center", fontsize="small")


PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def file_path_problem(path: str | os.PathLike) -> str | None:
    """Why a file cannot be written at ``path``, or None: it is a folder, it exists and is not
    writable, or no file can be made where it would go. Makes nothing (a file made to probe a
    folder is removed at once). For commands to check where their results go before any work
    is done."""
    p = Path(path)
    if p.is_dir():
        return f"{path}: is a folder; give a file name"
    if p.exists():  # written in place (a file, /dev/stdout): its folder need not take new ones
        return None if os.access(p, os.W_OK) else f"{path}: exists and is not writable"
    return _folder_problem(p.parent, path)


def folder_path_problem(path: str | os.PathLike) -> str | None:
    """Why files cannot be written into the folder ``path`` (made when they are), or None."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        return f"{path}: is a file, not a folder"
    return _folder_problem(p, path)


def _folder_problem(folder: Path, path: str | os.PathLike) -> str | None:
    """Why new files cannot be made in ``folder``, or in the folders that would be made to
    hold them, or None. Probes the deepest existing folder with a file made and removed."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{path}: {existing} is a file, so no folder can be made under it"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        return f"{path}: cannot write in {existing} ({e.strerror or e})"
    return None


def plot_path_problem(path: str | os.PathLike) -> str | None:
    """Why a picture cannot be written to ``path``, or None; for commands to check their
    ``--plot`` before any work is done."""
    p = Path(path)
    if p.is_dir():
        return f"{path}: is a folder; give a file name ending in {', '.join(PLOT_SUFFIXES)}"
    if p.suffix.lower() not in PLOT_SUFFIXES:
        return f"{path}: the file name must end in {', '.join(PLOT_SUFFIXES)}"
    return file_path_problem(p)


def plot_model_errors(
    sets: list[tuple[str, list[tuple[str, float, float]]]],
    path: str | os.PathLike,
    title: str,
    band: float = 0.25,
) -> Path:
    """Draw the model's relative error, (modelled - measured) / measured, against the measured
    time (log scale), with a shaded band of +-``band``, and save the picture (PNG, SVG or PDF,
    by the suffix). A point above the band is a call the model makes too slow.

    Args:
        sets: (label, points) pairs, each point (algorithm, measured s, modelled s); one panel a
            set (for example the run the model was fitted to, and a held-out run), one colour
            and marker an algorithm.
        path: where the picture goes; parent folders are created.
        title: the figure's title.
        band: the relative error shaded (0.25: within 25%).

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    algorithms = sorted({a for _, points in sets for a, _, _ in points})
    markers = "osD^vPX*"
    fig, axes = plt.subplots(1, len(sets), figsize=(4.8 * len(sets) + 1.6, 4.4), squeeze=False,
                             sharey=True, layout="constrained")  # fmt: skip
    for ax, (label, points) in zip(axes[0], sets):
        ax.axhspan(-100 * band, 100 * band, color="0.9", label=f"within {band:.0%}")
        ax.axhline(0, color="0.4", lw=1)
        for i, a in enumerate(algorithms):
            mine = [(m, 100 * (t - m) / m) for name, m, t in points if name == a]
            if mine:
                ax.scatter(*zip(*mine), s=24, color=f"C{i % 10}", marker=markers[i % 8],
                           label=a, zorder=3)  # fmt: skip
        inside = sum(abs(t - m) <= band * m for _, m, t in points)
        ax.set(xscale="log", xlabel="measured time (s)",
               title=f"{label}\n{inside} of {len(points)} within {band:.0%}")  # fmt: skip
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("model error (%): above 0, modelled too slow")
    legend_outside(fig, axes[0])  # an algorithm may be in one panel only
    fig.suptitle(title)
    return save_figure(fig, path)


__all__ = [
    "PLOT_SUFFIXES",
    "legend_outside",
    "plot_model_errors",
    "plot_path_problem",
    "plot_report",
    "save_figure",
]
