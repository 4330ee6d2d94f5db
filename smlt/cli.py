"""The ``smlt`` command line: ``smlt train TASK ...``, ``smlt resume RUN_DIR``, ``smlt clean``.

Errors that smlt raises on purpose (bad task, unreachable Redis, a configuration that does not
fit) print as one paragraph and exit with status 2; anything else is a bug and keeps its
traceback. No credential is ever printed: Redis URLs appear as ``redis://:***@host:port``.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from smlt.errors import ConfigError, ObjectStoreError, SmltError
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
_EPOCH_FIELDS = ("epoch", "iteration", "train_loss", "samples_per_s")


@app.callback()
def _root() -> None:
    """Train PyTorch models data-parallel on serverless functions."""


@app.command()
def train(
    task: Annotated[str, typer.Argument(help="path/to/file.py:ClassName")],
    epochs: Annotated[int, typer.Option(help="passes over the training set")] = 1,
    batch_size: Annotated[int, typer.Option(help="global batch size (split across workers)")] = 256,
    workers: Annotated[int, typer.Option(help="number of workers")] = 1,
    memory_mb: Annotated[
        int | None, typer.Option(help="memory per worker (MB); CPU follows it, 1769 MB = 1 vCPU")
    ] = None,
    backend: Annotated[str, typer.Option(help="ray (local or --ray-address)")] = "ray",
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
        typer.Option(help="checkpoint every K iterations (default: every epoch)"),
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
) -> None:
    """Train TASK on WORKERS stateless workers; writes result.json, model.pt and plots."""
    from smlt.client.driver import train as run_training

    _run(
        lambda progress: run_training(
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
            rescales=_rescales(rescale or []),
            keep_checkpoints=keep_checkpoints,
            progress=progress,
        )
    )


@app.command()
def resume(
    run_dir: Annotated[Path, typer.Argument(help="the output folder of the run (has run.json)")],
    redis_url: Annotated[str | None, typer.Option(envvar="SMLT_REDIS_URL")] = None,
    ray_address: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Finish a run whose driver died, from its last committed checkpoint."""
    from smlt.client.driver import resume as resume_run

    _run(
        lambda progress: resume_run(
            run_dir, redis_url=redis_url, ray_address=ray_address, progress=progress
        )
    )


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
) -> None:
    """Remove old job folders (jobs/JOB/ in the object store) and workers' local cache folders.

    A folder goes when the newest file in it is older than --older-than; anything newer means
    the job may be running, and it is left alone, as is a cache folder a worker holds.
    """
    try:
        threshold_s = parse_duration(older_than, option="--older-than")
        _clean(object_store, threshold_s, older_than, dry_run=dry_run)
    except SmltError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


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


def _run(start: Any) -> None:
    display = _ProgressDisplay(console)
    try:
        with display:
            result = start(display.update)
    except SmltError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopped the workers and the embedded Redis[/]")
        raise typer.Exit(130) from None
    _print_summary(result)


class _ProgressDisplay:
    """A live line on a terminal; one line per epoch when output is not a terminal (CI, logs)."""

    def __init__(self, out: Console) -> None:
        self.console = out
        self.live = out.is_terminal
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=out,
            transient=False,
        )
        self._task: Any = None
        self._epochs_printed = 0

    def __enter__(self) -> _ProgressDisplay:
        if self.live:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.progress.stop()

    def update(self, status: dict[str, Any]) -> None:
        total = status["total_iterations"]
        done = status["iteration"]
        per_epoch = status["iterations_per_epoch"]
        epochs_total = max(1, total // per_epoch)
        epochs = status["epochs"]
        description = f"epoch {min(done // per_epoch + 1, epochs_total)}/{epochs_total}"
        if self.live:
            info = self._info(status, status["last"] or {}, epochs[-1] if epochs else {})
            if self._task is None:
                self._task = self.progress.add_task(description, total=total, info=info)
            self.progress.update(self._task, completed=done, description=description, info=info)
            return
        for entry in epochs[self._epochs_printed :]:
            record = {
                "iteration": entry["iteration"],
                "loss": entry["train_loss"],
                "samples_per_s": entry["samples_per_s"],
            }
            print(
                f"epoch {entry['epoch'] + 1}/{epochs_total}: {self._info(status, record, entry)}",
                file=sys.stderr,
                flush=True,
            )
        self._epochs_printed = len(epochs)

    @staticmethod
    def _info(status: dict[str, Any], last: dict[str, Any], metrics: dict[str, Any]) -> str:
        shown = {k: v for k, v in metrics.items() if k not in _EPOCH_FIELDS}
        return (
            f"it {last.get('iteration', -1) + 1}/{status['total_iterations']}  "
            f"loss {last.get('loss', float('nan')):.4f}  "
            f"{last.get('samples_per_s', 0.0):,.0f} samples/s  "
            f"{status['workers']} x {status['memory_mb']} MB  ${status['cost_usd']:.5f}"
            + "".join(f"  held-out {k} {v:.4f}" for k, v in shown.items())
        )


def _print_summary(result: Any) -> None:
    table = Table(title=f"smlt run {result.job_id}", show_header=False)
    for name, value in result.final_metrics.items():
        table.add_row(f"held-out {name}", f"{value:.4f}")
    if result.history:
        table.add_row("final training loss", f"{result.history[-1]['loss']:.4f}")
    cfg = result.configs[-1]
    table.add_row("workers x memory", f"{cfg['workers']} x {cfg['memory_mb']} MB")
    if result.optimizer:
        table.add_row("optimizer", f"{result.optimizer['class']}, {result.optimizer['mode']}")
    table.add_row(
        "iterations", f"{result.iterations} ({result.epochs} epochs of batch {result.batch_size})"
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
