"""``smlt plan``: the command once as a user runs it, the rest through the Python API.

The digits task is profiled once per module (a few seconds on one thread) and handed to
:func:`~smlt.client.plan.plan_task` as a :class:`~smlt.client.plan.TaskProfile`; the in-process
CLI tests patch the profiler to return it.
"""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import smlt.client.plan as plan_module
from smlt.cli import app
from smlt.client.goals import calibrate
from smlt.client.plan import EXIT_INFEASIBLE, TaskProfile, plan_task, profile_task
from smlt.errors import ConfigError
from smlt.optimizer.goals import Deadline

ROOT = Path(__file__).resolve().parent.parent
DIGITS = f"{ROOT / 'examples' / 'digits.py'}:Digits"
JSON_KEYS = [
    "feasible",
    "workers",
    "memory_mb",
    "predicted_time_s",
    "predicted_cost_usd",
    "trials",
    "frontier",
]


@pytest.fixture(scope="module")
def digits() -> TaskProfile:
    return profile_task(DIGITS)


@pytest.fixture
def profiled(monkeypatch: pytest.MonkeyPatch, digits: TaskProfile) -> TaskProfile:
    monkeypatch.setattr(plan_module, "profile_task", lambda task: digits)
    return digits


def test_the_profile_is_the_tasks(digits: TaskProfile) -> None:
    assert digits.num_params == 64 * 128 + 128 + 128 * 10 + 10
    assert digits.num_samples == 1347  # 75 % of load_digits' 1797
    assert digits.optimizer_state_shards == 1  # SGD with momentum: one buffer per parameter
    assert 1e-7 < digits.s_per_sample_1_vcpu < 1e-3


def test_smlt_plan_json_through_the_cli(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "smlt",
            "plan",
            DIGITS,
            "--epochs",
            "50",
            "--batch-size",
            "256",
            "--deadline",
            "10m",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert list(data)[: len(JSON_KEYS)] == JSON_KEYS
    assert data["feasible"] is True
    assert data["predicted_time_s"] <= 600
    assert data["trials"] == len(data["trial_details"]) >= 1
    assert data["frontier"] and all(
        {"workers", "memory_mb", "time_s", "cost_usd"} <= set(p) for p in data["frontier"]
    )
    assert 1 <= data["workers"] <= 256  # never more workers than samples in a batch
    plot = tmp_path / data["plot"]
    assert plot.is_file() and plot.read_bytes()[:4] == b"\x89PNG"
    assert (plot.parent / "plan.json").is_file()


def test_an_impossible_deadline_exits_3_naming_the_fastest_and_the_cheapest(
    profiled: TaskProfile, tmp_path: Path
) -> None:
    args = ["plan", DIGITS, "--epochs", "50", "--batch-size", "256", "--deadline", "5s"]
    result = CliRunner().invoke(app, [*args, "--plot", str(tmp_path / "f.png")])
    assert result.exit_code == EXIT_INFEASIBLE == 3, result.output
    assert "no configuration meets the deadline 5s" in result.output
    assert "the fastest predicted is" in result.output
    assert "the cheapest predicted is $" in result.output
    assert (tmp_path / "f.png").is_file()
    # The same through the API: not an exception, a decision that says so.
    plan = plan_task(profiled, epochs=50, batch_size=256, goal=Deadline(5))
    assert not plan.feasible
    fastest = plan.decision.fastest
    assert fastest is not None and fastest.time_s > 5
    assert plan.decision.cheapest is not None


def test_fixed_workers_and_memory_predict_without_search(profiled: TaskProfile) -> None:
    plan = plan_task(profiled, epochs=50, batch_size=256, workers=4, memory_mb=2048)
    decision = plan.decision
    assert (decision.workers, decision.memory_mb, decision.action) == (4, 2048, "run")
    assert decision.trials == 1 and len(plan.trials) == 1  # one measurement, no search
    assert decision.reason == "workers and memory fixed by the user"
    # The prediction is the measured trial carried over the rest of the job.
    trial = plan.trials[0]
    rest = 50 * 6 - trial["iterations"]  # 1347 samples: 6 iterations of 256 an epoch
    assert decision.predicted.s_per_iteration == pytest.approx(trial["s_per_iteration"], rel=0.1)
    assert decision.predicted.time_s == pytest.approx(
        trial["wall_s"] + 8.0 + rest * decision.predicted.s_per_iteration, rel=0.05
    )
    assert decision.predicted.cost_usd > trial["cost_usd"]


def test_a_bad_flag_fails_fast_naming_it(tmp_path: Path) -> None:
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["plan", DIGITS, "--deadline", "5x"])
    assert time.perf_counter() - started < 2  # refused before anything is profiled
    assert result.exit_code == 2
    assert "--deadline '5x'" in result.output
    both = CliRunner().invoke(app, ["plan", DIGITS, "--deadline", "5m", "--budget", "1"])
    assert both.exit_code == 2 and "at most one of" in both.output


def test_an_unknown_backend_or_memory_out_of_range_is_a_typed_error(digits: TaskProfile) -> None:
    with pytest.raises(ConfigError, match="--backend 'lambda'"):
        plan_task(digits, epochs=1, batch_size=256, backend="lambda")
    with pytest.raises(ConfigError, match="--memory-mb 20000 is outside"):
        plan_task(digits, epochs=1, batch_size=256, workers=2, memory_mb=20000)


def test_calibration_counts_the_optimizer_state_that_travels_with_a_shard() -> None:
    """Adam keeps two parameter-shaped tensors per parameter (its moments; ``step`` is a
    scalar), SGD with momentum one: what each owner publishes with its shard."""
    namespace = runpy.run_path(str(ROOT / "examples" / "transformer.py"))
    adam = calibrate(namespace["Transformer"](), 8, samples=8, repeats=1)
    assert adam.optimizer_state_shards == 2 and adam.s_per_sample > 0
    digits = runpy.run_path(str(ROOT / "examples" / "digits.py"))["Digits"]()
    assert calibrate(digits, 8, samples=8, repeats=1).optimizer_state_shards == 1
