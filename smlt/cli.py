"""The ``smlt`` command line: ``smlt train TASK ...``.

Errors that smlt raises on purpose (bad task, unreachable Redis, a configuration that does not
fit) print as one paragraph and exit with status 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from smlt.errors import SmltError

__all__ = ["app", "main"]

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
