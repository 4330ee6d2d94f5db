"""An OpenWhisk action as the emulator keeps it, and the activation record an invocation leaves.

The record's fields, statuses and messages are OpenWhisk's (apache/openwhisk: ``WhiskActivation``,
``ActivationResponse``, ``Messages``): ``response.status`` is ``success``, ``application error``
(the action returned an object with an ``error`` field), ``action developer error`` (it timed
out, ran out of memory, crashed, returned no dictionary, or failed to initialize) or ``whisk
internal error`` (the emulator could not start it); the annotations carry ``path``, ``kind``,
``limits``, ``timeout``, ``waitTime`` and, after a cold start, ``initTime``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from smlt.emulator.containers import Outcome

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_PAYLOAD_BYTES",
    "Action",
    "activation_record",
    "http_status",
]

DEFAULT_LIMITS = {"timeout": 60_000, "memory": 256, "logs": 10, "concurrency": 1}
#: OpenWhisk's 1 MB limit on parameters and on results.
MAX_PAYLOAD_BYTES = 2**20
SUCCESS, APPLICATION_ERROR, DEVELOPER_ERROR, WHISK_ERROR = range(4)
_STATUS = ("success", "application error", "action developer error", "whisk internal error")
MEMORY_EXHAUSTED = "The action exhausted its memory and was aborted."
ABNORMAL_RUN = "The action did not produce a valid response and exited unexpectedly."
ABNORMAL_INIT = "The action did not initialize and exited unexpectedly."
PROVISION_ERROR = "Failed to provision resources to run the action."


@dataclass
class Action:
    namespace: str
    name: str
    exec: dict[str, Any]
    limits: dict[str, int]
    handler: str
    code_dir: Path
    revision: str
    version: str = "0.0.1"
    parameters: list[dict[str, Any]] = field(default_factory=list)
    annotations: list[dict[str, Any]] = field(default_factory=list)
    publish: bool = False
    updated_ms: int = 0

    @property
    def kind(self) -> str:
        return str(self.exec.get("kind", ""))

    def annotation(self, key: str) -> Any:
        for entry in self.annotations:
            if entry.get("key") == key:
                return entry.get("value")
        return None

    def to_json(self, *, code: bool = True) -> dict[str, Any]:
        exec_ = {k: v for k, v in self.exec.items() if code or k != "code"}
        return {
            "namespace": self.namespace,
            "name": self.name,
            "version": self.version,
            "publish": self.publish,
            "exec": exec_,
            "annotations": list(self.annotations),
            "parameters": list(self.parameters),
            "limits": dict(self.limits),
            "updated": self.updated_ms,
        }

    def summary(self) -> dict[str, Any]:
        """An entry of the action list."""
        return {
            "namespace": self.namespace,
            "name": self.name,
            "version": self.version,
            "publish": self.publish,
            "annotations": list(self.annotations),
            "limits": dict(self.limits),
            "exec": {"binary": bool(self.exec.get("binary", False))},
            "updated": self.updated_ms,
        }


def _response(outcome: Outcome, timeout_ms: int) -> tuple[int, dict[str, Any]]:
    """``(status code, result)`` of an activation, as the invoker computes them."""
    if outcome.status == "ok":
        if len(outcome.body) > MAX_PAYLOAD_BYTES:
            return APPLICATION_ERROR, {
                "error": "The action produced a response that exceeded the allowed length: "
                f"{len(outcome.body)} > {MAX_PAYLOAD_BYTES} bytes."
            }
        result = json.loads(outcome.body)
        return (APPLICATION_ERROR if "error" in result else SUCCESS), result
    if outcome.status == "error":
        return DEVELOPER_ERROR, {"error": outcome.answer.get("error", ABNORMAL_RUN)}
    if outcome.status == "init_error":
        message = f"{outcome.answer.get('errorType')}: {outcome.answer.get('errorMessage')}"
        return DEVELOPER_ERROR, {"error": f"The action failed during initialization: {message}"}
    if outcome.status == "timeout":
        during = " during initialization." if outcome.phase == "init" else "."
        return DEVELOPER_ERROR, {
            "error": f"The action exceeded its time limits of {timeout_ms} milliseconds{during}"
        }
    if outcome.status == "oom":
        return DEVELOPER_ERROR, {"error": MEMORY_EXHAUSTED}
    if outcome.status == "crash":
        return DEVELOPER_ERROR, {
            "error": ABNORMAL_INIT if outcome.phase == "init" else ABNORMAL_RUN
        }
    return WHISK_ERROR, {"error": PROVISION_ERROR}


def _log_lines(text: str, at_ms: int) -> list[str]:
    stamp = datetime.fromtimestamp(at_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return [f"{stamp} stdout: {line}" for line in text.splitlines()]


def activation_record(
    action: Action,
    activation_id: str,
    outcome: Outcome,
    *,
    start_ms: int,
    end_ms: int,
    wait_ms: int,
) -> dict[str, Any]:
    """The activation as ``GET .../activations/{id}`` shows it."""
    code, result = _response(outcome, action.limits["timeout"])
    annotations: list[dict[str, Any]] = [
        {"key": "path", "value": f"{action.namespace}/{action.name}"},
        {"key": "waitTime", "value": wait_ms},
        {"key": "kind", "value": action.kind},
        {"key": "timeout", "value": outcome.status == "timeout"},
        {"key": "limits", "value": dict(action.limits)},
    ]
    if outcome.init_ms is not None:
        annotations.append({"key": "initTime", "value": round(outcome.init_ms)})
    return {
        "namespace": action.namespace,
        "name": action.name,
        "version": action.version,
        "subject": action.namespace,
        "activationId": activation_id,
        "start": start_ms,
        "end": end_ms,
        "duration": end_ms - start_ms,
        "statusCode": code,
        "response": {
            "status": _STATUS[code],
            "success": code == SUCCESS,
            "result": result,
            "size": len(json.dumps(result)),
        },
        "logs": _log_lines(outcome.logs, end_ms),
        "annotations": annotations,
        "publish": False,
    }


def http_status(record: dict[str, Any]) -> int:
    """What a blocking invoke answers for a finished activation: 200 for success, 502 for an
    application or developer error, 500 for an internal one (the controller's rule)."""
    code = record["statusCode"]
    if code == SUCCESS:
        return 200
    return 500 if code == WHISK_ERROR else 502
