"""Shard arithmetic shared by every scheme: P parameters over n owners.

Shard ``s`` is ``[off(s), off(s+1))`` with ``off(s) = (P // n) * s + min(P % n, s)``: the first
``P % n`` shards get one element more, so sizes differ by at most one and ``off(n) == P``. With
``P < n`` the last shards are empty, which every scheme must (and does) handle.
"""

from __future__ import annotations

__all__ = ["shard_offsets", "shard_slice"]


def shard_offsets(num_params: int, workers: int) -> list[int]:
    """The n + 1 boundaries ``off(0) = 0 <= ... <= off(n) = P``."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if num_params < 0:
        raise ValueError(f"num_params must be >= 0, got {num_params}")
    per, extra = divmod(num_params, workers)
    return [per * s + min(extra, s) for s in range(workers + 1)]


def shard_slice(num_params: int, workers: int, shard: int) -> slice:
    """Slice of shard ``shard`` in the flat parameter vector."""
    if not 0 <= shard < workers:
        raise ValueError(f"shard {shard} out of range for {workers} workers")
    per, extra = divmod(num_params, workers)
    start = per * shard + min(extra, shard)
    return slice(start, start + per + (1 if shard < extra else 0))
