"""The old worker's data path replayed without its I/O, to count the shards it loads.

The code before issue 11 (commit acb9d57) counts a reader's shard loads but never reports them.
This script, run with that commit's tree first on ``PYTHONPATH`` (by path, so that the folder it
sits in, not the current tree, is ``sys.path[0]``), builds the old
``smlt.storage.artifacts.DataReader`` over the old run's manifest and drives it exactly as the
old worker does (``GlobalBatchSampler(num_samples, batch_size, seed).worker_indices(t, rank,
workers)``, then what ``reader.rows(indices)`` does to shards: ``_shard(s)`` for every shard s
the indices fall in, in ascending order), with its I/O and row copies left out: a shard "loaded"
from the disk cache is counted, so the reader's own in-memory cache (``shards_in_memory``
decoded shards, LRU, in its ``_shard``) decides what is a load and what a hit, as in the run.
The script refuses to run if the old ``rows`` no longer walks shards that way. Output (stdout,
JSON): per rank, the cumulative loads after every iteration.

    PYTHONPATH=/tmp/smlt-old python benchmarks/data_replay.py --store DIR --job JOB \\
        --batch-size 4096 --workers 4 --seed 0 --iterations 555
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The old commit's modules (its tree is first on PYTHONPATH): DataReader lived in artifacts.py.
from smlt.storage.artifacts import ArtifactManifest, DataReader  # type: ignore[attr-defined]
from smlt.storage.objects import open_object_store
from smlt.worker.sampler import GlobalBatchSampler


class _CountingReader(DataReader):
    """The old reader with its disk reads, hashing and row copies replaced by a counter."""

    def _local_copy(self, shard_id: int) -> bytearray:
        self._disk_loads += 1
        return bytearray()

    def _decode(self, shard: Any, data: bytearray) -> tuple[torch.Tensor, ...]:
        return ()

    def touch(self, indices: np.ndarray) -> None:
        """What ``rows(indices)`` does to the shards, without copying rows: the same shards in
        the same order through the same ``_shard`` (its LRU and counters)."""
        for shard_id in np.unique(self.shard_ids(indices)):
            self._shard(int(shard_id))


def _check_rows_walks_shards_as_touch_does() -> None:
    """``touch`` mirrors the old ``rows``: refuse to replay a reader whose ``rows`` differs."""
    source = inspect.getsource(DataReader.rows)
    for line in ("owners = self.shard_ids(indices)", "for shard_id in np.unique(owners):"):
        if line not in source:
            raise SystemExit(f"the old DataReader.rows no longer has {line!r}: update touch()")
    if "self._shard(int(shard_id))" not in source:
        raise SystemExit("the old DataReader.rows no longer calls self._shard: update touch()")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, required=True)
    args = parser.parse_args()
    _check_rows_walks_shards_as_touch_does()
    store = open_object_store(args.store)
    manifest = ArtifactManifest.load(store, args.job)
    sampler = GlobalBatchSampler(manifest.num_samples, args.batch_size, args.seed)
    out: dict[str, Any] = {
        "shards": len(manifest.shards),
        "shard_bytes": [s.num_bytes for s in manifest.shards],
        "iterations_per_epoch": sampler.iterations_per_epoch,
        "shards_in_memory": None,
        "loads": {},
    }
    for rank in range(args.workers):
        # The cache folder is never touched: _local_copy reads nothing.
        reader = _CountingReader(store, manifest, Path("unused-cache"))
        out["shards_in_memory"] = reader.shards_in_memory
        cumulative = []
        for t in range(args.iterations):
            indices, _ = sampler.worker_indices(t, rank, args.workers)
            reader.touch(indices)
            stats = reader.statistics()
            cumulative.append(stats["disk_loads"] + stats["downloads"])
        out["loads"][str(rank)] = cumulative
    print(json.dumps(out))


if __name__ == "__main__":
    main()
