"""One contract every backend passes: ``ray``, and ``aws_lambda`` and ``openwhisk`` against
``smlt emulator`` (real HTTP, real boto3 and httpx, the worker in subprocess containers with
the platforms' memory, time and concurrency limits).

- deploying twice is deploying once, and a new generation's memory reaches the platform;
- an invocation runs the real worker: two ranks of a tiny job compute exactly the bytes two
  threads compute (tests/worker_harness.py); on aws_lambda a whole ``smlt.train`` runs instead,
  and its model holds those same bytes;
- what goes wrong comes back typed: the handler's exception (an smlt error as itself), the time
  limit (``FunctionTimeoutError``), memory (``OutOfMemoryError``), throttling
  (``ThrottledError``, after the bounded retries; a retry that finds room succeeds), refused
  credentials (``BackendAuthError``);
- ``clean`` removes what smlt created for the job, ``remove_managed`` what it created for any
  job, and neither touches a function smlt did not create, even one named like smlt's.

Where Ray has no such thing (throttling, credentials, a per-task memory limit, a platform time
limit), its test says so: it is skipped, or shows Ray's own form (a ``MemoryError`` in the
worker; the scheduler's bound on ``result``).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import numpy as np
import pytest
import trio
from botocore.config import Config

from smlt.backends.aws_lambda import LambdaBackend
from smlt.backends.base import Backend
from smlt.backends.openwhisk import OpenWhiskBackend
from smlt.backends.ray_backend import RayBackend
from smlt.backends.retry import ThrottleRetry
from smlt.errors import (
    BackendAuthError,
    ConfigError,
    FunctionTimeoutError,
    OutOfMemoryError,
    ShardTimeoutError,
    ThrottledError,
    WorkerError,
)
from smlt.protocol.payload import WorkerPayload
from smlt.protocol.state import collect_from_store
from smlt.storage.redis_server import RedisServer
from tests.test_worker import TASK
from tests.worker_harness import Outcome, ThreadedJob

TESTS_DIR = str(Path(__file__).resolve().parent)
BACKENDS = ["ray", "aws_lambda", "openwhisk"]
ROLE = "arn:aws:iam::123456789012:role/smlt-contract"
#: Images the emulator runs tests/contract_handlers.py for; any other runs smlt's own worker.
LAMBDA_IMAGE = "contract.example/handlers-lambda:1"
OPENWHISK_IMAGE = "contract.example/handlers-openwhisk:1"
WORKER_IMAGE = "contract.example/smlt-worker:1"
CONCURRENCY = 2


@dataclass(frozen=True)
class Emulated:
    """Where the emulator is and the credentials it accepts (from its environment file), and
    its process id (its containers are its child processes)."""

    env: dict[str, str]
    pid: int

    @property
    def url(self) -> str:
        return self.env["AWS_ENDPOINT_URL_LAMBDA"]

    @property
    def openwhisk_auth(self) -> str:
        return self.env["__OW_API_KEY"]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulated]:
    """``smlt emulator`` in its own process (tests/contract_emulator.py says why), found by the
    backends as a cloud is: through boto3's and wsk's environment variables."""
    folder = tmp_path_factory.mktemp("emulator")
    env_file = folder / "emulator.env"
    options = {
        "max_concurrency": CONCURRENCY,
        "container_env": {"PYTHONPATH": TESTS_DIR},
        "image_handlers": {
            LAMBDA_IMAGE: "contract_handlers:lambda_handler",
            OPENWHISK_IMAGE: "contract_handlers:main",
        },
        "openwhisk_max_memory_mb": 2048,
        "update_delay_s": 0.05,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.contract_emulator", json.dumps(options), str(env_file)],
        cwd=Path(TESTS_DIR).parent,
        stdin=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not (env_file.exists() and env_file.read_text().strip()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the emulator did not start")
            time.sleep(0.05)
        env = dict(
            (name, shlex.split(value)[0])
            for name, _, value in (
                line.removeprefix("export ").partition("=")
                for line in env_file.read_text().splitlines()
            )
        )
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            patch.setenv("WSK_CONFIG_FILE", str(folder / "no-wskprops"))
            patch.delenv("AWS_PROFILE", raising=False)
            yield Emulated(env, process.pid)
    finally:
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


@pytest.fixture(scope="module")
def ray_up(in_process_runs: Path) -> None:
    """The session's local Ray (tests/conftest.py)."""


def make(platform: str, *, worker: bool = False, **options: Any) -> Backend:
    """A backend of ``platform`` running the contract handlers (``worker``: smlt's worker)."""
    if platform == "ray":
        if worker:  # the warm worker processes other modules left can take it (no runtime_env)
            return RayBackend()
        env = {"env_vars": {"PYTHONPATH": TESTS_DIR}}
        return RayBackend(entry_point="contract_handlers:lambda_handler", runtime_env=env)
    quick = {"throttle": ThrottleRetry(max_attempts=3, base_s=0.05, cap_s=0.2, deadline_s=1)}
    if platform == "aws_lambda":
        image = WORKER_IMAGE if worker else LAMBDA_IMAGE
        return LambdaBackend(**{"image_uri": image, "role_arn": ROLE, **quick, **options})
    if worker:  # the injected main is smlt's (smlt.worker.entrypoints.openwhisk_main)
        return OpenWhiskBackend(
            **{"image": WORKER_IMAGE, "max_memory_mb": 2048, **quick, **options}
        )
    # The stand-in's main, injected as the backend injects smlt's.
    code = "from contract_handlers import main\n"
    return OpenWhiskBackend(
        **{"image": OPENWHISK_IMAGE, "code": code, "max_memory_mb": 2048, **quick, **options}
    )


def payload(job: str, rank: int = 0, memory_mb: int = 256, **options: Any) -> WorkerPayload:
    return WorkerPayload(
        job_id=job,
        rank=rank,
        workers=2,
        memory_mb=memory_mb,
        redis_urls=("redis://127.0.0.1:1/0",),
        object_store_url="file:///nowhere",
        batch_size=8,
        total_iterations=5,
        options=options,
    )


def new_job() -> str:
    return f"contract-{uuid.uuid4().hex[:8]}"


def memory_of(platform: str, emu: Emulated, name: str) -> int | None:
    """The memory the platform holds for function ``name`` (None: there is none)."""
    if platform == "aws_lambda":
        client = lambda_client(emu)
        try:
            return int(client.get_function_configuration(FunctionName=name)["MemorySize"])
        except client.exceptions.ResourceNotFoundException:
            return None
    with ow_client(emu) as ow:
        found = ow.get(f"/api/v1/namespaces/_/actions/{name}")
        return int(found.json()["limits"]["memory"]) if found.status_code == 200 else None


def revision_of(platform: str, emu: Emulated, name: str) -> str:
    """What changes whenever the platform's function changes (Lambda's RevisionId, OpenWhisk's
    version)."""
    if platform == "aws_lambda":
        return str(
            lambda_client(emu).get_function(FunctionName=name)["Configuration"]["RevisionId"]
        )
    with ow_client(emu) as ow:
        return str(ow.get(f"/api/v1/namespaces/_/actions/{name}").json()["version"])


def lambda_client(emu: Emulated) -> Any:
    return boto3.client(
        "lambda",
        endpoint_url=emu.url,
        aws_access_key_id=emu.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=emu.env["AWS_SECRET_ACCESS_KEY"],
        region_name=emu.env["AWS_DEFAULT_REGION"],
        # The test's own look at the platform retries what a loaded machine may drop.
        config=Config(retries={"total_max_attempts": 3, "mode": "standard"}),
    )


def ow_client(emu: Emulated) -> httpx.Client:
    user, _, key = emu.openwhisk_auth.partition(":")
    return httpx.Client(base_url=emu.url, auth=(user, key), timeout=30)


def create_foreign(platform: str, emu: Emulated, name: str) -> None:
    """A function smlt did not create (no tag, no annotation), named as smlt names its own."""
    if platform == "aws_lambda":
        client = lambda_client(emu)
        client.create_function(
            FunctionName=name, Role=ROLE, PackageType="Image", Code={"ImageUri": LAMBDA_IMAGE}
        )
        client.get_waiter("function_active_v2").wait(
            FunctionName=name, WaiterConfig={"Delay": 0.1, "MaxAttempts": 100}
        )
        return
    with ow_client(emu) as ow:
        action = {"exec": {"kind": "blackbox", "image": OPENWHISK_IMAGE}}
        ow.put(f"/api/v1/namespaces/_/actions/{name}", json=action).raise_for_status()


def delete_foreign(platform: str, emu: Emulated, name: str) -> None:
    if platform == "aws_lambda":
        lambda_client(emu).delete_function(FunctionName=name)
    else:
        with ow_client(emu) as ow:
            ow.delete(f"/api/v1/namespaces/_/actions/{name}")


@pytest.fixture(params=BACKENDS)
def platform(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    request.getfixturevalue("ray_up" if name == "ray" else "emulator")
    return name


# -- deploy --------------------------------------------------------------------------------------


def test_deploying_twice_is_deploying_once(platform: str, request: pytest.FixtureRequest) -> None:
    job = new_job()
    backend = make(platform)
    memory = 884 if platform == "ray" else 256

    async def main() -> None:
        try:
            await backend.deploy(job, 2, memory)
            if platform == "ray":
                assert isinstance(backend, RayBackend)
                group = backend.statistics()["placement_group"]
                await backend.deploy(job, 2, memory)
                assert (backend.statistics()["workers"], backend.statistics()["memory_mb"]) == (
                    2,
                    memory,
                )
                assert backend.statistics()["placement_group"] not in (None, group)
                return
            emu = request.getfixturevalue("emulator")
            name = f"smlt-{job}"
            assert memory_of(platform, emu, name) == memory
            revision = revision_of(platform, emu, name)
            await backend.deploy(job, 2, memory)
            assert revision_of(platform, emu, name) == revision  # nothing changed, nothing sent
            await backend.deploy(job, 2, 2 * memory)  # the next generation's memory
            assert memory_of(platform, emu, name) == 2 * memory
            assert revision_of(platform, emu, name) != revision
        finally:
            await backend.aclose()

    trio.run(main)


# -- an invocation runs the worker -----------------------------------------------------------------


@pytest.fixture(scope="module")
def task_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("task") / "regression.py"
    path.write_text(TASK)
    return path


ITERATIONS = 6  # one epoch: 203 samples in batches of 40


def regression_job(root: Path, redis: RedisServer, task_file: Path, name: str) -> ThreadedJob:
    return ThreadedJob(
        root / name,
        redis,
        name,
        task_file,
        "RegressionAdam",
        workers=2,
        iterations=ITERATIONS,
        batch_size=40,
    )


@pytest.fixture(scope="module")
def threads_ran(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, task_file: Path
) -> Outcome:
    """The job as two threads compute it (tests/worker_harness.py): what every backend must
    reproduce, byte for byte."""
    root = tmp_path_factory.mktemp("threads")
    return regression_job(root, redis_server, task_file, f"{new_job()}-threads").run()


def test_an_invocation_runs_the_real_worker(
    platform: str,
    redis_server: RedisServer,
    task_file: Path,
    threads_ran: Outcome,
    tmp_path: Path,
) -> None:
    """Two ranks through the backend compute the bytes two threads compute."""
    if platform == "aws_lambda":  # a cold start imports PyTorch: each one is dear
        pytest.skip("on aws_lambda a whole smlt.train runs the real worker (below)")
    memory = 884 if platform == "ray" else 1024
    remote = regression_job(tmp_path, redis_server, task_file, new_job())
    backend = make(platform, worker=True)

    async def main() -> list[Any]:
        try:
            await backend.deploy(remote.job, 2, memory)
            payloads = [remote.payload(r, 0, 0, "").with_changes(memory_mb=memory) for r in (0, 1)]
            invocations = [await backend.invoke(p) for p in payloads]
            reports = [await i.result(timeout_s=180) for i in invocations]
            assert all(i.billed_s > 0 for i in invocations)
            return reports
        finally:
            await backend.aclose()

    reports = trio.run(main)
    assert [(r.rank, r.next_iteration, r.stop_reason) for r in reports] == [
        (0, ITERATIONS, "finished"),
        (1, ITERATIONS, "finished"),
    ]
    size = threads_ran.final.values.size
    final = collect_from_store(remote.store, remote.keys, ITERATIONS, 2, size)
    assert np.array_equal(final.values, threads_ran.final.values)
    assert final.optimizer.to_bytes() == threads_ran.optimizer_bytes


# -- what goes wrong comes back typed --------------------------------------------------------------


def run_one(backend: Backend, memory_mb: int, p: WorkerPayload, *, timeout_s: float = 60) -> Any:
    async def main() -> Any:
        try:
            await backend.deploy(p.job_id, 2, memory_mb)
            invocation = await backend.invoke(p)
            return await invocation.result(timeout_s=timeout_s)
        finally:
            await backend.aclose()

    return trio.run(main)


def test_the_handlers_exception_comes_back_typed(platform: str) -> None:
    memory, job = 884 if platform == "ray" else 256, new_job()
    backend = make(platform)

    async def main() -> None:
        try:
            await backend.deploy(job, 2, memory)
            raising = await backend.invoke(payload(job, 1, memory, act="raise"))
            with pytest.raises(WorkerError, match="ValueError: rank 1 cannot go on") as raised:
                await raising.result(timeout_s=60)
            assert "contract_handlers.py" in raised.value.remote_traceback
            smlt_error = payload(job, 1, memory, act="raise_smlt", error="ShardTimeoutError")
            with pytest.raises(ShardTimeoutError, match="ShardTimeoutError from rank 1"):
                await (await backend.invoke(smlt_error)).result(timeout_s=60)
        finally:
            await backend.aclose()

    trio.run(main)


def test_the_time_limit_is_function_timeout_error(platform: str) -> None:
    memory = 884 if platform == "ray" else 256
    slow = payload(new_job(), 0, memory, act="sleep", sleep_s=30).with_changes(
        function_timeout_s=1.0
    )
    # Ray has no platform limit: the scheduler's bound on result() is what stops a worker.
    bound_s = 3.0 if platform == "ray" else 60.0
    with pytest.raises(FunctionTimeoutError):
        run_one(make(platform), memory, slow, timeout_s=bound_s)


def test_running_out_of_memory_is_out_of_memory_error(platform: str) -> None:
    if platform == "ray":  # no per-task limit to exceed: the allocation fails in the worker
        p, memory = payload(new_job(), 0, 884, act="memory_error"), 884
    else:  # the platform kills the container over its 128 MB
        p, memory = payload(new_job(), 0, 128, act="alloc", alloc_mb=400), 128
    with pytest.raises(OutOfMemoryError):
        run_one(make(platform), memory, p)


def test_throttling_is_retried_then_throttled_error(platform: str) -> None:
    if platform == "ray":
        pytest.skip("Ray does not throttle: a worker beyond the reservation waits for room")
    job = new_job()
    patient = make(platform, throttle=ThrottleRetry(max_attempts=50, base_s=0.1, cap_s=0.5))
    impatient = make(platform)  # 3 attempts within 1 s

    async def main() -> None:
        try:
            await patient.deploy(job, 2, 128)
            await impatient.deploy(job, 2, 128)
            busy = [
                await patient.invoke(payload(job, r, 128, act="sleep", sleep_s=2)) for r in (0, 1)
            ]
            await trio.sleep(0.5)  # both running: the platform is full
            refused = await impatient.invoke(payload(job, 0, 128))
            with pytest.raises(ThrottledError, match="still throttled after 3 attempt"):
                await refused.result(timeout_s=30)
            waiting = await patient.invoke(payload(job, 1, 128))  # retried until room is made
            assert (await waiting.result(timeout_s=30)).rank == 1
            for invocation in busy:
                await invocation.result(timeout_s=30)
            assert isinstance(patient, LambdaBackend | OpenWhiskBackend)
            assert patient.statistics()["throttled"] >= 1
        finally:
            await impatient.aclose()
            await patient.aclose()

    trio.run(main)


def test_openwhisk_polls_an_activation_that_outlasts_the_blocking_window(
    emulator: Emulated,
) -> None:
    """Past the blocking window OpenWhisk answers 202 with the activation id; the backend then
    polls the activation's record for the report (and its billed duration)."""
    backend = make("openwhisk", blocking_window_s=0.5)
    slow = payload(new_job(), 0, 256, act="sleep", sleep_s=2)
    assert run_one(backend, 256, slow).next_iteration == 5
    assert isinstance(backend, OpenWhiskBackend)
    assert backend.statistics()["polled"] == 1


def test_refused_credentials_are_backend_auth_error(
    platform: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if platform == "ray":
        pytest.skip("a local Ray has no credentials to refuse")
    if platform == "aws_lambda":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTTHEEMULATORS0")
        backend = make(platform)
    else:
        backend = make(platform, auth="23bc46b1-71f6-4ed5-8c54-816aa4f8c502:wrong")

    async def main() -> None:
        try:
            await backend.deploy(new_job(), 2, 256)
        finally:
            await backend.aclose()  # refused the same way: nothing was created

    with pytest.raises(BackendAuthError):
        trio.run(main)


# -- clean -----------------------------------------------------------------------------------------


def test_clean_removes_what_smlt_created_and_nothing_else(
    platform: str, request: pytest.FixtureRequest
) -> None:
    if platform == "ray":
        backend = make(platform)

        async def ray_main() -> None:
            await backend.deploy(new_job(), 2, 884)
            assert backend.statistics()["placement_group"] is not None
            await backend.clean()
            await backend.clean()  # twice is fine
            assert backend.statistics()["placement_group"] is None
            await backend.aclose()

        trio.run(ray_main)
        return
    emu = request.getfixturevalue("emulator")
    foreign = f"smlt-{new_job()}"  # exactly the name smlt would give that job
    create_foreign(platform, emu, foreign)
    mine, other = new_job(), new_job()
    a, b = make(platform), make(platform)
    assert isinstance(a, LambdaBackend | OpenWhiskBackend)
    assert isinstance(b, LambdaBackend | OpenWhiskBackend)
    try:

        async def main() -> None:
            await a.deploy(mine, 2, 256)
            # A rank given more memory (a repeated out-of-memory) runs in a companion function.
            bigger = await a.invoke(payload(mine, 1, 512))
            assert (await bigger.result(timeout_s=30)).rank == 1
            await b.deploy(other, 2, 256)
            await a.clean()
            await a.clean()  # twice is fine
            # smlt never takes over a function it did not create, even one named like its own.
            with pytest.raises(ConfigError, match="smlt did not create it"):
                await make(platform).deploy(foreign.removeprefix("smlt-"), 2, 256)
            # What a crashed run left: every labelled function, and only those.
            leftovers = await b.remove_managed(dry_run=True)
            assert {(r.name, r.job_id) for r in leftovers} >= {(f"smlt-{other}", other)}
            removed = await b.remove_managed()
            assert f"smlt-{other}" in {r.name for r in removed}
            assert foreign not in {r.name for r in removed}
            await b.aclose()

        trio.run(main)
        for name in (f"smlt-{mine}", f"smlt-{mine}-512mb", f"smlt-{other}"):
            assert memory_of(platform, emu, name) is None, f"{name} survived"
        assert memory_of(platform, emu, foreign) is not None, "smlt deleted a function not its own"
    finally:
        delete_foreign(platform, emu, foreign)


def test_no_credential_reaches_a_result_or_a_message(platform: str) -> None:
    """What the backends return and raise names no secret (the OpenWhisk key, AWS keys)."""
    if platform == "ray":
        pytest.skip("no credentials")
    backend = make(platform)
    with pytest.raises(WorkerError) as raised:
        run_one(backend, 256, payload(new_job(), 0, 256, act="raise"))
    text = json.dumps(
        [str(raised.value), raised.value.remote_traceback, repr(backend.__dict__)], default=str
    )
    import os

    for secret in (os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["__OW_API_KEY"].split(":")[1]):
        assert secret not in text


def test_smlt_clean_backend_deletes_what_crashed_runs_left(
    emulator: Emulated, tmp_path: Path
) -> None:
    """``smlt clean --backend aws_lambda``: every function labelled as smlt's and not updated
    for --older-than, whatever job left it; a function smlt did not create stays."""
    from typer.testing import CliRunner

    from smlt.cli import app

    def run_smlt(args: list[str], folder: Path) -> Any:
        env = {"SMLT_OBJECT_STORE": str(folder / "objects")}
        return CliRunner().invoke(app, args, env=env), None

    left, foreign = new_job(), f"smlt-{new_job()}"
    create_foreign("aws_lambda", emulator, foreign)
    crashed = make("aws_lambda")

    async def run_that_crashed() -> None:
        await crashed.deploy(left, 2, 256)  # and never cleaned

    trio.run(run_that_crashed)
    time.sleep(1.1)
    try:
        args = ["clean", "--backend", "aws_lambda", "--older-than", "1s"]
        listed, _ = run_smlt([*args, "--dry-run"], tmp_path)
        assert listed.exit_code == 0, listed.output
        assert f"would delete aws_lambda function smlt-{left} (job {left}" in listed.output
        assert foreign not in listed.output
        assert memory_of("aws_lambda", emulator, f"smlt-{left}") == 256
        done, _ = run_smlt(args, tmp_path)
        assert done.exit_code == 0, done.output
        assert f"deleted aws_lambda function smlt-{left}" in done.output
        assert memory_of("aws_lambda", emulator, f"smlt-{left}") is None
        assert memory_of("aws_lambda", emulator, foreign) == 128
    finally:
        delete_foreign("aws_lambda", emulator, foreign)


# -- a whole run ---------------------------------------------------------------------------------


def train_on_lambda(spec: str, out: Path, monkeypatch: pytest.MonkeyPatch, **options: Any) -> Any:
    """``smlt.train`` of ``spec`` on the emulated Lambda: 2 workers, one epoch of batches of 40."""
    import smlt

    monkeypatch.setenv("SMLT_LAMBDA_IMAGE", WORKER_IMAGE)
    monkeypatch.setenv("SMLT_LAMBDA_ROLE", ROLE)
    return smlt.train(
        spec,
        backend="aws_lambda",
        workers=2,
        epochs=1,
        batch_size=40,
        seed=0,
        output=out,
        **options,
    )


def final_parameters(spec: str, result: Any) -> np.ndarray:
    import torch

    from smlt.protocol.model import FlatModel
    from smlt.task import load_task

    model = load_task(spec).model()
    model.load_state_dict(torch.load(result.output_dir / "model.pt"))
    return FlatModel(model).values_numpy()


@pytest.fixture(scope="module")
def lambda_run(
    emulator: Emulated, in_process_runs: Path, task_file: Path
) -> tuple[Any, np.ndarray]:
    """The regression job, whole, on the emulated Lambda: (its result, its final parameters)."""
    spec = f"{task_file}:RegressionAdam"
    with pytest.MonkeyPatch.context() as patch:
        result = train_on_lambda(
            spec, in_process_runs / f"run-aws-lambda-{uuid.uuid4().hex[:6]}", patch
        )
    return result, final_parameters(spec, result)


def test_a_whole_run_on_emulated_lambda_computes_what_threads_and_ray_compute(
    lambda_run: tuple[Any, np.ndarray], threads_ran: Outcome
) -> None:
    """``smlt.train`` end to end on aws_lambda (the emulator; real Redis, the object store a
    local folder the containers read too): the model it saves holds exactly the parameters of
    the same job on two threads, which the Ray backend's workers reproduce byte for byte
    (test_an_invocation_runs_the_real_worker[ray]). A second whole run, on Ray, would repeat
    that for 15 s more of the suite; the digits example on both backends (seed 4, 3 workers, 2
    epochs) is benchmarks/emulated_parity.py, its figures benchmarks/results/."""
    result, parameters = lambda_run
    assert (result.backend, result.iterations) == ("aws_lambda", ITERATIONS)
    assert result.failures == []
    assert np.array_equal(parameters, threads_ran.final.values)


def stopped_containers(emulator_pid: int) -> list[int]:
    """The emulator's containers (its child processes) that are stopped (state ``T``)."""
    from smlt.emulator.runtime import MARKER

    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        state, parent = stat.rsplit(")", 1)[1].split()[:2]
        if int(parent) == emulator_pid and state == "T" and MARKER.encode() in argv:
            found.append(int(entry.name))
    return found


def test_a_container_killed_mid_run_is_recovered_with_the_same_parameters(
    emulator: Emulated,
    in_process_runs: Path,
    task_file: Path,
    lambda_run: tuple[Any, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGKILL of an emulated Lambda container mid-run, from outside, as the platform's host
    would: the run ends with the parameters of the same run without it, bit for bit, as on Ray
    (tests/test_fault_phases.py).

    To kill at a known point, rank 1 stops itself (SIGSTOP: ``hang``) on its first attempt,
    right after publishing its parameter shard for iteration 4 (at the end of 3); the test
    finds the stopped container among the emulator's children and SIGKILLs it. The emulator
    answers the call as Lambda answers a runtime that died (``Runtime.ExitError``), the
    scheduler re-invokes rank 1 in a new container, which adopts what the dead one had
    published. The heartbeat bound is long, so the recovery is the kill's, not the heartbeat's
    (the cause is checked)."""
    import os
    import signal
    import threading

    killed: list[int] = []
    done = threading.Event()

    def kill_when_stopped() -> None:
        deadline = time.monotonic() + 300
        while not done.is_set() and time.monotonic() < deadline:
            for pid in stopped_containers(emulator.pid):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_stopped, daemon=True)
    killer.start()
    monkeypatch.setenv("SMLT_FAULTS", "hang:rank=1:iteration=3:phase=after-publish")
    spec = f"{task_file}:RegressionAdam"
    try:
        result = train_on_lambda(
            spec,
            in_process_runs / f"run-aws-lambda-kill-{uuid.uuid4().hex[:6]}",
            monkeypatch,
            heartbeat_timeout_s=120,
        )
    finally:
        done.set()
        killer.join(5)
    assert len(killed) == 1, "no container stopped, so none was killed"
    assert [(f["rank"], f["attempt"]) for f in result.failures] == [(1, 0)]
    cause = result.failures[0]["cause"]
    assert "Runtime.ExitError" in cause and "killed" in cause, cause
    assert result.iterations == ITERATIONS
    _, clean_parameters = lambda_run
    assert np.array_equal(final_parameters(spec, result), clean_parameters)
