"""The Ray backend against a real Ray of 2 CPUs, started once for this module.

Entry points live in ``ray_entrypoints.py`` beside this file; the workers find it through the
backend's ``runtime_env`` (the same path a cluster user takes). Every test deploys its own
placement group and releases it, so tests do not see each other's reservations.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import trio

from smlt.backends import get_backend
from smlt.backends.ray_backend import RayBackend
from smlt.backends.ray_capacity import ClusterCapacity, cpu_share, cpu_units_for
from smlt.errors import (
    BackendError,
    CapacityError,
    ConfigError,
    FunctionTimeoutError,
    OutOfMemoryError,
    ShardTimeoutError,
    TaskError,
    WorkerError,
)
from smlt.protocol.payload import WorkerPayload

TESTS_DIR = str(Path(__file__).resolve().parent)
RUNTIME_ENV = {"env_vars": {"PYTHONPATH": TESTS_DIR}}


@pytest.fixture(scope="module")
def ray_owner() -> Iterator[RayBackend]:
    """The backend that starts Ray (2 CPUs) for the module and shuts it down at the end."""
    if ray.is_initialized():
        ray.shutdown()  # the session's shared Ray (tests/conftest.py): this module needs its own
    owner = RayBackend(num_cpus=2)
    owner.connect()
    assert owner.statistics()["started_ray"]
    yield owner
    trio.run(owner.aclose)
    assert not ray.is_initialized()


def backend(entry: str, **options: Any) -> RayBackend:
    """A backend for one test; it joins the running Ray, so its aclose leaves Ray up."""
    return RayBackend(entry_point=f"ray_entrypoints:{entry}", runtime_env=RUNTIME_ENV, **options)


def payload(rank: int, workers: int, memory_mb: int, **changes: Any) -> WorkerPayload:
    base = WorkerPayload(
        job_id="ray-test",
        rank=rank,
        workers=workers,
        memory_mb=memory_mb,
        redis_urls=("redis://127.0.0.1:1/0",),
        object_store_url="file:///nowhere",
        batch_size=8,
        total_iterations=10,
    )
    return base.with_changes(**changes)


# -- capacity arithmetic (no Ray) ----------------------------------------------------------------


def test_cpu_share_follows_lambda_memory_rule() -> None:
    assert cpu_share(1769) == 1.0
    assert cpu_share(3538) == 2.0
    assert cpu_share(884) == 0.4997  # rounded down to Ray's 1/10,000 CPU
    assert cpu_units_for(128) == 723


def test_capacity_packs_whole_workers_per_node() -> None:
    # Two nodes of 1.5 CPUs: 3 CPUs in total, but no node holds a worker of 1.7 CPUs.
    two_nodes = ClusterCapacity.of([(1.5, 8 * 2**30), (1.5, 8 * 2**30)])
    assert two_nodes.max_workers(3008) == 0
    assert two_nodes.max_workers(1769) == 2
    assert two_nodes.largest_memory_mb(2, 128, 10240) == 2653  # 1.4997 CPUs each
    message = two_nodes.explain(1, 3008, 128, 10240)
    assert "the largest node has 1.5" in message
    assert "1 worker x 2653 MB" in message


def test_capacity_counts_memory_as_well_as_cpu() -> None:
    small_memory = ClusterCapacity.of([(8.0, 2 * 2**30)])
    assert small_memory.max_workers(1024) == 2
    assert small_memory.largest_memory_mb(4, 128, 10240) == 512


# -- the real backend ------------------------------------------------------------------------------


def test_limits_and_fit_on_two_cpus(ray_owner: RayBackend) -> None:
    limits = ray_owner.limits
    assert (limits.min_memory_mb, limits.max_memory_mb) == (128, 10240)
    assert limits.max_duration_s == float("inf")
    assert limits.max_concurrency == 27  # 27 x 0.0723 CPU <= 2 < 28 x 0.0723
    assert ray_owner.fit_memory_mb(4) == 884
    assert ray_owner.default_memory_mb(4) == 884
    assert ray_owner.fit_memory_mb(1) == 1769  # capped at one vCPU by default ...
    assert ray_owner.fit_memory_mb(1, at_most_mb=10240) == 3538  # ... the cluster holds 2
    with pytest.raises(CapacityError, match="28 workers x 128 MB"):
        ray_owner.fit_memory_mb(28)


def test_invoke_returns_the_entry_points_report(ray_owner: RayBackend) -> None:
    async def main() -> None:
        b = backend("echo")
        try:
            await b.deploy("echo", 1, 884)
            invocation = await b.invoke(payload(0, 1, 884, start_iteration=3, generation=2))
            assert 0.0 <= invocation.billed_s < 30  # running: counts up to now
            report = await invocation.result(timeout_s=30)
            assert (report.rank, report.generation) == (0, 2)
            assert (report.first_iteration, report.next_iteration) == (3, 10)
            billed_s = invocation.billed_s
            assert 0 < billed_s < 30
            await trio.sleep(0.05)
            assert invocation.billed_s == billed_s  # ended: the bill stops counting
            stats = b.statistics()
            assert (stats["invocations"], stats["succeeded"], stats["failed"]) == (1, 1, 0)
            assert stats["cpus_per_worker"] == 0.4997
        finally:
            await b.aclose()
        assert b.statistics()["placement_group"] is None
        assert ray.is_initialized()  # b did not start Ray, so it leaves it running

    trio.run(main)


def test_four_workers_of_884_mb_run_at_once(ray_owner: RayBackend, tmp_path: Path) -> None:
    async def main() -> None:
        b = backend("barrier")
        try:
            await b.deploy("barrier", 4, 884)
            started = time.monotonic()
            # Run one after another, the first would wait alone until it gives up, however long
            # that is; run at once, all pass as soon as the last has started. Starting 4 worker
            # processes for the test's runtime_env takes seconds on an idle machine and over 20 s
            # on a loaded one (the suite runs on several processes, each with its own Ray), so
            # the bound is generous: it only decides how long a failure takes to show.
            barrier_s = 90
            options = {"barrier_dir": str(tmp_path), "barrier_timeout_s": barrier_s}
            invocations = [await b.invoke(payload(r, 4, 884, options=options)) for r in range(4)]
            reports: list[Any] = [None] * 4

            async def wait(rank: int) -> None:
                reports[rank] = await invocations[rank].result(timeout_s=barrier_s + 30)

            async with trio.open_nursery() as nursery:
                for rank in range(4):
                    nursery.start_soon(wait, rank)
            assert [r.rank for r in reports] == [0, 1, 2, 3]
            assert time.monotonic() - started < barrier_s
        finally:
            await b.aclose()

    trio.run(main)


def test_capacity_error_says_what_fits(ray_owner: RayBackend) -> None:
    async def main() -> None:
        b = backend("echo")
        try:
            with pytest.raises(CapacityError) as caught:
                await b.deploy("too-big", 4, 3008)
            message = str(caught.value)
            assert "4 workers x 3008 MB need 6.8 CPUs" in message
            assert "this cluster has 2 CPUs" in message
            assert "at most 4 workers x 884 MB or 1 worker x 3008 MB" in message
            assert b.statistics()["placement_group"] is None
            with pytest.raises(CapacityError, match="5 workers x 884 MB"):
                await b.deploy("one-too-many", 5, 884)
            # Re-scaling releases the old group first: 4 x 884 MB, then 2 x 1769 MB, fit.
            await b.deploy("rescale", 4, 884)
            await b.deploy("rescale", 2, 1769)
            assert b.statistics()["workers"] == 2
        finally:
            await b.aclose()

    trio.run(main)


def test_entry_point_exception_is_worker_error_with_traceback(ray_owner: RayBackend) -> None:
    async def main() -> None:
        b = backend("raise_value_error")
        try:
            await b.deploy("raise", 1, 884)
            invocation = await b.invoke(payload(0, 1, 884))
            with pytest.raises(WorkerError, match="ValueError: rank 0 cannot go on") as caught:
                await invocation.result(timeout_s=30)
            trace = caught.value.remote_traceback
            assert "raise ValueError(f\"rank {event['rank']} cannot go on\")" in trace
            assert "ray_entrypoints.py" in trace
            assert b.statistics()["failed"] == 1
        finally:
            await b.aclose()

    trio.run(main)


def test_smlt_errors_come_back_as_themselves(ray_owner: RayBackend) -> None:
    async def main() -> None:
        b = backend("raise_smlt_error")
        try:
            await b.deploy("smlt-errors", 1, 884)
            for cls in (OutOfMemoryError, TaskError, ShardTimeoutError):
                options = {"error": cls.__name__}
                invocation = await b.invoke(payload(0, 1, 884, options=options))
                with pytest.raises(cls) as caught:
                    await invocation.result(timeout_s=30)
                assert type(caught.value) is cls
                if isinstance(caught.value, ShardTimeoutError):
                    assert str(caught.value) == "shard 1 never came"
                    assert caught.value.missing == (1,)  # attributes survive the trip
                else:
                    assert str(caught.value) == f"{cls.__name__} from rank 0"
                assert "ray_entrypoints.py" in "\n".join(caught.value.__notes__)
        finally:
            await b.aclose()

    trio.run(main)


def test_worker_process_death_is_worker_error(ray_owner: RayBackend) -> None:
    async def main() -> None:
        b = backend("exit_process")
        try:
            await b.deploy("exit", 1, 884)
            invocation = await b.invoke(payload(0, 1, 884))
            with pytest.raises(WorkerError, match="worker process died"):
                await invocation.result(timeout_s=30)
        finally:
            await b.aclose()

    trio.run(main)


def test_overrun_raises_function_timeout_and_frees_the_bundle(ray_owner: RayBackend) -> None:
    async def main() -> None:
        b = backend("sleep")
        try:
            await b.deploy("sleep", 1, 884)
            invocation = await b.invoke(payload(0, 1, 884, options={"sleep_s": 60}))
            started = time.monotonic()
            with pytest.raises(FunctionTimeoutError, match="within 1 s"):
                await invocation.result(timeout_s=1)
            assert time.monotonic() - started < 3
            await invocation.cancel()  # already stopped: a no-op that must not raise
            assert 1 <= invocation.billed_s < 3
            # The killed task released rank 0's bundle: a new invocation runs there.
            short = await b.invoke(payload(0, 1, 884, options={"sleep_s": 0}))
            assert (await short.result(timeout_s=20)).rank == 0
        finally:
            await b.aclose()

    trio.run(main)


def test_cancelled_wait_leaves_the_task_running(ray_owner: RayBackend) -> None:
    async def main() -> None:
        b = backend("sleep")
        try:
            await b.deploy("wait", 1, 884)
            invocation = await b.invoke(payload(0, 1, 884, options={"sleep_s": 1.5}))
            with trio.move_on_after(0.2) as scope:
                await invocation.result(timeout_s=30)
            assert scope.cancelled_caught
            assert (await invocation.result(timeout_s=20)).rank == 0
        finally:
            await b.aclose()

    trio.run(main)


def test_torch_threads_and_context_follow_the_share(ray_owner: RayBackend) -> None:
    async def main() -> None:
        b = backend("check_threads_and_context")
        try:
            await b.deploy("threads", 1, 3538)  # 2 CPUs: torch gets 2 threads
            event = payload(0, 1, 3538, function_timeout_s=60.0, options={"threads": 2})
            invocation = await b.invoke(event)
            assert (await invocation.result(timeout_s=30)).rank == 0
        finally:
            await b.aclose()

    trio.run(main)


def test_misuse_is_reported() -> None:
    with pytest.raises(ConfigError, match="module:function"):
        RayBackend(entry_point="no_colon")
    with pytest.raises(ConfigError, match="PACK"):
        RayBackend(placement_strategy="STRICT_WHATEVER")

    async def invoke_without_deploy() -> None:
        with pytest.raises(BackendError, match="before deploy"):
            await RayBackend().invoke(payload(0, 1, 884))

    trio.run(invoke_without_deploy)


def test_get_backend_by_name() -> None:
    assert isinstance(get_backend("ray", max_memory_mb=4096), RayBackend)
    with pytest.raises(ConfigError, match="known backends: aws_lambda, openwhisk, ray"):
        get_backend("kubernetes")
    with pytest.raises(ConfigError, match="needs the task's s_per_sample_1_vcpu"):
        get_backend("sim")
    with pytest.raises(ConfigError, match="bad option"):
        get_backend("ray", memory_gb=4)


def test_the_callers_sigterm_handler_survives_what_ray_init_installs() -> None:
    """``ray.init`` installs SIGTERM handlers (one prints a C++ trace and aborts); ensure_ray
    runs it inside this guard, so the CLI's handler, which stops a run cleanly, stays."""
    import signal

    from smlt.backends.ray_backend import _caller_keeps_sigterm

    def callers(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    def rays(signum: int, frame: object) -> None:
        raise SystemExit(1)

    before = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, callers)
    try:
        with _caller_keeps_sigterm():
            signal.signal(signal.SIGTERM, rays)  # what ray.init does
        assert signal.getsignal(signal.SIGTERM) is callers
    finally:
        signal.signal(signal.SIGTERM, before)
