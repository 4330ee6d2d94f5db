"""bf16 compute (``--precision bf16``) keeps what smlt promises of it.

The forward pass and loss run under ``torch.autocast("cpu", dtype=torch.bfloat16)``, the backward
pass outside it; parameters, optimizer state and the exchange stay float32
(smlt/worker/precision.py). bfloat16 does not give 1 x B's bits, so what is shown instead:

- on threads (real Redis, tests/worker_harness.py): a bf16 run trains (its loss falls), computes
  something else than the float32 run (autocast is on) close to it, and keeps every parameter
  and every optimizer-state array float32; a worker failing at the points of a step where its
  gradient is recomputed, with micro-batches on too, changes no byte of the parameters or the
  optimizer state (bfloat16 kernels are as deterministic as float32 ones);
- a loss with an op that has no bfloat16 kernel fails on the client, before any worker, naming
  the method and the precision; the same loss passes in float32; an unknown precision is refused
  naming the flag;
- the pieces: the context casts a matrix product to bfloat16 and leaves the gradient float32.

Every smlt.train run in the suite costs seconds, so one shows the option reaches the workers
through Ray (the first loss a worker reports is the bf16 forward pass's, not the float32 one);
``benchmarks/precision.py`` runs bf16 through Ray at length, and run.json's round trip here keeps
the precision, the micro-batch size, the clip norm and the TensorBoard folder for a resume.
"""

from __future__ import annotations

import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import smlt
from smlt.client.artifacts import package_task
from smlt.errors import ConfigError, TaskError
from smlt.protocol.state import decode_optimizer_state
from smlt.storage.objects import LocalObjectStore
from smlt.storage.redis_server import RedisServer
from smlt.task import check_task, load_task
from smlt.worker.precision import check_precision, compute_precision
from smlt.worker.selfcheck import check_update
from tests.test_exactness import PREAMBLE
from tests.test_schedules import BATCH_SIZE, SEED
from tests.test_schedules import TASKS as SCHEDULE_TASKS
from tests.worker_harness import Outcome, ThreadedJob

WORKERS = 3
ITERATIONS = 8
#: The points where the replacement recomputes the step's gradient and it is used.
RECOMPUTE_PHASES = ("start", "after-upload", "after-publish")

TASKS = textwrap.dedent(
    '''

    class Determinant(Regression):
        """A loss with a determinant of the model's output: LU has no bfloat16 kernel on CPU."""

        def loss(self, model, batch):
            x, y = batch
            out = model(x)
            return nn.functional.mse_loss(out, y) + 1e-3 * torch.det(out.T @ out)
    '''
)


@pytest.fixture(scope="module")
def task_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tasks") / "precision.py"
    path.write_text(PREAMBLE + SCHEDULE_TASKS + TASKS)
    return path


def _job(
    tmp: Path,
    redis: RedisServer,
    job: str,
    task_file: Path,
    cls: str,
    *,
    precision: str = "bf16",
    micro_batch: int | None = None,
    faults: str = "",
) -> Outcome:
    return ThreadedJob(
        tmp,
        redis,
        job,
        task_file,
        cls,
        workers=WORKERS,
        iterations=ITERATIONS,
        batch_size=BATCH_SIZE,
        seed=SEED,
        options={"checkpoint_every": 3, "precision": precision, "micro_batch": micro_batch},
    ).run(faults)


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, task_file: Path
) -> dict[str, Outcome]:
    """AdamOneCycle (sharded Adam: two state arrays) in float32 and bf16, and
    WarmupCosineReplicated (a replicated optimizer) in bf16 with micro-batches of 5."""
    out = {}
    for name, cls, precision, micro in [
        ("fp32", "AdamOneCycle", "fp32", None),
        ("bf16", "AdamOneCycle", "bf16", None),
        ("bf16-micro", "WarmupCosineReplicated", "bf16", 5),
    ]:
        out[name] = _job(
            tmp_path_factory.mktemp(name),
            redis_server,
            f"precision-{name}",
            task_file,
            cls,
            precision=precision,
            micro_batch=micro,
        )
    return out


def _losses(outcome: Outcome) -> list[float]:
    """The global batch's loss per iteration, from the ranks' reports."""
    per: dict[int, list[tuple[float, int]]] = {}
    for report in outcome.reports:
        if "event" not in report:
            per.setdefault(int(report["t"]), []).append(
                (float(report["loss"]), int(report["samples"]))
            )
    return [
        sum(loss * n for loss, n in parts) / sum(n for _loss, n in parts)
        for _t, parts in sorted(per.items())
    ]


def test_bf16_trains_close_to_float32(runs: dict[str, Outcome]) -> None:
    fp32, bf16 = runs["fp32"], runs["bf16"]
    losses = _losses(bf16)
    assert len(losses) == ITERATIONS
    assert np.mean(losses[-2:]) < 0.6 * np.mean(losses[:2]), losses
    assert not np.array_equal(bf16.final.values, fp32.final.values), "autocast was not on"
    # bfloat16 keeps 8 bits of mantissa: close to float32, not equal.
    np.testing.assert_allclose(bf16.final.values, fp32.final.values, rtol=0.05, atol=0.01)
    np.testing.assert_allclose(losses, _losses(fp32), rtol=0.02)
    assert {r["micro"] for r in runs["bf16-micro"].reports} == {"5"}
    assert _losses(runs["bf16-micro"])[-1] < _losses(runs["bf16-micro"])[0]


def test_parameters_and_optimizer_state_stay_float32(runs: dict[str, Outcome]) -> None:
    sharded = runs["bf16"].final
    assert sharded.values.dtype == np.float32
    assert set(sharded.optimizer.arrays) == {"exp_avg", "exp_avg_sq"}
    assert all(a.dtype == np.float32 for a in sharded.optimizer.arrays.values())
    replicated = runs["bf16-micro"].final
    assert replicated.values.dtype == np.float32
    state = decode_optimizer_state(replicated.optimizer.blob, "test")
    tensors = [v for s in state["state"].values() for v in s.values() if torch.is_tensor(v)]
    assert tensors and all(t.dtype == torch.float32 for t in tensors)


@pytest.mark.parametrize("phase", RECOMPUTE_PHASES)
@pytest.mark.parametrize("name", ["bf16", "bf16-micro"])
def test_a_worker_that_fails_under_bf16_changes_nothing(
    name: str,
    phase: str,
    tmp_path: Path,
    redis_server: RedisServer,
    task_file: Path,
    job_id: str,
    runs: dict[str, Outcome],
) -> None:
    clean = runs[name]
    cls, micro = ("AdamOneCycle", None) if name == "bf16" else ("WarmupCosineReplicated", 5)
    got = _job(
        tmp_path,
        redis_server,
        job_id,
        task_file,
        cls,
        micro_batch=micro,
        faults=f"raise:rank=1:iteration=4:phase={phase}",
    )
    assert got.attempts[1] == 1, "the fault did not fire"
    for values in got.values:
        assert np.array_equal(values, clean.values[0]), "parameters differ from the clean run"
    assert got.optimizer_bytes == clean.optimizer_bytes, "optimizer state differs"


# --- refused on the client -------------------------------------------------------------------


def test_an_op_without_a_bf16_kernel_fails_on_the_client(task_file: Path, tmp_path: Path) -> None:
    """torch.det of a bfloat16 matrix: the self-check runs the forward pass under autocast, as
    the workers will, and names the method, the precision and the op's error; packaging the
    task for a bf16 run stops there. The same task passes in float32."""
    task = load_task(f"{task_file}:Determinant")
    batch = check_task(task).rows(0, 2)
    assert check_update(task, batch) == "sharded"
    with pytest.raises(
        TaskError,
        match=r"Determinant\.loss\(\) failed under --precision bf16 .*autocast.*BFloat16",
    ):
        check_update(task, batch, precision="bf16")
    objects = LocalObjectStore(tmp_path / "objects")
    with pytest.raises(TaskError, match=r"--precision bf16"):
        package_task(f"{task_file}:Determinant", objects, "det", precision="bf16")
    assert not objects.list("jobs/det/")


def test_an_unknown_precision_is_refused_naming_the_flag() -> None:
    assert check_precision(None) == "fp32"
    assert check_precision("bf16") == "bf16"
    for bad in ("fp16", "BF16", 16):
        with pytest.raises(ConfigError, match=r"--precision must be one of fp32, bf16"):
            check_precision(bad)


def test_the_context_computes_in_bf16_and_the_gradient_stays_float32() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with compute_precision("fp32"):
        assert layer(x).dtype == torch.float32
    with compute_precision("bf16"):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32


def test_smlt_train_refuses_a_bf16_failure_before_workers_start(
    task_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through ``smlt.train``: the run's precision reaches the client-side check, which fails
    in seconds, before any worker starts, and leaves no output folder."""
    monkeypatch.setenv("SMLT_OBJECT_STORE", str(tmp_path / "objects"))
    output = tmp_path / "det-bf16"
    with pytest.raises(TaskError, match=r"Determinant\.loss\(\) failed under --precision bf16"):
        smlt.train(f"{task_file}:Determinant", epochs=1, precision="bf16", output=output)
    assert not output.exists()


def test_run_json_keeps_how_every_step_is_taken(tmp_path: Path) -> None:
    """A resume trains as the run started: run.json keeps the precision, the micro-batch size,
    the clip norm and the TensorBoard folder, and the workers of the resume get the same
    options as the train's."""
    from smlt.client.driver import RunPlan, training_options

    plan = RunPlan(
        job_id="j",
        task="t.py:T",
        backend="ray",
        output_dir=str(tmp_path),
        object_store=str(tmp_path / "objects"),
        epochs=1,
        batch_size=8,
        workers=2,
        memory_mb=512,
        seed=0,
        total_iterations=4,
        iterations_per_epoch=4,
        num_params=10,
        shard_timeout_s=120.0,
        function_timeout_s=None,
        checkpoint_every=4,
        heartbeat_timeout_s=15.0,
        clip_grad_norm=0.5,
        micro_batch=4,
        precision="bf16",
        tensorboard=str(tmp_path / "tb"),
    )
    plan.save()
    loaded = RunPlan.load(tmp_path)
    assert loaded == plan
    assert training_options(loaded) == {
        "precision": "bf16",
        "clip_grad_norm": 0.5,
        "micro_batch": 4,
    }
    # Without --clip-grad-norm the workers apply the task's own clip_grad_norm.
    assert "clip_grad_norm" not in training_options(replace(plan, clip_grad_norm=None))


def test_smlt_train_runs_the_workers_forward_pass_in_bf16(
    in_process_runs: Path, task_file: Path
) -> None:
    """Through smlt.train (Ray, the scheduler, the run's options): the first iteration's loss a
    worker reports is the bf16 forward pass's, to float32 rounding, and not the float32 one."""
    from tests.test_exactness import _load

    task = _load(task_file, "AdamOneCycle")
    x, y = (torch.as_tensor(t) for t in task.data())
    first = torch.from_numpy(
        next(iter(smlt.global_batches(len(x), BATCH_SIZE, seed=SEED, epoch=0)))
    )
    batch = (x[first], y[first])
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as a 1,769 MB worker computes
    try:
        losses = {}
        for precision in ("fp32", "bf16"):
            torch.manual_seed(SEED)
            model = task.model()
            torch.manual_seed(smlt.iteration_seed(SEED, 0))
            with compute_precision(precision):
                losses[precision] = float(task.loss(model, batch).detach())
    finally:
        torch.set_num_threads(previous)
    assert abs(losses["bf16"] - losses["fp32"]) > 1e-4 * abs(losses["fp32"]), losses

    result = smlt.train(
        f"{task_file}:AdamOneCycle",
        epochs=1,
        batch_size=BATCH_SIZE,
        seed=SEED,
        memory_mb=1769,
        precision="bf16",
        output=in_process_runs / "bf16-through-ray",
    )
    assert result.training["precision"] == "bf16"
    reported = result.history[0]["loss"]
    assert reported == pytest.approx(losses["bf16"], rel=1e-6), (reported, losses)
