"""The artifact manager's client side: check a task, then package its code and data.

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

from smlt.errors import ConfigError, SmltWarning
from smlt.storage.artifacts import (
    DEFAULT_SHARD_BYTES,
    ArtifactManifest,
    Shard,
    TensorSpec,
    artifact_prefix,
    manifest_key,
)
from smlt.storage.objects import ObjectStore
from smlt.task import (
    Task,
    TaskData,
    check_loss,
    check_loss_reduction,
    check_model,
    check_optimizer,
    check_task,
    load_task,
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
    """
    if shard_bytes < 1:
        raise ConfigError(f"shard_bytes must be at least 1, got {shard_bytes}")
    prefix = artifact_prefix(job_id)
    task = load_task(spec)
    data = check_task(task)
    memory_profile = None
    if check:
        model = check_model(task)
        check_optimizer(task, model)
        tiny = data.rows(0, min(2, data.num_samples))
        check_loss(task, model, tiny)
        check_loss_reduction(task, model, data)
        check_update(task, tiny, precision=precision)
        memory_profile = _memory_profile(task, data, precision)
    source_path = Path(spec.rpartition(":")[0]).expanduser().resolve()
    source = source_path.read_bytes()

    store.delete_prefix(prefix)
    source_key = f"{prefix}source/{source_path.name}"
    store.put_bytes(source_key, source)
    shards = []
    for number, (start, stop) in enumerate(_shard_ranges(data, shard_bytes)):
        payload = b"".join(_raw_bytes(t) for t in data.rows(start, stop))
        shard = Shard(
            key=f"{prefix}shards/{number:05d}.bin",
            start=start,
            stop=stop,
            num_bytes=len(payload),
            sha256=hashlib.sha256(payload).hexdigest(),
        )
        store.put_bytes(shard.key, payload)
        shards.append(shard)
        if on_shard is not None:
            on_shard(shard)
    manifest = ArtifactManifest(
        job_id=job_id,
        source_file=source_path.name,
        source_key=source_key,
        source_sha256=hashlib.sha256(source).hexdigest(),
        class_name=spec.rpartition(":")[2],
        num_samples=data.num_samples,
        tensors=tuple(
            TensorSpec(str(t.dtype).removeprefix("torch."), tuple(t.shape[1:]))
            for t in data.tensors
        ),
        shards=tuple(shards),
        total_bytes=sum(s.num_bytes for s in shards),
        created_unix_s=time.time(),
        memory_profile=memory_profile,
    )
    store.put_bytes(manifest_key(job_id), manifest.to_json())
    return manifest


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


def _shard_ranges(data: TaskData, shard_bytes: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` runs of at most ``shard_bytes`` (but at least one sample)."""
    per_sample = data.bytes_per_sample
    rows = max(1, shard_bytes // per_sample) if per_sample else data.num_samples
    return [(s, min(s + rows, data.num_samples)) for s in range(0, data.num_samples, rows)]


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
