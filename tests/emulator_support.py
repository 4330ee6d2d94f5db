"""Fixtures for tests that use smlt's emulator as the platform: a running emulator, a boto3 Lambda
client and an httpx OpenWhisk client pointed at it, and a tiny handler to deploy.

A test module imports the fixtures it uses under their own names (``from tests.emulator_support
import emulator_fixture as emulator_fixture``; pytest knows them as ``emulator``, ``emulator_log``,
``lambda_client`` and ``ow``), and the helpers as usual. The
emulator is module-scoped (each module that uses it gets one), allows two busy containers per
platform (so that a test can reach the limit cheaply), and keeps every record it logs in
``emulator_log`` for the test that checks no credential is ever logged. The handler
(:data:`HANDLER_SOURCE`) is plain Python, no torch: a cold start costs an interpreter.
"""

from __future__ import annotations

import io
import logging
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from botocore.config import Config

from smlt.emulator import Emulator

__all__ = [
    "HANDLER_SOURCE",
    "IMAGE",
    "create_function",
    "emulator_fixture",
    "emulator_log_fixture",
    "lambda_client_fixture",
    "lambda_client_for",
    "ow_client_for",
    "ow_fixture",
    "read_pid",
    "unique_name",
    "wait_for",
    "zipped",
]

#: One module that is both a Lambda handler (``handler``) and an OpenWhisk action (``main``).
#: What it does is driven by the event: write its pid to ``pid_file``, ``sleep_s``, allocate
#: ``alloc_mb`` (touching every page), ``raise``, ``fail`` (an OpenWhisk error result),
#: ``touch`` a file or ``append`` to one, report which environment variables hold ``probe``.
HANDLER_SOURCE = """
import os
import time

VERSION = "v1"


def _act(event):
    if event.get("pid_file"):
        with open(event["pid_file"], "w") as f:
            f.write(str(os.getpid()))
    print("handling", sorted(event))
    if event.get("append"):
        with open(event["append"], "a") as f:
            f.write("x")
    time.sleep(event.get("sleep_s", 0))
    if event.get("alloc_mb"):
        block = b"x" * (event["alloc_mb"] << 20)
        time.sleep(1.0)
        del block
    if event.get("raise"):
        raise ValueError("asked to raise")
    if event.get("touch"):
        open(event["touch"], "w").close()
    probe = event.get("probe")
    return {
        "pid": os.getpid(),
        "version": VERSION,
        "event": event,
        "env_with_probe": sorted(k for k, v in os.environ.items() if probe and probe in v),
    }


def handler(event, context):
    answer = _act(event)
    answer["remaining_ms"] = context.get_remaining_time_in_millis()
    answer["request_id"] = context.aws_request_id
    answer["memory_limit_in_mb"] = context.memory_limit_in_mb
    answer["function_name"] = context.function_name
    return answer


def main(args):
    if args.get("fail"):
        return {"error": "failed on purpose"}
    answer = _act(args)
    answer["activation_id"] = os.environ["__OW_ACTIVATION_ID"]
    answer["deadline_ms"] = int(os.environ["__OW_DEADLINE"])
    answer["api_host"] = os.environ["__OW_API_HOST"]
    return answer
"""

#: The image URI the module emulator maps to the handler above (``emulated_worker:main``).
IMAGE = "registry.example.com/smlt-worker:1"
_ROLE = "arn:aws:iam::123456789012:role/smlt-test"


def zipped(source: str = HANDLER_SOURCE, name: str = "handler.py") -> bytes:
    """A deployment zip holding ``source`` as ``name``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, source)
    return buffer.getvalue()


def wait_for(predicate: Callable[[], Any], timeout_s: float = 20.0, what: str = "it") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test at ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout_s} s")


def unique_name(prefix: str = "fn") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module", name="emulator_log")
def emulator_log_fixture() -> Iterator[list[logging.LogRecord]]:
    """Every record the emulator logs while the module runs (at DEBUG: requests too)."""
    logger = logging.getLogger("smlt.emulator")
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope="module", name="emulator")
def emulator_fixture(
    tmp_path_factory: pytest.TempPathFactory, emulator_log: list[logging.LogRecord]
) -> Iterator[Emulator]:
    code = tmp_path_factory.mktemp("emulated-image")
    (code / "emulated_worker.py").write_text(HANDLER_SOURCE)
    with Emulator(
        max_concurrency=2,
        container_env={"PYTHONPATH": str(code)},
        image_handlers={IMAGE: "emulated_worker:main"},
        event_retry_delays_s=(0.2,),
    ) as emu:
        yield emu


def lambda_client_for(emu: Emulator, *, key_id: str | None = None) -> Any:
    """A boto3 Lambda client for ``emu`` that never retries (a 429 must reach the test)."""
    credentials = emu.aws_credentials
    return boto3.client(
        "lambda",
        endpoint_url=emu.lambda_url,
        aws_access_key_id=key_id or credentials.access_key_id,
        aws_secret_access_key=credentials.secret_access_key,
        region_name=credentials.region,
        config=Config(retries={"total_max_attempts": 1, "mode": "standard"}, read_timeout=60),
    )


@pytest.fixture(scope="module", name="lambda_client")
def lambda_client_fixture(emulator: Emulator) -> Any:
    return lambda_client_for(emulator)


def ow_client_for(emu: Emulator, auth: str | None = None) -> httpx.Client:
    user, _, key = (auth or emu.openwhisk_auth).partition(":")
    return httpx.Client(base_url=emu.openwhisk_url, auth=(user, key), timeout=60)


@pytest.fixture(scope="module", name="ow")
def ow_fixture(emulator: Emulator) -> Iterator[httpx.Client]:
    with ow_client_for(emulator) as client:
        yield client


def create_function(client: Any, name: str, **options: Any) -> dict[str, Any]:
    """Create a zip function running :data:`HANDLER_SOURCE` and wait until it is Active."""
    arguments: dict[str, Any] = {
        "FunctionName": name,
        "Runtime": "python3.11",
        "Role": _ROLE,
        "Handler": "handler.handler",
        "Code": {"ZipFile": zipped()},
        "Timeout": 30,
        "MemorySize": 256,
        **options,
    }
    created: dict[str, Any] = client.create_function(**arguments)
    client.get_waiter("function_active_v2").wait(
        FunctionName=name, WaiterConfig={"Delay": 0.2, "MaxAttempts": 100}
    )
    return created


def read_pid(path: Path) -> int:
    return int(wait_for(lambda: path.exists() and path.read_text(), what=f"{path} written"))
