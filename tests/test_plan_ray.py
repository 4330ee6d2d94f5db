"""``smlt plan --backend ray`` and what it is built on: ``max_iterations`` and a run's driver time.

How close a plan comes to the run it predicts is measured by benchmarks/plan_accuracy.py
(real ``smlt train`` runs); here: that a run stopped by ``max_iterations`` trained exactly the
first iterations of the full run (against the plain PyTorch loop, not against smlt), that a
plan on Ray is composed of what its trial measured, and that the economics count the driver's
own time as wall time no worker is billed for.
"""

from __future__ import annotations

import json
import math
import os
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

import smlt
from smlt.cli import _print_plan, _print_summary, app
from smlt.client.plan import RayTrials, TaskProfile, plan_task
from smlt.client.prices import Prices, machine_memory_mb
from smlt.errors import ConfigError, OutOfMemoryError, TrainingError
from smlt.optimizer.economics import RunEconomics
from smlt.optimizer.goals import Budget, Deadline
from smlt.optimizer.perf import Workload
from smlt.optimizer.problem import Probe, Problem
from smlt.optimizer.space import SearchSpace
from tests.reference import reference_run

ROOT = Path(__file__).resolve().parent.parent
DIGITS = f"{ROOT / 'examples' / 'digits.py'}:Digits"


def _digits() -> smlt.Task:
    namespace = runpy.run_path(str(ROOT / "examples" / "digits.py"))
    task: smlt.Task = namespace["Digits"]()
    return task


def test_max_iterations_trains_the_first_iterations_and_prices_are_the_users(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # digits at batch 256: 6 iterations an epoch, so 8 stops in the middle of the second.
    result = smlt.train(
        DIGITS,
        epochs=3,
        batch_size=256,
        workers=1,
        memory_mb=1769,
        seed=5,
        max_iterations=8,
        output=tmp_path / "run",
        object_store=str(tmp_path / "objects"),
        node_usd_per_hour=3.6,
        node_vcpus=4,
        node_memory_mb=16384,
        store_usd_per_hour=0.72,
    )
    assert result.iterations == 8
    assert [h["iteration"] for h in result.history] == list(range(8))
    assert result.iterations_per_epoch == 6
    monkeypatch.setenv("COLUMNS", "160")
    _print_summary(result)
    assert "8 of 18 (3 epochs of batch 256; stopped by --max-iterations)" in capsys.readouterr().out
    reference = reference_run(_digits(), epochs=3, batch_size=256, seed=5, max_iterations=8)
    assert len(reference.lrs) == 8
    trained = torch.load(result.model_path)
    assert trained.keys() == reference.state.keys()
    for name, value in reference.state.items():
        assert torch.equal(trained[name], value), name  # one worker: bit-identical
    # Billed by the node-hour: a 1769 MB worker holds 1 of the node's 4 vCPUs (a quarter, more
    # than its 1769/16384 of the memory), at $3.60 an hour: $0.00025 per worker-second.
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["pricing"] == "ray_node_hour"
    assert saved["cost"]["workers_usd"] == pytest.approx(
        result.billed_worker_s * 0.25 * 3.6 / 3600, rel=1e-6
    )
    assert saved["cost"]["requests_usd"] == 0.0  # a Ray task has no invocation fee
    # The store's host, $0.72 an hour, for the scheduler's wall time (within the run's).
    assert 0 < saved["cost"]["store_usd"] <= result.wall_s * 0.72 / 3600
    planned = json.loads((tmp_path / "run" / "run.json").read_text())
    assert planned["prices"] == {
        "node_usd_per_hour": 3.6,
        "node_vcpus": 4.0,
        "node_memory_mb": 16384.0,
        "store_usd_per_hour": 0.72,
    }


def test_prices_that_cannot_apply_are_refused() -> None:
    with pytest.raises(ConfigError, match="--node-usd-per-hour prices a Ray cluster"):
        Prices.checked("aws_lambda", node_usd_per_hour=1.0)
    with pytest.raises(ConfigError, match="give the price too"):
        Prices.checked("ray", node_vcpus=8)
    with pytest.raises(ConfigError, match="--store-usd-per-hour must be >= 0"):
        Prices.checked("ray", store_usd_per_hour=-1)
    with pytest.raises(ConfigError, match="--node-vcpus and --node-memory-mb must be > 0"):
        Prices.checked("ray", node_usd_per_hour=1.0, node_vcpus=0)
    here = Prices.checked("ray", node_usd_per_hour=1.0)  # a local Ray's node: this machine
    assert here.node_vcpus == os.cpu_count()
    assert here.node_memory_mb == machine_memory_mb() > 1024
    assert Prices.checked("aws_lambda").pricing() is None  # the backend's own prices
    assert Prices.from_dict(here.to_dict()) == here and Prices.from_dict(None) == Prices()
    with pytest.raises(ConfigError, match="prices in run.json are not what smlt writes"):
        Prices.from_dict({"node_usd_per_hour": 1.0, "node_usd": 2.0})


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-iterations", "0"], "--max-iterations must be >= 1, got 0"),
        (
            ["--backend", "aws_lambda", "--node-usd-per-hour", "2"],
            "--node-usd-per-hour prices a Ray cluster by the node-hour; the aws_lambda backend",
        ),
    ],
)
def test_bad_run_options_are_refused_naming_the_flag(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    outcome = CliRunner().invoke(app, ["train", DIGITS, *flags, "--output", str(tmp_path / "run")])
    assert outcome.exit_code == 2
    assert message in " ".join(outcome.output.split())
    assert not (tmp_path / "run").exists()


def test_a_plan_on_ray_is_what_its_trial_measured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    epochs, batch_size = 4, 256  # 24 iterations; the trial trains 5 of them, in its own run
    result = plan_task(
        DIGITS, epochs=epochs, batch_size=batch_size, workers=2, memory_mb=884, backend="ray"
    )
    assert result.backend == "ray" and result.platform is None
    (trial,) = result.trials
    assert (trial["grain"], trial["outcome"], trial["iterations"]) == ("ray", "ok", 5)
    assert (trial["workers"], trial["memory_mb"]) == (2, 884)
    # The run's fixed costs were measured, not assumed: Ray, Redis and the scheduler start
    # (driver_s) and the workers' cold start (startup_s); their sizes are the benchmark's.
    assert trial["driver_s"] > 0 and trial["startup_s"] > 0
    assert trial["driver_s"] + trial["startup_s"] < trial["wall_s"]
    problem = result.problem
    assert (problem.startup_s, problem.driver_s) == (trial["startup_s"], trial["driver_s"])
    # Trials on Ray are not the job's iterations: the prediction is for the whole run.
    assert problem.workload.iterations == result.job_iterations == 24
    predicted = result.decision.predicted
    assert (predicted.workers, predicted.memory_mb) == (2, 884)
    assert predicted.time_s == pytest.approx(
        problem.driver_s + problem.startup_s + 24 * predicted.s_per_iteration, rel=1e-9
    )
    # The model's time per iteration at the measured configuration is the measurement's,
    # give or take the GP's noise allowance.
    assert predicted.s_per_iteration == pytest.approx(trial["s_per_iteration"], rel=0.5)
    # Billed: the workers while they run, not the driver's time alone.
    workers_usd = predicted.to_dict()["remaining_cost"]["workers_usd"]
    usd_per_worker_s = workers_usd / (2 * (predicted.time_s - problem.driver_s))
    assert usd_per_worker_s == pytest.approx(0.0000166667 * 884 / 1024, rel=1e-3)
    # As smlt plan prints it: the trial's fixed costs beside its time per iteration.
    monkeypatch.setenv("COLUMNS", "160")  # rich's width off a terminal: 80 would wrap
    _print_plan(result, tmp_path / "frontier.png")
    printed = " ".join(capsys.readouterr().out.split())
    assert "1 trial on Ray (short real runs)" in printed
    assert "start-up s driver s" in printed, printed
    assert f"{trial['driver_s']:.1f}" in printed
    assert "a fixed configuration, 24 iterations of batch 256" in printed


def test_plan_on_ray_refuses_what_it_cannot_use() -> None:
    profile = TaskProfile("t.py:T", 10, 100, 1e-5, 1, 0.1)
    with pytest.raises(ConfigError, match="--backend ray runs the task"):
        plan_task(profile, epochs=1, batch_size=10, backend="ray")
    with pytest.raises(ConfigError, match="noise_sigma only set the sim's model"):
        plan_task(DIGITS, epochs=1, batch_size=10, backend="ray", noise_sigma=0.1)
    outcome = CliRunner().invoke(app, ["plan", DIGITS, "--backend", "ray", "--noise", "0.1"])
    assert outcome.exit_code == 2
    assert "noise_sigma only set the sim's model" in outcome.output
    with pytest.raises(ConfigError, match="--redis-url and --object-store are for the trials"):
        plan_task(profile, epochs=1, batch_size=10, object_store="s3://bucket/prefix")


def _probe() -> Probe:
    return Probe(2, 512, 5, Workload(batch_size=256, num_params=9610, iterations=60))


def test_a_ray_trial_that_ran_out_of_memory_is_an_oom_trial(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """However the run ended: raising with the typed error in its cause chain, or finishing
    after the scheduler retried the worker with twice the memory (the probe's size did not
    fit either way). Another failure is not hidden as an out-of-memory."""
    import smlt.client.driver as driver

    def out_of_memory(*args: object, **kwargs: object) -> None:
        try:
            raise OutOfMemoryError("Runtime.OutOfMemory: 512 MB")
        except OutOfMemoryError as exc:
            raise TrainingError("worker 1 failed the same way twice at iteration 0") from exc

    retried = SimpleNamespace(
        failures=[{"rank": 1, "cause": "OutOfMemoryError: 512 MB", "retry_memory_mb": 1024}],
        wall_s=9.0,
        cost_usd=2e-4,
    )
    with RayTrials(DIGITS, epochs=10, batch_size=256) as measure:
        monkeypatch.setattr(driver, "train", out_of_memory)
        raised = measure(_probe())
        monkeypatch.setattr(driver, "train", lambda *a, **k: retried)
        finished = measure(_probe())
        monkeypatch.setattr(
            driver, "train", lambda *a, **k: (_ for _ in ()).throw(TrainingError("no Redis"))
        )
        with pytest.raises(TrainingError, match="no Redis"):
            measure(_probe())
    assert (raised.outcome, finished.outcome) == ("oom", "oom")
    assert finished.cost_usd == 2e-4 and raised.s_per_iteration is None
    assert measure.overheads() is None  # nothing ran: the plan keeps its default start-up


def _economics(goal: object, driver_s: float) -> RunEconomics:
    problem = Problem(
        goal=goal,  # type: ignore[arg-type]
        workload=Workload(batch_size=256, num_params=10_000, iterations=100),
        space=SearchSpace(max_workers=8, min_memory_mb=128, max_memory_mb=10240),
        startup_s=3.0,
        driver_s=driver_s,
    )
    return RunEconomics([1, 4], [1769, 884], 100, problem)


def test_the_drivers_time_is_wall_time_no_worker_is_billed_for() -> None:
    without, with_driver = _economics(Deadline(60), 0.0), _economics(Deadline(60), 12.0)
    s = 0.05
    assert with_driver.wall_s(s) == pytest.approx(without.wall_s(s) + 12.0)
    assert with_driver.wall_s(s)[0] == pytest.approx(12.0 + 3.0 + 100 * s)
    assert with_driver.breakdown(s)[0] == pytest.approx(without.breakdown(s)[0])  # workers
    # The inverses stay inverses: the largest s/iteration within a wall time or a cost gives
    # exactly that wall time or cost back.
    limit = with_driver.s_within_wall(30.0)
    assert with_driver.wall_s(limit[0])[0] == pytest.approx(30.0)
    assert without.s_within_wall(30.0)[0] > limit[0]
    budget = _economics(Budget(0.001), 12.0)
    most = budget.s_within_cost(0.001)
    for k in range(2):
        assert budget.cost_usd(most[k])[k] == pytest.approx(0.001)
    assert math.isclose(without.s_within_wall(12.0 + 3.0)[0], 0.12)
