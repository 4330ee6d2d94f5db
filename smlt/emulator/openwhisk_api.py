"""The subset of the OpenWhisk REST API (apache/openwhisk docs/rest_api.md) that deploys, invokes
and cleans up actions.

======  ===================================================================  ====================
method  path                                                                 what
======  ===================================================================  ====================
GET     /api/v1/namespaces                                                   the key's namespace
GET     /api/v1/namespaces/{ns}/actions?limit=&skip=                         list actions
PUT     /api/v1/namespaces/{ns}/actions/{name}?overwrite=true                create or update
GET     /api/v1/namespaces/{ns}/actions/{name}?code=false                    get
DELETE  /api/v1/namespaces/{ns}/actions/{name}                               delete
POST    /api/v1/namespaces/{ns}/actions/{name}?blocking=true&result=true     invoke
GET     /api/v1/namespaces/{ns}/activations/{id}[/result|/logs]              an activation
======  ===================================================================  ====================

Every request needs HTTP basic auth with the ``UUID:KEY`` the emulator was started with (401
otherwise); ``{ns}`` is ``_`` or the emulator's namespace (``guest`` unless told; 403 for
another). Errors are ``{"error": ..., "code": <transaction id>}``.

An invocation is refused with 429 ("Too many concurrent requests in flight") when
``max_concurrency`` activations are running. A non-blocking one answers 202 with its
``activationId`` at once; a blocking one waits up to ``blocking_window_s`` (OpenWhisk's 60 s;
``?timeout=MS`` asks for less), then answers like OpenWhisk: 200 with the activation (or only
its result, ``result=true``) on success, 502 for an application or developer error, 500 for an
internal one, or 202 with the ``activationId`` if the window passed first. The record can be
read from ``/activations/{id}`` once the activation has ended (404 before). Every answer to an
invoke has the ``x-openwhisk-activation-id`` header.

Actions are ``blackbox`` (``exec.image``, and optionally ``exec.code`` as OpenWhisk's Python
runtime images take it; without code, see :mod:`smlt.emulator.config` for the handler an image
runs) or ``python:3`` with inline code (``exec.code``, run as OpenWhisk's Python runtime runs it:
``main(params)`` or the function ``exec.main`` names). A container gets ``__OW_API_HOST``,
``__OW_NAMESPACE``, ``__OW_ACTION_NAME`` and ``__OW_ACTION_VERSION``; each activation sets
``__OW_ACTIVATION_ID``, ``__OW_TRANSACTION_ID`` and ``__OW_DEADLINE`` (ms since the epoch), and
``__OW_API_KEY`` only for actions annotated ``provide-api-key: true`` (``wsk`` sets it false by
default, and a worker has no use for the key). Packages, sequences, triggers and rules are not
emulated.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from smlt.emulator.config import EmulatorConfig
from smlt.emulator.containers import ContainerPool, ContainerSpec, Outcome
from smlt.emulator.messages import Request, Response, new_id, path_segment
from smlt.emulator.openwhisk_model import (
    DEFAULT_LIMITS,
    MAX_PAYLOAD_BYTES,
    Action,
    activation_record,
    http_status,
)
from smlt.errors import ThrottledError

__all__ = ["OpenWhiskApi"]

logger = logging.getLogger("smlt.emulator")

PATH_PREFIX = "/api/v1/"
_ACTIONS = "/api/v1/namespaces/(?P<ns>[^/]+)/actions"
_ACTIVATION = "/api/v1/namespaces/(?P<ns>[^/]+)/activations/(?P<id>[^/]+)"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (method, re.compile(f"^{path}/?$"), operation)
    for method, path, operation in [
        ("GET", "/api/v1/namespaces", "namespaces"),
        ("GET", _ACTIONS, "list"),
        ("PUT", f"{_ACTIONS}/(?P<name>[^/]+)", "put"),
        ("GET", f"{_ACTIONS}/(?P<name>[^/]+)", "get"),
        ("DELETE", f"{_ACTIONS}/(?P<name>[^/]+)", "delete"),
        ("POST", f"{_ACTIONS}/(?P<name>[^/]+)", "invoke"),
        ("GET", _ACTIVATION, "activation"),
        ("GET", f"{_ACTIVATION}/result", "activation_result"),
        ("GET", f"{_ACTIVATION}/logs", "activation_logs"),
    ]
]
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_@.\- ]{0,255}$")
_ACTIVATION_ID = re.compile(r"^[0-9a-f]{32}$")
_PYTHON_KINDS = re.compile(r"^python:(3(\.\d+)?|default)$")
#: Finished activations kept for GET; older ones are forgotten first.
_MAX_ACTIVATIONS = 10_000


class OpenWhiskError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class OpenWhiskApi:
    """One namespace's actions and activations; see the module docstring."""

    def __init__(
        self,
        config: EmulatorConfig,
        auth: str,
        pool: ContainerPool,
        workdir: Path,
        api_host: Callable[[], str],
    ) -> None:
        self._config = config
        self._auth = auth.encode()
        self._pool = pool
        self._workdir = workdir
        self._api_host = api_host
        self._namespace = config.openwhisk_namespace
        self._lock = threading.Lock()
        self._actions: dict[str, Action] = {}
        self._activations: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._threads: set[threading.Thread] = set()
        self._counts = {"activations": 0, "throttled": 0, "billed_ms": 0}

    # -- the boundary ------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        transaction = new_id()
        try:
            self._authenticate(request)
            for method, pattern, operation in _ROUTES:
                match = pattern.match(request.path)
                if match and method == request.method:
                    args = {k: path_segment(v) for k, v in match.groupdict().items()}
                    if "ns" in args:
                        self._check_namespace(args.pop("ns"))
                    handler: Callable[..., Response] = getattr(self, f"_{operation}")
                    return handler(request, **args)
            raise OpenWhiskError(404, "The requested resource does not exist.")
        except OpenWhiskError as exc:
            return Response.json(exc.status, {"error": exc.message, "code": transaction})

    def _authenticate(self, request: Request) -> None:
        header = request.header("authorization") or ""
        if not header.startswith("Basic "):
            raise OpenWhiskError(
                401,
                "The resource requires authentication, which was not supplied with the request.",
            )
        try:
            given = base64.b64decode(header[6:].strip(), validate=True)
        except (ValueError, binascii.Error):
            given = b""
        if not hmac.compare_digest(given, self._auth):
            raise OpenWhiskError(401, "The supplied authentication is invalid.")

    def _check_namespace(self, namespace: str) -> None:
        if namespace not in ("_", self._namespace):
            raise OpenWhiskError(
                403, f"The supplied authentication is not authorized to access '{namespace}'."
            )

    @staticmethod
    def _body(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(request.body) if request.body.strip() else {}
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise OpenWhiskError(400, "The request content was malformed:\nexpected a JSON object")
        return body

    def _action(self, name: str) -> Action:
        action = self._actions.get(name)
        if action is None:
            raise OpenWhiskError(404, "The requested resource does not exist.")
        return action

    # -- actions -----------------------------------------------------------------------------

    def _namespaces(self, request: Request) -> Response:
        return Response.json(200, [self._namespace])

    def _list(self, request: Request) -> Response:
        limit, skip = request.query_value("limit") or "30", request.query_value("skip") or "0"
        if not limit.isdigit() or not 0 <= int(limit) <= 200:
            raise OpenWhiskError(
                400, f"The value '{limit}' is not in the range of 0 to 200 for actions."
            )
        if not skip.isdigit():
            raise OpenWhiskError(
                400, f"The value '{skip}' is not greater than or equal to 0 for actions."
            )
        with self._lock:
            actions = sorted(self._actions.values(), key=lambda a: -a.updated_ms)
        page = actions[int(skip) :][: int(limit) or 200]
        return Response.json(200, [action.summary() for action in page])

    def _get(self, request: Request, name: str) -> Response:
        code = request.query_value("code") != "false"
        with self._lock:
            return Response.json(200, self._action(name).to_json(code=code))

    def _delete(self, request: Request, name: str) -> Response:
        with self._lock:
            action = self._action(name)
            del self._actions[name]
        self._pool.retire(name)
        return Response.json(200, action.to_json())

    def _put(self, request: Request, name: str) -> Response:
        if not _NAME.match(name):
            raise OpenWhiskError(400, "The name of the entity contains illegal characters.")
        overwrite = request.query_value("overwrite") == "true"
        body = self._body(request)
        with self._lock:
            existing = self._actions.get(name)
        if existing is not None and not overwrite:
            raise OpenWhiskError(409, "resource already exists")
        exec_ = body.get("exec") or (existing.exec if existing else None)
        if not isinstance(exec_, dict):
            raise OpenWhiskError(400, "The request content was malformed:\nexec undefined")
        limits = self._limits(
            {**(existing.limits if existing else DEFAULT_LIMITS), **(body.get("limits") or {})}
        )
        folder = self._workdir / "openwhisk" / f"{name}-{uuid.uuid4().hex[:12]}"
        handler = self._install(exec_, folder)
        annotations = [
            a
            for a in body.get("annotations", existing.annotations if existing else [])
            if a.get("key") != "exec"
        ]
        annotations.append({"key": "exec", "value": exec_["kind"]})
        action = Action(
            namespace=self._namespace,
            name=name,
            exec=dict(exec_),
            limits=limits,
            handler=handler,
            code_dir=folder,
            revision=uuid.uuid4().hex,
            version=_next_version(existing.version) if existing else "0.0.1",
            parameters=list(body.get("parameters", existing.parameters if existing else [])),
            annotations=annotations,
            publish=bool(body.get("publish", False)),
            updated_ms=int(time.time() * 1000),
        )
        with self._lock:
            self._actions[name] = action
        return Response.json(200, action.to_json())

    def _limits(self, limits: Mapping[str, Any]) -> dict[str, int]:
        bounds = {
            "timeout": (100, self._config.openwhisk_max_timeout_ms, "milliseconds"),
            "memory": (128, self._config.openwhisk_max_memory_mb, "MB"),
            "logs": (0, 10, "MB"),
            "concurrency": (1, 1, "activations"),
        }
        checked = {}
        for key, (low, high, unit) in bounds.items():
            value = limits.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise OpenWhiskError(
                    400,
                    "The request content was malformed:\nrequirement failed: "
                    f"{key} {value} {unit} is not in the allowed range [{low}, {high}] {unit}",
                )
            checked[key] = value
        return checked

    def _install(self, exec_: Mapping[str, Any], folder: Path) -> str:
        """Put the action's code in ``folder``; return the handler its containers run.

        Inline code (``python:3``, or a ``blackbox`` image given ``exec.code``, which is how
        OpenWhisk's Python runtime images take their code) runs as ``main__.py``'s ``main`` (or
        the function ``exec.main`` names); a ``blackbox`` image without code runs the handler
        the emulator maps the image to (see :mod:`smlt.emulator.config`)."""
        kind = exec_.get("kind")
        code = exec_.get("code")
        if kind == "blackbox":
            image = exec_.get("image")
            if not isinstance(image, str) or not image:
                raise OpenWhiskError(400, "The request content was malformed:\nimage undefined")
            if code is None:
                folder.mkdir(parents=True, mode=0o700)
                untagged = image.split("@")[0]
                if ":" in untagged.rpartition("/")[2]:
                    untagged = untagged.rpartition(":")[0]
                mapped = self._config.image_handlers
                return mapped.get(image) or mapped.get(untagged) or self._config.openwhisk_handler
        elif not (isinstance(kind, str) and _PYTHON_KINDS.match(kind)):
            raise OpenWhiskError(
                400,
                f"The specified runtime '{kind}' is not supported by this platform. Valid "
                "values are: 'blackbox', 'python:3'.",
            )
        if exec_.get("binary") or not isinstance(code, str):
            raise OpenWhiskError(
                400,
                "The request content was malformed:\nthe emulator takes an action's code "
                "inline (exec.code as text, binary false)",
            )
        main = str(exec_.get("main") or "main")
        if not re.fullmatch(r"[A-Za-z_]\w*", main):
            raise OpenWhiskError(400, f"The request content was malformed:\nbad main {main!r}")
        folder.mkdir(parents=True, mode=0o700)
        (folder / "main__.py").write_text(code)
        return f"main__:{main}"

    # -- invoking ----------------------------------------------------------------------------

    def _spec(self, action: Action) -> ContainerSpec:
        environment = {
            "__OW_API_HOST": self._api_host(),
            "__OW_NAMESPACE": action.namespace,
            "__OW_ACTION_NAME": f"/{action.namespace}/{action.name}",
            "__OW_ACTION_VERSION": action.version,
        }
        return ContainerSpec(
            platform="openwhisk",
            function=action.name,
            revision=action.revision,
            handler=action.handler,
            memory_mb=action.limits["memory"],
            code_dir=action.code_dir,
            environment=environment,
        )

    def _invoke(self, request: Request, name: str) -> Response:
        if len(request.body) > MAX_PAYLOAD_BYTES:
            raise OpenWhiskError(
                413,
                f"Request larger than allowed: {len(request.body)} > {MAX_PAYLOAD_BYTES} bytes.",
            )
        params = self._body(request)
        with self._lock:
            action = self._action(name)
        merged = {p["key"]: p.get("value") for p in action.parameters if "key" in p}
        merged.update(params)
        limit = self._config.max_concurrency

        def admit(busy: Mapping[str, int], total: int) -> None:
            if total >= limit:
                raise ThrottledError(
                    "Too many concurrent requests in flight "
                    f"(count: {total + 1}, allowed: {limit})."
                )

        received_ms = int(time.time() * 1000)
        try:
            lease = self._pool.acquire(self._spec(action), admit)
        except ThrottledError as exc:
            with self._lock:
                self._counts["throttled"] += 1
            raise OpenWhiskError(429, str(exc)) from None
        activation_id = new_id()
        done = threading.Event()
        env = {"__OW_ACTIVATION_ID": activation_id, "__OW_TRANSACTION_ID": new_id()}
        if action.annotation("provide-api-key") is True:
            env["__OW_API_KEY"] = self._auth.decode()
        thread = threading.Thread(
            target=self._activate,
            args=(
                action,
                lease,
                activation_id,
                {"env": env},
                json.dumps(merged).encode(),
                received_ms,
                done,
            ),
            name=f"openwhisk-activation-{activation_id[:8]}",
            daemon=True,
        )
        with self._lock:
            self._threads.add(thread)
        thread.start()
        headers = {"x-openwhisk-activation-id": activation_id}
        accepted = Response.json(202, {"activationId": activation_id}, headers)
        if request.query_value("blocking") != "true":
            return accepted
        if not done.wait(self._blocking_wait_s(request)):
            return accepted
        with self._lock:
            record = self._activations.get(activation_id)
        if record is None:  # the activation thread failed: a bug, reported as OpenWhisk would
            raise OpenWhiskError(500, "There was an error processing your request.")
        body = record["response"]["result"] if request.query_value("result") == "true" else record
        return Response.json(http_status(record), body, headers)

    def _blocking_wait_s(self, request: Request) -> float:
        """How long a blocking invoke waits: ``?timeout=MS`` (up to the window) or the window."""
        window_s = self._config.blocking_window_s
        text = request.query_value("timeout")
        if text is None:
            return window_s
        if not text.isdigit() or not 0 < int(text) <= window_s * 1000:
            raise OpenWhiskError(
                400, f"Timeout must be number of milliseconds up to {round(window_s * 1000)}."
            )
        return int(text) / 1000

    def _activate(
        self,
        action: Action,
        lease: Any,
        activation_id: str,
        header: dict[str, Any],
        payload: bytes,
        received_ms: int,
        done: threading.Event,
    ) -> None:
        start_ms = int(time.time() * 1000)
        timeout_s = action.limits["timeout"] / 1000
        try:
            with lease:
                outcome: Outcome = lease.invoke(
                    header,
                    payload,
                    timeout_s=timeout_s,
                    init_grace_s=timeout_s,
                    init_overflows=False,
                )
            end_ms = int(time.time() * 1000)
            logger.info(
                "openwhisk %s %s: %s in %d ms%s", action.name, activation_id, outcome.status,
                end_ms - start_ms, " after a cold start" if outcome.init_ms is not None else "",
            )  # fmt: skip
            record = activation_record(
                action,
                activation_id,
                outcome,
                start_ms=start_ms,
                end_ms=end_ms,
                wait_ms=start_ms - received_ms,
            )
            with self._lock:
                self._activations[activation_id] = record
                while len(self._activations) > _MAX_ACTIVATIONS:
                    self._activations.popitem(last=False)
                self._counts["activations"] += 1
                self._counts["billed_ms"] += record["duration"]
        finally:
            done.set()
            with self._lock:
                self._threads.discard(threading.current_thread())

    # -- activations -------------------------------------------------------------------------

    def _record(self, activation_id: str) -> dict[str, Any]:
        if not _ACTIVATION_ID.match(activation_id):
            raise OpenWhiskError(400, "The activation id is not valid.")
        with self._lock:
            record = self._activations.get(activation_id)
        if record is None:
            raise OpenWhiskError(404, "The requested resource does not exist.")
        return record

    def _activation(self, request: Request, id: str) -> Response:
        return Response.json(200, self._record(id))

    def _activation_result(self, request: Request, id: str) -> Response:
        return Response.json(200, self._record(id)["response"])

    def _activation_logs(self, request: Request, id: str) -> Response:
        return Response.json(200, {"logs": self._record(id)["logs"]})

    def statistics(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def join(self, timeout_s: float = 5.0) -> None:
        """Wait for running activations to end (the pool kills their containers on close)."""
        with self._lock:
            threads = list(self._threads)
        deadline = time.monotonic() + timeout_s
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def _next_version(version: str) -> str:
    major, minor, patch = (int(part) for part in version.split("."))
    return f"{major}.{minor}.{patch + 1}"
