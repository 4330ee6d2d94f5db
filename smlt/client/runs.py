"""What the run folders under a folder say about their runs, for ``smlt runs``.

A run folder is one holding ``run.json`` (the run's plan, written when it starts). Beside it the
driver keeps ``status.json`` up to date while the run goes on (state, iterations done, cost so
far, newest checkpoint; rewritten every few seconds and once more at the end) and writes
``result.json`` when the run finished. This module reads those three files and nothing else: it
starts no Ray, opens no Redis and no object store, so listing a hundred runs takes a moment.

The files are read as they are found. A folder whose ``run.json`` cannot be read is still listed,
as ``unreadable``, so that a corrupt folder is visible rather than a traceback or a silent gap; a
missing or unreadable ``status.json`` or ``result.json`` leaves the fields it would have filled
empty. A driver that died without a word (SIGKILL, a lost machine) leaves a ``status.json`` that
says ``running`` forever; a status older than :data:`DEFAULT_STALE_AFTER_S` is shown as
``stopped`` instead.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from smlt.client.record import read_json_object, read_status

__all__ = [
    "DEFAULT_STALE_AFTER_S",
    "STALE_AFTER_ENV",
    "RunInfo",
    "RunState",
    "find_run_dirs",
    "list_runs",
    "read_run",
]

#: A ``running`` status.json not rewritten for this long means its driver is gone.
STALE_AFTER_ENV = "SMLT_STALE_AFTER_S"
DEFAULT_STALE_AFTER_S = float(os.environ.get(STALE_AFTER_ENV, "120"))

RunState = Literal[
    "finished", "running", "failed", "interrupted", "stopped", "unknown", "unreadable"
]
_WRITTEN_STATES = ("running", "finished", "failed", "interrupted")
# The UTC stamp the driver puts in a job id: digits-20260101-120000-a1b2c3.
_JOB_STAMP = re.compile(r"-(\d{8}-\d{6})-[0-9a-f]+$")
_T = TypeVar("_T")


@dataclass(frozen=True)
class RunInfo:
    """One run as its folder describes it. Fields the files do not give are None (or empty).

    ``state`` is ``status.json``'s, except ``stopped`` (it says running but has not been
    rewritten for a while), ``unknown`` (no status.json and no result.json: a run of an older
    smlt, or one that died before its first status) and ``unreadable`` (run.json is not JSON of
    a run).
    """

    path: Path
    state: RunState
    job_id: str | None = None
    task: str | None = None
    started_at: datetime | None = None
    updated_at: datetime | None = None
    iteration: int | None = None
    total_iterations: int | None = None
    epochs: int | None = None
    final_metrics: dict[str, float] = field(default_factory=dict)
    cost_usd: float | None = None
    wall_s: float | None = None
    last_checkpoint: int | None = None
    checkpoint_every: int | None = None
    object_store: str | None = None
    error: str | None = None

    @property
    def resumable(self) -> bool:
        """Whether the run stopped short (interrupted, or its driver died) with a checkpoint
        to continue from, as far as status.json knows (the object store has the last word).
        A failed run can be resumed too, once the cause of its failure is fixed."""
        return self.state in ("interrupted", "stopped") and self.last_checkpoint is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: paths as strings, times as ISO-8601 UTC."""
        data = asdict(self)
        data["path"] = str(self.path)
        data["status"] = data.pop("state")
        for key in ("started_at", "updated_at"):
            value = data[key]
            data[key] = value.isoformat() if value is not None else None
        data["resumable"] = self.resumable
        return data


def find_run_dirs(folder: Path, *, depth: int = 2) -> Iterator[Path]:
    """``folder`` itself if it is a run folder, else the run folders at most ``depth`` levels
    below it (``runs/JOB`` and ``experiments/NAME/JOB``). Hidden folders are skipped, and a run
    folder is not searched further (its own files are not runs)."""
    if (folder / "run.json").is_file():
        yield folder
        return
    if depth <= 0:
        return
    try:
        children = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError:
        return
    for child in children:
        if child.is_dir():
            yield from find_run_dirs(child, depth=depth - 1)


def list_runs(
    folder: Path, *, now: datetime | None = None, stale_after_s: float = DEFAULT_STALE_AFTER_S
) -> list[RunInfo]:
    """Every run under ``folder``, oldest first (runs whose start is unknown come first)."""
    now = now or datetime.now(UTC)
    records = [read_run(p, now=now, stale_after_s=stale_after_s) for p in find_run_dirs(folder)]
    oldest = datetime.min.replace(tzinfo=UTC)
    return sorted(records, key=lambda r: (r.started_at or oldest, str(r.path)))


def read_run(
    run_dir: Path, *, now: datetime | None = None, stale_after_s: float = DEFAULT_STALE_AFTER_S
) -> RunInfo:
    """What ``run_dir``'s files say; never raises for missing or corrupt files."""
    plan = read_json_object(run_dir / "run.json")
    if plan is None or not isinstance(plan.get("job_id"), str):
        return RunInfo(path=run_dir, state="unreadable", error=_unreadable(run_dir / "run.json"))
    status = read_status(run_dir)
    result = read_json_object(run_dir / "result.json")
    job_id: str = plan["job_id"]
    state: RunState = "unknown"
    updated_at = None
    if status is not None and status.get("state") in _WRITTEN_STATES:
        state = status["state"]
        updated_at = _time(status.get("updated_at"))
        age_s = ((now or datetime.now(UTC)) - updated_at).total_seconds() if updated_at else None
        if state == "running" and (age_s is None or age_s > stale_after_s):
            state = "stopped"
    elif result is not None:
        state = "finished"  # an smlt from before status.json, or a status.json lost
    status = status or {}
    result = result or {}
    finished = state == "finished"
    total = _first(_int(status.get("total_iterations")), _int(plan.get("total_iterations")))
    iteration = _int(status.get("iteration"))
    if finished and iteration is None:
        iteration = _first(_int(result.get("iterations")), total)
    return RunInfo(
        path=run_dir,
        state=state,
        job_id=job_id,
        task=_first(_str(plan.get("task")), _str(status.get("task"))),
        started_at=_first(_time(status.get("started_at")), _stamp(job_id)),
        updated_at=updated_at,
        iteration=iteration,
        total_iterations=total,
        epochs=_int(plan.get("epochs")),
        final_metrics=_metrics(result.get("final_metrics")) if finished else {},
        # result.json is the final word on a finished run; status.json on the others.
        cost_usd=_first(
            _float(result.get("cost_usd")) if finished else None, _float(status.get("cost_usd"))
        ),
        wall_s=_first(
            _float(result.get("wall_s")) if finished else None, _float(status.get("wall_s"))
        ),
        last_checkpoint=_int(status.get("last_checkpoint")),
        checkpoint_every=_int(plan.get("checkpoint_every")),
        object_store=_str(plan.get("object_store")),
        error=_str(status.get("error")),
    )


def _first(*values: _T | None) -> _T | None:
    return next((v for v in values if v is not None), None)


def _unreadable(path: Path) -> str:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return f"{path}: {exc}"
    return f"{path} is not the run.json of an smlt run (no job_id)"


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _stamp(job_id: str) -> datetime | None:
    match = _JOB_STAMP.search(job_id)
    if match is None:
        return None
    try:
        return datetime.strptime(match[1], "%Y%m%d-%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _metrics(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        return {}
    return {str(k): float(v) for k, v in value.items() if _float(v) is not None}
