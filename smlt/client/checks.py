"""What is checked before a run starts: the request, the output folder, waste.

Everything here runs before Ray or Redis start, so a typo in a flag fails in seconds and leaves
nothing behind (a capacity the cluster cannot hold needs Ray, and is checked as the run starts,
also before anything is written). A configuration that runs but wastes money is not refused:
it is warned about (:class:`~smlt.errors.SmltWarning`), and the warning is kept in the record.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

from smlt.errors import ConfigError, SmltWarning
from smlt.optimizer.goals import Goal
from smlt.protocol.payload import check_clip_grad_norm, check_micro_batch, check_precision

__all__ = [
    "RUN_FILES",
    "check_goal",
    "check_request",
    "check_schedule",
    "claim_output",
    "warn_about_waste",
]

#: What a run writes into its output folder; ``--overwrite`` removes these, and only these.
RUN_FILES = (
    "run.json",
    "status.json",
    "result.json",
    "model.pt",
    "loss.png",
    "throughput.png",
    "phases.png",
)
#: A folder holding one of these holds a run.
_RUN_MARKERS = ("run.json", "status.json", "result.json")

Rescales = tuple[tuple[int, int, int | None], ...]


def check_request(
    backend: str,
    *,
    epochs: int,
    batch_size: int,
    workers: int | None,
    memory_mb: int | None,
    function_timeout_s: float | None,
    checkpoint_every: int | None,
    keep_checkpoints: int,
    rescales: Rescales,
    backend_options: Mapping[str, object] | None = None,
    clip_grad_norm: float | None = None,
    micro_batch: int | None = None,
    precision: str = "fp32",
    max_iterations: int | None = None,
) -> None:
    """Refuse a request that no cluster could run, naming the flag."""
    if epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs}")
    if max_iterations is not None and max_iterations < 1:
        raise ConfigError(f"--max-iterations must be >= 1, got {max_iterations}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if function_timeout_s is not None and function_timeout_s <= 0:
        raise ConfigError(f"--function-timeout must be positive, got {function_timeout_s}")
    if checkpoint_every is not None and checkpoint_every < 0:
        raise ConfigError(
            f"--checkpoint-every must be >= 0 (0: only at generation boundaries and at the end), "
            f"got {checkpoint_every}"
        )
    if keep_checkpoints < 1:
        raise ConfigError(
            f"--keep-checkpoints must be >= 1, got {keep_checkpoints}: the newest checkpoint is "
            "where a failed run resumes from"
        )
    # The workers check these again from their payload, by the same functions.
    check_clip_grad_norm(clip_grad_norm)
    check_micro_batch(micro_batch)
    check_precision(precision)
    seen: set[int] = set()
    for at, rescale_workers, rescale_memory_mb in rescales:
        spec = f"--rescale {at}:{rescale_workers}" + (
            f":{rescale_memory_mb}" if rescale_memory_mb is not None else ""
        )
        if at < 1:
            raise ConfigError(f"{spec}: the iteration must be >= 1 (--workers sets the start)")
        if at in seen:
            raise ConfigError(f"{spec}: two re-scales at iteration {at}")
        seen.add(at)
        if rescale_workers < 1:
            raise ConfigError(f"{spec}: the number of workers must be >= 1")
    from smlt.backends import get_backend  # the backend's module, not its cluster

    low, high = get_backend(backend, **(backend_options or {})).memory_range_mb()
    sizes = [("--memory-mb", memory_mb)] + [(f"--rescale {at}:{w}:{m}", m) for at, w, m in rescales]
    for flag, size in sizes:
        if size is not None and not low <= size <= high:
            raise ConfigError(
                f"{flag}: {size} MB is outside the {backend} backend's range [{low}, {high}] MB"
            )


def check_goal(
    goal: Goal | None,
    *,
    rescales: Rescales,
    max_trials: int | None = None,
    trial_iterations: int | None = None,
) -> None:
    """Refuse what a goal (``--deadline``, ``--budget``, ``--fastest``) contradicts: a
    re-scaling schedule (the optimizer decides re-scales), and search knobs without a goal."""
    if goal is not None and rescales:
        raise ConfigError(
            f"--rescale and --{goal.kind} both decide when to re-scale: give one of them"
        )
    for flag, value in (("--max-trials", max_trials), ("--trial-iterations", trial_iterations)):
        if value is None:
            continue
        if goal is None:
            raise ConfigError(f"{flag} tunes the search for a --deadline, --budget or --fastest")
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")


def check_schedule(rescales: Rescales, total_iterations: int) -> None:
    """Refuse a re-scale that would never happen (known once the data set's size is)."""
    for at, rescale_workers, _ in rescales:
        if at >= total_iterations:
            raise ConfigError(
                f"--rescale {at}:{rescale_workers}: the run has {total_iterations} iterations "
                f"(0..{total_iterations - 1}), so it would never apply"
            )


def claim_output(output_dir: Path, *, overwrite: bool) -> None:
    """Refuse an output folder that holds another run, unless ``overwrite``; a file where the
    folder should be is refused either way."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output {output_dir} is a file, not a folder")
    held = [name for name in _RUN_MARKERS if (output_dir / name).exists()]
    if held and not overwrite:
        raise ConfigError(
            f"--output {output_dir} holds another run ({', '.join(held)}); choose another "
            "folder, or pass --overwrite to replace that run's files"
        )


def warn_about_waste(
    num_samples: int,
    requested_batch: int,
    used_batch: int,
    workers: int | None,
    rescales: Rescales,
) -> list[str]:
    """Warn (and return the messages) about a run that works but not as asked."""
    messages = []
    if used_batch < requested_batch:
        messages.append(
            f"--batch-size {requested_batch} is larger than the data set ({num_samples} "
            f"samples): each iteration uses all {used_batch}, and the run records {used_batch}"
        )
    given = [("--workers", workers)] if workers is not None else []  # None: the optimizer's
    for label, n in given + [(f"--rescale {a}:{w}", w) for a, w, _ in rescales]:
        if n > used_batch:
            messages.append(
                f"{label}: {n} workers share a global batch of {used_batch} samples, so "
                f"{n - used_batch} of them get no sample in any iteration but are billed; use at "
                f"most {used_batch} workers or a larger batch"
            )
    for message in messages:
        warnings.warn(message, SmltWarning, stacklevel=3)
    return messages
