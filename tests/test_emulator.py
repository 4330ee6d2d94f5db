"""``smlt emulator`` as the platforms' clients see it: real HTTP, boto3 and httpx, subprocess
containers running a tiny handler (no torch, so a cold start costs an interpreter).

Lambda: deploy with boto3 (waiters included), invoke synchronously and as an event, a cold start
then a warm one in the same process, the handler's exception, the timeout and the memory limit
(the container is killed), the concurrency limit (429), images, other credentials (403).
OpenWhisk: actions PUT/GET/list/DELETE, blocking and non-blocking invokes, the blocking window,
the limits, 429, blackbox images, other credentials (401/403). And: loopback only, no
credential in any log line or in what the CLI prints, none inherited by a container.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from botocore.exceptions import ClientError

from smlt.emulator import Emulator, EmulatorConfig
from tests.cli_support import processes_with
from tests.emulator_support import (
    HANDLER_SOURCE,
    IMAGE,
    create_function,
    lambda_client_for,
    ow_client_for,
    read_pid,
    unique_name,
    wait_for,
    zipped,
)
from tests.emulator_support import emulator_fixture as emulator_fixture
from tests.emulator_support import emulator_log_fixture as emulator_log_fixture
from tests.emulator_support import lambda_client_fixture as lambda_client_fixture
from tests.emulator_support import ow_fixture as ow_fixture

_ROLE = "arn:aws:iam::123456789012:role/smlt-test"
_REPORT = re.compile(
    r"REPORT RequestId: (\S+)\tDuration: ([\d.]+) ms\tBilled Duration: (\d+) ms\t"
    r"Memory Size: (\d+) MB\tMax Memory Used: (\d+) MB\t"
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _dead(pid: int) -> bool:
    """Gone, or a zombie not yet reaped by the emulator (which is this test process)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _invoke(client: Any, name: str, event: dict[str, Any], **options: Any) -> tuple[dict, Any]:
    """Invoke with the log tail; returns the response and the decoded payload."""
    response = client.invoke(
        FunctionName=name, Payload=json.dumps(event), LogType="Tail", **options
    )
    return response, json.loads(response["Payload"].read())


def _log(response: dict[str, Any]) -> str:
    return base64.b64decode(response["LogResult"]).decode()


# -- Lambda: deploying -------------------------------------------------------------------------


def test_lambda_functions_are_created_updated_and_deleted_as_boto3_expects(lambda_client):
    name = unique_name("crud")
    created = lambda_client.create_function(
        FunctionName=name,
        Runtime="python3.11",
        Role=_ROLE,
        Handler="handler.handler",
        Code={"ZipFile": zipped()},
        MemorySize=256,
        Timeout=7,
        Environment={"Variables": {"GREETING": "hi"}},
        Tags={"smlt:job": "j1"},
    )
    # Creation is asynchronous, as on Lambda: a client that does not wait is refused.
    assert created["State"] == "Pending"
    with pytest.raises(lambda_client.exceptions.ResourceConflictException, match="Pending"):
        lambda_client.invoke(FunctionName=name, Payload=b"{}")
    lambda_client.get_waiter("function_active_v2").wait(FunctionName=name)
    got = lambda_client.get_function(FunctionName=name)
    config = got["Configuration"]
    assert (config["State"], config["LastUpdateStatus"]) == ("Active", "Successful")
    assert (config["MemorySize"], config["Timeout"], config["Handler"]) == (
        256,
        7,
        "handler.handler",
    )
    assert config["Environment"]["Variables"] == {"GREETING": "hi"}
    assert got["Tags"] == {"smlt:job": "j1"}
    by_arn = lambda_client.get_function_configuration(FunctionName=config["FunctionArn"])
    assert by_arn["RevisionId"] == config["RevisionId"]
    with pytest.raises(lambda_client.exceptions.ResourceConflictException, match="already exist"):
        create_function(lambda_client, name)

    updated = lambda_client.update_function_configuration(FunctionName=name, MemorySize=512)
    assert updated["LastUpdateStatus"] == "InProgress"
    with pytest.raises(lambda_client.exceptions.ResourceConflictException, match="in progress"):
        lambda_client.update_function_configuration(FunctionName=name, Timeout=9)
    lambda_client.get_waiter("function_updated_v2").wait(FunctionName=name)
    assert lambda_client.get_function_configuration(FunctionName=name)["MemorySize"] == 512

    lambda_client.update_function_code(
        FunctionName=name, ZipFile=zipped(HANDLER_SOURCE.replace('"v1"', '"v2"'))
    )
    lambda_client.get_waiter("function_updated_v2").wait(
        FunctionName=name, WaiterConfig={"Delay": 0.2, "MaxAttempts": 100}
    )
    assert _invoke(lambda_client, name, {})[1]["version"] == "v2"

    with pytest.raises(ClientError) as refused:
        lambda_client.update_function_configuration(FunctionName=name, MemorySize=20_000)
    assert refused.value.response["Error"]["Code"] == "ValidationException"
    with pytest.raises(lambda_client.exceptions.InvalidParameterValueException, match="AWS_REGION"):
        create_function(
            lambda_client, unique_name(), Environment={"Variables": {"AWS_REGION": "x"}}
        )

    names = [f["FunctionName"] for f in lambda_client.list_functions()["Functions"]]
    assert name in names
    arn = config["FunctionArn"]
    lambda_client.tag_resource(Resource=arn, Tags={"b": "2"})
    lambda_client.untag_resource(Resource=arn, TagKeys=["smlt:job"])
    assert lambda_client.list_tags(Resource=arn)["Tags"] == {"b": "2"}

    lambda_client.delete_function(FunctionName=name)
    with pytest.raises(lambda_client.exceptions.ResourceNotFoundException):
        lambda_client.get_function(FunctionName=name)
    with pytest.raises(lambda_client.exceptions.ResourceNotFoundException):
        lambda_client.invoke(FunctionName=name, Payload=b"{}")


# -- Lambda: invoking --------------------------------------------------------------------------


def test_lambda_cold_start_then_warm_reuse_then_new_containers_after_an_update(
    lambda_client, emulator
):
    name = unique_name("warm")
    create_function(lambda_client, name, MemorySize=256, Timeout=30)
    cold_starts = emulator.statistics().aws_lambda.cold_starts
    first, cold = _invoke(lambda_client, name, {"n": 1})
    second, warm = _invoke(lambda_client, name, {"n": 2})
    assert warm["pid"] == cold["pid"]  # the same process served both: kept warm
    assert emulator.statistics().aws_lambda.cold_starts == cold_starts + 1
    assert "Init Duration" in _log(first) and "Init Duration" not in _log(second)
    report = _REPORT.search(_log(first))
    assert report is not None, _log(first)
    request_id, duration_ms, billed_ms, memory_mb, used_mb = report.groups()
    assert request_id == first["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"]
    assert request_id == cold["request_id"]
    assert int(billed_ms) >= float(duration_ms) and int(memory_mb) == 256 and int(used_mb) > 0
    assert first["ExecutedVersion"] == "$LATEST" and "FunctionError" not in first
    assert cold["function_name"] == name and cold["memory_limit_in_mb"] == "256"
    assert 25_000 < cold["remaining_ms"] <= 30_000
    assert "handling" in _log(first)  # the handler's own print is in the log

    lambda_client.update_function_configuration(FunctionName=name, MemorySize=384)
    lambda_client.get_waiter("function_updated_v2").wait(
        FunctionName=name, WaiterConfig={"Delay": 0.2, "MaxAttempts": 100}
    )
    _, after = _invoke(lambda_client, name, {})
    assert after["pid"] != cold["pid"] and after["memory_limit_in_mb"] == "384"
    assert not _alive(cold["pid"])  # the old configuration's container was stopped


def test_lambda_handler_exception_is_an_unhandled_function_error(lambda_client):
    name = unique_name("raise")
    create_function(lambda_client, name)
    response, error = _invoke(lambda_client, name, {"raise": True})
    assert response["StatusCode"] == 200 and response["FunctionError"] == "Unhandled"
    assert (error["errorType"], error["errorMessage"]) == ("ValueError", "asked to raise")
    assert any("handler.py" in line for line in error["stackTrace"])
    _, again = _invoke(lambda_client, name, {})
    assert _alive(again["pid"])  # an exception does not cost the container


def test_lambda_timeout_kills_the_container(lambda_client, tmp_path):
    name = unique_name("timeout")
    create_function(lambda_client, name, Timeout=1)
    started = time.monotonic()
    response, error = _invoke(
        lambda_client, name, {"pid_file": str(tmp_path / "pid"), "sleep_s": 60}
    )
    assert time.monotonic() - started < 15
    assert response["FunctionError"] == "Unhandled"
    assert error["errorType"] == "Sandbox.Timedout"
    assert error["errorMessage"].endswith("Task timed out after 1.00 seconds")
    assert "Task timed out after 1.00 seconds" in _log(response)
    assert "Status: timeout" in _log(response)
    assert not _alive(read_pid(tmp_path / "pid"))


def test_lambda_memory_limit_kills_the_container(lambda_client, tmp_path):
    name = unique_name("oom")
    create_function(lambda_client, name, MemorySize=128)
    response, error = _invoke(
        lambda_client, name, {"pid_file": str(tmp_path / "pid"), "alloc_mb": 300}
    )
    assert response["FunctionError"] == "Unhandled"
    assert error["errorType"] == "Runtime.OutOfMemory"
    assert error["errorMessage"].endswith("Runtime exited with error: signal: killed")
    report = _REPORT.search(_log(response))
    assert report is not None and int(report.group(5)) > 128
    assert not _alive(read_pid(tmp_path / "pid"))


def test_lambda_concurrency_limit_answers_too_many_requests(lambda_client, emulator):
    name = unique_name("busy")
    create_function(lambda_client, name)
    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(_invoke, lambda_client, name, {"sleep_s": 2}) for _ in range(2)]
        wait_for(lambda: emulator.statistics().aws_lambda.busy == 2, what="two busy containers")
        with pytest.raises(lambda_client.exceptions.TooManyRequestsException) as refused:
            lambda_client.invoke(FunctionName=name, Payload=b"{}")
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429
        assert refused.value.response["Reason"] == "ConcurrentInvocationLimitExceeded"
        assert all("FunctionError" not in f.result()[0] for f in running)
    lambda_client.put_function_concurrency(FunctionName=name, ReservedConcurrentExecutions=0)
    with pytest.raises(lambda_client.exceptions.TooManyRequestsException) as reserved:
        lambda_client.invoke(FunctionName=name, Payload=b"{}")
    assert reserved.value.response["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"


def test_lambda_event_invocation_answers_202_and_runs_in_the_background(lambda_client, tmp_path):
    name = unique_name("event")
    create_function(lambda_client, name)
    marker = tmp_path / "ran"
    event = {"touch": str(marker), "sleep_s": 0.5}
    response = lambda_client.invoke(
        FunctionName=name, InvocationType="Event", Payload=json.dumps(event)
    )
    assert response["StatusCode"] == 202
    assert not marker.exists()  # answered before the function ran
    wait_for(marker.exists, what="the event's function to run")


def test_lambda_failed_event_is_retried_as_its_event_invoke_config_says(lambda_client, tmp_path):
    name = unique_name("retry")
    create_function(lambda_client, name)
    attempts = tmp_path / "attempts"
    event = json.dumps({"append": str(attempts), "raise": True})
    lambda_client.invoke(FunctionName=name, InvocationType="Event", Payload=event)
    # Lambda's default: the first attempt and two retries (the module's delay is 0.2 s).
    wait_for(lambda: attempts.exists() and attempts.read_text() == "xxx", what="three attempts")
    time.sleep(0.6)
    assert attempts.read_text() == "xxx"
    lambda_client.put_function_event_invoke_config(FunctionName=name, MaximumRetryAttempts=0)
    once = tmp_path / "once"
    event = json.dumps({"append": str(once), "raise": True})
    lambda_client.invoke(FunctionName=name, InvocationType="Event", Payload=event)
    wait_for(once.exists, what="the attempt")
    time.sleep(0.6)
    assert once.read_text() == "x"


def test_lambda_container_killed_from_outside_is_a_runtime_exit_error(lambda_client, tmp_path):
    name = unique_name("killed")
    create_function(lambda_client, name)
    with ThreadPoolExecutor(1) as pool:
        event = {"pid_file": str(tmp_path / "pid"), "sleep_s": 30}
        running = pool.submit(_invoke, lambda_client, name, event)
        os.kill(read_pid(tmp_path / "pid"), signal.SIGKILL)
        response, error = running.result(timeout=30)
    assert response["FunctionError"] == "Unhandled"
    assert error["errorType"] == "Runtime.ExitError"
    assert error["errorMessage"].endswith("Runtime exited with error: signal: killed")
    served, answer = _invoke(lambda_client, name, {})
    assert "FunctionError" not in served  # a new container serves
    # An idle warm container killed from outside is replaced, not served: a cold start.
    os.kill(answer["pid"], signal.SIGKILL)
    wait_for(lambda: _dead(answer["pid"]), what="the container's death")
    served, again = _invoke(lambda_client, name, {})
    assert "FunctionError" not in served and again["pid"] != answer["pid"]


def test_idle_containers_are_stopped_after_the_idle_timeout():
    with Emulator(idle_timeout_s=0.5) as emu:
        client = lambda_client_for(emu)
        name = unique_name("idle")
        create_function(client, name)
        pid = _invoke(client, name, {})[1]["pid"]
        assert [c.pid for c in emu.containers()] == [pid]
        wait_for(lambda: not emu.containers() and not _alive(pid), what="the idle container stop")


def test_lambda_image_function_runs_the_handler_its_command_names(lambda_client):
    name = unique_name("image")
    lambda_client.create_function(
        FunctionName=name,
        Role=_ROLE,
        PackageType="Image",
        Code={"ImageUri": "registry.example.com/other:2"},
        ImageConfig={"Command": ["emulated_worker.handler"]},
    )
    lambda_client.get_waiter("function_active_v2").wait(
        FunctionName=name, WaiterConfig={"Delay": 0.2, "MaxAttempts": 100}
    )
    assert lambda_client.get_function(FunctionName=name)["Code"]["ImageUri"].endswith("other:2")
    response, answer = _invoke(lambda_client, name, {})
    assert "FunctionError" not in response, answer
    assert answer["function_name"] == name and answer["version"] == "v1"


def test_lambda_refuses_another_access_key(emulator):
    client = lambda_client_for(emulator, key_id="AKIAOTHERKEY00000000")
    with pytest.raises(ClientError) as refused:
        client.list_functions()
    assert refused.value.response["Error"]["Code"] == "UnrecognizedClientException"
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


# -- OpenWhisk ---------------------------------------------------------------------------------


def _put_action(ow: httpx.Client, name: str, **limits: int) -> httpx.Response:
    body = {
        "exec": {"kind": "python:3", "code": HANDLER_SOURCE},
        "limits": {"timeout": 30_000, "memory": 256, **limits},
        "parameters": [{"key": "default", "value": 7}],
    }
    response = ow.put(
        f"/api/v1/namespaces/_/actions/{name}", params={"overwrite": "true"}, json=body
    )
    assert response.status_code == 200, response.text
    return response


def _invoke_action(
    ow: httpx.Client, name: str, params: dict[str, Any], **query: str
) -> httpx.Response:
    return ow.post(f"/api/v1/namespaces/_/actions/{name}", params=query, json=params)


def _poll_activation(ow: httpx.Client, activation_id: str) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        response = ow.get(f"/api/v1/namespaces/_/activations/{activation_id}")
        assert response.status_code in (200, 404), response.text
        return response.json() if response.status_code == 200 else None

    record: dict[str, Any] = wait_for(finished, what=f"activation {activation_id}")
    return record


def test_openwhisk_actions_are_put_read_listed_and_deleted(ow):
    name = unique_name("action")
    created = _put_action(ow, name).json()
    assert created["version"] == "0.0.1" and created["limits"]["memory"] == 256
    again = ow.put(f"/api/v1/namespaces/_/actions/{name}", json={"exec": created["exec"]})
    assert again.status_code == 409  # without ?overwrite=true
    updated = _put_action(ow, name, memory=384).json()
    assert updated["version"] == "0.0.2" and updated["limits"]["memory"] == 384
    got = ow.get(f"/api/v1/namespaces/guest/actions/{name}", params={"code": "false"}).json()
    assert got["exec"] == {"kind": "python:3"} and got["parameters"][0]["key"] == "default"
    assert name in [a["name"] for a in ow.get("/api/v1/namespaces/_/actions").json()]
    too_big = {"exec": created["exec"], "limits": {"memory": 4096}}
    refused = ow.put(
        f"/api/v1/namespaces/_/actions/{name}", params={"overwrite": "true"}, json=too_big
    )
    assert refused.status_code == 400 and "memory" in refused.json()["error"]
    assert ow.delete(f"/api/v1/namespaces/_/actions/{name}").status_code == 200
    assert ow.get(f"/api/v1/namespaces/_/actions/{name}").status_code == 404


def test_openwhisk_blocking_invoke_answers_the_result(ow):
    name = unique_name("blocking")
    _put_action(ow, name)
    response = _invoke_action(ow, name, {"x": 1}, blocking="true", result="true")
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["event"] == {"default": 7, "x": 1}  # default parameters merged in
    assert result["activation_id"] == response.headers["x-openwhisk-activation-id"]
    assert 25_000 < result["deadline_ms"] - time.time() * 1000 <= 30_000
    record = _invoke_action(ow, name, {}, blocking="true").json()
    assert record["response"]["status"] == "success" and record["response"]["success"] is True
    annotations = {a["key"]: a["value"] for a in record["annotations"]}
    assert annotations["path"] == f"guest/{name}" and annotations["timeout"] is False
    assert record["duration"] >= 0 and any("handling" in line for line in record["logs"])
    failed = _invoke_action(ow, name, {"fail": True}, blocking="true")
    assert failed.status_code == 502
    assert failed.json()["response"]["status"] == "application error"
    assert failed.json()["response"]["result"] == {"error": "failed on purpose"}


def test_openwhisk_non_blocking_invoke_answers_202_then_the_activation_can_be_read(ow):
    name = unique_name("async")
    _put_action(ow, name)
    response = _invoke_action(ow, name, {"sleep_s": 0.5})
    assert response.status_code == 202
    activation_id = response.json()["activationId"]
    assert ow.get(f"/api/v1/namespaces/_/activations/{activation_id}").status_code == 404
    record = _poll_activation(ow, activation_id)
    assert record["response"]["status"] == "success"
    assert record["response"]["result"]["activation_id"] == activation_id
    result = ow.get(f"/api/v1/namespaces/_/activations/{activation_id}/result").json()
    assert result["success"] is True


def test_openwhisk_blocking_invoke_past_the_window_answers_202():
    with Emulator(blocking_window_s=0.5) as emu, ow_client_for(emu) as ow:
        name = unique_name("slow")
        _put_action(ow, name)
        # ?timeout=MS may shorten the window, not lengthen it (OpenWhisk's rule).
        longer = _invoke_action(ow, name, {}, blocking="true", timeout="600")
        assert longer.status_code == 400 and "up to 500" in longer.json()["error"]
        response = _invoke_action(ow, name, {"sleep_s": 1.5}, blocking="true", result="true")
        assert response.status_code == 202
        record = _poll_activation(ow, response.json()["activationId"])
        assert record["response"]["status"] == "success" and record["duration"] >= 1500


def test_openwhisk_timeout_and_memory_limit_are_developer_errors(ow, tmp_path):
    name = unique_name("limits")
    _put_action(ow, name, timeout=1000, memory=128)
    timed_out = _invoke_action(
        ow, name, {"pid_file": str(tmp_path / "t"), "sleep_s": 60}, blocking="true"
    )
    assert timed_out.status_code == 502
    record = timed_out.json()
    assert record["response"]["status"] == "action developer error"
    assert record["response"]["result"]["error"] == (
        "The action exceeded its time limits of 1000 milliseconds."
    )
    assert {"key": "timeout", "value": True} in record["annotations"]
    assert not _alive(read_pid(tmp_path / "t"))
    oom = _invoke_action(
        ow, name, {"pid_file": str(tmp_path / "m"), "alloc_mb": 300}, blocking="true"
    )
    assert oom.status_code == 502
    assert oom.json()["response"]["result"]["error"] == (
        "The action exhausted its memory and was aborted."
    )
    assert not _alive(read_pid(tmp_path / "m"))


def test_openwhisk_concurrency_limit_answers_429(ow, emulator):
    name = unique_name("busy")
    _put_action(ow, name)
    running = [_invoke_action(ow, name, {"sleep_s": 2}) for _ in range(2)]
    assert [r.status_code for r in running] == [202, 202]
    refused = _invoke_action(ow, name, {})
    assert refused.status_code == 429
    assert refused.json()["error"].startswith("Too many concurrent requests in flight")
    for response in running:
        assert _poll_activation(ow, response.json()["activationId"])["response"]["success"]


def test_openwhisk_blackbox_action_runs_the_handler_mapped_to_its_image(ow):
    name = unique_name("blackbox")
    body = {"exec": {"kind": "blackbox", "image": IMAGE}, "limits": {"memory": 256}}
    assert ow.put(f"/api/v1/namespaces/_/actions/{name}", json=body).status_code == 200
    response = _invoke_action(ow, name, {"x": 2}, blocking="true", result="true")
    assert response.status_code == 200, response.text
    assert response.json()["event"] == {"x": 2} and response.json()["version"] == "v1"
    # With code, the image runs it, as OpenWhisk's Python runtime images do.
    code = HANDLER_SOURCE.replace('"v1"', '"v3"')
    body["exec"] = {"kind": "blackbox", "image": IMAGE, "code": code, "main": "main"}
    put = ow.put(f"/api/v1/namespaces/_/actions/{name}", params={"overwrite": "true"}, json=body)
    assert put.status_code == 200
    response = _invoke_action(ow, name, {}, blocking="true", result="true", timeout="30000")
    assert response.status_code == 200 and response.json()["version"] == "v3"


def test_openwhisk_refuses_other_credentials_and_namespaces(emulator, ow):
    user = emulator.openwhisk_auth.partition(":")[0]
    url = f"{emulator.openwhisk_url}/api/v1/namespaces"
    assert httpx.get(url, auth=(user, "not-the-key")).status_code == 401
    assert httpx.get(url).status_code == 401
    assert ow.get(url).json() == ["guest"]
    assert ow.get("/api/v1/namespaces/someone-else/actions").status_code == 403


# -- the HTTP server ----------------------------------------------------------------------------


def test_a_whole_fan_out_of_connections_is_queued_before_any_is_accepted():
    """A hundred workers connect at once: the kernel must complete every handshake even before
    the server's loop accepts one (socketserver's backlog of 5 let boto3 see connections closed
    under a 100-worker fan-out). The server here is bound and listening but never accepts."""
    import socket

    from smlt.emulator.config import DEFAULT_MAX_CONCURRENCY
    from smlt.emulator.server import _Server

    server = _Server(("127.0.0.1", 0), emulator=None)  # type: ignore[arg-type]
    address = (str(server.server_address[0]), int(server.server_address[1]))
    connections = []
    try:
        for _ in range(2 * DEFAULT_MAX_CONCURRENCY):
            # A dropped handshake is retried by the kernel after a second: past the timeout.
            connections.append(socket.create_connection(address, timeout=0.8))
    finally:
        for connection in connections:
            connection.close()
        server.server_close()
    assert len(connections) == 2 * DEFAULT_MAX_CONCURRENCY


# -- what must not leak ------------------------------------------------------------------------


def test_server_binds_loopback_and_logs_no_credential(emulator, emulator_log, lambda_client, ow):
    assert EmulatorConfig().host == "127.0.0.1"
    assert emulator.address[0] == "127.0.0.1"
    # Some traffic of every kind, refused requests included.
    lambda_client.list_functions()
    with pytest.raises(ClientError):
        lambda_client_for(emulator, key_id="AKIAOTHERKEY00000000").list_functions()
    httpx.get(f"{emulator.openwhisk_url}/api/v1/namespaces", auth=("x", "y"))
    ow.get("/api/v1/namespaces/_/actions")
    secrets = [
        emulator.aws_credentials.access_key_id,
        emulator.aws_credentials.secret_access_key,
        emulator.openwhisk_auth.partition(":")[2],
        base64.b64encode(emulator.openwhisk_auth.encode()).decode(),
    ]
    assert len(emulator_log) > 10  # requests are logged: there is something to check
    for record in emulator_log:
        text = record.getMessage() + (record.exc_text or "")
        assert not [s for s in secrets if s in text], text
    assert not [s for s in secrets if s in repr(emulator.aws_credentials)]


def test_containers_inherit_no_credential_of_the_emulator(monkeypatch):
    auth = "5b0f6bd1-1111-2222-3333-444455556666:inherit-probe-key"
    key = auth.partition(":")[2]
    monkeypatch.setenv("SMLT_EMULATOR_OPENWHISK_AUTH", auth)  # how the CLI may be given it
    monkeypatch.setenv("__OW_API_KEY", auth)  # a shell that sourced the env file
    with Emulator(openwhisk_auth=auth) as emu, ow_client_for(emu) as ow:
        client = lambda_client_for(emu)
        name = unique_name("env")
        create_function(client, name)
        assert _invoke(client, name, {"probe": key})[1]["env_with_probe"] == []
        _put_action(ow, name)
        result = _invoke_action(ow, name, {"probe": key}, blocking="true", result="true").json()
        assert result["env_with_probe"] == []
        # An action that asks for the key gets it, as on OpenWhisk, and only that one.
        body = {"annotations": [{"key": "provide-api-key", "value": True}]}
        ow.put(f"/api/v1/namespaces/_/actions/{name}", params={"overwrite": "true"}, json=body)
        result = _invoke_action(ow, name, {"probe": key}, blocking="true", result="true").json()
        assert result["env_with_probe"] == ["__OW_API_KEY"]


def test_cli_writes_credentials_to_a_private_file_and_prints_none(tmp_path):
    env_file = tmp_path / "private" / "emulator.env"
    marker = f"emulator-cli-{os.getpid()}-{time.monotonic_ns()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "smlt", "emulator", "--env-file", str(env_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "SMLT_TEST_MARKER": marker},
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    printed = []
    try:
        deadline = time.monotonic() + 60
        while not printed or "Ctrl-C" not in printed[-1]:
            printed.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
        assert env_file.stat().st_mode & 0o777 == 0o600
        words = shlex.split(env_file.read_text(), comments=True)
        exported = dict(word.split("=", 1) for word in words if word != "export")
        url = exported["AWS_ENDPOINT_URL_LAMBDA"]
        assert url.startswith("http://127.0.0.1:") and exported["__OW_API_HOST"] == url
        assert f"  AWS_ENDPOINT_URL_LAMBDA={url}\n" in printed
        client = boto3.client(
            "lambda",
            endpoint_url=url,
            aws_access_key_id=exported["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=exported["AWS_SECRET_ACCESS_KEY"],
            region_name=exported["AWS_DEFAULT_REGION"],
        )
        assert client.list_functions()["Functions"] == []
        user, _, key = exported["__OW_API_KEY"].partition(":")
        with httpx.Client(base_url=url, auth=(user, key), timeout=60) as ow:
            _put_action(ow, "probe")
            ran = _invoke_action(ow, "probe", {}, blocking="true", result="true")
            assert ran.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert not env_file.exists()  # removed when the emulator stopped
    output = "".join(printed) + stderr
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "__OW_API_KEY"):
        assert exported[name] not in output
    assert "openwhisk probe" in stderr  # the invocation was logged, without credentials
    assert processes_with(marker) == []  # no container outlived the emulator
