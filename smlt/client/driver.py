"""``smlt.train``: the client side of a run, from a task to a trained model and its bill.

1. load and check the task here, before anything is paid for (a bad task fails in seconds);
2. package code and data into the object store (the artifact manager);
3. start (or connect to) the parameter store and publish the initial parameters as version 0;
4. ask the resource manager for workers x memory; start the scheduler actor and follow it;
5. gather the final parameters, save ``model.pt``, evaluate, write ``result.json`` and plots;
6. stop everything it started, whatever happened: no Redis, Ray or worker process outlives
   the call.
"""

from __future__ import annotations

import inspect
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from smlt.actors.resource_manager import ResourceManager
from smlt.actors.scheduler import JobSpec
from smlt.client.artifacts import package_task
from smlt.client.report import plot_run, write_result
from smlt.errors import ConfigError, TaskError
from smlt.storage.objects import open_object_store
from smlt.storage.redis_server import RedisServer, redact_url
from smlt.sync.keys import JobKeys
from smlt.sync.scatter_reduce import ScatterReduce, publish_params
from smlt.sync.store import DEFAULT_SHARD_TIMEOUT_S, ParameterStore
from smlt.task import Task, load_task, run_evaluate
from smlt.worker.flat import FlatModel
from smlt.worker.sampler import GlobalBatchSampler

__all__ = ["TrainResult", "train"]

ProgressFn = Callable[[dict[str, Any]], None]
_STATUS_INTERVAL_S = 0.5


@dataclass
class TrainResult:
    """What a run produced; ``result.json`` is :meth:`to_dict`."""

    job_id: str
    task: str
    backend: str
    output_dir: Path
    final_metrics: dict[str, float]
    iterations: int
    epochs: int
    batch_size: int
    configs: list[dict[str, Any]]
    generations: list[dict[str, Any]]
    history: list[dict[str, Any]]
    epoch_metrics: list[dict[str, Any]]
    cost_usd: float
    pricing: str
    billed_worker_s: float
    wall_s: float
    redis: str
    object_store: str
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def model_path(self) -> Path:
        return self.output_dir / "model.pt"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["output_dir"] = str(self.output_dir)
        return data


def train(
    task: Task | str,
    *,
    epochs: int = 1,
    batch_size: int = 256,
    workers: int = 1,
    memory_mb: int | None = None,
    backend: str = "ray",
    seed: int = 0,
    output: str | Path | None = None,
    redis_url: str | None = None,
    object_store: str | None = None,
    ray_address: str | None = None,
    shard_timeout_s: float = DEFAULT_SHARD_TIMEOUT_S,
    function_timeout_s: float | None = None,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Train ``task`` data-parallel on ``workers`` stateless workers; see the README.

    ``task`` is a :class:`Task` instance or ``"path/to/file.py:ClassName"``. Raises a
    :class:`~smlt.errors.SmltError` subclass naming what went wrong.
    """
    started = time.monotonic()
    spec = _task_spec(task)
    if epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    user_task = load_task(spec)
    class_name = type(user_task).__name__
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    job_id = f"{class_name.lower()}-{stamp}-{secrets.token_hex(3)}"
    output_dir = Path(output) if output is not None else Path("runs") / job_id
    objects = open_object_store(object_store)

    with ExitStack() as cleanup:
        manifest = package_task(spec, objects, job_id)
        store, redis_urls = _parameter_store(redis_url, cleanup)
        redis_shown = ",".join(redact_url(u) for u in redis_urls)
        if redis_url is not None:
            cleanup.callback(_delete_job_keys, store, job_id)
        sampler = GlobalBatchSampler(manifest.num_samples, batch_size, seed)
        total_iterations = epochs * sampler.iterations_per_epoch

        from smlt.backends import get_backend  # imports Ray: after the fast checks above

        backend_options = {"address": ray_address} if backend == "ray" else {}
        cleanup.enter_context(_ray_session(ray_address))
        probe = get_backend(backend, **backend_options)
        manager = ResourceManager(
            probe.limits,
            workers=workers,
            memory_mb=memory_mb,
            fit_memory_mb=probe.default_memory_mb,
        )
        config = manager.initial()

        torch.manual_seed(seed)
        model = user_task.model()
        flat = FlatModel(model)
        publish_params(store, JobKeys(job_id), 0, flat.values_numpy(), config.workers)

        job = JobSpec(
            job_id=job_id,
            redis_urls=tuple(redis_urls),
            object_store_url=objects.url,
            batch_size=batch_size,
            total_iterations=total_iterations,
            iterations_per_epoch=sampler.iterations_per_epoch,
            seed=seed,
            shard_timeout_s=shard_timeout_s,
            function_timeout_s=function_timeout_s,
        )
        summary = _run_scheduler(backend, backend_options, job, config, progress)

        gatherer = ScatterReduce(
            store,
            job_id,
            rank=0,
            workers=config.workers,
            num_params=flat.size,
            timeout_s=shard_timeout_s,
        )
        with gatherer:
            gatherer.gather(total_iterations, out=flat.values_numpy())
        output_dir.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), output_dir / "model.pt")
        final_metrics = run_evaluate(user_task, model)

    result = TrainResult(
        job_id=job_id,
        task=spec,
        backend=backend,
        output_dir=output_dir,
        final_metrics=final_metrics,
        iterations=total_iterations,
        epochs=epochs,
        batch_size=batch_size,
        configs=summary["configs"],
        generations=summary["generations"],
        history=summary["history"],
        epoch_metrics=summary["epochs"],
        cost_usd=summary["cost_usd"],
        pricing=summary["pricing"],
        billed_worker_s=summary["billed_worker_s"],
        wall_s=time.monotonic() - started,
        redis=redis_shown,
        object_store=objects.url,
    )
    write_result(output_dir, result.to_dict())
    plot_run(output_dir, result.history, result.epoch_metrics)
    return result


def _task_spec(task: Task | str) -> str:
    if isinstance(task, str):
        return task
    if not isinstance(task, Task):
        raise TaskError(f"train() takes a smlt.Task or 'file.py:ClassName', got {type(task)!r}")
    cls = type(task)
    try:
        path = inspect.getsourcefile(cls)
    except TypeError:
        path = None
    if path is None or "<" in cls.__qualname__:
        raise TaskError(
            f"{cls.__qualname__} must be defined at the top level of a .py file: workers import "
            "it from that file"
        )
    return f"{path}:{cls.__qualname__}"


def _parameter_store(redis_url: str | None, cleanup: ExitStack) -> tuple[ParameterStore, list[str]]:
    """The user's Redis (checked now, so a bad URL fails before any worker starts), or an
    embedded one that lives as long as the run."""
    if redis_url is not None:
        urls = [u.strip() for u in redis_url.split(",") if u.strip()]
        return ParameterStore.from_urls(urls), urls
    server = cleanup.enter_context(RedisServer())
    return ParameterStore.from_urls(server.url), [server.url]


def _delete_job_keys(store: ParameterStore, job_id: str) -> None:
    """Remove a finished job's keys from a Redis we do not own (the model is in model.pt)."""
    pattern = JobKeys(job_id).pattern()
    for client in store.all_clients():
        batch = []
        for key in client.scan_iter(pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.unlink(*batch)
                batch.clear()
        if batch:
            client.unlink(*batch)


@contextmanager
def _ray_session(address: str | None) -> Iterator[None]:
    """Ray for the actors (and the ray backend's workers); shut down if we started it."""
    from smlt.backends.ray_backend import ensure_ray

    started_here = ensure_ray(address)
    try:
        yield
    finally:
        if started_here:
            import ray

            ray.shutdown()


def _run_scheduler(
    backend: str,
    backend_options: dict[str, Any],
    job: JobSpec,
    config: Any,
    progress: ProgressFn | None,
) -> dict[str, Any]:
    """Run the scheduler actor to completion, reporting its status every half second."""
    import ray

    from smlt.actors.launch import launch_scheduler

    actor = launch_scheduler(backend, backend_options, job, config)
    try:
        done = actor.run.remote()
        while True:
            ready, _ = ray.wait([done], timeout=_STATUS_INTERVAL_S)
            if progress is not None:
                progress(ray.get(actor.status.remote(), timeout=30))
            if ready:
                return _unwrap(done)
    finally:
        ray.kill(actor)


def _unwrap(ref: Any) -> dict[str, Any]:
    """The actor's result; its smlt error re-raised as itself, not as a RayTaskError."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        result: dict[str, Any] = ray.get(ref, timeout=60)
        return result
    except RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, BaseException) else None
        if cause is not None:
            raise cause from None
        raise
