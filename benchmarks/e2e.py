"""End-to-end iteration time of real ``smlt.train`` runs, split into compute, sync and overhead.

    python -m benchmarks.e2e --json OUT.json --plot OUT.png \\
        --examples digits,resnet18,transformer --workers 1,2,4 --iterations 8

For every example and worker count ``n`` this runs ``smlt.train`` exactly as a user would (Ray
backend, default memory per worker, a local object store and output folder in a temporary
directory), for ``--iterations`` iterations of a fixed global batch, and asks where the time of
one iteration went.

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
holds, all from ``time.monotonic()`` on that rank:

- ``iter_s``: from the start of the iteration to the end of sync (and of a checkpoint write, if
  the iteration ends on one); the driver's history takes its max over ranks;
- ``data_s``: smlt's data iterator (sampler + local shard cache -> tensors);
- ``compute_s``: the user's loss, backward, and flattening the gradient;
- ``sync_s``: the wall time of the scatter-reduce step (``Exchange.step``), with its phases
  ``ul_shard_s``, ``dl_shard_s``, ``ul_aggr_s``, ``dl_grad_s``, each measured from where the
  phase can begin. UL-shard runs on its own thread while the owner downloads, so UL-shard and
  DL-shard overlap and the phases do not add up to ``sync_s``.

The redis stream id of each report is the Redis server's clock (ms) at the XADD, so consecutive
ids of one rank also give its full cycle per iteration, including what ``iter_s`` leaves out: the
generation's stop check (a Redis round trip) before the iteration and the report's own XADD.

Definitions (per iteration t, on the *slowest rank*: the rank with the largest ``iter_s``, whose
breakdown adds up because it is one rank's own clock; faster ranks spend their slack waiting
inside sync):

- ``overhead_s = iter_s - compute_s - sync_s`` = ``data_s + other_s``: everything in the
  iteration that is neither the user's compute nor store traffic. ``data_s`` counts as
  overhead because the data iterator is smlt's, not the user's; ``other_s`` is the rest of the
  timed iteration (bookkeeping; a checkpoint write when one falls in the iteration);
- ``overhead_fraction = overhead_s / iter_s``: the issue's target is < 10 % for ResNet-18 at n=4;
- ``between_s = cycle_s - iter_s`` with ``cycle_s`` = that rank's stream-id difference from its
  report of t - 1 to t: untimed per-iteration cost outside ``iter_s`` (stop check, XADD), with a
  ~1 ms resolution (left out for the epoch's last iteration, where rank 0 evaluates the model
  before reporting); ``overhead_fraction_of_cycle = (overhead_s + between_s) / cycle_s``.

The first ``--warmup`` iterations of each run are left out (cold start: workers import torch,
fetch data shards, Redis grows its memory), and every figure is the median over the remaining
iterations of the per-iteration value (fractions too: the median of per-iteration fractions).
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

__all__ = ["EXAMPLES", "Example", "ReportReader", "main", "measure_run", "summarize"]

REPO = Path(__file__).resolve().parents[1]
PHASES = ("ul_shard_s", "dl_shard_s", "ul_aggr_s", "dl_grad_s")
#: The stacked parts of the plot, bottom to top; data, other and between are the overhead.
PARTS = ("compute_s", "sync_s", "data_s", "other_s", "between_s")
OVERHEAD_FORMULA = (
    "per iteration, on the rank with the largest iter_s: overhead_s = iter_s - compute_s - sync_s "
    "(= data_s + other_s; data_s is smlt's data iterator), overhead_fraction = overhead_s / "
    "iter_s; between_s = cycle_s - iter_s where cycle_s is the difference of that rank's progress "
    "stream ids (Redis ms clock) for t-1 and t; overhead_fraction_of_cycle = (overhead_s + "
    "between_s) / cycle_s; every figure is the median over measured iterations"
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

    The job id is read from ``run.json``, which the driver writes into the output folder before
    any worker starts. The driver calls this every half second and once more after the scheduler
    finished, before it deletes the job's keys, so the last call sees every report.
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

            run = json.loads((self.output_dir / "run.json").read_text())
            self.stream = JobKeys(run["job_id"]).progress()
        start = "-" if self.last_id == "-" else f"({self.last_id}"
        for raw_id, fields in self.client.xrange(self.stream, min=start, max="+"):
            entry_id = raw_id.decode()
            self.last_id = entry_id
            report = {k.decode(): v.decode() for k, v in fields.items()}
            self.entries.append((int(entry_id.split("-")[0]), report))


def per_iteration(entries: list[tuple[int, dict[str, str]]]) -> list[dict[str, float]]:
    """One row per iteration: the slowest rank's breakdown and cycle.

    A re-executed rank's later report replaces its earlier one, as in the scheduler's fold.
    """
    by_rank: dict[int, dict[int, tuple[int, dict[str, str]]]] = {}
    for ms, report in entries:
        by_rank.setdefault(int(report["rank"]), {})[int(report["t"])] = (ms, report)
    ranks = sorted(by_rank)
    iterations = sorted(set.intersection(*(set(by_rank[r]) for r in ranks)))
    rows = []
    for t in iterations:
        slowest = max(ranks, key=lambda r: float(by_rank[r][t][1]["iter_s"]))
        ms, rep = by_rank[slowest][t]
        row = {k: float(rep[k]) for k in ("iter_s", "data_s", "compute_s", "sync_s", *PHASES)}
        row["t"] = t
        row["samples"] = float(rep["batch"])
        row["other_s"] = row["iter_s"] - row["data_s"] - row["compute_s"] - row["sync_s"]
        row["overhead_s"] = row["iter_s"] - row["compute_s"] - row["sync_s"]
        row["overhead_fraction"] = row["overhead_s"] / row["iter_s"]
        computes = [float(by_rank[r][t][1]["compute_s"]) for r in ranks]
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
        if previous is not None and "metrics" not in rep:
            row["cycle_s"] = (ms - previous[0]) / 1000
            row["between_s"] = max(0.0, row["cycle_s"] - row["iter_s"])
            row["overhead_fraction_of_cycle"] = (row["overhead_s"] + row["between_s"]) / max(
                row["cycle_s"], row["iter_s"]
            )
        rows.append(row)
    return rows


def summarize(rows: list[dict[str, float]], warmup: int) -> dict[str, Any]:
    """Medians over the iterations after the first ``warmup``."""
    measured = [r for r in rows if r["t"] >= warmup]
    if not measured:
        raise ValueError(f"no iteration left after skipping {warmup}: raise --iterations")

    def med(key: str) -> float:
        values = [r[key] for r in measured if key in r]
        return statistics.median(values) if values else math.nan

    iter_s = med("iter_s")
    return {
        "iterations_measured": len(measured),
        "iter_s": iter_s,
        "compute_s": med("compute_s"),
        "data_s": med("data_s"),
        "sync_s": med("sync_s"),
        "phases": {p: med(p) for p in PHASES},
        "other_s": med("other_s"),
        "overhead_s": med("overhead_s"),
        "overhead_fraction": med("overhead_fraction"),
        "cycle_s": med("cycle_s"),
        "between_s": med("between_s"),
        "overhead_fraction_of_cycle": med("overhead_fraction_of_cycle"),
        "compute_spread_s": med("compute_max_s") - med("compute_min_s"),
        "bytes_through_store": med("bytes_through_store"),
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
    """One panel per example (their scales differ by 100x): a stacked bar per n."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["example"] for r in data["results"]))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.5), squeeze=False)
    colors = {
        "compute_s": "#4c72b0",
        "sync_s": "#dd8452",
        "data_s": "#c44e52",
        "other_s": "#8c1c13",
        "between_s": "#e8a0a0",
    }
    labels = {
        "compute_s": "compute",
        "sync_s": "sync (scatter-reduce)",
        "data_s": "overhead: data",
        "other_s": "overhead: other in iteration",
        "between_s": "overhead: between iterations",
    }
    for ax, name in zip(axes[0], names, strict=True):
        rows = [r for r in data["results"] if r["example"] == name]
        rows.sort(key=lambda r: r["workers"])
        xs = range(len(rows))
        bottom = [0.0] * len(rows)
        for part in PARTS:
            values = [max(0.0, r[part]) if not math.isnan(r[part]) else 0.0 for r in rows]
            ax.bar(xs, values, bottom=bottom, color=colors[part], label=labels[part])
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        for x, r, top in zip(xs, rows, bottom, strict=True):
            ax.text(x, top, f"{100 * r['overhead_fraction']:.1f}%", ha="center", va="bottom")
        ax.set_xticks(list(xs), [f"n={r['workers']}\n{r['memory_mb']} MB" for r in rows])
        ax.set(title=f"{name} (B={rows[0]['batch_size']})", ylabel="seconds per iteration")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle("median iteration, slowest rank; label: overhead % of iter_s", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


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
                    log(
                        f"{name:<12} n={n} iter {row['iter_s']:.3f} s  compute "
                        f"{row['compute_s']:.3f}  sync {row['sync_s']:.3f}  data "
                        f"{row['data_s']:.4f}  overhead {100 * row['overhead_fraction']:.1f}% "
                        f"(of cycle {100 * row['overhead_fraction_of_cycle']:.1f}%)  "
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
        "results": results,
    }
    write_outputs(data, args.json, args.plot, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
