"""Shared fixtures: a real redis-server per test session (no fakes for the store)."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from smlt.storage.redis_server import RedisServer
from smlt.sync.store import ParameterStore

_job_counter = itertools.count()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_server_b() -> Iterator[RedisServer]:
    """A second instance, for stores sharded over several Redis servers."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def job_id(request: pytest.FixtureRequest) -> str:
    """A job id unique within the session, so tests sharing one Redis never collide."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40]
    return f"{name}-{next(_job_counter)}"


def run_ranks(workers: int, fn: Callable[[int], Any], timeout_s: float = 60) -> list[Any]:
    """Run ``fn(rank)`` for every rank on its own thread; return results, re-raise the first
    error. Threads (each with its own Redis connection) stand in for worker processes in tests;
    the benchmark uses real processes."""
    results: list[Any] = [None] * workers
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(workers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout_s)
        if th.is_alive():
            raise TimeoutError(f"a rank did not finish within {timeout_s} s")
    if errors:
        raise errors[0]
    return results


@pytest.fixture(scope="session")
def _shared_ray() -> Iterator[dict[str, bool]]:
    """One local Ray for every module that trains in this process, so that each does not pay
    Ray's start and its workers' cold start again; shut down at the end of the session (a
    module that needs a Ray of its own, tests/test_ray_backend.py, shuts it down first)."""
    import ray

    state = {"started": False}
    yield state
    if state["started"] and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def in_process_runs(
    tmp_path_factory: pytest.TempPathFactory, _shared_ray: dict[str, bool]
) -> Iterator[Path]:
    """For modules that call ``smlt.train`` many times in this process: the session's local
    Ray (its worker processes stay warm between runs), the scheduler on a thread instead of an
    actor, and a private object store. Yields a scratch folder for outputs."""
    from smlt.backends.ray_backend import ensure_ray

    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SMLT_SCHEDULER_IN_PROCESS", "1")
        patch.setenv("SMLT_OBJECT_STORE", str(root / "objects"))
        patch.setenv("SMLT_FAULTS", "")
        if ensure_ray():
            _shared_ray["started"] = True
        yield root


@pytest.fixture
def store_factory(redis_server: RedisServer) -> Callable[[], ParameterStore]:
    return lambda: ParameterStore.from_urls(redis_server.url)
