"""The ``sim`` backend: the model's figures by hand, and the real scheduler driving it.

Trials marked "through the scheduler" run :class:`~smlt.actors.scheduler.TaskScheduler` and the
resource manager unchanged on :class:`~smlt.backends.sim.SimBackend` under trio's MockClock,
with the progress stream in a real embedded Redis (:class:`~smlt.client.plan.SimTrials`).
"""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from smlt.backends import get_backend
from smlt.backends.sim import SimBackend, SimPlatform
from smlt.client.plan import SimTrials, TaskProfile, plan_task
from smlt.errors import CapacityError, ConfigError, ThrottledError
from smlt.optimizer.goals import Fastest
from smlt.optimizer.perf import Workload, features
from smlt.optimizer.problem import Probe, SearchSettings
from smlt.protocol.payload import WorkerPayload

# A 1M-parameter model with Adam (two state shards) at 1 ms per sample on one vCPU: every
# figure below is worked out by hand from the module docstring's formulas.
PLATFORM = SimPlatform(s_per_sample_1_vcpu=1e-3, num_params=1_000_000, optimizer_state_shards=2)
G = 4e6  # gradient bytes
LINK_BYTES_PER_S = 600e6 / 8


def test_iteration_time_matches_hand_computed_figures() -> None:
    # 8 workers x 1769 MB (1 vCPU), batch 256: 32 samples each.
    step = PLATFORM.iteration(8, 1769, 256)
    assert step.compute_s == pytest.approx(1e-3 * 32)
    assert step.link_s == pytest.approx((2 * 7 / 8 + 3 / 8) * G / LINK_BYTES_PER_S)  # 0.1133
    assert step.store_s == pytest.approx((3 * 8 - 2 + 2) * G / 0.4e9)  # 0.24: the store binds
    assert step.ops_s == pytest.approx(8 * (3 * 7 + 1 + 2) * 10e-6)  # 192 keys
    assert step.total_s == pytest.approx(0.032 + 0.24 + 0.00192 + 0.003 + 0.005)
    # One worker on 2 vCPUs: the link binds (it still publishes its shard and Adam's state).
    one = PLATFORM.iteration(1, 2 * 1769, 256)
    assert one.compute_s == pytest.approx(1e-3 * 256 / 2)
    assert one.total_s == pytest.approx(0.128 + 3 * G / LINK_BYTES_PER_S + 3e-5 + 0.003 + 0.005)


def test_compute_scales_with_the_vcpu_share_and_is_capped_at_6() -> None:
    big = SimPlatform(s_per_sample_1_vcpu=1e-3, num_params=1000, max_memory_mb=20_000)
    at = {m: big.iteration(1, m, 600).compute_s for m in (884, 1769, 3538, 10_614, 16_000)}
    assert at[1769] == pytest.approx(0.6)
    assert at[884] == pytest.approx(0.6 * 1769 / 884)  # a time share below one vCPU
    assert at[3538] == pytest.approx(0.3)
    assert at[10_614] == pytest.approx(0.1)  # 6 vCPUs
    assert at[16_000] == at[10_614]  # no more than 6


def test_a_trial_through_the_scheduler_reports_the_models_figures() -> None:
    workload = Workload(256, PLATFORM.num_params, 100)
    with SimTrials(PLATFORM) as measure:
        trial = measure(Probe(8, 1769, 3, workload))
    expected = 0.032 + 0.24 + 0.00192 + 0.003 + 0.005
    assert trial.ok and trial.iterations == 3
    assert trial.s_per_iteration == pytest.approx(expected)
    # 8 cold starts in one burst, spread at 100 per second: the last is ready at 8.07 s.
    assert trial.wall_s == pytest.approx(8.0 + 7 / 100 + 3 * expected, abs=2e-3)
    billed_s = 8 * (8.07 + 3 * expected)
    assert trial.cost_usd == pytest.approx(
        PLATFORM.pricing.compute_usd(1769, billed_s) + 8 * 0.20e-6, rel=1e-3
    )
    # The coarse grain (no scheduler) computes the same trial.
    modelled = PLATFORM.trial(8, 1769, 256, 3)
    assert modelled.wall_s == pytest.approx(trial.wall_s, abs=1e-6)
    assert modelled.cost_usd(PLATFORM.pricing, 1769) == pytest.approx(trial.cost_usd, rel=1e-6)


def test_cold_then_warm_starts_across_generations() -> None:
    # A 30 s function limit: a generation stops at the last iteration ending 10 s before it,
    # and the next one starts in the containers the last one left warm.
    platform = SimPlatform(s_per_sample_1_vcpu=0.01, num_params=1000, max_duration_s=30.0)
    workload = Workload(256, 1000, 1000)
    with SimTrials(platform) as measure:
        trial = measure(Probe(2, 1769, 20, workload))
        stats = measure.measured[0]["sim"]
    step = platform.iteration(2, 1769, 256).total_s  # 1.295 s
    first = math.floor((20 - 8.01) / step)  # iterations before the limit's margin: 9
    assert stats["cold_starts"] == 2  # only the first generation starts cold
    assert stats["warm_starts"] == 2 * (math.ceil((20 - first) / math.floor(19.5 / step)))
    assert trial.iterations == 20
    modelled = platform.trial(2, 1769, 256, 20)
    assert modelled.statistics["warm_starts"] == stats["warm_starts"]
    # The wall time counts the invocations' modelled time, not the scheduler's gaps between
    # generations (SimBackend.busy_s says why).
    assert trial.wall_s == pytest.approx(modelled.wall_s, abs=1e-3)
    # Warm starts are what make later generations cheap: 0.5 s instead of 8 s each.
    assert modelled.wall_s == pytest.approx(
        8.01 + 0.5 * (len(modelled.billed_s) // 2 - 1) + 20 * step, abs=1e-6
    )


def _payload(rank: int, workers: int) -> WorkerPayload:
    return WorkerPayload(
        job_id="concurrency",
        rank=rank,
        workers=workers,
        memory_mb=1769,
        redis_urls=("redis://localhost:1",),
        object_store_url="/nonexistent",
        batch_size=256,
        total_iterations=10,
        start_iteration=0,
        generation=0,
    )


def test_concurrency_limit_is_respected() -> None:
    platform = SimPlatform(s_per_sample_1_vcpu=1e-3, num_params=1000, max_concurrency=8)
    backend = SimBackend(platform)

    async def main() -> None:
        with pytest.raises(CapacityError, match="concurrency limit"):
            await backend.deploy("j", 9, 1769)
        await backend.deploy("j", 8, 1769)
        for rank in range(8):
            await backend.invoke(_payload(rank, 8))
        with pytest.raises(ThrottledError, match="8 functions already running"):
            await backend.invoke(_payload(8, 9))
        await backend.clean()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert backend.statistics()["throttled"] == 1
    # The scheduler never runs more at once, and a plan never proposes more.
    with SimTrials(platform) as measure:
        measure(Probe(8, 1769, 2, Workload(256, 1000, 50)))
    assert measure.measured[0]["sim"]["peak_concurrency"] == 8
    profile = TaskProfile("synthetic:Tiny", 1000, 256 * 50, 1e-3, 1, 0.0)
    result = plan_task(
        profile,
        epochs=1,
        batch_size=256,
        goal=Fastest(),
        settings=SearchSettings(max_trials=3),
        max_concurrency=8,
    )
    assert all(t["workers"] <= 8 for t in result.trials)
    assert result.decision.workers <= 8
    assert all(p.workers <= 8 for p in result.decision.frontier)


def test_noise_is_seeded() -> None:
    noisy = SimPlatform(s_per_sample_1_vcpu=1e-3, num_params=10_000, noise_sigma=0.3, seed=5)
    probe = Probe(4, 1769, 4, Workload(256, 10_000, 100))

    def run(platform: SimPlatform) -> tuple[float | None, float, float]:
        with SimTrials(platform) as measure:
            trial = measure(probe)
        return trial.s_per_iteration, trial.wall_s, trial.cost_usd

    first = run(noisy)
    assert run(noisy) == first
    other = SimPlatform(s_per_sample_1_vcpu=1e-3, num_params=10_000, noise_sigma=0.3, seed=6)
    assert run(other)[0] != first[0]
    quiet = SimPlatform(s_per_sample_1_vcpu=1e-3, num_params=10_000)
    # The slowest of 4 ranks sets each iteration, so noise only slows it down.
    assert first[0] is not None and first[0] > quiet.iteration(4, 1769, 256).total_s
    assert noisy.trial(4, 1769, 256, 4).iter_s == noisy.trial(4, 1769, 256, 4).iter_s


def test_crashed_start_ups_are_reinvoked_by_the_real_scheduler() -> None:
    # Seed 0 crashes ranks 0, 1 and 4 once each; a rank that crashed twice in a row would be
    # given up on, as the real failure policy does ("failed the same way twice").
    flaky = SimPlatform(s_per_sample_1_vcpu=1e-3, num_params=10_000, failure_rate=0.3, seed=0)
    with SimTrials(flaky) as measure:
        trial = measure(Probe(6, 1769, 3, Workload(256, 10_000, 100)))
    stats = measure.measured[0]["sim"]
    assert trial.ok and trial.iterations == 3
    assert stats["crashes"] == 3
    assert stats["invocations"] == 6 + 3


def test_out_of_memory_is_a_trial_outcome() -> None:
    # 400 MB of runtime + 16 B/parameter + 0.5 MB per sample: 528 MB for one worker of 256.
    platform = SimPlatform(s_per_sample_1_vcpu=1e-5, num_params=10_000)
    assert platform.need_mb(1, 256) == pytest.approx(400 + 16 * 10_000 / 2**20 + 128)
    with SimTrials(platform) as measure:
        trial = measure(Probe(1, 512, 3, Workload(256, 10_000, 100)))
    assert trial.outcome == "oom" and trial.s_per_iteration is None
    assert platform.trial(1, 512, 256, 3).outcome == "oom"


def test_sim_is_a_registered_backend_that_needs_the_tasks_figures() -> None:
    with pytest.raises(ConfigError, match="s_per_sample_1_vcpu and num_params"):
        get_backend("sim")
    backend = get_backend("sim", s_per_sample_1_vcpu=1e-3, num_params=1000)
    assert isinstance(backend, SimBackend)
    assert backend.limits.max_concurrency == 1000
    with pytest.raises(ConfigError, match="failure_rate"):
        SimPlatform(s_per_sample_1_vcpu=1e-3, num_params=1000, failure_rate=1.5)


def test_a_1000_worker_10000_iteration_job_plans() -> None:
    """Issue 8's scale: a plan for it completes, at both grains. How long it takes is measured
    by benchmarks/plan_scale.py, not asserted here (this machine is shared)."""
    # 400k samples of batch 4096: 100 iterations an epoch, 100 epochs. A compute-heavy model
    # (50 ms per sample on one vCPU) and 16 store instances, so large counts are worth probing.
    profile = TaskProfile("synthetic:Big", 1_000_000, 4096 * 100, 0.05, 2, 0.0)
    searched = plan_task(profile, epochs=100, batch_size=4096, goal=Fastest(), store_instances=16)
    fixed = plan_task(profile, epochs=100, batch_size=4096, workers=1000, memory_mb=3008)
    assert searched.job_iterations == fixed.job_iterations == 10_000
    # Fastest is worth many workers here: the search probed past the scheduler's grain.
    assert max(t["workers"] for t in searched.trials) > 100
    assert {t["grain"] for t in searched.trials} == {"scheduler", "model"}
    assert fixed.decision.workers == 1000 and fixed.feasible
    assert fixed.trials[0]["grain"] == "model"


@pytest.mark.parametrize("state", [0, 2])
def test_the_optimizers_traffic_terms_are_the_sims(state: int) -> None:
    """The optimizer's physical form (smlt.optimizer.perf.features) carries the bytes the sim's
    platform moves, optimizer state included: link and store, term by term."""
    platform = SimPlatform(
        s_per_sample_1_vcpu=1e-3, num_params=250_000, optimizer_state_shards=state
    )
    for n in (1, 2, 8, 100):
        step = platform.iteration(n, 1769, 256)
        link_bytes = step.link_s * platform.bandwidth_mbps * 1e6 / 8
        store_bytes = step.store_s * platform.store_bytes_per_s * platform.store_instances
        f = features(n, 1769, 256, 250_000, state)
        assert f[1] == pytest.approx(link_bytes, rel=1e-9)
        assert f[2] == pytest.approx(store_bytes, rel=1e-9)
    # With Adam's two state tensors a worker's link carries less as workers are added (its own
    # shard, state included, shrinks as 1/n); with none it carries more (2 - 1/n gradients).
    many, few = features(64, 1769, 256, 250_000, state), features(2, 1769, 256, 250_000, state)
    assert (many[1] < few[1]) if state == 2 else (many[1] > few[1])
