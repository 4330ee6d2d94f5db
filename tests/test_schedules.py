"""Learning-rate schedules and clipping by global norm keep smlt's promise.

A task's ``scheduler(optimizer)`` is stepped as in ``optimizer.step(); scheduler.step()`` and its
``clip_grad_norm`` clips as ``torch.nn.utils.clip_grad_norm_`` does before the step. The
reference is tests/reference.py's plain PyTorch loop, which does exactly that. What is shown:

- through ``smlt.train`` (real Ray and Redis), 20 iterations of OneCycleLR (which cycles the
  momentum too) or warm-up + cosine (SequentialLR) with a clip norm the gradient exceeds on most
  iterations: 1 worker x B is bit-identical to the reference, 4 workers x B/4 equal within
  tests/test_exactness.py's tolerances, for a sharded optimizer and a replicated one; the
  learning rate of every iteration in the history is the reference's, exactly; the gradient norm
  is the reference's (exactly at one worker);
- a worker killed at iteration 5 changes no bit, and a re-scale from 4 to 2 workers at
  iteration 10 stays within the tolerances;
- on threads (no Ray): a worker raising at every phase of a step changes no byte of the
  parameters or the optimizer state, and every rank reports the same learning rate and norm;
- a schedule stepped per epoch matches the reference's;
- a schedule or a clip norm that cannot work is refused on the client, naming it;
- the pieces: a schedule rebuilt at iteration t holds what a schedule stepped since 0 holds, for
  every kind of scheduler; the sharded norm is ``clip_grad_norm_``'s.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import smlt
from smlt.errors import TaskError
from smlt.protocol.faults import PHASES
from smlt.protocol.model import FlatModel
from smlt.storage.redis_server import RedisServer
from smlt.sync.shards import shard_slice
from smlt.worker.clipping import clip_, norm_pieces, piece_norms, total_norm
from smlt.worker.schedule import Schedule
from smlt.worker.selfcheck import check_update
from tests.reference import ReferenceRun, reference_run
from tests.test_exactness import ATOL, PREAMBLE, RTOL, _load, assert_same_state
from tests.worker_harness import Outcome, ThreadedJob

SEED = 3
BATCH_SIZE = 50  # 230 samples: five iterations per epoch, slices of 13/13/12/12 at 4 workers
EPOCHS = 4
ITERATIONS = 20
#: The gradient norm exceeds it on 18 of the 20 iterations of OneCycleClipped and all 20 of
#: WarmupCosineReplicated (before clipping, in the reference).
MAX_NORM = 0.35

TASKS = textwrap.dedent(
    f'''
    ITERATIONS = {ITERATIONS}


    class OneCycleClipped(Regression):
        """The preamble's SGD with momentum and weight decay under OneCycleLR, which also cycles
        the momentum, clipped at a norm the gradient exceeds on most iterations."""

        clip_grad_norm = {MAX_NORM}

        def scheduler(self, optimizer):
            return torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=0.5, total_steps=ITERATIONS
            )


    class DescribedSGD(torch.optim.SGD):
        """Plain SGD; a subclass, so smlt replicates it rather than sharding it."""

        def describe(self):
            return "SGD"


    class WarmupCosineReplicated(Regression):
        """Warm-up then cosine decay (SequentialLR of LinearLR and CosineAnnealingLR) over a
        replicated optimizer, clipped."""

        clip_grad_norm = {MAX_NORM}

        def optimizer(self, model):
            return DescribedSGD(model.parameters(), lr=0.4, momentum=0.9, weight_decay=0.01)

        def scheduler(self, optimizer):
            warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=5)
            cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=ITERATIONS - 5)
            return torch.optim.lr_scheduler.SequentialLR(
                optimizer, [warmup, cosine], milestones=[5]
            )


    class StepPerEpoch(Regression):
        """Adam whose learning rate halves after every epoch."""

        scheduler_interval = "epoch"

        def optimizer(self, model):
            return torch.optim.Adam(model.parameters(), lr=0.02)

        def scheduler(self, optimizer):
            return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


    class AdamOneCycle(Regression):
        """OneCycleLR over Adam cycles beta1 (a tuple hyperparameter)."""

        clip_grad_norm = {MAX_NORM}

        def optimizer(self, model):
            return torch.optim.Adam(model.parameters(), lr=0.01)

        def scheduler(self, optimizer):
            return torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=0.05, total_steps=ITERATIONS
            )


    class Plateau(Regression):
        def scheduler(self, optimizer):
            return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)


    class NotAScheduler(Regression):
        def scheduler(self, optimizer):
            return lambda step: 0.1


    class OtherOptimizer(Regression):
        def scheduler(self, optimizer):
            other = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
            return torch.optim.lr_scheduler.StepLR(other, step_size=5)


    class TooShort(OneCycleClipped):
        def scheduler(self, optimizer):
            return torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=0.5, total_steps=ITERATIONS // 2
            )


    class MissingArgument(Regression):
        def scheduler(self, optimizer):
            return torch.optim.lr_scheduler.StepLR(optimizer)


    class NegativeClip(Regression):
        clip_grad_norm = -1.0


    class TextClip(Regression):
        clip_grad_norm = "1.0"


    class PerStepInterval(Regression):
        scheduler_interval = "step"
    '''
)

#: Task name -> how smlt runs its optimizer.
MODES = {"OneCycleClipped": "sharded", "WarmupCosineReplicated": "replicated"}


# --- helpers ---------------------------------------------------------------------------------


def _task_file(folder: Path) -> Path:
    path = folder / "tasks" / "schedules.py"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        path.write_text(PREAMBLE + TASKS)
    return path


_references: dict[str, ReferenceRun] = {}


def _reference(folder: Path, name: str) -> ReferenceRun:
    if name not in _references:
        task = _load(_task_file(folder), name)
        _references[name] = reference_run(task, epochs=EPOCHS, batch_size=BATCH_SIZE, seed=SEED)
    return _references[name]


_runs: dict[tuple[str, int], smlt.TrainResult] = {}


def _train(
    folder: Path, name: str, workers: int, tag: str = "", **options: Any
) -> smlt.TrainResult:
    """``smlt.train`` the task; runs without ``options`` are kept for the other tests."""
    key = (name, workers)
    if key in _runs and not options:
        return _runs[key]
    result = smlt.train(
        f"{_task_file(folder)}:{name}",
        epochs=EPOCHS,
        batch_size=BATCH_SIZE,
        workers=workers,
        seed=SEED,
        output=folder / f"{name.lower()}-{workers}{tag}",
        **options,
    )
    assert result.iterations == ITERATIONS
    if not options:
        _runs[key] = result
    return result


def _state(result: smlt.TrainResult) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = torch.load(result.model_path)
    return state


def _assert_norms(got: list[float], want: list[float], workers: int) -> None:
    assert len(got) == len(want)
    if workers == 1:
        assert got == want, "the gradient norms differ from clip_grad_norm_'s at 1 worker"
    else:
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


# --- through smlt.train ----------------------------------------------------------------------


def test_the_reference_clips_on_most_iterations(tmp_path: Path) -> None:
    """The clip norm bites: without it the reference's gradient norm exceeds it on most
    iterations (not all in both modes, so the unclipped branch runs too), and its schedule moves."""
    unclipped = 0
    for name in MODES:
        run = _reference(tmp_path, name)
        assert len(run.grad_norms) == len(run.lrs) == ITERATIONS
        clipped = sum(norm > MAX_NORM for norm in run.grad_norms)
        assert ITERATIONS * 3 // 4 <= clipped <= ITERATIONS, (name, run.grad_norms)
        unclipped += ITERATIONS - clipped
        assert len(set(run.lrs)) > ITERATIONS // 2, (name, run.lrs)
    assert unclipped > 0, "no iteration of any mode runs the unclipped branch"


@pytest.mark.parametrize("workers", [1, 4])
@pytest.mark.parametrize("name", list(MODES))
def test_schedule_and_clipping_match_the_reference(
    in_process_runs: Path, name: str, workers: int
) -> None:
    """Parameters bit-identical at 1 worker and within tolerance at 4; every iteration's
    learning rate exactly the reference's; the gradient norm the reference's."""
    result = _train(in_process_runs, name, workers)
    reference = _reference(in_process_runs, name)
    assert result.optimizer["mode"] == MODES[name]
    assert_same_state(_state(result), reference.state, workers)
    assert [h["iteration"] for h in result.history] == list(range(ITERATIONS))
    assert [h["lr"] for h in result.history] == reference.lrs
    _assert_norms([h["grad_norm"] for h in result.history], reference.grad_norms, workers)


def test_a_killed_worker_changes_nothing(
    in_process_runs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 1 SIGKILLed at iteration 5 after uploading its gradient, before its gradient norms
    reach the other owners (who wait for them): its replacement, a fresh process, rebuilds the
    schedule at iteration 5 and the run ends bit-identical to the one without the fault."""
    clean = _train(in_process_runs, "OneCycleClipped", 4)
    monkeypatch.setenv("SMLT_FAULTS", "kill:rank=1:iteration=5:phase=after-upload")
    result = _train(in_process_runs, "OneCycleClipped", 4, "-killed", heartbeat_timeout_s=5)
    failures = [(f["rank"], f["iteration"]) for f in result.failures if "rank" in f]
    assert failures == [(1, 5)], result.failures
    got, want = _state(result), _state(clean)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), "differs from the run without faults"
    assert [h["lr"] for h in result.history] == [h["lr"] for h in clean.history]
    assert [h["grad_norm"] for h in result.history] == [h["grad_norm"] for h in clean.history]


def test_a_rescale_in_the_middle_matches_the_reference(in_process_runs: Path) -> None:
    """4 workers, then 2 from iteration 10: the second generation's workers rebuild the schedule
    at the iteration it starts at, over re-cut shards."""
    result = _train(in_process_runs, "OneCycleClipped", 4, "-rescaled", rescales=((10, 2, None),))
    reference = _reference(in_process_runs, "OneCycleClipped")
    # The generation stops at the first iteration from 10 on that its workers can agree on.
    assert [g["workers"] for g in result.generations] == [4, 2]
    boundary = result.generations[1]["start_iteration"]
    assert 10 <= boundary < ITERATIONS
    assert [h["workers"] for h in result.history] == [4] * boundary + [2] * (ITERATIONS - boundary)
    assert_same_state(_state(result), reference.state, workers=4)
    assert [h["lr"] for h in result.history] == reference.lrs
    _assert_norms([h["grad_norm"] for h in result.history], reference.grad_norms, workers=4)


def test_a_schedule_stepped_per_epoch_matches_the_reference(in_process_runs: Path) -> None:
    """Also the run's ``clip_grad_norm`` (``--clip-grad-norm``), which the task does not set:
    it reaches every worker through the run's options and clips as the reference clips."""
    result = _train(in_process_runs, "StepPerEpoch", 3, "-clipped", clip_grad_norm=MAX_NORM)
    task = _load(_task_file(in_process_runs), "StepPerEpoch")
    assert task.clip_grad_norm is None
    task.clip_grad_norm = MAX_NORM  # the user's loop with clip_grad_norm_(..., MAX_NORM)
    reference = reference_run(task, epochs=EPOCHS, batch_size=BATCH_SIZE, seed=SEED)
    clipped = sum(norm > MAX_NORM for norm in reference.grad_norms)
    assert ITERATIONS // 4 <= clipped < ITERATIONS, reference.grad_norms  # it bites, not always
    assert_same_state(_state(result), reference.state, workers=3)
    lrs = [h["lr"] for h in result.history]
    assert lrs == reference.lrs
    assert lrs == [0.02 * 0.5**epoch for epoch in range(EPOCHS) for _ in range(5)]
    _assert_norms([h["grad_norm"] for h in result.history], reference.grad_norms, workers=3)
    assert json.loads((result.output_dir / "run.json").read_text())["clip_grad_norm"] == MAX_NORM
    assert result.training == {"clip_grad_norm": MAX_NORM, "micro_batch": None, "precision": "fp32"}


def test_a_schedule_that_cannot_work_is_refused_before_workers_start(
    in_process_runs: Path,
) -> None:
    output = in_process_runs / "plateau"
    with pytest.raises(TaskError, match=r"Plateau\.scheduler\(\).*ReduceLROnPlateau"):
        smlt.train(f"{_task_file(in_process_runs)}:Plateau", epochs=1, output=output)
    assert not output.exists()
    # A OneCycleLR sized for fewer iterations than the run's: known once the data set's size
    # is, and refused then, naming the iteration a worker would have failed at.
    output = in_process_runs / "too-short"
    with pytest.raises(TaskError, match=r"TooShort\.scheduler\(\): OneCycleLR\.step\(\) raised"):
        smlt.train(
            f"{_task_file(in_process_runs)}:TooShort",
            epochs=EPOCHS,
            batch_size=BATCH_SIZE,
            seed=SEED,
            output=output,
        )
    assert not output.exists()


# --- on threads: every phase of a step -------------------------------------------------------

THREADED_WORKERS = 3
THREADED_ITERATIONS = 8
THREADED_CLASSES = ["OneCycleClipped", "WarmupCosineReplicated", "AdamOneCycle"]


def _job(tmp: Path, redis: RedisServer, job: str, task_file: Path, cls: str) -> ThreadedJob:
    return ThreadedJob(
        tmp,
        redis,
        job,
        task_file,
        cls,
        workers=THREADED_WORKERS,
        iterations=THREADED_ITERATIONS,
        batch_size=BATCH_SIZE,
        seed=SEED,
        options={"checkpoint_every": 3},
    )


@pytest.fixture(scope="module")
def threaded_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _task_file(tmp_path_factory.mktemp("threaded"))


@pytest.fixture(scope="module")
def clean_threaded(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, threaded_file: Path
) -> dict[str, Outcome]:
    return {
        cls: _job(
            tmp_path_factory.mktemp(f"clean-{cls}"),
            redis_server,
            f"clean-{cls}",
            threaded_file,
            cls,
        ).run()
        for cls in THREADED_CLASSES
    }


def _per_iteration(outcome: Outcome, field: str) -> dict[int, set[str]]:
    """Every value of ``field`` any rank reported, per iteration."""
    seen: dict[int, set[str]] = {}
    for report in outcome.reports:
        if "event" not in report:
            seen.setdefault(int(report["t"]), set()).add(report[field])
    return seen


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("cls", THREADED_CLASSES)
def test_a_worker_that_fails_anywhere_in_a_step_changes_nothing(
    cls: str,
    phase: str,
    tmp_path: Path,
    redis_server: RedisServer,
    threaded_file: Path,
    job_id: str,
    clean_threaded: dict[str, Outcome],
) -> None:
    """Parameters and optimizer state byte for byte those of the run without the fault, and
    every report of an iteration (replacements' included) with the same lr and grad_norm."""
    got = _job(tmp_path, redis_server, job_id, threaded_file, cls).run(
        f"raise:rank=1:iteration=4:phase={phase}"
    )
    clean = clean_threaded[cls]
    assert got.attempts[1] == 1, "the fault did not fire"
    for values in got.values:
        assert np.array_equal(values, clean.values[0]), "parameters differ from the clean run"
    assert got.optimizer_bytes == clean.optimizer_bytes, "optimizer state differs"
    for field in ("lr", "grad_norm"):
        mine, theirs = _per_iteration(got, field), _per_iteration(clean, field)
        assert mine == theirs, field
        assert all(len(values) == 1 for values in mine.values()), f"ranks disagree on {field}"


# --- refused on the client -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("Plateau", r"Plateau\.scheduler\(\) in task file .* ReduceLROnPlateau"),
        ("NotAScheduler", r"NotAScheduler\.scheduler\(\) .*returned a function"),
        ("OtherOptimizer", r"OtherOptimizer\.scheduler\(\) .*StepLR of another optimizer"),
        ("TooShort", r"TooShort\.scheduler\(\): OneCycleLR\.step\(\) raised ValueError"),
        ("MissingArgument", r"MissingArgument\.scheduler\(\) .*raised TypeError.*step_size"),
        ("NegativeClip", r"NegativeClip\.clip_grad_norm is -1\.0"),
        ("TextClip", r"TextClip\.clip_grad_norm is '1\.0'"),
        ("PerStepInterval", r"PerStepInterval\.scheduler_interval is 'step'"),
    ],
)
def test_the_client_side_check_names_what_cannot_work(
    tmp_path: Path, name: str, match: str
) -> None:
    task = smlt.task.load_task(f"{_task_file(tmp_path)}:{name}")
    data = smlt.task.check_task(task)
    with pytest.raises(TaskError, match=match):
        check_update(task, data.rows(0, 2), iterations=ITERATIONS, iterations_per_epoch=5)


def test_the_client_side_check_passes_the_tasks_that_work(tmp_path: Path) -> None:
    for name in [*MODES, "StepPerEpoch", "AdamOneCycle"]:
        task = smlt.task.load_task(f"{_task_file(tmp_path)}:{name}")
        batch = smlt.task.check_task(task).rows(0, 2)
        assert check_update(task, batch, iterations=ITERATIONS, iterations_per_epoch=5)
        assert check_update(task, batch)  # the run's length unknown: one step of the schedule


# --- the pieces ------------------------------------------------------------------------------

SCHEDULERS = {
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=30),
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(
        opt, [lambda t: min(1.0, (t + 1) / 5), lambda t: 0.9**t]
    ),
    "SequentialLR": lambda opt: torch.optim.lr_scheduler.SequentialLR(
        opt,
        [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=4),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20),
        ],
        milestones=[4],
    ),
    "CosineAnnealingWarmRestarts": lambda opt: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        opt, T_0=7
    ),
    "CyclicLR": lambda opt: torch.optim.lr_scheduler.CyclicLR(
        opt, base_lr=0.01, max_lr=0.1, step_size_up=3
    ),
    "ExponentialLR": lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8),
}


class _Groups(smlt.Task):
    """Two param groups (schedulers may treat them apart), SGD with momentum (for CyclicLR and
    OneCycleLR to cycle)."""

    kind = "OneCycleLR"

    def model(self) -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        groups = [{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.3}]
        return torch.optim.SGD(groups, lr=0.1, momentum=0.9)

    def scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        return SCHEDULERS[self.kind](optimizer)


@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_a_schedule_rebuilt_at_any_iteration_is_the_users_loop(kind: str) -> None:
    """What the stepping optimizer gets at iteration t is what the user's own optimizer holds at
    iteration t of ``opt.step(); sched.step()``, whether the schedule has run since 0 or was
    built at t (a replacement, a re-scale, a resume)."""
    task = _Groups()
    task.kind = kind
    model = task.model()
    user = task.optimizer(model)
    sched = task.scheduler(user)
    expected = []
    for _ in range(25):
        expected.append([{k: g[k] for k in ("lr", "momentum")} for g in user.param_groups])
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        user.step()
        sched.step()
    running = Schedule(task, task.optimizer(task.model()), iterations_per_epoch=5)
    for t, want in enumerate(expected):
        fresh = Schedule(task, task.optimizer(task.model()), iterations_per_epoch=5)
        for schedule in (running, fresh):
            got = schedule.hyperparameters(t)
            assert [{k: g.get(k, w[k]) for k in w} for g, w in zip(got, want, strict=True)] == want
            assert schedule.lr(t) == want[0]["lr"]
    last = len(expected) - 1
    assert "lr" in running.hyperparameters(last)[0]
    if kind in ("OneCycleLR", "CyclicLR"):
        assert "momentum" in running.hyperparameters(last)[0]  # cycled, so it is driven
    # Back in time (not what a worker does, but defined): rebuilt, the same values again.
    assert running.hyperparameters(3) == Schedule(
        task, task.optimizer(task.model()), iterations_per_epoch=5
    ).hyperparameters(3)


@pytest.mark.parametrize("workers", [1, 2, 3, 7])
def test_the_sharded_norm_is_clip_grad_norms(workers: int) -> None:
    """Owners' piece norms, concatenated in shard order, give ``clip_grad_norm_``'s norm and
    clipped gradient: bit for bit at one owner, within rounding at several."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(9, 13), torch.nn.Tanh(), torch.nn.Linear(13, 5))
    model[0].bias.requires_grad_(False)  # no gradient: left out, as by clip_grad_norm_
    flat = FlatModel(model)
    model(torch.randn(16, 9)).pow(2).sum().backward()
    grad = flat.gradient(1.0).copy()
    has_grad = flat.has_grad()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    clipped = np.concatenate(
        [p.grad.reshape(-1).numpy() for p in flat.params if p.grad is not None]
    )
    slices = [shard_slice(flat.size, workers, s) for s in range(workers)]
    norms = [
        piece_norms(grad[sl], sl.start, norm_pieces(flat, sl.start, sl.stop, has_grad))
        for sl in slices
    ]
    total = total_norm(norms)
    for sl in slices:
        clip_(grad[sl], sl.start, flat, total, 0.5)
    mine = np.concatenate(
        [grad[s.start : s.stop] for s in flat.param_segments if has_grad[s.index]]
    )
    assert float(norm) > 0.5  # it clipped
    if workers == 1:
        assert torch.equal(total, norm)
        assert np.array_equal(mine, clipped)
    else:
        torch.testing.assert_close(total, norm, rtol=1e-6, atol=0)
        np.testing.assert_allclose(mine, clipped, rtol=1e-6, atol=1e-9)
