"""Experiment logging: callbacks and TensorBoard event files (smlt/client/callbacks.py and
smlt/client/tensorboard.py).

Through ``smlt.train`` (real Ray and Redis), a run stopped by one of its callbacks once a
checkpoint is committed, then resumed:

- the callback that raised is named in a CallbackError, the others get ``on_end(None)``, and the
  run is resumable;
- callbacks get each iteration of their call once and in order, each epoch once its evaluation is
  in, and the end; the resume's from its checkpoint on, although the driver sees overlapping
  views of the history;
- a callback blocked on the driver's thread does not hold up the workers: the whole run, its
  final checkpoint included, finishes while the callback waits;
- the event files, read back with TensorBoard's own readers, hold iterations 0..T-1 exactly once
  for every per-iteration tag (no step written twice, though both parts may run the iterations
  between the checkpoint and the stop; the steps no driver delivered are filled in at the end),
  each evaluated epoch once, and the loss, learning rate and gradient norm of ``result.json``'s
  history (as float32).

Without Ray: the feed's ordering over polls that repeat, skip and replay; the tags; a missing
tensorboard package and a callback that is not one, refused before anything starts; the CLI's
``--tensorboard``.
"""

from __future__ import annotations

import json
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest

import smlt
from smlt.client.callbacks import Callback, RecordFeed
from smlt.client.driver import TrainResult
from smlt.client.tensorboard import epoch_scalars, iteration_scalars
from smlt.errors import CallbackError, ConfigError

TASK = textwrap.dedent(
    '''
    import time

    import torch
    from smlt.task import Task


    class Logged(Task):
        """Everything the logger writes: a schedule (lr), clipping (grad_norm), evaluate()."""

        clip_grad_norm = 0.5

        def data(self):
            g = torch.Generator().manual_seed(0)
            return torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g)

        def model(self):
            torch.manual_seed(0)
            return torch.nn.Linear(4, 1)

        def optimizer(self, model):
            return torch.optim.SGD(model.parameters(), lr=0.2)

        def scheduler(self, optimizer):
            return torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)

        def loss(self, model, batch):
            time.sleep(0.1)  # a floor on iteration time: the first run is stopped part-way
            x, y = batch
            return torch.nn.functional.mse_loss(model(x), y)

        def evaluate(self, model):
            x, y = self.data()
            with torch.no_grad():
                return {"mse": float(torch.nn.functional.mse_loss(model(x), y))}
    '''
)
# 64 samples / 16: four iterations per epoch, 20 in all; a checkpoint every 2.
RUN = {"epochs": 5, "batch_size": 16, "workers": 2, "seed": 1, "checkpoint_every": 2}
ITERATIONS = 20
PER_EPOCH = 4


class Recorder(Callback):
    """What a callback was given, and on which thread."""

    def __init__(self) -> None:
        self.iterations: list[dict[str, Any]] = []
        self.epochs: list[dict[str, Any]] = []
        self.ends: list[TrainResult | None] = []
        self.threads: set[int] = set()

    def on_iteration(self, record: dict[str, Any]) -> None:
        self.threads.add(threading.get_ident())
        self.iterations.append(record)

    def on_epoch(self, record: dict[str, Any]) -> None:
        self.epochs.append(record)

    def on_end(self, result: TrainResult | None) -> None:
        self.ends.append(result)


def _committed(run_dir: Path) -> list[int]:
    """The iterations of the committed checkpoints of the run in ``run_dir``."""
    from smlt.storage.checkpoint import CheckpointStore
    from smlt.storage.objects import open_object_store

    plan = json.loads((run_dir / "run.json").read_text())
    return CheckpointStore(open_object_store(plan["object_store"]), plan["job_id"]).list_committed()


class StopOnceCheckpointed(Callback):
    """Raises at the first iteration it gets at or after a committed checkpoint (so that the
    resume is likely to run again iterations this part delivered)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def on_iteration(self, record: dict[str, Any]) -> None:
        if any(c <= record["iteration"] for c in _committed(self.run_dir)):
            raise RuntimeError(f"enough at iteration {record['iteration']}")


class WaitForTheEnd(Callback):
    """Blocks the driver's thread at its first iteration until the run's final checkpoint is
    committed: the workers and the scheduler must get there without the driver."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.saw_the_end: bool | None = None

    def on_iteration(self, record: dict[str, Any]) -> None:
        if self.saw_the_end is not None:
            return
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and ITERATIONS not in _committed(self.run_dir):
            time.sleep(0.1)
        self.saw_the_end = ITERATIONS in _committed(self.run_dir)


def _wait_for_stopped_scheduler() -> None:
    """With the scheduler on a thread (the test suite's mode), a run stopped from the driver
    leaves that thread until it notices its Redis is gone; the resume must not race it."""
    deadline = time.monotonic() + 60
    while any(t.name == "smlt-scheduler" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the stopped run's scheduler thread did not end"
        time.sleep(0.1)


def _events(log_dir: Path) -> Counter[tuple[str, int]]:
    """How often each (tag, step) is in the event files of ``log_dir``, read raw with
    TensorBoard's own loader (which, unlike the accumulator, purges nothing)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    counts: Counter[tuple[str, int]] = Counter()
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                counts[(value.tag, int(event.step))] += 1
    return counts


@pytest.mark.slow
def test_a_run_stopped_by_a_callback_and_resumed_logs_every_step_once(
    tmp_path: Path, in_process_runs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (tmp_path / "task.py").write_text(TASK)
    monkeypatch.chdir(tmp_path)
    run, tb = tmp_path / "run", tmp_path / "tb"

    # 1. The train, stopped by a callback once a checkpoint is committed.
    first, stopper = Recorder(), StopOnceCheckpointed(run)
    with pytest.raises(CallbackError) as stopped:
        smlt.train("task.py:Logged", **RUN, output=run, tensorboard=tb, callbacks=[first, stopper])
    message = str(stopped.value)
    assert "callback StopOnceCheckpointed.on_iteration raised RuntimeError: enough" in message
    assert f"smlt resume {run}" in message
    assert stopped.value.callback is stopper
    assert isinstance(stopped.value.__cause__, RuntimeError)
    assert first.ends == [None]
    done = [r["iteration"] for r in first.iterations]
    assert done == list(range(len(done))) and done, "iterations skipped, repeated or unordered"
    ends = list(range(PER_EPOCH - 1, done[-1] + 1, PER_EPOCH))
    assert [e["iteration"] for e in first.epochs] == ends[: len(first.epochs)]
    assert json.loads((run / "status.json").read_text())["state"] == "failed"
    _wait_for_stopped_scheduler()
    checkpoint = max(_committed(run))
    assert 0 < checkpoint < ITERATIONS, "nothing left to resume: make the task slower"

    # 2. The resume, with a callback that blocks the driver's thread until the run is over.
    second, waiter = Recorder(), WaitForTheEnd(run)
    # No tensorboard= here: run.json remembers the folder the run's train() had.
    result = smlt.resume(run, callbacks=[second, waiter])
    assert waiter.saw_the_end, "the workers waited for the driver's blocked callback"
    start = result.parts[-1]["from_iteration"]
    assert start == checkpoint
    assert [r["iteration"] for r in second.iterations] == list(range(start, ITERATIONS))
    whole = {h["iteration"]: h for h in result.history}
    for record in second.iterations:  # result.json's entry, with the run's cost so far
        cost = record.pop("cost_usd")
        assert record == whole[record["iteration"]]
        assert 0 < cost <= result.cost_usd
    costs = [r["cost_usd"] for r in first.iterations]
    assert costs == sorted(costs)
    epochs_after = [e for e in result.epoch_metrics if e["iteration"] >= start]
    assert second.epochs == epochs_after and [e["epoch"] for e in epochs_after] == [
        e for e in range(start // PER_EPOCH, RUN["epochs"])
    ]
    assert second.ends == [result] and len(second.threads) == 1
    assert second.threads == {threading.get_ident()}  # the thread that called resume()

    # 3. The event files: one folder for the run, one file per part, every step once.
    log_dir = tb / result.job_id
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 2
    counts = _events(log_dir)
    assert set(counts.values()) == {1}, [k for k, n in counts.items() if n > 1]
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    per_iteration = {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/samples_per_s",
        "time/data_s",
        "time/compute_s",
        "time/sync_s",
        "time/update_s",
        "time/iter_s",
    }
    assert per_iteration | {"cost/usd", "epoch/train_loss", "eval/mse"} <= tags, tags
    assert not any(t.endswith("wall_s") for t in tags)
    for tag in per_iteration:
        steps = [e.step for e in accumulator.Scalars(tag)]
        assert sorted(steps) == list(range(ITERATIONS)), tag
    for name, tag in (("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm")):
        written = {e.step: e.value for e in accumulator.Scalars(tag)}
        expected = {h["iteration"]: float(np.float32(h[name])) for h in result.history}
        assert written == expected, tag
    lrs = {e.value for e in accumulator.Scalars("train/lr")}
    assert len(lrs) > 3, "the schedule should change the learning rate"
    # Cost: the run's cost so far, never going down, at every iteration a driver delivered;
    # those between the stop and the checkpoint the resume started from were delivered by no
    # driver and were filled in from result.json's history at the end, without a cost.
    cost = sorted((e.step, e.value) for e in accumulator.Scalars("cost/usd"))
    assert [s for s, _v in cost] == sorted(set(done) | set(range(start, ITERATIONS)))
    assert [v for _s, v in cost] == sorted(v for _s, v in cost)
    # Epochs at the step of their last iteration; eval/ for those evaluate() scored.
    epoch_steps = [e.step for e in accumulator.Scalars("epoch/train_loss")]
    assert sorted(epoch_steps) == list(range(PER_EPOCH - 1, ITERATIONS, PER_EPOCH))
    evaluated = {e["iteration"]: e["mse"] for e in result.epoch_metrics if "mse" in e}
    written_mse = {e.step: e.value for e in accumulator.Scalars("eval/mse")}
    assert written_mse == {k: float(np.float32(v)) for k, v in evaluated.items()}
    assert ITERATIONS - 1 in written_mse  # the resume's epochs at least


# -- without Ray ------------------------------------------------------------------------------


def _row(t: int, loss: float = 1.0) -> dict[str, Any]:
    return {"iteration": t, "epoch": t // PER_EPOCH, "loss": loss, "wall_s": float(t), "part": 1}


def _epoch(end: int) -> dict[str, Any]:
    return {"epoch": end // PER_EPOCH, "iteration": end, "train_loss": 0.5, "part": 1}


def test_the_feed_delivers_each_record_once_in_order_whatever_the_polls_bring() -> None:
    """A resume from iteration 6: polls that repeat rows, bring a row before the one it
    follows, an epoch before its iterations or before the epoch it follows, and a scheduler
    restarted from a checkpoint (a lost Redis) that replays rows already delivered."""
    seen = Recorder()
    feed = RecordFeed([seen], first_iteration=6, iterations_per_epoch=PER_EPOCH, run_dir="run")
    earlier = [_epoch(3)]  # the part before ran it: not this call's
    feed.deliver([_row(6), _row(7)], earlier, cost_usd=0.1)
    feed.deliver([_row(6), _row(7), _row(8)], [*earlier, _epoch(7)], cost_usd=0.2)
    feed.deliver([_row(10)], [*earlier, _epoch(7)], cost_usd=0.3)  # 9 not folded yet
    assert feed.next_iteration == 9
    feed.deliver([_row(11)], [*earlier, _epoch(7), _epoch(15)], cost_usd=0.3)  # 15 before 11
    feed.deliver([_row(9), _row(10), _row(11)], [*earlier, _epoch(7), _epoch(11)], cost_usd=0.4)
    # Redis lost: the new scheduler restarts from checkpoint 8 and redoes 8..12.
    feed.deliver([_row(t, loss=9.0) for t in range(8, 13)], [*earlier, _epoch(7)], cost_usd=0.5)
    assert [(r["iteration"], r["cost_usd"]) for r in seen.iterations] == [
        (6, 0.1),
        (7, 0.1),
        (8, 0.2),
        (9, 0.4),
        (10, 0.4),
        (11, 0.4),
        (12, 0.5),
    ]
    assert all(r["loss"] == 1.0 for r in seen.iterations[:-1])  # never the replays
    assert [e["iteration"] for e in seen.epochs] == [7, 11]
    # The end delivers what is left from the complete record, then on_end.
    result = SimpleNamespace(
        history=[_row(t) for t in range(16)],
        epoch_metrics=[_epoch(e) for e in (3, 7, 11, 15)],
        cost_usd=0.9,
    )
    feed.finish(cast(TrainResult, result))
    assert [r["iteration"] for r in seen.iterations] == list(range(6, 16))
    assert seen.iterations[-1]["cost_usd"] == 0.9
    assert [e["iteration"] for e in seen.epochs] == [7, 11, 15]
    assert seen.ends == [result]


class Raises(Callback):
    def __init__(self, in_end: bool = False) -> None:
        self.in_end = in_end

    def on_iteration(self, record: dict[str, Any]) -> None:
        raise ValueError("bad value")

    def on_end(self, result: TrainResult | None) -> None:
        if self.in_end:
            raise OSError("disk full")


def test_a_callback_that_raises_is_named_and_every_callback_still_ends() -> None:
    before, after = Recorder(), Recorder()
    bad = Raises(in_end=True)
    feed = RecordFeed([before, bad, after], first_iteration=0, iterations_per_epoch=4, run_dir="r")
    with pytest.raises(CallbackError) as raised:
        feed.deliver([_row(0)], [], cost_usd=0.0)
    error = raised.value
    assert str(error).startswith(
        "callback Raises.on_iteration raised ValueError: bad value (at iteration 0); the run "
        "was stopped; smlt resume r continues it"
    )
    assert error.callback is bad and isinstance(error.__cause__, ValueError)
    assert len(before.iterations) == 1 and after.iterations == []
    feed.fail(error)  # what the driver does with the run's error
    assert before.ends == [None] and after.ends == [None]
    assert error.__notes__ == ["callback Raises.on_end raised OSError: disk full"]


def test_a_callback_that_raises_at_the_end_of_a_finished_run_is_named() -> None:
    feed = RecordFeed([Raises(in_end=True)], first_iteration=0, iterations_per_epoch=4, run_dir="r")
    result = SimpleNamespace(history=[], epoch_metrics=[], cost_usd=0.0)
    match = r"Raises.on_end raised OSError: disk full \(at the end\); the run had finished"
    with pytest.raises(CallbackError, match=match):
        feed.finish(cast(TrainResult, result))
    # An iteration left for the end, and a callback that raises on it: the others still end.
    after = Recorder()
    feed = RecordFeed([Raises(), after], first_iteration=0, iterations_per_epoch=4, run_dir="r")
    result = SimpleNamespace(history=[_row(0)], epoch_metrics=[], cost_usd=0.0)
    with pytest.raises(CallbackError, match=r"\(at iteration 0\); the run had finished"):
        feed.finish(cast(TrainResult, result))
    assert after.ends == [result]


def _log_record(record: object) -> None:
    """A plain function, the mistake a user makes (not ``print``: Ray may replace the builtin)."""


def test_what_is_not_a_callback_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match="instances of smlt.Callback subclasses; got <function _log_record"
    ):
        smlt.train("missing.py:T", callbacks=[_log_record], output=tmp_path / "out")  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="a list of smlt.Callback instances, got one"):
        smlt.resume(tmp_path, callbacks=Recorder())  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def test_a_missing_tensorboard_is_refused_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` fails
    fix = r"not installed: pip install 'smlt\[tensorboard\]'"
    with pytest.raises(ConfigError, match=fix):
        smlt.train("missing.py:T", tensorboard=tmp_path / "tb", output=tmp_path / "out")
    with pytest.raises(ConfigError, match=fix):
        smlt.resume(tmp_path / "no-run", tensorboard=tmp_path / "tb")
    assert list(tmp_path.iterdir()) == []


def test_a_second_writer_adds_only_the_steps_the_folder_lacks(tmp_path: Path) -> None:
    """A resume's writer: the steps a stopped part wrote stay as they are (its iterations after
    the checkpoint come again), those it lost (killed before its writer flushed) are filled in
    from the finished run's record."""
    from smlt.client.tensorboard import TensorBoardWriter

    first = TensorBoardWriter(tmp_path)
    for t in (0, 1, 2, 3, 6, 7):  # 4 and 5 lost
        first.on_iteration({**_row(t, loss=1.0), "cost_usd": 0.1})
    first.on_epoch(_epoch(3))
    first.on_end(None)
    second = TensorBoardWriter(tmp_path)
    for t in range(6, 12):  # resumed from checkpoint 6
        second.on_iteration({**_row(t, loss=2.0), "cost_usd": 0.2})
    second.on_epoch(_epoch(7))
    second.on_epoch(_epoch(11))
    result = SimpleNamespace(
        history=[_row(t, loss=3.0) for t in range(12)],
        epoch_metrics=[_epoch(e) for e in (3, 7, 11)],
    )
    second.on_end(cast(TrainResult, result))
    counts = _events(tmp_path)
    assert set(counts.values()) == {1}
    assert sorted(s for tag, s in counts if tag == "train/loss") == list(range(12))
    assert sorted(s for tag, s in counts if tag == "epoch/train_loss") == [3, 7, 11]
    assert sorted(s for tag, s in counts if tag == "cost/usd") == [0, 1, 2, 3, *range(6, 12)]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tmp_path))
    accumulator.Reload()
    losses = {e.step: e.value for e in accumulator.Scalars("train/loss")}
    assert [losses[t] for t in range(12)] == [1.0] * 4 + [3.0] * 2 + [1.0] * 2 + [2.0] * 4


def test_tags_group_what_users_look_at() -> None:
    entry = {
        "iteration": 7,
        "epoch": 1,
        "loss": 0.5,
        "samples": 16,
        "workers": 2,
        "wall_s": 3.0,
        "iter_s": 0.2,
        "samples_per_s": 80.0,
        "data_s": 0.01,
        "compute_s": 0.1,
        "sync_s": 0.05,
        "lr": 0.1,
        "grad_norm": 0.0,  # zero is a value, not a missing one
        "bytes_through_store": 1000,
        "part": 0,
        "cost_usd": 0.001,
    }
    assert iteration_scalars(entry) == {
        "train/loss": 0.5,
        "train/lr": 0.1,
        "train/grad_norm": 0.0,
        "train/samples_per_s": 80.0,
        "cost/usd": 0.001,
        "time/iter_s": 0.2,
        "time/data_s": 0.01,
        "time/compute_s": 0.1,
        "time/sync_s": 0.05,
    }
    epoch = {"epoch": 1, "iteration": 7, "train_loss": 0.4, "samples_per_s": 80.0, "part": 0}
    assert epoch_scalars({**epoch, "accuracy": 0.9, "mse": 0.1}) == {
        "epoch/train_loss": 0.4,
        "eval/accuracy": 0.9,
        "eval/mse": 0.1,
    }
    assert epoch_scalars({**epoch, "evaluated": False}) == {"epoch/train_loss": 0.4}


def test_the_cli_passes_tensorboard_to_train_and_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from smlt.cli import app
    from smlt.client import driver

    given: dict[str, Any] = {}

    def fake(command: str) -> Any:
        def run(*args: Any, **options: Any) -> Any:
            given[command] = options["tensorboard"]
            raise ConfigError(f"{command} stops here")

        return run

    monkeypatch.setattr(driver, "train", fake("train"))
    monkeypatch.setattr(driver, "resume", fake("resume"))
    runner = CliRunner()
    trained = runner.invoke(app, ["train", "t.py:T", "--tensorboard", str(tmp_path / "tb")])
    resumed = runner.invoke(app, ["resume", "run", "--tensorboard", str(tmp_path / "tb")])
    assert (trained.exit_code, resumed.exit_code) == (2, 2), trained.output + resumed.output
    assert given == {"train": tmp_path / "tb", "resume": tmp_path / "tb"}
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    missing = runner.invoke(app, ["train", "t.py:T", "--tensorboard", "tb"])
    assert missing.exit_code == 2 and "pip install 'smlt[tensorboard]'" in missing.output
