"""The benchmarks' arithmetic: every second of an iteration lands in one named category, smlt's
own work is counted as overhead, and recovery reports measured detection, never a setting."""

from __future__ import annotations

import math

import pytest

from benchmarks import e2e, recovery


def _report(rank: int, t: int, **values: float) -> dict[str, str]:
    fields = {
        "rank": rank,
        "gen": 0,
        "attempt": 0,
        "t": t,
        "batch": 128,
        "bytes_up": 10,
        "bytes_down": 20,
        "iter_s": 1.0,
        "data_s": 0.01,
        "compute_s": 0.5,
        "sync_s": 0.4,
        "ul_shard_s": 0.1,
        "dl_shard_s": 0.2,
        "ul_aggr_s": 0.05,
        "dl_grad_s": 0.1,
        "update_s": 0.05,
        "codec_s": 0.03,
        "upload_codec_s": 0.02,
    }
    fields.update(values)
    return {k: str(v) for k, v in fields.items()}


def test_breakdown_names_every_part_of_the_slowest_ranks_iteration() -> None:
    entries = [
        (1000, _report(0, 0)),
        (1000, _report(1, 0, iter_s=0.9)),
        (1000, {"event": "fault", "rank": "1", "t": "1", "at_unix_s": "1.0"}),  # not a report
        (2100, _report(0, 1)),
        (2000, _report(1, 1, iter_s=0.8, data_s=0.1, codec_s=0.1, sync_s=0.15)),
    ]
    rows = e2e.per_iteration(entries)
    row = rows[1]
    assert row["t"] == 1
    assert row["iter_s"] == 1.0  # rank 0 is the slowest
    assert row["smlt_other_s"] == pytest.approx(1.0 - 0.01 - 0.5 - 0.4)
    assert row["comm_wait_s"] == pytest.approx(0.4 - 0.05 - 0.03)
    assert row["smlt_between_s"] == pytest.approx(1.1 - 1.0)
    in_iteration = [key for key, _label, _formula in e2e.CATEGORIES if key != "smlt_between_s"]
    assert sum(row[k] for k in in_iteration) == pytest.approx(row["iter_s"])
    # Framework overhead is every piece of smlt's own work, the upload thread's included.
    assert row["overhead_s"] == pytest.approx(0.01 + 0.03 + row["smlt_other_s"] + 0.02)
    assert row["inline_overhead_fraction"] == pytest.approx((row["overhead_s"] - 0.02) / 1.0)
    # Rank 1 spends a larger share of its iteration in smlt than the slowest rank does.
    rank1 = (0.1 + 0.1 + (0.8 - 0.1 - 0.5 - 0.15) + 0.02) / 0.8
    assert rank1 > row["overhead_fraction"]
    summary = e2e.summarize(rows, warmup=1)
    assert summary["overhead_fraction_max_rank"] == pytest.approx(rank1)


def test_summary_has_the_plots_categories_and_they_add_up() -> None:
    # Iterations of very different shapes: medians of the parts would not add up to anything.
    shapes = [
        {"iter_s": 1.0, "compute_s": 0.9, "sync_s": 0.05},
        {"iter_s": 2.0, "compute_s": 0.5, "sync_s": 1.4},
        {"iter_s": 3.0, "compute_s": 0.5, "sync_s": 2.4, "codec_s": 0.5},
        {"iter_s": 1.5, "compute_s": 1.4, "sync_s": 0.08},
    ]
    entries = [(4000 * (t + 1), _report(0, t, **shape)) for t, shape in enumerate(shapes)]
    summary = e2e.summarize(e2e.per_iteration(entries), warmup=1)
    assert list(summary["breakdown"]) == [key for key, _label, _formula in e2e.CATEGORIES]
    assert list(summary["overlapped"]) == [key for key, _label, _formula in e2e.OVERLAPPED]
    assert summary["iterations_measured"] == 3
    parts = summary["breakdown"]
    in_iteration = sum(v for k, v in parts.items() if k != "smlt_between_s")
    assert in_iteration == pytest.approx(summary["iter_s"]) == pytest.approx(6.5 / 3)
    assert parts["smlt_between_s"] == pytest.approx((2.0 + 1.0 + 2.5) / 3)
    assert summary["overhead_fraction"] == pytest.approx(summary["overhead_s"] / (6.5 / 3))
    assert not math.isnan(summary["overhead_fraction_of_cycle"])


def test_a_report_without_the_phase_split_is_refused() -> None:
    old = _report(0, 0)
    del old["codec_s"]
    with pytest.raises(RuntimeError, match="codec_s"):
        e2e.per_iteration([(1000, old)])


def test_cases_use_the_fault_vocabulary() -> None:
    assert recovery.parse_cases("kill@after-publish,hang") == [
        ("kill", "after-publish"),
        ("hang", "start"),
    ]
    with pytest.raises(ValueError, match="explode"):
        recovery.parse_cases("explode@start")


_FAULT = {"event": "fault", "rank": "1", "t": "5", "gen": "0", "attempt": "0"}
_STREAM = [
    (100_000, _report(1, 4)),
    (100_500, {**_FAULT, "phase": "start", "action": "kill", "at_unix_s": "100.5"}),
    (104_000, _report(1, 5, attempt=1)),
]
_FAILURE = {"rank": 1, "generation": 0, "attempt": 0, "cause": "died", "recovery_s": 3.0}


def test_detection_comes_from_the_scheduler_when_it_reports_it() -> None:
    failure = {**_FAILURE, "detection_s": 0.4}
    row = recovery._faulted(
        ("kill", "start"),
        0,
        {"failures": [failure], "wall_s": 20.0},
        _STREAM,
        {"wall_s": 15.0},
        True,
        rank=1,
    )
    assert row["detection_s"] == 0.4 and row["detection_source"] == "scheduler"
    assert row["fault_to_replacement_report_s"] == pytest.approx(3.5)
    assert row["extra_wall_s"] == 5.0


def test_detection_is_derived_from_the_stream_without_the_scheduler_field() -> None:
    row = recovery._faulted(
        ("kill", "start"),
        0,
        {"failures": [_FAILURE], "wall_s": 20.0},
        _STREAM,
        {"wall_s": 15.0},
        True,
        rank=1,
    )
    assert row["detection_s"] == pytest.approx(0.5)
    assert row["detection_source"] == "progress stream"


def test_no_fault_event_means_no_detection_figure() -> None:
    row = recovery._faulted(
        ("hang", "start"),
        0,
        {"failures": [_FAILURE], "wall_s": 20.0},
        _STREAM[2:],
        {"wall_s": 15.0},
        True,
        rank=1,
    )
    assert row["detection_s"] is None and row["detection_source"] is None
    [summary] = recovery.summarize([row])
    assert summary["detection_s"] is None and summary["bit_identical"]


def _timeline(step_ms: int, stall_at: int, stall_ms: int) -> list[tuple[int, dict[str, str]]]:
    """Two ranks reporting every ``step_ms``; iteration ``stall_at`` completes ``stall_ms``
    late (rank 1 is replaced there) and everything after it shifts."""
    entries = []
    for t in range(12):
        late = stall_ms if t >= stall_at else 0
        entries.append((1000 + step_ms * t + late, _report(0, t)))
        entries.append((1000 + step_ms * t + late + 5, _report(1, t, attempt=int(t >= stall_at))))
    return entries


def test_time_lost_in_run_is_the_stall_beyond_the_usual_step() -> None:
    lost = recovery.lost_in_run(_timeline(100, stall_at=5, stall_ms=3000), 0, 5)
    assert lost["median_step_s"] == pytest.approx(0.1)
    assert lost["lost_s"] == pytest.approx(3.0)
    assert recovery.lost_in_run(_timeline(100, 5, 0), 0, 5)["lost_s"] == pytest.approx(0.0)


def test_time_lost_needs_the_window_in_the_stream() -> None:
    assert recovery.lost_in_run(_timeline(100, 5, 3000), 0, 11)["lost_s"] is None
