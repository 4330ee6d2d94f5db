"""``smlt train --deadline/--budget/--fastest``: the optimizer live on the real backend.

What is shown:

- through ``smlt.train`` (real Ray and Redis): a digits run with a generous deadline lists every
  trial (workers, memory, measured s/iteration, cost), the configuration chosen and why, and
  that the goal was met; trials are training (the iterations add up, nothing is run twice) and
  the re-scales between them leave the parameters those of the plain PyTorch reference within
  tests/test_exactness.py's tolerances;
- an impossible budget is refused before Ray starts, naming the cheapest cost in reach, and
  leaves no output folder;
- an override wins: ``workers=2`` with ``fastest`` searches memory only;
- the resource manager's decisions, with made-up generation outcomes (pure logic): probes end
  at their boundary and become trials; an out-of-memory generation is a trial the search does
  not repeat; a changed workload is re-planned and handed over through ``wants_rescale``; the
  decision the driver took is the one the scheduler's manager starts with; trials travel
  through a checkpoint's metadata.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest
import torch

import smlt
from smlt.actors.resource_manager import (
    Config,
    GenerationOutcome,
    GoalSettings,
    ResourceManager,
    goal_from_dict,
    trial_from_dict,
)
from smlt.backends.base import BackendLimits
from smlt.errors import ConfigError, InfeasibleGoalError
from smlt.optimizer.goals import Budget, Deadline, Fastest
from smlt.optimizer.perf import Workload
from smlt.optimizer.problem import SearchSettings
from tests.reference import reference_state_dict
from tests.test_exactness import assert_same_state

DIGITS = str(Path(__file__).resolve().parent.parent / "examples" / "digits.py") + ":Digits"
EPOCHS = 3
BATCH_SIZE = 256
SEED = 0

# -- pure logic: the manager with made-up generation outcomes ------------------------------------

LIMITS = BackendLimits(
    min_memory_mb=128,
    max_memory_mb=10240,
    max_duration_s=900,
    max_concurrency=64,
    max_payload_bytes=6_000_000,
)
WORKLOAD = Workload(batch_size=256, num_params=9_610, iterations=40)


def _s_per_iteration(workers: int, memory_mb: int) -> float:
    """A made-up platform: compute shrinks with workers x vCPUs, traffic grows with workers."""
    vcpus = min(memory_mb / 1769, 6.0)
    return 0.01 + 0.3 / (workers * vcpus) + 0.003 * workers


def _outcome(config: Config, stop: int, *, oom: bool = False) -> GenerationOutcome:
    iterations = stop - config.from_iteration
    s = _s_per_iteration(config.workers, config.memory_mb)
    wall_s = 2.0 + iterations * s
    return GenerationOutcome(
        start_iteration=config.from_iteration,
        stop_iteration=stop,
        workers=config.workers,
        memory_mb=config.memory_mb,
        wall_s=wall_s,
        cost_usd=config.workers * config.memory_mb / 1024 * wall_s * 1.66667e-5,
        s_per_iteration=None if oom else s,
        out_of_memory=oom,
    )


def _manager(goal: GoalSettings, *, workers: int | None = None) -> ResourceManager:
    return ResourceManager(LIMITS, workers=workers, memory_mb=None, goal=goal)


def _settings(goal: Deadline | Budget | Fastest, **search: int) -> GoalSettings:
    knobs = {"max_trials": 3, "trial_iterations": 3, **search}
    return GoalSettings(goal=goal, workload=WORKLOAD, search=SearchSettings(**knobs))


def _drive(manager: ResourceManager, total: int) -> list[Config]:
    """Play the scheduler: run each generation until the manager wants it stopped, report it,
    take the next configuration. Returns the configurations in order."""
    config = manager.initial(0)
    configs = [config]
    start = config.from_iteration
    while start < total:
        stop = start
        while stop < total and not manager.wants_rescale(stop):
            stop += 1
        stop = min(stop + 1, total)  # the boundary the workers agree on: the next iteration
        manager.record(_outcome(config, stop))
        nxt = manager.after_generation(stop, "re-scaling")
        if nxt != config:
            configs.append(nxt)
        config, start = nxt, stop
    return configs


def test_probes_are_generations_that_become_trials_then_the_choice_runs_to_the_end() -> None:
    manager = _manager(_settings(Deadline(600)))
    configs = _drive(manager, WORKLOAD.iterations)
    trials = manager.trials
    assert 1 <= len(trials) <= 3
    # Every probe trained exactly trial_iterations iterations, one after the other from 0.
    assert [c.from_iteration for c in configs[: len(trials)]] == [3 * i for i in range(len(trials))]
    assert all(t.iterations == 3 and t.ok for t in trials)
    for trial in trials:
        assert trial.s_per_iteration == pytest.approx(
            _s_per_iteration(trial.workers, trial.memory_mb)
        )
    assert configs[-1].reason.startswith("chosen for the deadline 10m (run)")
    report = manager.report()
    assert report is not None
    assert report["chosen"]["action"] == "run"
    assert (report["chosen"]["workers"], report["chosen"]["memory_mb"]) == (
        configs[-1].workers,
        configs[-1].memory_mb,
    )
    assert len(report["trials"]) == len(trials)
    assert report["goal"] == {"goal": "deadline", "time_s": 600}
    json.dumps(report)  # result.json takes it as it is


def test_an_override_of_workers_wins_and_only_memory_is_searched() -> None:
    manager = _manager(_settings(Fastest()), workers=2)
    configs = _drive(manager, WORKLOAD.iterations)
    assert {c.workers for c in configs} == {2}
    assert {t.workers for t in manager.trials} == {2}


def test_an_impossible_budget_is_refused_naming_the_cheapest_cost() -> None:
    manager = _manager(_settings(Budget(1e-9)))
    with pytest.raises(InfeasibleGoalError, match=r"the cheapest predicted is \$"):
        manager.initial(0)


def test_an_out_of_memory_trial_is_not_proposed_again() -> None:
    manager = _manager(_settings(Fastest(), max_trials=4))
    first = manager.initial(0)
    assert first.reason.startswith("trial 1")
    assert manager.wants_rescale(2) and not manager.wants_rescale(1)  # a probe of 3 iterations
    assert manager.planned_stop(0) == 3  # fixed before its workers start
    trial = manager.record(_outcome(first, 0, oom=True))
    assert trial is not None and trial.outcome == "oom"
    nxt = manager.after_generation(0, "failed")
    assert (nxt.workers, nxt.memory_mb) != (first.workers, first.memory_mb)


def test_a_changed_workload_is_replanned_and_handed_over_at_the_next_boundary() -> None:
    manager = _manager(_settings(Deadline(600)))
    chosen = _drive(manager, 12)[-1]
    assert not manager.wants_rescale(12)
    decision = manager.training_changed(12, batch_size=1024)
    assert manager.wants_rescale(12)  # the path --rescale uses
    nxt = manager.after_generation(13, "re-scaling")
    assert (nxt.workers, nxt.memory_mb) == (decision.workers, decision.memory_mb)
    assert nxt.from_iteration == 13 and nxt != chosen
    assert not manager.wants_rescale(13) or decision.action == "probe"


def test_the_scheduler_starts_with_the_drivers_decision_and_trials_travel_in_checkpoints() -> None:
    manager = _manager(_settings(Deadline(600)))
    config = manager.initial(0)
    settings = manager.settings()
    twin = ResourceManager(LIMITS, **settings)  # type: ignore[arg-type]
    assert twin.initial(0) == config
    trial = manager.record(_outcome(config, 3))
    assert trial is not None
    meta = json.loads(json.dumps(manager.trials_before(3)))
    assert manager.trials_before(2) == []
    assert [trial_from_dict(t) for t in meta] == [trial]
    assert goal_from_dict(Deadline(600).to_dict()) == Deadline(600)


def test_a_goal_and_a_rescale_schedule_are_refused_together() -> None:
    from smlt.actors.resource_manager import Rescale

    with pytest.raises(ConfigError, match="--rescale"):
        ResourceManager(
            LIMITS,
            workers=None,
            memory_mb=None,
            goal=_settings(Fastest()),
            rescales=(Rescale(5, 2),),
        )


# -- live: smlt.train on Ray and Redis -------------------------------------------------------------


def _state(result: smlt.TrainResult) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = torch.load(result.model_path)
    return state


def test_a_deadline_run_lists_its_trials_meets_the_goal_and_trains_as_the_reference(
    in_process_runs: Path,
) -> None:
    result = smlt.train(
        DIGITS,
        epochs=EPOCHS,
        batch_size=BATCH_SIZE,
        seed=SEED,
        deadline="10m",
        max_trials=2,
        trial_iterations=3,
        output=in_process_runs / "deadline",
    )
    saved = json.loads((result.output_dir / "result.json").read_text())
    search, goal = saved["search"], saved["goal"]
    assert goal == {"goal": "deadline", "time_s": 600.0, "text": "deadline 10m", "met": True}
    assert 1 <= len(search["trials"]) <= 2
    for trial in search["trials"]:
        # Exactly the trial's iterations: its end is fixed before the workers start.
        assert trial["outcome"] == "ok" and trial["iterations"] == 3
        assert trial["s_per_iteration"] > 0 and trial["cost_usd"] > 0
    chosen = search["chosen"]
    assert chosen["reason"] and chosen["action"] == "run"
    assert (chosen["workers"], chosen["memory_mb"]) == (
        saved["configs"][-1]["workers"],
        saved["configs"][-1]["memory_mb"],
    )
    # Trials are training: the generations cover every iteration once, in order.
    spans = [(g["start_iteration"], g["stop_iteration"]) for g in saved["generations"]]
    assert spans[0][0] == 0 and spans[-1][1] == result.iterations
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert [h["iteration"] for h in saved["history"]] == list(range(result.iterations))
    assert saved["cost"]["total_usd"] == pytest.approx(saved["cost_usd"])
    assert 0 < saved["cost"]["trials_usd"] <= saved["cost"]["total_usd"]
    # ... and the re-scales between trials do not change what is learned.
    reference = reference_state_dict(
        smlt.task.load_task(DIGITS), epochs=EPOCHS, batch_size=BATCH_SIZE, seed=SEED
    )
    assert_same_state(_state(result), reference, workers=max(c["workers"] for c in result.configs))


def test_an_impossible_budget_is_refused_before_any_worker_starts(in_process_runs: Path) -> None:
    output = in_process_runs / "too-cheap"
    objects = in_process_runs / "objects"
    before = set(objects.glob("**/*"))
    began = time.monotonic()
    with pytest.raises(InfeasibleGoalError, match=r"budget \$1e-09.*cheapest predicted is \$"):
        smlt.train(DIGITS, epochs=EPOCHS, batch_size=BATCH_SIZE, budget=1e-9, output=output)
    assert time.monotonic() - began < 30
    assert not output.exists()
    assert {p for p in objects.glob("**/*") if p.is_file()} <= before  # packaging removed


def test_an_override_of_workers_wins_live(in_process_runs: Path) -> None:
    result = smlt.train(
        DIGITS,
        epochs=2,
        batch_size=BATCH_SIZE,
        seed=SEED,
        workers=2,
        fastest=True,
        max_trials=2,
        trial_iterations=2,
        output=in_process_runs / "override",
    )
    assert result.search is not None and result.goal is not None
    assert {c["workers"] for c in result.configs} == {2}
    assert {t["workers"] for t in result.search["trials"]} == {2}
    assert result.goal["met"] is True


# -- the command line ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--deadline", "soon"], "--deadline 'soon': expected a positive duration"),
        (["--deadline", "5m", "--fastest"], "give at most one of --deadline, --budget, --fastest"),
        (["--fastest", "--rescale", "5:2"], "--rescale and --fastest both decide"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_a_bad_goal_is_refused_by_the_cli_before_anything_starts(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    from tests.cli_support import run_smlt

    proc, _ = run_smlt(["train", DIGITS, "--output", "out", *flags], tmp_path, 60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_search_knobs_need_a_goal_and_a_budget_must_be_positive() -> None:
    from smlt.client.checks import check_goal
    from smlt.optimizer.goals import goal_from_options

    with pytest.raises(ConfigError, match="--max-trials tunes the search for a --deadline"):
        check_goal(None, rescales=(), max_trials=3)
    with pytest.raises(ConfigError, match="--trial-iterations must be >= 1"):
        check_goal(Fastest(), rescales=(), trial_iterations=0)
    with pytest.raises(ConfigError, match="--budget '-1': the amount must be positive"):
        goal_from_options(budget="-1")
    assert goal_from_options(deadline="1h30m") == Deadline(5400)


def test_the_summary_lists_the_trials_the_choice_and_the_goal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    monkeypatch.setenv("COLUMNS", "200")  # one table row per line

    from smlt.cli import _print_summary

    trial = {"workers": 1, "memory_mb": 724, "outcome": "ok", "iterations": 8}
    result = SimpleNamespace(
        job_id="digits-x",
        final_metrics={},
        history=[],
        configs=[{"workers": 1, "memory_mb": 431}],
        optimizer={},
        iterations=60,
        epochs=10,
        iterations_per_epoch=6,
        batch_size=256,
        wall_s=78.2,
        cost_usd=0.000358,
        pricing="aws_lambda_x86",
        billed_worker_s=31.2,
        output_dir=Path("runs/digits-x"),
        search={
            "trials": [
                {**trial, "s_per_iteration": 0.033, "cost_usd": 0.000342},
                {**trial, "memory_mb": 128, "outcome": "oom", "iterations": 0},
            ],
            "chosen": {"reason": "no configuration is expected to improve on it by 2%"},
        },
        goal={"text": "deadline 2m", "met": True},
    )
    _print_summary(result)
    out = capsys.readouterr().out
    assert "1 x 724 MB: 0.033 s/iteration over 8 iterations, $0.000342" in out
    assert "1 x 128 MB: out of memory" in out
    assert "no configuration is expected to improve" in out
    assert "deadline 2m: met" in out


def test_a_resumed_run_keeps_its_goal_and_the_trials_its_checkpoint_carries(
    tmp_path: Path,
) -> None:
    from smlt.client.driver import RunPlan
    from smlt.client.goals import goal_settings
    from smlt.optimizer.cost import LAMBDA_X86

    plan = RunPlan(
        job_id="digits-x",
        task=DIGITS,
        backend="ray",
        output_dir=str(tmp_path),
        object_store=str(tmp_path / "objects"),
        epochs=3,
        batch_size=256,
        workers=None,
        memory_mb=None,
        seed=0,
        total_iterations=18,
        iterations_per_epoch=6,
        num_params=9_610,
        shard_timeout_s=120.0,
        function_timeout_s=None,
        checkpoint_every=6,
        heartbeat_timeout_s=15.0,
        goal=Deadline(120).to_dict(),
        max_trials=2,
        trial_iterations=3,
        s_per_sample=2e-5,
    )
    plan.save()
    loaded = RunPlan.load(tmp_path)
    assert loaded == plan
    manager = _manager(_settings(Deadline(120)))
    trial = manager.record(_outcome(manager.initial(0), 3))
    meta = json.loads(json.dumps({"trials": manager.trials_before(6)}))  # as a checkpoint has it
    settings = goal_settings(
        loaded, LAMBDA_X86, started_unix_s=time.time() - 30, trials=meta["trials"]
    )
    assert settings is not None
    assert settings.goal == Deadline(120) and settings.trials == (trial,)
    assert (settings.search.max_trials, settings.search.trial_iterations) == (2, 3)
    assert settings.prior.compute_s == pytest.approx(2e-5 / 9_610)
    assert settings.workload == Workload(256, 9_610, 18, checkpoint_every=6)
