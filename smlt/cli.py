"""The ``smlt`` command line: ``smlt train TASK ...``, ``smlt resume RUN_DIR``, ``smlt runs``,
``smlt clean``, ``smlt emulator``.

Errors that smlt raises on purpose (bad task, unreachable Redis, a configuration that does not
fit) print as one paragraph and exit with status 2; anything else is a bug and keeps its
traceback. No credential is ever printed: Redis URLs appear as ``redis://:***@host:port``.

A run stopped by Ctrl-C or SIGTERM stops its workers, says in one line whether it can be resumed
(and with which command), and exits with 130 or 143, as a shell reports those signals.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import FrameType, TracebackType
from typing import Annotated, Any, TypedDict

import typer
from rich import box
from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from smlt.client.checks import check_goal, check_request
from smlt.client.record import EPOCH_FIELDS
from smlt.client.runs import RunInfo, list_runs, read_run
from smlt.errors import ConfigError, ObjectStoreError, SmltError, SmltWarning
from smlt.optimizer.goals import goal_from_options
from smlt.storage.objects import LocalObjectStore, ObjectStore, S3ObjectStore, open_object_store

__all__ = ["app", "main", "parse_duration"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train PyTorch models data-parallel on serverless functions.",
)
console = Console(stderr=True)
# Fields of an epoch entry that are not the task's own metrics.
_EPOCH_FIELDS = EPOCH_FIELDS

# What a run is billed at (smlt.client.prices): the same four options on train and plan.
NodeUsdPerHour = Annotated[
    float | None,
    typer.Option(
        help="ray: bill the workers by the node-hour at this price instead of like Lambda "
        "(each pays the share of a node it holds)"
    ),
]
NodeVcpus = Annotated[
    float | None,
    typer.Option(help="with --node-usd-per-hour: vCPUs of a node (default: this machine's)"),
]
NodeMemoryMb = Annotated[
    float | None,
    typer.Option(help="with --node-usd-per-hour: memory of a node (default: this machine's)"),
]
StoreUsdPerHour = Annotated[
    float | None,
    typer.Option(
        help="bill the parameter store's host at this price per hour (default 0: the "
        "embedded Redis runs on this machine)"
    ),
]


ShardMb = Annotated[
    float | None,
    typer.Option(
        help="MiB of samples per data shard (default 64); workers download and prefetch whole "
        "shards, so smaller ones give finer regions and smaller downloads ahead"
    ),
]


class _ShardBytes(TypedDict, total=False):
    shard_bytes: int


def _shard_bytes(shard_mb: float | None) -> _ShardBytes:
    """``--shard-mb`` as the ``shard_bytes`` keyword of train and plan (none given: theirs),
    checked before PyTorch is imported."""
    if shard_mb is None:
        return {}
    if not (math.isfinite(shard_mb) and shard_mb > 0):
        raise ConfigError(
            f"--shard-mb must be > 0 (MiB of samples per data shard, e.g. 64), got {shard_mb:g}"
        )
    return _ShardBytes(shard_bytes=max(1, round(shard_mb * 2**20)))


def _print_version(value: bool) -> None:
    if value:
        from smlt import __version__

        print(f"smlt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="print smlt's version and exit",
            is_eager=True,
            callback=_print_version,
        ),
    ] = False,
) -> None:
    """Train PyTorch models data-parallel on serverless functions."""


@app.command()
def train(
    task: Annotated[str, typer.Argument(help="path/to/file.py:ClassName")],
    epochs: Annotated[int, typer.Option(help="passes over the training set")] = 1,
    batch_size: Annotated[int, typer.Option(help="global batch size (split across workers)")] = 256,
    workers: Annotated[
        int | None,
        typer.Option(help="number of workers (default 1; with a goal: fixed, not searched)"),
    ] = None,
    memory_mb: Annotated[
        int | None, typer.Option(help="memory per worker (MB); CPU follows it, 1769 MB = 1 vCPU")
    ] = None,
    backend: Annotated[
        str,
        typer.Option(
            help="ray (local or --ray-address); aws_lambda (boto3's configuration, "
            "SMLT_LAMBDA_IMAGE, SMLT_LAMBDA_ROLE; docs/deploy-aws.md); openwhisk (~/.wskprops "
            "or __OW_API_HOST/__OW_API_KEY, SMLT_OPENWHISK_IMAGE; docs/deploy-openwhisk.md)"
        ),
    ] = "ray",
    seed: Annotated[int, typer.Option(help="seeds the model, the sampler and dropout")] = 0,
    output: Annotated[Path | None, typer.Option(help="output folder (default runs/JOB)")] = None,
    redis_url: Annotated[
        str | None,
        typer.Option(
            envvar="SMLT_REDIS_URL",
            help="use this Redis (comma-separate several) instead of an embedded one",
        ),
    ] = None,
    object_store: Annotated[
        str | None,
        typer.Option(
            envvar="SMLT_OBJECT_STORE", help="folder or s3://bucket/prefix for code and data"
        ),
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="an existing Ray cluster (ray://... or auto)")
    ] = None,
    shard_timeout: Annotated[
        float, typer.Option(help="seconds a worker waits for a peer's shard")
    ] = 120.0,
    function_timeout: Annotated[
        float | None,
        typer.Option(help="function time limit in seconds (workers hand over before it)"),
    ] = None,
    checkpoint_every: Annotated[
        int | None,
        typer.Option(
            help="checkpoint every K iterations (default: every epoch); 0: no periodic "
            "checkpoints, only where the workers hand over (--rescale, --function-timeout) "
            "and at the end of the run"
        ),
    ] = None,
    heartbeat_timeout: Annotated[
        float, typer.Option(help="seconds without a heartbeat before a worker is replaced")
    ] = 15.0,
    rescale: Annotated[
        list[str] | None,
        typer.Option(help="AT:WORKERS[:MEMORY_MB]: from iteration AT on (repeatable)"),
    ] = None,
    keep_checkpoints: Annotated[
        int,
        typer.Option(
            help="committed checkpoints kept while the run goes on (the newest at the end)"
        ),
    ] = 2,
    clip_grad_norm: Annotated[
        float | None,
        typer.Option(
            help="clip the mean gradient to this global norm before each step, as "
            "torch.nn.utils.clip_grad_norm_ (default: the task's clip_grad_norm)"
        ),
    ] = None,
    micro_batch: Annotated[
        int | None,
        typer.Option(
            help="samples a worker puts through the model at once; its slice of the batch goes "
            "in several passes whose gradients are summed (default: only where the slice would "
            "not fit --memory-mb)"
        ),
    ] = None,
    precision: Annotated[
        str,
        typer.Option(
            help="fp32, or bf16: forward pass under bfloat16 autocast (parameters, optimizer "
            "and exchange stay float32)"
        ),
    ] = "fp32",
    overwrite: Annotated[
        bool,
        typer.Option(
            help="replace the files of another run that --output holds (by default such a "
            "folder is refused)"
        ),
    ] = False,
    tensorboard: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="write TensorBoard event files to DIR/JOB: training loss, learning rate, "
            "gradient norm, samples/s, cost, time per phase, evaluate() metrics; view them "
            "with tensorboard --logdir DIR (needs pip install 'smlt[tensorboard]')",
        ),
    ] = None,
    deadline: Annotated[
        str | None,
        typer.Option(
            help="finish within this wall time (90s, 30m, 1h30m), as cheaply as possible: "
            "smlt chooses workers x memory"
        ),
    ] = None,
    budget: Annotated[
        str | None,
        typer.Option(
            help="spend at most this many US dollars (0.50), finishing as soon as possible: "
            "smlt chooses workers x memory"
        ),
    ] = None,
    fastest: Annotated[
        bool, typer.Option(help="finish as soon as possible: smlt chooses workers x memory")
    ] = False,
    max_trials: Annotated[
        int | None,
        typer.Option(help="with a goal: at most this many trial configurations (default 12)"),
    ] = None,
    trial_iterations: Annotated[
        int | None,
        typer.Option(help="with a goal: iterations each trial trains (default 5)"),
    ] = None,
    max_iterations: Annotated[
        int | None,
        typer.Option(help="stop after this many iterations, even mid-epoch (a smoke test)"),
    ] = None,
    node_usd_per_hour: NodeUsdPerHour = None,
    node_vcpus: NodeVcpus = None,
    node_memory_mb: NodeMemoryMb = None,
    store_usd_per_hour: StoreUsdPerHour = None,
    shard_mb: ShardMb = None,
) -> None:
    """Train TASK on WORKERS stateless workers; writes result.json, model.pt and plots.

    With --deadline, --budget or --fastest, smlt chooses workers x memory itself: a few short
    trials (ordinary training iterations) measure the time per iteration, and a Bayesian
    optimizer picks the configuration; --workers or --memory-mb, if given, stay fixed."""

    def start(progress: Callable[[dict[str, Any]], None]) -> Any:
        shard = _shard_bytes(shard_mb)
        rescales = _rescales(rescale or [])
        # A mistyped flag is refused here, before PyTorch, Ray or Redis are even imported.
        goal = goal_from_options(deadline=deadline, budget=budget, fastest=fastest)
        check_goal(
            goal, rescales=rescales, max_trials=max_trials, trial_iterations=trial_iterations
        )
        check_request(
            backend,
            backend_options={"address": ray_address} if backend == "ray" else {},
            epochs=epochs,
            batch_size=batch_size,
            workers=workers,
            memory_mb=memory_mb,
            function_timeout_s=function_timeout,
            checkpoint_every=checkpoint_every,
            keep_checkpoints=keep_checkpoints,
            rescales=rescales,
            clip_grad_norm=clip_grad_norm,
            micro_batch=micro_batch,
            precision=precision,
            max_iterations=max_iterations,
        )
        from smlt.client.prices import Prices

        Prices.checked(
            backend,
            node_usd_per_hour=node_usd_per_hour,
            node_vcpus=node_vcpus,
            node_memory_mb=node_memory_mb,
            store_usd_per_hour=store_usd_per_hour,
        )
        if tensorboard is not None:  # a missing package is told before PyTorch is imported
            from smlt.client.tensorboard import require_tensorboard

            require_tensorboard(tensorboard)
        from smlt.client.driver import train as run_training

        return run_training(
            task,
            epochs=epochs,
            batch_size=batch_size,
            workers=workers,
            memory_mb=memory_mb,
            backend=backend,
            seed=seed,
            output=output,
            redis_url=redis_url,
            object_store=object_store,
            ray_address=ray_address,
            shard_timeout_s=shard_timeout,
            function_timeout_s=function_timeout,
            checkpoint_every=checkpoint_every,
            heartbeat_timeout_s=heartbeat_timeout,
            rescales=rescales,
            keep_checkpoints=keep_checkpoints,
            clip_grad_norm=clip_grad_norm,
            micro_batch=micro_batch,
            precision=precision,
            overwrite=overwrite,
            progress=progress,
            tensorboard=tensorboard,
            deadline=deadline,
            budget=budget,
            fastest=fastest,
            max_trials=max_trials,
            trial_iterations=trial_iterations,
            max_iterations=max_iterations,
            node_usd_per_hour=node_usd_per_hour,
            node_vcpus=node_vcpus,
            node_memory_mb=node_memory_mb,
            store_usd_per_hour=store_usd_per_hour,
            **shard,
        )

    _run(output, start)


@app.command()
def resume(
    run_dir: Annotated[Path, typer.Argument(help="the output folder of the run (has run.json)")],
    redis_url: Annotated[
        str | None,
        typer.Option(
            envvar="SMLT_REDIS_URL",
            help="use this Redis (comma-separate several) instead of an embedded one; the "
            "run goes on from its checkpoint, and keys a dead driver left there are removed",
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(help="an existing Ray cluster (ray://... or auto); default: a local Ray"),
    ] = None,
    tensorboard: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="write TensorBoard event files to DIR/JOB (default: the run's train --tensorboard "
            "DIR, if it had one); the steps go on there, none written twice",
        ),
    ] = None,
) -> None:
    """Finish a run that was interrupted or whose driver died, from its last committed
    checkpoint, with the parameters in RUN_DIR/run.json."""
    from smlt.client.driver import resume as resume_run

    _run(
        run_dir,
        lambda progress: resume_run(
            run_dir,
            redis_url=redis_url,
            ray_address=ray_address,
            progress=progress,
            tensorboard=tensorboard,
        ),
    )


@app.command("runs")
def list_runs_command(
    folder: Annotated[
        Path, typer.Argument(help="where to look: run folders in it and one level further down")
    ] = Path("runs"),
    as_json: Annotated[
        bool, typer.Option("--json", help="print a JSON list (for tools) instead of a table")
    ] = False,
) -> None:
    """List the runs under FOLDER, oldest first: job, task, start, status, progress, metrics,
    cost and output folder.

    The status is finished, running, failed, interrupted, or stopped (status.json says running
    but has not been rewritten for 2 minutes: its driver died; SMLT_STALE_AFTER_S changes
    that); unknown for a run without status.json; unreadable when run.json is not readable.
    """
    if not folder.is_dir():
        console.print(
            f"[bold red]error:[/] {folder} is not a folder; runs are written to runs/JOB in the "
            "folder smlt train ran in, or to its --output",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(2)
    records = list_runs(folder)
    if as_json:
        print(json.dumps([r.to_dict() for r in records], indent=2))
        return
    if not records:
        console.print(f"no runs under {folder} (a run folder holds a run.json)", highlight=False)
        return
    out = Console()
    if not out.is_terminal:  # a pipe or a file: no wrapping of long paths at 80 columns
        out = Console(width=max(out.width, 200))
    out.print(_runs_table(records, width=out.width), soft_wrap=False)
    for note in _runs_notes(records):
        out.print(note, highlight=False, markup=False, soft_wrap=True)


_STATE_STYLES = {
    "finished": "green",
    "running": "cyan",
    "failed": "red",
    "unreadable": "red",
    "interrupted": "yellow",
    "stopped": "yellow",
}


def _runs_table(records: list[RunInfo], *, width: int) -> Table:
    """One row per run. The folder is the run's name (``runs/JOB`` by default); its job id is
    added under it when the folder has another name (``--output``). Below 120 columns the
    start's date and time, and the status and progress, share a column, one above the other."""
    compact = width < 120
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("started", no_wrap=True)
    table.add_column("run", overflow="fold", min_width=12)
    table.add_column("task", overflow="fold", min_width=8)
    table.add_column("status", no_wrap=True)
    if not compact:
        table.add_column("progress", no_wrap=True)
    table.add_column("metrics", overflow="fold")
    table.add_column("cost", no_wrap=True, min_width=9)
    for r in records:
        started = "?"
        if r.started_at is not None:
            started = r.started_at.astimezone().strftime("%Y-%m-%d %H:%M")
            started = started.replace(" ", "\n") if compact else started
        run = str(r.path)
        if r.job_id is not None and r.job_id != r.path.name:
            run += f"\n(job {r.job_id})"
        progress = ""
        if r.total_iterations:
            done = "?" if r.iteration is None else str(r.iteration)
            progress = f"{done}/{r.total_iterations}"
        status = Text(r.state, style=_STATE_STYLES.get(r.state, ""))
        if compact and progress:
            status.append(f"\n{progress}")
        table.add_row(
            started,
            run,
            _short_task(r.task),
            status,
            *([] if compact else [progress]),
            "\n".join(f"{k} {_number(v)}" for k, v in r.final_metrics.items()),
            f"${r.cost_usd:.5f}" if r.cost_usd is not None else "",
        )
    return table


def _runs_notes(records: list[RunInfo]) -> Iterator[str]:
    """A line under the table for each run that needs one: how to continue a stopped run,
    why a run failed, why a folder cannot be read."""
    for r in records:
        if r.resumable:
            of_total = f" of {r.total_iterations}" if r.total_iterations else ""
            yield (
                f"{r.path}: {r.state}, checkpoint at iteration {r.last_checkpoint}{of_total}; "
                f"continue with: smlt resume {shlex.quote(str(r.path))}"
            )
        elif r.state in ("failed", "unreadable") and r.error:
            first = r.error.strip().splitlines()[0] if r.error.strip() else r.error
            yield f"{r.path}: {r.state}: {first[:200]}"


def _short_task(spec: str | None) -> str:
    """``digits.py:Digits`` for ``/home/me/examples/digits.py:Digits``: the class and its
    file's name (run.json and ``--json`` have the whole path)."""
    if not spec:
        return "?"
    path, sep, name = spec.rpartition(":")
    return f"{Path(path).name}{sep}{name}" if sep else spec


@app.command()
def clean(
    object_store: Annotated[
        str | None,
        typer.Option(
            envvar="SMLT_OBJECT_STORE",
            help="folder or s3://bucket/prefix (default ~/.cache/smlt/objects)",
        ),
    ] = None,
    older_than: Annotated[
        str, typer.Option(help="remove what was last written longer ago: 90s, 30m, 12h, 7d, 2w")
    ] = "7d",
    dry_run: Annotated[
        bool, typer.Option(help="list what would be removed; remove nothing")
    ] = False,
    backend: Annotated[
        str | None,
        typer.Option(
            help="also delete the functions (aws_lambda) or actions (openwhisk) smlt created, "
            "of every job, not updated for --older-than (a running job updates its own every "
            "generation); only those labelled as smlt's, whatever their name"
        ),
    ] = None,
) -> None:
    """Remove old job folders (jobs/JOB/ in the object store) and workers' local cache folders.

    A folder goes when the newest file in it is older than --older-than; anything newer means
    the job may be running, and it is left alone, as is a cache folder a worker holds. With
    --backend, the platform's leftovers go too (what a run that crashed did not delete).
    """
    try:
        threshold_s = parse_duration(older_than, option="--older-than")
        if backend is not None:
            _clean_backend(backend, threshold_s, older_than, dry_run=dry_run)
        _clean(object_store, threshold_s, older_than, dry_run=dry_run)
    except SmltError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _clean_backend(name: str, threshold_s: float, shown: str, *, dry_run: bool) -> None:
    """Delete (or list) the functions smlt created on a serverless platform."""
    import trio

    from smlt.backends import backend_class, get_backend
    from smlt.backends.serverless import ServerlessBackend

    if not issubclass(backend_class(name), ServerlessBackend):
        raise ConfigError(
            f"--backend {name}: smlt leaves nothing behind there to clean (only aws_lambda and "
            "openwhisk functions)"
        )
    platform = get_backend(name)
    assert isinstance(platform, ServerlessBackend)

    async def remove() -> list[Any]:
        try:
            return await platform.remove_managed(older_than_s=threshold_s, dry_run=dry_run)
        finally:
            await platform.aclose()

    removed = trio.run(remove)
    now = time.time()
    verb = "would delete" if dry_run else "deleted"
    for found in removed:
        age = _age(now - found.modified_unix_s) if found.modified_unix_s else "at an unknown time"
        print(f"{verb} {name} {platform.noun} {found.name} (job {found.job_id}, updated {age})")
    print(f"{verb} {len(removed)} {platform.noun}(s) on {name} not updated in the last {shown}")


_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw])\s*")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str, *, option: str = "duration") -> float:
    """Seconds in ``90s``, ``30m``, ``12h``, ``7d`` or ``2w`` (a positive number and a unit)."""
    match = _DURATION.fullmatch(text)
    seconds = float(match[1]) * _UNIT_S[match[2]] if match else 0.0
    if seconds <= 0:
        raise ConfigError(
            f"{option} {text!r} is not a duration: give a positive number and a unit, s, m, h, "
            "d or w (90s, 30m, 12h, 7d, 2w)"
        )
    return seconds


def _clean(object_store: str | None, threshold_s: float, shown: str, *, dry_run: bool) -> None:
    from smlt.storage.artifacts import default_cache_dir
    from smlt.worker.handler import remove_idle_caches

    store = open_object_store(object_store)
    verb = "would remove" if dry_run else "removed"
    now = time.time()
    freed = removed_jobs = 0
    active = set()
    for job, (size, newest) in sorted(_job_folders(store).items()):
        if now - newest < threshold_s:
            active.add(job)
            continue
        if not dry_run:
            _remove_job_folder(store, job)
        print(f"{verb} {store.url}/jobs/{job}/ ({_size(size)}, last written {_age(now - newest)})")
        freed += size
        removed_jobs += 1
    cache_root = default_cache_dir("job").parent
    # A cache folder goes by its own age and leases, and never while its job looks active.
    caches = remove_idle_caches(cache_root, keep=active, older_than_s=threshold_s, dry_run=dry_run)
    for folder in caches:
        age = _age(now - folder.newest_unix_s)
        print(f"{verb} cache {folder.path}/ ({_size(folder.size_bytes)}, last written {age})")
        freed += folder.size_bytes
    print(
        f"{'would free' if dry_run else 'freed'} {_size(freed)} ({freed:,} bytes): "
        f"{removed_jobs} job folder(s), {len(caches)} cache folder(s); "
        f"{len(active)} job folder(s) written to in the last {shown} left alone"
    )


def _job_folders(store: ObjectStore) -> dict[str, tuple[int, float]]:
    """Each job folder of the store: its bytes and the time of its newest object."""
    folders: dict[str, tuple[int, float]] = {}
    for key, size, modified in _objects_under(store, "jobs/"):
        job, _, rest = key[len("jobs/") :].partition("/")
        if not job or not rest:
            continue
        total, newest = folders.get(job, (0, 0.0))
        folders[job] = (total + size, max(newest, modified))
    return folders


def _objects_under(store: ObjectStore, prefix: str) -> Iterator[tuple[str, int, float]]:
    """(key, bytes, modified unix s) of every object under ``prefix``, in-flight writes of the
    local store included (they show a job is active).

    The ObjectStore interface lists keys only; sizes and times come from each implementation.
    """
    if isinstance(store, LocalObjectStore):
        for dirpath, _dirnames, filenames in os.walk(store.root / prefix):
            for name in filenames:
                path = Path(dirpath) / name
                try:
                    st = path.lstat()
                except OSError:
                    continue  # deleted while we walk
                yield path.relative_to(store.root).as_posix(), st.st_size, st.st_mtime
        return
    if isinstance(store, S3ObjectStore):
        client = store.client  # a ConfigError if boto3 is missing; then botocore is there
        from botocore.exceptions import BotoCoreError, ClientError

        full = f"{store.prefix}/{prefix}" if store.prefix else prefix
        strip = len(store.prefix) + 1 if store.prefix else 0
        try:
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=store.bucket, Prefix=full
            )
            for page in pages:
                for obj in page.get("Contents", ()):
                    modified = obj["LastModified"].timestamp()
                    yield obj["Key"][strip:], int(obj["Size"]), modified
        except (BotoCoreError, ClientError) as exc:
            raise ObjectStoreError(f"cannot list {store.url}/{prefix}: {exc}") from exc
        return
    raise ConfigError(f"smlt clean cannot list the sizes and times of objects in {store.url}")


def _remove_job_folder(store: ObjectStore, job: str) -> None:
    store.delete_prefix(f"jobs/{job}/")
    if isinstance(store, LocalObjectStore):
        # Temporary files of writes that never finished are not objects, so delete_prefix leaves
        # them; they are as old as the rest (the folder's newest file is past the threshold).
        shutil.rmtree(store.root / "jobs" / job, ignore_errors=True)


def _size(size_bytes: int) -> str:
    value = float(size_bytes)
    for unit in ("bytes", "KB", "MB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def _rescales(specs: list[str]) -> tuple[tuple[int, int, int | None], ...]:
    out = []
    for spec in specs:
        parts = spec.split(":")
        try:
            if len(parts) not in (2, 3):
                raise ValueError
            numbers = [int(p) for p in parts]
        except ValueError:
            raise typer.BadParameter(
                f"--rescale {spec!r}: expected AT:WORKERS[:MEMORY_MB]"
            ) from None
        out.append((numbers[0], numbers[1], numbers[2] if len(numbers) == 3 else None))
    return tuple(out)


def _run(run_dir: Path | None, start: Callable[[Callable[[dict[str, Any]], None]], Any]) -> None:
    """Run ``start(progress)`` under the live display; a stop by signal ends in one line.

    ``run_dir`` is the output folder when the command names it (``--output``, ``resume``'s
    argument); otherwise the display learns it from the run's progress.
    """
    display = _ProgressDisplay(console)
    stop = _StopSignals()

    def progress(status: dict[str, Any]) -> None:
        stop.install()  # again: Ray's start replaced the handler (see _StopSignals)
        display.update(status)

    try:
        with stop, display, warnings.catch_warnings():
            warnings.showwarning = _show_warning
            result = start(progress)
    except SmltError as exc:
        # escape: a message may hold brackets (pip install 'smlt[tensorboard]') that rich
        # would take for markup and drop.
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except (KeyboardInterrupt, SystemExit) as exc:
        if isinstance(exc, SystemExit):
            if not _sigterm_through_ray(exc):
                raise
            stop.received = signal.SIGTERM
            signal.alarm(0)  # Ray's C++ handler, if it ran, set one to abort us: all is stopped
        where = run_dir if run_dir is not None else display.output_dir
        console.print(
            _interrupted_message(stop.name, where),
            style="yellow",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(stop.exit_code) from None
    _print_summary(result)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """smlt's warnings (a configuration that runs but wastes) as one line, like its errors;
    anything else as Python shows it."""
    if issubclass(category, SmltWarning):
        console.print(
            f"[bold yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True
        )
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _sigterm_through_ray(exc: SystemExit) -> bool:
    """Whether ``exc`` is how ``ray.init``'s SIGTERM handler ended the run: it calls
    ``sys.exit(signum)``, and it is in place from Ray's start to the run's first status (see
    :class:`_StopSignals`). Its SystemExit arrives as is (code 15), or re-raised by Ray's wait
    loop with code 1 and the original code in ``ray_terminate_msg``. smlt never calls sys.exit
    in a run."""
    if exc.code == signal.SIGTERM:
        return True
    message = getattr(exc, "ray_terminate_msg", None)
    return isinstance(message, str) and message.rstrip(". ").endswith(
        f"Exit code: {int(signal.SIGTERM)}"
    )


class _StopSignals:
    """SIGTERM stops a run the way Ctrl-C does: it raises KeyboardInterrupt in the main thread,
    so the driver's cleanup stops the workers and Redis, and the command exits with 143.

    ``ray.init`` replaces the handler twice: with a Python handler that calls ``sys.exit(15)``
    and, once it has connected, with the C++ failure handler of Ray's core worker, which prints
    a stack trace for SIGTERM as for a crash (and aborts the process 3 s later if it is still
    alive). Installing ours again with ``signal.signal`` replaces both; the progress callback
    does that on every status (it runs on the main thread, twice a second). Ray's handlers are
    thus in place only from Ray's start to the run's first status, a few seconds: a SIGTERM
    then ends in Ray's ``sys.exit``, which :func:`_run` recognises (after the C++ handler's
    trace, if it was installed yet).

    Only the first signal counts: the cleanup it starts is not interrupted by a second SIGTERM.
    KeyboardInterrupt may reach us re-raised by Ray (which drops its type), so the signal that
    came is recorded here, not in the exception.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: Any = None

    @property
    def name(self) -> str:
        return "SIGTERM" if self.received == signal.SIGTERM else "Ctrl-C"

    @property
    def exit_code(self) -> int:
        return 128 + (self.received or signal.SIGINT)

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is not None:
            return
        self.received = signum
        raise KeyboardInterrupt

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGTERM)
            self.install()
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _interrupted_message(how: str, run_dir: Path | str | None) -> str:
    """One line after a stop by ``how`` (``Ctrl-C``, ``SIGTERM``): whether the run in
    ``run_dir`` can be resumed, and the command that does it."""
    if run_dir is None or not (Path(run_dir) / "run.json").is_file():
        return f"interrupted by {how} before the run started: nothing to resume."
    head = f"interrupted by {how}; the workers are stopped."
    record = read_run(Path(run_dir))
    if record.state == "unreadable":
        return f"{head} {run_dir}/run.json cannot be read ({record.error}): nothing to resume."
    checkpoint = _newest_checkpoint(record)
    of_total = f" of {record.total_iterations}" if record.total_iterations else ""
    if checkpoint is not None and checkpoint == record.total_iterations:
        return (
            f"{head} Training had ended (the checkpoint at iteration {checkpoint}{of_total} "
            f"holds it); write its model and results with: smlt resume {shlex.quote(str(run_dir))}"
        )
    if checkpoint is not None:
        return (
            f"{head} The newest checkpoint is at iteration {checkpoint}{of_total}; continue with: "
            f"smlt resume {shlex.quote(str(run_dir))}"
        )
    every = record.checkpoint_every
    if every:
        when = f"the first comes after iteration {every}{of_total}"
    else:
        when = "with --checkpoint-every 0 they come only where workers hand over, and at the end"
    return (
        f"{head} Nothing to resume: no checkpoint was committed ({when}); "
        "start again with smlt train."
    )


def _newest_checkpoint(record: RunInfo) -> int | None:
    """The iteration of the run's newest committed checkpoint: what the object store holds
    (where ``smlt resume`` looks), else what status.json last said."""
    if record.object_store is None or record.job_id is None:
        return record.last_checkpoint
    from smlt.storage.checkpoint import CheckpointStore

    try:
        committed = CheckpointStore(open_object_store(record.object_store), record.job_id)
        iterations = committed.list_committed()
    except (SmltError, OSError):  # unreachable S3, a folder gone: status.json's word then
        return record.last_checkpoint
    return iterations[-1] if iterations else None


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _number(value: float) -> str:
    """A metric: four decimals, or three significant digits for small ones (0.000123)."""
    if value != 0 and abs(value) < 1e-3 and math.isfinite(value):
        return f"{value:.3e}"
    return f"{value:.4f}"


def _task_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """The numbers the task's ``evaluate()`` added to an epoch entry."""
    return {
        k: float(v)
        for k, v in entry.items()
        if k not in _EPOCH_FIELDS and isinstance(v, int | float) and not isinstance(v, bool)
    }


def _format_metrics(metrics: dict[str, float], *, label: str = "evaluate():") -> str:
    """``evaluate(): accuracy 0.9533  loss 0.1933``, or "" without metrics. They are named as
    the task named them: ``evaluate()`` may compute them on held-out or on training data."""
    if not metrics:
        return ""
    return f"{label} " + "  ".join(f"{k} {_number(v)}" for k, v in metrics.items())


def _format_epoch_line(status: dict[str, Any], entry: dict[str, Any]) -> str:
    """The line of a finished epoch, for logs. An epoch run before a resume (its ``part`` is
    older than the status's) is marked so and has no cost: the cost so far is not its cost."""
    epochs_total = _epochs_total(status)
    replayed = entry.get("part", 0) < status.get("part", 0)
    parts = [
        f"epoch {entry['epoch'] + 1}/{epochs_total}: it {entry['iteration'] + 1}/"
        f"{status['total_iterations']}",
        f"train loss {entry['train_loss']:.4f}",
        _figure("lr", entry.get("lr")),
        _rate(entry.get("samples_per_s")),
    ]
    if not replayed:
        parts += [_config(status), f"${status['cost_usd']:.5f}"]
    parts.append(_format_metrics(_task_metrics(entry)))
    if replayed:
        parts.append("(before resume)")
    return "  ".join(p for p in parts if p)


def _format_live(status: dict[str, Any], *, started: bool) -> list[str]:
    """The lines under the live progress bar: training, then the newest epoch's metrics.
    Until the run reports its first iteration (``started``) they say the workers are starting,
    instead of showing a loss of nan at 0 samples/s."""
    cost = f"${status['cost_usd']:.5f}"
    last = status.get("last") or {}
    if not started or not last:
        return [f"starting workers...  {_config(status)}"]
    lines = [
        "  ".join(
            p
            for p in (
                f"train loss {last['loss']:.4f}",
                _figure("lr", last.get("lr")),
                _figure("grad norm", last.get("grad_norm")),
                _rate(last.get("samples_per_s")),
                _config(status),
                cost,
            )
            if p
        )
    ]
    epochs = status.get("epochs") or []
    metrics = _task_metrics(epochs[-1]) if epochs else {}
    if metrics:
        label = f"evaluate() after epoch {epochs[-1]['epoch'] + 1}:"
        lines.append(_format_metrics(metrics, label=label))
    return lines


def _epochs_total(status: dict[str, Any]) -> int:
    return max(1, status["total_iterations"] // max(1, status["iterations_per_epoch"]))


def _figure(name: str, value: Any) -> str:
    """``lr 0.0421``: three significant digits, or "" when the run does not report it."""
    if not isinstance(value, int | float) or not math.isfinite(value):
        return ""
    return f"{name} {value:.3g}"


def _rate(samples_per_s: Any) -> str:
    if not isinstance(samples_per_s, int | float) or not math.isfinite(samples_per_s):
        return ""
    return f"{samples_per_s:,.0f} samples/s"


def _config(status: dict[str, Any]) -> str:
    return f"{status['workers']} x {status['memory_mb']} MB"


class _Lines(Progress):
    """A rich Progress whose bar is followed by free lines of text, each wrapped to the
    terminal's width rather than cut: on an 80-column terminal a one-line bar with the
    training figures and the metrics loses the metrics."""

    def __init__(self, *columns: Any, **options: Any) -> None:
        self.lines: list[str] = []  # before Progress's own __init__, which renders once
        super().__init__(*columns, **options)

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        for line in self.lines:
            yield Text(line)


class _ProgressDisplay:
    """A live bar and a few lines on a terminal; one line per epoch when output is not a
    terminal (CI, logs)."""

    def __init__(self, out: Console) -> None:
        self.console = out
        self.live = out.is_terminal
        self.bar = BarColumn()
        self.progress = _Lines(
            TextColumn("[bold]{task.description}"),
            self.bar,
            TextColumn("it {task.completed:.0f}/{task.total:.0f}"),
            TimeElapsedColumn(),
            console=out,
            transient=False,
        )
        self.output_dir: str | None = None
        self._task: Any = None
        self._epochs_printed = 0
        self._first_iteration: int | None = None

    def __enter__(self) -> _ProgressDisplay:
        if self.live:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.progress.stop()

    def update(self, status: dict[str, Any]) -> None:
        self.output_dir = status.get("output_dir", self.output_dir)
        done = status["iteration"]
        if self._first_iteration is None:
            self._first_iteration = done  # a resumed run starts with the iterations before
        if self.live:
            self._update_live(status, started=done > self._first_iteration)
            return
        for entry in status["epochs"][self._epochs_printed :]:
            print(_format_epoch_line(status, entry), file=sys.stderr, flush=True)
        self._epochs_printed = len(status["epochs"])

    def _update_live(self, status: dict[str, Any], *, started: bool) -> None:
        total = status["total_iterations"]
        done = status["iteration"]
        epochs_total = _epochs_total(status)
        epoch = min(done // max(1, status["iterations_per_epoch"]) + 1, epochs_total)
        description = f"epoch {epoch}/{epochs_total}"
        # The bar gives way first on a narrow terminal: the figures are what matter.
        self.bar.bar_width = max(5, min(40, self.console.width - 40))
        self.progress.lines = _format_live(status, started=started)
        if self._task is None:
            self._task = self.progress.add_task(description, total=total)
        self.progress.update(self._task, completed=done, description=description)


def _print_summary(result: Any) -> None:
    table = Table(title=f"smlt run {result.job_id}", show_header=False)
    for name, value in result.final_metrics.items():
        table.add_row(f"evaluate(): {name}", _number(value))
    if result.history:
        table.add_row("final training loss", f"{result.history[-1]['loss']:.4f}")
    cfg = result.configs[-1]
    table.add_row("workers x memory", f"{cfg['workers']} x {cfg['memory_mb']} MB")
    search = result.search
    if search is not None:
        for i, trial in enumerate(search["trials"], 1):
            table.add_row(f"trial {i}", _trial_line(trial))
        table.add_row("chosen", search["chosen"]["reason"])
    goal = result.goal
    if goal is not None:
        table.add_row("goal", f"{goal['text']}: {'met' if goal['met'] else 'MISSED'}")
    if result.optimizer:
        table.add_row("optimizer", f"{result.optimizer['class']}, {result.optimizer['mode']}")
    # 0 for a result that does not say (one read from an older result.json): shown as whole.
    whole = result.epochs * getattr(result, "iterations_per_epoch", 0)
    table.add_row(
        "iterations",
        f"{result.iterations} ({_plural(result.epochs, 'epoch')} of batch {result.batch_size})"
        if result.iterations >= whole
        else f"{result.iterations} of {whole} ({_plural(result.epochs, 'epoch')} of batch "
        f"{result.batch_size}; stopped by --max-iterations)",
    )
    data = getattr(result, "data", None)
    if data:
        table.add_row(
            "input pipeline",
            f"{data['data_share']:.0%} of the iterations' time; {data['shard_loads']} shard "
            f"loads, {_size(data['bytes_downloaded'])} downloaded of {_size(data['bytes'])} "
            f"in {_plural(data['shards'], 'shard')}",
        )
    table.add_row("wall time", f"{result.wall_s:.1f} s")
    table.add_row(
        "cost", f"${result.cost_usd:.6f} ({result.pricing}, {result.billed_worker_s:.1f} worker-s)"
    )
    table.add_row(
        "output",
        f"{result.output_dir}/ (result.json, model.pt, loss.png, throughput.png, phases.png)",
    )
    Console().print(table)


@app.command("emulator")
def emulator_command(
    host: Annotated[
        str, typer.Option(help="address to listen on; 127.0.0.1 keeps it to this machine")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on (0: any free port)")] = 0,
    openwhisk_auth: Annotated[
        str | None,
        typer.Option(
            envvar="SMLT_EMULATOR_OPENWHISK_AUTH",
            help="the OpenWhisk key to accept, UUID:KEY (default: a generated one); prefer the "
            "variable, a command line is visible to every local user",
        ),
    ] = None,
    aws_access_key_id: Annotated[
        str | None,
        typer.Option(
            envvar="SMLT_EMULATOR_AWS_ACCESS_KEY_ID",
            help="the AWS access key id to accept, e.g. your own (default: a generated one)",
        ),
    ] = None,
    max_concurrency: Annotated[
        int, typer.Option(min=1, help="containers busy at once per platform; more get 429")
    ] = 100,
    openwhisk_max_memory_mb: Annotated[
        int, typer.Option(help="largest OpenWhisk action memory limit (OpenWhisk's default: 512)")
    ] = 512,
    env_file: Annotated[
        Path,
        typer.Option(help="where the credentials are written for `source` (mode 0600)"),
    ] = Path("~/.cache/smlt/emulator.env"),
    print_credentials: Annotated[
        bool, typer.Option(help="also print the credentials (they end up in scrollback and logs)")
    ] = False,
    verbose: Annotated[bool, typer.Option(help="log every request (never its headers)")] = False,
) -> None:
    """Serve the AWS Lambda and OpenWhisk APIs here; functions run in local processes.

    Point boto3 at it with AWS_ENDPOINT_URL_LAMBDA and OpenWhisk clients with __OW_API_HOST and
    __OW_API_KEY: all of them, with the credentials it accepts, are written to --env-file, which
    is removed when the emulator stops (Ctrl-C). Images are not pulled: a function packaged as an
    image runs smlt's worker entry point (see smlt/emulator/config.py).
    """
    import logging

    from smlt.emulator import Emulator

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    emulator_log = logging.getLogger("smlt.emulator")
    emulator_log.addHandler(handler)
    emulator_log.setLevel(logging.DEBUG if verbose else logging.INFO)
    try:
        emu = Emulator(
            host=host,
            port=port,
            openwhisk_auth=openwhisk_auth,
            aws_access_key_id=aws_access_key_id,
            max_concurrency=max_concurrency,
            openwhisk_max_memory_mb=openwhisk_max_memory_mb,
        ).start()
    except SmltError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    written = ""
    try:
        path = emu.write_env_file(env_file)
        written = path.read_text()
        print(f"smlt emulator: AWS Lambda and OpenWhisk APIs on {emu.url}")
        print(f"  AWS_ENDPOINT_URL_LAMBDA={emu.lambda_url}")
        print(f"  __OW_API_HOST={emu.openwhisk_url}")
        print(f"credentials: source {path}  (mode 0600, removed when the emulator stops)")
        if print_credentials:
            print(written, end="")
        print("Ctrl-C stops the emulator and its containers.", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        emu.stop()
        for sig, old in previous.items():
            signal.signal(sig, old)
        target = Path(env_file).expanduser()
        if written and target.exists() and target.read_text() == written:
            target.unlink()  # still ours (another emulator may have written its own since)
        emulator_log.removeHandler(handler)


def _trial_line(trial: dict[str, Any]) -> str:
    """One trial of the goal's search, as the summary lists it."""
    where = f"{trial['workers']} x {trial['memory_mb']} MB"
    if trial["outcome"] != "ok":
        return f"{where}: out of memory"
    return (
        f"{where}: {trial['s_per_iteration']:.3f} s/iteration over "
        f"{_plural(trial['iterations'], 'iteration')}, ${trial['cost_usd']:.6f}"
    )


# -- smlt plan -----------------------------------------------------------------------------------


@app.command("plan")
def plan_command(
    task: Annotated[str, typer.Argument(help="path/to/file.py:ClassName")],
    epochs: Annotated[int, typer.Option(help="passes over the training set")] = 1,
    batch_size: Annotated[int, typer.Option(help="global batch size (split across workers)")] = 256,
    deadline: Annotated[
        str | None, typer.Option(help="finish within this (90s, 30m, 1h30m) at the least cost")
    ] = None,
    budget: Annotated[
        str | None, typer.Option(help="spend at most this many US dollars, as fast as possible")
    ] = None,
    fastest: Annotated[bool, typer.Option("--fastest", help="as fast as possible")] = False,
    workers: Annotated[
        int | None, typer.Option(help="fix the number of workers (not searched)")
    ] = None,
    memory_mb: Annotated[
        int | None, typer.Option(help="fix the memory per worker in MB (not searched)")
    ] = None,
    backend: Annotated[
        str,
        typer.Option(
            help="sim (a model of AWS Lambda calibrated on this machine) or ray (trials are "
            "short real runs on Ray: a local Ray, or --ray-address)"
        ),
    ] = "sim",
    ray_address: Annotated[
        str | None,
        typer.Option(help="ray: an existing Ray cluster (ray://... or auto); default: a local Ray"),
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option(
            envvar="SMLT_REDIS_URL",
            help="ray: the trials' Redis (one the cluster's workers reach), not an embedded one",
        ),
    ] = None,
    object_store: Annotated[
        str | None,
        typer.Option(
            envvar="SMLT_OBJECT_STORE",
            help="ray: the trials' object store (s3://bucket/prefix for a cluster; default: a "
            "scratch folder)",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="seeds the sim's noise and the optimizer")] = 0,
    noise: Annotated[
        float | None,
        typer.Option(help="sim: log-normal spread of each worker's compute time (default 0)"),
    ] = None,
    max_concurrency: Annotated[
        int | None,
        typer.Option(help="sim: functions that may run at once (Lambda's default: 1000)"),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(help="where to write the frontier's PNG (default plans/TASK-STAMP/)"),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the plan as JSON on stdout")
    ] = False,
    node_usd_per_hour: NodeUsdPerHour = None,
    node_vcpus: NodeVcpus = None,
    node_memory_mb: NodeMemoryMb = None,
    store_usd_per_hour: StoreUsdPerHour = None,
    shard_mb: ShardMb = None,
) -> None:
    """Choose workers x memory for training TASK before paying for it.

    Times the task once on this machine, runs the optimizer's trials on the sim backend (the
    real scheduler on a modelled platform) or, with --backend ray, as short real runs on Ray,
    and prints the recommendation, its predicted wall time and cost, the trials and the
    time-cost frontier (also drawn as a PNG). Exits with 3 if no configuration meets the goal
    (naming the fastest time and the cheapest cost in reach), with 2 for any other error."""
    try:
        # A mistyped flag is refused here, before PyTorch is imported.
        goal = goal_from_options(deadline=deadline, budget=budget, fastest=fastest)
        shard = _shard_bytes(shard_mb)
        from smlt.client.plan import (
            EXIT_INFEASIBLE,
            default_plan_dir,
            plan_task,
            plot_frontier,
        )
        from smlt.client.prices import Prices

        prices = Prices.checked(
            backend,
            node_usd_per_hour=node_usd_per_hour,
            node_vcpus=node_vcpus,
            node_memory_mb=node_memory_mb,
            store_usd_per_hour=store_usd_per_hour,
        )

        # Only what was given: --backend ray refuses the sim's figures.
        figures: dict[str, Any] = {
            name: value
            for name, value in (("noise_sigma", noise), ("max_concurrency", max_concurrency))
            if value is not None
        }
        result = plan_task(
            task,
            epochs=epochs,
            batch_size=batch_size,
            goal=goal,
            workers=workers,
            memory_mb=memory_mb,
            backend=backend,
            seed=seed,
            ray_address=ray_address,
            redis_url=redis_url,
            object_store=object_store,
            prices=prices,
            **shard,
            **figures,
        )
        folder = default_plan_dir(result.profile)
        png = plot if plot is not None else folder / "frontier.png"
        plot_frontier(result, png)
        data = {**result.to_dict(), "plot": str(png)}
        if plot is None:
            (folder / "plan.json").write_text(json.dumps(data, indent=2))
    except SmltError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        _print_plan(result, png)
    if not result.feasible:
        console.print(
            f"[bold red]infeasible:[/] {escape(str(result.decision.error()))}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_INFEASIBLE)


def _print_plan(result: Any, png: Path) -> None:
    """The plan as a person reads it: the recommendation, the trials, the frontier."""
    decision = result.decision
    out = Console()
    verdict = "recommended" if decision.feasible else "closest to the goal (infeasible)"
    # With both axes fixed there is no goal to pursue: the plan is that configuration's.
    goal = "a fixed configuration" if result.problem.override.fixed else str(decision.goal)
    out.print(
        f"smlt plan {result.profile.task}: {goal}, "
        f"{result.job_iterations} iterations of batch {result.problem.workload.batch_size}"
    )
    out.print(
        f"{verdict}: [bold]{_plural(decision.workers, 'worker')} x {decision.memory_mb} MB[/]: "
        f"predicted {decision.predicted.time_s:.0f} s wall time, "
        f"${decision.predicted.cost_usd:.4f} ({escape(decision.reason)})"
    )
    where = "on the sim" if result.backend == "sim" else "on Ray (short real runs)"
    trials = Table(title=f"{_plural(len(result.trials), 'trial')} {where}", box=box.SIMPLE)
    on_ray = result.backend == "ray"  # a trial there also measured the run's fixed costs
    columns = ["workers", "memory MB", "outcome", "s/iteration", "wall s", "cost USD", "grain"]
    for name in columns + (["start-up s", "driver s"] if on_ray else []):
        trials.add_column(name, justify="right")
    for t in result.trials:
        s = t["s_per_iteration"]
        fixed = [f"{t['startup_s']:.1f}", f"{t['driver_s']:.1f}"] if "driver_s" in t else []
        trials.add_row(
            str(t["workers"]),
            str(t["memory_mb"]),
            t["outcome"],
            "-" if s is None else f"{s:.4f}",
            f"{t['wall_s']:.1f}",
            f"{t['cost_usd']:.6f}",
            t["grain"],
            *(fixed or (["-", "-"] if on_ray else [])),
        )
    out.print(trials)
    frontier = Table(title="time-cost frontier (predicted)", box=box.SIMPLE)
    for name in ("workers", "memory MB", "wall time s", "cost USD", ""):
        frontier.add_column(name, justify="right")
    for p in decision.frontier:
        mark = "<-" if (p.workers, p.memory_mb) == (decision.workers, decision.memory_mb) else ""
        frontier.add_row(
            str(p.workers), str(p.memory_mb), f"{p.time_s:.0f}", f"{p.cost_usd:.4f}", mark
        )
    out.print(frontier)
    out.print(
        f"profiled in {result.profile.profile_s:.1f} s "
        f"({result.profile.s_per_sample_1_vcpu * 1e3:.3f} ms/sample on 1 vCPU, "
        f"{result.profile.num_params:,} parameters); planned in {result.planning_s:.1f} s; "
        f"plot: {png}"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
