"""How much a worker's slice costs in memory, and the micro-batch size that makes it fit.

Without ``--micro-batch`` a worker goes through its slice in micro-batches
(:mod:`smlt.worker.microbatch`) only when the slice would not fit its memory
(the generation's memory size). The decision must come out the same for every attempt of a rank,
or a replacement could sum in another order than the invocation it replaces and break
bit-identity after a kill; it is therefore a function of values every attempt sees identically
(:func:`plan_micro_batch`): the payload (the generation's memory, workers, batch size) and a
:class:`MemoryProfile` the client measured once on a tiny batch (:func:`measure_memory`) and
stored in the artifact manifest, never a live measurement on the worker. A rank re-invoked with
twice the memory after running out of it twice (:mod:`smlt.actors.failures`) keeps the
generation's ``M``: the extra memory is headroom for the same computation. Re-scaling to another
memory size may change ``M`` between generations: that changes float rounding, and for a model
with dropout or BatchNorm what its micro-batches draw and normalize by, as a change of the
worker count does.

The prediction (:func:`worker_bytes`) is deliberately simple and errs on the large side: the
runtime, the data shards the reader keeps, the slice's input rows, a few copies of the flat
parameter vector, the optimizer state (1/n of it when sharded), and what autograd saves per
sample times a headroom for the backward pass's transients.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from smlt.errors import ConfigError
from smlt.protocol.model import FlatModel
from smlt.protocol.payload import check_micro_batch
from smlt.task import Batch, Task, TaskData
from smlt.worker.optim import is_shardable
from smlt.worker.precision import check_precision, compute_precision

__all__ = [
    "ACTIVATION_HEADROOM",
    "MODEL_COPIES",
    "RUNTIME_MB",
    "MemoryProfile",
    "check_micro_batch",
    "measure_memory",
    "plan_micro_batch",
    "samples_that_fit",
    "worker_bytes",
]

_MIB = 2**20
#: A worker's memory before any tensor of the task: Python, torch, numpy, redis-py and smlt
#: imported (227 MB resident on the project machine with torch 2.13), plus the platform's own
#: runtime (Ray's core worker, Lambda's bootstrap).
RUNTIME_MB = 300
#: Copies of the flat parameter vector a worker holds at once: the vector itself, the flat
#: gradient, the parameters' own ``.grad`` tensors, the frames the exchange uploads and downloads,
#: and the mean it reduces into.
MODEL_COPIES = 6
#: Peak memory of a forward and backward pass, per byte autograd saves for the backward pass:
#: the backward pass holds the gradients of the activations beside them, and the forward pass's
#: temporaries come and go.
ACTIVATION_HEADROOM = 2.0
#: The batch sizes the client measures saved bytes at; their difference is the per-sample slope.
_PROBE_SAMPLES = (2, 4)


@dataclass(frozen=True)
class MemoryProfile:
    """What the client measured of a task, once, for workers to size their micro-batches by.

    Byte counts, not timings or resident sizes: they are the same wherever and however often
    they are measured (for the same task and torch), and every worker reads the same numbers.
    """

    #: Bytes autograd saves for the backward pass per sample of a micro-batch.
    activation_bytes_per_sample: int
    #: Bytes it saves whatever the batch size (weights, and under bf16 their bfloat16 copies).
    activation_base_bytes: int
    #: Bytes of one input sample (every tensor of ``data()``): the slice is read whole.
    input_bytes_per_sample: int
    #: Bytes of the flat parameter vector (parameters and float buffers, float32).
    model_bytes: int
    #: Bytes of the whole optimizer's state after a step.
    optimizer_state_bytes: int
    #: Whether owners shard the optimizer (each holds 1/n of its state) or every worker steps
    #: all of it.
    sharded: bool
    #: The precision the activations were measured under (bf16 saves smaller tensors).
    precision: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any, where: str = "memory profile") -> MemoryProfile:
        """Read what :meth:`to_dict` wrote; ConfigError naming ``where`` if it is not that."""
        names = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or set(raw) != names:
            raise ConfigError(
                f"{where} is not a memory profile: expected the fields {sorted(names)}, got "
                f"{sorted(raw) if isinstance(raw, dict) else type(raw).__name__}"
            )
        counts = [raw[n] for n in names - {"sharded", "precision"}]
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise ConfigError(f"{where}: byte counts must be integers >= 0, got {raw}")
        return cls(**{**raw, "sharded": bool(raw["sharded"])})


def measure_memory(task: Task, data: TaskData, *, precision: str = "fp32") -> MemoryProfile:
    """Measure ``task``'s :class:`MemoryProfile` on a few of its samples (on the client).

    Activations are what autograd saves for the backward pass, counted by
    ``torch.autograd.graph.saved_tensors_hooks`` (each tensor once) at two small batch sizes
    under ``precision``; the difference is the bytes per sample, the rest is what any batch
    saves. The optimizer's state is counted after one step on the small batch.
    """
    precision = check_precision(precision)
    torch.manual_seed(0)
    model = task.model()
    flat = FlatModel(model)
    optimizer = task.optimizer(model)
    model.train()
    sizes = sorted({min(k, data.num_samples) for k in _PROBE_SAMPLES})
    saved = [_saved_bytes(task, model, data.rows(0, k), precision) for k in sizes]
    if len(sizes) == 2:
        slope = max(0, math.ceil((saved[1] - saved[0]) / (sizes[1] - sizes[0])))
        base = max(0, saved[0] - slope * sizes[0])
    else:  # one or two samples in all: everything counts per sample, the safe side
        slope, base = math.ceil(saved[0] / sizes[0]), 0
    optimizer.step()  # the gradient of the last probe; the state exists after the first step
    state_bytes = sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )
    return MemoryProfile(
        activation_bytes_per_sample=slope,
        activation_base_bytes=base,
        input_bytes_per_sample=data.bytes_per_sample,
        model_bytes=flat.size * 4,
        optimizer_state_bytes=state_bytes,
        sharded=is_shardable(optimizer),
        precision=precision,
    )


def _saved_bytes(task: Task, model: torch.nn.Module, batch: Batch, precision: str) -> int:
    """Bytes autograd saves for ``task.loss(model, batch)``'s backward pass (which runs, so the
    graph is freed and the parameters have a gradient)."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        size = tensor.numel() * tensor.element_size()
        try:
            where = tensor.data_ptr()
        except RuntimeError:  # no storage of its own (sparse, wrapper subclasses)
            where = id(tensor)
        if (where, size) not in seen:  # one tensor saved by several ops is held once
            seen.add((where, size))
            total += size
        return tensor

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with compute_precision(precision):
            loss = task.loss(model, batch)
    loss.backward()
    return total


# --- the decision ----------------------------------------------------------------------------


def worker_bytes(
    profile: MemoryProfile, *, micro_batch: int, slice_samples: int, workers: int, data_bytes: int
) -> int:
    """A worker's predicted peak memory, in bytes, going through a slice of ``slice_samples``
    in micro-batches of ``micro_batch``, with ``data_bytes`` of data held by its reader."""
    state = profile.optimizer_state_bytes
    if profile.sharded:
        state = -(-state // workers)
    fixed = (
        RUNTIME_MB * _MIB
        + data_bytes
        + slice_samples * profile.input_bytes_per_sample
        + MODEL_COPIES * profile.model_bytes
        + state
    )
    activations = profile.activation_base_bytes + micro_batch * profile.activation_bytes_per_sample
    return fixed + math.ceil(ACTIVATION_HEADROOM * activations)


def samples_that_fit(
    profile: MemoryProfile, *, memory_mb: int, slice_samples: int, workers: int, data_bytes: int
) -> int:
    """The largest micro-batch whose pass fits ``memory_mb`` (0: not even one sample)."""
    budget = memory_mb * _MIB
    empty = worker_bytes(
        profile, micro_batch=0, slice_samples=slice_samples, workers=workers, data_bytes=data_bytes
    )
    per_sample = ACTIVATION_HEADROOM * profile.activation_bytes_per_sample
    if budget < empty:
        return 0
    if per_sample <= 0:
        return slice_samples
    return int((budget - empty) // per_sample)


def plan_micro_batch(
    *,
    requested: int | None,
    slice_samples: int,
    memory_mb: int,
    workers: int,
    profile: MemoryProfile | None,
    data_bytes: int = 0,
) -> int:
    """The micro-batch size ``M`` a worker uses, in ``[1, slice_samples]``.

    ``slice_samples`` is the largest slice any rank gets (``ceil(B / n)``), so every rank and
    iteration of a generation uses the same ``M``. ``requested`` (``--micro-batch``) wins;
    without it, the whole slice where it fits ``memory_mb`` by ``profile``'s measure, else the
    largest micro-batch that fits (at least 1), and the whole slice when there is no profile
    (a task packaged without the client-side check). A pure function of its arguments, which
    every attempt of a rank sees identically (see the module's docstring for why that matters).
    """
    whole = max(1, slice_samples)
    if requested is not None:
        return max(1, min(requested, whole))
    if profile is None:
        return whole
    fits = samples_that_fit(
        profile,
        memory_mb=memory_mb,
        slice_samples=whole,
        workers=workers,
        data_bytes=data_bytes,
    )
    return max(1, min(fits, whole))
