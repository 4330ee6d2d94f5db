"""The subset of the AWS Lambda API that boto3 uses to deploy, invoke and clean up functions.

========  =======================================================  ==========================
method    path                                                     operation
========  =======================================================  ==========================
POST      /2015-03-31/functions                                    CreateFunction (201)
GET       /2015-03-31/functions/                                   ListFunctions
GET       /2015-03-31/functions/{name}                             GetFunction
DELETE    /2015-03-31/functions/{name}                             DeleteFunction (204)
GET       /2015-03-31/functions/{name}/configuration               GetFunctionConfiguration
PUT       /2015-03-31/functions/{name}/configuration               UpdateFunctionConfiguration
PUT       /2015-03-31/functions/{name}/code                        UpdateFunctionCode
POST      /2015-03-31/functions/{name}/invocations                 Invoke (200, 202, 204)
POST      /2017-03-31/tags/{arn}                                   TagResource (204)
GET       /2017-03-31/tags/{arn}                                   ListTags
DELETE    /2017-03-31/tags/{arn}?tagKeys=...                       UntagResource (204)
GET       /2016-08-19/account-settings/                            GetAccountSettings
PUT       /2017-10-31/functions/{name}/concurrency                 PutFunctionConcurrency
DELETE    /2017-10-31/functions/{name}/concurrency                 DeleteFunctionConcurrency
GET       /2019-09-30/functions/{name}/concurrency                 GetFunctionConcurrency
PUT/GET/  /2019-09-25/functions/{name}/event-invoke-config         Put/Get/Delete
DELETE                                                             FunctionEventInvokeConfig
========  =======================================================  ==========================

``{name}`` is a name, an ARN or a partial ARN, optionally with ``:$LATEST``; the emulator has no
published versions or aliases, so any other qualifier is not found. Errors carry their code in
``x-amzn-ErrorType`` (``ResourceNotFoundException`` 404, ``ResourceConflictException`` 409,
``TooManyRequestsException`` 429 with a ``Reason``, ...), which is where boto3 reads it.

**Credentials.** boto3 signs every request with SigV4. The emulator reads the access key id from
the ``Authorization`` header's ``Credential=`` and accepts only the one it was started with
(``UnrecognizedClientException``, 403, otherwise); it does not verify the signature, so the key
id is the secret here, and the region is the one the request was signed for. Functions live per
region, as on AWS. Code comes as ``Code.ZipFile`` (unpacked, imported first) or
``Code.ImageUri`` (see :mod:`smlt.emulator.config` for which handler an image runs); code in S3
is refused with a message that says so.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from smlt.emulator import lambda_settings
from smlt.emulator.config import AwsCredentials, EmulatorConfig
from smlt.emulator.containers import Admit, ContainerPool, Outcome
from smlt.emulator.lambda_deploy import apply_code, apply_configuration, version_of
from smlt.emulator.lambda_invoke import (
    MAX_ASYNC_PAYLOAD_BYTES,
    MAX_SYNC_PAYLOAD_BYTES,
    EventQueue,
    billed_ms,
    invocation_response,
)
from smlt.emulator.lambda_model import (
    FunctionTable,
    LambdaError,
    LambdaFunction,
    Version,
    function_arn,
    invalid,
    json_body,
    parse_reference,
    validation,
)
from smlt.emulator.messages import Request, Response, path_segment
from smlt.errors import ThrottledError

__all__ = ["PATH_PREFIXES", "LambdaApi"]

logger = logging.getLogger("smlt.emulator")

_CREDENTIAL = re.compile(r"Credential=([^/\s,]+)/(\d{8})/([^/\s,]+)/([^/\s,]+)/aws4_request")
_FUNCTION = r"/(?P<ref>[^/]+)"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (method, re.compile(f"^{path}/?$"), operation)
    for method, path, operation in [
        ("POST", "/2015-03-31/functions", "create"),
        ("GET", "/2015-03-31/functions", "list"),
        ("GET", f"/2015-03-31/functions{_FUNCTION}", "get"),
        ("DELETE", f"/2015-03-31/functions{_FUNCTION}", "delete"),
        ("GET", f"/2015-03-31/functions{_FUNCTION}/configuration", "get_configuration"),
        ("PUT", f"/2015-03-31/functions{_FUNCTION}/configuration", "update_configuration"),
        ("PUT", f"/2015-03-31/functions{_FUNCTION}/code", "update_code"),
        ("POST", f"/2015-03-31/functions{_FUNCTION}/invocations", "invoke"),
        ("POST", "/2017-03-31/tags/(?P<arn>[^/]+)", "tag"),
        ("GET", "/2017-03-31/tags/(?P<arn>[^/]+)", "list_tags"),
        ("DELETE", "/2017-03-31/tags/(?P<arn>[^/]+)", "untag"),
        ("GET", "/2016-08-19/account-settings", "account_settings"),
        ("PUT", f"/2017-10-31/functions{_FUNCTION}/concurrency", "put_concurrency"),
        ("DELETE", f"/2017-10-31/functions{_FUNCTION}/concurrency", "delete_concurrency"),
        ("GET", f"/2019-09-30/functions{_FUNCTION}/concurrency", "get_concurrency"),
        ("PUT", f"/2019-09-25/functions{_FUNCTION}/event-invoke-config", "put_event_config"),
        ("GET", f"/2019-09-25/functions{_FUNCTION}/event-invoke-config", "get_event_config"),
        ("DELETE", f"/2019-09-25/functions{_FUNCTION}/event-invoke-config", "delete_event_config"),
    ]
]
PATH_PREFIXES = ("/2015-03-31/", "/2017-03-31/", "/2016-08-19/", "/2017-10-31/", "/2019-09-")


class LambdaApi:
    """Lambda's functions, per region, and their invocations; see the module docstring."""

    def __init__(
        self,
        config: EmulatorConfig,
        credentials: AwsCredentials,
        pool: ContainerPool,
        workdir: Path,
    ) -> None:
        self._config = config
        self._key_id = credentials.access_key_id.encode()
        self._pool = pool
        self._workdir = workdir
        self._table = FunctionTable()
        self._counts_lock = threading.Lock()
        self._counts = {"invocations": 0, "throttled": 0, "billed_ms": 0}
        self._events = EventQueue(
            pool,
            retry_delays_s=config.event_retry_delays_s,
            init_grace_s=config.lambda_init_timeout_s,
            on_outcome=self._count_outcome,
        )

    # -- the boundary ------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        request_id = str(uuid.uuid4())
        try:
            region = self._authenticate(request)
            for method, pattern, operation in _ROUTES:
                match = pattern.match(request.path)
                if match and method == request.method:
                    args = {k: path_segment(v) for k, v in match.groupdict().items()}
                    return self._operation(operation)(request, region, **args)
            raise LambdaError(404, "UnknownOperationException", "Unknown operation")
        except LambdaError as exc:
            return exc.response(request_id)

    def _operation(self, name: str) -> Callable[..., Response]:
        settings = lambda_settings.OPERATIONS.get(name)
        if settings is not None:
            return partial(settings, self._table, self._config)
        handler: Callable[..., Response] = getattr(self, f"_{name}")
        return handler

    def _authenticate(self, request: Request) -> str:
        """The region the request was signed for, if it was signed with our key id."""
        header = request.header("authorization")
        if not header:
            raise LambdaError(
                403, "MissingAuthenticationTokenException", "Missing Authentication Token"
            )
        match = _CREDENTIAL.search(header)
        if not header.startswith("AWS4-HMAC-SHA256 ") or not match:
            raise LambdaError(
                403,
                "IncompleteSignatureException",
                "Authorization header requires 'Credential' parameter.",
            )
        if not hmac.compare_digest(match[1].encode(), self._key_id):
            raise LambdaError(
                403,
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            )
        return match[3]

    def _code_folder(self, function: LambdaFunction) -> Path:
        return self._workdir / "lambda" / f"{function.name}-{uuid.uuid4().hex[:12]}"

    def _version(self, function: LambdaFunction) -> Version:
        return version_of(function, self._config)

    # -- deploying ---------------------------------------------------------------------------

    def _create(self, request: Request, region: str) -> Response:
        body = json_body(request)
        region, name = parse_reference(str(body.get("FunctionName", "")), region)
        role = body.get("Role")
        if not isinstance(role, str) or not role:
            raise validation(role, "role", "Member must not be null")
        package_type = body.get("PackageType", "Zip")
        if package_type not in ("Zip", "Image"):
            raise validation(
                package_type, "packageType", "Member must satisfy enum value set: [Zip, Image]"
            )
        conflict = LambdaError(409, "ResourceConflictException", f"Function already exist: {name}")
        with self._table.lock:
            if (region, name) in self._table:
                raise conflict
        function = LambdaFunction(region, name, role, package_type)
        apply_configuration(function, body)
        apply_code(function, body.get("Code") or {}, self._code_folder(function))
        tags = body.get("Tags") or {}
        if not isinstance(tags, dict):
            raise invalid("Tags must be a map of strings")
        function.tags = {str(k): str(v) for k, v in tags.items()}
        with self._table.lock:
            if (region, name) in self._table:  # created meanwhile by another request
                raise conflict
            function.changed(self._version, self._config.update_delay_s)
            self._table.add(function)
            return Response.json(201, function.configuration())

    def _update(
        self,
        request: Request,
        region: str,
        ref: str,
        change: Callable[[LambdaFunction, dict[str, Any]], bool],
    ) -> Response:
        body = json_body(request)
        region, name = parse_reference(ref, region)
        with self._table.lock:
            function = self._table.get(region, name)
            if function.pending is not None:
                raise LambdaError(
                    409,
                    "ResourceConflictException",
                    "The operation cannot be performed at this time. An update is in progress "
                    f"for resource: {function.arn}",
                )
            if "RevisionId" in body and body["RevisionId"] != function.revision_id:
                raise LambdaError(
                    412,
                    "PreconditionFailedException",
                    "The Revision Id provided does not match the latest Revision Id. Call the "
                    "GetFunction/GetAlias API to retrieve the latest Revision Id",
                )
            if change(function, body):
                function.changed(self._version, self._config.update_delay_s)
            return Response.json(200, function.configuration())

    def _update_configuration(self, request: Request, region: str, ref: str) -> Response:
        def change(function: LambdaFunction, body: dict[str, Any]) -> bool:
            apply_configuration(function, body)
            return True

        return self._update(request, region, ref, change)

    def _update_code(self, request: Request, region: str, ref: str) -> Response:
        def change(function: LambdaFunction, body: dict[str, Any]) -> bool:
            if body.get("DryRun"):  # check the code, change nothing
                probe = LambdaFunction(function.region, function.name, "", function.package_type)
                apply_code(probe, body, self._code_folder(function))
                return False
            apply_code(function, body, self._code_folder(function))
            return True

        return self._update(request, region, ref, change)

    def _delete(self, request: Request, region: str, ref: str) -> Response:
        region, name = parse_reference(ref, region, request.query_value("Qualifier"))
        with self._table.lock:
            function = self._table.remove(region, name)
        self._pool.retire(function.key)
        return Response(204)

    # -- reading -----------------------------------------------------------------------------

    def _get(self, request: Request, region: str, ref: str) -> Response:
        region, name = parse_reference(ref, region, request.query_value("Qualifier"))
        with self._table.lock:
            function = self._table.get(region, name)
            answer: dict[str, Any] = {
                "Configuration": function.configuration(),
                "Code": function.code_location(),
            }
            if function.tags:
                answer["Tags"] = dict(function.tags)
            if function.reserved_concurrency is not None:
                reserved = function.reserved_concurrency
                answer["Concurrency"] = {"ReservedConcurrentExecutions": reserved}
            return Response.json(200, answer)

    def _get_configuration(self, request: Request, region: str, ref: str) -> Response:
        region, name = parse_reference(ref, region, request.query_value("Qualifier"))
        with self._table.lock:
            return Response.json(200, self._table.get(region, name).configuration())

    def _list(self, request: Request, region: str) -> Response:
        marker = request.query_value("Marker") or "0"
        max_items = request.query_value("MaxItems") or "50"
        if not marker.isdigit():
            raise invalid(f"Invalid Marker {marker!r}")
        if not max_items.isdigit() or not 1 <= int(max_items) <= 10_000:
            raise validation(max_items, "maxItems", "Member must have value between 1 and 10000")
        start, count = int(marker), int(max_items)
        with self._table.lock:
            functions = self._table.in_region(region)
            page = [f.configuration() for f in functions[start : start + count]]
        answer: dict[str, Any] = {"Functions": page}
        if start + count < len(functions):
            answer["NextMarker"] = str(start + count)
        return Response.json(200, answer)

    # -- invoking ----------------------------------------------------------------------------

    def _admission(self, key: str) -> Admit:
        """Lambda's rule, on a snapshot of the reservations: a function with reserved
        concurrency runs at most that many at once; the others share what is not reserved."""
        with self._table.lock:
            reserved = {
                f.key: f.reserved_concurrency
                for f in self._table.all()
                if f.reserved_concurrency is not None
            }
        limit = self._config.max_concurrency

        def admit(busy: Mapping[str, int], total: int) -> None:
            own = reserved.get(key)
            if own is not None:
                if busy.get(key, 0) >= own:
                    raise ThrottledError("ReservedFunctionConcurrentInvocationLimitExceeded")
                return
            shared_busy = total - sum(busy.get(k, 0) for k in reserved)
            if shared_busy >= limit - sum(reserved.values()):
                raise ThrottledError("ConcurrentInvocationLimitExceeded")

        return admit

    def _runnable(self, region: str, name: str) -> tuple[Version, Mapping[str, Any]]:
        with self._table.lock:
            function = self._table.get(region, name)
            if function.live is None:
                raise LambdaError(
                    409,
                    "ResourceConflictException",
                    "The operation cannot be performed at this time. The function is currently "
                    f"in the following state: {function.state}",
                )
            return function.live, dict(function.event_config or {})

    def _invoke(self, request: Request, region: str, ref: str) -> Response:
        region, name = parse_reference(ref, region, request.query_value("Qualifier"))
        kind = request.header("x-amz-invocation-type") or "RequestResponse"
        if kind not in ("RequestResponse", "Event", "DryRun"):
            raise invalid(f"Unsupported invocation type {kind!r}")
        payload = request.body or b"{}"
        limit = MAX_ASYNC_PAYLOAD_BYTES if kind == "Event" else MAX_SYNC_PAYLOAD_BYTES
        if len(payload) > limit:
            operation = "InvokeAsync" if kind == "Event" else "InvokeFunction"
            raise LambdaError(
                413,
                "RequestTooLargeException",
                f"Request must be smaller than {limit} bytes for the {operation} operation",
            )
        try:
            json.loads(payload)
        except ValueError:
            raise LambdaError(
                400, "InvalidRequestContentException", "Could not parse request body into json"
            ) from None
        version, _ = self._runnable(region, name)
        if kind == "DryRun":
            return Response(204)
        request_id = str(uuid.uuid4())
        header = {
            "request_id": request_id,
            "function_name": name,
            "invoked_function_arn": function_arn(region, name),
            "memory_mb": version.spec.memory_mb,
            "log_stream_name": f"{time.strftime('%Y/%m/%d')}/[$LATEST]{uuid.uuid4().hex}",
            "client_context": self._client_context(request),
        }
        key = version.spec.function
        if kind == "Event":

            def lookup() -> tuple[Version, Admit, Mapping[str, Any]] | None:
                try:
                    current, config = self._runnable(region, name)
                except LambdaError:
                    return None
                return current, self._admission(key), config

            self._events.submit(lookup, header, payload)
            return Response(202, b"", {"x-amzn-RequestId": request_id})
        try:
            lease = self._pool.acquire(version.spec, self._admission(key))
        except ThrottledError as exc:
            with self._counts_lock:
                self._counts["throttled"] += 1
            raise LambdaError(
                429, "TooManyRequestsException", "Rate Exceeded.", Reason=str(exc)
            ) from None
        with lease:
            outcome = lease.invoke(
                header,
                payload,
                timeout_s=version.timeout_s,
                init_grace_s=self._config.lambda_init_timeout_s,
                init_overflows=True,
            )
        self._count_outcome(outcome)
        logger.info(
            "lambda %s %s: %s in %.0f ms%s", name, request_id, outcome.status,
            outcome.duration_ms, " after a cold start" if outcome.init_ms is not None else "",
        )  # fmt: skip
        if outcome.status == "provision":
            raise LambdaError(500, "ServiceException", "The emulator could not start a container")
        tail = (request.header("x-amz-log-type") or "None") == "Tail"
        return invocation_response(outcome, version, request_id, tail=tail)

    @staticmethod
    def _client_context(request: Request) -> dict[str, Any] | None:
        raw = request.header("x-amz-client-context")
        if not raw:
            return None
        try:
            value = json.loads(base64.b64decode(raw, validate=True))
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise LambdaError(
                400,
                "InvalidRequestContentException",
                "Client context must be a valid Base64-encoded JSON object.",
            )
        return value

    def _count_outcome(self, outcome: Outcome) -> None:
        with self._counts_lock:
            self._counts["invocations"] += 1
            self._counts["billed_ms"] += billed_ms(outcome)

    def statistics(self) -> dict[str, int]:
        with self._counts_lock:
            return dict(self._counts)

    def stop(self) -> None:
        self._events.stop()

    def join(self, timeout_s: float = 5.0) -> None:
        self._events.join(timeout_s)
