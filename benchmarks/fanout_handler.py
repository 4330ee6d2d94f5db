"""The worker stand-in that benchmarks/fanout.py deploys: notes when it started, holds, reports.

It is both a Lambda handler (``lambda_handler(event, context)``) and an OpenWhisk action's
``main(args)``, and answers as a worker that ran to its end (a
:class:`~smlt.protocol.payload.WorkerReport`'s fields), so the backends take it through their
real path. The stamp it writes per rank is ``"<time.time() on entering> <pid>"``: the pid tells
the benchmark which container ran the rank. ``wall_s`` is the handler's own time, from entering
it to returning, which the benchmark subtracts from an invocation's round trip to get the
platform path's overhead.

Standard library only: a cold start costs an interpreter and this module, not PyTorch (see
benchmarks/fanout.py for why, and for what that leaves out).
"""

from __future__ import annotations

import os
import time
from typing import Any

__all__ = ["lambda_handler", "main"]


def _run(event: dict[str, Any]) -> dict[str, Any]:
    entered_unix_s = time.time()
    entered = time.perf_counter()
    options = event.get("options") or {}
    stamps = options.get("stamps")
    if stamps:
        # Written before holding: the benchmark reads the start of each rank from here.
        path = os.path.join(stamps, f"{options['round']}-{event['rank']}")
        with open(path, "w") as f:
            f.write(f"{entered_unix_s!r} {os.getpid()}")
    hold_s = float(options.get("hold_s", 0.0))
    if hold_s > 0:
        time.sleep(hold_s)
    return {
        "rank": event["rank"],
        "generation": event["generation"],
        "first_iteration": event["start_iteration"],
        "next_iteration": event["total_iterations"],
        "stop_reason": "finished",
        "wall_s": time.perf_counter() - entered,
        "init_s": 0.0,
    }


def lambda_handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    return _run(event)


def main(args: dict[str, Any]) -> dict[str, Any]:
    return _run(args)
