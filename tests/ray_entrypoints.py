"""Entry points for the Ray backend tests: ``fn(event, context) -> report dict``, like the handler.

They run in Ray worker processes, which import this module by name, so it is a plain module
beside the tests (put on the workers' path through the backend's ``runtime_env``). Each one
does one thing a real worker can do: answer, wait for its peers, raise, die, or overrun.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from smlt import errors
from smlt.protocol.payload import StopReason


def echo(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """A report built from the payload, as a worker that ran to its end iteration would."""
    stop = event["stop_iteration"]
    return {
        "rank": event["rank"],
        "generation": event["generation"],
        "first_iteration": event["start_iteration"],
        "next_iteration": event["total_iterations"] if stop is None else stop,
        "stop_reason": StopReason.FINISHED,
        "wall_s": 0.0,
        "init_s": 0.0,
    }


def barrier(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """Wait until all ``workers`` ranks have arrived (a file each), then answer.

    Only workers that run at the same time can all pass: if the backend ran them one after
    another, the first would wait alone and raise.
    """
    folder = Path(event["options"]["barrier_dir"])
    (folder / f"rank-{event['rank']}").touch()
    deadline = time.monotonic() + event["options"]["barrier_timeout_s"]
    while len(list(folder.glob("rank-*"))) < event["workers"]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {event['rank']} waited alone at the barrier")
        time.sleep(0.02)
    return echo(event)


def raise_value_error(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    raise ValueError(f"rank {event['rank']} cannot go on")


def raise_smlt_error(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """Raise the smlt error named in ``options["error"]``."""
    name = event["options"]["error"]
    if name == "ShardTimeoutError":
        raise errors.ShardTimeoutError("shard 1 never came", missing=(1,))
    raise getattr(errors, name)(f"{name} from rank {event['rank']}")


def exit_process(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    os._exit(1)


def sleep(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    time.sleep(event["options"]["sleep_s"])
    return echo(event)


def check_threads_and_context(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """Fail unless torch has the expected threads and the context counts down the limit."""
    import torch

    expected = event["options"]["threads"]
    if torch.get_num_threads() != expected:
        raise AssertionError(f"torch has {torch.get_num_threads()} threads, expected {expected}")
    remaining_ms = context.get_remaining_time_in_millis()
    if not 0 < remaining_ms <= event["function_timeout_s"] * 1000:
        raise AssertionError(f"remaining time {remaining_ms} ms out of range")
    return echo(event)
