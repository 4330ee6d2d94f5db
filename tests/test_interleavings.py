"""A failure never changes the result: a worker raises at every point of a step where it can
fail, is re-invoked from the first iteration it had not reported, and the job must end with
exactly the bytes of a run without the failure: every rank's parameters, and the optimizer state
in the store.

The points (SMLT_FAULTS phases) are before the step, during and after the gradient uploads,
after the owner published its new shard, during the gather, during a checkpoint write, and
between the finished step and its report. The last four are the interleavings where the
replacement finds its shard of t + 1 already published and must adopt it, parameters *and*
optimizer state. Optimizers: SGD with momentum and Adam (sharded, stateful) and a
non-elementwise one (replicated). Ranks are threads (tests/worker_harness.py); the same faults
with kill and raise through Ray, the scheduler and the CLI are in tests/test_fault_phases.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from smlt.protocol.faults import PHASES
from smlt.storage.objects import ObjectStore
from smlt.storage.redis_server import RedisServer
from smlt.sync import codec
from smlt.worker.trainer import PROGRESS_TTL_S
from tests.test_worker import TASK
from tests.worker_harness import Outcome, ThreadedJob

WORKERS = 3
ITERATIONS = 8
FAULT_AT = 4
CHECKPOINT_EVERY = 3  # versions 3 and 6: a during-checkpoint fault at 4 fires writing 6
CLASSES = ["Regression", "RegressionAdam", "RegressionReplicated"]


@pytest.fixture(scope="module")
def task_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("task") / "regression.py"
    path.write_text(TASK)
    return path


def _job(
    tmp: Path, redis: RedisServer, job: str, task_file: Path, cls: str, **extra: Any
) -> ThreadedJob:
    return ThreadedJob(
        tmp,
        redis,
        job,
        task_file,
        cls,
        workers=WORKERS,
        iterations=ITERATIONS,
        batch_size=50,
        options={"checkpoint_every": CHECKPOINT_EVERY},
        **extra,
    )


@pytest.fixture(scope="module")
def clean_runs(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, task_file: Path
) -> dict[str, Outcome]:
    out = {}
    for cls in CLASSES:
        tmp = tmp_path_factory.mktemp(f"clean-{cls}")
        out[cls] = _job(tmp, redis_server, f"clean-{cls}", task_file, cls).run()
    return out


def assert_same(got: Outcome, clean: Outcome) -> None:
    for values in got.values:
        assert np.array_equal(values, clean.values[0]), "parameters differ from the clean run"
    assert np.array_equal(got.final.values, clean.final.values)
    assert got.optimizer_bytes == clean.optimizer_bytes, "optimizer state differs"


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("cls", CLASSES)
def test_a_worker_that_fails_anywhere_in_a_step_changes_nothing(
    cls: str,
    phase: str,
    tmp_path: Path,
    redis_server: RedisServer,
    task_file: Path,
    job_id: str,
    clean_runs: dict[str, Outcome],
) -> None:
    job = _job(tmp_path, redis_server, job_id, task_file, cls)
    got = job.run(f"raise:rank=1:iteration={FAULT_AT}:phase={phase}")
    assert got.attempts[1] == 1, "the fault did not fire"
    assert_same(got, clean_runs[cls])
    # The checkpoint shards the replacement wrote hold the clean run's bytes (frames name their
    # job, so compare what they carry).
    for version in (3, 6):
        for kind in ("param", "optim"):
            mine = _shard(job.objects, job_id, version, kind)
            theirs = _shard(clean_runs[cls].checkpoints.store, f"clean-{cls}", version, kind)
            assert mine == theirs, f"checkpoint {version} {kind} shard differs"


def _shard(objects: ObjectStore, job: str, version: int, kind: str) -> tuple[bytes, object]:
    raw = objects.get_bytes(f"jobs/{job}/checkpoints/{version:09d}/{kind}-1.bin")
    frame = codec.decode_frame(raw, codec.FrameHeader(kind, job, version, 1), kind)
    return frame.array.tobytes(), frame.side


@pytest.mark.parametrize("cls", ["RegressionAdam", "RegressionReplicated"])
def test_two_copies_of_a_rank_at_once_change_nothing(
    cls: str,
    tmp_path: Path,
    redis_server: RedisServer,
    task_file: Path,
    job_id: str,
    clean_runs: dict[str, Outcome],
) -> None:
    job = _job(tmp_path, redis_server, job_id, task_file, cls)
    got = job.run(duplicate=1)
    assert_same(got, clean_runs[cls])
    assert 0 < job.store.client(0).ttl(job.keys.progress()) <= PROGRESS_TTL_S  # it expires
    ranks = [int(r["rank"]) for r in got.reports if "event" not in r]
    assert ranks.count(1) > ITERATIONS, "the duplicate did not run"


def test_the_adopting_replacement_reloads_the_optimizer_state(
    tmp_path: Path,
    redis_server: RedisServer,
    task_file: Path,
    job_id: str,
    clean_runs: dict[str, Outcome],
) -> None:
    """The defect this file was written for: after-publish, SGD with momentum. Before the fix
    the replacement kept its freshly built optimizer (no momentum) and drifted."""
    job = _job(tmp_path, redis_server, job_id, task_file, "Regression")
    got = job.run(
        "raise:rank=0:iteration=1:phase=after-publish,raise:rank=2:iteration=6:phase=before-report"
    )
    assert got.attempts == {0: 1, 1: 0, 2: 1}
    assert_same(got, clean_runs["Regression"])


def test_a_late_duplicate_fails_at_once_and_changes_nothing(
    tmp_path: Path,
    redis_server: RedisServer,
    task_file: Path,
    job_id: str,
    clean_runs: dict[str, Outcome],
) -> None:
    """A copy delivered after its twin moved on finds its start version deleted: it must fail
    at once (not wait the shard timeout), and write nothing that changes the result."""
    job = _job(tmp_path, redis_server, job_id, task_file, "RegressionAdam")
    started = time.monotonic()
    got = job.run(duplicate=1, duplicate_after=4)
    assert_same(got, clean_runs["RegressionAdam"])
    [stale] = got.stale
    assert "version 0 is no longer in the store" in str(stale)
    assert time.monotonic() - started < 20  # the shard timeout is 30 s


@pytest.mark.parametrize("cls", ["RegressionAdam", "RegressionReplicated"])
def test_values_split_into_chunks_change_nothing_either(
    cls: str,
    tmp_path: Path,
    redis_server: RedisServer,
    task_file: Path,
    job_id: str,
    clean_runs: dict[str, Outcome],
) -> None:
    """Every frame over 256 bytes (so every parameter, state and gradient frame) is stored as
    chunks, as a model over Redis's 512 MB value limit is: with a rank re-run after publishing
    and a duplicate, the result is still the clean run's."""
    job = _job(tmp_path, redis_server, job_id, task_file, cls, max_value_bytes=256)
    got = job.run(f"raise:rank=1:iteration={FAULT_AT}:phase=after-publish", duplicate=2)
    assert got.attempts[1] == 1
    assert_same(got, clean_runs[cls])
    chunks = list(job.store.client(0).scan_iter(f"smlt:{job_id}:*:c0"))
    assert chunks, "nothing was chunked"
