"""OpenWhisk's HTTP answers and activation records, translated into :mod:`smlt.errors`.

The REST API (apache/openwhisk docs/rest_api.md and the controller's ``Messages``) answers:

- **401 / 403**: the ``uuid:key`` is unknown or not allowed -> :class:`BackendAuthError`;
- **429**: "Too many concurrent requests in flight" or "Too many requests in the last minute"
  -> :class:`ThrottledError`, retried by :mod:`smlt.backends.retry`;
- **404**: no such action or activation; **413**: parameters over the limit -> ConfigError;
- a blocking invoke: **200** with the activation record when it succeeded, **502** with the
  record when the action failed, **202** ``{"activationId"}`` once the blocking window passed.

An activation record's ``response`` has a ``status`` and the action's ``result``:

- ``success``: the result is the worker's report;
- ``application error``: the action returned ``{"error": ...}``; smlt's entry point puts the
  worker's exception there as ``{"errorType", "errorMessage", "stackTrace"}``
  (:func:`~smlt.backends.worker_errors.error_from_report`);
- ``action developer error``: OpenWhisk stopped the action: "The action exceeded its time
  limits of N milliseconds." (the record is also annotated ``timeout: true``) ->
  FunctionTimeoutError; "The action exhausted its memory and was aborted." -> OutOfMemoryError;
  "... exited unexpectedly" (the container died) -> WorkerError;
- ``whisk internal error``: the platform failed -> BackendError.

The record's ``duration`` (milliseconds) is the billed duration.
"""

from __future__ import annotations

import json
from typing import Any

from smlt.backends.worker_errors import InvocationOutcome, error_from_report, report_or_error
from smlt.errors import (
    BackendAuthError,
    BackendError,
    ConfigError,
    FunctionTimeoutError,
    OutOfMemoryError,
    SmltError,
    ThrottledError,
    WorkerError,
)

__all__ = ["activation_outcome", "http_error", "retry_after_s"]

_TIMED_OUT = "exceeded its time limits"
_OUT_OF_MEMORY = "exhausted its memory"


def retry_after_s(header: str | None) -> float | None:
    """An HTTP ``Retry-After`` in seconds (the delta form; a date is ignored)."""
    try:
        return float(header) if header else None
    except ValueError:
        return None


def http_error(status: int, body: str, where: str, *, retry_after: str | None = None) -> SmltError:
    """The smlt error for an HTTP error answer of the OpenWhisk API."""
    message = _error_message(body)
    text = f"{where}: HTTP {status}: {message}".rstrip(": ")
    if status == 429:
        return ThrottledError(
            f"{where}: OpenWhisk throttled the call: {message}",
            retry_after_s=retry_after_s(retry_after),
        )
    if status in (401, 403):
        return BackendAuthError(f"{where}: OpenWhisk refused the credentials: {text}")
    if status == 404:
        return BackendError(f"{where}: not found (deleted?): {text}")
    if status == 413:
        return ConfigError(f"{where}: the request is too large: {text}")
    if status in (400, 409):
        return ConfigError(f"{where}: OpenWhisk refused the request: {text}")
    return BackendError(f"{where}: OpenWhisk answered {text}")


def _error_message(body: str) -> str:
    """The ``error`` of an OpenWhisk error body (``{"error": ..., "code": ...}``), else the text."""
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, TypeError):
        return body.strip()[:500]
    if isinstance(value, dict) and "error" in value:
        return str(value["error"])[:500]
    return body.strip()[:500]


def activation_outcome(activation: Any, rank: int) -> InvocationOutcome:
    """Read an activation record (the body of a blocking invoke or of GET activations/ID)."""
    if not isinstance(activation, dict):
        return InvocationOutcome(
            BackendError(f"rank {rank}: OpenWhisk sent no activation record: {activation!r}"),
            None,
        )
    duration = activation.get("duration")
    billed_s = float(duration) / 1000 if isinstance(duration, int | float) else None
    response = activation.get("response") or {}
    status = str(response.get("status") or "")
    result = response.get("result")
    if status == "success" or (not status and response.get("success") is True):
        return InvocationOutcome(report_or_error(result, rank, "action"), billed_s)
    error = result.get("error") if isinstance(result, dict) else result
    text = error if isinstance(error, str) else ""
    where = f"rank {rank}: activation {activation.get('activationId', '?')}"
    if _annotated_timeout(activation) or _TIMED_OUT in text:
        return InvocationOutcome(
            FunctionTimeoutError(f"{where} hit its time limit: {text or 'timeout'}"), billed_s
        )
    if _OUT_OF_MEMORY in text:
        return InvocationOutcome(OutOfMemoryError(f"{where} exceeded its memory: {text}"), billed_s)
    if status == "whisk internal error":
        return InvocationOutcome(BackendError(f"{where}: OpenWhisk failed: {text}"), billed_s)
    if isinstance(error, dict):
        return InvocationOutcome(error_from_report(error, rank), billed_s)
    return InvocationOutcome(
        WorkerError(f"{where} failed ({status or 'no status'}): {text or error!r}"), billed_s
    )


def _annotated_timeout(activation: dict[str, Any]) -> bool:
    for note in activation.get("annotations") or ():
        if isinstance(note, dict) and note.get("key") == "timeout" and note.get("value") is True:
            return True
    return False
