"""The Apache OpenWhisk backend: each worker is one activation of an action smlt creates per job.

It speaks OpenWhisk's REST API (apache/openwhisk docs/rest_api.md) through ``httpx.AsyncClient``
(httpx runs on trio natively, so no thread is needed), with the namespace's ``uuid:key`` as HTTP
Basic credentials and TLS verified by default. A trio run has a few clients, each pooling at most
:data:`POOL_CONNECTIONS` connections, and a rank always uses the same one (see there why).

**Actions** (:mod:`smlt.backends.serverless` says which and when): ``PUT
.../actions/NAME?overwrite=true`` with a ``blackbox`` exec (the worker's Docker image, the
Python runtime's ``main`` injected as code), ``limits`` {``memory`` MB, ``timeout`` ms} and
``annotations`` naming it smlt's (:mod:`smlt.backends.managed`). An action of the same name
without them is refused, never overwritten. OpenWhisk applies a PUT at once: there is nothing
to wait for.

**Invocations.** ``POST .../actions/NAME?blocking=true`` answers with the activation record
when the action ends within the blocking window (60 s, OpenWhisk's maximum), else 202 with the
activation id, whose record is then polled (``GET .../activations/ID``: 404 until it exists),
with growing pauses and bounded by the action's time limit plus ``record_grace_s``. Training
invocations run minutes, so most go the second way; the blocking call still answers short
ones (and every failure to start) without a poll. HTTP 429 is retried by
:mod:`smlt.backends.retry`; everything else is translated by
:mod:`smlt.backends.openwhisk.errors`.
"""

from __future__ import annotations

import json
import math
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import trio

from smlt.backends.base import BackendLimits, Pricing
from smlt.backends.calls import BackgroundInvocation, CallNursery
from smlt.backends.managed import JOB_KEY, MANAGED_KEY, MANAGED_VALUE, ManagedResource
from smlt.backends.openwhisk.config import (
    DEFAULT_BLOCKING_WINDOW_S,
    MIN_MEMORY_MB,
    PAYLOAD_BYTES,
    OpenWhiskConfig,
)
from smlt.backends.openwhisk.errors import activation_outcome, http_error
from smlt.backends.retry import retry_throttled
from smlt.backends.serverless import ServerlessBackend
from smlt.errors import BackendError, ConfigError, SmltError, ThrottledError
from smlt.optimizer.cost import IBM_CLOUD_FUNCTIONS
from smlt.protocol.payload import WorkerPayload, WorkerReport

__all__ = ["OpenWhiskBackend", "OpenWhiskInvocation"]

#: How long an API call other than a blocking invoke may take.
_CALL_TIMEOUT_S = 30.0
_CONNECT_TIMEOUT_S = 10.0
#: A blocking invoke's answer may come this long after the blocking window closed.
_BLOCKING_MARGIN_S = 30.0
#: Pauses between polls of an activation record: from the first to the longest.
_POLL_FIRST_S = 0.05
_POLL_MAX_S = 2.0
#: Actions listed per page (OpenWhisk's maximum ``limit``).
_PAGE = 200
#: Connections one httpx client pools; a run's ``max_concurrency`` seats are spread over as many
#: clients as it takes. httpcore's pool, whenever it assigns a request, counts all of its
#: connections once for every idle one (quadratic in its size): through one client of 100 warm
#: connections a 100-worker fan-out took 2 to 3 s, against 0.46 s from threads
#: (benchmarks/fanout.py, ``bare_async_trio_s``); through pools of 16 it takes 0.34 s.
POOL_CONNECTIONS = 16


class OpenWhiskInvocation(BackgroundInvocation):
    """One worker activation (a blocking invoke, then polls, in the backend's nursery)."""

    platform = "OpenWhisk"


@dataclass
class _Run:
    """What a trio run owns: its HTTP clients (rank r uses ``clients[r % len(clients)]``)."""

    clients: list[httpx.AsyncClient]


class OpenWhiskBackend(ServerlessBackend):
    """Workers as OpenWhisk activations; options are :class:`OpenWhiskConfig`'s fields."""

    name = "openwhisk"
    platform = "OpenWhisk"
    noun = "action"

    def __init__(self, **options: Any) -> None:
        self.config = OpenWhiskConfig.resolve(options)
        super().__init__(
            prefix=self.config.action_prefix,
            timeout_s=self.config.timeout_s or self.config.max_duration_s,
            max_concurrency=self.config.max_concurrency,
            calls=CallNursery("smlt-openwhisk-calls", self._open_run, _close_run),
        )

    # -- limits and prices -----------------------------------------------------------------------

    @property
    def limits(self) -> BackendLimits:
        return BackendLimits(
            min_memory_mb=MIN_MEMORY_MB,
            max_memory_mb=self.config.max_memory_mb,
            max_duration_s=float(self.config.max_duration_s),
            max_concurrency=self.config.max_concurrency,
            max_payload_bytes=PAYLOAD_BYTES,
        )

    @property
    def pricing(self) -> Pricing:
        return IBM_CLOUD_FUNCTIONS

    def require_deployable(self) -> None:
        self.config.require_deployable()

    # -- HTTP ------------------------------------------------------------------------------------

    def _open_run(self) -> _Run:
        config = self.config
        verify: ssl.SSLContext | bool = bool(config.verify_tls)
        if isinstance(config.verify_tls, str):  # a CA bundle
            verify = ssl.create_default_context(cafile=config.verify_tls)
        # Each pool has room beyond its ranks' seats for polls, control calls and a rank's
        # duplicate delivery.
        clients = [
            httpx.AsyncClient(
                base_url=config.base_url,
                auth=httpx.BasicAuth(*config.credentials),
                verify=verify,
                timeout=httpx.Timeout(_CALL_TIMEOUT_S, connect=_CONNECT_TIMEOUT_S),
                limits=httpx.Limits(max_connections=POOL_CONNECTIONS + 8),
                headers={"Accept": "application/json", "User-Agent": "smlt"},
            )
            for _ in range(math.ceil(config.max_concurrency / POOL_CONNECTIONS))
        ]
        return _Run(clients)

    async def _client(self, rank: int = 0) -> httpx.AsyncClient:
        """The client of this run that serves ``rank`` (control calls: rank 0's)."""
        self.config.require_connection()
        run: _Run = await self._calls.resource()
        return run.clients[rank % len(run.clients)]

    def _path(self, collection: str, name: str = "") -> str:
        namespace = quote(self.config.namespace, safe="@._-")
        path = f"/api/v1/namespaces/{namespace}/{collection}"
        return f"{path}/{quote(name, safe='')}" if name else path

    async def _request(
        self,
        method: str,
        path: str,
        where: str,
        *,
        ok: tuple[int, ...] = (200,),
        rank: int = 0,
        **kwargs: Any,
    ) -> httpx.Response:
        """One API call (for ``rank``: on its client); an answer outside ``ok`` is translated
        into the smlt error."""
        client = await self._client(rank)
        try:
            response = await client.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise BackendError(f"{where}: OpenWhisk did not answer in time ({exc!r})") from None
        except httpx.HTTPError as exc:
            raise BackendError(
                f"{where}: cannot reach OpenWhisk at {self.config.base_url}: {exc!r}"
            ) from None
        if response.status_code not in ok:
            raise http_error(
                response.status_code,
                response.text,
                where,
                retry_after=response.headers.get("Retry-After"),
            )
        return response

    # -- actions ---------------------------------------------------------------------------------

    async def _ensure_function(self, name: str, job: str, memory_mb: int, timeout_s: int) -> None:
        where = f"openwhisk: deploy {name}"
        found = await self._request("GET", self._path("actions", name), where, ok=(200, 404))
        wanted = self._action(job, memory_mb, timeout_s)
        if found.status_code == 200:
            current = _json(found, where)
            if not _is_managed(current.get("annotations")):
                raise ConfigError(
                    f"an OpenWhisk action named {name} exists and smlt did not create it (no "
                    f"{MANAGED_KEY} annotation); smlt leaves it alone: choose another "
                    "action_prefix"
                )
            if _same_action(current, wanted):
                return  # deploy is idempotent: nothing to change, no new version
        await self._request(
            "PUT",
            self._path("actions", name),
            where,
            params={"overwrite": "true"},
            json=wanted,
        )

    def _action(self, job: str, memory_mb: int, timeout_s: int) -> dict[str, Any]:
        config = self.config
        config.require_deployable()
        exec_: dict[str, Any] = {"kind": "blackbox", "image": config.image, "binary": False}
        if config.code:
            exec_.update(code=config.code, main="main")
        return {
            "exec": exec_,
            "limits": {"memory": memory_mb, "timeout": timeout_s * 1000},
            "annotations": [
                {"key": MANAGED_KEY, "value": MANAGED_VALUE},
                {"key": JOB_KEY, "value": job},
            ],
            "publish": False,
        }

    async def _delete_functions(self, names: list[str]) -> None:
        for name in names:
            await self._request(
                "DELETE",
                self._path("actions", name),
                f"openwhisk: delete {name}",
                ok=(200, 202, 204, 404),
            )

    async def remove_managed(
        self, *, older_than_s: float | None = None, dry_run: bool = False
    ) -> list[ManagedResource]:
        """Every action annotated as smlt's in the namespace (see
        :meth:`ServerlessBackend.remove_managed`)."""
        where = "openwhisk: listing smlt's actions"
        now = time.time()
        listed: list[dict[str, Any]] = []
        while True:  # the whole listing first: deleting while paging would shift the pages
            page = await self._request(
                "GET", self._path("actions"), where, params={"limit": _PAGE, "skip": len(listed)}
            )
            entries = _json(page, where)
            if not isinstance(entries, list):
                raise BackendError(f"{where}: expected a list of actions, got {entries!r}"[:300])
            fresh = [e for e in entries if isinstance(e, dict)]
            listed += fresh
            if len(entries) < _PAGE or not fresh:  # the last page (or a server gone astray)
                break
        found: list[ManagedResource] = []
        for entry in listed:
            name = str(entry.get("name", ""))
            notes = entry.get("annotations")
            if notes is None:  # a listing that leaves them out: ask for the action
                full = await self._request("GET", self._path("actions", name), where)
                notes = _json(full, where).get("annotations")
            if not _is_managed(notes):
                continue
            updated = entry.get("updated")
            modified = float(updated) / 1000 if isinstance(updated, int | float) else 0.0
            if older_than_s is not None and now - modified < older_than_s:
                continue
            if not dry_run:
                await self._delete_functions([name])
            found.append(ManagedResource(name, _annotation(notes, JOB_KEY), modified))
        return found

    # -- invoke ----------------------------------------------------------------------------------

    def _new_invocation(self, payload: WorkerPayload) -> OpenWhiskInvocation:
        return OpenWhiskInvocation(payload)

    async def _call(self, invocation: BackgroundInvocation, name: str, body: bytes) -> WorkerReport:
        rank = invocation.payload.rank
        where = f"rank {rank}: invoke {name}"
        window_s = self.config.blocking_window_s
        params = {"blocking": "true"}
        if window_s != DEFAULT_BLOCKING_WINDOW_S:
            params["timeout"] = str(int(window_s * 1000))
        timeout_s = self._functions.get(name, (0, self._timeout_s))[1]
        deadline = trio.current_time() + timeout_s + self.config.record_grace_s

        async def attempt() -> httpx.Response:
            return await self._request(
                "POST",
                self._path("actions", name),
                where,
                ok=(200, 202, 502),
                rank=rank,
                params=params,
                content=body,
                headers={"Content-Type": "application/json"},
                timeout=httpx.Timeout(window_s + _BLOCKING_MARGIN_S, connect=_CONNECT_TIMEOUT_S),
            )

        answer = await retry_throttled(
            attempt, self.config.throttle, what=where, on_retry=self._throttled
        )
        record = _json(answer, where)
        if answer.status_code == 202:
            activation = str(record.get("activationId", ""))
            if not activation:
                raise BackendError(f"{where}: 202 without an activation id: {record!r}"[:300])
            record = await self._poll(
                activation, deadline, f"{where}: activation {activation}", rank
            )
        outcome = activation_outcome(record, rank)
        invocation.set_billed_s(outcome.billed_s)
        if isinstance(outcome.outcome, SmltError):
            raise outcome.outcome
        return outcome.outcome

    async def _poll(
        self, activation: str, deadline: float, where: str, rank: int
    ) -> dict[str, Any]:
        """The activation's record, once it exists (404 until the action ended)."""
        self._counts["polled"] = self._counts.get("polled", 0) + 1
        pause_s = _POLL_FIRST_S
        path = self._path("activations", activation)
        while True:
            try:
                found = await self._request("GET", path, where, ok=(200, 404), rank=rank)
            except ThrottledError as exc:
                # A throttled poll is not the worker's failure: poll again, later.
                if trio.current_time() + pause_s > deadline:
                    raise
                await trio.sleep(max(pause_s, min(exc.retry_after_s or 0.0, _POLL_MAX_S)))
                pause_s = min(pause_s * 2, _POLL_MAX_S)
                continue
            if found.status_code == 200:
                record: dict[str, Any] = _json(found, where)
                return record
            if trio.current_time() + pause_s > deadline:
                raise BackendError(
                    f"{where}: no activation record by the action's time limit plus "
                    f"{self.config.record_grace_s:g} s"
                )
            await trio.sleep(pause_s)
            pause_s = min(pause_s * 2, _POLL_MAX_S)


async def _close_run(run: _Run) -> None:
    for client in run.clients:
        await client.aclose()


def _json(response: httpx.Response, where: str) -> Any:
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BackendError(
            f"{where}: OpenWhisk answered HTTP {response.status_code} with no JSON: "
            f"{response.text[:200]!r}"
        ) from None


def _annotation(notes: Any, key: str) -> str:
    for note in notes or ():
        if isinstance(note, dict) and note.get("key") == key:
            return str(note.get("value"))
    return ""


def _is_managed(notes: Any) -> bool:
    return _annotation(notes, MANAGED_KEY).lower() == MANAGED_VALUE


def _same_action(current: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether the deployed action already has the wanted image, code and limits."""
    have_exec = current.get("exec") or {}
    want_exec = wanted["exec"]
    have_limits = current.get("limits") or {}
    return (
        have_exec.get("kind") == want_exec["kind"]
        and have_exec.get("image") == want_exec["image"]
        and have_exec.get("code", "") == want_exec.get("code", "")
        and have_limits.get("memory") == wanted["limits"]["memory"]
        and have_limits.get("timeout") == wanted["limits"]["timeout"]
        and _annotation(current.get("annotations"), JOB_KEY)
        == _annotation(wanted["annotations"], JOB_KEY)
    )
