"""The figures of ``benchmarks/data.py`` from a watched run, and the shuffle's quality.

Every figure here is computed from what a run measured (:class:`benchmarks.data_run.RunWatch`)
or, for the old code's shard loads, from a replay of its reader
(``benchmarks/data_replay.py``); :data:`METHOD` says how, and goes into the JSON.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.data_run import MB, RunWatch

__all__ = ["METHOD", "label_tv", "planned_shard_loads", "run_figures", "shuffle_quality"]

METHOD = {
    "bytes_read_per_worker": (
        "per rank, rchar of its Ray worker process (/proc/<pid>/io, polled every 0.2 s, "
        "interpolated at the rank's progress-stream reports, whose times are the Redis server's "
        "clock); the mean over ranks. rchar counts read(2), pread(2) and kin from files, disk "
        "or page cache (the disk cache, and the local-folder store a download copies from), "
        "not sockets (S3, Redis) and not pages touched through mmap. A run that covered the "
        "whole epoch (new): from the first poll that saw the process run the rank's task to "
        "its last report, so it includes the task's imports and every download "
        "(bytes_read_method: whole_epoch). A run cut short (old): its rchar between its reports "
        "of iteration 0 and of its last iteration, per iteration, times iterations_per_epoch "
        "(bytes_read_method: scaled), which leaves out its cold start and first downloads; "
        "bytes_read_per_worker_steady is that scaled figure for every run."
    ),
    "shard_loads_per_worker_per_epoch": (
        "new: the reader's own counter, shards downloaded into the worker process's cache "
        "folder (each process has its own; rows are then read from the local copy), as each "
        "worker reports it per iteration (shard_loads, the change since its previous report), "
        "summed over the rank's reports of the whole epoch; mean over ranks. Checked against "
        "the plan (planned_shard_loads_by_rank: the distinct shards "
        "GlobalBatchSampler.worker_shards(0, iterations_per_epoch, rank, workers) names). old: "
        "replay (benchmarks/data_replay.py, on the old commit's tree) of its worker's data path "
        "for the whole epoch: its GlobalBatchSampler, and its DataReader walking shards as its "
        "rows() does, disk reads, hashing and row copies left out, so its LRU of decoded "
        "shards decides loads and hits as in the run; cross-checked against the measured bytes "
        "(old_loads_check)."
    ),
    "worker_peak_rss_mb": (
        "VmHWM (/proc/<pid>/status, the kernel's peak resident set) of each Ray worker process "
        "that ran a rank (its title names smlt-worker-...-r<rank>), last value before it ended; "
        "the largest over ranks (by_rank has each). Includes the worker process's own imports "
        "(Ray, torch). The new workers also report VmHWM themselves (reported_rss_mb_by_rank)."
    ),
    "client_peak_rss_mb": "VmHWM of the smlt train process itself (the client, which packages)",
    "data_share": (
        "sum of data_s over sum of iter_s in result.json's history (per iteration, the slowest "
        "rank's each), iteration 0 left out"
    ),
}


def _rank_reports(run: RunWatch, rank: int) -> list[dict[str, Any]]:
    return sorted(
        (r for r in run.reports if int(r["rank"]) == rank and int(r.get("gen", 0)) == 0),
        key=lambda r: int(r["t"]),
    )


def _per_rank_rchar(run: RunWatch) -> dict[int, dict[str, float]]:
    """rank -> rchar from its task's start to its last report, and per iteration between its
    first and last report."""
    out: dict[int, dict[str, float]] = {}
    for rank, pid in sorted(run.worker_pids().items()):
        mine = _rank_reports(run, rank)
        if len(mine) < 2:
            continue
        first, last = mine[0], mine[-1]
        at_last = run.watch.rchar_at(pid, last["at_unix_s"])
        span = int(last["t"]) - int(first["t"])
        out[rank] = {
            "whole_run": at_last - run.watch.task_seen[pid][1],
            "per_iteration": (at_last - run.watch.rchar_at(pid, first["at_unix_s"])) / span,
            "iterations": int(last["t"]) + 1,
        }
    return out


def _summed(run: RunWatch, name: str) -> dict[int, float]:
    """rank -> the sum of the per-report field ``name`` (the reader's counters arrive as the
    change since the previous report) over the rank's reports, where reported."""
    out: dict[int, float] = {}
    for r in run.reports:
        if name in r and int(r.get("gen", 0)) == 0:
            out[int(r["rank"])] = out.get(int(r["rank"]), 0.0) + float(r[name])
    return out


def run_figures(run: RunWatch, iterations_per_epoch: int) -> dict[str, Any]:
    """The per-run figures of the JSON (everything but the shard loads, which replay)."""
    history = run.result["history"]
    measured = [h for h in history if h["iteration"] >= 1]
    iterations_run = len(history)
    rchar = _per_rank_rchar(run)
    whole_epoch = iterations_run == iterations_per_epoch
    read = {
        rank: v["whole_run"] if whole_epoch else v["per_iteration"] * iterations_per_epoch
        for rank, v in rchar.items()
    }
    steady = [v["per_iteration"] * iterations_per_epoch for v in rchar.values()]
    peaks = {rank: run.watch.peak[pid] / MB for rank, pid in sorted(run.worker_pids().items())}
    reports_at = [r["at_unix_s"] for r in run.reports]
    figures: dict[str, Any] = {
        "iterations_run": iterations_run,
        "iterations_per_epoch": iterations_per_epoch,
        "reports_copied": len(run.reports),
        "bytes_read_per_worker": statistics.fmean(read.values()) if read else None,
        "bytes_read_method": "whole_epoch" if whole_epoch else "scaled",
        "bytes_read_per_worker_by_rank": {str(k): v for k, v in read.items()},
        "bytes_read_per_worker_steady": statistics.fmean(steady) if steady else None,
        "bytes_read_per_iteration_by_rank": {str(k): v["per_iteration"] for k, v in rchar.items()},
        "worker_peak_rss_mb": max(peaks.values()) if peaks else None,
        "worker_peak_rss_mb_by_rank": {str(k): v for k, v in peaks.items()},
        "client_peak_rss_mb": run.client_peak_bytes() / MB,
        "process_tree_peak_rss_mb": run.watch.tree_peak_rss / MB,
        "data_share": sum(h["data_s"] for h in measured) / sum(h["iter_s"] for h in measured)
        if measured
        else None,
        "iter_mean_s": statistics.fmean(h["iter_s"] for h in measured) if measured else None,
        "data_mean_s": statistics.fmean(h["data_s"] for h in measured) if measured else None,
        "command_wall_s": run.wall_s,
        "first_report_after_s": min(reports_at) - run.started_unix_s if reports_at else None,
        "polls": run.watch.polls,
    }
    for field, name in (
        ("shard_loads", "reader_downloads_by_rank"),
        ("data_bytes", "reader_bytes_downloaded_by_rank"),
        ("data_wait_s", "reader_wait_s_by_rank"),
    ):
        sums = _summed(run, field)
        if sums:
            figures[name] = {str(k): v for k, v in sorted(sums.items())}
            figures[name.replace("_by_rank", "_total")] = sum(sums.values())
    rss: dict[int, float] = {}
    for r in run.reports:
        if "rss_mb" in r:
            rss[int(r["rank"])] = max(rss.get(int(r["rank"]), 0.0), float(r["rss_mb"]))
    if rss:
        figures["reported_rss_mb_by_rank"] = {str(k): v for k, v in sorted(rss.items())}
    return figures


def planned_shard_loads(
    num_samples: int, shard_sizes: Sequence[int], batch_size: int, workers: int, seed: int = 0
) -> dict[str, int]:
    """rank -> the distinct shards the new sampler has rank read over epoch 0."""
    from smlt.worker.sampler import GlobalBatchSampler

    sampler = GlobalBatchSampler(num_samples, batch_size, seed, shard_sizes=list(shard_sizes))
    ipe = sampler.iterations_per_epoch
    return {str(r): len(sampler.worker_shards(0, ipe, r, workers)) for r in range(workers)}


def label_tv(batches: Sequence[np.ndarray], labels: np.ndarray, classes: int) -> float:
    """Mean over ``batches`` of the total-variation distance between the batch's label
    histogram and the whole set's: 0 is a batch mixed like the set, 1 a batch of classes the set
    does not hold."""
    whole = np.bincount(labels, minlength=classes) / labels.size
    distances = [
        0.5 * np.abs(np.bincount(labels[b], minlength=classes) / b.size - whole).sum()
        for b in batches
    ]
    return float(np.mean(distances))


def shuffle_quality(
    labels: np.ndarray,
    shard_sizes: Sequence[int],
    batch_size: int,
    *,
    classes: int,
    seed: int = 0,
    epochs: int = 2,
) -> dict[str, Any]:
    """``label_tv`` of every global batch of ``epochs`` epochs for the shard-aware order (the
    manifest's ``shard_sizes``), a uniform permutation (``shard_sizes=None``: one shard) and no
    shuffle (the set's own order cut into batches)."""
    import smlt

    n = labels.size
    new, uniform = [], []
    for epoch in range(epochs):
        new.append(
            label_tv(
                smlt.global_batches(
                    n, batch_size, seed=seed, epoch=epoch, shard_sizes=list(shard_sizes)
                ),
                labels,
                classes,
            )
        )
        uniform.append(
            label_tv(smlt.global_batches(n, batch_size, seed=seed, epoch=epoch), labels, classes)
        )
    in_order = [np.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    return {
        "metric": (
            "mean over every global batch of an epoch (then over epochs) of the total-variation "
            "distance between the batch's label histogram and the data set's"
        ),
        "data": "label-sorted: sample i has label i * classes // N, files and shards in order",
        "samples": n,
        "classes": classes,
        "batch_size": batch_size,
        "shards": len(shard_sizes),
        "epochs": epochs,
        "new": float(np.mean(new)),
        "uniform_permutation": float(np.mean(uniform)),
        "no_shuffle": label_tv(in_order, labels, classes),
    }
