"""A failure costs time, never correctness: faults injected into real runs (real Ray, real Redis,
the digits example), whose final parameters must equal those of a run without the fault.

Runs are ``smlt.train`` calls in this process (one warm Ray for the module, the scheduler on a
thread: tests/conftest.py ``in_process_runs``). Kill and raise at every phase of a step are in
tests/test_fault_phases.py; a driver SIGKILLed mid-run and resumed (bit-identical, in a new
session) is in tests/test_cli.py.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import smlt

REPO = Path(__file__).resolve().parent.parent
DIGITS = f"{REPO / 'examples' / 'digits.py'}:Digits"
# 1347 training samples / 128 = 11 iterations per epoch; 3 epochs = 33 iterations.
COMMON: dict[str, Any] = {"epochs": 3, "batch_size": 128, "workers": 4, "seed": 3}
ITERATIONS = 33

pytestmark = pytest.mark.slow


def train(task: str, out: Path, *, faults: str = "", **options: Any) -> smlt.TrainResult:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SMLT_FAULTS", faults)
        return smlt.train(task, output=out, **{**COMMON, **options})


def assert_identical(a: Path, b: Path) -> None:
    pa, pb = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), f"{name} differs"


@pytest.fixture(scope="module")
def baseline(in_process_runs: Path) -> Path:
    train(DIGITS, in_process_runs / "baseline")
    return in_process_runs / "baseline"


SLOW_SUFFIX = """

class SlowDigits(Digits):
    # 20 ms more per iteration: bounds the iteration rate, so a function time limit of 1.2 s
    # always splits 66 iterations into 3 or more generations, on a fast or a loaded machine.
    def loss(self, model, batch):
        import time

        time.sleep(0.02)
        return super().loss(model, batch)
"""


@pytest.fixture(scope="module")
def slow(in_process_runs: Path) -> str:
    """Digits with a floor on iteration time (a one-file task, as workers receive it)."""
    path = in_process_runs / "slow_digits.py"
    path.write_text((REPO / "examples" / "digits.py").read_text() + SLOW_SUFFIX)
    return f"{path}:SlowDigits"


@pytest.fixture(scope="module")
def baseline6(in_process_runs: Path, slow: str) -> Path:
    """A longer uninterrupted run (6 epochs), for the generation and kill-and-recover tests."""
    train(slow, in_process_runs / "ref6", epochs=6)
    return in_process_runs / "ref6"


def test_a_hung_worker_is_noticed_by_its_heartbeat_and_replaced(
    in_process_runs: Path, baseline: Path
) -> None:
    out = in_process_runs / "fault-hang"
    result = train(DIGITS, out, faults="hang:rank=1:iteration=5", heartbeat_timeout_s=3)
    assert_identical(out, baseline)
    [failure] = result.failures
    assert (failure["rank"], failure["iteration"], failure["attempt"]) == (1, 5, 0)
    assert "heartbeat timeout" in failure["cause"]
    # Measured, not configured: from the fault's own timestamp to the scheduler noticing. The
    # 3 s count from the last beat, which can precede the fault by up to one interval (1 s).
    assert 3 - 1 <= failure["detection_s"] < 30
    assert failure["recovery_s"] is not None and failure["recovery_s"] > 0
    # Every iteration recorded exactly once, in order: nothing before 5 was recomputed.
    assert [h["iteration"] for h in result.history] == list(range(ITERATIONS))


def test_function_timeout_forces_generations_with_identical_result(
    in_process_runs: Path, slow: str, baseline6: Path
) -> None:
    out = in_process_runs / "timeout"
    result = train(slow, out, epochs=6, function_timeout_s=1.2)
    generations = result.generations
    assert len(generations) >= 3, generations
    assert generations[-1]["ended_because"] == "finished"
    assert {g["ended_because"] for g in generations[:-1]} == {"function time limit"}
    starts = [g["start_iteration"] for g in generations]
    stops = [g["stop_iteration"] for g in generations]
    assert starts[1:] == stops[:-1] and stops[-1] == 2 * ITERATIONS
    assert_identical(out, baseline6)


def test_rescale_four_to_two_matches_fixed_run(in_process_runs: Path, baseline: Path) -> None:
    out = in_process_runs / "rescaled"
    result = train(DIGITS, out, rescales=((12, 2, None),))
    assert [c["workers"] for c in result.configs] == [4, 2]
    assert result.configs[1]["from_iteration"] >= 12
    a, b = torch.load(out / "model.pt"), torch.load(baseline / "model.pt")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def _committed(objects: Path, run_dir: Path) -> bool:
    run_json = run_dir / "run.json"
    if not run_json.exists():
        return False
    job = json.loads(run_json.read_text())["job_id"]
    return any((objects / "jobs" / job).glob("checkpoints/*/COMMITTED.json"))


def _wait_for_checkpoint(objects: Path, run_dir: Path, alive: Any) -> None:
    deadline = time.monotonic() + 120
    while not _committed(objects, run_dir):
        if time.monotonic() > deadline or not alive():
            pytest.fail("no checkpoint was committed within 120 s")
        time.sleep(0.1)


def _redis_children() -> set[int]:
    """redis-server processes started by this test process."""
    found = set()
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm == "redis-server" and stat.rsplit(")", 1)[1].split()[1] == me:
            found.add(int(pid))
    return found


def test_redis_killed_mid_run_recovers_from_checkpoint(
    in_process_runs: Path, slow: str, baseline6: Path
) -> None:
    out = in_process_runs / "redis-lost"
    before = _redis_children()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = train(slow, out, epochs=6, checkpoint_every=5)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    _wait_for_checkpoint(in_process_runs / "objects", out, thread.is_alive)
    [embedded] = _redis_children() - before
    killed_at = time.monotonic()
    os.kill(embedded, signal.SIGKILL)
    thread.join(300)
    assert not thread.is_alive() and "error" not in outcome, outcome
    result = outcome["result"]
    assert any("store_lost" in f for f in result.failures)
    assert_identical(out, baseline6)
    assert time.monotonic() - killed_at < 300
    # The restarted Redis got a session of its own.
    assert len(json.loads((out / "run.json").read_text())["sessions"]) == 2
