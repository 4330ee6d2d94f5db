"""What the ``smlt`` command says: ``--version``, ``smlt runs``, help texts, the live progress,
the epoch lines and the summary, and the one line after Ctrl-C or SIGTERM.

Commands run as a user runs them (``python -m smlt`` in a subprocess); the run folders that
``smlt runs`` lists are written here by hand, as the driver's contract describes them (run.json,
status.json, result.json), so every state is covered without training. The formatting is tested
on synthetic status dicts. One end-to-end run is stopped with SIGTERM after its first
checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import typer.main
from rich.console import Console

from smlt import __version__
from smlt.cli import (
    _format_epoch_line,
    _interrupted_message,
    _print_summary,
    _ProgressDisplay,
    _sigterm_through_ray,
    _StopSignals,
    app,
)
from smlt.client.runs import list_runs, read_run
from tests.cli_support import assert_nothing_left as _assert_nothing_left
from tests.cli_support import run_smlt as _smlt

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "examples" / "digits.py"
NOW = datetime.now(UTC)


# -- smlt --version ----------------------------------------------------------------------------


def test_version_prints_the_package_version() -> None:
    proc, marker = _smlt(["--version"], REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"smlt {__version__}\n"
    _assert_nothing_left(marker)


def test_version_and_runs_import_neither_torch_nor_ray(tmp_path: Path) -> None:
    """``smlt --version`` and ``smlt runs`` answer in a moment: they need no PyTorch or Ray."""
    probe = (
        "import runpy, sys\n"
        "for args in (['--version'], ['runs', sys.argv[1], '--json']):\n"
        "    sys.argv = ['smlt', *args]\n"
        "    try:\n"
        "        runpy.run_module('smlt', run_name='__main__')\n"
        "    except SystemExit as exc:\n"
        "        assert not exc.code, exc.code\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'numpy', 'matplotlib') if m in sys.modules)\n"
        "print('heavy:', heavy)\n"
    )
    _write_run(tmp_path / "runs" / "a", _plan("digits-20260101-120000-aaaaaa"), result=_RESULT)
    proc = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"smlt {__version__}"
    assert '"job_id": "digits-20260101-120000-aaaaaa"' in proc.stdout
    assert proc.stdout.splitlines()[-1] == "heavy: []"


# -- help texts --------------------------------------------------------------------------------


def test_every_argument_and_option_of_every_command_has_help() -> None:
    group = typer.main.get_command(app)
    missing = [
        f"{name} {param.name}"
        for name, command in group.commands.items()  # type: ignore[attr-defined]
        for param in command.params
        if not (getattr(param, "help", None) or "").strip()
    ]
    assert missing == []


def test_resume_help_describes_each_option(tmp_path: Path) -> None:
    proc, _ = _smlt(["resume", "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # rich wraps the help to the terminal's width
    assert re.search(r"--redis-url [│ ]*<str> [│ ]*use this Redis", text), proc.stdout
    assert re.search(r"--ray-address [│ ]*<str> [│ ]*an existing Ray cluster", text), proc.stdout
    proc, _ = _smlt(["train", "--help"], tmp_path)
    text = " ".join(proc.stdout.replace("│", " ").split())
    assert "0: no periodic checkpoints" in text


# -- smlt runs ---------------------------------------------------------------------------------


def _plan(job_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "task": "/home/me/examples/digits.py:Digits",
        "backend": "ray",
        "output_dir": "ignored",
        "object_store": "/nonexistent/objects",
        "epochs": 3,
        "batch_size": 64,
        "workers": 2,
        "memory_mb": None,
        "seed": 0,
        "total_iterations": 66,
        "iterations_per_epoch": 22,
        "checkpoint_every": 5,
        "sessions": ["0a1b2c3d"],
        **fields,
    }


def _status(state: str, started: datetime, updated: datetime, **fields: Any) -> dict[str, Any]:
    return {
        "state": state,
        "job_id": "set below",
        "task": "/home/me/examples/digits.py:Digits",
        "started_at": started.isoformat(),
        "updated_at": updated.isoformat(),
        "iteration": 40,
        "total_iterations": 66,
        "cost_usd": 0.00042,
        "wall_s": 30.0,
        "last_checkpoint": 40,
        "error": None,
        **fields,
    }


_RESULT = {
    "final_metrics": {"accuracy": 0.9533, "loss": 0.1933},
    "cost_usd": 0.00119,
    "wall_s": 41.5,
    "iterations": 66,
}


def _write_run(
    folder: Path,
    plan: dict[str, Any] | str,
    status: dict[str, Any] | None = None,
    result: dict[str, Any] | None = None,
) -> None:
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(plan if isinstance(plan, str) else json.dumps(plan))
    if status is not None:
        job = plan["job_id"] if isinstance(plan, dict) else "?"
        (folder / "status.json").write_text(json.dumps({**status, "job_id": job}))
    if result is not None:
        (folder / "result.json").write_text(json.dumps(result))


@pytest.fixture
def run_folders(tmp_path: Path) -> Path:
    """One run in each state under tmp_path/runs, started an hour apart, in shuffled order;
    one of them a level deeper (runs/sweep/...)."""
    runs = tmp_path / "runs"
    t = NOW - timedelta(hours=10)

    def at(hours: int) -> datetime:
        return t + timedelta(hours=hours)

    _write_run(
        runs / "finished",
        _plan("digits-a-finished"),
        _status("finished", at(1), at(1), iteration=66, cost_usd=0.00119),
        result=_RESULT,
    )
    _write_run(
        runs / "sweep" / "running",
        _plan("digits-b-running"),
        _status("running", at(5), datetime.now(UTC) - timedelta(seconds=3), iteration=12),
    )
    _write_run(
        runs / "stale",
        _plan("digits-c-stale"),
        _status("running", at(3), NOW - timedelta(minutes=30), iteration=20, last_checkpoint=20),
    )
    _write_run(
        runs / "failed",
        _plan("digits-d-failed"),
        _status("failed", at(2), at(2), error="worker 1 failed the same way twice: boom"),
    )
    _write_run(
        runs / "interrupted",
        _plan("digits-e-interrupted"),
        _status("interrupted", at(4), at(4), last_checkpoint=40),
    )
    _write_run(runs / "corrupt", '{"job_id": "half-writ')
    # An older smlt: no status.json; the start comes from the job id's stamp.
    _write_run(runs / "old", _plan("digits-20200101-120000-abcdef"), result=_RESULT)
    (runs / "not-a-run").mkdir()
    (runs / "not-a-run" / "notes.txt").write_text("hello")
    return runs


def test_runs_reads_every_state_and_never_raises(run_folders: Path) -> None:
    records = {r.path.name: r for r in list_runs(run_folders)}
    assert {name: r.state for name, r in records.items()} == {
        "finished": "finished",
        "running": "running",
        "stale": "stopped",  # says running, not rewritten for 30 minutes: its driver died
        "failed": "failed",
        "interrupted": "interrupted",
        "corrupt": "unreadable",
        "old": "finished",
    }
    assert records["finished"].final_metrics == {"accuracy": 0.9533, "loss": 0.1933}
    assert records["finished"].cost_usd == pytest.approx(0.00119)
    assert records["old"].started_at == datetime(2020, 1, 1, 12, tzinfo=UTC)
    assert records["corrupt"].error and "run.json" in records["corrupt"].error
    assert records["stale"].resumable and records["interrupted"].resumable
    assert not records["finished"].resumable
    # A status.json half-written or lost leaves the run listed, its fields empty.
    (run_folders / "failed" / "status.json").write_text("{")
    assert read_run(run_folders / "failed").state == "unknown"


def test_smlt_runs_prints_a_table_sorted_by_start(run_folders: Path) -> None:
    proc, marker = _smlt(["runs"], run_folders.parent)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    order = [
        next(i for i, line in enumerate(lines) if job in line)
        for job in (
            "digits-20200101-120000-abcdef",
            "digits-a-finished",
            "digits-d-failed",
            "digits-c-stale",
            "digits-e-interrupted",
            "digits-b-running",
        )
    ]
    assert order == sorted(order)
    row = {
        path: next(line for line in lines if f" runs/{path} " in line)
        for path in ("finished", "stale", "corrupt")
    }
    for text in ("digits.py:Digits", "finished", "66/66", "accuracy 0.9533", "$0.00119"):
        assert text in row["finished"]
    assert "stopped" in row["stale"] and "20/66" in row["stale"]
    assert "unreadable" in row["corrupt"]
    assert "runs/failed: failed: worker 1 failed the same way twice: boom" in lines
    assert "smlt resume runs/interrupted" in proc.stdout
    assert "smlt resume runs/stale" in proc.stdout
    assert "smlt resume runs/failed" not in proc.stdout  # its cause needs fixing first
    assert "not-a-run" not in proc.stdout
    _assert_nothing_left(marker)


def test_smlt_runs_json_has_the_same_fields(run_folders: Path) -> None:
    proc, _ = _smlt(["runs", "runs", "--json"], run_folders.parent)
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(proc.stdout)
    assert [r["status"] for r in runs] == [
        "unreadable",  # no start time: first
        "finished",
        "finished",
        "failed",
        "stopped",
        "interrupted",
        "running",
    ]
    by_path = {r["path"]: r for r in runs}
    finished = by_path["runs/finished"]
    assert finished["job_id"] == "digits-a-finished"
    assert finished["task"] == "/home/me/examples/digits.py:Digits"
    assert finished["final_metrics"] == {"accuracy": 0.9533, "loss": 0.1933}
    assert finished["iteration"] == finished["total_iterations"] == 66
    assert finished["cost_usd"] == pytest.approx(0.00119)
    assert datetime.fromisoformat(finished["started_at"]) < NOW
    running = by_path["runs/sweep/running"]
    assert running["iteration"] == 12 and running["final_metrics"] == {}
    assert by_path["runs/failed"]["error"] == "worker 1 failed the same way twice: boom"
    assert by_path["runs/interrupted"]["last_checkpoint"] == 40
    assert by_path["runs/interrupted"]["resumable"] is True


def test_smlt_runs_of_a_missing_or_empty_folder(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    runner = CliRunner()
    missing = runner.invoke(app, ["runs", str(tmp_path / "nope")])
    assert missing.exit_code == 2
    assert "is not a folder" in missing.output
    (tmp_path / "empty").mkdir()
    empty = runner.invoke(app, ["runs", str(tmp_path / "empty")])
    assert empty.exit_code == 0
    assert "no runs under" in empty.output
    as_json = runner.invoke(app, ["runs", str(tmp_path / "empty"), "--json"])
    assert json.loads(as_json.stdout) == []


# -- progress, epoch lines, summary ------------------------------------------------------------


def _status_dict(**fields: Any) -> dict[str, Any]:
    epochs = [
        {"epoch": 0, "iteration": 21, "train_loss": 1.0969, "samples_per_s": 208.0, "part": 0}
        | {"accuracy": 0.7511, "loss": 0.8835},
        {"epoch": 1, "iteration": 43, "train_loss": 0.2810, "samples_per_s": 144.0, "part": 1}
        | {"lr": 0.05, "accuracy": 0.9200, "loss": 0.2740},
    ]
    return {
        "iteration": 50,
        "last": {
            "iteration": 49,
            "loss": 0.3012,
            "samples_per_s": 150.0,
            "lr": 0.0004213,
            "grad_norm": 1.9876,
        },
        "epochs": epochs,
        "total_iterations": 66,
        "iterations_per_epoch": 22,
        "workers": 2,
        "memory_mb": 1769,
        "cost_usd": 0.00123,
        "job_id": "digits-x",
        "output_dir": "/runs/digits-x",
        "part": 1,
        "last_checkpoint": 40,
        **fields,
    }


def _live_text(display: _ProgressDisplay) -> str:
    display.console.print(display.progress)
    text: str = display.console.export_text()
    return text


def _live_display(width: int) -> _ProgressDisplay:
    out = Console(
        width=width, file=io.StringIO(), force_terminal=True, color_system=None, record=True
    )
    return _ProgressDisplay(out)


@pytest.mark.parametrize("width", [60, 80, 120])
def test_the_live_display_keeps_every_figure_at_any_width(width: int) -> None:
    display = _live_display(width)
    display.update(_status_dict(iteration=44, last=None))
    display.update(_status_dict())
    text = _live_text(display)
    flat = " ".join(text.split())
    figures = ("it 50/66", "train loss 0.3012", "lr 0.000421", "grad norm 1.99", "150 samples/s")
    for figure in (*figures, "2 x 1769 MB", "$0.00123"):
        assert figure in flat, text
    assert "evaluate() after epoch 2: accuracy 0.9200 loss 0.2740" in flat, text
    assert "held-out" not in text
    assert max(len(line) for line in text.splitlines()) <= width


def test_the_live_display_says_starting_until_the_first_iteration() -> None:
    display = _live_display(80)
    display.update(_status_dict(iteration=0, last=None, epochs=[], part=0))
    text = _live_text(display)
    assert "starting workers..." in text
    assert "nan" not in text and "0 samples/s" not in text
    # A resumed run's first status already has the history before the resume: it is still
    # starting until an iteration of its own is reported.
    resumed = _live_display(80)
    resumed.update(_status_dict(iteration=44))
    assert "starting workers..." in _live_text(resumed)
    resumed.update(_status_dict(iteration=45))
    assert "train loss" in _live_text(resumed)


def test_epoch_lines_mark_epochs_run_before_a_resume_and_name_the_metrics(
    capsys: pytest.CaptureFixture[str],
) -> None:
    display = _ProgressDisplay(Console(file=io.StringIO(), force_terminal=False))
    display.update(_status_dict())
    before, after = capsys.readouterr().err.splitlines()
    assert before == (
        "epoch 1/3: it 22/66  train loss 1.0969  208 samples/s  "
        "evaluate(): accuracy 0.7511  loss 0.8835  (before resume)"
    )
    assert after == (
        "epoch 2/3: it 44/66  train loss 0.2810  lr 0.05  144 samples/s  2 x 1769 MB  $0.00123  "
        "evaluate(): accuracy 0.9200  loss 0.2740"
    )
    # Without "part" (a driver from before resumable records), nothing is marked.
    old = _status_dict()
    del old["part"]
    entry = {k: v for k, v in old["epochs"][1].items() if k != "part"}
    assert "before resume" not in _format_epoch_line(old, entry)


def _result(epochs: int) -> SimpleNamespace:
    return SimpleNamespace(
        job_id="digits-x",
        final_metrics={"accuracy": 0.9533},
        history=[{"loss": 0.1565}],
        configs=[{"workers": 2, "memory_mb": 1769}],
        optimizer={"class": "SGD", "mode": "sharded"},
        iterations=22 * epochs,
        epochs=epochs,
        batch_size=64,
        wall_s=12.3,
        cost_usd=0.0012,
        pricing="aws-lambda-x86",
        billed_worker_s=20.0,
        output_dir=Path("runs/digits-x"),
        search=None,  # fixed workers and memory: no goal, no trials
        goal=None,
    )


def test_the_summary_pluralizes_and_names_the_metrics(capsys: pytest.CaptureFixture[str]) -> None:
    _print_summary(_result(1))
    one = capsys.readouterr().out
    assert "22 (1 epoch of batch 64)" in one
    assert "evaluate(): accuracy" in one and "held-out" not in one
    _print_summary(_result(3))
    assert "66 (3 epochs of batch 64)" in capsys.readouterr().out


# -- Ctrl-C and SIGTERM ------------------------------------------------------------------------


def test_sigterm_raises_keyboard_interrupt_once_and_exits_143() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    stop = _StopSignals()
    with pytest.raises(KeyboardInterrupt), stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the next bytecode
    assert (stop.name, stop.exit_code) == ("SIGTERM", 143)
    assert signal.getsignal(signal.SIGTERM) == previous
    stopping = _StopSignals()
    stopping.received = signal.SIGTERM
    stopping._handle(signal.SIGTERM, None)  # a second signal, during the cleanup: ignored
    assert (_StopSignals().name, _StopSignals().exit_code) == ("Ctrl-C", 130)


def test_rays_own_sigterm_exit_is_recognised() -> None:
    assert _sigterm_through_ray(SystemExit(15))
    relayed = SystemExit(1)
    relayed.ray_terminate_msg = "SystemExit is raised (sys.exit is called). Exit code: 15."  # type: ignore[attr-defined]
    assert _sigterm_through_ray(relayed)
    assert not _sigterm_through_ray(SystemExit(1))
    assert not _sigterm_through_ray(SystemExit(0))


def test_the_interrupt_message_says_whether_there_is_something_to_resume(
    tmp_path: Path,
) -> None:
    objects = tmp_path / "objects"
    run = tmp_path / "run"
    _write_run(
        run,
        _plan("digits-y", object_store=str(objects)),
        _status("interrupted", NOW, NOW, last_checkpoint=None),
    )
    assert _interrupted_message("Ctrl-C", run) == (
        "interrupted by Ctrl-C; the workers are stopped. Nothing to resume: no checkpoint was "
        "committed (the first comes after iteration 5 of 66); start again with smlt train."
    )
    (objects / "jobs/digits-y/checkpoints/000000010").mkdir(parents=True)
    (objects / "jobs/digits-y/checkpoints/000000010/COMMITTED.json").write_text("{}")
    assert _interrupted_message("SIGTERM", run) == (
        "interrupted by SIGTERM; the workers are stopped. The newest checkpoint is at iteration "
        f"10 of 66; continue with: smlt resume {run}"
    )
    # Training had ended: resume writes the model and the results.
    (objects / "jobs/digits-y/checkpoints/000000066").mkdir(parents=True)
    (objects / "jobs/digits-y/checkpoints/000000066/COMMITTED.json").write_text("{}")
    assert "Training had ended (the checkpoint at iteration 66 of 66 holds it)" in (
        _interrupted_message("SIGTERM", run)
    )
    never = "interrupted by Ctrl-C before the run started: nothing to resume."
    assert _interrupted_message("Ctrl-C", tmp_path / "never-started") == never
    assert _interrupted_message("Ctrl-C", None) == never


def test_smlt_warnings_print_as_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from smlt.cli import _show_warning
    from smlt.errors import SmltWarning

    _show_warning(SmltWarning("--workers: 8 workers share 4 samples"), SmltWarning, "x.py", 1)
    assert capsys.readouterr().err == "warning: --workers: 8 workers share 4 samples\n"


def _wait_for_a_checkpoint(out: Path, objects: Path, proc: subprocess.Popen[bytes]) -> None:
    """Until status.json names a checkpoint (or, from a driver that writes no status.json,
    the object store holds a committed one)."""
    deadline = time.monotonic() + 300  # a cold run's first checkpoint: ~20 s alone, 180+ loaded
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it was stopped"
        try:
            status = json.loads((out / "status.json").read_text())
        except (OSError, ValueError):
            status = {}
        if status.get("last_checkpoint") is not None:
            return
        if list(objects.glob("jobs/*/checkpoints/*/COMMITTED.json")):
            return
        time.sleep(0.1)
    pytest.fail("no checkpoint was committed within 300 s")


@pytest.mark.slow
# Two cold runs of the command (each starts its Ray and its workers): about 60 s alone, over 300 s
# (the suite's default bound) on a 2-core machine loaded to 20 by other jobs. A bound on a hang.
@pytest.mark.timeout(600)
def test_sigterm_stops_a_run_cleanly_and_resume_finishes_it_from_anywhere(tmp_path: Path) -> None:
    """SIGTERM ends the run in one line naming the resume command; then the user edits the task
    file (here: breaks it) and resumes from another folder: the resume runs the packaged code,
    and the record, the model and the plots describe the whole run."""
    out, objects = tmp_path / "out", tmp_path / "objects"
    task_file = tmp_path / "task.py"
    task_file.write_text(DIGITS.read_text())
    marker = uuid.uuid4().hex
    env = {**os.environ, "SMLT_TEST_MARKER": marker, "SMLT_OBJECT_STORE": str(objects)}
    args = ["--epochs", "3", "--batch-size", "64", "--workers", "2", "--checkpoint-every", "5"]
    with (tmp_path / "stderr").open("w+b") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "smlt", "train", "task.py:Digits", *args, "--output", "out"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
        try:
            _wait_for_a_checkpoint(out, objects, proc)
            proc.send_signal(signal.SIGTERM)  # to the command alone, as `kill PID` does
            returncode = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        err.seek(0)
        stderr = err.read().decode()
    assert returncode == 143, stderr
    for trace in ("Traceback", "*** SIGTERM", "StackTrace", "logging.cc"):
        assert trace not in stderr
    [message] = [line for line in stderr.splitlines() if "interrupted" in line]
    assert message.startswith("interrupted by SIGTERM; the workers are stopped.")
    assert message.endswith("smlt resume out")
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "interrupted" and status["last_checkpoint"] is not None
    _assert_nothing_left(marker)

    task_file.write_text("raise SystemExit('the edited task file was imported')\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    resumed, marker = _smlt(["resume", str(out)], elsewhere, timeout_s=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "evaluate(): accuracy" in resumed.stdout
    result = json.loads((out / "result.json").read_text())
    parts = [(p["command"], p["ended"]) for p in result["parts"]]
    assert parts == [("train", "interrupted"), ("resume", "finished")]
    assert result["cost_usd"] == pytest.approx(sum(p["cost_usd"] for p in result["parts"]))
    assert [h["iteration"] for h in result["history"]] == list(range(66))  # 1347 / 64 -> 22
    assert [e["epoch"] for e in result["epoch_metrics"]] == [0, 1, 2]
    assert result["final_metrics"]["accuracy"] > 0.85
    assert result["history"][-1]["loss"] < result["history"][0]["loss"] / 3
    assert "***" in result["redis"]
    assert json.loads((out / "status.json").read_text())["state"] == "finished"
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
    _assert_nothing_left(marker)
