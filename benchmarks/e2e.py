"""End-to-end iteration time of real ``smlt.train`` runs: where an iteration's time goes.

    python -m benchmarks.e2e --json OUT.json --plot OUT.png \\
        --examples digits,resnet18,transformer --workers 1,2,4 --iterations 8

For every example and worker count ``n`` this runs ``smlt.train`` exactly as a user would (Ray
backend, default memory per worker, a local object store and output folder in a temporary
directory), for ``--iterations`` iterations of a fixed global batch, and asks where the time of
one iteration went: the user's compute, the optimizer update, smlt's own work, or communication
and waiting. No category may hide smlt's own cost under another name.

How the iterations are bounded. ``smlt.train`` runs whole epochs. To run exactly N iterations of
global batch B without touching the driver, the benchmark trains one epoch of a *derived task*: a
generated file that imports the example by absolute path, subclasses it, and cuts ``data()`` to
its first N x B samples. Model, loss and optimizer are the example's own, so an iteration is the
example's iteration; only the epoch is shorter. (The generated file names the example by absolute
path, which suits a local Ray cluster; a remote cluster would need the example in its image.)

What is measured. Every worker appends one report per iteration to the job's progress stream
(``smlt/worker/trainer.py::_iteration``); the benchmark reads that stream from Redis while the run
goes (it starts the Redis server itself, the same :class:`RedisServer` the driver would embed, so
it can read the raw per-rank reports before the driver deletes the job's keys). A rank's report
holds, all from that rank's clock:

- ``iter_s``: from the start of the iteration to the end of sync (and of a checkpoint write, if
  the iteration ends on one);
- ``data_s``: smlt's data pipeline (sampler + local shard cache -> tensors);
- ``compute_s``: the user's loss and backward, plus smlt copying the gradient into its flat
  vector (scaled) and snapshotting the model's buffers; the report does not split these;
- ``sync_s``: the wall time of the scatter-reduce step, with its phases ``ul_shard_s``,
  ``dl_shard_s``, ``ul_aggr_s``, ``dl_grad_s`` (they overlap: UL-shard runs on its own thread),
  and inside it (``smlt/sync/phases.py``): ``update_s``, the optimizer step on the rank's shard
  (sharded: combining the buffers' sides, the step, and encoding the new optimizer-state frame
  for the store; replicated: the whole optimizer's step and its state frame); ``codec_s``,
  smlt's CPU work on the step's own thread (encoding and checksumming frames, decoding them,
  summing contributions); ``upload_codec_s``, the same on the upload thread, which overlaps the
  rest. ``codec_s`` and ``upload_codec_s`` are wall time inside those sections
  (``perf_counter``), so on a busy machine they include time the thread waited for a core.

The Redis stream id of each report is the Redis server's clock (ms) at the XADD, so consecutive
ids of one rank also give its full cycle per iteration, including what ``iter_s`` leaves out: the
generation's stop check (a Redis round trip) before the iteration and the report's own XADD.

The breakdown (per iteration t, on the *slowest rank*: the rank with the largest ``iter_s``, whose
parts add up because they are one rank's own clock; faster ranks spend their slack waiting inside
sync). These are the categories of the JSON (``breakdown``) and of the plot, bottom to top:

- ``compute_s``: user compute (as reported; see above for the smlt work it contains);
- ``update_s``: optimizer update;
- ``smlt_data_s`` = ``data_s``: smlt's data pipeline;
- ``smlt_codec_s`` = ``codec_s``: smlt's CPU work inside the step, on the step's thread;
- ``smlt_other_s`` = ``iter_s - data_s - compute_s - sync_s``: the rest of smlt's work in the
  iteration (loading the new buffers, adopting a published optimizer state, a checkpoint write
  when one falls in the iteration);
- ``comm_wait_s`` = ``sync_s - update_s - codec_s``: transfers to and from Redis and waiting for
  peers (and for a core: on a shared 2-core machine the three cannot be told apart);
- ``smlt_between_s`` = ``cycle_s - iter_s`` with ``cycle_s`` the difference of that rank's stream
  ids for t - 1 and t: smlt's per-iteration work outside ``iter_s`` (stop check, report), with a
  ~1 ms resolution (left out for the epoch's last iteration, where rank 0 evaluates the model
  before reporting).

Beside them, not stacked because it overlaps the rest: ``upload_codec_s`` (``overlapped``).

Framework overhead counts all of smlt's own work, on both threads:

- ``overhead_s = data_s + codec_s + smlt_other_s + upload_codec_s``;
- ``overhead_fraction = overhead_s / iter_s`` (the issue's target: < 10 % for ResNet-18 at n=4);
  ``inline_overhead_fraction = (data_s + codec_s + smlt_other_s) / iter_s`` is the part that
  lengthens the iteration directly (the upload thread's share competes for a core instead);
- ``overhead_fraction_of_cycle = (overhead_s + smlt_between_s) / cycle_s``;
- ``overhead_fraction_max_rank``: ``overhead_s / iter_s`` of the rank where it is largest, in
  case the slowest rank is not the one doing most of smlt's work.

The first ``--warmup`` iterations of each run are left out (cold start: workers import torch,
fetch data shards, Redis grows its memory). Every figure is the *mean* over the remaining
iterations, and every fraction a ratio of means (of sums): the parts of a mean add up to the mean
iteration, so the breakdown accounts for every second, where medians of parts would not. The
median iteration (``iter_median_s``) and the median of the per-iteration overhead fractions
(``overhead_fraction_median``) are given beside them, as a check against one slow iteration.
The machine is shared and small, so compare ratios within one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._output import command_line, write_outputs

__all__ = [
    "CATEGORIES",
    "EXAMPLES",
    "OVERLAPPED",
    "Example",
    "ReportReader",
    "main",
    "measure_run",
    "per_iteration",
    "summarize",
]

REPO = Path(__file__).resolve().parents[1]
PHASES = ("ul_shard_s", "dl_shard_s", "ul_aggr_s", "dl_grad_s")
#: What a worker's report must hold for the breakdown (older workers lack the last three).
REPORTED = ("iter_s", "data_s", "compute_s", "sync_s", *PHASES, "update_s", "codec_s")
#: The categories of an iteration, bottom to top in the plot and in this order in the JSON's
#: ``breakdown``: (key, label, how it is computed from the slowest rank's report).
CATEGORIES = (
    ("compute_s", "user compute", "compute_s"),
    ("update_s", "optimizer update", "update_s"),
    ("smlt_data_s", "smlt: data pipeline", "data_s"),
    ("smlt_codec_s", "smlt: encode/decode/sum in step", "codec_s"),
    ("smlt_other_s", "smlt: other in iteration", "iter_s - data_s - compute_s - sync_s"),
    ("comm_wait_s", "communication and wait", "sync_s - update_s - codec_s"),
    ("smlt_between_s", "smlt: between iterations", "cycle_s - iter_s"),
)
#: smlt's work that overlaps the categories above: drawn beside the stack, never in it.
OVERLAPPED = (("upload_codec_s", "smlt: upload thread (overlapped)", "upload_codec_s"),)
OVERHEAD_FORMULA = (
    "per iteration, on the rank with the largest iter_s: overhead_s = data_s + codec_s + "
    "smlt_other_s + upload_codec_s (all of smlt's own work: data pipeline, encode/decode/sum on "
    "the step's thread and on the upload thread, the rest of the iteration outside compute and "
    "sync), smlt_other_s = iter_s - data_s - compute_s - sync_s; overhead_fraction = overhead_s "
    "/ iter_s; inline_overhead_fraction = (data_s + codec_s + smlt_other_s) / iter_s; "
    "overhead_fraction_of_cycle = (overhead_s + smlt_between_s) / cycle_s, smlt_between_s = "
    "cycle_s - iter_s, cycle_s = difference of that rank's progress stream ids (Redis ms clock) "
    "for t-1 and t; overhead_fraction_max_rank = max over ranks of that rank's overhead_s / "
    "iter_s; every figure is the mean over measured iterations and every fraction a ratio of "
    "means, so the parts add up to the mean iteration"
)


@dataclass(frozen=True)
class Example:
    """A task of ``examples/`` and the global batch it is benchmarked with.

    Batches are small enough that n=1 stays quick on one core and large enough that n=4 still
    gives every rank several samples.
    """

    spec: str
    batch_size: int


EXAMPLES = {
    "digits": Example("examples/digits.py:Digits", batch_size=128),
    "resnet18": Example("examples/resnet18.py:ResNet18", batch_size=64),
    "transformer": Example("examples/transformer.py:Transformer", batch_size=128),
}

_DERIVED_TASK = '''"""Generated by benchmarks/e2e.py: {cls} of {path}, its training set cut to
{samples} samples so that one epoch is exactly the benchmarked number of iterations."""

import importlib.util
import sys

_spec = importlib.util.spec_from_file_location({module!r}, {path!r})
_example = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _example
_spec.loader.exec_module(_example)


class Bench(_example.{cls}):
    def data(self):
        return tuple(column[:{samples}] for column in super().data())
'''


def derive_task(example: Example, name: str, samples: int, folder: Path) -> str:
    """Write the derived task (the example, ``samples`` training samples) and return its spec."""
    path_text, _, cls = example.spec.rpartition(":")
    path = str((REPO / path_text).resolve())
    source = _DERIVED_TASK.format(cls=cls, path=path, samples=samples, module=f"_e2e_{name}")
    target = folder / f"e2e_{name}.py"
    target.write_text(source)
    return f"{target}:Bench"


def dataset_size(spec: str) -> int:
    from smlt.task import load_task

    columns = load_task(str(REPO / spec)).data()
    return len(columns[0])


class ReportReader:
    """The ``progress`` callback of ``smlt.train``: copies the job's progress stream as it grows.

    The job id and session (keys carry both) are read from ``run.json``, which the driver writes
    into the output folder before it writes any key. The driver calls this every half second and
    once more after the scheduler finished, before it deletes the job's keys, so the last call
    sees every report.
    """

    def __init__(self, redis_url: str, output_dir: Path) -> None:
        from smlt.storage.redis_server import connect

        self.client = connect(redis_url)
        self.output_dir = output_dir
        self.stream: str | None = None
        self.last_id = "-"
        self.entries: list[tuple[int, dict[str, str]]] = []  # (server ms, report)

    def __call__(self, status: dict[str, Any]) -> None:
        if self.stream is None:
            from smlt.sync.keys import JobKeys

            try:
                run = json.loads((self.output_dir / "run.json").read_text())
            except (FileNotFoundError, ValueError):
                return  # not written yet, or caught mid-write: the next call reads it
            if not run.get("sessions"):
                return  # saved before its session was chosen: no key written yet
            self.stream = JobKeys(run["job_id"], run["sessions"][-1]).progress()
        start = "-" if self.last_id == "-" else f"({self.last_id}"
        for raw_id, fields in self.client.xrange(self.stream, min=start, max="+"):
            entry_id = raw_id.decode()
            self.last_id = entry_id
            report = {k.decode(): v.decode() for k, v in fields.items()}
            self.entries.append((int(entry_id.split("-")[0]), report))


def _smlt_inline_s(rep: dict[str, float]) -> float:
    """smlt's own work that lengthens one rank's iteration: data, codec, the rest."""
    other = rep["iter_s"] - rep["data_s"] - rep["compute_s"] - rep["sync_s"]
    return rep["data_s"] + rep["codec_s"] + other


def _report(raw: dict[str, str]) -> dict[str, float]:
    missing = [k for k in REPORTED if k not in raw]
    if missing:
        raise RuntimeError(
            f"rank {raw.get('rank')} iteration {raw.get('t')}: the report lacks {missing}; "
            "the worker predates the phase times this benchmark splits the step by"
        )
    rep = {k: float(raw[k]) for k in REPORTED}
    rep["upload_codec_s"] = float(raw.get("upload_codec_s", 0.0))
    return rep


def per_iteration(entries: list[tuple[int, dict[str, str]]]) -> list[dict[str, Any]]:
    """One row per iteration: the slowest rank's breakdown and cycle.

    Events (``{"event": ...}``, e.g. an injected fault's) are not reports and are skipped. A
    re-executed rank's later report replaces its earlier one, as in the scheduler's fold.
    """
    by_rank: dict[int, dict[int, tuple[int, dict[str, str]]]] = {}
    for ms, report in entries:
        if "event" in report:
            continue
        by_rank.setdefault(int(report["rank"]), {})[int(report["t"])] = (ms, report)
    if not by_rank:
        raise RuntimeError("no iteration report in the progress stream")
    ranks = sorted(by_rank)
    iterations = sorted(set.intersection(*(set(by_rank[r]) for r in ranks)))
    rows = []
    for t in iterations:
        reports = {r: _report(by_rank[r][t][1]) for r in ranks}
        ranked = [reports[r] for r in ranks]
        slowest = max(ranks, key=lambda r: reports[r]["iter_s"])
        ms, raw = by_rank[slowest][t]
        rep = reports[slowest]
        row: dict[str, Any] = {**rep, "t": t, "samples": float(raw["batch"])}
        row["smlt_data_s"] = rep["data_s"]
        row["smlt_codec_s"] = rep["codec_s"]
        row["smlt_other_s"] = rep["iter_s"] - rep["data_s"] - rep["compute_s"] - rep["sync_s"]
        row["comm_wait_s"] = rep["sync_s"] - rep["update_s"] - rep["codec_s"]
        row["inline_overhead_s"] = _smlt_inline_s(rep)
        row["overhead_s"] = row["inline_overhead_s"] + rep["upload_codec_s"]
        row["overhead_fraction"] = row["overhead_s"] / rep["iter_s"]
        row["inline_overhead_fraction"] = row["inline_overhead_s"] / rep["iter_s"]
        row["overhead_s_by_rank"] = [_smlt_inline_s(q) + q["upload_codec_s"] for q in ranked]
        row["iter_s_by_rank"] = [q["iter_s"] for q in ranked]
        computes = [q["compute_s"] for q in reports.values()]
        row["compute_min_s"] = min(computes)
        row["compute_max_s"] = max(computes)
        row["bytes_through_store"] = float(
            sum(
                int(by_rank[r][t][1]["bytes_up"]) + int(by_rank[r][t][1]["bytes_down"])
                for r in ranks
            )
        )
        previous = by_rank[slowest].get(t - 1)
        # Rank 0 evaluates the model at an epoch's end before it reports: an epoch's cost, not
        # an iteration's, so that cycle is left out.
        if previous is not None and "metrics" not in raw:
            row["cycle_s"] = (ms - previous[0]) / 1000
            row["smlt_between_s"] = max(0.0, row["cycle_s"] - rep["iter_s"])
            row["overhead_fraction_of_cycle"] = (row["overhead_s"] + row["smlt_between_s"]) / max(
                row["cycle_s"], rep["iter_s"]
            )
        rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Means over the iterations after the first ``warmup``: the parts of a mean add up to the
    mean iteration (medians of parts do not), so the breakdown accounts for every second; the
    median iteration and the median per-iteration overhead fraction are given beside them."""
    measured = [r for r in rows if r["t"] >= warmup]
    if not measured:
        raise ValueError(f"no iteration left after skipping {warmup}: raise --iterations")

    def mean(key: str, among: list[dict[str, Any]] = measured) -> float:
        values = [r[key] for r in among if key in r]
        return statistics.fmean(values) if values else math.nan

    iter_s = mean("iter_s")
    cycled = [r for r in measured if "cycle_s" in r]
    ranks = len(measured[0]["iter_s_by_rank"])
    by_rank = [
        sum(r["overhead_s_by_rank"][k] for r in measured)
        / sum(r["iter_s_by_rank"][k] for r in measured)
        for k in range(ranks)
    ]
    return {
        "iterations_measured": len(measured),
        "iter_s": iter_s,
        "iter_median_s": statistics.median(r["iter_s"] for r in measured),
        "breakdown": {key: mean(key) for key, _label, _formula in CATEGORIES},
        "overlapped": {key: mean(key) for key, _label, _formula in OVERLAPPED},
        "overhead_s": mean("overhead_s"),
        "overhead_fraction": mean("overhead_s") / iter_s,
        "inline_overhead_s": mean("inline_overhead_s"),
        "inline_overhead_fraction": mean("inline_overhead_s") / iter_s,
        "overhead_fraction_of_cycle": (
            (mean("overhead_s", cycled) + mean("smlt_between_s", cycled))
            / statistics.fmean(max(r["cycle_s"], r["iter_s"]) for r in cycled)
            if cycled
            else math.nan
        ),
        "overhead_fraction_max_rank": max(by_rank),
        "overhead_fraction_median": statistics.median(r["overhead_fraction"] for r in measured),
        "cycle_s": mean("cycle_s"),
        "reported": {key: mean(key) for key in (*REPORTED, "upload_codec_s") if key != "iter_s"},
        "compute_spread_s": statistics.fmean(
            r["compute_max_s"] - r["compute_min_s"] for r in measured
        ),
        "bytes_through_store": mean("bytes_through_store"),
        "samples_per_s": measured[0]["samples"] / iter_s,
        "per_iteration": rows,
    }


def measure_run(
    name: str, example: Example, workers: int, iterations: int, warmup: int, folder: Path
) -> dict[str, Any]:
    """One ``smlt.train`` of ``iterations`` iterations on ``workers`` workers, summarized."""
    import smlt
    from smlt.storage.redis_server import RedisServer

    samples = iterations * example.batch_size
    if samples > dataset_size(example.spec):
        raise ValueError(
            f"{name}: {iterations} iterations x batch {example.batch_size} exceed its data set"
        )
    run_dir = folder / f"{name}-n{workers}"
    run_dir.mkdir()
    spec = derive_task(example, name, samples, run_dir)
    with RedisServer() as server:
        reader = ReportReader(server.url, run_dir / "out")
        result = smlt.train(
            spec,
            epochs=1,
            batch_size=example.batch_size,
            workers=workers,
            backend="ray",
            output=run_dir / "out",
            object_store=str(run_dir / "objects"),
            redis_url=server.url,
            progress=reader,
        )
    if result.iterations != iterations:
        raise RuntimeError(f"{name}: ran {result.iterations} iterations, expected {iterations}")
    summary = summarize(per_iteration(reader.entries), warmup)
    return {
        "example": name,
        "task": example.spec,
        "workers": workers,
        "memory_mb": result.configs[0]["memory_mb"],
        "batch_size": example.batch_size,
        "iterations": iterations,
        **summary,
        "cost_usd": result.cost_usd,
        "billed_worker_s": result.billed_worker_s,
        "wall_s": result.wall_s,
        "final_metrics": result.final_metrics,
        "history_iter_s": [h["iter_s"] for h in result.history],
    }


def plot(data: dict[str, Any], path: Path) -> None:
    """One panel per example (their scales differ by 100x): per n, a stacked bar of the JSON's
    ``breakdown`` (means: the parts below the tick add up to the mean iteration, the one above
    it is outside ``iter_s``) and, beside it, the overlapped upload-thread work."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["example"] for r in data["results"]))
    fig, axes = plt.subplots(
        1, len(names), figsize=(max(6.0, 4.4 * len(names)), 5.6), squeeze=False
    )
    colors = {
        "compute_s": "#4c72b0",
        "update_s": "#55a868",
        "smlt_data_s": "#c44e52",
        "smlt_codec_s": "#8c1c13",
        "smlt_other_s": "#e17c05",
        "comm_wait_s": "#dd8452",
        "smlt_between_s": "#e8a0a0",
        "upload_codec_s": "#8c1c13",
    }
    width = 0.6
    for ax, name in zip(axes[0], names, strict=True):
        rows = [r for r in data["results"] if r["example"] == name]
        rows.sort(key=lambda r: r["workers"])
        xs = [float(x) for x in range(len(rows))]
        bottom = [0.0] * len(rows)
        for key, label, _formula in CATEGORIES:
            values = [_bar(r["breakdown"][key]) for r in rows]
            ax.bar(xs, values, width, bottom=bottom, color=colors[key], label=label)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        for key, label, _formula in OVERLAPPED:
            values = [_bar(r["overlapped"][key]) for r in rows]
            ax.bar(
                [x + width / 2 + 0.08 for x in xs],
                values,
                0.14,
                color="white",
                edgecolor=colors[key],
                hatch="////",
                label=label,
            )
        ax.hlines(
            [r["iter_s"] for r in rows],
            [x - width / 2 for x in xs],
            [x + width / 2 for x in xs],
            colors="black",
            linewidth=1,
            label="mean iteration (iter_s)",
        )
        for x, r, top in zip(xs, rows, bottom, strict=True):
            ax.text(
                x,
                max(top, r["iter_s"]),
                f"{100 * r['overhead_fraction']:.1f}%",
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_xticks(xs, [f"n={r['workers']}\n{r['memory_mb']} MB" for r in rows])
        ax.set(title=f"{name} (B={rows[0]['batch_size']})", ylabel="seconds per iteration")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(
        "mean of the measured iterations, slowest rank; smlt between iterations is outside "
        "iter_s\n"
        "label: framework overhead = all of smlt's own work, both threads, % of iter_s",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=120)


def _bar(value: float) -> float:
    return 0.0 if math.isnan(value) else max(0.0, value)


def machine() -> dict[str, Any]:
    import torch

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", default=",".join(EXAMPLES), help="comma-separated")
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    parser.add_argument("--iterations", type=int, default=8, help="per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="leading iterations left out")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.iterations <= args.warmup:
        parser.error("--iterations must exceed --warmup")
    names = [e for e in args.examples.split(",") if e]
    unknown = [e for e in names if e not in EXAMPLES]
    if unknown:
        parser.error(f"unknown examples {unknown}; choose from {sorted(EXAMPLES)}")
    workers_list = [int(w) for w in args.workers.split(",") if w]

    from smlt.backends.ray_backend import ensure_ray

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    info = machine()
    # One local Ray for all runs: train() reuses it instead of paying ~4 s of start-up each
    # time, as a serverless platform is already up when a job starts.
    started_ray = ensure_ray()
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="smlt-e2e-") as tmp:
            for name in names:
                for n in workers_list:
                    began = time.monotonic()
                    row = measure_run(
                        name, EXAMPLES[name], n, args.iterations, args.warmup, Path(tmp)
                    )
                    results.append(row)
                    parts = "  ".join(
                        f"{key.removesuffix('_s')} {row['breakdown'][key]:.4f}"
                        for key, _label, _formula in CATEGORIES
                    )
                    log(
                        f"{name:<12} n={n} iter {row['iter_s']:.4f} s  {parts}  upload_codec "
                        f"{row['overlapped']['upload_codec_s']:.4f}  overhead "
                        f"{100 * row['overhead_fraction']:.2f}% (in line "
                        f"{100 * row['inline_overhead_fraction']:.2f}%, of cycle "
                        f"{100 * row['overhead_fraction_of_cycle']:.2f}%)  "
                        f"[{time.monotonic() - began:.0f} s]"
                    )
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    info["load_average_at_end"] = os.getloadavg()
    data = {
        "command": command_line("benchmarks.e2e", argv),
        "machine": info,
        "iterations": args.iterations,
        "warmup": args.warmup,
        "overhead_formula": OVERHEAD_FORMULA,
        "categories": [
            {"key": key, "label": label, "formula": formula} for key, label, formula in CATEGORIES
        ],
        "overlapped_categories": [
            {"key": key, "label": label, "formula": formula} for key, label, formula in OVERLAPPED
        ],
        "results": results,
    }
    write_outputs(data, args.json, args.plot, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
