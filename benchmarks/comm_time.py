"""Communication time per iteration: scatter-reduce vs the baselines vs gloo (paper Fig. 8).

    python -m benchmarks.comm_time --workers 2,4,8 --params 11000000 \\
        --bandwidth-mbps 600 --iterations 5 --json OUT.json --plot OUT.png

Each of the ``n`` workers is a real process with its own Redis connection and (optionally) its
own emulated 600 Mbps NIC (:class:`smlt.sync.link.Link`). For every ``n`` and scheme the workers
start each iteration together (a barrier), exchange a float32 gradient of P elements, and report
per-phase times; an iteration takes as long as its slowest worker, and the figure reported is
the median over iterations.

The floor. In the same run, with the same ``n`` processes as concurrent clients and values of the
size the scheme writes, the harness measures the store's raw SET and GET throughput. A scheme
cannot beat either of two bounds:

- link:  ``max over workers of max(bytes up, bytes down) / cap`` (a NIC is full duplex);
- store: ``bytes SET / SET throughput + bytes GET / GET throughput`` (Redis runs one command at
  a time, so all the traffic of a step queues through one thread);

``floor_s = max(link, store)``; without a cap only the store bound applies.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._output import command_line, write_outputs

SCHEMES = ("scatter_reduce", "centralized", "all_to_all")
PHASES = ("ul_shard_s", "dl_shard_s", "ul_aggr_s", "dl_grad_s")
_WAIT_S = 600  # no command of the harness may take longer than this


# -- worker processes ---------------------------------------------------------------------------


def _worker_main(
    rank: int, workers: int, urls: list[str], conn: Connection, barrier: Barrier
) -> None:
    """Serve commands from the driver until told to stop; one Redis connection per process."""
    from smlt.sync.baselines import AllToAll, Centralized
    from smlt.sync.link import Link
    from smlt.sync.scatter_reduce import ScatterReduce
    from smlt.sync.store import ParameterStore

    classes = {"scatter_reduce": ScatterReduce, "centralized": Centralized, "all_to_all": AllToAll}
    store = ParameterStore.from_urls(urls)
    while True:
        cmd, args = conn.recv()
        if cmd == "stop":
            return
        try:
            if cmd == "exchange":
                conn.send(("ok", _exchange(rank, workers, store, barrier, classes, Link, **args)))
            elif cmd == "store":
                conn.send(("ok", _store_throughput(rank, workers, store, barrier, **args)))
            else:
                raise ValueError(f"unknown command {cmd}")
        except Exception as exc:  # reported to the driver, which stops the run
            barrier.abort()
            conn.send(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))


def _exchange(
    rank: int,
    workers: int,
    store: Any,
    barrier: Barrier,
    classes: dict[str, Any],
    link_cls: Any,
    *,
    scheme: str,
    job: str,
    params: int,
    iterations: int,
    mbps: float | None,
) -> list[dict[str, float]]:
    grad = np.random.default_rng(rank).standard_normal(params).astype(np.float32)
    out = np.empty(params, dtype=np.float32)
    reports = []
    ex = classes[scheme](
        store,
        job,
        rank=rank,
        workers=workers,
        num_params=params,
        link=link_cls.capped(mbps),
        timeout_s=300,
    )
    with ex:
        for t in range(iterations + 1):  # iteration 0 warms connections and allocations
            barrier.wait(_WAIT_S)
            ex.step(t, grad, out)
            if t > 0:
                reports.append(ex.last_phases.as_dict())
    return reports


def _store_throughput(
    rank: int,
    workers: int,
    store: Any,
    barrier: Barrier,
    *,
    job: str,
    value_bytes: int,
    count: int,
    rounds: int,
) -> list[dict[str, float]]:
    """All workers at once SET ``count`` values of ``value_bytes``, then GET a peer's, for
    ``rounds`` rounds (the first round also pays for Redis growing its memory, as the first
    iteration of a job does; later rounds overwrite, as steady-state iterations do)."""
    value = os.urandom(value_bytes)
    keys = [f"smlt:{job}:raw:{rank}:{i}" for i in range(count)]
    peer_keys = [f"smlt:{job}:raw:{(rank + 1) % workers}:{i}" for i in range(count)]
    client = store.client(rank)
    peer_client = store.client((rank + 1) % workers)
    timings = []
    for _ in range(rounds):
        barrier.wait(_WAIT_S)
        began = time.monotonic()
        for key in keys:
            client.set(key, value, ex=600)
        set_s = time.monotonic() - began
        barrier.wait(_WAIT_S)
        began = time.monotonic()
        for key in peer_keys:
            got = peer_client.get(key)
            assert got is not None and len(got) == value_bytes
        get_s = time.monotonic() - began
        timings.append({"set_s": set_s, "get_s": get_s, "bytes": value_bytes * count})
    barrier.wait(_WAIT_S)
    client.unlink(*keys)
    return timings


@dataclass
class WorkerPool:
    """n worker processes, each with a pipe, all sharing one barrier."""

    conns: list[Connection]
    procs: list[Any]
    barrier: Barrier  # the parent must hold it, or its semaphore vanishes before children start

    @classmethod
    def start(cls, workers: int, urls: list[str]) -> WorkerPool:
        ctx = mp.get_context("spawn")
        barrier = ctx.Barrier(workers)
        conns, procs = [], []
        for rank in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main, args=(rank, workers, urls, child, barrier), daemon=True
            )
            proc.start()
            conns.append(parent)
            procs.append(proc)
        return cls(conns, procs, barrier)

    def run(self, cmd: str, **args: Any) -> list[Any]:
        for conn in self.conns:
            conn.send((cmd, args))
        replies = []
        for rank, conn in enumerate(self.conns):
            if not conn.poll(_WAIT_S):
                raise TimeoutError(f"worker {rank} did not answer {cmd} within {_WAIT_S} s")
            replies.append(conn.recv())
        errors = [msg for status, msg in replies if status == "error"]
        if errors:
            raise RuntimeError("; ".join(errors))
        return [msg for _status, msg in replies]

    def stop(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("stop", {}))
            except OSError:
                pass
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


# -- gloo reference ------------------------------------------------------------------------------


def _gloo_main(rank: int, workers: int, port: int, params: int, iterations: int, q: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=workers
    )
    tensor = torch.from_numpy(
        np.random.default_rng(rank).standard_normal(params).astype(np.float32)
    )
    times = []
    for t in range(iterations + 1):
        dist.barrier()
        began = time.monotonic()
        dist.all_reduce(tensor)
        tensor /= workers
        if t > 0:
            times.append(time.monotonic() - began)
    dist.destroy_process_group()
    q.put((rank, times))


def gloo_allreduce(workers: int, params: int, iterations: int) -> list[float]:
    """Per-iteration all-reduce time (slowest rank) with torch.distributed gloo on loopback."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        ctx.Process(target=_gloo_main, args=(r, workers, port, params, iterations, q))
        for r in range(workers)
    ]
    for p in procs:
        p.start()
    results = [q.get(timeout=_WAIT_S) for _ in procs]
    for p in procs:
        p.join(30)
    per_rank = [times for _rank, times in results]
    return [max(ts) for ts in zip(*per_rank, strict=True)]


# -- the run --------------------------------------------------------------------------------------


def _frame_bytes(elements: int) -> int:
    from smlt.sync import codec

    return len(
        codec.encode(codec.FrameHeader("grad", "x" * 8, 1, 1, 1), np.zeros(elements, np.float32))
    )


def measure(
    workers_list: list[int],
    params: int,
    iterations: int,
    mbps: float | None,
    urls: list[str],
    schemes: tuple[str, ...] = SCHEMES,
    with_gloo: bool = True,
    log: Any = print,
) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    throughput_cache: dict[tuple[int, int], tuple[float, float]] = {}
    top_throughput: tuple[float, float] | None = None
    run_id = f"bench{os.getpid()}-{int(time.time())}"
    for n in workers_list:
        pool = WorkerPool.start(n, urls)
        try:
            for scheme in schemes:
                value_elems = -(-params // n) if scheme == "scatter_reduce" else params
                value_bytes = _frame_bytes(value_elems)
                key = (n, value_bytes)
                if key not in throughput_cache:
                    count = max(2, min(n - 1, 8)) if scheme == "scatter_reduce" else 2
                    stats = pool.run(
                        "store",
                        job=f"{run_id}-raw-{n}-{value_bytes}",
                        value_bytes=value_bytes,
                        count=count,
                        rounds=5,
                    )
                    throughput_cache[key] = _store_rates(stats)
                set_bps, get_bps = throughput_cache[key]
                reports = pool.run(
                    "exchange",
                    scheme=scheme,
                    job=f"{run_id}-{scheme}-{n}",
                    params=params,
                    iterations=iterations,
                    mbps=mbps,
                )
                row = _summarize(scheme, n, reports, iterations, mbps, set_bps, get_bps)
                results.append(row)
                if scheme == "scatter_reduce" and n == max(workers_list):
                    top_throughput = (set_bps, get_bps)
                log(
                    f"n={n:<3} {scheme:<15} total {row['total_s']:.3f} s  "
                    f"floor {row['floor_s']:.3f} s  ({row['total_s'] / row['floor_s']:.2f}x)  "
                    f"store SET {set_bps / 1e9:.2f} GB/s GET {get_bps / 1e9:.2f} GB/s"
                )
        finally:
            pool.stop()
        if with_gloo:
            times = gloo_allreduce(n, params, iterations)
            results.append(
                {
                    "scheme": "gloo_allreduce",
                    "workers": n,
                    "total_s": statistics.median(times),
                    "phases": {},
                    "bytes_through_store": 0,
                    "floor_s": None,
                }
            )
            log(f"n={n:<3} {'gloo_allreduce':<15} total {statistics.median(times):.3f} s")
    set_bps, get_bps = top_throughput or next(iter(throughput_cache.values()))
    return {
        "params": params,
        "bandwidth_mbps": mbps,
        "iterations": iterations,
        "store_set_bytes_per_s": set_bps,
        "store_get_bytes_per_s": get_bps,
        "store_instances": len(urls),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "results": results,
    }


def _store_rates(stats: list[list[dict[str, float]]]) -> tuple[float, float]:
    """Aggregate SET and GET bytes/s: per round, all workers' bytes over the slowest worker's
    time; the best round, because the floor must be a lower bound (a round slowed by a noisy
    neighbour would understate the store and overstate the floor)."""
    set_rates, get_rates = [], []
    for rnd in zip(*stats, strict=True):
        total = sum(s["bytes"] for s in rnd)
        set_rates.append(total / max(s["set_s"] for s in rnd))
        get_rates.append(total / max(s["get_s"] for s in rnd))
    return max(set_rates), max(get_rates)


def _summarize(
    scheme: str,
    n: int,
    reports: list[list[dict[str, float]]],
    iterations: int,
    mbps: float | None,
    set_bps: float,
    get_bps: float,
) -> dict[str, Any]:
    """Median over iterations of the slowest worker; bytes and floor from the same reports."""

    def per_iter(field: str) -> list[float]:
        return [max(reports[r][t][field] for r in range(n)) for t in range(iterations)]

    up = [statistics.median(reports[r][t]["bytes_up"] for t in range(iterations)) for r in range(n)]
    down = [
        statistics.median(reports[r][t]["bytes_down"] for t in range(iterations)) for r in range(n)
    ]
    store_floor_s = sum(up) / set_bps + sum(down) / get_bps
    link_floor_s = (
        max(max(u, d) for u, d in zip(up, down, strict=True)) / (mbps * 1e6 / 8) if mbps else 0.0
    )
    return {
        "scheme": scheme,
        "workers": n,
        "total_s": statistics.median(per_iter("total_s")),
        "phases": {p: statistics.median(per_iter(p)) for p in PHASES},
        "bytes_through_store": int(sum(up) + sum(down)),
        "floor_s": max(store_floor_s, link_floor_s),
        "floor_store_s": store_floor_s,
        "floor_link_s": link_floor_s,
        "store_set_bytes_per_s": set_bps,
        "store_get_bytes_per_s": get_bps,
        "iteration_totals_s": per_iter("total_s"),
    }


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = data["results"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for scheme in (*SCHEMES, "gloo_allreduce"):
        rows = sorted((r for r in results if r["scheme"] == scheme), key=lambda r: r["workers"])
        if rows:
            left.plot(
                [r["workers"] for r in rows], [r["total_s"] for r in rows], "o-", label=scheme
            )
    sr = sorted((r for r in results if r["scheme"] == "scatter_reduce"), key=lambda r: r["workers"])
    if sr:
        left.plot(
            [r["workers"] for r in sr],
            [r["floor_s"] for r in sr],
            "k--",
            label="scatter_reduce floor",
        )
    cap = data["bandwidth_mbps"]
    left.set(
        xlabel="workers",
        ylabel="seconds per iteration",
        title=f"P={data['params']:,} float32, cap {cap or 'none'} Mbps",
    )
    left.legend()
    left.grid(alpha=0.3)
    bars = [r for r in results if r["scheme"] in SCHEMES]
    labels = [f"{r['scheme'][:7]}\nn={r['workers']}" for r in bars]
    bottom = np.zeros(len(bars))
    for phase in PHASES:
        values = np.array([r["phases"][phase] for r in bars])
        right.bar(range(len(bars)), values, bottom=bottom, label=phase)
        bottom += values
    right.set_xticks(range(len(bars)), labels, fontsize=7)
    right.set(ylabel="seconds (phases overlap; stacked for scale)", title="phase breakdown")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default="2,4,8", help="comma-separated worker counts")
    parser.add_argument("--params", type=int, default=11_000_000, help="float32 elements")
    parser.add_argument("--bandwidth-mbps", type=float, default=None, help="per-worker NIC cap")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--no-gloo", action="store_true", help="skip the torch gloo reference")
    parser.add_argument("--redis-url", default=None, help="use this Redis (comma-separate several)")
    parser.add_argument("--redis-instances", type=int, default=1, help="embedded Redis servers")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)

    from smlt.storage.redis_server import RedisServer

    workers_list = [int(w) for w in args.workers.split(",")]
    servers: list[RedisServer] = []
    try:
        if args.redis_url:
            urls = [u for u in args.redis_url.split(",") if u]
        else:
            servers = [RedisServer().start() for _ in range(args.redis_instances)]
            urls = [s.url for s in servers]
        data = measure(
            workers_list,
            args.params,
            args.iterations,
            args.bandwidth_mbps,
            urls,
            schemes=tuple(args.schemes.split(",")),
            with_gloo=not args.no_gloo,
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
    finally:
        for s in servers:
            s.stop()
    data["command"] = command_line("benchmarks.comm_time", argv)
    write_outputs(data, args.json, args.plot, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
