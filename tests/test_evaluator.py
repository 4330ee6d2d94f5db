"""Evaluation off the critical path: owners keep a copy of each epoch's last version, the
evaluator reads it (then deletes it) and gets the metrics the model of that version has."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from smlt.actors.evaluator import Evaluator
from smlt.protocol.model import FlatModel
from smlt.storage.redis_server import RedisServer
from smlt.task import run_evaluate
from tests.worker_harness import ThreadedJob

TASK = textwrap.dedent(
    """
    import torch
    from smlt.task import Task

    class Scored(Task):
        def data(self):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(120, 6, generator=g)
            return x, (x.sum(dim=1) > 0).long()

        def model(self):
            torch.manual_seed(1)
            return torch.nn.Sequential(
                torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                torch.nn.Linear(8, 2),
            )

        def optimizer(self, model):
            return torch.optim.Adam(model.parameters(), lr=0.05)

        def loss(self, model, batch):
            x, y = batch
            return torch.nn.functional.cross_entropy(model(x), y)

        def evaluate(self, model):
            x, y = self.data()
            model.eval()
            with torch.no_grad():
                logits = model(x)
            return {
                "accuracy": (logits.argmax(1) == y).float().mean().item(),
                "loss": torch.nn.functional.cross_entropy(logits, y).item(),
                "tracked": float(model[1].num_batches_tracked),
            }
    """
)


def test_the_evaluator_scores_the_version_the_snapshot_was_taken_of(
    tmp_path: Path, redis_server: RedisServer, job_id: str
) -> None:
    task_file = tmp_path / "scored.py"
    task_file.write_text(TASK)
    # 120 samples, batch 40: 3 iterations an epoch; snapshots of versions 3 and 6.
    job = ThreadedJob(
        tmp_path, redis_server, job_id, task_file, "Scored", workers=3, iterations=6, batch_size=40
    )
    outcome = job.run()
    evaluator = Evaluator(job.objects.url, job_id, job.store, job.keys, job.initial.size)
    try:
        client = job.store.client(0)
        assert client.exists(*(job.keys.snapshot(3, s) for s in range(3))) == 3
        values, buffers = evaluator.take(6, 3)
        assert client.exists(*(job.keys.snapshot(6, s) for s in range(3))) == 0  # deleted
        metrics = evaluator.evaluate(values, buffers)
        # The reference: the final version as the store holds it, in a fresh model.
        torch.manual_seed(0)
        model = job.task.model()
        flat = FlatModel(model)
        flat.values_numpy()[:] = outcome.final.values
        flat.load_discrete(outcome.final.buffers)
        assert metrics == run_evaluate(job.task, model)
        assert metrics["tracked"] == 6  # num_batches_tracked travelled with the snapshot
        early = evaluator.evaluate(*evaluator.take(3, 3))
        assert early["tracked"] == 3 and early != metrics
        with pytest.raises(Exception, match="no value in the store"):
            evaluator.take(3, 3)
    finally:
        evaluator.close()


SLOW_EVAL = """

class SlowEval(Digits):
    # Evaluation slower than the peers' shard timeout: inline on rank 0 it ended the run.
    def evaluate(self, model):
        import time

        time.sleep(3)
        return super().evaluate(model)


class BrokenEval(Digits):
    def evaluate(self, model):
        if model[0].weight.abs().sum() > 0:
            raise ValueError("held-out file missing")
        return {}
"""


@pytest.fixture(scope="module")
def eval_tasks(in_process_runs: Path) -> Path:
    path = in_process_runs / "eval_digits.py"
    digits = Path(__file__).resolve().parent.parent / "examples" / "digits.py"
    path.write_text(digits.read_text() + SLOW_EVAL)
    return path


@pytest.mark.slow
def test_a_long_evaluation_does_not_stall_the_workers(
    in_process_runs: Path, eval_tasks: Path
) -> None:
    import smlt

    result = smlt.train(
        f"{eval_tasks}:SlowEval",
        epochs=2,
        batch_size=256,
        workers=3,
        output=in_process_runs / "slow-eval",
    )
    assert [e["epoch"] for e in result.epoch_metrics] == [0, 1]
    assert all("accuracy" in e for e in result.epoch_metrics)
    assert result.final_metrics == {
        k: v for k, v in result.epoch_metrics[-1].items() if k in ("accuracy", "loss")
    }
    # No iteration waited for an evaluation (SlowEval's takes 3 s; before, rank 0 evaluated
    # inline at each epoch's end, iteration 5 and 11, and its peers waited). Iteration 0 is left
    # out: it includes the wait for the peers' cold starts, which differ by seconds here.
    assert max(h["iter_s"] for h in result.history[1:]) < 2


@pytest.mark.slow
def test_a_failing_evaluation_is_reported_and_training_finishes(
    in_process_runs: Path, eval_tasks: Path
) -> None:
    import smlt

    result = smlt.train(
        f"{eval_tasks}:BrokenEval",
        epochs=2,
        batch_size=256,
        workers=2,
        output=in_process_runs / "broken-eval",
    )
    [failure] = [f for f in result.failures if "evaluation" in f]
    assert failure["evaluation"] == 5 and "held-out file missing" in failure["cause"]
    assert [e["epoch"] for e in result.epoch_metrics] == [0, 1]  # recorded, without metrics
    assert result.final_metrics == {}
    assert (result.output_dir / "model.pt").exists()


@pytest.mark.slow
def test_an_evaluation_over_its_time_bound_is_given_up_and_training_finishes(
    in_process_runs: Path, eval_tasks: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import smlt

    monkeypatch.setenv("SMLT_EVAL_TIMEOUT_S", "1")  # SlowEval sleeps 3 s
    result = smlt.train(
        f"{eval_tasks}:SlowEval",
        epochs=2,
        batch_size=256,
        workers=2,
        output=in_process_runs / "eval-timeout",
    )
    [failure] = [f for f in result.failures if "evaluation" in f]
    assert "took over 1 s" in failure["cause"]
    assert [e["epoch"] for e in result.epoch_metrics] == [0, 1]
    assert result.final_metrics == {}
