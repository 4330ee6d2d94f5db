"""Per-step timing of a synchronization scheme, in the paper's four phases (Fig. 7)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["PHASES", "PhaseTimes"]

PHASES = ("ul_shard_s", "dl_shard_s", "ul_aggr_s", "dl_grad_s")


@dataclass
class PhaseTimes:
    """Seconds each phase took in one step, measured from where that phase could begin.

    Phases overlap (uploads run beside downloads), so they need not add up to ``total_s``. A
    phase a scheme or a rank does not have stays 0.
    """

    ul_shard_s: float = 0.0
    dl_shard_s: float = 0.0
    ul_aggr_s: float = 0.0
    dl_grad_s: float = 0.0
    total_s: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)
