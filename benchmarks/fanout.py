"""How soon n serverless workers start: trio fan-out against one at a time, through the adapters.

    python -m benchmarks.fanout --workers 100 --rounds 3 --hold 10 \\
        --json benchmarks/results/fanout.json --plot benchmarks/results/fanout.png

The benchmark starts ``smlt emulator`` (its own process, as a cloud would be; the credentials go
through the 0600 file the emulator writes and this process's environment, never a command line
or the results) and drives it with smlt's own ``aws_lambda`` and ``openwhisk`` backends: the
scheduler's path exactly, ``backend.deploy`` then ``backend.invoke`` per rank (which returns at
once; the call runs in the backend's nursery: for Lambda a blocking boto3 ``RequestResponse`` in
``trio.to_thread.run_sync`` under the run's ``CapacityLimiter``, for OpenWhisk a blocking invoke
over ``httpx.AsyncClient``) and ``invocation.result``. The function is
benchmarks/fanout_handler.py, a worker stand-in that answers a worker's report.

**Started** means the handler was entered: its first act is to write ``time.time()`` to a file
per rank (one machine, one clock). For a cold container that includes starting the
interpreter, the emulator's runtime and importing the handler (the platform's init phase).

Measured per backend, for ``--workers`` n:

- ``trio_s``: the fan-out, warm. All n ranks invoked at once; the time from the first ``invoke``
  until the last handler started; median of ``--rounds`` rounds. Each handler holds its
  container ``--hold`` s, so the n run at once and need n containers, as a generation's workers
  do (they wait for each other at every step);
- ``trio_cold_s``: the same for the first round, which starts n new containers;
- ``sequential_s``: one at a time, warm: rank i+1 is invoked once rank i's call returned, until
  the n-th handler started. This is one-at-a-time's best case: the handler holds nothing (a real
  worker runs minutes, and a generation whose workers wait for each other could not run at all
  one at a time), so the figure is n round trips of dispatch;
- ``per_invocation_overhead_ms``: from the one-at-a-time calls (warm container, no-op handler),
  each call's round trip from ``invoke`` to ``result`` returning, minus the handler's own time
  (``wall_s``, from entering it to returning, measured in the handler); median, with p10/p90.
  It is everything on the platform path but the handler: the adapter (payload JSON, the trio
  hop to a thread or the async client, retries' bookkeeping, the answer's translation), the
  HTTP round trip on loopback, and the emulator's own dispatch to its container over a pipe.
  The same calls made with the bare client (boto3 ``invoke``, httpx ``POST``), alternated with
  the adapter's, give ``raw_client_overhead_ms``: the difference is the adapter's own share;
- ``bare_threads_trio_s``: the warm fan-out again without the adapter, the bare blocking client
  in a thread per rank under a ``CapacityLimiter`` (median of ``--rounds``); for OpenWhisk also
  ``bare_async_trio_s``, a bare ``httpx.AsyncClient`` on trio, the client the adapter uses.
  They say which part of the fan-out's time is the adapter's and which its client library's.

Cold against warm is checked, not assumed: each handler's stamp carries its container's pid.
The function is new, so the cold round's containers are all cold starts, and
``containers_after_cold_round`` = n says the n ranks ran at once (the hold outlasted the
slowest cold start); ``new_containers_in_warm_rounds`` = 0 says every warm round was served by
those containers, no cold start among them.

**What is not measured.** The stand-in does not import PyTorch. A real worker's cold start does,
which costs ~300 MB and a CPU-second or more per container: 100 of them would need ~30 GB of
memory and minutes of this 2-core machine's CPU, measuring the machine rather than the fan-out.
The cold figure is therefore the platform path plus an interpreter start; on Lambda the image's
torch import happens per container in parallel on separate hosts. Nor is a real cloud's network
or placement in any figure: this is loopback and local processes. The load average of the
(shared) machine is recorded before and after each backend.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from benchmarks._emulator import REPO, running_emulator
from benchmarks._output import command_line, write_outputs

IMAGE = "benchmarks.example/fanout:1"
ROLE = "arn:aws:iam::123456789012:role/smlt-benchmark"
MEMORY_MB = 128
BACKENDS = ("aws_lambda", "openwhisk")
#: The longest one invocation's answer may take beyond its hold.
_RESULT_TIMEOUT_S = 180.0


# -- the backends --------------------------------------------------------------------------------


def make_backend(name: str, workers: int) -> Any:
    if name == "aws_lambda":
        from smlt.backends.aws_lambda import LambdaBackend

        return LambdaBackend(image_uri=IMAGE, role_arn=ROLE, max_concurrency=workers, timeout_s=300)
    from smlt.backends.openwhisk import OpenWhiskBackend

    return OpenWhiskBackend(
        image=IMAGE,
        code="from benchmarks.fanout_handler import main\n",
        max_concurrency=workers,
        timeout_s=300,
    )


def payload(job: str, rank: int, workers: int, options: dict[str, Any]) -> Any:
    from smlt.protocol.payload import WorkerPayload

    return WorkerPayload(
        job_id=job,
        rank=rank,
        workers=workers,
        memory_mb=MEMORY_MB,
        redis_urls=("redis://127.0.0.1:1/0",),  # never used: the stand-in talks to no store
        object_store_url="file:///nowhere",
        batch_size=1,
        total_iterations=1,
        options=options,
    )


def _stamps(folder: Path, tag: str, workers: int) -> list[tuple[float, int]]:
    """(when the handler was entered, the pid of its container) per rank of round ``tag``."""
    paths = [folder / f"{tag}-{rank}" for rank in range(workers)]
    missing = [p.name for p in paths if not (p.exists() and p.read_text())]
    if missing:
        raise RuntimeError(f"round {tag}: no start stamp from {missing[:5]}")
    stamps = [p.read_text().split() for p in paths]
    return [(float(when), int(pid)) for when, pid in stamps]


async def fan_out(
    backend: Any, job: str, workers: int, hold_s: float, stamps: Path, tag: str
) -> dict[str, Any]:
    """Every rank at once, as the scheduler invokes a generation."""
    options = {"stamps": str(stamps), "round": tag, "hold_s": hold_s}
    began = time.time()
    invocations = [
        await backend.invoke(payload(job, rank, workers, options)) for rank in range(workers)
    ]
    dispatched = time.time()
    for invocation in invocations:
        await invocation.result(hold_s + _RESULT_TIMEOUT_S)
    returned = time.time()
    stamped = _stamps(stamps, tag, workers)
    offsets = sorted(when - began for when, _ in stamped)
    return {
        "containers": sorted({pid for _, pid in stamped}),
        "started_s": offsets[-1],
        "first_started_s": offsets[0],
        "median_started_s": statistics.median(offsets),
        "dispatched_s": dispatched - began,
        "returned_s": returned - began,
        "start_offsets_s": offsets,
    }


async def one_at_a_time(
    backend: Any, raw: Any, job: str, workers: int, stamps: Path, tag: str
) -> dict[str, Any]:
    """Rank i+1 once rank i returned; after each adapter call, the same call by the bare
    client (``raw``), so both see the same machine."""
    options = {"stamps": str(stamps), "round": tag, "hold_s": 0.0}
    adapter_ms, raw_ms = [], []
    began = time.time()
    for rank in range(workers):
        before = time.perf_counter()
        invocation = await backend.invoke(payload(job, rank, workers, options))
        report = await invocation.result(_RESULT_TIMEOUT_S)
        adapter_ms.append((time.perf_counter() - before - report.wall_s) * 1000)
        raw_ms.append(raw(payload(job, rank, workers, {"hold_s": 0.0})) * 1000)
    offsets = sorted(when - began for when, _ in _stamps(stamps, tag, workers))
    return {
        "started_s": offsets[-1],
        "start_offsets_s": offsets,
        "overhead_ms": adapter_ms,
        "raw_overhead_ms": raw_ms,
    }


def raw_lambda(env: dict[str, str], function: str, workers: int) -> Any:
    """One boto3 RequestResponse call: its round trip minus the handler's own time, seconds
    (safe to call from ``workers`` threads at once)."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "lambda",
        endpoint_url=env["AWS_ENDPOINT_URL_LAMBDA"],
        region_name=env["AWS_DEFAULT_REGION"],
        config=Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            read_timeout=120,
            max_pool_connections=workers,
        ),
    )

    def call(body: Any) -> float:
        before = time.perf_counter()
        answer = client.invoke(
            FunctionName=function,
            InvocationType="RequestResponse",
            Payload=json.dumps(body.to_dict()).encode(),
        )
        report = json.loads(answer["Payload"].read())
        elapsed = time.perf_counter() - before
        if answer.get("FunctionError"):
            raise RuntimeError(f"the stand-in failed: {report}")
        return elapsed - float(report["wall_s"])

    return call


def raw_openwhisk(env: dict[str, str], action: str, workers: int) -> Any:
    """One blocking invoke by a bare httpx client, as :func:`raw_lambda`."""
    import httpx

    user, _, key = env["__OW_API_KEY"].partition(":")
    client = httpx.Client(
        base_url=env["__OW_API_HOST"],
        auth=(user, key),
        timeout=120,
        limits=httpx.Limits(max_connections=workers + 8),
    )
    path = f"/api/v1/namespaces/_/actions/{action}"

    def call(body: Any) -> float:
        before = time.perf_counter()
        answer = client.post(path, params={"blocking": "true"}, json=body.to_dict())
        record = answer.json()
        elapsed = time.perf_counter() - before
        if answer.status_code != 200:
            raise RuntimeError(f"the stand-in failed: HTTP {answer.status_code} {record}")
        return elapsed - float(record["response"]["result"]["wall_s"])

    return call


async def bare_fan_out(
    call: Any, job: str, workers: int, hold_s: float, stamps: Path, tag: str
) -> dict[str, Any]:
    """Every rank at once through ``call(payload)`` (an async bare client call), no adapter."""
    options = {"stamps": str(stamps), "round": tag, "hold_s": hold_s}
    began = time.time()
    async with trio.open_nursery() as nursery:
        for rank in range(workers):
            nursery.start_soon(call, payload(job, rank, workers, options))
    stamped = _stamps(stamps, tag, workers)
    return {
        "containers": sorted({pid for _, pid in stamped}),
        "started_s": max(when for when, _ in stamped) - began,
    }


def in_threads(raw: Any, workers: int) -> Any:
    """The bare blocking call in a thread per rank, under a CapacityLimiter of n seats."""
    limiter = trio.CapacityLimiter(workers)

    async def call(body: Any) -> None:
        await trio.to_thread.run_sync(raw, body, limiter=limiter)

    return call


@asynccontextmanager
async def async_openwhisk(env: dict[str, str], action: str, workers: int) -> AsyncIterator[Any]:
    """A blocking invoke by a bare ``httpx.AsyncClient`` on trio (what the adapter uses)."""
    import httpx

    user, _, key = env["__OW_API_KEY"].partition(":")
    path = f"/api/v1/namespaces/_/actions/{action}"
    async with httpx.AsyncClient(
        base_url=env["__OW_API_HOST"],
        auth=(user, key),
        timeout=120,
        limits=httpx.Limits(max_connections=workers + 8),
    ) as client:

        async def call(body: Any) -> None:
            answer = await client.post(path, params={"blocking": "true"}, json=body.to_dict())
            if answer.status_code != 200:
                raise RuntimeError(f"the stand-in failed: HTTP {answer.status_code}")

        yield call


async def measure_backend(
    name: str, env: dict[str, str], workers: int, rounds: int, hold_s: float
) -> dict[str, Any]:
    backend = make_backend(name, workers)
    job = f"fanout-{uuid.uuid4().hex[:8]}"
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="smlt-fanout-") as folder:
        stamps = Path(folder)
        try:
            await backend.deploy(job, workers, MEMORY_MB)
            function = backend.function_name(job)
            cold = await fan_out(backend, job, workers, hold_s, stamps, "cold")
            warm = []
            for r in range(rounds):
                await trio.sleep(0.5)  # every container idle again
                warm.append(await fan_out(backend, job, workers, hold_s, stamps, f"warm{r}"))
            bare = raw_lambda if name == "aws_lambda" else raw_openwhisk
            raw = bare(env, function, workers)
            sequential = await one_at_a_time(backend, raw, job, workers, stamps, "seq")
            # The same fan-out without the adapter: where does its time go?
            threads: list[dict[str, Any]] = []
            aio: list[dict[str, Any]] = []
            for r in range(rounds):
                await trio.sleep(0.5)
                call = in_threads(raw, workers)
                threads.append(await bare_fan_out(call, job, workers, hold_s, stamps, f"bt{r}"))
            if name == "openwhisk":
                async with async_openwhisk(env, function, workers) as call:
                    for r in range(rounds):
                        await trio.sleep(0.5)
                        aio.append(await bare_fan_out(call, job, workers, hold_s, stamps, f"ba{r}"))
        finally:
            await backend.aclose()
    overhead, raw_overhead = sequential["overhead_ms"], sequential["raw_overhead_ms"]
    return {
        "trio_s": statistics.median(w["started_s"] for w in warm),
        "trio_cold_s": cold["started_s"],
        "sequential_s": sequential["started_s"],
        "per_invocation_overhead_ms": statistics.median(overhead),
        "per_invocation_overhead_p10_ms": _quantile(overhead, 0.1),
        "per_invocation_overhead_p90_ms": _quantile(overhead, 0.9),
        "raw_client_overhead_ms": statistics.median(raw_overhead),
        "adapter_overhead_ms": statistics.median(overhead) - statistics.median(raw_overhead),
        # The function is new, so every container of the cold round is a cold start; n of
        # them means all n ranks ran at once. A warm round's ranks all in those: no cold start.
        "containers_after_cold_round": len(cold["containers"]),
        "new_containers_in_warm_rounds": len(
            {pid for w in warm for pid in w["containers"]} - set(cold["containers"])
        ),
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "rounds": {"cold": cold, **{f"warm{i}": w for i, w in enumerate(warm)}},
        "sequential": sequential,
        "bare_threads_trio_s": statistics.median(t["started_s"] for t in threads),
        "bare_threads_rounds": threads,
        **(
            {
                "bare_async_trio_s": statistics.median(a["started_s"] for a in aio),
                "bare_async_rounds": aio,
            }
            if aio
            else {}
        ),
    }


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(workers: int, rounds: int, hold_s: float, backends: tuple[str, ...]) -> dict[str, Any]:
    """Start the emulator, point this process's clients at it, measure each backend."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="smlt-fanout-emulator-") as folder:
        handlers = {
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p
            ),
            "SMLT_EMULATOR_LAMBDA_HANDLER": "benchmarks.fanout_handler.lambda_handler",
            "SMLT_EMULATOR_OPENWHISK_HANDLER": "benchmarks.fanout_handler.main",
        }
        args = ["--max-concurrency", str(workers)]
        with running_emulator(Path(folder), args, handlers) as env:
            saved = {k: os.environ.get(k) for k in (*env, "WSK_CONFIG_FILE", "AWS_PROFILE")}
            os.environ.update(env)  # found by boto3 and the OpenWhisk config as a cloud's are
            os.environ["WSK_CONFIG_FILE"] = str(Path(folder) / "no-wskprops")
            os.environ.pop("AWS_PROFILE", None)
            try:
                for name in backends:
                    out[name] = trio.run(measure_backend, name, env, workers, rounds, hold_s)
                    print(f"{name}: {_summary(out[name])}", file=sys.stderr)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
    return out


def _summary(result: dict[str, Any]) -> str:
    keys = (
        "trio_s",
        "trio_cold_s",
        "sequential_s",
        "per_invocation_overhead_ms",
        "raw_client_overhead_ms",
        "containers_after_cold_round",
        "new_containers_in_warm_rounds",
    )
    return json.dumps({k: result[k] for k in keys})


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [b for b in BACKENDS if b in data]
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        result = data[name]
        rounds = result["rounds"]
        warm = sorted((r for k, r in rounds.items() if k != "cold"), key=lambda r: r["started_s"])
        series = [
            ("trio, cold", rounds["cold"]["start_offsets_s"]),
            ("trio, warm (median round)", warm[len(warm) // 2]["start_offsets_s"]),
            ("one at a time, warm", result["sequential"]["start_offsets_s"]),
        ]
        for label, offsets in series:
            ax.plot(range(1, len(offsets) + 1), offsets, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("workers started")
        ax.set_ylabel("seconds since the first invoke")
        ax.set_title(
            f"{name}: overhead {result['per_invocation_overhead_ms']:.1f} ms per invocation"
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{data['workers']} workers through smlt emulator (handler entered)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="warm fan-out rounds")
    parser.add_argument("--hold", type=float, default=10.0, help="seconds each handler holds")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.workers < 1 or args.rounds < 1:
        parser.error("--workers and --rounds must be at least 1")
    backends = tuple(b for b in args.backends.split(",") if b)
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown backends {unknown}; known: {list(BACKENDS)}")
    data: dict[str, Any] = {
        "command": command_line("benchmarks.fanout", argv),
        "workers": args.workers,
        "hold_s": args.hold,
        "warm_rounds": args.rounds,
        "memory_mb": MEMORY_MB,
        "cpus": os.cpu_count(),
        "started": "the handler was entered (it writes time.time() first)",
        "handler": "benchmarks/fanout_handler.py: standard library only, no PyTorch import",
    }
    data.update(measure(args.workers, args.rounds, args.hold, backends))
    write_outputs(data, args.json, args.plot, plot)


if __name__ == "__main__":
    main()
