"""What a worker is told when it is invoked, and what it answers.

Payloads are small and JSON-able (they travel in a Lambda or OpenWhisk invocation body, at most
a few KB; tensors never do). A worker needs nothing else: the task code and data come from the
object store, the parameters from the parameter store.

The payload carries the Redis URL with its password: backends pass it to the function but never
log it, and :meth:`WorkerPayload.redacted` is what goes into logs and result files.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from smlt.errors import ConfigError
from smlt.storage.redis_server import redact_url

__all__ = [
    "PRECISIONS",
    "StopReason",
    "WorkerPayload",
    "WorkerReport",
    "check_clip_grad_norm",
    "check_micro_batch",
    "check_precision",
]


class StopReason:
    """Why a worker's invocation ended (strings, so reports stay JSON)."""

    FINISHED = "finished"  # the job reached its last iteration
    STOP_ITERATION = "stop_iteration"  # the generation agreed to stop (a peer or the scheduler)
    TIME_LIMIT = "time_limit"  # this function's remaining time fell under the margin


#: The compute precisions a run may ask for (``--precision``): float32 throughout, or the forward
#: and loss under ``torch.autocast("cpu", dtype=torch.bfloat16)``; parameters, optimizer state
#: and the exchange are float32 either way.
PRECISIONS = ("fp32", "bf16")


# The run's training options, checked once for the client (before anything starts: no torch
# here) and again by every worker that reads them from its payload, with the same rule and the
# same message naming the flag.


def check_precision(value: Any) -> str:
    """``value`` (a run's ``precision`` option; None: the default) checked: ``"fp32"`` or
    ``"bf16"``. Raises ConfigError naming ``--precision``."""
    if value is None:
        return PRECISIONS[0]
    if isinstance(value, str) and value in PRECISIONS:
        return value
    raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {value!r}")


def check_micro_batch(value: Any) -> int | None:
    """A run's ``micro_batch`` option checked: None (automatic) or an integer >= 1. Raises
    ConfigError naming ``--micro-batch``."""
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= 1:
        return int(value)
    raise ConfigError(
        f"--micro-batch must be an integer >= 1 (samples per micro-batch), got {value!r}; leave "
        "it out to split only where a worker's slice would not fit its memory"
    )


def check_clip_grad_norm(value: Any) -> float | None:
    """A run's ``clip_grad_norm`` option checked: None (the task's) or a positive finite
    number. Raises ConfigError naming ``--clip-grad-norm``."""
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number) and number > 0:
            return number
    raise ConfigError(
        "--clip-grad-norm must be a positive number (the largest global gradient norm a step "
        f"may take), got {value!r}"
    )


@dataclass(frozen=True)
class WorkerPayload:
    """One invocation of rank ``rank`` in generation ``generation`` of job ``job_id``."""

    job_id: str
    rank: int
    workers: int
    memory_mb: int
    redis_urls: tuple[str, ...]
    object_store_url: str
    batch_size: int
    total_iterations: int
    start_iteration: int = 0
    stop_iteration: int | None = None
    generation: int = 0
    seed: int = 0
    shard_timeout_s: float = 120.0
    function_timeout_s: float | None = None
    eval_every_epoch: bool = True
    attempt: int = 0
    session: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.workers:
            raise ConfigError(f"rank {self.rank} out of range for {self.workers} workers")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if not 0 <= self.start_iteration <= self.total_iterations:
            raise ConfigError(
                f"start iteration {self.start_iteration} outside [0, {self.total_iterations}]"
            )
        if not self.redis_urls:
            raise ConfigError("a worker needs at least one Redis URL")

    @property
    def end_iteration(self) -> int:
        """The iteration this invocation stops at (exclusive) unless time runs out first."""
        if self.stop_iteration is None:
            return self.total_iterations
        return min(self.stop_iteration, self.total_iterations)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["redis_urls"] = list(self.redis_urls)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerPayload:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"unknown worker payload fields: {sorted(unknown)}")
        data = dict(data)
        data["redis_urls"] = tuple(data.get("redis_urls", ()))
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"bad worker payload: {exc}") from exc

    def redacted(self) -> dict[str, Any]:
        """The payload for logs and result files: passwords removed."""
        data = self.to_dict()
        data["redis_urls"] = [redact_url(u) for u in self.redis_urls]
        return data

    def with_changes(self, **changes: Any) -> WorkerPayload:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class WorkerReport:
    """A worker's answer when its invocation ends normally."""

    rank: int
    generation: int
    first_iteration: int
    next_iteration: int
    stop_reason: str
    wall_s: float
    init_s: float
    checkpoint_iteration: int | None = None
    #: ``{"param": [size_bytes, sha256], "optim": [...]}`` of this rank's shards of that checkpoint.
    checkpoint_shards: dict[str, list[Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerReport:
        return cls(**data)
