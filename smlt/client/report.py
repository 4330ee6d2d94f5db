"""What a run leaves in its output folder: ``result.json``, ``model.pt`` and plots.

``result.json`` is the run's record for people and tools: final metrics, per-iteration history,
configurations and generations, cost. It never holds a credential: Redis URLs appear redacted
(the password replaced by ``***``), and nothing else secret is known to the driver.

The plots (loss, throughput, time per phase) are built as matplotlib figures by
:func:`build_figures`, so tests can look inside them, and saved as PNGs by :func:`plot_run`.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from smlt.client.record import EPOCH_FIELDS

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["build_figures", "plot_run", "write_result"]


def write_result(output_dir: Path, result: dict[str, Any]) -> Path:
    """Write ``result.json`` atomically (a crash never leaves half a file)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "result.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=_jsonable, allow_nan=False))
    tmp.replace(path)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


# --- plots ------------------------------------------------------------------------------------

# Epoch-record keys that are not the task's metrics; every other numeric key came from evaluate().
_NOT_METRICS = EPOCH_FIELDS
_TRAINING, _TRAINING_RAW, _MARK = "tab:blue", "#a6c8e8", "0.35"
# From this many points on a curve is drawn with its running mean; the phases' stack, whose
# colours blur into noise at more than about one iteration per two pixels, shows at most
# _PHASE_BINS means of consecutive iterations.
_SMOOTH_FROM, _PHASE_BINS = 200, 250
_DPI = 110


def plot_run(
    output_dir: Path, history: list[dict[str, Any]], epochs: list[dict[str, Any]]
) -> list[Path]:
    """Write ``loss.png``, ``throughput.png`` and ``phases.png``; returns the files written."""
    figures = build_figures(history, epochs)
    if figures:
        output_dir.mkdir(parents=True, exist_ok=True)
    return [_save(fig, output_dir / f"{name}.png") for name, fig in figures.items()]


def build_figures(history: list[dict[str, Any]], epochs: list[dict[str, Any]]) -> dict[str, Figure]:
    """The run's three figures by file stem, not yet saved (tests look inside them).

    Each quantity has an axis of its own: the training loss and every evaluate() metric whose
    name says it is a loss share one y-axis, so a lower value is drawn lower; accuracy and the
    like get a panel each. Legends sit beside the axes, never on the data. Per-iteration timings
    have spikes (the first iteration, a resume, a slow invocation) that would flatten the rest:
    their y-axis stops at a robust limit and the title says how many iterations it cuts off.
    Every curve is one artist whatever the run's length, so 10,000+ iterations stay cheap.
    A resumed run's ``part`` changes are drawn as a "resumed" line.
    """
    if not history:
        return {}
    by_iteration = _latest_by_iteration(history)
    return {
        "loss": _loss_figure(by_iteration, _latest_by_iteration(epochs)),
        "throughput": _throughput_figure(history),
        "phases": _phases_figure(by_iteration),
    }


def _loss_figure(records: list[dict[str, Any]], epochs: list[dict[str, Any]]) -> Figure:
    names = _metric_names(epochs)
    losses = [name for name in names if _is_loss_like(name)]
    others = [n for n in names if n not in losses]
    steps = _step_panels(records)
    panels = len(others) + len(steps)
    fig = _figure(9.0, 3.8 + 1.8 * panels)
    axes = fig.subplots(
        1 + panels, 1, sharex=True, squeeze=False, height_ratios=[2.0] + [1.0] * panels
    )[:, 0]
    ax, colours = axes[0], _colours()
    x, y = _column(records, "iteration"), _column(records, "loss")
    _plot_series(ax, x, y, "training loss")
    ex = _column(epochs, "iteration")
    shown = [y]
    if epochs:
        train = _column(epochs, "train_loss")
        ax.plot(ex, train, "o", ms=5, color=next(colours), label="training loss at epoch end")
        shown.append(train)
    for name in losses:
        values = _column(epochs, name)
        ax.plot(ex, values, "s-", ms=4, lw=1.2, color=next(colours), label=f"{name} (evaluate)")
        shown.append(values)
    finite = np.concatenate(shown)
    finite = finite[np.isfinite(finite)]
    log = finite.size > 0 and finite.min() > 0 and finite.max() >= 10 * finite.min()
    if log:
        _log_scale(ax, finite.min(), finite.max())
    label = ", ".join(["loss", *(n for n in losses if n != "loss")])
    ax.set_ylabel(label + (" (log scale)" if log else ""))
    if finite.size == 0:
        _say(ax, "no finite loss values")
    _legend_beside(ax)
    for ax, name in zip(axes[1 : 1 + len(others)], others, strict=True):
        values = _column(epochs, name)
        ax.plot(ex, values, "s-", ms=4, lw=1.2, color=next(colours), label=f"{name} (evaluate)")
        ax.set_ylabel(f"{name}\n(evaluate)")
        if not np.isfinite(values).any():
            _say(ax, f"evaluate() gave no finite {name}")
    for ax, (key, label) in zip(axes[1 + len(others) :], steps.items(), strict=True):
        # The step's own values, each iteration: a schedule is a staircase, a norm a trace.
        ax.plot(
            x,
            _column(records, key),
            "-",
            lw=1.2,
            color=next(colours),
            drawstyle="steps-post" if key == "lr" else "default",
            label=f"{label} (each iteration)",
        )
        ax.set_ylabel(label.replace(" (", "\n("))
    for ax in axes:
        ax.grid(alpha=0.3)
        _mark_resumes(ax, x, records, label=ax is axes[0])
    axes[-1].set_xlabel("iteration")
    fig.suptitle("Training loss and evaluate() metrics" if names else "Training loss")
    return fig


def _throughput_figure(history: list[dict[str, Any]]) -> Figure:
    wall = _column(history, "wall_s")
    fig = _figure(9.0, 4.0)
    ax = fig.subplots()
    title = "Throughput (global batch / slowest rank's iteration time)"
    by_time = bool(np.isfinite(wall).all() and (np.diff(wall) >= 0).all())
    if by_time:
        records, x = history, wall
        ax.set_xlabel("seconds the run has been executing")
    else:  # older records restart wall_s at a resume: time would run backwards
        records = _latest_by_iteration(history)
        x = _column(records, "iteration")
        ax.set_xlabel("iteration")
        title += "\nagainst iteration: this record's wall_s is missing or not monotonic"
    y, iter_s = _column(records, "samples_per_s"), _column(records, "iter_s")
    # Steps: an iteration's rate holds over the seconds it took, up to its wall_s. The first
    # iteration of each part starts after a gap (the run was stopped, then started again): a
    # point without a rate at its start keeps the step from spanning the gap.
    px, py, weights, segments = x, y, iter_s, [0]
    if by_time:
        starts = [0, *_resume_indices(records)]
        previous_end = np.array([x[i - 1] if i else -np.inf for i in starts])
        begin = np.maximum(x[starts] - np.nan_to_num(iter_s[starts]), previous_end)
        px, py = np.insert(x, starts, begin), np.insert(y, starts, math.nan)
        weights = np.insert(iter_s, starts, math.nan)
        segments = [start + k for k, start in enumerate(starts)]  # after the insertions
    # Rates average weighted by time (samples over seconds, not the mean of the ratios), each
    # part on its own: a resume's slow first iteration does not drag down the part before.
    _plot_series(
        ax, px, py, "samples/s", 50, weights=weights, drawstyle="steps-pre", segments=segments
    )
    both = np.isfinite(y) & np.isfinite(iter_s)
    if both.any():
        mean = float(np.sum(y[both] * iter_s[both]) / np.sum(iter_s[both]))
        ax.axhline(
            mean,
            color="tab:orange",
            ls="--",
            lw=1,
            label=f"whole run: {mean:,.0f}\n(samples / iteration time)",
        )
    title += _clip(ax, y, "iterations", "samples/s")
    ax.set_ylim(bottom=0)
    ax.set(ylabel="samples / s", title=title)
    ax.grid(alpha=0.3)
    _mark_resumes(ax, x, records)
    _legend_beside(ax)
    return fig


def _phases_figure(records: list[dict[str, Any]]) -> Figure:
    parts = _phase_times(records)
    x, iter_s = _column(records, "iteration"), _column(records, "iter_s")
    fig = _figure(10.0, 5.0)
    timeline, summary = fig.subplots(1, 2, width_ratios=[2.6, 1.0])
    title = "Time per iteration (each part: its slowest rank)"
    size = math.ceil(len(records) / _PHASE_BINS)
    if size > 1:
        title += f", mean of every {size} iterations"
    binned = {name: _bin_means(values, size) for name, values in parts.items()}
    bx, b_iter = _bin_means(x, size), _bin_means(iter_s, size)
    colours = ["tab:cyan", "tab:green", "tab:purple", "tab:orange", "tab:red"]
    timeline.stackplot(bx, *binned.values(), labels=list(binned), colors=colours, step="mid")
    timeline.plot(
        bx, b_iter, "k.-" if bx.size == 1 else "k-", lw=0.8, label="iteration (slowest rank)"
    )
    total = np.fmax(np.sum(list(binned.values()), axis=0), b_iter)
    title += _clip(timeline, total, "iterations" if size == 1 else "bins", "s")
    timeline.set(xlabel="iteration", ylabel="seconds", title=title)
    timeline.set_ylim(bottom=0)
    timeline.grid(alpha=0.3)
    _mark_resumes(timeline, x, records)
    timeline.legend(
        loc="upper center", bbox_to_anchor=(0.5, -0.13), ncols=3, fontsize=8, frameon=False
    )
    # Where the time goes in typical numbers, which no spike can hide: medians and 90th pct.
    typical = {"iteration": np.nan_to_num(iter_s), **parts}
    median = np.array([np.median(v) for v in typical.values()])
    p90 = np.array([np.percentile(v, 90) for v in typical.values()])
    rows = np.arange(len(typical))[::-1]
    summary.barh(rows, median, color=["0.25", *colours])
    summary.errorbar(
        median, rows, xerr=[np.zeros_like(median), p90 - median], fmt="none", ecolor="k", capsize=3
    )
    summary.set_yticks(rows, [name.split(" (")[0] for name in typical], fontsize=8)
    summary.set(xlabel="seconds", title="typical iteration\n(median, p90 whisker)")
    summary.grid(axis="x", alpha=0.3)
    return fig


def _step_panels(records: list[dict[str, Any]]) -> dict[str, str]:
    """What each step did besides its loss, as panels under it: the learning rate when a
    schedule moved it (a constant one says nothing), the global gradient norm when reported."""
    panels = {}
    lrs = _column(records, "lr")
    if np.unique(lrs[np.isfinite(lrs)]).size > 1:
        panels["lr"] = "learning rate"
    if np.isfinite(_column(records, "grad_norm")).any():
        panels["grad_norm"] = "gradient norm (before clipping)"
    return panels


def _is_loss_like(name: str) -> bool:
    """A metric on the training loss's scale: its name says "loss", or it is what a task's
    loss() usually computes (``mse``, ``val_mse``, ``nll``). rmse, mae, accuracy, f1... each
    have a scale of their own, and a panel of their own."""
    words = set(re.split(r"[\W_]+", name.lower()))
    return "loss" in name.lower() or bool(words & {"mse", "nll"})


def _phase_times(records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Each iteration's seconds in the benchmarks' categories (smlt's own CPU work is not
    hidden inside "sync"); a missing time counts as 0 s."""
    update = np.nan_to_num(_column(records, "update_s", 0.0))
    codec = np.nan_to_num(_column(records, "codec_s", 0.0))
    waiting = np.nan_to_num(_column(records, "sync_s")) - update - codec
    return {
        "data": np.nan_to_num(_column(records, "data_s")),
        "compute (your loss and backward)": np.nan_to_num(_column(records, "compute_s")),
        "optimizer update": update,
        "smlt CPU (frames, sums)": codec,
        "communication and waiting": np.maximum(waiting, 0.0),
    }


# --- helpers ----------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    """A figure with its own Agg canvas: no pyplot, so no global state and nothing to close."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colours() -> Iterator[str]:
    """Distinct colours for a figure's series after the training loss's blue (they repeat only
    after nine evaluate() metrics)."""
    return itertools.cycle(
        [
            "tab:orange",
            "tab:green",
            "tab:red",
            "tab:purple",
            "tab:brown",
            "tab:pink",
            "tab:olive",
            "tab:cyan",
            "tab:gray",
        ]
    )


def _latest_by_iteration(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per iteration, in order; the latest wins. A resumed run executes again the
    iterations after its last checkpoint, and the model went on from the second execution."""
    latest = {record["iteration"]: record for record in records}
    return [latest[i] for i in sorted(latest)]


def _column(records: Sequence[dict[str, Any]], key: str, missing: float = math.nan) -> np.ndarray:
    """One key of every record as floats; None (how result.json stores NaN) and inf become NaN."""
    values = np.array(
        [math.nan if (v := r.get(key, missing)) is None else float(v) for r in records],
        dtype=float,
    )
    values[~np.isfinite(values)] = math.nan
    return values


def _metric_names(epochs: list[dict[str, Any]]) -> list[str]:
    """The task's evaluate() metrics: every other key whose values are all numbers (or None)."""
    names = sorted({key for epoch in epochs for key in epoch} - _NOT_METRICS)
    return [
        name
        for name in names
        if all(
            v is None or (isinstance(v, int | float) and not isinstance(v, bool))
            for v in (epoch.get(name) for epoch in epochs)
        )
    ]


def _plot_series(
    ax: Axes,
    x: np.ndarray,
    y: np.ndarray,
    label: str,
    smooth_from: int = _SMOOTH_FROM,
    weights: np.ndarray | None = None,
    drawstyle: str = "default",
    segments: Sequence[int] = (),
) -> None:
    """A per-iteration series as one line; a long one light, under its running mean (which
    does not reach across the starts of ``segments``)."""
    each = f"{label} (each iteration)"
    if x.size < smooth_from:
        # Markers on a short curve, and always on a lone point (a line alone would not show).
        dots = np.isfinite(y).sum() == 1 or (x.size <= 30 and drawstyle == "default")
        ax.plot(
            x, y, ".-" if dots else "-", color=_TRAINING, lw=1.2, drawstyle=drawstyle, label=each
        )
        return
    window = max(5, x.size // 100)
    ax.plot(x, y, color=_TRAINING_RAW, lw=0.7, drawstyle=drawstyle, label=each)
    smooth = _running_mean(y, window, weights, segments)
    ax.plot(
        x, smooth, color=_TRAINING, lw=1.6, label=f"{label} (running mean, {window} iterations)"
    )


def _running_mean(
    y: np.ndarray, window: int, weights: np.ndarray | None = None, segments: Sequence[int] = ()
) -> np.ndarray:
    """Centred (weighted) mean over ``window`` points, NaN ignored, within the segment that
    begins at the latest of ``segments``; O(n) by cumulative sums. Where ``y`` itself is
    missing so is the mean: a gap stays a gap."""
    w = np.ones_like(y) if weights is None else weights
    valid = np.isfinite(y) & np.isfinite(w)
    w = np.where(valid, w, 0.0)
    sums = np.concatenate([[0.0], np.cumsum(np.where(valid, y, 0.0) * w)])
    totals = np.concatenate([[0.0], np.cumsum(w)])
    index = np.arange(y.size)
    begins = np.zeros(y.size, dtype=int)
    ends = np.full(y.size, y.size)
    for start in segments:
        begins[start] = start
        if start > 0:
            ends[start - 1] = start
    begins, ends = np.maximum.accumulate(begins), np.minimum.accumulate(ends[::-1])[::-1]
    lo = np.maximum(index - window // 2, begins)
    hi = np.minimum(index + window // 2 + 1, ends)
    total = totals[hi] - totals[lo]
    mean = (sums[hi] - sums[lo]) / np.where(total > 0, total, 1.0)
    return np.where((total > 0) & np.isfinite(y), mean, math.nan)


def _bin_means(values: np.ndarray, size: int) -> np.ndarray:
    """Mean of each run of ``size`` values (the last run may be shorter), NaN ignored."""
    if size == 1:
        return values
    starts = np.arange(0, values.size, size)
    valid = np.isfinite(values)
    sums = np.add.reduceat(np.where(valid, values, 0.0), starts)
    counts = np.add.reduceat(valid.astype(int), starts)
    return np.where(counts > 0, sums / np.maximum(counts, 1), math.nan)


def _clip(ax: Axes, values: np.ndarray, what: str, unit: str) -> str:
    """Stop the y-axis at a robust limit when a few values would flatten the rest (the highest
    is over 1.5 × the limit); returns the note for the title, "" when nothing is cut off. The
    limit is 1.2 × the 99th percentile, or 2.4 × the 90th if that is lower: in a 60-iteration
    run the 99th percentile is still the first iteration's spike."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return ""
    p90, p99 = np.percentile(finite, [90, 99])
    top = 1.2 * min(p99, 2 * p90)
    if top <= 0 or finite.max() <= 1.5 * top:
        return ""
    ax.set_ylim(top=top)
    above = int(np.count_nonzero(finite > top))
    limit, highest = _number(top), _number(finite.max())
    return f"\n{above} of {finite.size} {what} above {limit} {unit} cut off (highest {highest})"


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _mark_resumes(
    ax: Axes, x: np.ndarray, records: list[dict[str, Any]], label: bool = True
) -> None:
    """A thin line where the run was resumed (its ``part`` changes)."""
    for i in _resume_indices(records):
        ax.axvline(x[i], color=_MARK, lw=0.8, ls=":")
        if label:
            ax.text(
                x[i],
                1.0,
                "resumed",
                transform=ax.get_xaxis_transform(),
                rotation=90,
                ha="right",
                va="top",
                fontsize=7,
                color=_MARK,
            )


def _log_scale(ax: Axes, low: float, high: float) -> None:
    """Log scale labelled 0.2, 0.5, 1, 2 rather than 2×10⁻¹: minor ticks get a label too when
    the data spans less than two decades, and there are too few decades to read it otherwise."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    if high < 100 * low:
        ax.yaxis.set_minor_formatter(
            FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else "")
        )


def _resume_indices(records: list[dict[str, Any]]) -> list[int]:
    """Where a new part of the run begins (``part`` changes: ``smlt resume`` ran)."""
    parts = [record.get("part", 0) for record in records]
    return [i for i in range(1, len(parts)) if parts[i] != parts[i - 1]]


def _legend_beside(ax: Axes) -> None:
    # Outside the axes, so it never covers data (and placing it costs nothing: "best" can take
    # seconds on a long run).
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def _say(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", color="0.4")


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=_DPI)
    return path
