"""The old worker's data path replayed without its I/O, to count the shards it loads.

The code before issue 11 (commit acb9d57) counts a reader's shard loads but never reports them.
This script, run with that commit's tree first on ``PYTHONPATH`` (by path, so that the folder it
sits in, not the current tree, is ``sys.path[0]``), builds the old
``smlt.storage.artifacts.DataReader`` over the old run's manifest and drives it exactly as the
old worker does (``GlobalBatchSampler(num_samples, batch_size, seed).worker_indices(t, rank,
workers)`` then ``reader.rows(indices)`` every iteration), with only its I/O replaced: a shard
"loaded" from the disk cache is counted and decoded into zero-stride tensors of the right shape,
so the reader's own in-memory cache (``shards_in_memory`` decoded shards, LRU) decides what is a
load and what a hit, as in the run. Output (stdout, JSON): per rank, the cumulative loads after
every iteration.

    PYTHONPATH=/tmp/smlt-old python benchmarks/data_replay.py --store DIR --job JOB \\
        --batch-size 4096 --workers 4 --seed 0 --iterations 555
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

# The old commit's modules (its tree is first on PYTHONPATH): DataReader lived in artifacts.py.
from smlt.storage.artifacts import ArtifactManifest, DataReader  # type: ignore[attr-defined]
from smlt.storage.objects import open_object_store
from smlt.worker.sampler import GlobalBatchSampler


class _CountingReader(DataReader):
    """The old reader with its disk reads and hashing replaced by a counter."""

    def _local_copy(self, shard_id: int) -> bytearray:
        self._disk_loads += 1
        return bytearray()

    def _decode(self, shard: Any, data: bytearray) -> tuple[torch.Tensor, ...]:
        rows = shard.stop - shard.start
        return tuple(
            torch.zeros((1, *spec.sample_shape), dtype=spec.torch_dtype).expand(
                rows, *spec.sample_shape
            )
            for spec in self.manifest.tensors
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, required=True)
    args = parser.parse_args()
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
            reader.rows(indices)
            stats = reader.statistics()
            cumulative.append(stats["disk_loads"] + stats["downloads"])
        out["loads"][str(rank)] = cumulative
    print(json.dumps(out))


if __name__ == "__main__":
    main()
