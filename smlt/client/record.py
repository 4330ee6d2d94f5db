"""The record of a run across its executions: ``status.json`` while it runs, parts at the end.

A run may take several executions of the driver: ``smlt train``, then one ``smlt resume`` per
time the driver died or was stopped. Each execution is a *part*. Workers are billed in every
part, including the iterations a dead part did after its last checkpoint, which the next part
does again; so the run's cost and wall time are the sums over its parts, and its history is the
newest part's view of it (the checkpoint carries the history up to where it was taken).

``status.json`` is what a part knows of the run, written every few seconds while it goes on and
once more when it ends (finished, failed or interrupted). A driver killed with SIGKILL cannot
write its end: its last ``status.json`` still says ``running``, and the next ``smlt resume``
takes that last record as the dead part's (its cost is then a lower bound, as of ``updated_at``).
Tools (``smlt runs``) read the same file.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = [
    "EPOCH_FIELDS",
    "STATUS_FILE",
    "STATUS_INTERVAL_S",
    "Part",
    "RunRecord",
    "mark_parts",
    "now_iso",
    "read_json_object",
    "read_status",
    "running_driver",
]

STATUS_FILE = "status.json"
#: Fields of an epoch's entry that are not the task's own metrics (``evaluate()``'s names).
EPOCH_FIELDS = frozenset(
    {"epoch", "iteration", "train_loss", "lr", "samples_per_s", "part", "wall_s", "evaluated"}
)
#: How often a running part rewrites ``status.json`` (its last record is what a resume keeps of a
#: part whose driver was killed, so this bounds what such a record can miss).
STATUS_INTERVAL_S = 2.0


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Part:
    """One execution of the driver: which iterations it ran, what it cost, how it ended."""

    part: int
    command: str  # "train" or "resume"
    started_at: str
    from_iteration: int
    to_iteration: int  # iterations done when it ended (or when it last wrote status.json)
    wall_s: float
    cost_usd: float | None  # None: a part that never wrote a status (killed at once)
    billed_worker_s: float | None
    ended: str  # "finished", "failed", "interrupted", "running" (while it runs) or "died"
    generations: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    configs: list[dict[str, Any]] = field(default_factory=list)
    #: The epochs' metrics as this part knew them: evaluation runs off the critical path, so a
    #: checkpoint can be committed before the epochs just before it were evaluated; a part that
    #: died then still reported them here.
    epochs: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Part:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class RunRecord:
    """The parts of one run so far, and the writer of its ``status.json``.

    ``earlier`` are the parts before this execution, read from the folder's ``status.json``;
    :meth:`update` records the current part from the scheduler's status.
    """

    run_dir: Path
    job_id: str
    task: str
    total_iterations: int
    iterations_per_epoch: int
    started_at: str
    earlier: list[Part]
    current: Part
    last_checkpoint: int | None = None
    _written_s: float = 0.0

    @classmethod
    def begin(
        cls,
        run_dir: Path,
        *,
        job_id: str,
        task: str,
        total_iterations: int,
        iterations_per_epoch: int,
        command: str,
        from_iteration: int,
    ) -> RunRecord:
        """The record of a new part; a resume finds the earlier ones in ``status.json``."""
        earlier: list[Part] = []
        started_at = now_iso()
        previous = read_status(run_dir)
        if previous is not None and command == "resume":
            started_at = previous.get("started_at", started_at)
            for raw in previous.get("parts", []):
                part = Part.from_dict(raw)
                # A part whose driver was killed could not write its end.
                earlier.append(replace(part, ended="died") if part.ended == "running" else part)
        if earlier:  # it wrote the checkpoint this part starts from, or started from it
            last = earlier[-1]
            earlier[-1] = replace(last, to_iteration=max(last.to_iteration, from_iteration))
        current = Part(
            part=len(earlier),
            command=command,
            started_at=now_iso(),
            from_iteration=from_iteration,
            to_iteration=from_iteration,
            wall_s=0.0,
            cost_usd=0.0,
            billed_worker_s=0.0,
            ended="running",
        )
        return cls(
            run_dir,
            job_id,
            task,
            total_iterations,
            iterations_per_epoch,
            started_at,
            earlier,
            current,
        )

    # -- the whole run -------------------------------------------------------------------------

    @property
    def parts(self) -> list[Part]:
        return [*self.earlier, self.current]

    @property
    def wall_offset_s(self) -> float:
        """Seconds the run executed before this part (what its history's times are shifted by)."""
        return sum(p.wall_s for p in self.earlier)

    @property
    def cost_usd(self) -> float:
        return sum(p.cost_usd or 0.0 for p in self.parts)

    @property
    def billed_worker_s(self) -> float:
        return sum(p.billed_worker_s or 0.0 for p in self.parts)

    @property
    def wall_s(self) -> float:
        return sum(p.wall_s for p in self.parts)

    # -- the current part ----------------------------------------------------------------------

    def update(self, status: dict[str, Any], wall_s: float, *, force: bool = False) -> None:
        """Fold a scheduler status into the current part; rewrite ``status.json`` every
        :data:`STATUS_INTERVAL_S` (or now, with ``force``)."""
        self.current = replace(
            self.current,
            to_iteration=max(self.current.to_iteration, int(status.get("iteration", 0))),
            wall_s=wall_s,
            cost_usd=float(status.get("cost_usd", self.current.cost_usd or 0.0)),
            billed_worker_s=float(
                status.get("billed_worker_s", self.current.billed_worker_s or 0.0)
            ),
            epochs=list(status.get("epochs", self.current.epochs)),
        )
        checkpoint = status.get("last_checkpoint")
        news = checkpoint is not None and checkpoint != self.last_checkpoint
        if checkpoint is not None:
            self.last_checkpoint = int(checkpoint)
        if force or news or time.monotonic() - self._written_s >= STATUS_INTERVAL_S:
            self.write("running")

    def checkpointed(self, iteration: int) -> None:
        """A checkpoint at ``iteration`` is committed: the current part got at least that far."""
        self.last_checkpoint = max(self.last_checkpoint or 0, iteration)
        to_iteration = max(self.current.to_iteration, iteration)
        self.current = replace(self.current, to_iteration=to_iteration)

    def end(
        self,
        state: str,
        wall_s: float,
        *,
        summary: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        """Record how the current part ended; with the scheduler's ``summary``, its exact cost
        and its generations, failures and configurations."""
        part = replace(self.current, ended=state, wall_s=wall_s)
        if summary is not None:
            part = replace(
                part,
                cost_usd=summary["cost_usd"],
                billed_worker_s=summary["billed_worker_s"],
                generations=list(summary["generations"]),
                failures=list(summary["failures"]),
                configs=list(summary["configs"]),
                epochs=list(summary["epochs"]),
            )
            if summary["history"]:
                part = replace(part, to_iteration=summary["history"][-1]["iteration"] + 1)
            if summary["checkpoints"]:
                self.last_checkpoint = max(summary["checkpoints"])
        self.current = part
        if self.run_dir.is_dir():  # nothing is written for a run that never started
            self.write(state, error=error)

    def write(self, state: str, *, error: str | None = None) -> None:
        """Write ``status.json`` atomically."""
        data = {
            "state": state,
            "job_id": self.job_id,
            "task": self.task,
            "started_at": self.started_at,
            "updated_at": now_iso(),
            "iteration": self.current.to_iteration,
            "total_iterations": self.total_iterations,
            "cost_usd": self.cost_usd,
            "wall_s": self.wall_s,
            "last_checkpoint": self.last_checkpoint,
            "error": error,
            # Which driver writes: a resume refuses to start while it is alive.
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "parts": [asdict(p) for p in self.parts],
        }
        path = self.run_dir / STATUS_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str))
        tmp.replace(path)
        self._written_s = time.monotonic()

    def run_history(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Copies of the scheduler's history ``entries`` as the whole run's: each marked with
        its part, its ``wall_s`` shifted by the parts before that one. What ``result.json``
        holds, and what callbacks get while the run goes on."""
        starts = [p.from_iteration for p in self.parts]
        offsets = [sum(p.wall_s for p in self.parts[:k]) for k in range(len(self.parts))]
        history = mark_parts(entries, starts)
        for entry in history:
            entry["wall_s"] = entry["wall_s"] + offsets[entry["part"]]
        return history

    def merged(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The scheduler's ``summary`` of this part extended to the whole run: every entry marked
        with its part, history times continuous across parts, and the earlier parts'
        generations, failures and configurations before this one's."""
        starts = [p.from_iteration for p in self.parts]
        merged = dict(summary)
        merged["history"] = self.run_history(summary["history"])
        # Epochs an earlier part evaluated that the checkpoint this part started from missed.
        known = {e["iteration"]: e for p in self.earlier for e in p.epochs}
        known.update({e["iteration"]: e for e in summary["epochs"]})
        # An epoch that ended in a part interrupted before its evaluation finished, and before
        # a checkpoint recorded it: listed from the history, marked as never evaluated.
        losses = {h["iteration"]: h for h in summary["history"]}
        per_epoch = self.iterations_per_epoch
        for end in range(per_epoch - 1, self.current.from_iteration, per_epoch):
            if end not in known and end in losses:
                known[end] = {
                    "epoch": end // per_epoch,
                    "iteration": end,
                    "train_loss": losses[end]["loss"],
                    "samples_per_s": losses[end]["samples_per_s"],
                    "evaluated": False,
                }
                if "lr" in losses[end]:
                    known[end]["lr"] = losses[end]["lr"]
        merged["epochs"] = mark_parts([known[i] for i in sorted(known)], starts)
        for name in ("generations", "failures", "configs"):
            earlier = [{**e, "part": p.part} for p in self.earlier for e in getattr(p, name)]
            merged[name] = earlier + [{**e, "part": self.current.part} for e in summary[name]]
        return merged


def mark_parts(entries: list[dict[str, Any]], starts: list[int]) -> list[dict[str, Any]]:
    """Copies of per-iteration or per-epoch ``entries`` with ``"part"``: the last part that
    started at or before the entry's iteration (``starts`` are the parts' first iterations)."""
    marked = []
    for entry in entries:
        part = max((k for k, s in enumerate(starts) if s <= entry["iteration"]), default=0)
        marked.append({**entry, "part": part})
    return marked


def running_driver(status: dict[str, Any]) -> int | None:
    """The pid of the driver that wrote ``status`` if it says ``running`` and that process is
    alive on this machine (a driver on another machine cannot be checked: None)."""
    pid = status.get("pid")
    if status.get("state") != "running" or status.get("host") != socket.gethostname():
        return None
    if not isinstance(pid, int) or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        return pid
    return pid


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """``status.json`` of ``run_dir``, or None if there is none or it cannot be read."""
    return read_json_object(Path(run_dir) / STATUS_FILE)


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None if it is missing, unreadable, half-written, not UTF-8
    or not an object (run folders are read by tools that must never raise on them)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
