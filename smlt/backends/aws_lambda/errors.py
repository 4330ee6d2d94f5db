"""Lambda's answers and boto3's exceptions, translated into :mod:`smlt.errors` (pure functions).

Two kinds of failure come back from ``Invoke`` (AWS Lambda API reference, "Invoke"):

- **the call failed** (boto3 raises ``ClientError`` or a ``BotoCoreError``): throttling
  (HTTP 429 ``TooManyRequestsException``, with ``Reason`` and ``retryAfterSeconds``) becomes
  :class:`~smlt.errors.ThrottledError`, which the backend retries; refused credentials
  (``AccessDeniedException``, ``UnrecognizedClientException``, ``InvalidSignatureException``,
  ``ExpiredTokenException``, HTTP 401/403, no credentials at all) become
  :class:`~smlt.errors.BackendAuthError`; a payload over 6 MB (``RequestTooLargeException``)
  a :class:`~smlt.errors.ConfigError`; the rest :class:`~smlt.errors.BackendError` naming the
  code;
- **the function failed** (HTTP 200 with ``X-Amz-Function-Error``, the body an error object
  ``{"errorType", "errorMessage", "stackTrace"}``): ``"Task timed out after N seconds"`` (or
  ``errorType`` ``Sandbox.Timedout``) is :class:`~smlt.errors.FunctionTimeoutError`;
  ``Runtime.OutOfMemory``, or a runtime killed by a signal once its ``Max Memory Used``
  reached its ``Memory Size`` in the log tail, is :class:`~smlt.errors.OutOfMemoryError`;
  anything the handler raised goes through :func:`~smlt.backends.worker_errors.worker_error`
  (an smlt error comes back as itself, others as ``WorkerError`` with the remote traceback).

The log tail (``LogType=Tail``: the last 4 KB of the invocation's log, base64) ends with the
``REPORT`` line, whose ``Billed Duration`` is what AWS charges for the invocation.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
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

__all__ = [
    "AUTH_CODES",
    "THROTTLE_CODES",
    "interpret_invoke_response",
    "log_tail_text",
    "parse_billed_s",
    "translate_client_error",
]

#: Error codes of refused credentials (Lambda's own and the STS/SigV4 ones every AWS API uses).
AUTH_CODES = frozenset(
    {
        "AccessDeniedException",
        "AccessDenied",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "InvalidClientTokenId",
        "ExpiredTokenException",
        "ExpiredToken",
        "KMSAccessDeniedException",
    }
)
#: Error codes that mean "too many, come back later".
THROTTLE_CODES = frozenset(
    {
        "TooManyRequestsException",
        "ThrottlingException",
        "Throttling",
        "RequestLimitExceeded",
        "EC2ThrottledException",
    }
)

_BILLED = re.compile(r"Billed Duration:\s*([0-9]+(?:\.[0-9]+)?)\s*ms")
_MEMORY = re.compile(r"Memory Size:\s*([0-9]+)\s*MB\s+Max Memory Used:\s*([0-9]+)\s*MB")
_TIMED_OUT = "Task timed out after"


def translate_client_error(exc: BaseException, where: str) -> SmltError:
    """The smlt error for a failed Lambda API call; ``where`` names it ("rank 2: invoke f")."""
    # Imported here: botocore is an optional dependency, and this module's other functions
    # (and their tests) do not need it.
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        NoRegionError,
        ParamValidationError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    if isinstance(exc, ClientError):
        response: dict[str, Any] = dict(exc.response)
        error = response.get("Error") or {}
        code = str(error.get("Code") or "")
        message = str(error.get("Message") or response.get("message") or "")
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        text = f"{where}: {code or 'error'} (HTTP {status}): {message}".rstrip(": ")
        if code in THROTTLE_CODES or status == 429:
            reason = response.get("Reason")
            return ThrottledError(
                f"{where}: Lambda throttled the call ({code}"
                f"{', ' + str(reason) if reason else ''}): {message}",
                retry_after_s=_seconds(response.get("retryAfterSeconds")),
            )
        if code in AUTH_CODES or status in (401, 403):
            return BackendAuthError(f"{where}: AWS refused the credentials: {text}")
        if code == "RequestTooLargeException" or status == 413:
            return ConfigError(f"{where}: the invocation payload is too large: {text}")
        if code == "ResourceNotFoundException":
            return BackendError(f"{where}: the function does not exist (deleted?): {text}")
        if code in ("InvalidParameterValueException", "ValidationException"):
            return ConfigError(f"{where}: Lambda refused a parameter: {text}")
        return BackendError(f"{where}: Lambda answered {text}")
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return BackendAuthError(
            f"{where}: no usable AWS credentials ({exc}); configure them as for the AWS CLI "
            "(AWS_PROFILE, ~/.aws/credentials, environment variables or an instance role)"
        )
    if isinstance(exc, NoRegionError):
        return ConfigError(
            f"{where}: no AWS region; set AWS_REGION (or AWS_DEFAULT_REGION, or region in "
            "~/.aws/config), or give the backend option region"
        )
    if isinstance(exc, ParamValidationError):
        return ConfigError(f"{where}: {exc}")
    if isinstance(exc, EndpointConnectionError):
        return BackendError(f"{where}: cannot reach the Lambda endpoint: {exc}")
    if isinstance(exc, ReadTimeoutError):
        return BackendError(f"{where}: Lambda did not answer in time: {exc}")
    if isinstance(exc, BotoCoreError):
        return BackendError(f"{where}: {type(exc).__name__}: {exc}")
    return BackendError(f"{where}: {type(exc).__name__}: {exc}")


def _seconds(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def log_tail_text(log_result: str | None) -> str:
    """The invocation's log tail (``LogResult`` is base64); "" if absent or not base64."""
    if not log_result:
        return ""
    try:
        return base64.b64decode(log_result).decode("utf-8", errors="replace")
    except (binascii.Error, ValueError):
        return ""


def parse_billed_s(log_tail: str) -> float | None:
    """Seconds of the ``Billed Duration`` in a log tail's ``REPORT`` line, if there is one."""
    match = _BILLED.search(log_tail)
    return float(match[1]) / 1000 if match else None


def interpret_invoke_response(response: dict[str, Any], rank: int) -> InvocationOutcome:
    """Read an ``Invoke`` response (its ``Payload`` already read into bytes)."""
    log_tail = log_tail_text(response.get("LogResult"))
    billed_s = parse_billed_s(log_tail)
    body = response.get("Payload") or b""
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else str(body)
    try:
        value: Any = json.loads(text) if text else None
    except json.JSONDecodeError:
        value = text
    if response.get("FunctionError"):
        return InvocationOutcome(_function_error(value, rank, log_tail), billed_s)
    status = response.get("StatusCode")
    if status != 200:
        return InvocationOutcome(
            BackendError(f"rank {rank}: Lambda answered status {status} to a RequestResponse call"),
            billed_s,
        )
    return InvocationOutcome(report_or_error(value, rank, "function"), billed_s)


def _function_error(value: Any, rank: int, log_tail: str) -> SmltError:
    report = value if isinstance(value, dict) else {"errorMessage": value}
    error_type = str(report.get("errorType") or "")
    message = str(report.get("errorMessage") or "")
    if _TIMED_OUT in message or error_type == "Sandbox.Timedout":
        return FunctionTimeoutError(f"rank {rank}: the function hit its time limit: {message}")
    if error_type == "Runtime.OutOfMemory" or (
        error_type.startswith("Runtime.") and _memory_exhausted(log_tail)
    ):
        return OutOfMemoryError(
            f"rank {rank}: the function exceeded its memory ({error_type}: {message})"
        )
    if error_type.startswith("Runtime."):  # the runtime, not the handler: exited, killed
        return WorkerError(
            f"rank {rank}: the function's runtime failed: {error_type}: {message}",
            remote_traceback=log_tail,
        )
    return error_from_report(report, rank)


def _memory_exhausted(log_tail: str) -> bool:
    """True if the REPORT line says the function used all of its memory (how a runtime killed
    for memory looks when Lambda reports it as ``Runtime.ExitError``)."""
    match = _MEMORY.search(log_tail)
    return match is not None and int(match[2]) >= int(match[1])
