"""Nothing left behind: ``smlt clean``, the workers' local cache, and what a run removes itself.

A run leaves only its result: the driver removes the workers' cache of the job when the run
ends, and after a success the packaged code and data and every checkpoint but the last. Warm
workers remove the caches of jobs they no longer serve. ``smlt clean`` removes what crashed runs
and old jobs left, and never what may still be in use: a job folder written to recently, or a
cache folder a worker holds.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from smlt.cli import app, parse_duration
from smlt.client.artifacts import package_task
from smlt.errors import ConfigError, TrainingError
from smlt.protocol.payload import WorkerPayload
from smlt.storage.artifacts import artifact_prefix, default_cache_dir
from smlt.storage.checkpoint import CheckpointStore
from smlt.storage.objects import LocalObjectStore, open_object_store
from smlt.worker import handler

pytest_plugins = ["tests.s3_server"]

DAY_S = 86400.0
# The file in a job's cache folder that a worker holds a shared flock on (see worker/handler.py);
# a test holds it the way another worker process would.
LEASE = ".in-use"

TASK = textwrap.dedent(
    """
    import torch
    from smlt.task import Task

    class T(Task):
        def data(self):
            g = torch.Generator().manual_seed(0)
            return torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g)
        def model(self):
            torch.manual_seed(0)
            return torch.nn.Linear(4, 1)
        def optimizer(self, model):
            return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        def loss(self, model, batch):
            x, y = batch
            return torch.nn.functional.mse_loss(model(x), y)

    class Failing(T):
        def loss(self, model, batch):
            raise RuntimeError("boom in the user's loss")
    """
)


def _write(path: Path, size: int, age_s: float = 0.0) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    if age_s:
        stamp = time.time() - age_s
        os.utime(path, (stamp, stamp))
    return size


class _Held:
    """A cache folder's lease, held as another worker process holds it."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(folder / LEASE, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_SH)

    def release(self) -> None:
        os.close(self.fd)


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SMLT_CACHE_DIR", str(root))
    assert default_cache_dir("x").parent == root
    return root


def _smlt(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smlt", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=dict(os.environ),
    )


# -- smlt clean --------------------------------------------------------------------------------


def test_clean_removes_old_jobs_and_caches_and_leaves_active_ones(
    tmp_path: Path, cache_root: Path
) -> None:
    objects = tmp_path / "objects"
    old = 10 * DAY_S
    freed = _write(objects / "jobs/old-job/artifact/manifest.json", 1500, old)
    freed += _write(objects / "jobs/old-job/checkpoints/000000005/param-0.bin", 2500, old)
    # Mostly old, but written to an hour ago: the job may be running.
    _write(objects / "jobs/active-job/artifact/manifest.json", 100, old)
    _write(objects / "jobs/active-job/checkpoints/000000011/param-0.bin", 100, 3600)
    _write(objects / "elsewhere/not-a-job.bin", 10, old)
    freed += _write(cache_root / "old-cache/shards/abc.bin", 700, old)
    _write(cache_root / "fresh-cache/shards/abc.bin", 10)
    _write(cache_root / "active-job/shards/abc.bin", 10, old)  # its job folder is active
    _write(cache_root / "held-cache/shards/abc.bin", 10, old)
    held = _Held(cache_root / "held-cache")
    try:
        store = ["--object-store", str(objects)]
        dry = _smlt(["clean", *store, "--dry-run"], tmp_path)
        assert dry.returncode == 0, dry.stderr
        assert "would remove" in dry.stdout and "old-job" in dry.stdout
        assert (objects / "jobs/old-job").is_dir() and (cache_root / "old-cache").is_dir()
        assert f"would free 4.7 KB ({freed:,} bytes)" in dry.stdout

        proc = _smlt(["clean", *store], tmp_path)
        assert proc.returncode == 0, proc.stderr
    finally:
        held.release()
    removed = [line for line in proc.stdout.splitlines() if line.startswith("removed")]
    assert len(removed) == 2, proc.stdout
    assert "jobs/old-job/" in removed[0] and "old-cache" in removed[1]
    assert f"freed 4.7 KB ({freed:,} bytes)" in proc.stdout
    assert "1 job folder(s) written to in the last 7d left alone" in proc.stdout
    assert not (objects / "jobs/old-job").exists()
    assert not (cache_root / "old-cache").exists()
    assert (objects / "jobs/active-job/checkpoints/000000011/param-0.bin").is_file()
    assert (objects / "elsewhere/not-a-job.bin").is_file()
    assert (cache_root / "fresh-cache/shards/abc.bin").is_file()
    assert (cache_root / "held-cache/shards/abc.bin").is_file()
    assert (cache_root / "active-job/shards/abc.bin").is_file()
    # A shorter threshold makes the active job old enough; the held cache stays held no matter.
    again = _smlt(["clean", *store, "--older-than", "30m"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert not (objects / "jobs/active-job").exists()
    assert not (cache_root / "active-job").exists()
    assert not (cache_root / "held-cache").exists()  # released above: now it may go


@pytest.mark.parametrize("text", ["7", "7x", "-1d", "0s", "d", "1.5.2h", ""])
def test_a_malformed_duration_names_the_accepted_forms(text: str) -> None:
    with pytest.raises(ConfigError, match=r"--older-than .* s, m, h, d or w \(90s, 30m"):
        parse_duration(text, option="--older-than")


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("30m", 1800), ("1.5h", 5400)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration("7d") == 7 * DAY_S and parse_duration("2w") == 14 * DAY_S


def test_clean_with_a_malformed_duration_fails_and_removes_nothing(
    tmp_path: Path, cache_root: Path
) -> None:
    objects = tmp_path / "objects"
    _write(objects / "jobs/old-job/artifact/manifest.json", 10, 30 * DAY_S)
    proc = _smlt(["clean", "--object-store", str(objects), "--older-than", "7 days"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --older-than '7 days' is not a duration")
    assert "Traceback" not in proc.stderr
    assert (objects / "jobs/old-job/artifact/manifest.json").is_file()


def test_clean_on_s3_goes_by_the_time_objects_were_written(
    s3_bucket: str, cache_root: Path
) -> None:
    url = f"s3://{s3_bucket}/team"
    store = open_object_store(url)
    store.put_bytes("jobs/done/artifact/manifest.json", b"m" * 300)
    store.put_bytes("jobs/done/checkpoints/000000001/param-0.bin", b"p" * 200)
    time.sleep(2.5)  # S3 times have a resolution of one second
    store.put_bytes("jobs/running/checkpoints/000000001/param-0.bin", b"p" * 50)
    result = CliRunner().invoke(app, ["clean", "--object-store", url, "--older-than", "2s"])
    assert result.exit_code == 0, result.output
    assert f"removed {url}/jobs/done/ (500 bytes" in result.output
    assert store.list("jobs/") == ["jobs/running/checkpoints/000000001/param-0.bin"]


# -- the workers' cache ------------------------------------------------------------------------


@pytest.fixture
def packaged(tmp_path: Path) -> Iterator[tuple[LocalObjectStore, list[str]]]:
    (tmp_path / "task.py").write_text(TASK)
    store = LocalObjectStore(tmp_path / "objects")
    jobs = ["job-a", "job-b"]
    for job in jobs:
        package_task(f"{tmp_path / 'task.py'}:T", store, job, check=False)
    yield store, jobs
    for warm in handler._WARM.values():  # this process played a warm worker: let go
        warm.lease.release()
    handler._WARM.clear()


def _payload(store: LocalObjectStore, job: str) -> WorkerPayload:
    return WorkerPayload(
        job_id=job,
        rank=0,
        workers=1,
        memory_mb=128,
        redis_urls=("redis://127.0.0.1:1/0",),
        object_store_url=store.url,
        batch_size=8,
        total_iterations=1,
    )


def test_a_worker_taking_up_a_job_removes_other_jobs_caches_unless_held(
    packaged: tuple[LocalObjectStore, list[str]], cache_root: Path
) -> None:
    store, (job_a, job_b) = packaged
    _write(cache_root / "stale-job/shards/abc.bin", 100)
    busy = _Held(cache_root / "busy-job")  # another worker process on this machine
    try:
        _task, reader = handler._warm(_payload(store, job_a))
        reader.rows(np.arange(4))  # downloads a data shard into the cache
        assert (cache_root / job_a).is_dir()
        assert not (cache_root / "stale-job").exists()

        # The warm worker moves on to job b: job a's data goes with it.
        handler._warm(_payload(store, job_b))
        assert not (cache_root / job_a).exists()
        assert (cache_root / job_b).is_dir()
        assert (cache_root / "busy-job").is_dir()
        assert sorted(p.name for p in cache_root.iterdir()) == ["busy-job", job_b]
    finally:
        busy.release()


def test_a_warm_worker_keeps_its_job_and_recovers_from_its_cache_being_removed(
    packaged: tuple[LocalObjectStore, list[str]], cache_root: Path
) -> None:
    store, (job_a, _job_b) = packaged
    first = handler._warm(_payload(store, job_a))
    assert handler._warm(_payload(store, job_a)) == first  # warm: nothing reloaded
    # Another worker taking up another job must not remove ours: we hold it.
    assert handler.remove_idle_caches(cache_root, keep={"job-b"}) == []
    assert (cache_root / job_a).is_dir()
    # The driver removes the cache when the run ends; a later run of the job (a resume) on this
    # warm worker starts a fresh folder and holds it again.
    removed = handler.remove_cache(job_a)
    assert removed is not None and removed.size_bytes > 0
    assert not (cache_root / job_a).exists()
    _task, reader = handler._warm(_payload(store, job_a))
    assert len(reader.rows(np.arange(4))[0]) == 4  # downloaded again
    assert handler.remove_idle_caches(cache_root, keep={"job-b"}) == []
    assert reader.cache_dir.is_dir() and reader.cache_dir.is_relative_to(cache_root / job_a)


# -- what a run removes itself -----------------------------------------------------------------

SLOW_TASK = TASK + textwrap.dedent(
    """
    import time

    class Slow(T):
        # A floor on iteration time, so the run is still going at the driver's status polls.
        def loss(self, model, batch):
            time.sleep(0.02)
            return super().loss(model, batch)

    CALLS = [0]

    class FailsLate(Slow):
        # From its 13th loss on, a worker process raises: a bug that a retry does not fix.
        def loss(self, model, batch):
            CALLS[0] += 1
            if CALLS[0] > 12:
                raise RuntimeError("boom in the user's loss")
            return super().loss(model, batch)
    """
)


@dataclass(frozen=True)
class Poll:
    """What the test saw at one of the driver's status polls during a run."""

    iteration: int
    cache_exists: bool  # the workers' cache folder of the job
    committed: int  # committed checkpoints in the object store


def _train_here(root: Path, name: str, cls: str, **options: object) -> tuple[Path, list[Poll]]:
    """``smlt.train`` in this process, watched at every status poll."""
    import smlt

    (root / f"{name}.py").write_text(SLOW_TASK)
    out = root / name
    polls: list[Poll] = []

    def progress(status: dict[str, Any]) -> None:
        plan = json.loads((out / "run.json").read_text())
        job = plan["job_id"]
        committed = CheckpointStore(open_object_store(plan["object_store"]), job).list_committed()
        polls.append(Poll(status["iteration"], default_cache_dir(job).is_dir(), len(committed)))

    smlt.train(
        f"{root / name}.py:{cls}",
        workers=2,
        batch_size=16,
        output=out,
        progress=progress,
        **options,  # type: ignore[arg-type]
    )
    return out, polls


@pytest.mark.slow
def test_a_successful_run_leaves_only_its_result(in_process_runs: Path) -> None:
    # A checkpoint every iteration, at most 3 kept while the run goes on.
    out, polls = _train_here(
        in_process_runs, "done", "Slow", epochs=6, checkpoint_every=1, keep_checkpoints=3
    )
    plan = json.loads((out / "run.json").read_text())
    job = plan["job_id"]
    assert any(p.cache_exists for p in polls), "the workers never cached the job: nothing tested"
    later = [p.committed for p in polls if p.iteration >= 8]
    assert later, f"the run ended before the test could watch it: {polls}"
    # 4 for a moment: the scheduler commits the newest checkpoint before it prunes the oldest.
    assert set(later) <= {3, 4}, polls
    assert not default_cache_dir(job).exists()
    store = open_object_store(plan["object_store"])
    assert store.list(artifact_prefix(job)) == []
    assert CheckpointStore(store, job).list_committed() == [plan["total_iterations"]]
    assert (out / "model.pt").is_file() and (out / "result.json").is_file()
    assert len(plan["sessions"]) == 1


@pytest.mark.slow
def test_a_failed_run_removes_the_cache_and_keeps_what_a_resume_needs(
    in_process_runs: Path,
) -> None:
    with pytest.raises(TrainingError, match="boom in the user's loss"):
        _train_here(in_process_runs, "failed", "FailsLate", epochs=6, checkpoint_every=2)
    plan = json.loads((in_process_runs / "failed" / "run.json").read_text())
    job = plan["job_id"]
    assert not default_cache_dir(job).exists()
    store = open_object_store(plan["object_store"])
    assert store.exists(artifact_prefix(job) + "manifest.json")
    assert CheckpointStore(store, job).list_committed()
