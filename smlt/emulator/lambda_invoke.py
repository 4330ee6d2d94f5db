"""What Lambda's Invoke answers, and its queue of asynchronous (``Event``) invocations.

A synchronous invocation always answers 200 when the function ran, whatever the function did;
a failure is in the ``X-Amz-Function-Error: Unhandled`` header and a JSON body with
``errorType`` and ``errorMessage``, shaped as Lambda shapes them:

- the handler raised: its exception type and message, ``requestId`` and ``stackTrace``;
- the timeout: ``Sandbox.Timedout``, ``RequestId: ... Error: Task timed out after 3.00 seconds``;
- out of memory: ``Runtime.OutOfMemory``, ``Runtime exited with error: signal: killed``;
- the process died otherwise: ``Runtime.ExitError`` with how it ended;
- the handler could not be imported: ``Runtime.ImportModuleError`` and its kin.

``X-Amz-Log-Result`` (with ``LogType=Tail``) is the base64 of the last 4 KB of the log, ending in
Lambda's ``REPORT`` line with the duration, the billed duration (whole milliseconds, init
included, as Lambda bills since August 2025), the memory size and the memory used.

An ``Event`` invocation is answered 202 at once and runs in the background. If the function's
concurrency is exhausted it waits in the queue (Lambda retries throttled events for up to the
event's maximum age) rather than failing; if it fails, it is retried ``MaximumRetryAttempts``
times (2 unless the function's event-invoke config says otherwise), after the delays in
``event_retry_delays_s`` (Lambda's are about 1 and 2 minutes).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from smlt.emulator.containers import Admit, ContainerPool, Outcome
from smlt.emulator.lambda_model import Version
from smlt.emulator.messages import Response
from smlt.errors import ThrottledError

__all__ = [
    "MAX_ASYNC_PAYLOAD_BYTES",
    "MAX_SYNC_PAYLOAD_BYTES",
    "EventQueue",
    "billed_ms",
    "function_error",
    "invocation_response",
    "log_text",
]

logger = logging.getLogger("smlt.emulator")

MAX_SYNC_PAYLOAD_BYTES = 6 * 2**20
MAX_ASYNC_PAYLOAD_BYTES = 2**20
_TAIL_BYTES = 4096
DEFAULT_EVENT_RETRIES = 2
DEFAULT_EVENT_AGE_S = 21_600


def billed_ms(outcome: Outcome) -> int:
    return max(1, math.ceil(outcome.duration_ms + (outcome.init_ms or 0.0)))


def function_error(outcome: Outcome, request_id: str, timeout_s: float) -> dict[str, Any] | None:
    """The body Lambda answers for a failed invocation, or None if it succeeded."""
    prefix = f"RequestId: {request_id} Error:"
    if outcome.status == "ok":
        if len(outcome.body) > MAX_SYNC_PAYLOAD_BYTES:
            return {
                "errorType": "Function.ResponseSizeTooLarge",
                "errorMessage": "Response payload size exceeded maximum allowed payload size "
                f"({MAX_SYNC_PAYLOAD_BYTES} bytes).",
            }
        return None
    if outcome.status == "error":
        return dict(outcome.answer.get("error") or {})
    if outcome.status == "init_error":
        return {
            "errorMessage": outcome.answer.get("errorMessage", ""),
            "errorType": outcome.answer.get("errorType", "Runtime.Unknown"),
            "requestId": "",
            "stackTrace": [],
        }
    if outcome.status == "timeout":
        return {
            "errorType": "Sandbox.Timedout",
            "errorMessage": f"{prefix} Task timed out after {timeout_s:.2f} seconds",
        }
    if outcome.status == "oom":
        return {
            "errorType": "Runtime.OutOfMemory",
            "errorMessage": f"{prefix} Runtime exited with error: signal: killed",
        }
    return {
        "errorType": "Runtime.ExitError",
        "errorMessage": f"{prefix} Runtime exited with error: {outcome.exit_reason}",
    }


def log_text(outcome: Outcome, request_id: str, memory_mb: int, timeout_s: float) -> str:
    """The invocation's log as CloudWatch would hold it, from START to REPORT."""
    lines = [f"START RequestId: {request_id} Version: $LATEST"]
    if outcome.logs:
        lines.append(outcome.logs.rstrip("\n"))
    error = function_error(outcome, request_id, timeout_s)
    if outcome.status == "timeout":
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        lines.append(f"{stamp} {request_id} Task timed out after {timeout_s:.2f} seconds")
    elif outcome.status in ("oom", "crash") and error:
        lines.append(f"{error['errorMessage']}\n{error['errorType']}")
    lines.append(f"END RequestId: {request_id}")
    report = (
        f"REPORT RequestId: {request_id}\tDuration: {outcome.duration_ms:.2f} ms\t"
        f"Billed Duration: {billed_ms(outcome)} ms\tMemory Size: {memory_mb} MB\t"
        f"Max Memory Used: {outcome.max_memory_mb} MB\t"
    )
    if outcome.init_ms is not None:
        report += f"Init Duration: {outcome.init_ms:.2f} ms\t"
    if outcome.status == "timeout":
        report += "Status: timeout"
    elif outcome.status in ("oom", "crash", "init_error"):
        report += f"Status: error\tError Type: {(error or {}).get('errorType', '')}"
    lines.append(report)
    return "\n".join(lines) + "\n"


def invocation_response(
    outcome: Outcome, version: Version, request_id: str, *, tail: bool
) -> Response:
    """The 200 answer of a synchronous invocation that ran."""
    error = function_error(outcome, request_id, version.timeout_s)
    headers = {
        "Content-Type": "application/json",
        "X-Amz-Executed-Version": "$LATEST",
        "x-amzn-RequestId": request_id,
    }
    if error is not None:
        headers["X-Amz-Function-Error"] = "Unhandled"
    if tail:
        text = log_text(outcome, request_id, version.spec.memory_mb, version.timeout_s).encode()
        headers["X-Amz-Log-Result"] = base64.b64encode(text[-_TAIL_BYTES:]).decode()
    if error is None:
        return Response(200, outcome.body, headers)
    return Response(200, json.dumps(error).encode(), headers)


#: ``lookup()`` -> (the version to run, its admission rule, its event-invoke config), or None
#: if the function is gone.
Lookup = Callable[[], tuple[Version, Admit, Mapping[str, Any]] | None]


class EventQueue:
    """Runs ``Event`` invocations in the background, one thread each, all stopped by close()."""

    def __init__(
        self,
        pool: ContainerPool,
        *,
        retry_delays_s: tuple[float, ...],
        init_grace_s: float,
        on_outcome: Callable[[Outcome], None],
    ) -> None:
        self._pool = pool
        self._retry_delays_s = retry_delays_s
        self._init_grace_s = init_grace_s
        self._on_outcome = on_outcome
        self._stop = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()

    def submit(self, lookup: Lookup, header: Mapping[str, Any], payload: bytes) -> None:
        thread = threading.Thread(
            target=self._run,
            args=(lookup, dict(header), payload),
            name=f"lambda-event-{header['request_id'][:8]}",
            daemon=True,
        )
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _run(self, lookup: Lookup, header: dict[str, Any], payload: bytes) -> None:
        request_id = header["request_id"]
        received = time.monotonic()
        try:
            attempt = 0
            while not self._stop.is_set():
                found = lookup()
                if found is None:
                    logger.info("lambda event %s dropped: the function is gone", request_id)
                    return
                version, admit, event_config = found
                max_age_s = event_config.get("MaximumEventAgeInSeconds", DEFAULT_EVENT_AGE_S)
                retries = event_config.get("MaximumRetryAttempts", DEFAULT_EVENT_RETRIES)
                try:
                    lease = self._pool.acquire(version.spec, admit, wait_until=received + max_age_s)
                except ThrottledError:
                    logger.info(
                        "lambda event %s dropped: throttled past its maximum age", request_id
                    )
                    return
                with lease:
                    outcome = lease.invoke(
                        header,
                        payload,
                        timeout_s=version.timeout_s,
                        init_grace_s=self._init_grace_s,
                        init_overflows=True,
                    )
                self._on_outcome(outcome)
                if outcome.status == "ok":
                    return
                if attempt >= retries:
                    logger.info(
                        "lambda event %s failed (%s) after %d attempts",
                        request_id,
                        outcome.status,
                        attempt + 1,
                    )
                    return
                delay_s = self._retry_delays_s[min(attempt, len(self._retry_delays_s) - 1)]
                attempt += 1
                if self._stop.wait(delay_s if self._retry_delays_s else 0.0):
                    return
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def stop(self) -> None:
        """Retry nothing more. Events waiting for a slot end when the pool closes, running ones
        when the pool kills their containers; then :meth:`join`."""
        self._stop.set()

    def join(self, timeout_s: float = 5.0) -> None:
        with self._lock:
            threads = list(self._threads)
        deadline = time.monotonic() + timeout_s
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
