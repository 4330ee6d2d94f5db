"""Issue 11's data pipeline against the old one, on a data set larger than a quarter of RAM.

    python -m benchmarks.data --json benchmarks/results/data.json --plot benchmarks/results/data.png

What it does, in a temporary folder:

1. **Generates** a data set of ``--dataset-gb`` (default 7 GB decimal: more than a quarter of this
   machine's 24 GiB) of small images: uint8 (3, 32, 32) and an int64 label, 3,080 bytes a
   sample, as ``x_000.npy, y_000.npy, ...`` file pairs of about 100 MB, each written through
   ``np.lib.format.open_memmap`` so that generation never holds more than one chunk. Labels are
   **sorted** (sample i has label ``i * 10 // N``: each file, hence each shard, holds one or two
   classes), the worst case for a shard-aware shuffle.
2. **Trains** ``benchmarks/data_task.py`` (one linear layer: the run measures the input
   pipeline) with ``smlt train --workers 4 --epochs 1 --batch-size 4096`` on the local Ray,
   through a local-folder object store, twice:

   - *new*: this tree, ``StreamingImages`` (``data()`` yields one chunk per file pair), the whole
     epoch unless ``--new-iterations`` bounds it;
   - *old*: commit acb9d57 (the code before issue 11) from a ``git worktree`` on
     ``PYTHONPATH``, ``InMemoryImages`` (that code needs the set in memory: the client
     concatenates it), for ``--old-iterations`` iterations only (its workers read nearly every
     shard every iteration), the per-epoch figures scaled from them.

   Each run is watched from outside (:mod:`benchmarks.data_run`): peak RSS and bytes read of the
   client and of each worker process, and the job's progress stream; ``METHOD`` in
   :mod:`benchmarks.data_figures` says how each figure is measured and goes into the JSON.
3. Does the same on a smaller set (``--s3-gb``, default 0.5) through moto's S3 server
   (``--object-store s3://bucket/prefix``), the path a cloud run takes.
4. Measures the **shuffle's quality** on the label-sorted set (pure numpy, from
   ``smlt.global_batches`` with the new run's manifest's shard sizes, without them, and with no
   shuffle).

``--quick`` runs it all on a few MB with 2 workers and a few iterations (the test does).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._output import command_line, write_outputs
from benchmarks.data_figures import METHOD, planned_shard_loads, run_figures, shuffle_quality
from benchmarks.data_run import run_train

__all__ = ["OLD_COMMIT", "generate", "main", "run"]

ROOT = Path(__file__).resolve().parent.parent
TASK_FILE = ROOT / "benchmarks" / "data_task.py"
#: Today's main before issue 11's data pipeline: what "old" runs.
OLD_COMMIT = "acb9d57"
IMAGE_SHAPE = (3, 32, 32)
SAMPLE_BYTES = int(np.prod(IMAGE_SHAPE)) + 8
CLASSES = 10
FILE_BYTES = 100 * 10**6
#: Bounds each ``smlt train``: a hang fails the benchmark instead of waiting for ever.
TIMEOUT_S = 3600
_FAKE_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "smlt-bench-access-key",
    "AWS_SECRET_ACCESS_KEY": "smlt-bench-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def generate(
    folder: Path, total_bytes: int, *, file_bytes: int = FILE_BYTES, seed: int = 0
) -> dict[str, Any]:
    """Write a label-sorted set of about ``total_bytes`` into ``folder``; what was written."""
    folder.mkdir(parents=True, exist_ok=True)
    n = max(CLASSES, total_bytes // SAMPLE_BYTES)
    per_file = max(1, file_bytes // SAMPLE_BYTES)
    rng = np.random.default_rng(seed)
    files = 0
    for number, start in enumerate(range(0, n, per_file)):
        stop = min(start + per_file, n)
        x = np.lib.format.open_memmap(
            folder / f"x_{number:03d}.npy",
            mode="w+",
            dtype=np.uint8,
            shape=(stop - start, *IMAGE_SHAPE),
        )
        x[:] = rng.integers(0, 256, size=x.shape, dtype=np.uint8)
        x.flush()
        del x
        y = np.lib.format.open_memmap(
            folder / f"y_{number:03d}.npy", mode="w+", dtype=np.int64, shape=(stop - start,)
        )
        y[:] = np.arange(start, stop, dtype=np.int64) * CLASSES // n
        y.flush()
        del y
        files += 1
    return {"samples": n, "bytes": n * SAMPLE_BYTES, "files": files, "sample_bytes": SAMPLE_BYTES}


def labels_of(folder: Path) -> np.ndarray:
    return np.concatenate([np.load(p) for p in sorted(folder.glob("y_*.npy"))])


@contextlib.contextmanager
def old_tree(path: Path | None) -> Iterator[Path]:
    """A worktree of :data:`OLD_COMMIT`: ``path`` if given (left alone), else a temporary one,
    removed afterwards."""
    if path is not None:
        yield path
        return
    where = Path(tempfile.mkdtemp(prefix="smlt-old-")) / "tree"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), OLD_COMMIT],
        check=True,
        capture_output=True,
    )
    try:
        yield where
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(where.parent, ignore_errors=True)


def _imported_from(tree: Path, cwd: Path) -> str:
    """Where ``import smlt`` resolves with ``tree`` on PYTHONPATH in ``cwd``: the run's code."""
    done = subprocess.run(
        [sys.executable, "-c", "import smlt; print(smlt.__file__)"],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _replay_old(
    tree: Path, store: str, job: str, batch: int, workers: int, iterations: int, cwd: Path
) -> dict[str, Any]:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "data_replay.py"),
            "--store",
            store,
            "--job",
            job,
            "--batch-size",
            str(batch),
            "--workers",
            str(workers),
            "--iterations",
            str(iterations),
        ],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    if done.returncode != 0:
        raise RuntimeError(f"old reader replay failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def _one(
    which: str,
    tree: Path,
    *,
    data_dir: Path,
    store_url: str,
    scratch: Path,
    args: argparse.Namespace,
    iterations: int | None,
    env: dict[str, str],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One watched run: its figures (without the old code's shard loads) and its manifest."""
    from smlt.storage.redis_server import RedisServer

    new = which == "new"
    task = f"{TASK_FILE}:{'StreamingImages' if new else 'InMemoryImages'}"
    train = [
        task,
        "--workers",
        str(args.workers),
        "--epochs",
        "1",
        "--batch-size",
        str(args.batch_size),
    ]
    if iterations is not None:
        train += ["--max-iterations", str(iterations)]
    if new and args.shard_mb is not None:
        train += ["--shard-mb", str(args.shard_mb)]
    run_env = {
        **env,
        "SMLT_BENCH_DATA_DIR": str(data_dir),
        "SMLT_CACHE_DIR": str(scratch / f"cache-{which}"),
    }
    cwd = scratch / f"cwd-{which}"
    cwd.mkdir(exist_ok=True)
    load_before = _load()
    with RedisServer() as redis:
        watched = run_train(
            tree,
            train,
            cwd=cwd,
            env=run_env,
            redis_url=redis.url,
            store_url=store_url,
            output=scratch / f"run-{which}",
            timeout_s=TIMEOUT_S,
        )
    manifest = watched.manifest
    ipe = -(-int(manifest["num_samples"]) // args.batch_size)
    figures = run_figures(watched, ipe)
    figures.update(
        command="smlt train "
        + " ".join(os.path.relpath(a, ROOT) if a.startswith(str(ROOT)) else a for a in train)
        + f" --object-store {store_url if store_url.startswith('s3://') else 'DIR'}",
        code=_head(tree),
        uncommitted_changes=_dirty(tree),
        smlt_imported_from=_imported_from(tree, cwd),
        shards=len(manifest["shards"]),
        shard_bytes_max=max(int(s["num_bytes"]) for s in manifest["shards"]),
        load_average_before=load_before,
        load_average_after=_load(),
    )
    return figures, manifest


def _head(tree: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def _dirty(tree: Path) -> list[str]:
    """Files under smlt/ that differ from the tree's commit (others edit the main tree)."""
    done = subprocess.run(
        ["git", "-C", str(tree), "status", "--porcelain", "--", "smlt"],
        capture_output=True,
        text=True,
        check=True,
    )
    return [line[3:] for line in done.stdout.splitlines()]


def measure(
    label: str,
    data_gb: float,
    store_for: Any,
    env: dict[str, str],
    tree_old: Path,
    root: Path,
    args: argparse.Namespace,
    on_run: Any = None,
) -> dict[str, Any]:
    """Generate ``data_gb`` and run new and old on it; the section of the JSON for ``label``."""
    scratch = root / label
    scratch.mkdir()
    began = time.perf_counter()
    dataset = generate(scratch / "dataset", int(data_gb * 1e9), file_bytes=args.file_bytes)
    dataset["generate_s"] = time.perf_counter() - began
    print(
        f"[{label}] generated {dataset['bytes'] / 1e9:.2f} GB in {dataset['files']} file pairs",
        flush=True,
    )
    out: dict[str, Any] = {"dataset": dataset}
    runs = [("new", args.new_tree, args.new_iterations), ("old", tree_old, args.old_iterations)]
    for which, tree, iterations in runs:
        if which.partition("_")[0] not in args.which:
            continue
        store_url = store_for(which)
        figures, manifest = _one(
            which,
            tree,
            data_dir=scratch / "dataset",
            store_url=store_url,
            scratch=scratch,
            args=args,
            iterations=iterations,
            env=env,
        )
        sizes = [int(s["stop"]) - int(s["start"]) for s in manifest["shards"]]
        if new := which == "new":
            # Each worker process caches in a folder of its own: its downloads are its loads.
            downloads = figures.get("reader_downloads_by_rank")
            if downloads:
                ipe, ran = figures["iterations_per_epoch"], figures["iterations_run"]
                figures["shard_loads_per_worker_per_epoch"] = (
                    float(np.mean(list(downloads.values()))) * ipe / ran
                )
                figures["shard_loads_by_rank"] = downloads
            figures["planned_shard_loads_by_rank"] = planned_shard_loads(
                int(manifest["num_samples"]), sizes, args.batch_size, args.workers
            )
        if new:
            out["shuffle_quality"] = shuffle_quality(
                labels_of(scratch / "dataset"), sizes, args.batch_size, classes=CLASSES
            )
        if not new:
            ipe = figures["iterations_per_epoch"]
            # The run deleted its artifact when it finished: the replay reads the manifest that
            # was copied out of the store during the run, from a folder of its own.
            replay_store = scratch / "replay-store"
            key = replay_store / "jobs" / manifest["job_id"] / "artifact" / "manifest.json"
            key.parent.mkdir(parents=True)
            key.write_text(json.dumps(manifest))
            replay = _replay_old(
                tree_old,
                str(replay_store),
                manifest["job_id"],
                args.batch_size,
                args.workers,
                ipe,
                scratch,
            )
            loads = replay["loads"]
            figures["shard_loads_per_worker_per_epoch"] = float(
                np.mean([v[-1] for v in loads.values()])
            )
            figures["shard_loads_by_rank"] = {k: v[-1] for k, v in loads.items()}
            figures["shards_in_memory"] = replay["shards_in_memory"]
            # Cross-check: the replay's loads over the measured iterations times the mean shard
            # size, against the measured bytes per iteration.
            first, last = 0, figures["iterations_run"] - 1
            mean_shard = float(np.mean(replay["shard_bytes"]))
            predicted = (
                np.mean([(v[last] - v[first]) / max(1, last - first) for v in loads.values()])
                * mean_shard
            )
            measured = np.mean(list(figures["bytes_read_per_iteration_by_rank"].values()))
            figures["old_loads_check"] = {
                "replayed_bytes_per_iteration": float(predicted),
                "measured_bytes_per_iteration": float(measured),
                "ratio": float(measured / predicted) if predicted else None,
            }
        read = figures["bytes_read_per_worker"]
        figures["bytes_read_per_worker_over_dataset"] = read / dataset["bytes"] if read else None
        out[which] = figures
        print(f"[{label}] {which}: " + _summary(figures), flush=True)
        if on_run is not None:
            on_run(label, out)
        shutil.rmtree(scratch / f"cache-{which}", ignore_errors=True)
    shutil.rmtree(scratch / "dataset", ignore_errors=True)
    return out


def _summary(f: dict[str, Any]) -> str:
    def show(value: float | None, scale: float, unit: str) -> str:
        return "?" if value is None else f"{value / scale:.3g}{unit}"

    return (
        f"{show(f['bytes_read_per_worker'], 1e9, ' GB')} read per worker per epoch, "
        f"{show(f.get('shard_loads_per_worker_per_epoch'), 1, '')} shard loads, worker peak "
        f"{show(f['worker_peak_rss_mb'], 1, ' MB')}, client peak "
        f"{show(f['client_peak_rss_mb'], 1, ' MB')}, data share {show(f['data_share'], 0.01, ' %')}"
    )


@contextlib.contextmanager
def moto_s3() -> Iterator[tuple[str, dict[str, str]]]:
    """moto's S3 server on 127.0.0.1 with a bucket; (the bucket, the environment boto3 needs).

    The environment is also this process's while the server runs (the benchmark reads the
    store too), as tests/s3_server.py does; its fake credentials never enter the JSON."""
    import boto3
    from moto.server import ThreadedMotoServer

    from tests.s3_server import _CLEARED, _free_port

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request on stderr
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {**_FAKE_S3_ENV, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}
    saved = {name: os.environ.get(name) for name in (*env, *_CLEARED)}
    os.environ.update(env)
    for name in _CLEARED:
        os.environ.pop(name, None)
    try:
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"]).create_bucket(
            Bucket="smlt-bench-data"
        )
        yield "smlt-bench-data", env
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        args.dataset_gb, args.s3_gb, args.workers, args.batch_size = 0.008, 0.004, 2, 256
        args.old_iterations, args.new_iterations, args.shard_mb, args.file_bytes = 4, None, 1, 10**6
    data: dict[str, Any] = {
        "command": command_line("benchmarks.data", args.argv),
        "cpus": os.cpu_count(),
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "load_average_start": _load(),
        "workers": args.workers,
        "batch_size": args.batch_size,
        "method": METHOD,
    }
    began = time.perf_counter()

    def save_partial(label: str, section: dict[str, Any]) -> None:
        # A late failure (the S3 part, a replay) must not lose the runs measured before it.
        if args.json:
            partial = args.json.with_suffix(".partial.json")
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({**data, label: section}, indent=2))

    with (
        tempfile.TemporaryDirectory(prefix="smlt-bench-data-") as tmp,
        old_tree(args.old_tree) as tree,
    ):
        root = Path(tmp)
        local = measure(
            "local",
            args.dataset_gb,
            lambda which: str(root / "local" / f"store-{which}"),
            {},
            tree,
            root,
            args,
            on_run=save_partial,
        )
        data["dataset_bytes"] = local["dataset"]["bytes"]
        data["dataset_over_ram"] = data["dataset_bytes"] / data["ram_bytes"]
        data.update(
            {k: v for k, v in local.items() if k in ("dataset", "new", "old", "shuffle_quality")}
        )
        if args.s3_gb > 0:
            with moto_s3() as (bucket, env):
                data["s3"] = measure(
                    "s3",
                    args.s3_gb,
                    lambda which: f"s3://{bucket}/{which}",
                    env,
                    tree,
                    root,
                    args,
                    on_run=save_partial,
                )
    data["load_average_end"] = _load()
    data["took_s"] = time.perf_counter() - began
    return data


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("bytes read per worker\nper epoch (GB)", lambda f: f["bytes_read_per_worker"] / 1e9),
        ("shard loads per worker\nper epoch", lambda f: f["shard_loads_per_worker_per_epoch"]),
        ("worker peak RSS (MB)", lambda f: f["worker_peak_rss_mb"]),
        ("client peak RSS (MB)", lambda f: f["client_peak_rss_mb"]),
        ("data share of iteration", lambda f: f["data_share"]),
    ]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3.0 * (len(panels) + 1), 3.4))
    for ax, (title, get) in zip(axes, panels, strict=False):
        values = [get(data["new"]), get(data["old"])]
        ax.bar(["new", "old"], values, color=["tab:blue", "tab:gray"])
        ax.set_title(title, fontsize=9)
        for x, v in enumerate(values):
            ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=8)
    q = data["shuffle_quality"]
    names = ["new", "uniform", "none"]
    values = [q["new"], q["uniform_permutation"], q["no_shuffle"]]
    axes[-1].bar(names, values, color=["tab:blue", "tab:green", "tab:red"])
    axes[-1].set_title("label TV distance per batch\n(label-sorted set)", fontsize=9)
    for x, v in enumerate(values):
        axes[-1].annotate(f"{v:.3f}", (x, v), ha="center", va="bottom", fontsize=8)
    fig.suptitle(
        f"{data['dataset_bytes'] / 1e9:.1f} GB, {data['workers']} workers, "
        f"batch {data['batch_size']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument(
        "--dataset-gb", type=float, default=7.0, help="the local data set (GB, 1e9 bytes)"
    )
    parser.add_argument(
        "--s3-gb", type=float, default=0.5, help="the data set through moto's S3 (0: skip)"
    )
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument(
        "--old-iterations", type=int, default=10, help="iterations the old code runs"
    )
    parser.add_argument("--new-iterations", type=int, default=None, help="default: the whole epoch")
    parser.add_argument(
        "--shard-mb", type=int, default=None, help="new code's --shard-mb (default: its own)"
    )
    parser.add_argument(
        "--file-bytes", type=int, default=FILE_BYTES, help="bytes per generated file pair"
    )
    parser.add_argument(
        "--new-tree", type=Path, default=ROOT, help="the new code (default: this tree)"
    )
    parser.add_argument(
        "--old-tree", type=Path, default=None, help=f"an existing worktree of {OLD_COMMIT}"
    )
    parser.add_argument("--which", default="new,old", help="which code to run: new,old (both)")
    parser.add_argument("--quick", action="store_true", help="a few MB, 2 workers (the test)")
    args = parser.parse_args(argv)
    args.argv = argv
    args.which = args.which.split(",")
    write_outputs(run(args), args.json, args.plot, plot)


if __name__ == "__main__":
    main()
