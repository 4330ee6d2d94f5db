"""The task scheduler: its failure policy and progress log (pure), then the real scheduler.

The scheduler tests run :class:`TaskScheduler` in this process with the real Ray backend and a
real Redis. Their workers are :func:`scripted`, an entry point in this module (Ray workers import
it by name, through the backend's ``runtime_env``): it speaks the real protocol (heartbeat, stop
agreement, progress reports, fault injection with its fault events, checkpoint shards written
through the real :class:`CheckpointStore`) without training anything, and fails where the test's
script says, so each test takes seconds. The last test is a real re-scaled ``smlt.train`` run.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from smlt.actors.committer import Committer
from smlt.actors.failures import FailurePolicy, RetryPolicy, cause_key, more_memory_mb
from smlt.actors.progress import CheckpointReady, ProgressLog
from smlt.actors.resource_manager import ResourceManager
from smlt.actors.scheduler import JobSpec, TaskScheduler, generation_leftovers
from smlt.errors import (
    ConfigError,
    FunctionTimeoutError,
    ObjectStoreError,
    OutOfMemoryError,
    TrainingError,
)
from smlt.protocol.control import Heartbeat, should_stop
from smlt.protocol.faults import Fault, FaultInjector, fault_event
from smlt.protocol.payload import StopReason, WorkerPayload, WorkerReport
from smlt.storage.checkpoint import CheckpointStore
from smlt.storage.objects import open_object_store
from smlt.storage.redis_server import RedisServer
from smlt.sync.keys import JobKeys
from smlt.sync.store import ParameterStore

TESTS_DIR = str(Path(__file__).resolve().parent)
REPO = Path(TESTS_DIR).parent
MEMORY_MB = 256


# -- the failure policy (pure) --------------------------------------------------------------------


def policy(**retry: Any) -> FailurePolicy:
    """A policy without jitter: delays are exactly backoff_s x 2^k."""
    return FailurePolicy(RetryPolicy(**{"jitter": 0.0, **retry}), uniform=lambda: 0.5)


def test_a_budget_allows_max_attempts_failures_with_growing_delays() -> None:
    p = policy(max_attempts=3, backoff_s=1.0)
    first = p.decide(5, "WorkerError: rank 1 died", 0.0)
    second = p.decide(5, "ShardTimeoutError: rank 0 never came", 1.0)
    assert (first.retry, first.delay_s, first.failures) == (True, 1.0, 1)
    assert (second.retry, second.delay_s, second.failures) == (True, 2.0, 2)
    third = p.decide(5, "OutOfMemoryError: rank 1", 2.0)
    assert (third.retry, third.failures) == (False, 3)
    assert third.why == "failed 3 times without progress"


def test_the_same_cause_twice_without_progress_gives_up() -> None:
    p = policy(max_attempts=10)
    assert p.decide(7, "InjectedFault: raise at rank 1 iteration 7", 0.0).retry
    again = p.decide(7, "InjectedFault: raise at rank 2 iteration 7", 0.5)  # digits ignored
    assert not again.retry
    assert again.why == "failed the same way twice without progress"


def test_a_repeated_out_of_memory_is_retried_once_with_more_memory() -> None:
    p = policy(max_attempts=10, backoff_s=1.0)
    cause = "OutOfMemoryError: rank 1 used 257 MB of 256"
    first = p.decide(4, cause, 0.0, out_of_memory_at=(256, 10240))
    assert (first.retry, first.memory_mb) == (True, None)  # once may be bad luck
    second = p.decide(4, cause, 1.0, out_of_memory_at=(256, 10240))
    assert (second.retry, second.memory_mb) == (True, 512)  # twice: twice the memory, once
    third = p.decide(4, cause, 2.0, out_of_memory_at=(512, 10240))
    assert (third.retry, third.why) == (False, "failed the same way twice without progress")
    # At the platform's maximum there is no more to give.
    at_max = policy(max_attempts=10)
    assert at_max.decide(4, cause, 0.0, out_of_memory_at=(10240, 10240)).retry
    assert not at_max.decide(4, cause, 1.0, out_of_memory_at=(10240, 10240)).retry
    assert (more_memory_mb(3008, 10240), more_memory_mb(6000, 10240)) == (6016, 10240)
    assert more_memory_mb(512, 512) is None


def test_progress_starts_a_fresh_budget() -> None:
    p = policy(max_attempts=2, backoff_s=1.0, deadline_s=60.0)
    assert p.decide(5, "WorkerError: killed", 0.0).retry
    # A replacement got past iteration 5: the same cause, hours later, with one attempt left of
    # the old budget and its deadline long gone, is a fresh start.
    later = p.decide(9, "WorkerError: killed", 7200.0)
    assert (later.retry, later.delay_s, later.failures) == (True, 1.0, 1)
    # Without progress the new budget fills up like the first.
    assert p.decide(9, "heartbeat timeout", 7201.0).why == "failed 2 times without progress"


def test_the_deadline_counts_from_the_budgets_first_failure() -> None:
    p = policy(max_attempts=10, deadline_s=60.0)
    assert p.decide(3, "a", 0.0).retry
    assert p.decide(3, "b", 50.0).retry
    assert p.decide(4, "c", 100.0).retry  # 100 s after the first failure, but a fresh budget
    late = p.decide(4, "d", 170.5)
    assert not late.retry and late.why == "kept failing for over 60 s without progress"


def test_delay_jitter_band_and_cap() -> None:
    retry = RetryPolicy(backoff_s=1.0, max_backoff_s=5.0, jitter=0.5)
    assert retry.delay_s(1, 0.0) == 0.5
    assert retry.delay_s(1, 0.5) == 1.0
    assert retry.delay_s(3, 0.5) == 4.0
    assert retry.delay_s(9, 0.5) == 5.0
    assert 0.5 <= retry.delay_s(1) <= 1.5


def test_cause_key_ignores_numbers() -> None:
    assert cause_key("rank 1 died at 5") == cause_key("rank 3 died at 17")
    assert cause_key("rank 1 died") != cause_key("rank 1 hung")


# -- the progress log (pure) ----------------------------------------------------------------------


def report(rank: int, t: int, gen: int = 0, attempt: int = 0, **extra: Any) -> dict[str, str]:
    """A progress entry as a worker writes it (and the follower decodes it: all strings)."""
    fields: dict[str, Any] = {
        "rank": rank,
        "gen": gen,
        "attempt": attempt,
        "t": t,
        "loss": 1.0,
        "samples": 4,
        "batch": 8,
        "iter_s": 0.01,
        "bytes_up": 1,
        "bytes_down": 1,
        **{name: 0.0 for name in ("data_s", "compute_s", "sync_s")},
        **{name: 0.0 for name in ("ul_shard_s", "dl_shard_s", "ul_aggr_s", "dl_grad_s")},
        **{name: 0.0 for name in ("update_s", "codec_s", "upload_codec_s")},
        **extra,
    }
    return {k: str(v) for k, v in fields.items()}


def event(
    rank: int, t: int, *, gen: int = 0, attempt: int = 0, at: float = 100.0
) -> dict[str, str]:
    entry = fault_event(Fault("kill", rank, t), t, "start", generation=gen, attempt=attempt)
    return {k: str(v) for k, v in {**entry, "at_unix_s": at}.items()}


def test_a_fault_event_is_not_an_iteration_report() -> None:
    log = ProgressLog(4)
    log.start_generation(0, 2)
    assert log.fold(event(1, 3)) is None
    assert log.history == [] and log.rank_next == {}
    log.fold(report(0, 0))
    log.fold(report(1, 0))
    assert [h["iteration"] for h in log.history] == [0]
    assert log.rank_next == {0: 1, 1: 1}


def test_take_fault_pairs_an_event_with_the_failed_invocation() -> None:
    log = ProgressLog(4)
    log.start_generation(2, 2)
    log.fold(event(1, 3, gen=2, at=100.0))
    log.fold(event(1, 3, gen=2, at=99.0))  # the other copy of a duplicated invocation
    log.fold(event(0, 3, gen=2))
    assert log.take_fault(1, generation=1, attempt=0, first_iteration=0) is None
    assert log.take_fault(1, generation=2, attempt=1, first_iteration=0) is None
    assert log.take_fault(1, generation=2, attempt=0, first_iteration=4) is None
    found = log.take_fault(1, generation=2, attempt=0, first_iteration=2)
    assert found is not None and (found.rank, found.iteration, found.at_unix_s) == (1, 3, 99.0)
    assert found.action == "kill" and found.phase == "start"
    assert log.take_fault(1, generation=2, attempt=0, first_iteration=2) is None  # both claimed
    # An event without generation and attempt (an older worker) matches on rank and range.
    log.fold({k: v for k, v in event(0, 5).items() if k not in ("gen", "attempt")})
    assert log.take_fault(0, generation=2, attempt=0, first_iteration=4) is not None


def test_a_checkpoint_is_ready_once_every_rank_reported_its_shards() -> None:
    log = ProgressLog(4)
    log.start_generation(0, 2)
    shards = {"param": [10, "a" * 64], "optim": [20, "b" * 64]}
    ckpt = {"ckpt": 4, "ckpt_shards": json.dumps(shards)}
    assert log.fold(report(0, 3, **ckpt)) is None
    ready = log.fold(report(1, 3, **ckpt))
    assert ready == CheckpointReady(4, 0, 2, {0: shards, 1: shards})
    # A second report of the same rank (a duplicate, a replacement) announces nothing new.
    assert log.fold(report(1, 3, attempt=1, **ckpt)) is None
    # A report without readable records still completes the set; the commit then names it.
    log.fold(report(0, 5, ckpt=6, ckpt_shards="{not json"))
    ready = log.fold(report(1, 5, ckpt=6))
    assert ready is not None and ready.shards == {0: None, 1: None}


def test_an_iteration_is_recorded_once_however_often_it_is_reported() -> None:
    log = ProgressLog(4, history=[{"iteration": 0}])
    log.start_generation(0, 1)
    log.fold(report(0, 0))  # already in the history of a resumed run
    log.fold(report(0, 1))
    log.fold(report(0, 1))  # the other copy of a duplicated invocation
    log.fold(report(0, 1, attempt=1))  # a replacement re-running it
    assert [h["iteration"] for h in log.history] == [0, 1]


def test_late_reports_of_an_earlier_generation_complete_it_with_its_worker_count() -> None:
    log = ProgressLog(4)
    log.start_generation(0, 4)
    for rank in range(3):
        log.fold(report(rank, 5))
    log.start_generation(1, 2)  # re-scaled to 2 before the follower read rank 3's report
    log.fold(report(0, 5, gen=1))
    log.fold(report(3, 5))
    assert [(h["iteration"], h["workers"]) for h in log.history] == [(5, 4)]
    assert log.rank_next == {0: 6}  # positions are the current generation's


def test_meta_before_holds_only_earlier_iterations() -> None:
    log = ProgressLog(2)
    log.start_generation(0, 1)
    for t in range(5):
        log.fold(report(0, t, **({"metrics": json.dumps({"acc": t})} if t % 2 else {})))
    meta = log.meta_before(3)
    assert [h["iteration"] for h in meta["history"]] == [0, 1, 2]
    assert [e["iteration"] for e in meta["epochs"]] == [1]


def test_leftover_keys_of_a_generation() -> None:
    keys = JobKeys("j", "s")
    found = generation_leftovers(keys, 3, 10, 20, 2, {0: 0, 1: 2})
    assert len(found) == len(set(found))
    assert keys.stop(3) in found
    assert {keys.heartbeat(3, 1, a) for a in range(3)} <= set(found)
    assert keys.heartbeat(3, 0, 1) not in found
    assert {keys.grad(19, s, r) for s in range(2) for r in range(2)} <= set(found)
    assert keys.param(19, 1) in found and keys.param(20, 0) not in found
    assert all(k.startswith("smlt:j:s:") for k in found)
    # A generation that ran no iteration leaves no step keys (version 9 is the previous one's).
    assert generation_leftovers(keys, 4, 20, 20, 1, {}) == [keys.stop(4), keys.heartbeat(4, 0, 0)]


def test_the_committer_skips_what_a_newer_commit_superseded(tmp_path: Path) -> None:
    ckpts = CheckpointStore(open_object_store(tmp_path), "job")
    failures: list[dict[str, Any]] = []
    committer = Committer(
        ckpts, 10, keep=1, meta_before=lambda t: {"before": t}, on_failure=failures.append
    )

    def ready(version: int) -> CheckpointReady:
        shards = {}
        for kind in ("param", "optim"):
            rec = ckpts.write_shard(version, 0, kind, shard_bytes("job", version, 0, kind))  # type: ignore[arg-type]
            shards[kind] = [rec.size_bytes, rec.sha256]
        return CheckpointReady(version, 0, 1, {0: shards})

    late = ready(2)
    assert committer.commit(ready(4))
    assert not committer.commit(late)  # the boundary and periodic checkpoint of 4, or a late 2
    assert not committer.commit(ready(4))
    assert committer.commit(ready(6))
    assert committer.committed() == [4, 6]
    assert committer.statistics() == {"committed": 2, "skipped": 2}
    assert ckpts.list_committed() == [6]  # keep=1
    assert ckpts.load(6).meta == {"before": 6}
    assert not committer.commit(CheckpointReady(8, 1, 1, {0: None}))
    assert [f["checkpoint"] for f in failures] == [8]
    assert "reported no param-0.bin" in failures[0]["cause"]


def test_keep_checkpoints_must_keep_one() -> None:
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        JobSpec("j", ("redis://x",), "file:///x", 8, 10, 5, 3, keep_checkpoints=0)


# -- a scripted worker for the real scheduler -----------------------------------------------------
#
# The test puts a script (JSON) in Redis under a key outside the job's namespace:
#   fail:        [[rank, attempt, iteration, message], ...]  raise at the start of that iteration
#   oom:         [[rank, attempt, iteration], ...]  raise OutOfMemoryError there instead
#   fail_copy:   [rank, n]  the n-th delivery (1 or 2) of rank's attempt-0 invocation raises
#   misreport:   [iteration, kind]  report a wrong size for this rank-0 checkpoint shard
#   iteration_s: seconds per iteration


def _script_key(job_id: str) -> str:
    return f"scripted-test:{job_id}:script"


def _copy_key(job_id: str, gen: int, rank: int, attempt: int) -> str:
    return f"scripted-test:{job_id}:copies:{gen}:{rank}:{attempt}"


def _memory_key(job_id: str, gen: int, rank: int, attempt: int) -> str:
    return f"scripted-test:{job_id}:memory:{gen}:{rank}:{attempt}"


class ScriptedFailure(RuntimeError):
    pass


def shard_bytes(job: str, version: int, rank: int, kind: str) -> bytes:
    return f"{job}/{version}/{rank}/{kind}|".encode() * (5 + rank)


def scripted(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """A worker that runs the protocol without training (see the module docstring)."""
    p = WorkerPayload.from_dict(event)
    options = p.options
    keys = JobKeys(p.job_id, p.session)
    store = ParameterStore.from_urls(list(p.redis_urls))
    client = store.client(0)
    script = json.loads(client.get(_script_key(p.job_id)) or "{}")  # type: ignore[arg-type]
    checkpoints = CheckpointStore(open_object_store(p.object_store_url), p.job_id)

    def announce(fault: Fault, t: int, phase: str) -> None:
        entry = fault_event(fault, t, phase, generation=p.generation, attempt=p.attempt)
        client.xadd(keys.progress(), entry)  # type: ignore[arg-type]

    def write_checkpoint(version: int) -> dict[str, list[Any]]:
        shards = {}
        for kind in ("param", "optim"):
            data = shard_bytes(p.job_id, version, p.rank, kind)
            rec = checkpoints.write_shard(version, p.rank, kind, data)  # type: ignore[arg-type]
            size = rec.size_bytes + int(script.get("misreport") == [version, kind] and p.rank == 0)
            shards[kind] = [size, rec.sha256]
        return shards

    copy = client.incr(_copy_key(p.job_id, p.generation, p.rank, p.attempt))
    client.set(_memory_key(p.job_id, p.generation, p.rank, p.attempt), p.memory_mb, ex=600)
    planned = _memory_key(p.job_id, p.generation, p.rank, p.attempt) + ":planned"
    client.set(planned, p.options["generation_memory_mb"], ex=600)
    client.expire(_copy_key(p.job_id, p.generation, p.rank, p.attempt), 600)
    heartbeat = Heartbeat(
        client,
        keys,
        p.generation,
        p.rank,
        p.attempt,
        interval_s=float(options["heartbeat_interval_s"]),
        timeout_s=float(options["heartbeat_timeout_s"]),
    ).start()
    faults = FaultInjector.from_option(options["faults"], p.rank, p.attempt, on_fire=announce)
    began = time.monotonic()
    written: int | None = None
    shards: dict[str, list[Any]] | None = None
    t = p.start_iteration
    try:
        if script.get("fail_copy") == [p.rank, copy] and p.attempt == 0:
            raise ScriptedFailure(f"copy {copy} of rank {p.rank} fails")
        while t < p.end_iteration:
            if should_stop(client, keys, p.generation, t, propose=False):
                break
            faults.maybe_fire(t)
            for rank, attempt, iteration, message in script.get("fail", ()):
                if (rank, attempt, iteration) == (p.rank, p.attempt, t):
                    raise ScriptedFailure(f"{message} at iteration {t}")
            if [p.rank, p.attempt, t] in script.get("oom", ()):
                raise OutOfMemoryError(f"rank {p.rank} used {p.memory_mb + 1} MB of {p.memory_mb}")
            if [p.rank, p.attempt, t] in script.get("timeout", ()):
                raise FunctionTimeoutError(f"Task timed out (rank {p.rank})")
            # Lockstep, as synchronous training is: nobody finishes t before everyone started it.
            store.announce(0, keys.full_ready(t), p.rank, ttl_s=600)
            for _ in store.announcements(
                0, keys.full_ready(t), range(p.workers), timeout_s=60, what="scripted barrier"
            ):
                pass
            time.sleep(float(script.get("iteration_s", 0.01)))
            fields = report(p.rank, t, p.generation, p.attempt)
            every = int(options.get("checkpoint_every", 0))
            if every and (t + 1) % every == 0:
                shards, written = write_checkpoint(t + 1), t + 1
                fields.update(ckpt=str(t + 1), ckpt_shards=json.dumps(shards))
            client.xadd(keys.progress(), fields)  # type: ignore[arg-type]
            t += 1
        if t > p.start_iteration and written != t:
            shards, written = write_checkpoint(t), t
    finally:
        heartbeat.stop()
        client.close()
    return WorkerReport(
        rank=p.rank,
        generation=p.generation,
        first_iteration=p.start_iteration,
        next_iteration=t,
        stop_reason=StopReason.FINISHED if t == p.total_iterations else StopReason.STOP_ITERATION,
        wall_s=time.monotonic() - began,
        init_s=0.0,
        checkpoint_iteration=written,
        checkpoint_shards=shards,
    ).to_dict()


# -- the real scheduler, with scripted workers ----------------------------------------------------


@pytest.fixture(scope="module")
def ray_and_objects(in_process_runs: Path) -> Path:
    """One warm local Ray for the module; a scratch folder for object stores."""
    return in_process_runs


def scheduler(
    redis_server: RedisServer,
    root: Path,
    job_id: str,
    *,
    workers: int = 2,
    total: int = 8,
    script: dict[str, Any] | None = None,
    **changes: Any,
) -> TaskScheduler:
    from smlt.backends.ray_backend import RayBackend

    redis.Redis.from_url(redis_server.url).set(_script_key(job_id), json.dumps(script or {}))
    backend = RayBackend(
        entry_point="test_scheduler:scripted",
        runtime_env={"env_vars": {"PYTHONPATH": TESTS_DIR}},
    )
    manager = ResourceManager(backend.limits, workers=workers, memory_mb=MEMORY_MB)
    settings: dict[str, Any] = {
        "batch_size": 8,
        "total_iterations": total,
        "iterations_per_epoch": 4,
        "num_params": 10,
        "session": "s1",
        "heartbeat_interval_s": 0.2,
        "heartbeat_timeout_s": 5.0,
        "shard_timeout_s": 60.0,
        "retry": RetryPolicy(backoff_s=0.05, jitter=0.0),
    }
    spec = JobSpec(
        job_id=job_id,
        redis_urls=(redis_server.url,),
        object_store_url=str(root / job_id),
        **{**settings, **changes},
    )
    return TaskScheduler(backend, spec, manager)


def iterations(summary: dict[str, Any]) -> list[int]:
    return sorted(h["iteration"] for h in summary["history"])


def rank_failures(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for f in summary["failures"] if "rank" in f]


def test_the_budget_starts_afresh_once_a_replacement_made_progress(
    redis_server: RedisServer, ray_and_objects: Path, job_id: str
) -> None:
    # Rank 1 fails the same way twice, but its replacement got past iteration 2 in between.
    script = {"fail": [[1, 0, 2, "disk full"], [1, 1, 5, "disk full"]]}
    summary = scheduler(redis_server, ray_and_objects, job_id, script=script).run()
    assert iterations(summary) == list(range(8))
    failures = rank_failures(summary)
    assert [(f["rank"], f["attempt"], f["iteration"]) for f in failures] == [(1, 0, 2), (1, 1, 5)]
    assert [f["budget_failures"] for f in failures] == [1, 1]
    assert all("disk full" in f["cause"] for f in failures)
    assert all(f["recovery_s"] is not None for f in failures)


def test_the_same_failure_twice_without_progress_still_ends_the_run(
    redis_server: RedisServer, ray_and_objects: Path, job_id: str
) -> None:
    script = {"fail": [[1, 0, 2, "disk full"], [1, 1, 2, "disk full"]]}
    run = scheduler(redis_server, ray_and_objects, job_id, script=script)
    with pytest.raises(TrainingError, match="worker 1 failed the same way twice") as info:
        run.run()
    assert "disk full at iteration 2" in str(info.value)
    assert run.status()["state"] == "failed"


def test_a_rank_out_of_memory_twice_is_re_invoked_with_twice_the_memory(
    redis_server: RedisServer, ray_and_objects: Path, job_id: str
) -> None:
    script = {"oom": [[1, 0, 2], [1, 1, 2]]}
    summary = scheduler(redis_server, ray_and_objects, job_id, script=script).run()
    assert iterations(summary) == list(range(8))
    failures = rank_failures(summary)
    assert [(f["attempt"], f.get("retry_memory_mb")) for f in failures] == [(0, None), (1, 512)]
    store = redis.Redis.from_url(redis_server.url)
    seen = [int(store.get(_memory_key(job_id, 0, 1, a)) or 0) for a in range(3)]
    assert seen == [MEMORY_MB, MEMORY_MB, 2 * MEMORY_MB]
    assert int(store.get(_memory_key(job_id, 0, 0, 0)) or 0) == MEMORY_MB  # its peer: unchanged
    # Micro-batches are planned from the generation's memory on every attempt: the same M, so
    # the re-executed iteration sums as the attempts before it did.
    planned = [int(store.get(_memory_key(job_id, 0, 1, a) + ":planned") or 0) for a in range(3)]
    assert planned == [MEMORY_MB] * 3

    # Out of memory once more at twice the memory: the run ends, naming the cause.
    again = {"oom": [[1, 0, 2], [1, 1, 2], [1, 2, 2]]}
    run = scheduler(redis_server, ray_and_objects, f"{job_id}-again", script=again)
    with pytest.raises(TrainingError, match="worker 1 failed the same way twice") as info:
        run.run()
    assert "OutOfMemoryError: rank 1 used 513 MB of 512" in str(info.value)


@pytest.mark.parametrize("at", [0, 2], ids=["before-any-iteration", "after-progress"])
def test_a_time_limit_no_attempt_outlasts_says_to_raise_it(
    redis_server: RedisServer, ray_and_objects: Path, job_id: str, at: int
) -> None:
    """Every replacement is another cold start: a function time limit shorter than start-up
    and one iteration can never be outlasted, and the error says which flag to change (only
    then: a limit hit after progress is the usual hand-over's business)."""
    script = {"timeout": [[1, 0, at], [1, 1, at]]}
    run = scheduler(redis_server, ray_and_objects, job_id, script=script, function_timeout_s=9.0)
    with pytest.raises(TrainingError, match="worker 1 failed the same way twice") as info:
        run.run()
    hinted = "within the function time limit of 9 s" in str(info.value)
    assert hinted == (at == 0), str(info.value)
    assert "raise --function-timeout" in str(info.value) or at != 0


def test_a_duplicated_invocation_runs_twice_and_is_billed_twice(
    redis_server: RedisServer, ray_and_objects: Path, job_id: str
) -> None:
    run = scheduler(redis_server, ray_and_objects, job_id, faults="duplicate:rank=1:iteration=3")
    summary = run.run()
    assert iterations(summary) == list(range(8))
    assert summary["failures"] == []
    assert summary["invocations"] == 3  # two ranks, rank 1 delivered twice
    # The first copy to finish gives the rank's report; its twin is then stopped (it may not
    # have started yet: both are delivered, at least one runs).
    copies = redis.Redis.from_url(redis_server.url).get(_copy_key(job_id, 0, 1, 0))
    assert copies in (b"1", b"2")


def test_a_duplicate_whose_copy_fails_needs_no_re_invocation(
    redis_server: RedisServer, ray_and_objects: Path, job_id: str
) -> None:
    run = scheduler(
        redis_server,
        ray_and_objects,
        job_id,
        faults="duplicate:rank=1:iteration=0",
        script={"fail_copy": [1, 2]},
    )
    summary = run.run()
    assert iterations(summary) == list(range(8))
    # The failing copy is recorded if it failed before its twin finished (the twin's success
    # stops it otherwise); either way nothing is re-invoked.
    for failure in summary["failures"]:
        assert failure["duplicate"] and failure["attempt"] == 0 and failure["recovery_s"] is None
        assert "copy 2 of rank 1 fails" in failure["cause"]
    assert len(summary["failures"]) <= 1
    assert summary["invocations"] == 3


def test_a_duplicate_whose_copies_both_fail_is_re_invoked(
    redis_server: RedisServer, ray_and_objects: Path, job_id: str
) -> None:
    run = scheduler(
        redis_server,
        ray_and_objects,
        job_id,
        faults="duplicate:rank=1:iteration=0",
        script={"fail": [[1, 0, 3, "bad sector"]]},
    )
    summary = run.run()
    assert iterations(summary) == list(range(8))
    [failure] = summary["failures"]
    assert (failure["rank"], failure["attempt"], failure["iteration"]) == (1, 0, 3)
    assert not failure.get("duplicate")
    assert summary["invocations"] == 4  # rank 0, two copies of rank 1, its replacement


def test_checkpoints_are_committed_from_the_reported_records_and_pruned(
    redis_server: RedisServer, ray_and_objects: Path, job_id: str
) -> None:
    run = scheduler(redis_server, ray_and_objects, job_id, checkpoint_every=2, keep_checkpoints=2)
    summary = run.run()
    assert summary["checkpoints"] == [2, 4, 6, 8]
    assert summary["failures"] == []
    ckpts = CheckpointStore(open_object_store(ray_and_objects / job_id), job_id)
    assert ckpts.list_committed() == [6, 8]
    six = ckpts.load(6)
    assert [h["iteration"] for h in six.meta["history"]] == [0, 1, 2, 3, 4, 5]
    for s in range(2):
        for kind in ("param", "optim"):
            data = shard_bytes(job_id, 6, s, kind)
            record = six.record(kind, s)  # type: ignore[arg-type]
            assert (record.size_bytes, record.sha256) == (
                len(data),
                hashlib.sha256(data).hexdigest(),
            )
            assert six.read_shard(kind, s) == data  # type: ignore[arg-type]


def test_a_failed_boundary_commit_is_recorded_and_the_run_goes_on(
    redis_server: RedisServer, ray_and_objects: Path, job_id: str
) -> None:
    # Rank 0 misreports the size of its boundary shard: the commit refuses it.
    run = scheduler(
        redis_server,
        ray_and_objects,
        job_id,
        total=6,
        script={"misreport": [6, "optim"]},
    )
    summary = run.run()
    assert iterations(summary) == list(range(6))
    [failure] = summary["failures"]
    assert failure["checkpoint"] == 6
    assert "optim-0.bin has" in failure["cause"] and "its writer reported" in failure["cause"]
    assert summary["checkpoints"] == []
    assert CheckpointStore(open_object_store(ray_and_objects / job_id), job_id).latest() is None


def test_committing_never_holds_up_the_progress_follower(
    redis_server: RedisServer, ray_and_objects: Path, job_id: str
) -> None:
    run = scheduler(redis_server, ray_and_objects, job_id, checkpoint_every=2)
    store = run.committer.checkpoints
    commit = store.commit
    seen_while_committing: list[int] = []

    def slow_commit(iteration: int, *args: Any, **kwargs: Any) -> Any:
        # The first commit blocks until the whole run is in the history: if committing held up
        # the follower, the history could not grow past iteration 1 and this would time out.
        if iteration == 2:
            deadline = time.monotonic() + 20
            while len(run.log.history) < 8:
                if time.monotonic() > deadline:
                    raise ObjectStoreError("the follower waited for the commit")
                time.sleep(0.02)
            seen_while_committing.append(len(run.log.history))
        return commit(iteration, *args, **kwargs)

    store.commit = slow_commit  # type: ignore[method-assign]
    summary = run.run()
    assert seen_while_committing == [8]
    assert summary["failures"] == []
    assert summary["checkpoints"] == [2, 4, 6, 8]


@pytest.mark.parametrize("action", ["raise", "hang"])
def test_detection_time_is_measured_from_the_fault_event(
    action: str, redis_server: RedisServer, ray_and_objects: Path, job_id: str
) -> None:
    heartbeat_timeout_s = 1.5
    started = time.time()
    run = scheduler(
        redis_server,
        ray_and_objects,
        job_id,
        faults=f"{action}:rank=1:iteration=3",
        heartbeat_timeout_s=heartbeat_timeout_s,
    )
    summary = run.run()
    assert iterations(summary) == list(range(8))
    [failure] = summary["failures"]
    assert failure["fault"] == f"{action} at iteration 3 (start)"
    assert 0 < failure["fault_at_s"] < time.time() - started
    assert failure["fault_at_s"] <= failure["detected_s"] + 0.5  # two clocks, one moment
    if action == "raise":
        assert 0 <= failure["detection_s"] < heartbeat_timeout_s
    else:
        # Noticed when the key expired: the last beat (at most an interval before the fault)
        # plus the timeout, give or take the watcher's interval.
        assert heartbeat_timeout_s - 0.25 <= failure["detection_s"] < heartbeat_timeout_s + 2
    assert failure["recovery_s"] is not None


# -- a real re-scaled run: what is left in Redis --------------------------------------------------


@pytest.fixture
def keys_after_run(monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer) -> Iterator[dict]:
    """Every key in the test Redis the moment the scheduler's run returns (before the driver
    reads the final version and deletes its job's keys)."""
    seen: dict[str, Any] = {}
    run = TaskScheduler.run

    def run_then_scan(self: TaskScheduler) -> dict[str, Any]:
        summary = run(self)
        client = redis.Redis.from_url(redis_server.url)
        seen["keys"] = sorted(k.decode() for k in client.scan_iter(f"smlt:{self.spec.job_id}:*"))
        seen["session"] = self.spec.session
        seen["summary"] = summary
        return summary

    monkeypatch.setattr(TaskScheduler, "run", run_then_scan)
    yield seen


SLOW_SUFFIX = """

class SlowDigits(Digits):
    # 20 ms more per iteration, so the re-scale lands mid-run on a fast machine too.
    def loss(self, model, batch):
        import time

        time.sleep(0.02)
        return super().loss(model, batch)
"""


@pytest.mark.slow
def test_a_rescaled_run_leaves_only_the_final_version_and_its_progress(
    redis_server: RedisServer,
    ray_and_objects: Path,
    keys_after_run: dict[str, Any],
) -> None:
    import smlt

    task = ray_and_objects / "slow_digits.py"
    task.write_text((REPO / "examples" / "digits.py").read_text() + SLOW_SUFFIX)
    result = smlt.train(
        f"{task}:SlowDigits",
        epochs=2,
        batch_size=256,
        workers=3,
        memory_mb=512,
        output=ray_and_objects / "rescaled-keys",
        redis_url=redis_server.url,
        rescales=((2, 2, None),),
    )
    total = result.iterations
    assert [c["workers"] for c in result.configs] == [3, 2]
    [first, second] = result.generations
    assert first["stop_iteration"] < total and second["stop_iteration"] == total
    session = keys_after_run["session"]
    assert session
    keys = JobKeys(result.job_id, session)
    # No end-of-epoch snapshot either: the evaluator deletes each one once it has read it.
    left = set(keys_after_run["keys"])
    assert result.epoch_metrics and all("accuracy" in e for e in result.epoch_metrics)
    # All that is left is the final version (2 shards, nothing of the third rank) and the
    # progress stream, all in this run's session.
    expected = {keys.progress(), keys.param_ready(total)}
    expected |= {k for s in range(2) for k in (keys.param(total, s), keys.optim(total, s))}
    assert left == expected
