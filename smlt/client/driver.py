"""``smlt.train``: the client side of a run, from a task to a trained model and its bill.

1. load and check the task here, before anything is paid for (a bad task fails in seconds);
2. package code and data into the object store (the artifact manager);
3. start (or connect to) the parameter store and publish the initial parameters as version 0;
4. ask the resource manager for workers x memory; start the scheduler actor and follow it;
5. gather the final parameters, save ``model.pt``, evaluate, write ``result.json`` and plots;
6. stop everything it started, whatever happened: no Redis, Ray or worker process outlives
   the call, and nothing is left behind: the job's keys in a user's Redis, the workers' local
   cache of the job, and, after a successful run, the packaged code and data and all but the
   newest checkpoint (``model.pt`` and ``result.json`` hold the result).

Each execution of a run (``train``, every ``resume``, every restart after the embedded Redis was
lost) has a session of its own, a short random token in every Redis key it writes. A resumed run
therefore never reads what a dead driver's run left in a Redis that outlived it (its progress
stream, its generations' stop keys); the sessions are listed in ``run.json``, and a resume deletes
the keys of the earlier ones from the user's Redis before it starts.
"""

from __future__ import annotations

import inspect
import json
import os
import secrets
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import torch

from smlt.actors.resource_manager import (
    GoalSettings,
    Rescale,
    ResourceManager,
    fits_of,
    goal_from_dict,
)
from smlt.actors.scheduler import DEFAULT_EVAL_TIMEOUT_S, JobSpec
from smlt.backends.base import Backend
from smlt.client.artifacts import package_task
from smlt.client.callbacks import Callback, RecordFeed, check_callbacks
from smlt.client.checks import (
    RUN_FILES,
    check_goal,
    check_request,
    check_schedule,
    claim_output,
    warn_about_waste,
)
from smlt.client.goals import (
    calibrate,
    goal_outcome,
    goal_settings,
    refuse_unreachable,
)
from smlt.client.prices import Prices
from smlt.client.record import (
    EPOCH_FIELDS,
    Part,
    RunRecord,
    mark_parts,
    read_status,
    running_driver,
)
from smlt.client.report import plot_run, write_result
from smlt.client.tensorboard import TensorBoardWriter, require_tensorboard, run_log_dir
from smlt.errors import (
    ConfigError,
    ObjectNotFoundError,
    SmltError,
    SmltWarning,
    StoreUnavailableError,
    TaskError,
    TrainingError,
)
from smlt.optimizer.goals import goal_from_options
from smlt.optimizer.problem import Decision
from smlt.protocol.faults import parse_faults
from smlt.protocol.model import FlatModel
from smlt.protocol.payload import check_clip_grad_norm, check_micro_batch
from smlt.protocol.state import (
    Version,
    collect_from_store,
    publish_version,
    restore_checkpoint,
)
from smlt.storage.artifacts import (
    DEFAULT_SHARD_BYTES,
    ArtifactManifest,
    artifact_prefix,
    check_shard_bytes,
    default_cache_dir,
    load_packaged_task,
)
from smlt.storage.checkpoint import Checkpoint, CheckpointStore
from smlt.storage.objects import ObjectStore, open_object_store
from smlt.storage.redis_server import RedisServer, redact_url
from smlt.sync.keys import JobKeys, validate_job_id
from smlt.sync.store import DEFAULT_SHARD_TIMEOUT_S, ParameterStore
from smlt.task import Task, load_task, run_evaluate
from smlt.task import clip_grad_norm as declared_clip_norm
from smlt.worker.handler import remove_cache
from smlt.worker.optim import is_shardable
from smlt.worker.sampler import GlobalBatchSampler
from smlt.worker.schedule import check_schedule_lasts

__all__ = [
    "DEFAULT_HEARTBEAT_TIMEOUT_S",
    "DEFAULT_KEEP_CHECKPOINTS",
    "RunPlan",
    "TrainResult",
    "resume",
    "train",
]

ProgressFn = Callable[[dict[str, Any]], None]
_STATUS_INTERVAL_S = 0.5
#: Set to 1 to run the scheduler on a thread of the driver instead of in a Ray actor.
SCHEDULER_IN_PROCESS_ENV = "SMLT_SCHEDULER_IN_PROCESS"
#: A rank whose heartbeat is this old is declared hung and re-invoked.
DEFAULT_HEARTBEAT_TIMEOUT_S = float(os.environ.get("SMLT_HEARTBEAT_TIMEOUT_S", "15"))
#: How often a lost embedded Redis is replaced before the run gives up.
_REDIS_RESTARTS = 2
#: Committed checkpoints kept while a run goes on (the newest alone is kept once it succeeded).
DEFAULT_KEEP_CHECKPOINTS = 2


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
    checkpoints: list[int] = field(default_factory=list)
    #: The optimizer's class and how the workers run it: "sharded" (each owner steps its
    #: shard, 1/n of the state each) or "replicated" (every worker steps all of it).
    optimizer: dict[str, str] = field(default_factory=dict)
    #: The executions of the driver the run took (``smlt train``, then one per ``smlt resume``):
    #: cost, wall time and billed seconds above are their sums; each entry of the lists above
    #: carries the ``part`` it belongs to.
    parts: list[dict[str, Any]] = field(default_factory=list)
    #: What the run was warned about before it started (a batch cut to the data set, idle
    #: workers).
    warnings: list[str] = field(default_factory=list)
    #: How every step was taken: ``clip_grad_norm`` (the run's, else the task's; None: no
    #: clipping), ``micro_batch`` (None: split only where a slice would not fit), ``precision``.
    training: dict[str, Any] = field(default_factory=dict)
    #: The goal (``--deadline``, ``--budget``, ``--fastest``) and whether the run met it (its
    #: wall time and cost above against the goal); None for fixed workers and memory.
    goal: dict[str, Any] | None = None
    #: How the resource manager chose workers x memory for the goal: every trial configuration
    #: with its measured time per iteration and cost, the decision the run ended with and why,
    #: the fitted model. None for fixed workers and memory.
    search: dict[str, Any] | None = None
    #: The bill by part (workers, store, requests) and the share spent in trials: of the last
    #: part of a resumed run (``cost_usd`` is the whole run's).
    cost: dict[str, float] = field(default_factory=dict)
    #: Iterations in an epoch: ``iterations`` is ``epochs`` of them unless ``max_iterations``
    #: ended the run sooner.
    iterations_per_epoch: int = 0
    #: The input pipeline (:func:`data_summary`): the packaged data set's size and shard layout
    #: (``shard_sizes`` is what :func:`smlt.global_batches` needs to replay the run), what the
    #: workers downloaded, their peak memory, and the data phase's share of the iterations.
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def model_path(self) -> Path:
        return self.output_dir / "model.pt"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["output_dir"] = str(self.output_dir)
        return data


@dataclass(frozen=True)
class RunPlan:
    """What a run is, saved as ``run.json`` in its output folder so ``smlt resume`` can finish
    it after the driver died. Holds no credential: a user's Redis URL is given again.

    ``sessions`` lists the sessions of the run's executions so far, oldest first (the module
    docstring says why); each execution adds its own before it writes any key.
    """

    job_id: str
    task: str
    backend: str
    output_dir: str
    object_store: str
    epochs: int
    batch_size: int
    workers: int | None  # None: chosen for the goal
    memory_mb: int | None
    seed: int
    total_iterations: int
    iterations_per_epoch: int
    num_params: int
    shard_timeout_s: float
    function_timeout_s: float | None
    checkpoint_every: int
    heartbeat_timeout_s: float
    rescales: tuple[tuple[int, int, int | None], ...] = ()
    keep_checkpoints: int = DEFAULT_KEEP_CHECKPOINTS
    #: How the workers train: kept here so that a resumed run trains exactly as it started.
    clip_grad_norm: float | None = None
    micro_batch: int | None = None
    precision: str = "fp32"
    #: Where TensorBoard event files go (``tensorboard/JOB``); a resume goes on writing there.
    tensorboard: str | None = None
    sessions: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    #: The goal (``Goal.to_dict()``; None: fixed workers and memory), the search's knobs, and
    #: the calibration (seconds per sample on one thread): a resumed run pursues the same goal
    #: with the same model, and goes on with the trials its checkpoint carries.
    goal: dict[str, Any] | None = None
    max_trials: int | None = None
    trial_iterations: int | None = None
    s_per_sample: float | None = None
    optimizer_state_shards: int = 0
    #: What the run is billed at beyond the backend's own prices (:class:`Prices`' dict).
    prices: dict[str, Any] | None = None

    def save(self) -> None:
        path = Path(self.output_dir) / "run.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, run_dir: Path) -> RunPlan:
        path = Path(run_dir) / "run.json"
        if not path.is_file():
            raise ConfigError(f"{run_dir} is not an smlt run folder: it has no run.json")
        try:
            data = json.loads(path.read_text())
            data["rescales"] = tuple(tuple(r) for r in data.get("rescales", ()))
            data["sessions"] = tuple(data.get("sessions", ()))
            data["warnings"] = tuple(data.get("warnings", ()))
            return cls(**data)
        except (ValueError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{path} is not a run.json that smlt wrote: {exc}") from None


def train(
    task: Task | str,
    *,
    epochs: int = 1,
    batch_size: int = 256,
    workers: int | None = None,
    memory_mb: int | None = None,
    backend: str = "ray",
    seed: int = 0,
    output: str | Path | None = None,
    redis_url: str | None = None,
    object_store: str | None = None,
    ray_address: str | None = None,
    shard_timeout_s: float = DEFAULT_SHARD_TIMEOUT_S,
    function_timeout_s: float | None = None,
    checkpoint_every: int | None = None,
    heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S,
    rescales: tuple[tuple[int, int, int | None], ...] = (),
    keep_checkpoints: int = DEFAULT_KEEP_CHECKPOINTS,
    clip_grad_norm: float | None = None,
    micro_batch: int | None = None,
    precision: str = "fp32",
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    callbacks: Sequence[Callback] = (),
    tensorboard: str | Path | None = None,
    deadline: str | float | None = None,
    budget: str | float | None = None,
    fastest: bool = False,
    max_trials: int | None = None,
    trial_iterations: int | None = None,
    max_iterations: int | None = None,
    node_usd_per_hour: float | None = None,
    node_vcpus: float | None = None,
    node_memory_mb: float | None = None,
    store_usd_per_hour: float | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> TrainResult:
    """Train ``task`` data-parallel on ``workers`` stateless workers; see the README.

    ``task`` is a :class:`Task` instance or ``"path/to/file.py:ClassName"``. Checkpoints go to
    the object store every ``checkpoint_every`` iterations (default: every epoch) and at every
    generation boundary; at most ``keep_checkpoints`` committed ones are kept while it runs, and
    the newest alone once it succeeded. ``clip_grad_norm`` overrides the task's
    :attr:`~smlt.Task.clip_grad_norm`; ``micro_batch`` makes each worker go through its slice of
    the global batch that many samples at a time (default: only where the slice would not fit
    the worker's memory); ``precision="bf16"`` runs the forward pass under bfloat16 autocast. An
    ``output`` folder that holds another run is refused unless ``overwrite``. Everything that
    can be checked without Ray or Redis is checked before either starts; ``run.json`` is written
    only once the run starts, so a run refused before then leaves no file. Raises a
    :class:`~smlt.errors.SmltError` subclass naming what went wrong; warns
    (:class:`~smlt.errors.SmltWarning`) about a configuration that runs but wastes.

    ``callbacks`` (:class:`~smlt.Callback` instances) get the run's records as they happen
    (:mod:`smlt.client.callbacks`); ``tensorboard`` is a folder for TensorBoard event files,
    written to ``tensorboard/JOB`` (:mod:`smlt.client.tensorboard`).

    Instead of fixed ``workers`` (default 1) and ``memory_mb``, give a goal: ``deadline``
    (``"30m"``, or seconds), ``budget`` (``"0.50"``, or US dollars) or ``fastest``. The resource
    manager then chooses workers x memory with trials that are part of the training (at most
    ``max_trials`` of ``trial_iterations`` iterations each); ``workers`` or ``memory_mb``, if
    also given, are fixed and only the other is searched. A goal no configuration can meet is
    refused (:class:`~smlt.errors.InfeasibleGoalError`, naming the cheapest cost and the
    fastest time in reach) before any worker starts.

    ``max_iterations`` ends the run after that many iterations even if ``epochs`` would go on:
    a smoke test, or a trial of ``smlt plan --backend ray`` (the iterations are the run's first,
    in the order the full run would train them).

    ``node_usd_per_hour`` (Ray only) bills the workers by the node-hour instead of like Lambda,
    on nodes of ``node_vcpus`` and ``node_memory_mb`` (default: this machine's);
    ``store_usd_per_hour`` bills the parameter store's host (:mod:`smlt.client.prices`).

    ``shard_bytes`` is the most bytes of samples in one data shard (default 64 MiB): workers
    download and prefetch whole shards, so smaller ones mean finer regions per worker and
    smaller downloads ahead, larger ones fewer requests.
    """
    began_unix_s = time.time()
    check_shard_bytes(shard_bytes)  # before anything starts, not when packaging
    spec = _task_spec(task)
    goal = goal_from_options(
        deadline=None if deadline is None else str(deadline),
        budget=None if budget is None else str(budget),
        fastest=fastest,
    )
    check_goal(goal, rescales=rescales, max_trials=max_trials, trial_iterations=trial_iterations)
    if goal is None and workers is None:
        workers = 1
    _redis_urls(redis_url)
    prices = Prices.checked(
        backend,
        node_usd_per_hour=node_usd_per_hour,
        node_vcpus=node_vcpus,
        node_memory_mb=node_memory_mb,
        store_usd_per_hour=store_usd_per_hour,
    )
    backend_options = _backend_options(backend, ray_address, prices)
    check_request(
        backend,
        backend_options=backend_options,
        epochs=epochs,
        batch_size=batch_size,
        workers=workers,
        memory_mb=memory_mb,
        function_timeout_s=function_timeout_s,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints,
        rescales=rescales,
        clip_grad_norm=clip_grad_norm,
        micro_batch=micro_batch,
        precision=precision,
        max_iterations=max_iterations,
    )
    faults = _faults()
    callbacks = check_callbacks(callbacks)
    if tensorboard is not None:
        tensorboard = require_tensorboard(tensorboard)
    user_task = load_task(spec)
    class_name = type(user_task).__name__
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    job_id = f"{class_name.lower()}-{stamp}-{secrets.token_hex(3)}"
    output_dir = (Path(output) if output is not None else Path("runs") / job_id).resolve()
    claim_output(output_dir, overwrite=overwrite)
    _check_redis(redis_url)  # before anything is written to the object store
    objects = open_object_store(object_store)
    manifest = package_task(spec, objects, job_id, shard_bytes, precision=precision)
    try:
        sampler = GlobalBatchSampler(manifest.num_samples, batch_size, seed)
        total_iterations = epochs * sampler.iterations_per_epoch
        if max_iterations is not None:  # a smoke test, or a trial of smlt plan --backend ray
            total_iterations = min(total_iterations, max_iterations)
        check_schedule(rescales, total_iterations)
        check_schedule_lasts(
            user_task,
            iterations=total_iterations,
            iterations_per_epoch=sampler.iterations_per_epoch,
            seed=seed,
        )
        warned = warn_about_waste(
            manifest.num_samples, batch_size, sampler.batch_size, workers, rescales
        )
        torch.manual_seed(seed)
        initial = Version.initial(FlatModel(user_task.model()))
        calibration = None
        if goal is not None:
            calibration = calibrate(user_task, sampler.batch_size, seed)
    except BaseException:
        objects.delete_prefix(artifact_prefix(job_id))  # the run never started
        raise
    file, _, name = spec.rpartition(":")
    plan = RunPlan(
        job_id=job_id,
        task=f"{Path(file).expanduser().resolve()}:{name}",
        backend=backend,
        output_dir=str(output_dir),
        object_store=objects.url,
        epochs=epochs,
        batch_size=sampler.batch_size,
        workers=workers,
        memory_mb=memory_mb,
        seed=seed,
        total_iterations=total_iterations,
        iterations_per_epoch=sampler.iterations_per_epoch,
        num_params=initial.values.size,
        shard_timeout_s=shard_timeout_s,
        function_timeout_s=function_timeout_s,
        checkpoint_every=checkpoint_every
        if checkpoint_every is not None
        else sampler.iterations_per_epoch,
        heartbeat_timeout_s=heartbeat_timeout_s,
        rescales=tuple(rescales),
        keep_checkpoints=keep_checkpoints,
        # As checked: a numpy integer or a float 1e-1 must not reach run.json as such.
        clip_grad_norm=check_clip_grad_norm(clip_grad_norm),
        micro_batch=check_micro_batch(micro_batch),
        precision=precision,
        tensorboard=str(tensorboard.resolve()) if tensorboard is not None else None,
        warnings=tuple(warned),
        goal=None if goal is None else goal.to_dict(),
        max_trials=max_trials,
        trial_iterations=trial_iterations,
        s_per_sample=calibration.s_per_sample if calibration is not None else None,
        optimizer_state_shards=calibration.optimizer_state_shards if calibration else 0,
        prices=prices.to_dict(),
    )
    if goal is not None:
        try:  # before Ray starts: a goal out of reach on any cluster
            from smlt.backends import get_backend

            target = get_backend(backend, **backend_options)
            settings = goal_settings(plan, target.pricing, started_unix_s=began_unix_s)
            assert settings is not None
            refuse_unreachable(
                settings, target.memory_range_mb(), workers=workers, memory_mb=memory_mb
            )
        except BaseException:
            objects.delete_prefix(artifact_prefix(job_id))  # the run never started
            raise
    return _execute(
        plan,
        user_task,
        initial,
        redis_url,
        ray_address,
        faults,
        progress,
        overwrite=overwrite,
        callbacks=callbacks,
        tensorboard=tensorboard,
    )


def resume(
    run_dir: str | Path,
    *,
    redis_url: str | None = None,
    ray_address: str | None = None,
    progress: ProgressFn | None = None,
    callbacks: Sequence[Callback] = (),
    tensorboard: str | Path | None = None,
) -> TrainResult:
    """Finish a run whose driver died, from its last committed checkpoint.

    The task is the one packaged for the run (the code its workers ran, even if the user's file
    changed since or is not where it was), and ``run_dir`` is the run's folder wherever it is
    now: nothing depends on the current folder. ``callbacks`` get the records from the
    checkpoint on. TensorBoard events go on in the folder the run's ``train`` had (or in
    ``tensorboard`` if given), none written twice.
    """
    _redis_urls(redis_url)
    callbacks = check_callbacks(callbacks)
    if tensorboard is not None:
        tensorboard = require_tensorboard(tensorboard)
    plan = RunPlan.load(Path(run_dir))  # its errors name the folder as the user gave it
    run_dir = Path(run_dir).resolve()
    plan = replace(plan, output_dir=str(run_dir))
    if tensorboard is None and plan.tensorboard is not None:
        tensorboard = require_tensorboard(plan.tensorboard)
    status = read_status(run_dir) or {}
    pid = running_driver(status)
    if pid is not None:  # two drivers of one run would both pay workers for the same steps
        raise ConfigError(
            f"run {plan.job_id} is still running (its driver, pid {pid}, wrote "
            f"{run_dir / 'status.json'} at {status.get('updated_at')}): stop it first "
            "(Ctrl-C or kill PID), then resume"
        )
    if status.get("state") == "finished":
        raise ConfigError(
            f"run {plan.job_id} finished ({status.get('updated_at')}): nothing to resume; its "
            f"result is in {run_dir / 'result.json'}"
        )
    objects = open_object_store(plan.object_store)
    if CheckpointStore(objects, plan.job_id).latest() is None:
        raise ConfigError(
            f"run {plan.job_id} has no committed checkpoint in {plan.object_store}: "
            "nothing to resume from; start it again with smlt train"
        )
    user_task = _packaged_task(objects, plan.job_id)
    _check_redis(redis_url)
    return _execute(
        plan,
        user_task,
        None,
        redis_url,
        ray_address,
        _faults(),
        progress,
        callbacks=callbacks,
        tensorboard=tensorboard,
    )


def _packaged_task(objects: ObjectStore, job_id: str) -> Task:
    """The task as it was packaged for ``job_id``: the source the workers import."""
    try:
        manifest = ArtifactManifest.load(objects, job_id)
    except ObjectNotFoundError:
        raise ConfigError(
            f"the packaged code and data of run {job_id} are gone from {objects.url} (removed "
            "by smlt clean?): the run cannot be resumed; start it again with smlt train"
        ) from None
    return load_packaged_task(objects, manifest, default_cache_dir(job_id))


def _execute(
    plan: RunPlan,
    user_task: Task,
    initial: Version | None,
    redis_url: str | None,
    ray_address: str | None,
    faults: str,
    progress: ProgressFn | None,
    *,
    overwrite: bool = False,
    callbacks: Sequence[Callback] = (),
    tensorboard: Path | None = None,
) -> TrainResult:
    """Run ``plan`` from ``initial`` parameters (a new run), or from its latest checkpoint if
    None (a resume).

    The run *starts* once Ray is up and the backend holds the configuration: only then is the
    output folder written (``run.json``, then ``status.json``). A new run refused before that
    leaves nothing: its packaged code and data are deleted again.

    If an embedded Redis dies mid-run, a fresh one is started and the run continues from the
    latest checkpoint (at most ``_REDIS_RESTARTS`` times): Redis holds only what a checkpoint
    and a few recomputed iterations restore.
    """
    started = time.monotonic()
    # What a deadline counts from: the origin of the wall time result.json reports.
    began_unix_s = time.time()
    objects = open_object_store(plan.object_store)
    checkpoints = CheckpointStore(objects, plan.job_id)
    output_dir = Path(plan.output_dir)
    recoveries: list[dict[str, Any]] = []
    record: RunRecord | None = None
    feed: RecordFeed | None = None
    try:
        with ExitStack() as cleanup:
            from smlt.backends import get_backend  # imports Ray: after the fast checks

            backend_options = _backend_options(
                plan.backend, ray_address, Prices.from_dict(plan.prices)
            )
            cleanup.enter_context(_ray_session(ray_address))
            # Where workers on this machine (a local Ray) cached the job's code and data; the
            # run's end, successful or not, is the last time anyone needs it.
            cleanup.callback(remove_cache, plan.job_id)
            probe = get_backend(plan.backend, **backend_options)
            latest = checkpoints.latest() if initial is None else None
            first = latest.iteration if latest is not None else 0
            decided = _check_capacity(
                plan, probe, first, _goal(plan, probe, None, began_unix_s, latest)
            )
            record = _start(plan, initial is None, first, overwrite)
            if latest is not None:
                record.last_checkpoint = latest.iteration
            feed = live = _record_feed(plan, first, callbacks, tensorboard)
            report = _reporter(plan, record, progress, started, live)
            restarts = 0
            from_checkpoint = initial is None
            while True:
                with ExitStack() as redis_scope:
                    store, redis_urls = _parameter_store(redis_url, redis_scope)
                    earlier = plan.sessions
                    plan = replace(plan, sessions=(*earlier, _new_session()))
                    plan.save()  # before any key of the session is written
                    keys = JobKeys(plan.job_id, plan.sessions[-1])
                    if redis_url is not None:
                        # Their driver is dead; a Redis we do not own keeps their keys otherwise.
                        _delete_session_keys(store, plan.job_id, earlier)
                        redis_scope.callback(
                            _delete_session_keys, store, plan.job_id, plan.sessions
                        )
                    latest = checkpoints.latest() if from_checkpoint else None
                    start = latest.iteration if latest is not None else 0
                    goal = _goal(plan, probe, record, began_unix_s, latest)
                    if goal is not None:
                        goal = replace(goal, decided=decided)  # for the same start only
                    manager = _manager(plan, probe, goal)
                    config = manager.initial(start)
                    if latest is not None:
                        restore_checkpoint(store, keys, latest, config.workers)
                    elif initial is not None:
                        publish_version(store, keys, 0, initial, config.workers)
                    else:
                        raise ConfigError(
                            f"run {plan.job_id} has no committed checkpoint to resume"
                        )
                    job = _job_spec(plan, keys.session, redis_urls, start, faults, latest)
                    try:
                        summary = _run_scheduler(
                            plan.backend,
                            backend_options,
                            job,
                            manager,
                            report,
                            history_from=lambda: live.next_iteration,
                        )
                    except (TrainingError, StoreUnavailableError) as exc:
                        if not _store_lost(exc, redis_url) or restarts >= _REDIS_RESTARTS:
                            raise
                        restarts += 1
                        recoveries.append({"cause": str(exc), "at_s": time.monotonic() - started})
                        from_checkpoint = True  # continue from the latest checkpoint, if any
                        continue
                    final_workers = summary["configs"][-1]["workers"]
                    final = collect_from_store(
                        store, keys, plan.total_iterations, final_workers, plan.num_params
                    )
                    break
            torch.manual_seed(plan.seed)  # as the workers build it
            model = user_task.model()
            flat = FlatModel(model)
            flat.values_numpy()[:] = final.values
            flat.load_discrete(final.buffers)
            torch.save(model.state_dict(), output_dir / "model.pt")
            final_metrics = _final_metrics(summary["epochs"], plan.total_iterations)
            if final_metrics is None:
                # No evaluate(), or it failed in the scheduler (reported among the failures).
                failed = any("evaluation" in f for f in summary["failures"])
                final_metrics = {} if failed else run_evaluate(user_task, model)
    except BaseException as exc:
        if record is None:
            if initial is not None:  # a new run refused before it started: leave no trace
                objects.delete_prefix(artifact_prefix(plan.job_id))
        else:
            state = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            with suppress(Exception):  # the store knows better than the last status we saw
                newest = checkpoints.latest()
                if newest is not None:
                    record.checkpointed(newest.iteration)
            record.end(state, time.monotonic() - started, error=str(exc) or type(exc).__name__)
        if feed is not None:
            feed.fail(exc)
        raise

    summary["failures"] = summary["failures"] + [{"store_lost": r} for r in recoveries]
    record.end("finished", time.monotonic() - started, summary=summary)
    whole = record.merged(summary)
    data = data_summary(ArtifactManifest.load(objects, plan.job_id), whole["history"])
    run_warnings = list(plan.warnings)
    for message in data_warnings(data):
        warnings.warn(message, SmltWarning, stacklevel=2)
        run_warnings.append(message)
    result = TrainResult(
        job_id=plan.job_id,
        task=plan.task,
        backend=plan.backend,
        output_dir=output_dir,
        final_metrics=final_metrics,
        iterations=plan.total_iterations,
        epochs=plan.epochs,
        batch_size=plan.batch_size,
        configs=whole["configs"],
        generations=whole["generations"],
        history=whole["history"],
        epoch_metrics=whole["epochs"],
        cost_usd=record.cost_usd,
        pricing=summary["pricing"],
        billed_worker_s=record.billed_worker_s,
        wall_s=record.wall_s,
        redis=",".join(redact_url(u) for u in redis_urls),
        object_store=objects.url,
        failures=whole["failures"],
        checkpoints=summary["checkpoints"],
        optimizer=_optimizer_mode(user_task),
        parts=[_part_summary(p) for p in record.parts],
        warnings=run_warnings,
        training={
            "clip_grad_norm": plan.clip_grad_norm
            if plan.clip_grad_norm is not None
            else declared_clip_norm(user_task),
            "micro_batch": plan.micro_batch,
            "precision": plan.precision,
        },
        goal=None
        if plan.goal is None
        else goal_outcome(goal_from_dict(plan.goal), record.wall_s, record.cost_usd),
        search=summary.get("search"),
        cost=summary.get("cost", {}),
        iterations_per_epoch=plan.iterations_per_epoch,
        data=data,
    )
    write_result(output_dir, result.to_dict())
    plot_run(output_dir, result.history, result.epoch_metrics)
    try:
        _remove_finished_job(objects, checkpoints, plan.job_id)
    except SmltError as exc:  # the model is saved: a leftover costs storage, not the result
        result.failures.append({"cleanup": str(exc)})
        write_result(output_dir, result.to_dict())
    feed.finish(result)
    return result


def _manager(plan: RunPlan, backend: Backend, goal: GoalSettings | None = None) -> ResourceManager:
    return ResourceManager(
        backend.limits,
        workers=plan.workers,
        memory_mb=plan.memory_mb,
        fit_memory_mb=backend.default_memory_mb,
        rescales=tuple(Rescale(*r) for r in plan.rescales),
        goal=goal,
        fits=fits_of(backend) if goal is not None else None,
    )


def _goal(
    plan: RunPlan,
    backend: Backend,
    record: RunRecord | None,
    began_unix_s: float,
    latest: Checkpoint | None,
) -> GoalSettings | None:
    """The manager's goal settings for this execution: a deadline and a budget are for the
    whole run, so a resumed run counts its earlier parts' wall time and cost, and goes on with
    the trials its checkpoint carries."""
    earlier = record.parts[:-1] if record is not None else []
    return goal_settings(
        plan,
        backend.pricing,
        started_unix_s=began_unix_s - sum(p.wall_s for p in earlier),
        spent_before_usd=sum(p.cost_usd or 0.0 for p in earlier),
        trials=latest.meta.get("trials", ()) if latest is not None else (),
    )


def _check_capacity(
    plan: RunPlan, backend: Backend, first: int, goal: GoalSettings | None = None
) -> tuple[int, Decision] | None:
    """Refuse, before the run starts, a configuration the backend cannot hold: the first one
    and every scheduled re-scale whose memory is known (without one, smlt picks what fits);
    and a goal that no configuration the cluster holds can meet. Returns the goal's first
    decision (the run starts with it rather than plan the same thing again), if any."""
    manager = _manager(plan, backend, goal)
    config = manager.initial(first)
    backend.check_fits(config.workers, config.memory_mb)
    for at, workers, memory_mb in plan.rescales:
        memory_mb = memory_mb or plan.memory_mb
        if at > first and memory_mb is not None:
            backend.check_fits(workers, memory_mb)
    checked = manager.settings()["goal"]
    return checked.decided if isinstance(checked, GoalSettings) else None


def _start(plan: RunPlan, resumed: bool, first: int, overwrite: bool) -> RunRecord:
    """The run starts: its folder is written (what another run left there removed first, if
    the user said ``overwrite``) and a new part begins in its record."""
    output_dir = Path(plan.output_dir)
    if overwrite and not resumed:
        for name in RUN_FILES:
            (output_dir / name).unlink(missing_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    plan.save()
    return RunRecord.begin(
        output_dir,
        job_id=plan.job_id,
        task=plan.task,
        total_iterations=plan.total_iterations,
        iterations_per_epoch=plan.iterations_per_epoch,
        command="resume" if resumed else "train",
        from_iteration=first,
    )


def _record_feed(
    plan: RunPlan, first: int, callbacks: Sequence[Callback], tensorboard: Path | None
) -> RecordFeed:
    """This call's callbacks, the TensorBoard writer first: it has written an iteration before
    a callback after it can stop the run there."""
    writers = (
        [] if tensorboard is None else [TensorBoardWriter(run_log_dir(tensorboard, plan.job_id))]
    )
    return RecordFeed(
        [*writers, *callbacks],
        first_iteration=first,
        iterations_per_epoch=plan.iterations_per_epoch,
        run_dir=plan.output_dir,
    )


def _reporter(
    plan: RunPlan,
    record: RunRecord,
    progress: ProgressFn | None,
    started: float,
    feed: RecordFeed,
) -> ProgressFn:
    """The scheduler's status, as the whole run's, to ``status.json``, to the callbacks (the
    history entries it brought, as ``result.json`` will have them) and to ``progress``."""
    starts = [p.from_iteration for p in record.parts]

    def report(status: dict[str, Any]) -> None:
        record.update(status, time.monotonic() - started)
        epochs = mark_parts(status.get("epochs", []), starts)
        feed.deliver(record.run_history(status.pop("history", [])), epochs, record.cost_usd)
        whole = {
            **status,
            "job_id": plan.job_id,
            "output_dir": plan.output_dir,
            "part": record.current.part,
            "last_checkpoint": record.last_checkpoint,
            "cost_usd": record.cost_usd,
            "epochs": epochs,
        }
        if progress is not None:
            progress(whole)

    return report


def _part_summary(part: Part) -> dict[str, Any]:
    """A part as ``result.json`` lists it: its own figures, without its lists (its generations,
    failures and epochs are in the run's lists, marked with the part)."""
    return {k: v for k, v in asdict(part).items() if not isinstance(v, list)}


#: Above this share of the iterations' time in the data phase, a run is told that its input
#: pipeline, not its model, sets its speed (and its bill)...
DATA_SHARE_WARNING = 0.5
#: ...if the phase is slow enough to matter: a toy model's 2 ms of data beside 1 ms of compute
#: is not worth a word.
DATA_WARNING_MIN_S = 0.02


def data_summary(manifest: ArtifactManifest, history: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's input pipeline in numbers, from the manifest and the workers' reports: shard
    loads and bytes downloaded summed over the workers (the prefetcher's included), the largest
    peak resident memory a worker reported, and the data phase's share of the iterations
    (the slowest rank's ``data_s`` over the slowest rank's ``iter_s``, summed over the run)."""
    data_s = sum(float(h.get("data_s", 0.0)) for h in history)
    iter_s = sum(float(h.get("iter_s", 0.0)) for h in history)
    rss = [float(h["worker_rss_mb"]) for h in history if "worker_rss_mb" in h]
    return {
        "samples": manifest.num_samples,
        "bytes": manifest.total_bytes,
        "shards": len(manifest.shards),
        "shard_sizes": manifest.shard_sizes,
        "shard_loads": int(sum(h.get("shard_loads", 0) for h in history)),
        "bytes_downloaded": int(sum(h.get("data_bytes", 0) for h in history)),
        "worker_peak_rss_mb": max(rss) if rss else None,
        # How far a worker's disk cache fell short of what its sample order reads at once.
        "cache_short_mb": max((float(h.get("cache_short_mb", 0.0)) for h in history), default=0.0),
        "data_s": data_s,
        "iterations": len(history),
        "data_share": data_s / iter_s if iter_s > 0 else 0.0,
    }


def data_warnings(data: dict[str, Any]) -> list[str]:
    """What a run is told about its input pipeline: a data phase that dominates the iterations
    (and takes at least :data:`DATA_WARNING_MIN_S` an iteration), and a disk cache too small for
    the shards a worker reads at once."""
    told = []
    per_iteration_s = data["data_s"] / max(data["iterations"], 1)
    if data["data_share"] > DATA_SHARE_WARNING and per_iteration_s >= DATA_WARNING_MIN_S:
        told.append(
            f"the data phase took {data['data_share']:.0%} of the iterations' time: the input "
            "pipeline, not the model, sets this run's speed. Give each worker more memory (more "
            "network and CPU on Lambda), a larger batch per worker, or a cheaper transform(); "
            f"the workers downloaded {data['bytes_downloaded'] / 2**20:.0f} MiB in "
            f"{data['shard_loads']} shard loads."
        )
    if data.get("cache_short_mb", 0) > 0:
        told.append(
            f"a worker's disk cache held {data['cache_short_mb']:.0f} MiB less than twice the "
            "shards its sample order reads at once, so shards were evicted while still in use "
            "and downloaded again: give the workers more disk (Lambda: ephemeral_storage_mb), "
            "smaller shards (--shard-mb) or more workers (each reads fewer at once)."
        )
    return told


def _remove_finished_job(objects: ObjectStore, checkpoints: CheckpointStore, job_id: str) -> None:
    """After a successful run: delete the packaged code and data, and every checkpoint but the
    final one (the whole final state, optimizer included, which model.pt does not hold)."""
    objects.delete_prefix(artifact_prefix(job_id))
    checkpoints.prune(keep=1)


def _new_session() -> str:
    """A fresh session token: 8 hex digits, a valid key component."""
    return validate_job_id(secrets.token_hex(4))


def _optimizer_mode(task: Task) -> dict[str, str]:
    """How the workers run the task's optimizer, for the summary: a replicated optimizer costs
    n times its state's memory, which a user of a subclass may not expect."""
    torch.manual_seed(0)
    model = task.model()
    FlatModel(model)  # as workers build it: the optimizer sees the re-pointed parameters
    optimizer = task.optimizer(model)
    sharded = is_shardable(optimizer)
    return {
        "class": type(optimizer).__name__,
        "mode": "sharded" if sharded else "replicated",
        "why": "elementwise: each owner steps its shard"
        if sharded
        else "not one of smlt's elementwise classes (a subclass may look across elements): "
        "every worker steps all of it",
    }


def _final_metrics(epochs: list[dict[str, Any]], total_iterations: int) -> dict[str, float] | None:
    """The metrics the scheduler's evaluator gave the final version (the last epoch's), if any;
    evaluating the final model again here would cost one more pass over the held-out set."""
    if not epochs or epochs[-1]["iteration"] != total_iterations - 1:
        return None
    metrics = {k: v for k, v in epochs[-1].items() if k not in EPOCH_FIELDS}
    return metrics or None


def _job_spec(
    plan: RunPlan,
    session: str,
    redis_urls: list[str],
    start: int,
    faults: str,
    latest: Checkpoint | None,
) -> JobSpec:
    meta = latest.meta if latest is not None else {}
    return JobSpec(
        job_id=plan.job_id,
        session=session,
        redis_urls=tuple(redis_urls),
        object_store_url=plan.object_store,
        batch_size=plan.batch_size,
        total_iterations=plan.total_iterations,
        iterations_per_epoch=plan.iterations_per_epoch,
        num_params=plan.num_params,
        seed=plan.seed,
        start_iteration=start,
        shard_timeout_s=plan.shard_timeout_s,
        function_timeout_s=plan.function_timeout_s,
        checkpoint_every=plan.checkpoint_every,
        keep_checkpoints=plan.keep_checkpoints,
        eval_timeout_s=float(os.environ.get("SMLT_EVAL_TIMEOUT_S", str(DEFAULT_EVAL_TIMEOUT_S))),
        heartbeat_timeout_s=plan.heartbeat_timeout_s,
        faults=faults,
        history=tuple(meta.get("history", ())),
        epochs=tuple(meta.get("epochs", ())),
        training=training_options(plan),
        store_usd_per_hour=Prices.from_dict(plan.prices).store_usd_per_hour,
    )


def _backend_options(backend: str, ray_address: str | None, prices: Prices) -> dict[str, Any]:
    """What the backend is built with: the Ray cluster's address and the prices it bills at."""
    if backend != "ray":
        return {}
    return {"address": ray_address, **prices.backend_options()}


def training_options(plan: RunPlan) -> dict[str, Any]:
    """What every worker of the run applies to each step, as ``WorkerPayload.options`` carries
    it (only what the user set: a worker's defaults are the task's)."""
    options: dict[str, Any] = {"precision": plan.precision}
    if plan.clip_grad_norm is not None:
        options["clip_grad_norm"] = plan.clip_grad_norm
    if plan.micro_batch is not None:
        options["micro_batch"] = plan.micro_batch
    return options


def _faults() -> str:
    """``SMLT_FAULTS``, checked here so a typo fails before anything starts."""
    text = os.environ.get("SMLT_FAULTS", "")
    parse_faults(text)
    return text


def _store_lost(exc: BaseException, redis_url: str | None) -> bool:
    """True if the run failed because the embedded Redis went away (we can restart that one;
    a user's Redis is the user's to restart)."""
    if redis_url is not None:
        return False
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, StoreUnavailableError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


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
        urls = _redis_urls(redis_url)
        return ParameterStore.from_urls(urls), urls
    server = cleanup.enter_context(RedisServer())
    return ParameterStore.from_urls(server.url), [server.url]


def _check_redis(redis_url: str | None) -> None:
    """Connect to the user's Redis once, so that a wrong URL or password fails in seconds,
    before a task is packaged or Ray is started for a run that cannot go on."""
    if redis_url is not None:
        for client in ParameterStore.from_urls(_redis_urls(redis_url)).all_clients():
            client.close()


def _redis_urls(redis_url: str | None) -> list[str]:
    """The URLs of ``--redis-url`` (comma-separated), checked before anything starts.

    A password must be in a URL's userinfo, where smlt redacts it in everything it prints or
    writes (:func:`~smlt.storage.redis_server.redact_url`). redis-py also takes one as
    ``?password=``, which no redaction covers, so such a URL is refused, without echoing it.
    """
    if redis_url is None:
        return []
    urls = [u.strip() for u in redis_url.split(",") if u.strip()]
    if not urls:
        raise ConfigError("--redis-url (or SMLT_REDIS_URL) is empty: give redis://host:port/db")
    for url in urls:
        try:
            query = urlsplit(url).query
        except ValueError:  # the message would quote the URL
            raise ConfigError("a --redis-url (or SMLT_REDIS_URL) is not a valid URL") from None
        fields = {name.lower() for name in parse_qs(query, keep_blank_values=True)}
        if fields & {"password", "username"}:
            raise ConfigError(
                "a --redis-url (or SMLT_REDIS_URL) has credentials in its query string; give "
                "them as redis://:PASSWORD@host:port/db (or redis://USER:PASSWORD@...), which "
                "smlt never prints or writes"
            )
    return urls


def _delete_session_keys(store: ParameterStore, job_id: str, sessions: tuple[str, ...]) -> None:
    """Remove the keys of ``sessions`` of a job from a Redis we do not own: when the run ends
    (the model is in model.pt), and a dead driver's when a resume starts."""
    for session in sessions:
        pattern = JobKeys(job_id, session).pattern()
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
    manager: ResourceManager,
    progress: ProgressFn | None,
    history_from: Callable[[], int] | None = None,
) -> dict[str, Any]:
    """Run the scheduler to completion, reporting its status every half second (with the
    history entries from ``history_from()`` on, when given).

    It runs in a Ray actor, so that on a cluster the job's control loop does not depend on the
    driver's machine; with ``SMLT_SCHEDULER_IN_PROCESS=1`` it runs on a thread of this process
    instead (a debugging aid, and what the test suite uses to avoid an actor start per run).
    """
    if os.environ.get(SCHEDULER_IN_PROCESS_ENV, "") == "1":
        return _run_scheduler_here(backend, backend_options, job, manager, progress, history_from)
    import ray

    from smlt.actors.launch import launch_scheduler

    actor = launch_scheduler(backend, backend_options, job, manager)
    try:
        done = actor.run.remote()
        while True:
            ready, _ = ray.wait([done], timeout=_STATUS_INTERVAL_S)
            if progress is not None:
                since = history_from() if history_from is not None else None
                progress(ray.get(actor.status.remote(since), timeout=30))
            if ready:
                return _unwrap(done)
    finally:
        ray.kill(actor)


def _run_scheduler_here(
    backend: str,
    backend_options: dict[str, Any],
    job: JobSpec,
    manager: ResourceManager,
    progress: ProgressFn | None,
    history_from: Callable[[], int] | None = None,
) -> dict[str, Any]:
    from smlt.actors.launch import SchedulerHost

    host = SchedulerHost(backend, backend_options, job, manager.settings())
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = host.run()
        except BaseException as exc:  # re-raised on the driver's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="smlt-scheduler", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(_STATUS_INTERVAL_S)
        if progress is not None:
            progress(host.status(history_from() if history_from is not None else None))
    if "error" in outcome:
        raise outcome["error"]
    result: dict[str, Any] = outcome["result"]
    return result


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
