"""Evaluation off the workers' critical path.

A task's ``evaluate(model)`` (held-out accuracy, say) used to run on rank 0 at the end of every
epoch while its n - 1 peers waited for it, billed, with the wait bounded by the shard timeout
(a long evaluation ended the run and blamed the peers) and invisible to the time-limit margin.
Now the owners keep a copy of their new parameter shard at the end of every epoch (``snapshot``
keys, written in the same round trip as the shard itself), training goes on, and the scheduler
evaluates the copy here, one version at a time on a thread of its own, reporting the metrics
against the iteration they belong to. The copy is deleted as soon as it has been read.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import torch

from smlt.errors import TaskError
from smlt.protocol.model import FlatModel
from smlt.protocol.state import read_snapshot
from smlt.storage.artifacts import ArtifactManifest, load_packaged_task
from smlt.storage.objects import open_object_store
from smlt.sync.keys import JobKeys
from smlt.sync.store import ParameterStore
from smlt.task import Task, run_evaluate

__all__ = ["Evaluator"]


class Evaluator:
    """Evaluates snapshots of one job's model. Build the model on first use; thread-safe."""

    def __init__(
        self,
        object_store_url: str,
        job_id: str,
        store: ParameterStore,
        keys: JobKeys,
        num_params: int,
        *,
        seed: int = 0,
        threads: int = 1,
    ) -> None:
        self.object_store_url = object_store_url
        self.job_id = job_id
        self.store = store
        self.keys = keys
        self.num_params = num_params
        self.seed = seed
        self.threads = threads
        self._lock = threading.Lock()
        self._task: Task | None = None
        self._flat: FlatModel | None = None
        self._cache = tempfile.TemporaryDirectory(prefix=f"smlt-eval-{job_id}-")

    def _model(self) -> tuple[Task, FlatModel]:
        if self._task is None or self._flat is None:
            objects = open_object_store(self.object_store_url)
            manifest = ArtifactManifest.load(objects, self.job_id)
            task = load_packaged_task(objects, manifest, Path(self._cache.name))
            torch.manual_seed(self.seed)
            flat = FlatModel(task.model())
            if flat.size != self.num_params:
                raise TaskError(
                    f"model() built {flat.size} values for evaluation, the job trains "
                    f"{self.num_params}: model() must build the same model every time"
                )
            self._task, self._flat = task, flat
        return self._task, self._flat

    def take(self, version: int, workers: int) -> tuple[torch.Tensor, dict[str, bytes]]:
        """Read the snapshot of ``version`` (kept by ``workers`` owners) and delete it."""
        values, buffers = read_snapshot(self.store, self.keys, version, workers, self.num_params)
        for s in range(workers):
            self.store.unlink(s, [self.keys.snapshot(version, s)])
        return torch.from_numpy(values), buffers

    def evaluate(self, values: torch.Tensor, buffers: dict[str, bytes]) -> dict[str, float]:
        """The task's metrics for the model holding ``values`` and ``buffers``."""
        with self._lock:
            # torch's thread count is the process's: set for the evaluation, then given back.
            threads = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                task, flat = self._model()
                flat.values.copy_(values)
                flat.load_discrete(buffers)
                return run_evaluate(task, flat.model)
            finally:
                torch.set_num_threads(threads)

    def close(self) -> None:
        self._cache.cleanup()
