"""The artifact manager's client side: check a task, then package its code and data.

A training set in memory and one streamed in chunks (:class:`~smlt.task.StreamData`, for a set
larger than the client's memory) are packaged by the same code: chunks go in, full shards come
out and are uploaded at once, and the manifest is written last.

What is written, and how workers read it, is :mod:`smlt.storage.artifacts`.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from smlt.errors import SmltWarning
from smlt.storage.artifacts import (
    DEFAULT_SHARD_BYTES,
    ArtifactManifest,
    Shard,
    TensorSpec,
    artifact_prefix,
    check_shard_bytes,
    manifest_key,
)
from smlt.storage.objects import ObjectStore
from smlt.task import (
    StreamData,
    Task,
    TaskData,
    check_loss,
    check_loss_reduction,
    check_model,
    check_optimizer,
    check_task,
    load_task,
    transformed_head,
)
from smlt.worker.memory import measure_memory
from smlt.worker.selfcheck import check_update

__all__ = ["package_task"]


def package_task(
    spec: str,
    store: ObjectStore,
    job_id: str,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    *,
    check: bool = True,
    on_shard: Callable[[Shard], None] | None = None,
    precision: str = "fp32",
) -> ArtifactManifest:
    """Import the task, validate it, and write its source, data shards and manifest to ``store``.

    ``data()`` is called once, here. With ``check`` the model, optimizer and loss are also run on
    two samples, the loss's reduction is checked against ``loss_reduction``, and one real smlt
    update runs (:func:`~smlt.worker.selfcheck.check_update`, its forward pass under the run's
    ``precision``), so a broken task fails on the client instead of on n paid workers; then the
    task's memory use is measured on a few samples (:func:`~smlt.worker.memory.measure_memory`)
    and kept in the manifest, for workers to choose their micro-batches by. Any earlier
    artifact of the same job is deleted first: its shards would not match the new manifest.
    ``on_shard`` is called after each shard upload, for progress display.

    A streamed ``data()`` (:class:`~smlt.task.StreamData`) is never held whole: the checks run
    on its head, and its chunks are cut into shards as they come, each shard hashed and
    uploaded as soon as it is full, so about one shard and one chunk are in memory at a time.
    Shards hold ``shard_bytes // bytes_per_sample`` samples each (the last fewer), whichever
    way the data came. The manifest is written last, once the number of samples is known; a
    chunk that fails its check deletes what was written, so no partial artifact is left.
    """
    check_shard_bytes(shard_bytes)
    prefix = artifact_prefix(job_id)
    task = load_task(spec)
    data = check_task(task)
    head = data.head
    memory_profile = None
    if check:
        seen = transformed_head(task, data)  # what loss() gets on the workers
        model = check_model(task)
        check_optimizer(task, model)
        tiny = seen.rows(0, min(2, seen.num_samples))
        check_loss(task, model, tiny)
        check_loss_reduction(task, model, seen)
        check_update(task, tiny, precision=precision)
        memory_profile = _memory_profile(task, seen, precision)
    source_path = Path(spec.rpartition(":")[0]).expanduser().resolve()
    source = source_path.read_bytes()

    store.delete_prefix(prefix)
    try:
        source_key = f"{prefix}source/{source_path.name}"
        store.put_bytes(source_key, source)
        writer = _ShardWriter(store, prefix, head, shard_bytes, on_shard)
        for chunk in data.chunks if isinstance(data, StreamData) else (data,):
            writer.add(chunk)
            del chunk  # not alive while the next chunk is read
        shards = writer.finish()
        manifest = ArtifactManifest(
            job_id=job_id,
            source_file=source_path.name,
            source_key=source_key,
            source_sha256=hashlib.sha256(source).hexdigest(),
            class_name=spec.rpartition(":")[2],
            num_samples=writer.num_samples,
            tensors=tuple(
                TensorSpec(str(dtype).removeprefix("torch."), shape)
                for dtype, shape in zip(head.dtypes, head.sample_shapes, strict=True)
            ),
            shards=tuple(shards),
            total_bytes=sum(s.num_bytes for s in shards),
            created_unix_s=time.time(),
            memory_profile=memory_profile,
        )
        store.put_bytes(manifest_key(job_id), manifest.to_json())
    except BaseException:
        store.delete_prefix(prefix)  # shards without a manifest are of no use to anyone
        raise
    return manifest


class _ShardWriter:
    """Cuts rows into shards of ``rows_per_shard`` samples as they are added, and uploads
    each shard as soon as it is full.

    A shard's bytes are, for each tensor in order, its rows one after the other (the format
    of :mod:`smlt.storage.artifacts`), so the rows added are copied out per tensor and joined
    when the shard is complete: what is held is the copy of one shard, never a chunk.
    """

    def __init__(
        self,
        store: ObjectStore,
        prefix: str,
        layout: TaskData,
        shard_bytes: int,
        on_shard: Callable[[Shard], None] | None,
    ) -> None:
        per_sample = layout.bytes_per_sample
        #: None: samples of no bytes (every tensor's sample shape has a 0), all in one shard.
        self.rows_per_shard = max(1, shard_bytes // per_sample) if per_sample else None
        self.num_samples = 0
        self._store = store
        self._prefix = prefix
        self._on_shard = on_shard
        self._pieces: list[list[bytes]] = [[] for _ in layout.tensors]
        self._pending = 0
        self._shards: list[Shard] = []

    def add(self, chunk: TaskData) -> None:
        offset = 0
        while offset < chunk.num_samples:
            room = chunk.num_samples - offset
            if self.rows_per_shard is not None:
                room = min(room, self.rows_per_shard - self._pending)
            for pieces, rows in zip(self._pieces, chunk.rows(offset, offset + room), strict=True):
                pieces.append(_raw_bytes(rows))
            offset += room
            self._pending += room
            if self._pending == self.rows_per_shard:
                self._flush()

    def finish(self) -> list[Shard]:
        """Upload the last, partial shard; the shards written, in order."""
        if self._pending:
            self._flush()
        return self._shards

    def _flush(self) -> None:
        payload = b"".join(piece for pieces in self._pieces for piece in pieces)
        for pieces in self._pieces:
            pieces.clear()
        shard = Shard(
            key=f"{self._prefix}shards/{len(self._shards):05d}.bin",
            start=self.num_samples,
            stop=self.num_samples + self._pending,
            num_bytes=len(payload),
            sha256=hashlib.sha256(payload).hexdigest(),
        )
        self._store.put_bytes(shard.key, payload)
        del payload
        self._shards.append(shard)
        self.num_samples = shard.stop
        self._pending = 0
        if self._on_shard is not None:
            self._on_shard(shard)


def _memory_profile(task: Task, data: TaskData, precision: str) -> dict[str, Any] | None:
    """The task's memory profile for the manifest; None, with a warning, where it cannot be
    measured (the task ran its update above, so this is smlt's probe failing, not the task):
    the run then goes on without automatic micro-batches, rather than not at all."""
    try:
        return measure_memory(task, data, precision=precision).to_dict()
    except Exception as exc:
        warnings.warn(
            f"{type(task).__name__}: smlt could not measure the task's memory use "
            f"({type(exc).__name__}: {exc}); workers will not split their slice of the batch "
            "by themselves (--micro-batch still does)",
            SmltWarning,
            stacklevel=3,
        )
        return None


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
