"""The run record across executions (smlt/client/record.py): pure bookkeeping over files.

The end-to-end case (a driver SIGKILLed after its first checkpoint, then ``smlt resume``) is in
tests/test_cli.py; these cases pin the arithmetic that one run cannot show at once.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from smlt.client.record import STATUS_FILE, RunRecord
from smlt.errors import ConfigError


def _history(first: int, last: int, start_s: float = 0.0) -> list[dict[str, Any]]:
    return [
        {"iteration": t, "wall_s": start_s + (t - first + 1) * 1.0, "loss": 1.0 / (t + 1)}
        | {"samples_per_s": 100.0}
        for t in range(first, last)
    ]


def _summary(history: list[dict[str, Any]], epochs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "history": history,
        "epochs": epochs,
        "generations": [{"from": history[0]["iteration"]}],
        "failures": [],
        "configs": [{"workers": 2}],
        "checkpoints": [10],
        "cost_usd": 0.5,
        "billed_worker_s": 40.0,
    }


def _begin(run_dir: Path, command: str, from_iteration: int) -> RunRecord:
    return RunRecord.begin(
        run_dir,
        job_id="job",
        task="t.py:T",
        total_iterations=20,
        iterations_per_epoch=5,
        command=command,
        from_iteration=from_iteration,
    )


def test_a_killed_part_and_its_resume_make_one_record(tmp_path: Path) -> None:
    first = _begin(tmp_path, "train", 0)
    # The killed driver's last status: 14 iterations done, a checkpoint at 10, and epoch 0's
    # metrics (iteration 9) evaluated only after that checkpoint was committed.
    epochs = [{"epoch": 0, "iteration": 4, "acc": 0.5}, {"epoch": 1, "iteration": 9, "acc": 0.7}]
    status = {"iteration": 14, "cost_usd": 0.25, "last_checkpoint": 10, "epochs": epochs}
    first.update(status, wall_s=30.0, force=True)
    written = json.loads((tmp_path / STATUS_FILE).read_text())
    assert (written["state"], written["iteration"], written["last_checkpoint"]) == (
        "running",
        14,
        10,
    )

    second = _begin(tmp_path, "resume", 10)
    [dead] = second.earlier
    assert (dead.ended, dead.to_iteration, dead.cost_usd) == ("died", 14, 0.25)
    # The checkpoint at 10 carried the history up to it and epoch 0 only.
    carried = _history(0, 10)
    summary = _summary(carried + _history(10, 20), [epochs[0], {"epoch": 3, "iteration": 19}])
    second.end("finished", wall_s=50.0, summary=summary)
    whole = second.merged(summary)

    assert second.cost_usd == 0.75 and second.wall_s == 80.0
    assert [h["part"] for h in whole["history"]] == [0] * 10 + [1] * 10
    times = [h["wall_s"] for h in whole["history"]]
    assert times == sorted(times) and times[10] == 30.0 + 1.0  # shifted by part 0's 30 s
    assert [e["iteration"] for e in whole["epochs"]] == [4, 9, 19]  # epoch 1 from the dead part
    assert [e["part"] for e in whole["epochs"]] == [0, 0, 1]
    assert [g["part"] for g in whole["generations"]] == [1]
    final = json.loads((tmp_path / STATUS_FILE).read_text())
    assert [p["ended"] for p in final["parts"]] == ["died", "finished"]
    assert final["state"] == "finished" and final["cost_usd"] == 0.75


def test_a_part_that_died_before_writing_progress_reached_the_checkpoint_it_left(
    tmp_path: Path,
) -> None:
    first = _begin(tmp_path, "train", 0)
    first.update({"iteration": 0, "cost_usd": 0.0}, wall_s=1.0, force=True)
    second = _begin(tmp_path, "resume", 5)
    assert second.earlier[0].to_iteration == 5


def test_a_new_run_in_a_folder_does_not_inherit_an_earlier_record(tmp_path: Path) -> None:
    first = _begin(tmp_path, "train", 0)
    first.update({"iteration": 3, "cost_usd": 0.1}, wall_s=2.0, force=True)
    again = _begin(tmp_path, "train", 0)  # --overwrite: a new run, not a part of the old one
    assert again.earlier == [] and again.cost_usd == 0.0


def test_nothing_is_written_for_a_run_that_never_started(tmp_path: Path) -> None:
    record = _begin(tmp_path / "never", "train", 0)
    record.end("failed", wall_s=0.5, error="refused")
    assert not (tmp_path / "never").exists()


def test_a_resume_is_refused_while_the_runs_driver_is_alive(tmp_path: Path) -> None:
    """Two drivers of one run would both pay workers for the same iterations (a driver that
    ignored Ctrl-C, or a resume typed in a second terminal)."""
    from smlt.client.driver import RunPlan, resume

    objects = tmp_path / "objects"
    RunPlan(
        job_id="job",
        task="t.py:T",
        backend="ray",
        output_dir=str(tmp_path),
        object_store=objects.as_uri(),
        epochs=1,
        batch_size=1,
        workers=1,
        memory_mb=None,
        seed=0,
        total_iterations=1,
        iterations_per_epoch=1,
        num_params=1,
        shard_timeout_s=1.0,
        function_timeout_s=None,
        checkpoint_every=1,
        heartbeat_timeout_s=1.0,
    ).save()
    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        status = {"state": "running", "host": socket.gethostname(), "pid": driver.pid}
        (tmp_path / STATUS_FILE).write_text(json.dumps(status))
        with pytest.raises(ConfigError, match=rf"run job is still running .*pid {driver.pid}"):
            resume(tmp_path)
    finally:
        driver.kill()
        driver.wait(timeout=30)
    # Its driver gone, the run is resumable as far as that goes (this one has no checkpoint).
    with pytest.raises(ConfigError, match="no committed checkpoint"):
        resume(tmp_path)


def test_epochs_a_killed_part_never_evaluated_are_listed_as_not_evaluated(tmp_path: Path) -> None:
    first = _begin(tmp_path, "train", 0)
    first.update({"iteration": 12, "cost_usd": 0.1, "last_checkpoint": 10}, wall_s=5.0, force=True)
    second = _begin(tmp_path, "resume", 10)
    summary = _summary(_history(0, 20), [{"epoch": 3, "iteration": 19, "acc": 0.9}])
    second.end("finished", wall_s=5.0, summary=summary)
    epochs = second.merged(summary)["epochs"]
    assert [(e["iteration"], e.get("evaluated", True)) for e in epochs] == [
        (4, False),
        (9, False),
        (19, True),
    ]
    assert epochs[0]["train_loss"] == 1.0 / 5 and epochs[0]["part"] == 0
