"""Which Lambda invocation type starts n workers sooner: ``RequestResponse`` or ``Event``?

Against ``smlt emulator`` (real HTTP, boto3, one subprocess "container" per concurrent
invocation), n invocations of one function are fanned out at once from trio, each blocking boto3
call in ``trio.to_thread.run_sync`` under a ``CapacityLimiter`` of n seats, as the aws_lambda
backend does. The handler writes the time it started and holds its container ``--hold`` seconds,
so that all n run at once, as a generation's workers do. Measured per round:

- ``started_s``: from the fan-out's start until the last of the n handlers started;
- ``issued_s``: until every ``invoke`` call had returned to the caller (for ``Event`` the 202;
  for ``RequestResponse`` the whole run, hold included).

Each mode gets its own function, so that both see a cold first round (a new container per
invocation) and then ``--rounds`` warm ones (containers reused). Rounds alternate between modes.

    python -m benchmarks.lambda_invoke_type --workers 4,16 --rounds 3 \
        --json benchmarks/results/lambda_invoke_type.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import trio

from benchmarks._output import command_line, write_outputs

IMAGE = "benchmarks.example/invoke-type:1"
ROLE = "arn:aws:iam::123456789012:role/smlt-benchmark"
MODES = ("RequestResponse", "Event")


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Write when this invocation started, then hold the container like a worker would."""
    started = time.time()
    stamp = Path(event["stamps"]) / f"{event['round']}-{event['rank']}"
    stamp.write_text(repr(started))
    time.sleep(float(event["hold_s"]))
    return {"rank": event["rank"], "started": started}


def _client(emulator: Any, workers: int) -> Any:
    import boto3
    from botocore.config import Config

    credentials = emulator.aws_credentials
    return boto3.client(
        "lambda",
        endpoint_url=emulator.lambda_url,
        aws_access_key_id=credentials.access_key_id,
        aws_secret_access_key=credentials.secret_access_key,
        region_name=credentials.region,
        config=Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            read_timeout=300,
            max_pool_connections=workers,
        ),
    )


async def _round(
    client: Any, function: str, mode: str, workers: int, hold_s: float, stamps: Path, tag: str
) -> dict[str, float]:
    limiter = trio.CapacityLimiter(workers)
    returned: list[float] = []

    def call(rank: int) -> None:
        body = {"stamps": str(stamps), "round": tag, "rank": rank, "hold_s": hold_s}
        answer = client.invoke(
            FunctionName=function, InvocationType=mode, Payload=json.dumps(body).encode()
        )
        answer["Payload"].read()
        if answer.get("FunctionError") or answer["StatusCode"] not in (200, 202):
            raise RuntimeError(f"{mode} invocation failed: {answer}")

    async def one(rank: int) -> None:
        await trio.to_thread.run_sync(functools.partial(call, rank), limiter=limiter)
        returned.append(time.time())

    began = time.time()
    async with trio.open_nursery() as nursery:
        for rank in range(workers):
            nursery.start_soon(one, rank)
    deadline = time.monotonic() + 120
    while True:  # Event: the handlers may still be starting after every 202 came back
        found = [stamps / f"{tag}-{r}" for r in range(workers)]
        if all(p.exists() and p.read_text() for p in found):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mode}: not every worker started within 120 s")
        await trio.sleep(0.01)
    starts = [float(p.read_text()) for p in found]
    return {"started_s": max(starts) - began, "issued_s": max(returned) - began}


def _create(client: Any, name: str, memory_mb: int) -> None:
    client.create_function(
        FunctionName=name,
        Role=ROLE,
        PackageType="Image",
        Code={"ImageUri": IMAGE},
        MemorySize=memory_mb,
        Timeout=120,
    )
    client.get_waiter("function_active_v2").wait(
        FunctionName=name, WaiterConfig={"Delay": 0.2, "MaxAttempts": 100}
    )
    # Fail fast: no retries of a failed Event (the default is 2, a minute apart).
    client.put_function_event_invoke_config(FunctionName=name, MaximumRetryAttempts=0)


def measure(workers: int, rounds: int, hold_s: float) -> dict[str, Any]:
    from smlt.emulator import Emulator

    repo = str(Path(__file__).resolve().parent.parent)
    pythonpath = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
    with (
        tempfile.TemporaryDirectory() as folder,
        Emulator(
            max_concurrency=workers,
            container_env={"PYTHONPATH": pythonpath},
            image_handlers={IMAGE: "benchmarks.lambda_invoke_type:handler"},
        ) as emulator,
    ):
        stamps = Path(folder)
        client = _client(emulator, workers)
        functions = {mode: f"invoke-type-{mode.lower()}-{uuid.uuid4().hex[:6]}" for mode in MODES}
        for name in functions.values():
            _create(client, name, 128)
        results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
        for r in range(rounds + 1):
            for mode in MODES if r % 2 == 0 else reversed(MODES):
                tag = f"{mode}-{r}"
                got = trio.run(_round, client, functions[mode], mode, workers, hold_s, stamps, tag)
                results[mode].append(got)
                time.sleep(hold_s + 0.5)  # every container idle again before the next round
        return {
            mode: {
                "cold_started_s": runs[0]["started_s"],
                "warm_started_s": statistics.median(x["started_s"] for x in runs[1:]),
                "warm_issued_s": statistics.median(x["issued_s"] for x in runs[1:]),
                "rounds": runs,
            }
            for mode, runs in results.items()
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default="4,16", help="comma-separated worker counts")
    parser.add_argument("--rounds", type=int, default=3, help="warm rounds per mode")
    parser.add_argument("--hold", type=float, default=1.0, help="seconds each handler holds")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    data: dict[str, Any] = {
        "command": command_line("benchmarks.lambda_invoke_type", argv),
        "hold_s": args.hold,
        "by_workers": {},
    }
    for n in (int(x) for x in args.workers.split(",")):
        data["by_workers"][str(n)] = measure(n, args.rounds, args.hold)
        print(
            f"n={n}: "
            + json.dumps(
                {
                    m: {k: v for k, v in r.items() if k != "rounds"}
                    for m, r in data["by_workers"][str(n)].items()
                }
            ),
            file=sys.stderr,
        )
    write_outputs(data, args.json)


if __name__ == "__main__":
    main()
