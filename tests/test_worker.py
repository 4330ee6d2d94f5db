"""The worker's training loop against real Redis and a real object store, ranks on threads.

These pin the core promise of data parallelism: n workers x B/n give the same model as one worker
x B (float rounding only), for a sharded SGD-with-momentum and a sharded Adam, and for an
optimizer that cannot be sharded (replicated fallback).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from smlt.client.artifacts import package_task
from smlt.protocol.model import FlatModel
from smlt.protocol.payload import WorkerPayload
from smlt.protocol.state import Version, publish_version
from smlt.storage.artifacts import load_packaged_task
from smlt.storage.objects import LocalObjectStore
from smlt.storage.reader import DataReader
from smlt.storage.redis_server import RedisServer
from smlt.sync.keys import JobKeys
from smlt.sync.store import ParameterStore
from smlt.worker.sampler import GlobalBatchSampler
from smlt.worker.trainer import Trainer
from tests.conftest import run_ranks

TASK = textwrap.dedent(
    """
    import torch
    from smlt.task import Task

    class Regression(Task):
        OPT = "sgd"

        def data(self):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(203, 12, generator=g)
            w = torch.randn(12, 3, generator=g)
            y = (x @ w).tanh() + 0.1 * torch.randn(203, 3, generator=g)
            return x, y

        def model(self):
            torch.manual_seed(1)
            layers = [torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)]
            return torch.nn.Sequential(*layers)

        def optimizer(self, model):
            if self.OPT == "sgd":
                return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            return torch.optim.Adam(model.parameters(), lr=0.01)

        def loss(self, model, batch):
            x, y = batch
            return torch.nn.functional.mse_loss(model(x), y)

    class RegressionAdam(Regression):
        OPT = "adam"

    class RegressionReplicated(Regression):
        def optimizer(self, model):
            # Not elementwise (and a subclass), so replicated; with momentum it has state, so
            # losing the replicated state anywhere (replacement, checkpoint, re-shard) shows.
            return NormClippedSGD(model.parameters(), lr=0.05, momentum=0.9)

    class NormClippedSGD(torch.optim.SGD):
        # Scales every gradient by the global norm: not elementwise, so it must be replicated.
        @torch.no_grad()
        def step(self, closure=None):
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
            for p in params:
                p.grad /= max(1.0, float(norm))
            return super().step(closure)
    """
)


def _train(
    tmp_path: Path,
    redis_server: RedisServer,
    job: str,
    cls: str,
    workers: int,
    iterations: int = 10,
    batch_size: int = 64,
) -> np.ndarray:
    task_file = tmp_path / "regression.py"
    task_file.write_text(TASK)
    objects = LocalObjectStore(tmp_path / "objects")
    manifest = package_task(f"{task_file}:{cls}", objects, job)
    task = load_packaged_task(objects, manifest, tmp_path / "cache")
    store = ParameterStore.from_urls(redis_server.url)
    torch.manual_seed(0)
    version0 = Version.initial(FlatModel(task.model()))
    initial = version0.values
    publish_version(store, JobKeys(job), 0, version0, workers)

    def rank(r: int) -> np.ndarray:
        payload = WorkerPayload(
            job_id=job,
            rank=r,
            workers=workers,
            memory_mb=512,
            redis_urls=(redis_server.url,),
            object_store_url=objects.url,
            batch_size=batch_size,
            total_iterations=iterations,
            shard_timeout_s=30,
        )
        reader = DataReader(objects, manifest, tmp_path / f"cache-{r}")
        trainer = Trainer(payload, task, reader, ParameterStore.from_urls(redis_server.url))
        report = trainer.run()
        assert report.next_iteration == iterations
        return trainer.flat.values_numpy().copy()

    results = run_ranks(workers, rank)
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])  # every worker holds the same model
    assert not np.allclose(results[0], initial)  # it trained
    return results[0]


@pytest.mark.parametrize("cls", ["Regression", "RegressionAdam", "RegressionReplicated"])
def test_four_workers_equal_one_worker(
    cls: str, tmp_path: Path, redis_server: RedisServer, job_id: str
) -> None:
    one = _train(tmp_path, redis_server, job_id + "-1", cls, workers=1)
    four = _train(tmp_path, redis_server, job_id + "-4", cls, workers=4)
    np.testing.assert_allclose(four, one, rtol=1e-5, atol=1e-6)


def test_batch_not_divisible_by_workers(
    tmp_path: Path, redis_server: RedisServer, job_id: str
) -> None:
    # 203 samples, B = 50: batches of 50 (split 17/17/16) and a last batch of 3 (1/1/1).
    one = _train(tmp_path, redis_server, job_id + "-1", "Regression", 1, 9, 50)
    three = _train(tmp_path, redis_server, job_id + "-3", "Regression", 3, 9, 50)
    np.testing.assert_allclose(three, one, rtol=1e-5, atol=1e-6)


def test_sampler_union_is_the_global_batch() -> None:
    sampler = GlobalBatchSampler(num_samples=203, batch_size=50, seed=3)
    assert sampler.iterations_per_epoch == 5
    seen = []
    for t in range(5):
        parts = [sampler.worker_indices(t, r, 3)[0] for r in range(3)]
        np.testing.assert_array_equal(np.concatenate(parts), sampler.global_batch(t))
        seen.append(sampler.global_batch(t))
    assert sorted(np.concatenate(seen).tolist()) == list(range(203))  # an epoch covers the set
    assert not np.array_equal(sampler.global_batch(5), sampler.global_batch(0))  # new epoch
