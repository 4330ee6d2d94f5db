"""The platforms' entry points into :func:`smlt.worker.handler.handle`.

- ``smlt.worker.entrypoints.lambda_handler`` is the Lambda handler (the image's ``CMD``, or a
  zip function's ``Handler``). Lambda's context says how long the invocation has left
  (``get_remaining_time_in_millis``), which is what the worker hands over by. An exception
  escaping it is reported by Lambda's runtime as ``{"errorType", "errorMessage",
  "stackTrace"}``, which the backend turns back into the typed error.
- ``openwhisk_main(args)`` is an OpenWhisk action's ``main``: the invocation's parameters are the
  payload, and the deadline is the ``__OW_DEADLINE`` environment variable (epoch milliseconds)
  the runtime sets for each activation. OpenWhisk reports an exception only as text, so the
  entry point catches it and returns ``{"error": {"errorType", "errorMessage", "stackTrace"}}``
  (an application error, in OpenWhisk's terms), the same shape Lambda uses.

Both size PyTorch's thread pool to the vCPUs the function's memory buys (1,769 MB per vCPU, as
Lambda allots them, at least one), as the Ray backend does: left alone, torch starts one thread
per core of the host, and on a machine running several functions they would fight over them.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from typing import Any

from smlt.worker.handler import handle

__all__ = ["OpenWhiskContext", "lambda_handler", "openwhisk_main"]

#: Lambda's memory-to-CPU rule (platform-facts.md): 1,769 MB buys one vCPU.
_MB_PER_VCPU = 1769
#: Keys OpenWhisk may add to an action's parameters that are not part of the payload.
_OW_PREFIX = "__ow_"


def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """The AWS Lambda entry point: one worker invocation."""
    _size_threads(event)
    return handle(event, context)


class OpenWhiskContext:
    """Lambda's ``get_remaining_time_in_millis`` for an OpenWhisk activation's deadline."""

    def __init__(self, deadline_unix_ms: float) -> None:
        self.deadline_unix_ms = deadline_unix_ms

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int(self.deadline_unix_ms - time.time() * 1000))


def openwhisk_main(args: dict[str, Any]) -> dict[str, Any]:
    """The OpenWhisk entry point: the worker's report, or ``{"error": {...}}``."""
    event = {k: v for k, v in args.items() if not k.startswith(_OW_PREFIX)}
    deadline = os.environ.get("__OW_DEADLINE", "")
    context = OpenWhiskContext(float(deadline)) if deadline.strip() else None
    try:
        _size_threads(event)
        return handle(event, context)
    except Exception as exc:  # reported as an application error, typed by its name
        return {
            "error": {
                "errorType": type(exc).__name__,
                "errorMessage": str(exc),
                "stackTrace": traceback.format_exception(exc),
            }
        }


def _size_threads(event: dict[str, Any]) -> None:
    """torch's threads from the generation's memory (1 per 1,769 MB), not this invocation's: a
    rank re-invoked with twice the memory after running out must reduce with the same thread
    count as its earlier attempts, or its CPU reductions (and so its bytes) would differ."""
    options = event.get("options")
    memory_mb = (options or {}).get("generation_memory_mb") if isinstance(options, dict) else None
    if memory_mb is None:
        memory_mb = event.get("memory_mb")
    if not isinstance(memory_mb, int | float) or memory_mb <= 0:
        return
    import torch

    torch.set_num_threads(max(1, math.floor(memory_mb / _MB_PER_VCPU)))
