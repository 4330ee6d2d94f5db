"""Checkpoints in the object store, committed atomically: a marker written last.

Layout under ``jobs/<job>/checkpoints/<iteration:09d>/``: ``param-<s>.bin`` and
``optim-<s>.bin`` for every shard s (written by the shard's owner, in parallel), then
``COMMITTED.json`` (written by the scheduler once every shard is there) with the shards' sizes
and sha256 and the caller's metadata. A folder without its marker is never loaded, so a
checkpoint interrupted halfway is invisible, and every shard is verified when read.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from smlt.errors import ObjectNotFoundError, ObjectStoreError
from smlt.storage.objects import ObjectStore

__all__ = ["Checkpoint", "CheckpointStore"]

Kind = Literal["param", "optim"]
_MARKER = "COMMITTED.json"


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint: where its shards are and what they must hash to."""

    store: ObjectStore
    prefix: str
    iteration: int
    workers: int
    num_params: int
    shards: dict[str, dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def read_shard(self, kind: Kind, shard: int) -> bytes:
        name = f"{kind}-{shard}.bin"
        record = self.shards.get(name)
        if record is None:
            raise ObjectNotFoundError(f"checkpoint {self.iteration} has no shard {name}")
        key = f"{self.prefix}/{name}"
        data = self.store.get_bytes(key)
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise ObjectStoreError(
                f"{self.store.url}/{key} does not match the hash committed for it: corrupted"
            )
        return data


class CheckpointStore:
    """The checkpoints of one job."""

    def __init__(self, store: ObjectStore, job_id: str) -> None:
        self.store = store
        self.job_id = job_id
        self.root = f"jobs/{job_id}/checkpoints"

    def _prefix(self, iteration: int) -> str:
        return f"{self.root}/{iteration:09d}"

    def write_shard(self, iteration: int, shard: int, kind: Kind, data: bytes) -> None:
        """Store one shard (idempotent: a re-executed owner writes the same bytes)."""
        self.store.put_bytes(f"{self._prefix(iteration)}/{kind}-{shard}.bin", data)

    def commit(
        self, iteration: int, workers: int, num_params: int, meta: dict[str, Any]
    ) -> Checkpoint:
        """Check every shard is there, hash it, and write the marker last."""
        prefix = self._prefix(iteration)
        shards: dict[str, dict[str, Any]] = {}
        for s in range(workers):
            for kind in ("param", "optim"):
                name = f"{kind}-{s}.bin"
                try:
                    data = self.store.get_bytes(f"{prefix}/{name}")
                except ObjectNotFoundError as exc:
                    raise ObjectStoreError(
                        f"cannot commit checkpoint {iteration}: {prefix}/{name} is missing"
                    ) from exc
                shards[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        record = {
            "iteration": iteration,
            "workers": workers,
            "num_params": num_params,
            "shards": shards,
            "created_unix_s": time.time(),
            "meta": meta,
        }
        self.store.put_bytes(f"{prefix}/{_MARKER}", json.dumps(record).encode())
        return Checkpoint(self.store, prefix, iteration, workers, num_params, shards, meta)

    def list_committed(self) -> list[int]:
        found = []
        for key in self.store.list(self.root):
            if key.endswith(f"/{_MARKER}"):
                found.append(int(key.split("/")[-2]))
        return sorted(found)

    def load(self, iteration: int) -> Checkpoint:
        prefix = self._prefix(iteration)
        try:
            record = json.loads(self.store.get_bytes(f"{prefix}/{_MARKER}"))
        except ValueError as exc:
            raise ObjectStoreError(f"{prefix}/{_MARKER} is not valid JSON") from exc
        return Checkpoint(
            self.store,
            prefix,
            record["iteration"],
            record["workers"],
            record["num_params"],
            record["shards"],
            record.get("meta", {}),
        )

    def latest(self) -> Checkpoint | None:
        committed = self.list_committed()
        return self.load(committed[-1]) if committed else None

    def prune(self, keep: int) -> None:
        """Delete all but the newest ``keep`` committed checkpoints."""
        for iteration in self.list_committed()[:-keep] if keep > 0 else []:
            self.store.delete_prefix(self._prefix(iteration))
