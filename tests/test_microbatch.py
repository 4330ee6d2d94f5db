"""Micro-batches (gradient accumulation) keep smlt's promise.

A worker goes through its slice of the global batch at most M samples at a time and sums the
micro-batches' gradients before the exchange (smlt/worker/microbatch.py); without
``--micro-batch`` it does so only where its slice would not fit its memory, by a decision that
every attempt of a rank makes alike (smlt/worker/memory.py). What is shown:

- through ``smlt.train`` (real Ray and Redis), tests/test_schedules.py's OneCycleLR task clipped
  at a norm that bites, with micro-batches of at most 5 (10 of 5 per slice of 50 at 1 worker;
  5/4/4 or 4/4/4 per slice of 13 or 12 at 4): 1 worker x B and 4 workers x B/4 equal the plain
  PyTorch loop (one pass per global batch) within tests/test_exactness.py's tolerances, with the
  reference's learning rate at every iteration; a worker killed at iteration 5 changes no bit;
- through ``smlt.train``, a task whose slice does not fit the worker's memory splits it by
  itself, and still equals the reference; the same slice with memory to spare is not split;
- on threads: a worker failing at the points of a step where its gradient is recomputed, on a
  model with BatchNorm, changes no byte; micro-batches of 12 at one worker give what 4 workers x
  12 give, running statistics and ``num_batches_tracked`` included (each micro-batch is a
  virtual worker);
- the pieces: one micro-batch is the plain pass bit for bit; several sum to it within rounding
  for a mean and a summed loss; dropout draws the same masks again under the same seed (tested
  here: the harness's threads share torch's global generator); the memory profile counts what
  autograd saves; the decision, and the option's check.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import smlt
from smlt.client.artifacts import package_task
from smlt.errors import ConfigError, SmltWarning
from smlt.protocol.model import FlatModel
from smlt.storage.artifacts import ArtifactManifest, manifest_key
from smlt.storage.objects import LocalObjectStore
from smlt.storage.reader import RESIDENT_BYTES
from smlt.storage.redis_server import RedisServer
from smlt.task import check_task, load_task
from smlt.worker.contribution import snapshot
from smlt.worker.memory import (
    RUNTIME_MB,
    MemoryProfile,
    check_micro_batch,
    measure_memory,
    plan_micro_batch,
    worker_bytes,
)
from smlt.worker.microbatch import accumulate, micro_ranges
from tests.reference import reference_run
from tests.test_exactness import ATOL, PREAMBLE, RTOL, _load
from tests.test_schedules import (
    BATCH_SIZE,
    ITERATIONS,
    SEED,
    _reference,
    _state,
    _train,
)
from tests.test_schedules import TASKS as SCHEDULE_TASKS
from tests.worker_harness import Outcome, ThreadedJob

MICRO = 5
#: Copies of a 16-wide hidden layer in Wide's forward pass: a tanh over 16 x 2^14 floats saves
#: 1 MiB per sample, so a slice of 50 needs about 100 MiB beside the runtime, and the worker's
#: memory leaves room for a dozen or so samples at a time.
WIDE_REPEAT = 2**14
WIDE_MEMORY_MB = RUNTIME_MB + 30

TASKS = textwrap.dedent(
    f'''
    WIDE_REPEAT = {WIDE_REPEAT}


    class MicroNet(OneCycleClipped):
        """OneCycleClipped's schedule and clipping on a model with BatchNorm, whose running
        statistics micro-batches must combine."""

        def model(self):
            torch.manual_seed(1)
            return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 2))


    class DropoutNet(Regression):
        def model(self):
            torch.manual_seed(1)
            return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.25), nn.Linear(16, 2))


    class EvenBatchNorm(Regression):
        """240 samples, global batches of 48: 4 workers and micro-batches of 12 cut them alike."""

        samples = 240

        def model(self):
            torch.manual_seed(1)
            return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 2))


    class WideNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 16)
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            wide = torch.tanh(self.proj(x).repeat(1, WIDE_REPEAT))  # tanh saves its output
            return self.head(wide.view(len(x), WIDE_REPEAT, 16).mean(1))


    class Wide(Regression):
        """Few parameters, large activations: a slice of 50 does not fit {WIDE_MEMORY_MB} MB."""

        def model(self):
            torch.manual_seed(1)
            return WideNet()


    class TwoAtATime(Regression):
        """Trains, but its loss refuses more than two samples with a gradient: smlt's memory
        probe (two and four samples) cannot run it."""

        def loss(self, model, batch):
            x, y = batch
            if torch.is_grad_enabled() and len(x) > 2:
                raise ValueError("two at a time")
            return nn.functional.mse_loss(model(x), y)


    class WideSum(Wide):
        loss_reduction = "sum"

        def loss(self, model, batch):
            x, y = batch
            return nn.functional.mse_loss(model(x), y, reduction="sum")
    '''
)


def _task_file(folder: Path) -> Path:
    path = folder / "tasks" / "microbatch.py"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        path.write_text(PREAMBLE + SCHEDULE_TASKS + TASKS)
    return path


def _assert_close_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Same keys; every tensor within tests/test_exactness.py's tolerances."""
    assert list(got) == list(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=RTOL, atol=ATOL, msg=key)


def _bit_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# --- through smlt.train ----------------------------------------------------------------------

_micro_runs: dict[int, smlt.TrainResult] = {}


def _micro_run(folder: Path, workers: int) -> smlt.TrainResult:
    if workers not in _micro_runs:
        _micro_runs[workers] = _train(
            folder, "OneCycleClipped", workers, "-micro", micro_batch=MICRO
        )
    return _micro_runs[workers]


@pytest.mark.parametrize("workers", [1, 4])
def test_micro_batches_match_the_reference(in_process_runs: Path, workers: int) -> None:
    """Final parameters within tolerance of one pass per global batch; every iteration's
    learning rate exactly the reference's; the gradient norm within tolerance. At one worker
    the result is not the reference's bits (which one pass gives, tests/test_schedules.py):
    the micro-batches did run, summing in another order."""
    result = _micro_run(in_process_runs, workers)
    reference = _reference(in_process_runs, "OneCycleClipped")
    assert result.training["micro_batch"] == MICRO
    assert [h["iteration"] for h in result.history] == list(range(ITERATIONS))
    assert {h["micro_batch"] for h in result.history} == {MICRO}
    _assert_close_state(_state(result), reference.state)
    assert [h["lr"] for h in result.history] == reference.lrs
    norms = [h["grad_norm"] for h in result.history]
    np.testing.assert_allclose(norms, reference.grad_norms, rtol=RTOL, atol=ATOL)
    if workers == 1:
        assert not _bit_identical(_state(result), reference.state)


def test_a_killed_worker_changes_nothing_with_micro_batches(
    in_process_runs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 1 SIGKILLed at iteration 5 after uploading its gradient: its replacement, a fresh
    process, recomputes the iteration's micro-batches, and the owner of shard 1 (itself) reduces
    the recomputed gradient: the run ends bit-identical to the one without the kill."""
    clean = _micro_run(in_process_runs, 4)
    monkeypatch.setenv("SMLT_FAULTS", "kill:rank=1:iteration=5:phase=after-upload")
    result = _train(
        in_process_runs,
        "OneCycleClipped",
        4,
        "-micro-killed",
        micro_batch=MICRO,
        heartbeat_timeout_s=5,
    )
    failures = [(f["rank"], f["iteration"]) for f in result.failures if "rank" in f]
    assert failures == [(1, 5)], result.failures
    assert _bit_identical(_state(result), _state(clean)), "differs from the run without the kill"
    assert [h["lr"] for h in result.history] == [h["lr"] for h in clean.history]
    assert [h["grad_norm"] for h in result.history] == [h["grad_norm"] for h in clean.history]


def test_a_slice_that_does_not_fit_is_split_by_itself(in_process_runs: Path) -> None:
    """Wide at one worker with 30 MB beyond the runtime's, no ``micro_batch``: by the profile
    the client measured, a slice of 50 does not fit, micro-batches of a dozen or so do; the run
    splits and still equals one pass per global batch (within tolerance, not bit for bit: it did
    split). With memory to spare the same slice is not split."""
    path = _task_file(in_process_runs)
    task = load_task(f"{path}:Wide")
    data = check_task(task)
    profile = measure_memory(task, data)
    data_bytes = RESIDENT_BYTES  # what a worker's reader holds beside its batch
    plan = {
        memory_mb: plan_micro_batch(
            requested=None,
            slice_samples=BATCH_SIZE,
            memory_mb=memory_mb,
            workers=1,
            profile=profile,
            data_bytes=data_bytes,
        )
        for memory_mb in (WIDE_MEMORY_MB, 4 * 1024)
    }
    assert 1 < plan[WIDE_MEMORY_MB] < BATCH_SIZE // 2, plan
    assert plan[4 * 1024] == BATCH_SIZE, plan

    result = smlt.train(
        f"{path}:Wide",
        epochs=1,
        batch_size=BATCH_SIZE,
        workers=1,
        memory_mb=WIDE_MEMORY_MB,
        seed=SEED,
        output=in_process_runs / "wide-auto",
    )
    assert result.training["micro_batch"] is None  # automatic
    # What the workers chose is in the history: the plan above, at every iteration.
    assert {h["micro_batch"] for h in result.history} == {plan[WIDE_MEMORY_MB]}
    reference = reference_run(_load(path, "Wide"), epochs=1, batch_size=BATCH_SIZE, seed=SEED)
    _assert_close_state(_state(result), reference.state)
    assert not _bit_identical(_state(result), reference.state), "the slice was not split"


# --- on threads ------------------------------------------------------------------------------

THREADED_WORKERS = 3
THREADED_ITERATIONS = 8
#: The points where the replacement recomputes the step's gradient and it is used: before
#: anything was uploaded, after the uploads (its own shard is reduced from the recomputation),
#: after the owner published (the replacement adopts, having recomputed).
RECOMPUTE_PHASES = ("start", "after-upload", "after-publish")


def _job(
    tmp: Path,
    redis: RedisServer,
    job: str,
    task_file: Path,
    cls: str,
    *,
    faults: str = "",
    micro_batch: int | None = MICRO,
    workers: int = THREADED_WORKERS,
    iterations: int = THREADED_ITERATIONS,
    batch_size: int = BATCH_SIZE,
) -> Outcome:
    """Run ``cls`` on threads to the end, a rank re-invoked when ``faults`` makes it raise."""
    return ThreadedJob(
        tmp,
        redis,
        job,
        task_file,
        cls,
        workers=workers,
        iterations=iterations,
        batch_size=batch_size,
        seed=SEED,
        options={"checkpoint_every": 3, "micro_batch": micro_batch},
    ).run(faults)


@pytest.fixture(scope="module")
def threaded_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _task_file(tmp_path_factory.mktemp("threaded"))


@pytest.fixture(scope="module")
def clean_micro(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, threaded_file: Path
) -> Outcome:
    return _job(
        tmp_path_factory.mktemp("clean"), redis_server, "micro-clean", threaded_file, "MicroNet"
    )


def test_every_report_says_the_micro_batch(clean_micro: Outcome) -> None:
    reports = [r for r in clean_micro.reports if "event" not in r]
    assert len(reports) == THREADED_WORKERS * THREADED_ITERATIONS
    assert {r["micro"] for r in reports} == {str(MICRO)}


@pytest.mark.parametrize("phase", RECOMPUTE_PHASES)
def test_a_worker_that_fails_changes_nothing_with_micro_batches(
    phase: str,
    tmp_path: Path,
    redis_server: RedisServer,
    threaded_file: Path,
    job_id: str,
    clean_micro: Outcome,
) -> None:
    """BatchNorm statistics combined again the same way: parameters, buffers and optimizer
    state byte for byte the clean run's."""
    got = _job(
        tmp_path,
        redis_server,
        job_id,
        threaded_file,
        "MicroNet",
        faults=f"raise:rank=1:iteration=4:phase={phase}",
    )
    assert got.attempts[1] == 1, "the fault did not fire"
    for values in got.values:
        assert np.array_equal(values, clean_micro.values[0]), "parameters differ"
    assert got.final.buffers == clean_micro.final.buffers, "num_batches_tracked differs"
    assert got.optimizer_bytes == clean_micro.optimizer_bytes, "optimizer state differs"


def test_each_micro_batch_is_a_virtual_worker(
    tmp_path: Path, redis_server: RedisServer, threaded_file: Path, job_id: str
) -> None:
    """One worker in micro-batches of 12 against 4 workers x 12 (no micro-batches) over the same
    global batches of 48: BatchNorm's batch statistics are the same per 12 samples, its running
    statistics are combined the same way, and num_batches_tracked counts one per iteration."""
    common: dict[str, Any] = {"batch_size": 48, "iterations": 5}
    one = _job(
        tmp_path / "one",
        redis_server,
        f"{job_id}-one",
        threaded_file,
        "EvenBatchNorm",
        workers=1,
        micro_batch=12,
        **common,
    )
    four = _job(
        tmp_path / "four",
        redis_server,
        f"{job_id}-four",
        threaded_file,
        "EvenBatchNorm",
        workers=4,
        micro_batch=None,
        **common,
    )
    assert {r["micro"] for r in one.reports} == {"12"}
    assert {r["micro"] for r in four.reports} == {"12"}  # the whole slice: no split
    np.testing.assert_allclose(one.final.values, four.final.values, rtol=RTOL, atol=ATOL)
    assert one.final.buffers == four.final.buffers
    tracked = np.frombuffer(one.final.buffers["0"], dtype=np.int64)
    assert tracked.tolist() == [5]


def test_micro_batches_are_planned_from_the_generations_memory(
    tmp_path: Path, redis_server: RedisServer, threaded_file: Path, job_id: str
) -> None:
    """A rank re-invoked with more memory than its generation's (after running out of it
    twice, smlt/actors/failures.py) sizes its micro-batches by the generation's memory, which
    its payload's options carry: the M of the attempts before it, so the iteration it re-runs
    sums as they did. Wide's slice of 50 fits the harness's 512 MB whole, not WIDE_MEMORY_MB."""

    def micro(name: str, options: dict[str, Any]) -> set[str]:
        outcome = ThreadedJob(
            tmp_path / name,
            redis_server,
            f"{job_id}-{name}",
            threaded_file,
            "Wide",
            workers=1,
            iterations=1,
            batch_size=BATCH_SIZE,
            seed=SEED,
            options=options,
        ).run()
        return {r["micro"] for r in outcome.reports if "event" not in r}

    assert micro("whole", {}) == {str(BATCH_SIZE)}
    (planned,) = micro("planned", {"generation_memory_mb": WIDE_MEMORY_MB})
    assert 1 < int(planned) < BATCH_SIZE // 2


# --- the pieces ------------------------------------------------------------------------------


def _wide(folder: Path, name: str = "Wide") -> tuple[smlt.Task, tuple[torch.Tensor, ...]]:
    task = _load(_task_file(folder), name)
    return task, check_task(task).rows(0, 10)


def _pass(
    task: smlt.Task,
    batch: tuple[torch.Tensor, ...],
    micro: int,
    reduction: str = "mean",
    seed: int = 7,
) -> tuple[float, list[torch.Tensor], FlatModel]:
    """accumulate() over ``batch`` from a fresh model: the loss and each parameter's .grad."""
    flat = FlatModel(task.model())
    torch.manual_seed(seed)
    loss = accumulate(
        task,
        flat,
        batch,
        micro_batch=micro,
        reduction=reduction,
        precision="fp32",
        before=snapshot(flat),
        where="a test",
    )
    return loss, [p.grad.clone() for p in flat.params if p.grad is not None], flat


def test_one_micro_batch_is_the_plain_pass(tmp_path: Path) -> None:
    task, batch = _wide(tmp_path)
    model = task.model()
    loss = task.loss(model, batch)
    loss.backward()
    got_loss, grads, _flat = _pass(task, batch, micro=len(batch[0]))
    assert got_loss == float(loss.detach())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))


@pytest.mark.parametrize(("name", "reduction"), [("Wide", "mean"), ("WideSum", "sum")])
def test_micro_batches_sum_to_the_slices_gradient(
    tmp_path: Path, name: str, reduction: str
) -> None:
    """Micro-batches of 3, 3, 2, 2: the gradient and the per-sample loss of one pass, within
    rounding; a wrong weight (1/4 each instead of m_i / b) would be far outside it."""
    task, batch = _wide(tmp_path, name)
    whole_loss, whole, _flat = _pass(task, batch, micro=10, reduction=reduction)
    loss, grads, _flat = _pass(task, batch, micro=3, reduction=reduction)
    assert loss == pytest.approx(whole_loss, rel=1e-6)
    for got, want in zip(grads, whole, strict=True):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    assert any(not torch.equal(g, w) for g, w in zip(grads, whole, strict=True))


def test_dropout_draws_the_same_masks_again(tmp_path: Path) -> None:
    """Seeded once before the first micro-batch, the micro-batches draw in order: the same seed
    gives the same bytes (what a replacement recomputes), another seed other masks."""
    task, batch = _wide(tmp_path, "DropoutNet")
    loss, grads, _flat = _pass(task, batch, micro=3)
    again_loss, again, _flat = _pass(task, batch, micro=3)
    other_loss, _other, _flat = _pass(task, batch, micro=3, seed=8)
    assert loss == again_loss and all(torch.equal(a, b) for a, b in zip(grads, again, strict=True))
    assert other_loss != loss


def test_running_statistics_track_the_slice_and_count_one_step(tmp_path: Path) -> None:
    """BatchNorm's running mean after micro-batches is one pass's (the update is linear in the
    batch mean); its running variance the mean of the micro-batches' updates; one more batch
    tracked, not one per micro-batch."""
    task = _load(_task_file(tmp_path), "EvenBatchNorm")
    batch = check_task(task).rows(0, 12)
    _loss, _grads, flat = _pass(task, batch, micro=4)
    bn = flat.model[1]
    one = task.model()
    one.train()
    task.loss(one, batch)
    torch.testing.assert_close(bn.running_mean, one[1].running_mean, rtol=1e-5, atol=1e-7)
    assert int(bn.num_batches_tracked) == 1
    hidden = task.model()[0](batch[0]).detach()
    variances = torch.stack([hidden[a : a + 4].var(0) for a in range(0, 12, 4)])
    expected = 0.9 * torch.ones(16) + 0.1 * variances.mean(0)
    torch.testing.assert_close(bn.running_var, expected, rtol=1e-5, atol=1e-6)


def test_micro_ranges() -> None:
    assert micro_ranges(10, 3) == [(0, 3), (3, 6), (6, 8), (8, 10)]  # never a lone sample
    assert micro_ranges(16, 5) == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert micro_ranges(50, 5) == [(a, a + 5) for a in range(0, 50, 5)]
    assert micro_ranges(10, 10) == micro_ranges(10, 64) == [(0, 10)]
    assert micro_ranges(0, 4) == []


PROFILE = MemoryProfile(
    activation_bytes_per_sample=8 * 2**20,
    activation_base_bytes=2**20,
    input_bytes_per_sample=32,
    model_bytes=4 * 2**20,
    optimizer_state_bytes=8 * 2**20,
    sharded=True,
    precision="fp32",
)


def test_the_decision_splits_only_what_does_not_fit() -> None:
    """The largest M whose predicted peak fits the memory: the whole slice when it fits (and
    without a profile), at least 1 when nothing does, the requested size when there is one."""

    def plan(memory_mb: int, *, requested: int | None = None, workers: int = 1) -> int:
        return plan_micro_batch(
            requested=requested,
            slice_samples=50,
            memory_mb=memory_mb,
            workers=workers,
            profile=PROFILE,
            data_bytes=2**20,
        )

    assert plan(4096) == 50
    m = plan(512)
    assert 1 < m < 50
    budget = 512 * 2**20
    peak = {
        k: worker_bytes(PROFILE, micro_batch=k, slice_samples=50, workers=1, data_bytes=2**20)
        for k in (m, m + 1)
    }
    assert peak[m] <= budget < peak[m + 1]
    assert plan(256) == 1  # not even the runtime fits: one sample at a time, the least there is
    assert plan(512, requested=7) == 7
    assert plan(4096, requested=500) == 50
    assert plan(513) >= m and plan(1024) > m  # more memory, never smaller micro-batches
    assert (
        plan_micro_batch(
            requested=None, slice_samples=50, memory_mb=256, workers=1, profile=None, data_bytes=0
        )
        == 50
    )


def test_the_profile_counts_what_autograd_saves(tmp_path: Path) -> None:
    """Wide's tanh saves 16 x WIDE_REPEAT floats per sample, and little else does; under bf16
    autocast the repeated hidden layer is bfloat16, half the bytes. The client stores the
    profile in the manifest, and every worker reads the same numbers back."""
    path = _task_file(tmp_path)
    task = load_task(f"{path}:Wide")
    data = check_task(task)
    tanh_bytes = 16 * WIDE_REPEAT * 4
    fp32 = measure_memory(task, data)
    assert tanh_bytes <= fp32.activation_bytes_per_sample < 1.01 * tanh_bytes
    bf16 = measure_memory(task, data, precision="bf16")
    assert tanh_bytes // 2 <= bf16.activation_bytes_per_sample < 0.51 * tanh_bytes
    assert fp32.model_bytes == 4 * sum(p.numel() for p in task.model().parameters())
    assert fp32.sharded and fp32.optimizer_state_bytes == fp32.model_bytes  # SGD momentum

    objects = LocalObjectStore(tmp_path / "objects")
    package_task(f"{path}:Wide", objects, "wide")
    manifest = ArtifactManifest.from_json(objects.get_bytes(manifest_key("wide")))
    assert MemoryProfile.from_dict(manifest.memory_profile) == fp32
    with pytest.raises(ConfigError, match="manifest is not a memory profile"):
        MemoryProfile.from_dict({"activation_bytes_per_sample": 1}, "manifest")


def test_a_memory_probe_that_fails_warns_and_splits_nothing(tmp_path: Path) -> None:
    """The task itself passed the client-side checks; only smlt's probe failed: the run goes
    on, warned, with no profile (workers then never split by themselves)."""
    path = _task_file(tmp_path)
    objects = LocalObjectStore(tmp_path / "objects")
    with pytest.warns(SmltWarning, match=r"TwoAtATime: smlt could not measure.*two at a"):
        manifest = package_task(f"{path}:TwoAtATime", objects, "two")
    assert manifest.memory_profile is None
    assert (
        plan_micro_batch(requested=None, slice_samples=50, memory_mb=128, workers=1, profile=None)
        == 50
    )


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "8"])
def test_a_bad_micro_batch_is_refused_naming_the_flag(value: object) -> None:
    with pytest.raises(ConfigError, match=r"--micro-batch must be an integer >= 1"):
        check_micro_batch(value)


def test_a_good_micro_batch_passes() -> None:
    assert check_micro_batch(None) is None
    assert check_micro_batch(1) == 1
    assert check_micro_batch(np.int64(16)) == 16
