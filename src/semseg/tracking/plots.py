"""Matplotlib figures for run analysis (the notebook calls these). Every function returns a Figure.

Metric values are stored as fractions and shown as percentages (`percent=True`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from semseg.evaluation.export import colorize
from semseg.tracking.runs import class_iou_columns, load_metrics, run_labels

__all__ = [
    "colorize",
    "plot_confusion_matrix",
    "plot_curves",
    "plot_metric_vs_param",
    "plot_per_class_iou",
    "show_examples",
]


def _new_axes(figsize: tuple[float, float]) -> tuple[Figure, Any]:
    # Figure() without pyplot: no global state, works under any backend (Agg in tests);
    # Jupyter still displays a returned Figure through its rich repr.
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _metric_label(metric: str, percent: bool) -> str:
    return f"{metric} (%)" if percent else metric


def plot_curves(
    runs: pd.DataFrame | Mapping[str, pd.DataFrame | str | os.PathLike],
    key: str = "loss",
    percent: bool | None = None,
    figsize: tuple[float, float] = (7, 4),
) -> Figure:
    """One line per run of `key` (a column of metrics.jsonl) against the step.

    `runs` is the DataFrame of `load_runs` (its `run_dir` column is read) or a mapping
    label -> metrics DataFrame (of `load_metrics`) or run folder. `percent` defaults to True for
    `val/...` keys.
    """
    if isinstance(runs, pd.DataFrame):
        if "run_dir" not in runs.columns:
            raise ValueError("plot_curves needs the DataFrame of load_runs (a run_dir column).")
        runs = dict(zip(run_labels(runs), runs["run_dir"]))
    percent = key.startswith("val/") if percent is None else percent
    fig, ax = _new_axes(figsize)
    available: set[str] = set()
    for label, metrics in runs.items():
        if not isinstance(metrics, pd.DataFrame):
            metrics = load_metrics(metrics)
        available.update(metrics.columns)
        if key not in metrics.columns:
            continue
        points = metrics[["step", key]].dropna()
        ax.plot(points["step"], points[key] * (100 if percent else 1), marker=".", label=label)
    if not ax.lines:
        raise KeyError(f"No run logged {key!r}; logged keys: {sorted(available - {'step'})}")
    ax.set_xlabel("step")
    ax.set_ylabel(_metric_label(key, percent))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def plot_metric_vs_param(
    df: pd.DataFrame,
    param: str,
    metric: str = "val/mIoU",
    percent: bool = True,
    figsize: tuple[float, float] = (5, 3.5),
) -> Figure:
    """`metric` of each run against the value of `param` (a swept override column).

    Numeric values give a scatter (log x axis when they span a decade or more, e.g. learning
    rates); other values give one column of points per value with its mean marked.
    """
    for column in (param, metric):
        if column not in df.columns:
            raise KeyError(f"No column {column!r}; columns: {list(df.columns)}")
    data = df[[param, metric]].dropna()
    y = data[metric] * (100 if percent else 1)
    fig, ax = _new_axes(figsize)
    x = pd.to_numeric(data[param], errors="coerce")
    if len(data) and x.notna().all() and not data[param].map(lambda v: isinstance(v, bool)).any():
        ax.scatter(x, y)
        if (x > 0).all() and x.max() >= 10 * x.min():
            ax.set_xscale("log")
    else:
        values = sorted(data[param].astype(str).unique())
        positions = data[param].astype(str).map({v: i for i, v in enumerate(values)})
        ax.scatter(positions, y, alpha=0.7)
        means = y.groupby(positions).mean()
        ax.scatter(means.index, means.values, marker="_", s=600, color="black", label="mean")
        ax.set_xticks(range(len(values)), values)
        ax.legend(fontsize="small")
    ax.set_xlabel(param)
    ax.set_ylabel(_metric_label(metric, percent))
    ax.grid(alpha=0.3)
    return fig


def plot_per_class_iou(
    df: pd.DataFrame,
    top_k: int = 3,
    class_names: Sequence[str] | None = None,
    metric: str = "val/mIoU",
    prefix: str = "val/IoU/",
    percent: bool = True,
    figsize: tuple[float, float] = (12, 4),
) -> Figure:
    """Per-class IoU of the `top_k` runs with the highest `metric`, side by side (grouped bars)."""
    columns = (
        [f"{prefix}{name}" for name in class_names]
        if class_names is not None
        else class_iou_columns(df, prefix)
    )
    if not columns:
        raise KeyError(f"No per-class columns '{prefix}<class>' in the runs table.")
    best = df.sort_values(metric, ascending=False).head(top_k) if metric in df.columns else df
    best = best.head(top_k)
    names = [c[len(prefix) :] for c in columns]
    fig, ax = _new_axes(figsize)
    width = 0.8 / max(len(best), 1)
    x = np.arange(len(columns))
    for i, ((_, row), label) in enumerate(zip(best.iterrows(), run_labels(df).loc[best.index])):
        values = pd.to_numeric(row.reindex(columns), errors="coerce").to_numpy(dtype=float)
        if metric in row and pd.notna(row[metric]):
            label += f" ({metric} {row[metric] * (100 if percent else 1):.1f})"
        ax.bar(
            x + (i - (len(best) - 1) / 2) * width,
            values * (100 if percent else 1),
            width,
            label=label,
        )
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_ylabel(_metric_label(prefix.rstrip("/"), percent))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small")
    return fig


def plot_confusion_matrix(
    confmat: np.ndarray,
    class_names: Sequence[str],
    normalize: bool = True,
    figsize: tuple[float, float] = (9, 8),
) -> Figure:
    """Confusion matrix, rows ground truth and columns prediction (row-normalised by default).

    A (K+1)x(K+1) matrix (the official one: the last class counts "ignored" predictions) gets an
    "ignored" label after the K class names.
    """
    confmat = np.asarray(confmat, dtype=np.float64)
    names = list(class_names)
    if confmat.shape[0] == len(names) + 1:
        names.append("ignored")
    if confmat.shape != (len(names), len(names)):
        raise ValueError(
            f"Confusion matrix {confmat.shape} does not match {len(class_names)} class names."
        )
    if normalize:
        totals = confmat.sum(axis=1, keepdims=True)
        confmat = np.divide(confmat, totals, out=np.zeros_like(confmat), where=totals > 0)
    fig, ax = _new_axes(figsize)
    image = ax.imshow(confmat, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(
        image, ax=ax, shrink=0.8, label="fraction of the true class" if normalize else "pixels"
    )
    ticks = range(len(names))
    ax.set_xticks(ticks, names, rotation=90)
    ax.set_yticks(ticks, names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    if normalize and len(names) <= 25:
        for (i, j), value in np.ndenumerate(confmat):
            if value >= 0.005:
                color = "white" if value > 0.5 else "black"
                ax.text(
                    j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=6, color=color
                )
    return fig


def show_examples(
    examples: Sequence[Mapping[str, Any]],
    palette: Sequence[Sequence[int]],
    class_names: Sequence[str] | None = None,
    max_examples: int = 4,
    panel_size: float = 3.0,
) -> Figure:
    """Rows of image | prediction | ground truth (when present), masks coloured with `palette`.

    `examples` are dicts with `name`, `image` HxWx3 uint8, `pred` HxW ids, `gt` HxW ids or None
    (as `runs.load_examples` returns). With `class_names`, a legend names the classes shown.
    """
    examples = list(examples)[:max_examples]
    if not examples:
        raise ValueError("No examples to show.")
    has_gt = any(ex.get("gt") is not None for ex in examples)
    cols = 3 if has_gt else 2
    height, width = np.asarray(examples[0]["pred"]).shape[:2]
    fig = Figure(
        figsize=(panel_size * cols * width / height, panel_size * len(examples) + 0.5),
        layout="constrained",
    )
    axes = fig.subplots(len(examples), cols, squeeze=False)
    shown: set[int] = set()
    for row, ex in zip(axes, examples):
        panels = [("image", ex["image"]), ("prediction", colorize(ex["pred"], palette))]
        shown.update(np.unique(ex["pred"]).tolist())
        if has_gt:
            gt = ex.get("gt")
            panels.append(("ground truth", None if gt is None else colorize(gt, palette)))
            if gt is not None:
                shown.update(np.unique(gt).tolist())
        for ax, (title, image) in zip(row, panels):
            ax.set_axis_off()
            if image is not None:
                ax.imshow(image)
            ax.set_title(f"{ex.get('name', '')} {title}".strip(), fontsize="small")
    if class_names is not None:
        handles = [
            Patch(color=np.asarray(palette[i]) / 255, label=class_names[i])
            for i in sorted(shown)
            if i < min(len(class_names), len(palette))
        ]
        if handles:
            fig.legend(
                handles=handles,
                loc="outside lower center",
                ncols=min(len(handles), 8),
                fontsize="small",
            )
    return fig
