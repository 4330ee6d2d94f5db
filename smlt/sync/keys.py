"""Every Redis key smlt uses, built in one place.

Keys are built, never parsed: whoever needs a key calls the method that names it. Each key
carries the job, and every per-step key carries the iteration ``t``, the shard ``s`` and, for
contributions, the writer's rank ``r``, so two jobs on one Redis cannot see each other's keys and
a re-executed worker overwrites exactly its own earlier write.

Layout (``J`` = job id)::

    smlt:J:t{t}:grad:{s}:{r}     rank r's gradient slice for shard s at iteration t (s != r)
    smlt:J:t{t}:gready:{s}       stream: "rank r uploaded its slice of shard s" (owner s reads)
    smlt:J:t{t}:param:{s}        parameter shard s, version t (written by its owner after step t-1)
    smlt:J:t{t}:optim:{s}        optimizer-state shard s, version t
    smlt:J:t{t}:pready           stream: "owner s published param shard s of version t"
    smlt:J:t{t}:full:{r}         rank r's whole gradient (baselines only)
    smlt:J:t{t}:fready           stream: "rank r uploaded its whole gradient" (baselines only)
    smlt:J:t{t}:mean             the averaged gradient (centralized baseline only)
    smlt:J:t{t}:mready           stream: "the aggregator published the mean" (centralized only)
    smlt:J:progress              stream of worker reports (the paper's success flags)
    smlt:J:g{g}:stop             generation g: {"at": stop iteration, "requested": 0|1}
    smlt:J:g{g}:hb:{r}:{a}       generation g: attempt a of rank r is alive (expires unless renewed)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from smlt.errors import ConfigError

__all__ = ["JobKeys", "validate_job_id"]

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def validate_job_id(job: str) -> str:
    """``job`` if it is a safe key component (letters, digits, ``_.-``; at most 64)."""
    if not _JOB_ID.match(job):
        raise ConfigError(
            f"job id {job!r} is not usable in store keys: use 1-64 letters, digits, '_', '.', '-'"
        )
    return job


@dataclass(frozen=True)
class JobKeys:
    """Key builder for one job."""

    job: str

    def __post_init__(self) -> None:
        validate_job_id(self.job)

    @property
    def _prefix(self) -> str:
        return f"smlt:{self.job}"

    def grad(self, t: int, shard: int, rank: int) -> str:
        return f"{self._prefix}:t{t}:grad:{shard}:{rank}"

    def grad_ready(self, t: int, shard: int) -> str:
        return f"{self._prefix}:t{t}:gready:{shard}"

    def param(self, t: int, shard: int) -> str:
        return f"{self._prefix}:t{t}:param:{shard}"

    def optim(self, t: int, shard: int) -> str:
        return f"{self._prefix}:t{t}:optim:{shard}"

    def param_ready(self, t: int) -> str:
        return f"{self._prefix}:t{t}:pready"

    def full_grad(self, t: int, rank: int) -> str:
        return f"{self._prefix}:t{t}:full:{rank}"

    def full_ready(self, t: int) -> str:
        return f"{self._prefix}:t{t}:fready"

    def mean(self, t: int) -> str:
        return f"{self._prefix}:t{t}:mean"

    def mean_ready(self, t: int) -> str:
        return f"{self._prefix}:t{t}:mready"

    def progress(self) -> str:
        return f"{self._prefix}:progress"

    def stop(self, generation: int) -> str:
        return f"{self._prefix}:g{generation}:stop"

    def heartbeat(self, generation: int, rank: int, attempt: int) -> str:
        return f"{self._prefix}:g{generation}:hb:{rank}:{attempt}"

    def pattern(self) -> str:
        """SCAN pattern matching every key of this job (for cleanup and tests only)."""
        return f"{self._prefix}:*"
