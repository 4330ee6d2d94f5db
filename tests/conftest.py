"""Shared fixtures: a real redis-server per test session (no fakes for the store).

The suite runs on several processes (pytest-xdist, ``addopts`` in pyproject.toml), a test file
per process at a time; each process is a test session of its own, so nothing here is shared
between them: each starts its own redis-servers (each on a free port the kernel hands out), its
own local Ray (ports and session folder of its own, as two ``ray.init()`` on one machine are) and
gets its own ``tmp_path`` root. What the processes do share is the machine, so a test that looks
at machine-wide state scopes it to what it started: processes by a marker in their environment
(tests/cli_support.py) or by parent pid, Redis keys by a job id, caches and object stores by job
id or a private folder.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from smlt.storage.redis_server import RedisServer
from smlt.sync.store import ParameterStore

_job_counter = itertools.count()
#: This process's name among pytest-xdist's workers ("gw0-", "gw1-", ...; "" when not distributed).
_WORKER = f"{os.environ['PYTEST_XDIST_WORKER']}-" if "PYTEST_XDIST_WORKER" in os.environ else ""


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
    """A job id unique within the session, so tests sharing one Redis never collide, and unique
    on the machine (the xdist worker's name), so that what is keyed by job id machine-wide (a
    worker's cache folder, a default object store) is never shared with a sibling worker's test
    whose name begins the same."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40]
    return f"{name}-{_WORKER}{next(_job_counter)}"


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
    """One local Ray for every module that trains in this process (this xdist worker), so that
    each does not pay Ray's start and its workers' cold start again; shut down at the end of the
    session (a module that needs a Ray of its own, tests/test_ray_backend.py, shuts it down
    first)."""
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
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SMLT_SCHEDULER_IN_PROCESS", "1")
        patch.setenv("SMLT_OBJECT_STORE", str(root / "objects"))
        patch.setenv("SMLT_FAULTS", "")
        if _start_ray():
            _shared_ray["started"] = True
        yield root


def _start_ray() -> bool:
    """``ensure_ray()``, tried a second time if the first start failed.

    Ray gives its raylet a fixed 30 s to register with the GCS ("The current node timed out
    during startup"); a start takes about 4 s on an idle 2-core machine, but this suite runs on
    several processes and shares the machine, and under a load of 20 that bound was missed once.
    A start that fails twice is an error; the tests that use this Ray are not about its start."""
    import ray

    from smlt.backends.ray_backend import ensure_ray

    try:
        return ensure_ray()
    except Exception as exc:
        ray.shutdown()  # whatever the failed start left running
        print(f"Ray's start failed, starting it again: {exc}", file=sys.stderr)
        return ensure_ray()


@pytest.fixture
def store_factory(redis_server: RedisServer) -> Callable[[], ParameterStore]:
    return lambda: ParameterStore.from_urls(redis_server.url)
