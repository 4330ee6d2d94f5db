"""Worker stand-ins for the backend contract tests (tests/test_backend_contract.py).

One module for every platform: ``lambda_handler(event, context)`` for Lambda and Ray,
``main(args)`` for OpenWhisk (which reports an exception as ``{"error": {...}}``, as smlt's own
entry point does). The payload's ``options["act"]`` says what to do: ``echo`` (answer as a
worker that ran to its end), ``sleep`` (``sleep_s`` first), ``alloc`` (take ``alloc_mb`` MB and
touch every page: over the function's memory, the platform kills it), ``memory_error`` (raise
MemoryError, the way an allocation fails where nothing kills the process: Ray),
``raise`` (``ValueError``) or ``raise_smlt`` (the smlt error named ``error``). No torch and no
smlt import beyond :mod:`smlt.errors`: a cold start costs an interpreter, not PyTorch.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

from smlt import errors


def _echo(event: dict[str, Any]) -> dict[str, Any]:
    stop = event.get("stop_iteration")
    return {
        "rank": event["rank"],
        "generation": event["generation"],
        "first_iteration": event["start_iteration"],
        "next_iteration": event["total_iterations"] if stop is None else stop,
        "stop_reason": "finished",
        "wall_s": 0.0,
        "init_s": 0.0,
    }


def _act(event: dict[str, Any]) -> dict[str, Any]:
    options = event.get("options") or {}
    act = options.get("act", "echo")
    if act == "sleep":
        time.sleep(float(options["sleep_s"]))
    elif act == "alloc":
        block = bytearray(int(options["alloc_mb"]) << 20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(2.0)  # long enough for the platform to see it
        del block
    elif act == "memory_error":
        raise MemoryError(f"rank {event['rank']} could not allocate")
    elif act == "raise":
        raise ValueError(f"rank {event['rank']} cannot go on")
    elif act == "raise_smlt":
        raise getattr(errors, options["error"])(f"{options['error']} from rank {event['rank']}")
    return _echo(event)


def lambda_handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    return _act(event)


def main(args: dict[str, Any]) -> dict[str, Any]:
    try:
        return _act(args)
    except Exception as exc:
        return {
            "error": {
                "errorType": type(exc).__name__,
                "errorMessage": str(exc),
                "stackTrace": traceback.format_exception(exc),
            }
        }
