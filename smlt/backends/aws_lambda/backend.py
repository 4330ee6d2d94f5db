"""The AWS Lambda backend: each worker is one invocation of a function smlt creates per job.

**Functions** (:mod:`smlt.backends.serverless` says which and when;
:mod:`smlt.backends.aws_lambda.functions` makes them): ``deploy`` creates or updates
``smlt-<job>`` and returns once Lambda reports it ready. The worker reads its time left from the
Lambda context and hands over before the limit. Everything smlt creates is tagged
:data:`~smlt.backends.managed.MANAGED_KEY` and :data:`~smlt.backends.managed.JOB_KEY`;
``clean()`` deletes this job's functions, ``remove_managed()`` every tagged one (``smlt clean
--backend aws_lambda``), and a function of the same name without the tag is never touched.

**Invocations.** See :data:`INVOCATION_TYPE` for why a worker is a ``RequestResponse`` call: it
blocks for as long as the worker runs, so it runs in a thread (``trio.to_thread.run_sync``)
under a :class:`trio.CapacityLimiter` of ``max_concurrency`` seats, in the backend's own
nursery (:mod:`smlt.backends.calls`), and ``invoke`` returns at once. boto3's own retries are
off for ``Invoke``; a throttled call is retried by :mod:`smlt.backends.retry` (full jitter,
bounded) and every other failure is translated by :mod:`smlt.backends.aws_lambda.errors`.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import trio

from smlt.backends.aws_lambda.config import LambdaConfig
from smlt.backends.aws_lambda.errors import interpret_invoke_response, translate_client_error
from smlt.backends.aws_lambda.functions import FunctionControl
from smlt.backends.aws_lambda.limits import (
    MAX_MEMORY_MB,
    MAX_TIMEOUT_S,
    MIN_MEMORY_MB,
    SYNC_PAYLOAD_BYTES,
)
from smlt.backends.base import BackendLimits, Pricing
from smlt.backends.calls import BackgroundInvocation, CallNursery
from smlt.backends.managed import ManagedResource
from smlt.backends.retry import retry_throttled
from smlt.backends.serverless import ServerlessBackend
from smlt.errors import ConfigError, SmltError
from smlt.optimizer.cost import LAMBDA_ARM64, LAMBDA_X86
from smlt.protocol.payload import WorkerPayload, WorkerReport

__all__ = ["INVOCATION_TYPE", "LambdaBackend", "LambdaInvocation"]

#: How a worker is invoked: ``RequestResponse``, not ``Event``. Measured against ``smlt emulator``
#: (benchmarks/lambda_invoke_type.py, results/lambda_invoke_type.json; n invocations fanned out at
#: once, time until the last handler started, median of 3 warm rounds):
#:
#:     n    cold RR   cold Event   warm RR   warm Event
#:     4    0.62 s    0.68 s       0.009 s   0.021 s
#:     16   1.99 s    2.70 s       0.049 s   0.076 s
#:     32   4.26 s    3.90 s       0.109 s   0.139 s
#:
#: A cold start is the container's, about the same either way (the two differ by less than runs
#: of one differ); warm, RequestResponse starts all n workers sooner, Event having one more hop
#: (Lambda's queue). Event is not faster, and it
#: would cost what the scheduler relies on: the worker's report, its typed error (time limit,
#: out of memory, the handler's exception) and its billed duration come back on the
#: RequestResponse call itself, while an Event's outcome reaches nobody (a failed Event is
#: retried twice by Lambda, a duplicate delivery more), its payload is capped at 1 MB, and
#: the scheduler would learn of a dead worker only when its heartbeat expired. The price of
#: RequestResponse is one thread per running worker, blocked on its socket (``max_concurrency``
#: at most).
INVOCATION_TYPE = "RequestResponse"
#: Seconds a RequestResponse call may wait for its answer beyond the longest function.
_READ_MARGIN_S = 60
_CONNECT_TIMEOUT_S = 10
#: Retries of the control calls (create, update, get, delete) by boto3's "standard" mode.
_CONTROL_ATTEMPTS = 5


class LambdaInvocation(BackgroundInvocation):
    """One worker invocation (a ``RequestResponse`` call running in the backend's nursery)."""

    platform = "Lambda"


class LambdaBackend(ServerlessBackend):
    """Workers as AWS Lambda invocations; options are :class:`LambdaConfig`'s fields."""

    name = "aws_lambda"
    platform = "Lambda"
    noun = "function"

    def __init__(self, **options: Any) -> None:
        self.config = LambdaConfig.resolve(options)
        super().__init__(
            prefix=self.config.function_prefix,
            timeout_s=self.config.timeout_s,
            max_concurrency=self.config.max_concurrency,
            calls=CallNursery("smlt-aws-lambda-calls"),
        )
        self._clients_lock = threading.Lock()
        self._session: Any = None
        self._control_client: Any = None
        self._invoke_client: Any = None
        self._limiter_token: trio.lowlevel.TrioToken | None = None
        self._limiter: trio.CapacityLimiter | None = None
        self._control = FunctionControl(self.config, lambda: self._clients()[0])

    # -- limits and prices -----------------------------------------------------------------------

    @property
    def limits(self) -> BackendLimits:
        return BackendLimits(
            min_memory_mb=MIN_MEMORY_MB,
            max_memory_mb=MAX_MEMORY_MB,
            max_duration_s=float(MAX_TIMEOUT_S),
            max_concurrency=self.config.max_concurrency,
            max_payload_bytes=SYNC_PAYLOAD_BYTES,
        )

    @property
    def pricing(self) -> Pricing:
        return LAMBDA_ARM64 if self.config.architecture == "arm64" else LAMBDA_X86

    def require_deployable(self) -> None:
        self.config.require_deployable()

    # -- clients ---------------------------------------------------------------------------------

    def _clients(self) -> tuple[Any, Any]:
        """(control client, invoke client), made on first use: constructing the backend needs
        neither boto3's configuration nor the network. The invoke client waits long enough for
        the longest function, keeps the connection alive meanwhile (AWS's advice for long
        synchronous invocations), pools one connection per seat, and does not retry."""
        with self._clients_lock:
            if self._invoke_client is None:
                try:
                    import boto3
                    from botocore.config import Config
                except ImportError as exc:
                    raise ConfigError(
                        "the aws_lambda backend needs boto3: pip install 'smlt[aws]'"
                    ) from exc
                try:
                    self._session = boto3.session.Session(
                        profile_name=self.config.profile, region_name=self.config.region
                    )
                    common: dict[str, Any] = {"connect_timeout": _CONNECT_TIMEOUT_S}
                    control = Config(
                        **common,
                        read_timeout=60,
                        retries={"mode": "standard", "total_max_attempts": _CONTROL_ATTEMPTS},
                    )
                    invoke = Config(
                        **common,
                        read_timeout=MAX_TIMEOUT_S + _READ_MARGIN_S,
                        tcp_keepalive=True,
                        max_pool_connections=self.config.max_concurrency,
                        retries={"mode": "standard", "total_max_attempts": 1},
                    )
                    # Without endpoint_url, boto3 finds AWS_ENDPOINT_URL_LAMBDA or AWS's own.
                    url = self.config.endpoint_url
                    endpoint = {} if url is None else {"endpoint_url": url}
                    new = self._session.client
                    self._control_client = new("lambda", config=control, **endpoint)
                    self._invoke_client = new("lambda", config=invoke, **endpoint)
                except Exception as exc:  # ProfileNotFound, NoRegionError, ...
                    raise translate_client_error(exc, "aws_lambda: creating the client") from exc
            return self._control_client, self._invoke_client

    def _run_limiter(self) -> trio.CapacityLimiter:
        """The run's seats for blocking calls. Seats held by threads of an ended run would
        never come back, so each run has its own."""
        token = trio.lowlevel.current_trio_token()
        if self._limiter is None or self._limiter_token is not token:
            self._limiter_token = token
            self._limiter = trio.CapacityLimiter(self.config.max_concurrency)
        return self._limiter

    # -- functions -------------------------------------------------------------------------------

    async def _ensure_function(self, name: str, job: str, memory_mb: int, timeout_s: int) -> None:
        await trio.to_thread.run_sync(
            functools.partial(self._control.ensure, name, job, memory_mb, timeout_s),
            abandon_on_cancel=True,
        )

    # -- invoke ----------------------------------------------------------------------------------

    def _new_invocation(self, payload: WorkerPayload) -> LambdaInvocation:
        return LambdaInvocation(payload)

    async def _call(self, invocation: BackgroundInvocation, name: str, body: bytes) -> WorkerReport:
        rank = invocation.payload.rank
        where = f"rank {rank}: invoke {name}"
        limiter = self._run_limiter()

        async def attempt() -> dict[str, Any]:
            try:
                response: dict[str, Any] = await trio.to_thread.run_sync(
                    functools.partial(self._invoke_sync, name, body),
                    limiter=limiter,
                    abandon_on_cancel=True,
                )
            except Exception as exc:  # boto3's, from the thread
                raise translate_client_error(exc, where) from None
            return response

        response = await retry_throttled(
            attempt, self.config.throttle, what=where, on_retry=self._throttled
        )
        answer = interpret_invoke_response(response, rank)
        invocation.set_billed_s(answer.billed_s)
        if isinstance(answer.outcome, SmltError):
            raise answer.outcome
        return answer.outcome

    def _invoke_sync(self, name: str, body: bytes) -> dict[str, Any]:
        """One RequestResponse call; blocks until the function ends (runs in a thread)."""
        _, client = self._clients()
        response = client.invoke(
            FunctionName=name, InvocationType=INVOCATION_TYPE, LogType="Tail", Payload=body
        )
        stream = response.get("Payload")
        data = stream.read() if stream is not None else b""
        return {
            "StatusCode": response.get("StatusCode"),
            "FunctionError": response.get("FunctionError"),
            "LogResult": response.get("LogResult"),
            "Payload": data,
        }

    # -- clean -----------------------------------------------------------------------------------

    async def _delete_functions(self, names: list[str]) -> None:
        await trio.to_thread.run_sync(self._control.delete, names)

    async def remove_managed(
        self, *, older_than_s: float | None = None, dry_run: bool = False
    ) -> list[ManagedResource]:
        """Every function tagged as smlt's in this account and region (see
        :meth:`ServerlessBackend.remove_managed`)."""
        return await trio.to_thread.run_sync(
            functools.partial(self._control.remove_managed, older_than_s, dry_run)
        )

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            with self._clients_lock:
                for client in (self._control_client, self._invoke_client):
                    if client is not None:
                        client.close()
                self._control_client = self._invoke_client = self._session = None
