"""``smlt train`` end to end, as a user runs it: real Ray, embedded Redis, local object store.

Bad input must fail in seconds with one paragraph naming the problem, exit non-zero, and leave
no process behind (every process the command starts inherits a marker in its environment, which
is how the test finds stragglers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "examples" / "digits.py"


def _smlt(
    args: list[str], tmp_path: Path, timeout_s: float
) -> tuple[subprocess.CompletedProcess[str], str]:
    marker = uuid.uuid4().hex
    env = {**os.environ, "SMLT_TEST_MARKER": marker, "SMLT_OBJECT_STORE": str(tmp_path / "objects")}
    proc = subprocess.run(
        [sys.executable, "-m", "smlt", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        cwd=tmp_path,
    )
    return proc, marker


def _processes_with(marker: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if f"SMLT_TEST_MARKER={marker}".encode() in environ:
            found.append(f"{pid}: {cmdline[:120]}")
    return found


def _assert_nothing_left(marker: str) -> None:
    deadline = time.monotonic() + 10  # Ray's processes exit a moment after the driver
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_with(marker) == []


@pytest.mark.slow
def test_train_digits_writes_a_usable_model(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc, marker = _smlt(
        [
            "train",
            f"{DIGITS}:Digits",
            "--epochs",
            "4",
            "--batch-size",
            "128",
            "--workers",
            "2",
            "--output",
            str(out),
        ],
        tmp_path,
        timeout_s=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["iterations"] == 4 * 11  # 1347 training samples / 128 -> 11 per epoch
    assert len(result["history"]) == result["iterations"]
    assert result["configs"] == [
        {
            "from_iteration": 0,
            "workers": 2,
            "memory_mb": 1769,
            "reason": "largest size that fits 2 workers at once (no memory given)",
        }
    ]
    assert result["final_metrics"]["accuracy"] > 0.85
    assert result["history"][-1]["loss"] < result["history"][0]["loss"] / 3
    assert result["cost_usd"] > 0
    assert [e["epoch"] for e in result["epoch_metrics"]] == [0, 1, 2, 3]
    assert "***" in result["redis"]
    for name in ("loss.png", "throughput.png", "phases.png"):
        assert (out / name).stat().st_size > 1000
    # model.pt loads into the task's own model and reproduces the reported accuracy.
    sys.path.insert(0, str(DIGITS.parent))
    try:
        from digits import Digits  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(DIGITS.parent))
    task = Digits()
    model = task.model()
    model.load_state_dict(torch.load(out / "model.pt"))
    assert task.evaluate(model)["accuracy"] == pytest.approx(result["final_metrics"]["accuracy"])
    assert "held-out accuracy" in proc.stdout
    _assert_nothing_left(marker)


GOOD_TASK = textwrap.dedent(
    """
    import torch
    from smlt.task import Task

    class T(Task):
        def data(self):
            return torch.randn(64, 4), torch.randn(64, 1)
        def model(self):
            torch.manual_seed(0)
            return torch.nn.Linear(4, 1)
        def optimizer(self, model):
            return torch.optim.SGD(model.parameters(), lr=0.1)
        def loss(self, model, batch):
            x, y = batch
            return torch.nn.functional.mse_loss(model(x), y)
    """
)

BAD_TASKS = {
    "syntax": (GOOD_TASK.replace("def model(self):", "def model(self)"), r"syntax error at line 8"),
    "missing-method": (GOOD_TASK.replace("def loss(", "def lost("), r"loss"),
    "unequal-lengths": (
        GOOD_TASK.replace("torch.randn(64, 1)", "torch.randn(63, 1)"),
        r"(64|63).*(63|64)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TASKS))
def test_bad_task_fails_fast_and_clean(case: str, tmp_path: Path) -> None:
    source, pattern = BAD_TASKS[case]
    (tmp_path / "task.py").write_text(source)
    started = time.monotonic()
    proc, marker = _smlt(["train", "task.py:T", "--workers", "2"], tmp_path, timeout_s=60)
    assert time.monotonic() - started < 10
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:")
    assert "task.py" in proc.stderr
    import re

    assert re.search(pattern, proc.stderr, re.S), proc.stderr
    assert "Traceback" not in proc.stderr
    _assert_nothing_left(marker)


def test_unreachable_redis_fails_fast_and_clean(tmp_path: Path) -> None:
    (tmp_path / "task.py").write_text(GOOD_TASK)
    started = time.monotonic()
    proc, marker = _smlt(
        ["train", "task.py:T", "--redis-url", "redis://:s3cret@127.0.0.1:1/0"],
        tmp_path,
        timeout_s=60,
    )
    assert time.monotonic() - started < 10
    assert proc.returncode == 2
    assert "cannot reach Redis at redis://:***@127.0.0.1:1/0" in proc.stderr
    assert "s3cret" not in proc.stderr + proc.stdout
    _assert_nothing_left(marker)


def test_worker_exception_stops_the_run_naming_rank_and_cause(tmp_path: Path) -> None:
    failing = GOOD_TASK + textwrap.dedent(
        """
    CALLS = [0]

    class Failing(T):
        def loss(self, model, batch):
            CALLS[0] += 1
            if CALLS[0] >= 3:  # from the 3rd call on: a bug that a retry does not fix
                raise RuntimeError("boom in the user's loss")
            return super().loss(model, batch)
    """
    )
    (tmp_path / "task.py").write_text(failing)
    proc, marker = _smlt(
        [
            "train",
            "task.py:Failing",
            "--workers",
            "2",
            "--epochs",
            "5",
            "--batch-size",
            "16",
            "--output",
            "out",
        ],
        tmp_path,
        timeout_s=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "failed the same way twice" in proc.stderr
    assert "worker" in proc.stderr and "boom in the user's loss" in proc.stderr
    assert "RuntimeError" in proc.stderr
    _assert_nothing_left(marker)
