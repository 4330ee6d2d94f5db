"""A failure costs time, never correctness: faults injected into real runs (real Ray, real Redis,
the digits example), whose final parameters must equal those of a run without the fault.

Each run is a ``smlt`` subprocess, as a user runs it; the baseline run is shared by the module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
DIGITS = f"{REPO / 'examples' / 'digits.py'}:Digits"
# 1347 training samples / 128 = 11 iterations per epoch; 3 epochs = 33 iterations.
COMMON = ["--epochs", "3", "--batch-size", "128", "--workers", "4", "--seed", "3"]
ITERATIONS = 33

pytestmark = pytest.mark.slow


def smlt(args: list[str], cwd: Path, *, faults: str = "", timeout_s: float = 300) -> dict:
    env = {**os.environ, "SMLT_OBJECT_STORE": str(cwd / "objects"), "SMLT_FAULTS": faults}
    proc = subprocess.run(
        [sys.executable, "-m", "smlt", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = Path(cwd) / (args[args.index("--output") + 1] if "--output" in args else args[1])
    return json.loads((out / "result.json").read_text())


def params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt")


def assert_identical(a: Path, b: Path) -> None:
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), f"{name} differs"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def baseline(workdir: Path) -> Path:
    smlt(["train", DIGITS, *COMMON, "--output", "baseline"], workdir)
    return workdir / "baseline"


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
def slow(workdir: Path) -> str:
    """Digits with a floor on iteration time (a one-file task, as workers receive it)."""
    path = workdir / "slow_digits.py"
    path.write_text((REPO / "examples" / "digits.py").read_text() + SLOW_SUFFIX)
    return f"{path}:SlowDigits"


@pytest.fixture(scope="module")
def baseline6(workdir: Path, slow: str) -> Path:
    """A longer uninterrupted run (6 epochs), for the generation and kill-and-recover tests."""
    smlt(["train", slow, *COMMON, "--epochs", "6", "--output", "ref6"], workdir)
    return workdir / "ref6"


@pytest.mark.parametrize("action", ["kill", "raise", "hang"])
def test_injected_fault_recovers_bit_identically(
    action: str, workdir: Path, baseline: Path
) -> None:
    out = f"fault-{action}"
    result = smlt(
        ["train", DIGITS, *COMMON, "--output", out, "--heartbeat-timeout", "3"],
        workdir,
        faults=f"{action}:rank=1:iteration=5",
    )
    assert_identical(workdir / out, baseline)
    [failure] = result["failures"]
    assert (failure["rank"], failure["iteration"], failure["attempt"]) == (1, 5, 0)
    expected_cause = {"kill": "died", "raise": "injected fault", "hang": "heartbeat timeout"}
    assert expected_cause[action] in failure["cause"]
    assert failure["recovery_s"] is not None and failure["recovery_s"] > 0
    # Every iteration recorded exactly once, in order: nothing before 5 was recomputed.
    assert [h["iteration"] for h in result["history"]] == list(range(ITERATIONS))


def test_function_timeout_forces_generations_with_identical_result(
    workdir: Path, slow: str, baseline6: Path
) -> None:
    result = smlt(
        [
            "train",
            slow,
            *COMMON,
            "--epochs",
            "6",
            "--output",
            "timeout",
            "--function-timeout",
            "1.2",
        ],
        workdir,
    )
    generations = result["generations"]
    assert len(generations) >= 3, generations
    assert generations[-1]["ended_because"] == "finished"
    assert {g["ended_because"] for g in generations[:-1]} == {"function time limit"}
    starts = [g["start_iteration"] for g in generations]
    stops = [g["stop_iteration"] for g in generations]
    assert starts[1:] == stops[:-1] and stops[-1] == 2 * ITERATIONS
    assert_identical(workdir / "timeout", baseline6)


def test_rescale_four_to_two_matches_fixed_run(workdir: Path, baseline: Path) -> None:
    result = smlt(["train", DIGITS, *COMMON, "--output", "rescaled", "--rescale", "12:2"], workdir)
    assert [c["workers"] for c in result["configs"]] == [4, 2]
    assert result["configs"][1]["from_iteration"] >= 12
    a, b = params(workdir / "rescaled"), params(baseline)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def _start_and_kill_when_checkpointed(workdir: Path, task: str, out: str, kill: str) -> float:
    """Start a run; once a checkpoint is committed, SIGKILL the driver's whole process group
    (``kill == "driver"``) or only its embedded redis-server (``kill == "redis"``)."""
    env = {**os.environ, "SMLT_OBJECT_STORE": str(workdir / "objects"), "SMLT_FAULTS": ""}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "smlt",
            "train",
            task,
            *COMMON,
            "--epochs",
            "6",
            "--output",
            out,
            "--checkpoint-every",
            "5",
        ],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    job = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        run_json = workdir / out / "run.json"
        if run_json.exists():
            job = json.loads(run_json.read_text())["job_id"]
            marks = list((workdir / "objects" / "jobs" / job).glob("checkpoints/*/COMMITTED.json"))
            if marks:
                break
        time.sleep(0.1)
    else:
        proc.kill()
        proc.communicate(timeout=30)
        pytest.fail("no checkpoint was committed within 120 s")
    killed_at = time.monotonic()
    if kill == "driver":
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    else:
        # The embedded redis-server is the driver's child (in a session of its own).
        pids = subprocess.run(
            ["pgrep", "-P", str(proc.pid), "redis-server"], capture_output=True, text=True
        ).stdout.split()
        if not pids:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)
            pytest.fail("no embedded redis-server found")
        for pid in pids:
            os.kill(int(pid), signal.SIGKILL)
        _stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-4000:]
    return killed_at


def test_driver_killed_then_resume_finishes_identically(
    workdir: Path, slow: str, baseline6: Path
) -> None:
    _start_and_kill_when_checkpointed(workdir, slow, "resumed", kill="driver")
    result = smlt(["resume", "resumed"], workdir)
    assert_identical(workdir / "resumed", baseline6)
    assert [h["iteration"] for h in result["history"]] == list(range(2 * ITERATIONS))


def test_redis_killed_mid_run_recovers_from_checkpoint(
    workdir: Path, slow: str, baseline6: Path
) -> None:
    killed_at = _start_and_kill_when_checkpointed(workdir, slow, "redis-lost", kill="redis")
    result = json.loads((workdir / "redis-lost" / "result.json").read_text())
    assert any("store_lost" in f for f in result["failures"])
    assert_identical(workdir / "redis-lost", baseline6)
    assert time.monotonic() - killed_at < 300
