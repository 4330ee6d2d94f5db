"""A Lambda function as the emulator keeps it, and the errors the Lambda API answers with.

The fields are the ones ``FunctionConfiguration`` has (boto3's names in :meth:`configuration`).
Creation and updates are asynchronous as on Lambda: a new function is ``Pending`` and an updated
one ``InProgress`` for ``update_delay_s``, so that a client which does not wait (boto3's
``function_active_v2`` / ``function_updated_v2`` waiters) is caught. The state settles lazily,
whenever the function is looked at, so no timer thread is needed. While an update is in progress,
invocations run the previous configuration (``live``), as on Lambda.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from smlt.emulator.containers import ContainerSpec
from smlt.emulator.messages import Request, Response

__all__ = [
    "ACCOUNT_ID",
    "MAX_UNZIPPED_BYTES",
    "RESERVED_VARIABLES",
    "FunctionTable",
    "LambdaError",
    "LambdaFunction",
    "Version",
    "check_environment",
    "function_arn",
    "int_in",
    "invalid",
    "json_body",
    "not_found",
    "parse_reference",
    "unpack_zip",
    "validation",
]

#: The account every emulated ARN names (the one AWS's documentation uses).
ACCOUNT_ID = "123456789012"
MAX_UNZIPPED_BYTES = 262_144_000
MAX_ENVIRONMENT_BYTES = 4096
#: Variables Lambda sets itself and refuses in a function's configuration.
RESERVED_VARIABLES = frozenset(
    {
        "_HANDLER", "_X_AMZN_TRACE_ID", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_EXECUTION_ENV",
        "AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
        "AWS_LAMBDA_FUNCTION_VERSION", "AWS_LAMBDA_INITIALIZATION_TYPE",
        "AWS_LAMBDA_LOG_GROUP_NAME", "AWS_LAMBDA_LOG_STREAM_NAME", "AWS_ACCESS_KEY",
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
        "AWS_LAMBDA_RUNTIME_API", "LAMBDA_TASK_ROOT", "LAMBDA_RUNTIME_DIR", "TZ",
    }
)  # fmt: skip
_VARIABLE_NAME = re.compile(r"^[a-zA-Z][a-zA-Z0-9_]+$")
_REFERENCE = re.compile(
    r"^(?:arn:aws[a-z-]*:lambda:(?P<region>[a-z0-9-]+):)?(?:\d{12}:function:)?"
    r"(?P<name>[A-Za-z0-9_-]{1,64})(?::(?P<qualifier>[A-Za-z0-9$_-]+))?$"
)


class LambdaError(Exception):
    """An error answer of the Lambda API: boto3 reads its code from ``x-amzn-ErrorType``."""

    def __init__(self, status: int, error_type: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.extra = extra

    def response(self, request_id: str) -> Response:
        body = {"Type": "User" if self.status < 500 else "Service", "message": self.message}
        body.update(self.extra)
        return Response.json(
            self.status,
            body,
            {"x-amzn-ErrorType": self.error_type, "x-amzn-RequestId": request_id},
        )


def not_found(arn: str) -> LambdaError:
    return LambdaError(404, "ResourceNotFoundException", f"Function not found: {arn}")


def invalid(message: str) -> LambdaError:
    return LambdaError(400, "InvalidParameterValueException", message)


def validation(value: Any, member: str, constraint: str) -> LambdaError:
    return LambdaError(
        400,
        "ValidationException",
        f"1 validation error detected: Value '{value}' at '{member}' failed to satisfy "
        f"constraint: {constraint}",
    )


def int_in(body: Mapping[str, Any], key: str, low: int, high: int, default: int) -> int:
    """``body[key]`` (or ``default``), an integer in ``[low, high]``; else a ValidationException
    naming the member as Lambda does (``MemorySize`` -> ``memorySize``)."""
    value = body.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise validation(
            value,
            key[0].lower() + key[1:],
            f"Member must have value greater than or equal to {low} and less than or equal "
            f"to {high}",
        )
    return value


def json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(request.body or b"{}")
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise LambdaError(400, "SerializationException", "Request body is not a JSON object")
    return body


def function_arn(region: str, name: str) -> str:
    return f"arn:aws:lambda:{region}:{ACCOUNT_ID}:function:{name}"


def parse_reference(ref: str, region: str, qualifier: str | None = None) -> tuple[str, str]:
    """``(region, name)`` of a function named by name, ARN or partial ARN (an ARN's region wins
    over the request's). A qualifier other than ``$LATEST`` is not found: there are no
    published versions or aliases here."""
    match = _REFERENCE.match(ref)
    if not match:
        raise validation(
            ref,
            "functionName",
            "Member must satisfy regular expression pattern: (arn:(aws[a-zA-Z-]*)?:lambda:)?"
            "([a-z]{2}(-gov)?-[a-z]+-\\d{1}:)?(\\d{12}:)?(function:)?([a-zA-Z0-9-_]+)"
            "(:(\\$LATEST|[a-zA-Z0-9-_]+))?",
        )
    region = match["region"] or region
    qualifier = match["qualifier"] or qualifier
    if qualifier not in (None, "$LATEST"):
        raise not_found(f"{function_arn(region, match['name'])}:{qualifier}")
    return region, match["name"]


@dataclass(frozen=True)
class Version:
    """What an invocation runs: the container spec and the timeout."""

    spec: ContainerSpec
    timeout_s: int


def _now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "+0000"


@dataclass
class LambdaFunction:
    region: str
    name: str
    role: str
    package_type: str
    runtime: str | None = None
    handler: str | None = None
    description: str = ""
    timeout_s: int = 3
    memory_mb: int = 128
    image_uri: str | None = None
    image_config: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    architectures: list[str] = field(default_factory=lambda: ["x86_64"])
    ephemeral_storage_mb: int = 512
    code_sha256: str = ""
    code_size: int = 0
    code_dir: Path | None = None
    tags: dict[str, str] = field(default_factory=dict)
    reserved_concurrency: int | None = None
    event_config: dict[str, Any] | None = None
    revision_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    last_modified: str = field(default_factory=_now_text)
    state: str = "Pending"
    last_update_status: str = "InProgress"
    settles_at: float = 0.0
    live: Version | None = None
    pending: Version | None = None

    @property
    def arn(self) -> str:
        return function_arn(self.region, self.name)

    @property
    def key(self) -> str:
        """The function's name in the container pool: ``region:name``."""
        return f"{self.region}:{self.name}"

    def changed(self, version_of: Callable[[LambdaFunction], Version], delay_s: float) -> None:
        """A new configuration or code: a new revision (whose containers ``version_of`` the
        function describes), in progress for ``delay_s``."""
        self.revision_id = str(uuid.uuid4())
        self.last_modified = _now_text()
        version = version_of(self)
        self.settles_at = time.monotonic() + delay_s
        if self.live is None:  # being created
            self.state = "Pending"
        self.last_update_status = "InProgress"
        self.pending = version
        self.settle()

    def settle(self) -> None:
        """Finish a creation or update whose time has come."""
        if self.pending is not None and time.monotonic() >= self.settles_at:
            self.live, self.pending = self.pending, None
            self.state, self.last_update_status = "Active", "Successful"

    def configuration(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "FunctionName": self.name,
            "FunctionArn": self.arn,
            "Role": self.role,
            "CodeSize": self.code_size,
            "Description": self.description,
            "Timeout": self.timeout_s,
            "MemorySize": self.memory_mb,
            "LastModified": self.last_modified,
            "CodeSha256": self.code_sha256,
            "Version": "$LATEST",
            "TracingConfig": {"Mode": "PassThrough"},
            "RevisionId": self.revision_id,
            "State": self.state,
            "LastUpdateStatus": self.last_update_status,
            "PackageType": self.package_type,
            "Architectures": list(self.architectures),
            "EphemeralStorage": {"Size": self.ephemeral_storage_mb},
        }
        if self.package_type == "Zip":
            config["Runtime"] = self.runtime
            config["Handler"] = self.handler
        elif self.image_config:
            config["ImageConfigResponse"] = {"ImageConfig": dict(self.image_config)}
        if self.environment:
            config["Environment"] = {"Variables": dict(self.environment)}
        if self.state == "Pending":
            config["StateReason"] = "The function is being created."
            config["StateReasonCode"] = "Creating"
        if self.last_update_status == "InProgress" and self.state != "Pending":
            config["LastUpdateStatusReason"] = "The function is being updated."
            config["LastUpdateStatusReasonCode"] = "Updating"
        return config

    def code_location(self) -> dict[str, Any]:
        if self.package_type == "Image":
            return {
                "RepositoryType": "ECR",
                "ImageUri": self.image_uri,
                "ResolvedImageUri": self.image_uri,
            }
        return {"RepositoryType": "S3", "Location": f"file://{self.code_dir}"}


class FunctionTable:
    """Every function, per region, behind one lock: hold ``lock`` while using the rest."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._functions: dict[tuple[str, str], LambdaFunction] = {}

    def get(self, region: str, name: str) -> LambdaFunction:
        """The function, settled; ResourceNotFoundException if there is none."""
        function = self._functions.get((region, name))
        if function is None:
            raise not_found(function_arn(region, name))
        function.settle()
        return function

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._functions

    def add(self, function: LambdaFunction) -> None:
        self._functions[(function.region, function.name)] = function

    def remove(self, region: str, name: str) -> LambdaFunction:
        function = self.get(region, name)
        del self._functions[(region, name)]
        return function

    def in_region(self, region: str) -> list[LambdaFunction]:
        """The region's functions by name, settled."""
        found = sorted(
            (f for (r, _), f in self._functions.items() if r == region), key=lambda f: f.name
        )
        for function in found:
            function.settle()
        return found

    def all(self) -> list[LambdaFunction]:
        return list(self._functions.values())


def check_environment(variables: Any) -> dict[str, str]:
    """A function's ``Environment.Variables``, checked as Lambda checks them."""
    if not isinstance(variables, dict):
        raise invalid("Environment.Variables must be a map of strings")
    for name, value in variables.items():
        if not isinstance(name, str) or not _VARIABLE_NAME.match(name):
            raise validation(
                name,
                "environment.variables",
                "Member must satisfy regular expression pattern: [a-zA-Z]([a-zA-Z0-9_])+",
            )
        if not isinstance(value, str):
            raise invalid(f"Environment variable {name} must be a string")
    reserved = sorted(set(variables) & RESERVED_VARIABLES)
    if reserved:
        raise invalid(
            "Lambda was unable to configure your environment variables because the environment "
            "variables you have provided contains reserved keys that are currently not supported "
            f"for modification. Reserved keys used in this request: {', '.join(reserved)}"
        )
    size = sum(len(k) + len(v) for k, v in variables.items())
    if size > MAX_ENVIRONMENT_BYTES:
        raise invalid(
            "Lambda was unable to configure your environment variables because the environment "
            f"variables you have provided exceeded the 4KB limit. String measured: {size} bytes"
        )
    return dict(variables)


def unpack_zip(encoded: str, into: Path) -> tuple[str, int]:
    """Unpack a base64 zip (CreateFunction's ``Code.ZipFile``) into ``into``; return its
    CodeSha256 (base64 of the SHA-256, as Lambda reports it) and size in bytes."""
    try:
        data = base64.b64decode(encoded, validate=True)
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except (ValueError, zipfile.BadZipFile) as exc:
        raise invalid(
            "Could not unzip uploaded file. Please check your file, then try to upload again."
        ) from exc
    if sum(member.file_size for member in members) > MAX_UNZIPPED_BYTES:
        raise invalid(f"Unzipped size must be smaller than {MAX_UNZIPPED_BYTES} bytes")
    into.mkdir(parents=True, mode=0o700)
    # extractall drops absolute paths and '..' from member names, so nothing lands outside.
    archive.extractall(into)
    return base64.b64encode(hashlib.sha256(data).digest()).decode(), len(data)
