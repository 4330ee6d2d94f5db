"""Every Redis key smlt uses, built in one place.

Keys are built, never parsed: whoever needs a key calls the method that names it. Each key
carries the job, and every per-step key carries the iteration ``t``, the shard ``s`` and, for
contributions, the writer's rank ``r``, so two jobs on one Redis cannot see each other's keys and
a re-executed worker overwrites exactly its own earlier write.

Layout (``J`` = job id, ``S`` = the session: one per start or resume of the job's driver, so a
resumed run never reads what a dead one left behind in a Redis that outlived it)::

    smlt:J:S:t{t}:grad:{s}:{r}   rank r's gradient slice for shard s at iteration t (s != r)
    smlt:J:S:t{t}:gready:{s}     stream: "rank r uploaded its slice of shard s" (owner s reads)
    smlt:J:S:t{t}:param:{s}      parameter shard s, version t (written by its owner after step t-1)
    smlt:J:S:t{t}:optim:{s}      optimizer-state shard s, version t
    smlt:J:S:t{t}:pready         stream: "owner s published param shard s of version t"
    smlt:J:S:t{t}:mgrad:{s}      mean gradient shard s of step t (replicated optimizers only)
    smlt:J:S:t{t}:mgready        stream: "owner s published mean gradient shard s of step t"
    smlt:J:S:t{t}:gnorm:{s}      owner s's gradient norms of step t (clipping by global norm)
    smlt:J:S:t{t}:gnready        stream: "owner s published its gradient norms of step t"
    smlt:J:S:t{t}:snap:{s}       a copy of param shard s of version t, kept for the evaluator
    smlt:J:S:t{t}:full:{r}       rank r's whole gradient (baselines only)
    smlt:J:S:t{t}:fready         stream: "rank r uploaded its whole gradient" (baselines only)
    smlt:J:S:t{t}:mean           the averaged gradient (centralized baseline only)
    smlt:J:S:t{t}:mready         stream: "the aggregator published the mean" (centralized only)
    smlt:J:S:progress            stream of worker reports (the paper's success flags)
    smlt:J:S:g{g}:stop           generation g: {"at": stop, "started": highest started, "requested"}
    smlt:J:S:g{g}:hb:{r}:{a}     generation g: attempt a of rank r is alive (expires unless renewed)
    KEY:c{i}                     chunk i of a value over the store's value limit (see store.py)

Without a session (tests, benchmarks) the ``:S`` component is left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from smlt.errors import ConfigError

__all__ = ["JobKeys", "chunk_key", "validate_job_id"]

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
    """Key builder for one job (and one session of it)."""

    job: str
    session: str = ""

    def __post_init__(self) -> None:
        validate_job_id(self.job)
        if self.session:
            validate_job_id(self.session)

    @property
    def _prefix(self) -> str:
        return f"smlt:{self.job}:{self.session}" if self.session else f"smlt:{self.job}"

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

    def mean_grad(self, t: int, shard: int) -> str:
        return f"{self._prefix}:t{t}:mgrad:{shard}"

    def mean_grad_ready(self, t: int) -> str:
        return f"{self._prefix}:t{t}:mgready"

    def grad_norm(self, t: int, shard: int) -> str:
        return f"{self._prefix}:t{t}:gnorm:{shard}"

    def grad_norm_ready(self, t: int) -> str:
        return f"{self._prefix}:t{t}:gnready"

    def snapshot(self, t: int, shard: int) -> str:
        return f"{self._prefix}:t{t}:snap:{shard}"

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
        """SCAN pattern matching every key of this job's session (for cleanup and tests only);
        without a session, of every session of the job."""
        return f"{self._prefix}:*"


def chunk_key(key: str, index: int) -> str:
    """Where chunk ``index`` of a value too large for one Redis value lives."""
    return f"{key}:c{index}"
