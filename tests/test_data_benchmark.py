"""benchmarks/data.py: its arithmetic, its watcher, and the whole script on a few MB.

The end-to-end test runs ``python -m benchmarks.data --quick`` as the README's command does, on
2 workers and 8 MB (four ``smlt train`` runs on Ray: new and old, local and through moto's S3;
the old code from a temporary git worktree of the old commit), and checks what holds by
construction, not the figures' sizes, which depend on the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks import data as bench
from benchmarks.data_figures import label_tv, shuffle_quality
from benchmarks.data_run import TreeWatch

ROOT = Path(__file__).resolve().parent.parent


def test_label_tv_is_zero_for_a_batch_mixed_like_the_set_and_large_for_one_class() -> None:
    labels = np.repeat(np.arange(4), 25)  # 100 samples, 4 classes of 25
    mixed = np.array([0, 25, 50, 75])  # one of each class
    assert label_tv([mixed], labels, 4) == pytest.approx(0.0)
    one_class = np.arange(10)  # ten samples of class 0
    assert label_tv([one_class], labels, 4) == pytest.approx(0.75)
    assert label_tv([mixed, one_class], labels, 4) == pytest.approx(0.375)


def test_shuffle_quality_orders_no_shuffle_worst_on_sorted_labels() -> None:
    n, classes = 20_000, 10
    labels = (np.arange(n) * classes // n).astype(np.int64)
    sizes = [1000] * 20
    q = shuffle_quality(labels, sizes, 500, classes=classes, epochs=1)
    assert q["no_shuffle"] > 0.8  # a batch of a sorted set holds one class, two at most
    assert q["uniform_permutation"] < 0.15
    assert q["uniform_permutation"] <= q["new"] < q["no_shuffle"]


def test_generate_writes_label_sorted_file_pairs_the_two_tasks_read_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = bench.generate(tmp_path, 200 * bench.SAMPLE_BYTES, file_bytes=64 * bench.SAMPLE_BYTES)
    assert written["samples"] == 200 and written["files"] == 4
    assert written["bytes"] == 200 * bench.SAMPLE_BYTES
    labels = bench.labels_of(tmp_path)
    assert labels.tolist() == sorted(labels.tolist()) and set(labels.tolist()) == set(range(10))

    from benchmarks.data_task import DATA_DIR_ENV, InMemoryImages, StreamingImages

    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    chunks = list(StreamingImages().data())
    assert [len(x) for x, _ in chunks] == [64, 64, 64, 8]
    x, y = InMemoryImages().data()
    assert np.array_equal(np.concatenate([c[0] for c in chunks]), x)
    assert np.array_equal(np.concatenate([c[1] for c in chunks]), y)
    assert x.dtype == np.uint8 and x.shape[1:] == bench.IMAGE_SHAPE and y.dtype == np.int64


def test_tree_watch_sees_a_childs_peak_memory_and_reads(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(8 * 2**20))
    child = (
        "import sys, time\n"
        "a = bytearray(200 * 2**20)\n"  # touched: 200 MiB resident
        "del a\n"
        f"open({str(blob)!r}, 'rb').read()\n"
        "time.sleep(1.0)\n"
    )
    # A grandchild, as Ray's workers are grandchildren of smlt train.
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])",
        ]
    )
    watch = TreeWatch(proc.pid, interval_s=0.05)
    watch.start()
    proc.wait(timeout=60)
    watch.stop()
    grandchildren = [pid for pid in watch.peak if pid != proc.pid]
    assert grandchildren
    pid = max(grandchildren, key=lambda p: watch.peak[p])
    assert watch.peak[pid] >= 200 * 2**20
    assert watch.reads[pid][-1][1] - watch.reads[pid][0][1] >= 8 * 2**20


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.skipif(
    os.environ.get("SMLT_BENCHMARK_TESTS") != "1",
    reason="3 min of four smlt train runs and git history back to the old commit: run with "
    "SMLT_BENCHMARK_TESTS=1 (the suite must stay under 15 min)",
)
def test_the_quick_benchmark_runs_end_to_end_and_its_figures_hold_together(
    tmp_path: Path,
) -> None:
    out = tmp_path / "data.json"
    began = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "benchmarks.data", "--quick", "--json", str(out)],
        cwd=ROOT,
        check=True,
        timeout=1100,
    )
    text = out.read_text()
    data = json.loads(text)
    # Credentials never reach the JSON: the fake S3 keys, the Redis URL's password.
    for secret in ("smlt-bench-secret-key", "smlt-bench-access-key", "redis://", "SECRET"):
        assert secret not in text
    assert data["workers"] == 2 and data["dataset_bytes"] > 0
    for key in ("bytes_read_per_worker", "shard_loads_per_worker_per_epoch", "data_share"):
        assert key in data["method"]
    sections = [data, data["s3"]]
    for section in sections:
        q = section["shuffle_quality"]
        assert q["no_shuffle"] > q["new"] and q["no_shuffle"] > q["uniform_permutation"]
        for which in ("new", "old"):
            f = section[which]
            for key in (
                "bytes_read_per_worker",
                "shard_loads_per_worker_per_epoch",
                "worker_peak_rss_mb",
                "client_peak_rss_mb",
                "data_share",
            ):
                assert f[key] is not None, (which, key)
            assert 0 < f["data_share"] < 1
            assert f["worker_peak_rss_mb"] > 0 and f["client_peak_rss_mb"] > 0
            assert sorted(f["worker_peak_rss_mb_by_rank"]) == ["0", "1"]
            assert 1 <= f["shard_loads_per_worker_per_epoch"] <= max(1, f["shards"]) * 4
        new, old = section["new"], section["old"]
        assert old["smlt_imported_from"].endswith("smlt/__init__.py")
        assert old["code"] == bench.OLD_COMMIT and new["code"] != bench.OLD_COMMIT
        assert new["iterations_run"] == new["iterations_per_epoch"]  # the whole epoch
        assert old["iterations_run"] == 4
        # Every shard is read by some rank, and none more than its rank's plan holds.
        assert sum(new["shard_loads_by_rank"].values()) >= new["shards"] > 1
        assert max(new["shard_loads_by_rank"].values()) <= new["shards"]
        # Each shard is downloaded at least once, hence every byte of the set.
        assert new["reader_downloads_total"] >= new["shards"]
        assert new["reader_bytes_downloaded_total"] >= section["dataset"]["bytes"]
    assert time.monotonic() - began < 1100
