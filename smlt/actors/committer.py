"""Committing checkpoints, off the path of everything that must not wait on the object store.

Workers write their checkpoint shards themselves and report each shard's size and sha256; a
checkpoint is ready once every rank of its generation has (the progress follower notices periodic
ones, the scheduler the one at a generation's end). :class:`Committer` turns ready checkpoints
into committed ones, one at a time and in the order they became ready: it writes the marker from
the reported records (:meth:`~smlt.storage.checkpoint.CheckpointStore.commit` downloads nothing),
then prunes to the newest ``keep``. It runs as a task of its own, fed through a memory channel,
so that the follower, which must keep folding reports into positions the failure handling
relies on, never waits for a slow bucket.

A checkpoint that cannot be committed costs progress only if Redis is lost later, never the
run: Redis still holds the state. So a failed commit (or prune) is reported to ``on_failure``
and the committer carries on with the next one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import trio

from smlt.actors.progress import CheckpointReady
from smlt.errors import SmltError
from smlt.storage.checkpoint import CheckpointStore

__all__ = ["Committer"]


class Committer:
    """Commits and prunes the checkpoints of one job. ``committed()`` is thread-safe.

    ``meta_before(iteration)`` gives what the marker of ``iteration`` carries (the history
    before it); ``on_failure(record)`` is told about every commit or prune that failed.
    """

    def __init__(
        self,
        checkpoints: CheckpointStore,
        num_params: int,
        *,
        keep: int,
        meta_before: Callable[[int], Mapping[str, Any]],
        on_failure: Callable[[dict[str, Any]], None],
    ) -> None:
        self.checkpoints = checkpoints
        self.num_params = num_params
        self.keep = keep
        self._meta_before = meta_before
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._committed: list[int] = []
        self._skipped = 0

    def committed(self) -> list[int]:
        """The iterations committed so far, in commit order (pruned ones included)."""
        with self._lock:
            return list(self._committed)

    def statistics(self) -> dict[str, int]:
        with self._lock:
            return {"committed": len(self._committed), "skipped": self._skipped}

    async def run(self, ready: trio.MemoryReceiveChannel[CheckpointReady]) -> None:
        """Commit what arrives until the channel is closed and drained."""
        async with ready:
            async for checkpoint in ready:
                await trio.to_thread.run_sync(self.commit, checkpoint)

    def commit(self, ready: CheckpointReady) -> bool:
        """Commit ``ready`` and prune; False if it failed or was not needed: a checkpoint at or
        before one already committed (the periodic and the boundary checkpoint of the same
        iteration, or a late one) is skipped, since a newer restart point exists."""
        with self._lock:
            if ready.iteration <= max(self._committed, default=-1):
                self._skipped += 1
                return False
        where = {"checkpoint": ready.iteration, "generation": ready.generation}
        try:
            self.checkpoints.commit(
                ready.iteration,
                ready.workers,
                self.num_params,
                self._meta_before(ready.iteration),
                ready.shards,
            )
        except SmltError as exc:
            self._on_failure({**where, "cause": str(exc)})
            return False
        with self._lock:
            self._committed.append(ready.iteration)
        try:
            self.checkpoints.prune(self.keep)
        except SmltError as exc:
            self._on_failure({**where, "cause": f"pruning older checkpoints failed: {exc}"})
        return True
