"""The plots a run leaves behind say what happened: each quantity on an axis of its own (a lower
loss drawn lower), legends off the data, distinct colours, per-iteration spikes cut off and
counted, resumes marked, and time that never runs backwards. The figures are inspected, not
only written: ``build_figures`` returns them before ``plot_run`` saves them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from smlt.client.report import build_figures, plot_run


def history(
    n: int,
    *,
    first: int = 0,
    wall_start_s: float = 10.0,
    part: int | None = None,
    loss_from: float = 0.5,
    loss_to: float = 0.05,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """``n`` plausible per-iteration records: loss decaying from ``loss_from`` to ``loss_to``,
    about 20 ms an iteration, wall_s growing by each iteration's time."""
    rng = np.random.default_rng(seed)
    records, wall_s = [], wall_start_s
    for i in range(n):
        data_s, compute_s, update_s, codec_s = rng.uniform(0.001, 0.004, size=4)
        sync_s = update_s + codec_s + rng.uniform(0.005, 0.01)
        iter_s = data_s + compute_s + sync_s
        wall_s += iter_s
        loss = loss_from * (loss_to / loss_from) ** (i / max(n - 1, 1))
        record = {
            "iteration": first + i,
            "loss": loss * rng.uniform(0.95, 1.05),
            "samples_per_s": 256 / iter_s,
            "wall_s": wall_s,
            "iter_s": iter_s,
            "data_s": data_s,
            "compute_s": compute_s,
            "sync_s": sync_s,
            "update_s": update_s,
            "codec_s": codec_s,
        }
        if part is not None:
            record["part"] = part
        records.append(record)
    return records


def epochs_of(records: list[dict[str, Any]], every: int, **metrics: list[Any]) -> list[dict]:
    """One epoch record every ``every`` iterations, with the given metric values in order."""
    ends = [r for r in records if (r["iteration"] + 1) % every == 0]
    out = []
    for k, r in enumerate(ends):
        entry = {"epoch": k, "iteration": r["iteration"], "train_loss": r["loss"]}
        entry["samples_per_s"] = r["samples_per_s"]
        entry.update({name: values[k] for name, values in metrics.items()})
        out.append(entry)
    return out


def labelled_lines(fig: Figure) -> dict[str, Line2D]:
    return {
        str(line.get_label()): line
        for ax in fig.axes
        for line in ax.get_lines()
        if not str(line.get_label()).startswith("_")
    }


def drawn(fig: Figure) -> Any:
    """The renderer after a full draw (layout done), for window extents."""
    fig.canvas.draw()
    return fig.canvas.get_renderer()  # type: ignore[attr-defined]


def height_on_screen(ax: Any, x: float, y: float) -> float:
    return float(ax.transData.transform((x, y))[1])


def resume_markers(ax: Axes) -> list[float]:
    """x of the vertical lines drawn for resumes (dotted, spanning the axes)."""
    return [
        float(np.asarray(line.get_xdata())[0])
        for line in ax.get_lines()
        if line.get_linestyle() == ":" and np.asarray(line.get_xdata()).size == 2
    ]


def test_regression_held_out_mse_below_training_is_drawn_below_on_the_same_axis() -> None:
    # The reported case: evaluate()'s MSE of 0.028 was drawn above a training MSE of 0.05.
    records = history(100, loss_from=0.5, loss_to=0.05)
    epochs = epochs_of(
        records, 20, mse=[0.3, 0.1, 0.06, 0.04, 0.028], accuracy=[0.5, 0.7, 0.8, 0.85, 0.9]
    )
    fig = build_figures(records, epochs)["loss"]
    lines = labelled_lines(fig)
    training = lines["training loss (each iteration)"]
    mse = lines["mse (evaluate)"]
    accuracy = lines["accuracy (evaluate)"]
    ax = training.axes
    assert ax is not None
    assert mse.axes is ax and lines["training loss at epoch end"].axes is ax
    assert accuracy.axes is not ax  # its own panel, its own scale
    assert len(fig.axes) == 2
    assert ax.get_yscale() == "log"  # 0.028 to 0.5 spans more than a decade
    assert accuracy.axes is not None and accuracy.axes.get_yscale() == "linear"
    x_end = 99.0
    training_y = float(np.asarray(training.get_ydata())[-1])
    assert 0.045 < training_y < 0.056
    assert height_on_screen(ax, x_end, 0.028) < height_on_screen(ax, x_end, training_y)
    assert not any("held-out" in label for label in lines)  # the task's names, not ours


def test_every_loss_like_metric_shares_the_loss_axis_and_every_other_has_a_panel() -> None:
    records = history(60)
    epochs = epochs_of(
        records,
        20,
        loss=[0.4, 0.2, 0.1],
        val_nll=[0.5, 0.3, 0.2],
        rmse=[0.6, 0.4, 0.3],
        accuracy=[0.5, 0.6, 0.7],
        f1=[0.4, 0.5, 0.6],
    )
    fig = build_figures(records, epochs)["loss"]
    lines = labelled_lines(fig)
    loss_axis = lines["training loss (each iteration)"].axes
    for name in ("loss", "val_nll"):
        assert lines[f"{name} (evaluate)"].axes is loss_axis
    others = [lines[f"{name} (evaluate)"].axes for name in ("accuracy", "f1", "rmse")]
    assert loss_axis not in others and len({id(ax) for ax in others}) == 3
    assert len(fig.axes) == 4
    colours = [to_rgba(line.get_color()) for line in lines.values()]
    assert len(set(colours)) == len(colours), "two series share a colour"


def test_loss_axis_is_linear_within_a_decade_and_for_negative_losses() -> None:
    narrow = history(50, loss_from=2.3, loss_to=0.4)
    assert build_figures(narrow, [])["loss"].axes[0].get_yscale() == "linear"
    negative = [{**r, "loss": r["loss"] - 1.0} for r in history(50, loss_from=5, loss_to=0.01)]
    assert build_figures(negative, [])["loss"].axes[0].get_yscale() == "linear"
    assert (
        build_figures(history(50, loss_from=5, loss_to=0.01), [])["loss"].axes[0].get_yscale()
        == "log"
    )


def test_legends_sit_outside_every_axes() -> None:
    records = history(300)
    epochs = epochs_of(records, 50, loss=[0.3] * 6, accuracy=[0.8] * 6)
    for name, fig in build_figures(records, epochs).items():
        renderer = drawn(fig)
        legends = [legend for ax in fig.axes if (legend := ax.get_legend()) is not None]
        assert legends, name
        for legend in legends:
            box = legend.get_window_extent(renderer)
            for ax in fig.axes:
                assert not box.overlaps(ax.get_window_extent(renderer)), (name, ax.get_title())


def test_phase_spikes_are_cut_off_and_the_title_counts_them() -> None:
    records = history(240)
    for i in (0, 150, 151):  # e.g. the first iteration, and a resume's first two
        records[i] = {**records[i], "iter_s": 5.0, "sync_s": 4.9}
    timeline = build_figures(records, [])["phases"].axes[0]
    top = timeline.get_ylim()[1]
    typical = max(r["iter_s"] for i, r in enumerate(records) if i not in (0, 150, 151))
    assert typical < top < 1.0
    assert "3 of 240 iterations above" in timeline.get_title()


def test_a_short_runs_first_iteration_does_not_set_the_phase_scale() -> None:
    # digits: 30 iterations of ~20 ms and a first one of 0.7 s (the 99th percentile of 30
    # values is still near the spike).
    records = history(30)
    records[0] = {**records[0], "iter_s": 0.7, "compute_s": 0.65}
    timeline = build_figures(records, [])["phases"].axes[0]
    assert timeline.get_ylim()[1] < 0.2
    assert "1 of 30 iterations above" in timeline.get_title()


def test_steady_phases_are_not_cut() -> None:
    records = history(240)
    # Somewhat slower than the rest, not a spike: cutting it off would hide more than it shows.
    records[10] = {**records[10], "iter_s": 1.5 * max(r["iter_s"] for r in records)}
    timeline = build_figures(records, [])["phases"].axes[0]
    highest = max(r["iter_s"] for r in records)
    assert timeline.get_ylim()[1] >= highest
    assert "cut off" not in timeline.get_title()


def test_a_resume_is_marked_and_neither_plot_goes_backwards() -> None:
    # Part 0 ran iterations 0..49, checkpointed at 40; part 1 ran 40..99 again from there.
    first = history(50, part=0, seed=1)
    second = history(60, first=40, wall_start_s=first[-1]["wall_s"], part=1, seed=2)
    epochs = epochs_of(first[:40], 20, accuracy=[0.5, 0.6]) + epochs_of(
        second, 20, accuracy=[0.7, 0.8, 0.9]
    )
    figures = build_figures(first + second, epochs)

    loss_ax = figures["loss"].axes[0]
    training = labelled_lines(figures["loss"])["training loss (each iteration)"]
    xs = np.asarray(training.get_xdata())
    assert list(xs) == list(range(100))  # one point per iteration, the latest execution's
    assert float(np.asarray(training.get_ydata())[45]) == second[5]["loss"]
    assert resume_markers(loss_ax) == [40.0]
    assert any(t.get_text() == "resumed" for t in loss_ax.texts)

    throughput = figures["throughput"].axes[0]
    rate = labelled_lines(figures["throughput"])["samples/s (each iteration)"]
    wall, rates = np.asarray(rate.get_xdata()), np.asarray(rate.get_ydata())
    assert (np.diff(wall) >= 0).all()  # all the work, in time order
    assert np.isfinite(rates).sum() == 110
    # Part 1's first step spans its own iteration, not the pause before it.
    (at,) = np.flatnonzero(wall == second[0]["wall_s"])
    assert np.isnan(rates[at - 1]) and wall[at - 1] == second[0]["wall_s"] - second[0]["iter_s"]
    assert resume_markers(throughput) == [second[0]["wall_s"]]
    assert any(t.get_text() == "resumed" for t in throughput.texts)
    assert throughput.get_xlabel().startswith("seconds")


def test_a_resumes_slow_first_iteration_does_not_drag_down_the_part_before() -> None:
    first = history(100, part=0, seed=1)
    second = history(100, first=100, wall_start_s=first[-1]["wall_s"] + 30.0, part=1, seed=2)
    second[0] = {**second[0], "iter_s": 3.0, "samples_per_s": 256 / 3.0}  # workers start cold
    figure = build_figures(first + second, [])["throughput"]
    smooth = next(line for label, line in labelled_lines(figure).items() if "running mean" in label)
    wall, rates = np.asarray(smooth.get_xdata()), np.asarray(smooth.get_ydata())
    before = rates[wall == first[-1]["wall_s"]]
    typical = min(r["samples_per_s"] for r in first)
    assert before.size == 1 and before[0] > typical  # a mean of part 0's rates alone


def test_old_records_whose_wall_s_restarts_are_plotted_against_iteration() -> None:
    records = history(50, seed=1) + history(60, first=40, wall_start_s=3.0, seed=2)
    figure = build_figures(records, [])["throughput"]
    throughput = figure.axes[0]
    rate = labelled_lines(figure)["samples/s (each iteration)"]
    assert throughput.get_xlabel() == "iteration"
    assert list(np.asarray(rate.get_xdata())) == list(range(100))


def test_none_nan_and_inf_leave_gaps_not_errors(tmp_path: Path) -> None:
    records = history(40)
    records[3] = {**records[3], "loss": None}
    records[4] = {**records[4], "loss": math.nan, "iter_s": None, "sync_s": None}
    records[5] = {**records[5], "samples_per_s": math.inf, "update_s": None}
    epochs = epochs_of(
        records, 10, loss=[0.4, None, 0.2, math.nan], accuracy=[None] * 4, part=[0] * 4
    )
    figures = build_figures(records, epochs)
    ys = np.asarray(labelled_lines(figures["loss"])["training loss (each iteration)"].get_ydata())
    assert np.isnan(ys[3]) and np.isnan(ys[4]) and np.isfinite(ys[5])
    rate = labelled_lines(figures["throughput"])["samples/s (each iteration)"]
    at_inf = np.asarray(rate.get_xdata()) == records[5]["wall_s"]
    assert at_inf.sum() == 1 and np.isnan(np.asarray(rate.get_ydata())[at_inf]).all()  # a gap
    accuracy_ax = labelled_lines(figures["loss"])["accuracy (evaluate)"].axes
    assert accuracy_ax is not None
    assert any("no finite accuracy" in t.get_text() for t in accuracy_ax.texts)
    assert "part (evaluate)" not in labelled_lines(figures["loss"])
    written = plot_run(tmp_path, records, epochs)  # warnings are errors in this suite
    assert [p.name for p in written] == ["loss.png", "throughput.png", "phases.png"]


def test_a_single_iteration_is_drawn_as_a_visible_point(tmp_path: Path) -> None:
    records = history(1)
    epochs = epochs_of(records, 1, accuracy=[0.3])
    figures = build_figures(records, epochs)
    for name in ("loss", "throughput"):
        line = next(iter(labelled_lines(figures[name]).values()))
        assert line.get_marker() not in ("None", "", None, " "), name
    for path in plot_run(tmp_path, records, epochs):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_number_of_artists_does_not_grow_with_the_run() -> None:
    def artists(n: int) -> list[int]:
        records = history(n, part=0)
        records[n // 2 :] = [{**r, "part": 1} for r in records[n // 2 :]]
        epochs = epochs_of(records, n // 10, loss=[0.1] * 10, accuracy=[0.9] * 10)
        figures = build_figures(records, epochs)
        return [len(ax.get_children()) for fig in figures.values() for ax in fig.axes]

    assert artists(20_000) == artists(400)


def test_a_long_runs_phases_are_averaged_in_bins_and_spiky_bins_cut_off() -> None:
    records = history(20_000)
    for i in (0, 5000, 5001):  # 50 s each: bins of 80 iterations of ~20 ms still stand out
        records[i] = {**records[i], "iter_s": 50.0, "sync_s": 49.9}
    figures = build_figures(records, [])
    timeline = figures["phases"].axes[0]
    assert "mean of every 80 iterations" in timeline.get_title()
    assert "2 of 250 bins above" in timeline.get_title()
    assert timeline.get_ylim()[1] < 0.1
    (iteration_line,) = [
        line for line in timeline.get_lines() if line.get_label() == "iteration (slowest rank)"
    ]
    assert np.asarray(iteration_line.get_xdata()).size == 250
    smooth = labelled_lines(figures["loss"])["training loss (running mean, 200 iterations)"]
    assert np.asarray(smooth.get_xdata()).size == 20_000


def test_no_history_writes_nothing(tmp_path: Path) -> None:
    assert plot_run(tmp_path / "out", [], []) == []
    assert not (tmp_path / "out").exists()


def test_a_moving_learning_rate_and_the_gradient_norm_get_panels_of_their_own() -> None:
    """Under the loss, on the same iteration axis: a schedule's staircase, and the norm of every
    step; a learning rate that never moved gets no panel (it would say nothing)."""
    records = history(40)
    for i, record in enumerate(records):
        record["lr"] = 0.1 * 0.5 ** (i // 10)
        record["grad_norm"] = 2.0 + math.sin(i)
    fig = build_figures(records, [])["loss"]
    lines = labelled_lines(fig)
    lr = lines["learning rate (each iteration)"]
    norm = lines["gradient norm (before clipping) (each iteration)"]
    loss_axis = lines["training loss (each iteration)"].axes
    assert len({id(loss_axis), id(lr.axes), id(norm.axes)}) == 3 and len(fig.axes) == 3
    assert lr.get_drawstyle() == "steps-post"
    assert list(np.asarray(lr.get_ydata())) == [r["lr"] for r in records]
    assert list(np.asarray(norm.get_xdata())) == list(range(40))
    for record in records:
        record["lr"] = 0.1
        del record["grad_norm"]
    fig = build_figures(records, [])["loss"]
    assert len(fig.axes) == 1
    assert not any("learning rate" in label for label in labelled_lines(fig))
