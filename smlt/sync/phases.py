"""Per-step timing of a synchronization scheme, in the paper's four phases (Fig. 7), and how
much of it was smlt's own CPU work rather than waiting for the network or for peers."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["PHASES", "PhaseTimes"]

PHASES = ("ul_shard_s", "dl_shard_s", "ul_aggr_s", "dl_grad_s")


@dataclass
class PhaseTimes:
    """Seconds each phase took in one step, measured from where that phase could begin.

    Phases overlap (uploads run beside downloads), so they need not add up to ``total_s``. A
    phase a scheme or a rank does not have stays 0.

    Inside ``total_s``, three kinds of work are not communication, and are counted apart so that
    no figure hides them under "sync": ``update_s``, the owner's optimizer step on its shard (or
    every worker's, replicated); ``codec_s``, smlt's CPU work on the step's own thread (encoding
    and checksumming frames, decoding them, summing contributions); ``upload_codec_s``, the same
    on the upload thread, which overlaps the rest. ``total_s - update_s - codec_s`` is what the
    step spent transferring and waiting; ``norm_s``, part of it, is the owners' exchange of
    gradient norms when the task clips by global norm (0 otherwise).
    """

    ul_shard_s: float = 0.0
    dl_shard_s: float = 0.0
    ul_aggr_s: float = 0.0
    dl_grad_s: float = 0.0
    update_s: float = 0.0
    codec_s: float = 0.0
    upload_codec_s: float = 0.0
    norm_s: float = 0.0
    total_s: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)
