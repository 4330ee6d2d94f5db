"""What a platform reports of an invocation, back into smlt's types: the worker's report, or the
typed error the worker raised.

Lambda's and OpenWhisk's translations (``aws_lambda/errors.py``, ``openwhisk/errors.py``) read
their platform's own answer shapes; what they share is here: :class:`InvocationOutcome`, the
reading of what a function returned as a report (:func:`report_or_error`), and the worker's
exception.

Lambda's Python runtime reports an exception escaping the handler as ``{"errorType":
"ShardTimeoutError", "errorMessage": "...", "stackTrace": [...]}``; smlt's OpenWhisk entry point
reports it in the same shape (``smlt.worker.entrypoints.openwhisk_main``). Only names and text
cross the wire, so an smlt error is rebuilt from its class name, as the Ray backend returns it
as itself; Python's ``MemoryError`` is the worker running out of memory; anything else is a
:class:`~smlt.errors.WorkerError` carrying the remote traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from smlt import errors
from smlt.errors import OutOfMemoryError, SmltError, WorkerError
from smlt.protocol.payload import WorkerReport

__all__ = ["InvocationOutcome", "error_from_report", "report_or_error", "worker_error"]


@dataclass(frozen=True)
class InvocationOutcome:
    """What one invocation came to: the worker's report or the typed error, and the seconds the
    platform billed for it (Lambda's ``Billed Duration``, an activation's ``duration``; None
    when it reported none)."""

    outcome: WorkerReport | SmltError
    billed_s: float | None


def report_or_error(value: Any, rank: int, what: str) -> WorkerReport | SmltError:
    """The worker's report that ``value`` (what the ``what``, "function" or "action", returned)
    holds, or the WorkerError saying it holds none."""
    try:
        if not isinstance(value, dict):
            raise TypeError("not a dict")
        return WorkerReport.from_dict(value)
    except (TypeError, ValueError) as err:
        return WorkerError(
            f"rank {rank}: the {what} returned {type(value).__name__}, not a worker report: {err}"
        )


# The smlt errors a worker may raise, by name. Each takes its message as the only positional
# argument (extra fields such as ShardTimeoutError.missing do not cross the wire).
_SMLT_ERRORS: dict[str, type[SmltError]] = {
    cls.__name__: cls
    for cls in (getattr(errors, name) for name in errors.__all__)
    if isinstance(cls, type) and issubclass(cls, SmltError)
}


def worker_error(error_type: str, message: str, trace: str, rank: int) -> SmltError:
    """The typed error for an exception ``error_type: message`` raised by rank ``rank``'s
    handler, with ``trace`` (the remote traceback) attached."""
    where = f"rank {rank}"
    cls = _SMLT_ERRORS.get(error_type)
    if cls is WorkerError or cls is None:
        if error_type == "MemoryError":
            return OutOfMemoryError(f"{where}: the worker ran out of memory: {message}")
        what = f"{error_type}: {message}" if error_type else message
        return WorkerError(f"{where}: the worker raised {what}", remote_traceback=trace)
    rebuilt = cls(f"{where}: {message}")
    if trace:
        rebuilt.add_note(f"remote traceback of {where}:\n{trace}")
    return rebuilt


def error_from_report(report: Any, rank: int) -> SmltError:
    """:func:`worker_error` for a reported error object: a dict with ``errorType``,
    ``errorMessage`` and ``stackTrace`` (a list of lines, or text), or anything else (its text
    becomes the message)."""
    if not isinstance(report, dict):
        return WorkerError(f"rank {rank}: the worker failed: {_text(report)}")
    trace = report.get("stackTrace") or ""
    if isinstance(trace, list):
        trace = "".join(str(line) for line in trace)
    return worker_error(
        str(report.get("errorType") or ""),
        _text(report.get("errorMessage", "")),
        str(trace),
        rank,
    )


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)[:2000]
