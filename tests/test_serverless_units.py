"""The serverless backends' pure logic: the throttle retry policy (on trio's MockClock), the
translation of Lambda's and OpenWhisk's answers into smlt's errors, configuration resolution,
the background invocation handle, and the platforms' entry points. No network: the backends
against a platform are tests/test_backend_contract.py."""

from __future__ import annotations

import base64
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from botocore.exceptions import ClientError, NoCredentialsError, NoRegionError

from smlt.backends import get_backend
from smlt.backends.aws_lambda import LambdaBackend, LambdaConfig
from smlt.backends.aws_lambda import config as lambda_config
from smlt.backends.aws_lambda.errors import (
    interpret_invoke_response,
    parse_billed_s,
    translate_client_error,
)
from smlt.backends.calls import BackgroundInvocation, CallNursery
from smlt.backends.managed import resource_name
from smlt.backends.openwhisk import OpenWhiskBackend, OpenWhiskConfig
from smlt.backends.openwhisk.errors import activation_outcome, http_error
from smlt.backends.retry import ThrottleRetry, retry_throttled
from smlt.errors import (
    BackendAuthError,
    BackendError,
    CapacityError,
    ConfigError,
    FunctionTimeoutError,
    OutOfMemoryError,
    ShardTimeoutError,
    StaleVersionError,
    ThrottledError,
    WorkerError,
)
from smlt.optimizer.cost import IBM_CLOUD_FUNCTIONS, LAMBDA_ARM64, LAMBDA_X86
from smlt.protocol.payload import StopReason, WorkerPayload, WorkerReport
from smlt.worker.entrypoints import OpenWhiskContext, openwhisk_main

REPORT = {
    "rank": 1,
    "generation": 0,
    "first_iteration": 0,
    "next_iteration": 5,
    "stop_reason": StopReason.FINISHED,
    "wall_s": 1.0,
    "init_s": 0.5,
}
ROLE = "arn:aws:iam::123456789012:role/smlt-worker"


def payload(rank: int = 0, **changes: Any) -> WorkerPayload:
    base = WorkerPayload(
        job_id="unit",
        rank=rank,
        workers=2,
        memory_mb=512,
        redis_urls=("redis://127.0.0.1:1/0",),
        object_store_url="file:///nowhere",
        batch_size=8,
        total_iterations=5,
    )
    return base.with_changes(**changes)


# -- the retry policy ----------------------------------------------------------------------------


def test_full_jitter_stays_under_the_doubling_ceiling_and_the_cap() -> None:
    policy = ThrottleRetry(max_attempts=10, base_s=0.5, cap_s=4.0, deadline_s=100)
    assert policy.delay_s(0, 0.999) == pytest.approx(0.4995)
    assert policy.delay_s(2, 0.5) == pytest.approx(1.0)  # half of 0.5 x 2^2
    assert policy.delay_s(8, 0.999) == pytest.approx(3.996)  # capped at 4 s
    assert policy.delay_s(0, 0.0) == 0.0  # full jitter may retry at once
    assert policy.delay_s(0, 0.0, retry_after_s=2.0) == 2.0  # the platform's wish is a floor
    assert policy.delay_s(0, 0.0, retry_after_s=3600) == 4.0  # ... up to the cap
    with pytest.raises(ConfigError):
        ThrottleRetry(max_attempts=0)


def run_on_mock_clock(fn: Any) -> Any:
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


def test_retry_throttled_retries_then_succeeds_in_virtual_time() -> None:
    policy = ThrottleRetry(max_attempts=5, base_s=1.0, cap_s=8.0, deadline_s=100)
    calls: list[float] = []
    waits: list[float] = []

    async def main() -> tuple[str, float]:
        async def attempt() -> str:
            calls.append(trio.current_time())
            if len(calls) < 4:
                raise ThrottledError("429", retry_after_s=None)
            return "ok"

        started = trio.current_time()
        value = await retry_throttled(
            attempt, policy, what="t", uniform=lambda: 0.5, on_retry=lambda e, w: waits.append(w)
        )
        return value, trio.current_time() - started

    value, elapsed = run_on_mock_clock(main)
    assert value == "ok" and len(calls) == 4
    assert waits == [0.5, 1.0, 2.0]  # half of 1, 2, 4 s
    assert elapsed == pytest.approx(3.5)


def test_retry_throttled_gives_up_after_the_attempts_or_the_deadline() -> None:
    async def always_throttled() -> None:
        raise ThrottledError("Too many concurrent requests", retry_after_s=1.0)

    async def by_attempts() -> None:
        policy = ThrottleRetry(max_attempts=3, base_s=0.1, cap_s=1.0, deadline_s=100)
        await retry_throttled(always_throttled, policy, what="rank 2: invoke f")

    with pytest.raises(ThrottledError, match=r"rank 2: invoke f: still throttled after 3") as e:
        run_on_mock_clock(by_attempts)
    assert e.value.retry_after_s == 1.0

    async def by_deadline() -> float:
        policy = ThrottleRetry(max_attempts=1000, base_s=1.0, cap_s=10.0, deadline_s=30)
        started = trio.current_time()
        with pytest.raises(ThrottledError):
            await retry_throttled(always_throttled, policy, what="x", uniform=lambda: 0.9)
        return trio.current_time() - started

    assert run_on_mock_clock(by_deadline) == pytest.approx(30.0)  # never sleeps past it

    async def other_errors_pass_through() -> None:
        async def denied() -> None:
            raise BackendAuthError("403")

        with pytest.raises(BackendAuthError):
            await retry_throttled(denied, ThrottleRetry(), what="x")

    run_on_mock_clock(other_errors_pass_through)


# -- Lambda's answers ----------------------------------------------------------------------------


def client_error(code: str, status: int, message: str = "m", **extra: Any) -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status},
        **extra,
    }
    return ClientError(response, "Invoke")


def test_lambda_client_errors_become_typed_errors() -> None:
    throttled = translate_client_error(
        client_error(
            "TooManyRequestsException",
            429,
            "Rate exceeded",
            Reason="ReservedFunctionConcurrentInvocationLimitExceeded",
            retryAfterSeconds="2",
        ),
        "rank 1: invoke f",
    )
    assert isinstance(throttled, ThrottledError)
    assert throttled.retry_after_s == 2.0
    assert "ReservedFunctionConcurrentInvocationLimitExceeded" in str(throttled)
    for code, status in [
        ("AccessDeniedException", 403),
        ("UnrecognizedClientException", 403),
        ("InvalidSignatureException", 403),
        ("ExpiredTokenException", 403),
        ("SomethingNew", 401),
    ]:
        assert isinstance(translate_client_error(client_error(code, status), "w"), BackendAuthError)
    too_large = translate_client_error(client_error("RequestTooLargeException", 413), "w")
    assert isinstance(too_large, ConfigError)
    missing = translate_client_error(client_error("ResourceNotFoundException", 404), "w")
    assert type(missing) is BackendError and "does not exist" in str(missing)
    assert isinstance(translate_client_error(NoCredentialsError(), "w"), BackendAuthError)
    assert isinstance(translate_client_error(NoRegionError(), "w"), ConfigError)
    server = translate_client_error(client_error("ServiceException", 500, "boom"), "w")
    assert type(server) is BackendError and "ServiceException" in str(server)


def invoke_response(
    body: Any, *, function_error: str | None = None, log: str = "", status: int = 200
) -> dict[str, Any]:
    return {
        "StatusCode": status,
        "FunctionError": function_error,
        "LogResult": base64.b64encode(log.encode()).decode(),
        "Payload": json.dumps(body).encode(),
    }


REPORT_LINE = (
    "END RequestId: 1\nREPORT RequestId: 1\tDuration: 1234.56 ms\tBilled Duration: 1235 ms\t"
    "Memory Size: 512 MB\tMax Memory Used: {used} MB\t\n"
)


def test_lambda_success_and_billed_duration() -> None:
    answer = interpret_invoke_response(
        invoke_response(REPORT, log=REPORT_LINE.format(used=300)), rank=1
    )
    assert answer.outcome == WorkerReport.from_dict(REPORT)
    assert answer.billed_s == pytest.approx(1.235)
    assert parse_billed_s("no report here") is None
    junk = interpret_invoke_response(invoke_response([1, 2]), rank=1)
    assert isinstance(junk.outcome, WorkerError) and "not a worker report" in str(junk.outcome)


def test_lambda_function_errors_become_typed_errors() -> None:
    def outcome(body: Any, log: str = "") -> Any:
        return interpret_invoke_response(
            invoke_response(body, function_error="Unhandled", log=log), rank=3
        ).outcome

    timed_out = outcome(
        {"errorMessage": "2024-05-01T12:00:00Z 1 Task timed out after 3.00 seconds"}
    )
    assert isinstance(timed_out, FunctionTimeoutError) and "rank 3" in str(timed_out)
    assert isinstance(outcome({"errorType": "Sandbox.Timedout", "errorMessage": "x"}), TimeoutError)
    oom = outcome({"errorType": "Runtime.OutOfMemory", "errorMessage": "signal: killed"})
    assert isinstance(oom, OutOfMemoryError)
    killed = {"errorType": "Runtime.ExitError", "errorMessage": "signal: killed"}
    assert isinstance(outcome(killed, REPORT_LINE.format(used=512)), OutOfMemoryError)
    exited = outcome(killed, REPORT_LINE.format(used=200))
    assert type(exited) is WorkerError and "Runtime.ExitError" in str(exited)
    shard = outcome(
        {
            "errorType": "ShardTimeoutError",
            "errorMessage": "shard 1 never came",
            "stackTrace": ['  File "trainer.py", line 1\n'],
        }
    )
    assert isinstance(shard, ShardTimeoutError) and "rank 3: shard 1 never came" in str(shard)
    assert any("trainer.py" in note for note in shard.__notes__)
    assert isinstance(
        outcome({"errorType": "StaleVersionError", "errorMessage": "late"}), StaleVersionError
    )
    assert isinstance(outcome({"errorType": "MemoryError", "errorMessage": ""}), OutOfMemoryError)
    raised = outcome(
        {
            "errorType": "ValueError",
            "errorMessage": "rank 3 cannot go on",
            "stackTrace": ['  File "task.py", line 7, in step\n', "    raise ValueError\n"],
        }
    )
    assert type(raised) is WorkerError
    assert "ValueError: rank 3 cannot go on" in str(raised)
    assert 'File "task.py", line 7' in raised.remote_traceback
    assert type(outcome("not json at all")) is WorkerError


# -- OpenWhisk's answers -------------------------------------------------------------------------


def test_openwhisk_http_errors_become_typed_errors() -> None:
    body = json.dumps(
        {"error": "Too many concurrent requests in flight (count: 101, allowed: 100).", "code": "x"}
    )
    throttled = http_error(429, body, "rank 0: invoke a", retry_after="3")
    assert isinstance(throttled, ThrottledError) and throttled.retry_after_s == 3.0
    assert "Too many concurrent requests" in str(throttled)
    denied = http_error(401, '{"error": "The supplied authentication is invalid"}', "w")
    assert isinstance(denied, BackendAuthError) and "authentication is invalid" in str(denied)
    assert isinstance(http_error(403, "", "w"), BackendAuthError)
    assert isinstance(http_error(413, "{}", "w"), ConfigError)
    assert type(http_error(404, "{}", "w")) is BackendError
    assert type(http_error(503, "System is overloaded", "w")) is BackendError


def activation(status: str, result: Any, *, duration: int = 2500, timeout: bool = False) -> Any:
    notes = [{"key": "limits", "value": {"timeout": 60000, "memory": 256}}]
    if timeout:
        notes.append({"key": "timeout", "value": True})
    return {
        "activationId": "abc123",
        "duration": duration,
        "annotations": notes,
        "response": {"status": status, "success": status == "success", "result": result},
    }


def test_openwhisk_activations_become_reports_or_typed_errors() -> None:
    ok = activation_outcome(activation("success", REPORT), rank=1)
    assert ok.outcome == WorkerReport.from_dict(REPORT) and ok.billed_s == 2.5

    def outcome(status: str, result: Any, **kw: Any) -> Any:
        return activation_outcome(activation(status, result, **kw), rank=2).outcome

    limit = "The action exceeded its time limits of 60000 milliseconds."
    assert isinstance(outcome("action developer error", {"error": limit}), FunctionTimeoutError)
    assert isinstance(
        outcome("action developer error", {"error": "whatever"}, timeout=True), FunctionTimeoutError
    )
    memory = "The action exhausted its memory and was aborted."
    assert isinstance(outcome("action developer error", {"error": memory}), OutOfMemoryError)
    died = "The action did not produce a valid response and exited unexpectedly."
    crashed = outcome("action developer error", {"error": died})
    assert type(crashed) is WorkerError and "exited unexpectedly" in str(crashed)
    assert type(outcome("whisk internal error", {"error": "boom"})) is BackendError
    raised = outcome(
        "application error",
        {"error": {"errorType": "ValueError", "errorMessage": "no", "stackTrace": ["a\n", "b\n"]}},
    )
    assert type(raised) is WorkerError and raised.remote_traceback == "a\nb\n"
    shard = outcome(
        "application error", {"error": {"errorType": "ShardTimeoutError", "errorMessage": "s"}}
    )
    assert isinstance(shard, ShardTimeoutError)
    assert type(activation_outcome("nonsense", rank=0).outcome) is BackendError


# -- configuration -------------------------------------------------------------------------------


def test_lambda_config_from_options_and_environment(tmp_path: Path) -> None:
    env = {
        "SMLT_LAMBDA_IMAGE": "123456789012.dkr.ecr.us-east-1.amazonaws.com/smlt:1",
        "SMLT_LAMBDA_ROLE": ROLE,
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000",
        "AWS_SECRET_ACCESS_KEY": "never-forwarded",
    }
    config = LambdaConfig.resolve({"architecture": "arm64"}, env)
    assert config.image_uri == env["SMLT_LAMBDA_IMAGE"] and config.role_arn == ROLE
    assert dict(config.environment) == {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000"}
    config.require_deployable()
    assert LambdaConfig.resolve({}, {}).image_uri is None
    with pytest.raises(ConfigError, match="SMLT_LAMBDA_IMAGE"):
        LambdaConfig.resolve({}, {"SMLT_LAMBDA_ROLE": ROLE}).require_deployable()
    with pytest.raises(ConfigError, match="SMLT_LAMBDA_ROLE"):
        LambdaConfig.resolve({"image_uri": "x"}, {}).require_deployable()
    with pytest.raises(ConfigError, match="unknown option.*'memory_gb'"):
        LambdaConfig.resolve({"memory_gb": 4}, {})
    with pytest.raises(ConfigError, match="not both"):
        LambdaConfig(image_uri="x", zip_file="y")
    with pytest.raises(ConfigError, match="reserves"):
        LambdaConfig(environment={"AWS_ACCESS_KEY_ID": "x"})
    with pytest.raises(ConfigError, match="role ARN"):
        LambdaConfig(role_arn="admin")
    with pytest.raises(ConfigError, match="timeout_s"):
        LambdaConfig(timeout_s=901)
    vpc = {"SMLT_LAMBDA_SUBNETS": "subnet-1, subnet-2", "SMLT_LAMBDA_SECURITY_GROUPS": "sg-1"}
    in_vpc = LambdaConfig.resolve({}, vpc)
    assert (in_vpc.subnet_ids, in_vpc.security_group_ids) == (("subnet-1", "subnet-2"), ("sg-1",))
    with pytest.raises(ConfigError, match="both subnet_ids and security_group_ids"):
        LambdaConfig.resolve({}, {"SMLT_LAMBDA_SUBNETS": "subnet-1"})


def test_a_zip_over_lambdas_unzipped_limit_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "worker.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("smlt/__init__.py", "x" * 4000)
    config = LambdaConfig(zip_file=str(archive), role_arn=ROLE)
    config.require_deployable()
    monkeypatch.setattr(lambda_config, "ZIP_UNZIPPED_BYTES", 1000)  # PyTorch's case, smaller
    with pytest.raises(ConfigError, match="needs the container image"):
        config.require_deployable()


def test_openwhisk_config_follows_the_wsk_conventions(tmp_path: Path) -> None:
    props = tmp_path / "wskprops"
    secret = "23bc46b1-71f6-4ed5-8c54-816aa4f8c502:s3cr3tk3y"
    props.write_text(f"APIHOST=ow.example.com\nAUTH={secret}\nNAMESPACE=guest\n")
    config = OpenWhiskConfig.resolve({}, {"WSK_CONFIG_FILE": str(props)})
    assert config.base_url == "https://ow.example.com"  # no scheme: HTTPS, as for wsk
    assert config.namespace == "guest" and config.credentials == tuple(secret.split(":"))
    assert "s3cr3tk3y" not in repr(config) and config.verify_tls is True
    env = {"WSK_CONFIG_FILE": str(props), "__OW_API_HOST": "http://127.0.0.1:3233"}
    assert OpenWhiskConfig.resolve({}, env).base_url == "http://127.0.0.1:3233"
    given = OpenWhiskConfig.resolve({"api_host": "https://other:443", "namespace": "ns"}, env)
    assert (given.base_url, given.namespace) == ("https://other:443", "ns")
    with pytest.raises(ConfigError) as bad:
        OpenWhiskConfig(auth="nocolon-s3cr3t")
    assert "s3cr3t" not in str(bad.value)
    nothing = OpenWhiskConfig.resolve({}, {"WSK_CONFIG_FILE": str(tmp_path / "none")})
    with pytest.raises(ConfigError, match="APIHOST"):
        nothing.require_connection()
    with pytest.raises(ConfigError, match="SMLT_OPENWHISK_IMAGE"):
        OpenWhiskConfig.resolve({}, {"WSK_CONFIG_FILE": str(props)}).require_deployable()
    # An operator's raised limits, from the environment (the command line has no options).
    raised = OpenWhiskConfig.resolve(
        {}, {"SMLT_OPENWHISK_MAX_MEMORY_MB": "4096", "SMLT_OPENWHISK_MAX_DURATION_S": "900"}
    )
    assert (raised.max_memory_mb, raised.max_duration_s, raised.timeout_s) == (4096, 900, 900)
    with pytest.raises(ConfigError, match="not a whole number"):
        OpenWhiskConfig.resolve({}, {"SMLT_OPENWHISK_MAX_CONCURRENCY": "lots"})


def test_backends_by_name_need_no_network_and_say_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("SMLT_LAMBDA_IMAGE", "SMLT_LAMBDA_ZIP", "SMLT_LAMBDA_ROLE", "__OW_API_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WSK_CONFIG_FILE", str(tmp_path / "none"))
    aws = get_backend("aws_lambda")
    assert isinstance(aws, LambdaBackend) and aws.pricing is LAMBDA_X86
    assert aws.memory_range_mb() == (128, 10240) and aws.limits.max_duration_s == 900
    assert get_backend("aws_lambda", architecture="arm64").pricing is LAMBDA_ARM64
    with pytest.raises(CapacityError, match="1001 workers exceed"):
        aws.check_fits(1001, 1769)
    with pytest.raises(ConfigError, match="SMLT_LAMBDA_IMAGE"):
        aws.check_fits(4, 1769)
    ow = get_backend("openwhisk", max_memory_mb=2048)
    assert isinstance(ow, OpenWhiskBackend) and ow.pricing is IBM_CLOUD_FUNCTIONS
    assert ow.memory_range_mb() == (128, 2048) and ow.limits.max_concurrency == 100
    assert ow.default_memory_mb(4) == 1769
    with pytest.raises(ConfigError, match="bad option|unknown option"):
        get_backend("openwhisk", memory_gb=4)


def test_resource_names_are_safe_unique_and_short() -> None:
    assert resource_name("smlt-", "digits-20260101-1200-ab12") == "smlt-digits-20260101-1200-ab12"
    assert resource_name("smlt-", "a b/c", "-3008mb") == "smlt-a-b-c-3008mb"
    long_a, long_b = "x" * 100 + "a", "x" * 100 + "b"
    name_a, name_b = resource_name("smlt-", long_a, "-10240mb"), resource_name("smlt-", long_b)
    assert len(name_a) <= 64 and len(name_b) <= 64 and name_a.endswith("-10240mb")
    assert resource_name("smlt-", long_a) != name_b


# -- the background invocation -------------------------------------------------------------------


def test_background_invocation_result_cancel_and_timeout() -> None:
    async def main() -> None:
        calls: CallNursery[None] = CallNursery("test-calls")
        finished = BackgroundInvocation(payload(0))

        async def report() -> WorkerReport:
            await trio.sleep(5)
            return WorkerReport.from_dict(REPORT)

        await calls.start_soon(lambda: finished.run(report))
        assert 0 <= finished.billed_s < 1  # counts up while it runs
        assert (await finished.result(timeout_s=10)).next_iteration == 5
        ended_s = finished.billed_s  # wall seconds (the clock the driver's thread can read)
        await trio.sleep(1)
        assert finished.billed_s == ended_s  # ended: the bill stops counting
        finished.set_billed_s(4.2)  # the platform's figure wins
        assert finished.billed_s == 4.2

        failing = BackgroundInvocation(payload(1))

        async def oom() -> WorkerReport:
            raise OutOfMemoryError("rank 1: out of memory")

        await calls.start_soon(lambda: failing.run(oom))
        with pytest.raises(OutOfMemoryError):
            await failing.result(timeout_s=1)

        hung = BackgroundInvocation(payload(0))

        async def forever() -> WorkerReport:
            await trio.sleep_forever()
            raise AssertionError

        await calls.start_soon(lambda: hung.run(forever))
        with pytest.raises(FunctionTimeoutError, match="within 30 s"):
            await hung.result(timeout_s=30)

        cancelled = BackgroundInvocation(payload(1))
        await calls.start_soon(lambda: cancelled.run(forever))
        await cancelled.cancel()
        with pytest.raises(WorkerError, match="cannot stop a running function"):
            await cancelled.result(timeout_s=1)

        buggy = BackgroundInvocation(payload(0))

        async def bug() -> WorkerReport:
            raise KeyError("a translation bug")

        await calls.start_soon(lambda: buggy.run(bug))
        with pytest.raises(BackendError, match="KeyError"):
            await buggy.result(timeout_s=1)
        await calls.aclose()

    run_on_mock_clock(main)


def test_call_nursery_serves_each_run_and_closes_its_resource() -> None:
    closed: list[int] = []
    opened = iter(range(10))

    async def close(value: int) -> None:
        closed.append(value)

    calls: CallNursery[int] = CallNursery("test", lambda: next(opened), close)
    left_running = BackgroundInvocation(payload(0))

    async def first_run() -> int:
        async def forever() -> WorkerReport:
            await trio.sleep_forever()
            raise AssertionError

        await calls.start_soon(lambda: left_running.run(forever))
        return await calls.resource()

    assert trio.run(first_run) == 0
    assert closed == [0]  # the run's end closed its resource ...
    with pytest.raises(WorkerError, match="call was cancelled"):  # ... and ended its calls
        trio.run(left_running.result, 1)

    async def second_run() -> int:
        value = await calls.resource()
        await calls.aclose()
        return value

    assert trio.run(second_run) == 1 and closed == [0, 1]


# -- the entry points ----------------------------------------------------------------------------


def test_openwhisk_entry_point_reports_errors_in_lambdas_shape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answer = openwhisk_main({"job_id": "x", "__ow_method": "post"})  # not a payload
    error = answer["error"]
    assert error["errorType"] == "ConfigError"
    assert "bad worker payload" in error["errorMessage"]
    assert any("from_dict" in line for line in error["stackTrace"])
    # ... which the backend turns back into the error it was.
    typed = activation_outcome(activation("application error", answer), rank=0).outcome
    assert isinstance(typed, ConfigError)

    context = OpenWhiskContext(deadline_unix_ms=0)
    assert context.get_remaining_time_in_millis() == 0
    import time

    ahead = OpenWhiskContext(deadline_unix_ms=time.time() * 1000 + 30_000)
    assert 29_000 < ahead.get_remaining_time_in_millis() <= 30_000


def test_smlt_clean_backend_refuses_a_backend_with_nothing_to_clean(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from smlt.cli import app

    env = {"SMLT_OBJECT_STORE": str(tmp_path / "objects")}
    result = CliRunner().invoke(app, ["clean", "--backend", "sim"], env=env)
    assert result.exit_code == 2
    assert "leaves nothing behind there to clean" in result.output


def test_a_retried_rank_keeps_its_generations_thread_count() -> None:
    """A rank re-invoked with twice the memory (after running out) sizes torch's threads from the
    generation's memory, as its earlier attempts did: another thread count would change its CPU
    reductions, so its bytes."""
    import torch

    from smlt.worker.entrypoints import _size_threads

    before = torch.get_num_threads()
    try:
        _size_threads({"memory_mb": 2 * 3538, "options": {"generation_memory_mb": 1769}})
        assert torch.get_num_threads() == 1
        _size_threads({"memory_mb": 3538, "options": {}})  # no generation figure: the event's
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
