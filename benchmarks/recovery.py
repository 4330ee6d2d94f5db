"""Detection and recovery time per fault, measured on real runs (digits, 4 workers, local Ray).

    python -m benchmarks.recovery --json benchmarks/results/recovery.json \\
        --cases kill@start,kill@after-publish,kill@during-gather,raise@start,hang@start \\
        --repeats 3

Each case is a fault ``ACTION@PHASE`` injected at rank ``--rank``, iteration ``--iteration``
through ``SMLT_FAULTS`` (``smlt/protocol/faults.py``); where in the step a worker dies changes
what recovery costs (``after-publish``: its new parameter shard is already in the store, so the
replacement adopts it instead of stepping again; ``during-gather``: every peer has moved on). For
every repeat the benchmark runs ``smlt train`` once without a fault and once per case, in that
order, and reads each run's ``result.json`` and the job's progress stream (a Redis server the
benchmark starts and hands to ``smlt train`` as ``SMLT_REDIS_URL``, polled while the run goes).

Measured, per faulted run (all on this machine's clocks; none is a configured value):

- ``detection_s``: from the fault acting to the scheduler noticing the failure. The worker writes
  a ``fault`` event with its wall clock just before the fault acts; the scheduler subtracts it
  from its wall clock when it noticed, and puts the result in the failure record
  (``detection_source: "scheduler"``). If a scheduler does not report it, the benchmark derives
  it from the stream instead, ``fault_to_replacement_report_s - recovery_s``
  (``detection_source: "progress stream"``; this also counts the scheduler's lag in reading the
  replacement's first report, a few ms with its blocking XREAD);
- ``recovery_s``: from the scheduler noticing the failure to the replacement's first report
  (back-off before re-invoking, the invocation and cold start, reloading state from the store,
  redoing the interrupted iteration), from the failure record;
- ``fault_to_replacement_report_s``: from the fault event's time to the Redis clock of the
  replacement's first report in the stream, a check that needs no scheduler field: it should
  be close to ``detection_s + recovery_s``;
- ``lost_s``: the time the faulted run itself lost around the fault: from iteration T - 1
  complete (every rank reported it) to T + 2 complete, minus three times the run's median step
  (:func:`lost_in_run`), all from the Redis clock of the stream;
- ``extra_wall_s``: the run's wall time minus the fault-free run's of the same repeat (on a busy
  shared machine this carries the noise of two whole runs, start-up included, so it can even
  come out negative; ``lost_s`` is the steadier figure);
- ``bit_identical``: whether ``model.pt`` equals the fault-free run's, tensor by tensor, bit by
  bit (every fault-free repeat is checked against the first too).

The heartbeat timeout (``--heartbeat-timeout``) is configuration, recorded under ``config``: it
bounds how long a ``hang`` goes unnoticed, and the measured detection shows how the scheduler's
heartbeat check (once per heartbeat interval) lands around it. Medians over repeats go into
``summary``; every run's values are in ``runs``. The machine is shared and small, so compare
figures within one invocation, not across invocations.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._output import command_line, write_outputs
from benchmarks.e2e import ReportReader

__all__ = ["Case", "detection_from_stream", "lost_in_run", "main", "parse_cases", "summarize"]

REPO = Path(__file__).resolve().parent.parent
DIGITS = f"{REPO / 'examples' / 'digits.py'}:Digits"
ARGS = ["--epochs", "3", "--batch-size", "128", "--workers", "4", "--seed", "3"]
DEFAULT_CASES = "kill@start,kill@after-publish,kill@during-gather,raise@start,hang@start"
RUN_TIMEOUT_S = 900.0
POLL_S = 0.2

Case = tuple[str, str]  # (action, phase)


def parse_cases(text: str) -> list[Case]:
    """``kill@start,hang@start`` -> ``[("kill", "start"), ("hang", "start")]``, checked
    against the fault schedule's own vocabulary."""
    from smlt.protocol.faults import PHASES, WORKER_ACTIONS

    cases = []
    for entry in (e.strip() for e in text.split(",") if e.strip()):
        action, _, phase = entry.partition("@")
        phase = phase or "start"
        if action not in WORKER_ACTIONS or phase not in PHASES:
            raise ValueError(
                f"case {entry!r}: expected ACTION@PHASE with ACTION one of {WORKER_ACTIONS} "
                f"and PHASE one of {PHASES}"
            )
        cases.append((action, phase))
    return cases


def _run(
    work: Path, out: str, faults: str, extra: list[str], redis_url: str
) -> tuple[dict[str, Any], list[tuple[int, dict[str, str]]]]:
    """One ``smlt train``: its ``result.json`` and the progress stream as read during the run."""
    env = {
        **os.environ,
        "SMLT_FAULTS": faults,
        "SMLT_OBJECT_STORE": str(work / "objects"),
        "SMLT_REDIS_URL": redis_url,
    }
    command = [sys.executable, "-m", "smlt", "train", DIGITS, *ARGS, "--output", out, *extra]
    reader = ReportReader(redis_url, work / out)
    began = time.monotonic()
    with (
        tempfile.TemporaryFile() as stdout,
        subprocess.Popen(command, cwd=work, env=env, stdout=stdout, stderr=subprocess.STDOUT) as p,
    ):
        try:
            while p.poll() is None:
                if time.monotonic() - began > RUN_TIMEOUT_S:
                    raise TimeoutError(f"{out}: smlt train ran over {RUN_TIMEOUT_S:g} s")
                reader({})
                time.sleep(POLL_S)
        finally:
            if p.poll() is None:
                p.kill()
        reader({})  # whatever came after the last poll, unless the driver deleted it already
        if p.returncode != 0:
            stdout.seek(0)
            tail = stdout.read().decode(errors="replace")[-4000:]
            raise RuntimeError(f"{out}: smlt train exited with {p.returncode}:\n{tail}")
    result: dict[str, Any] = json.loads((work / out / "result.json").read_text())
    return result, reader.entries


def _identical(a: Path, b: Path) -> bool:
    """Both runs' ``model.pt`` hold the same tensors, bit for bit (``torch.equal`` would take
    -0.0 for 0.0 and never NaN for NaN)."""
    sa, sb = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    return sa.keys() == sb.keys() and all(_bits(sa[k]) == _bits(sb[k]) for k in sa)


def _bits(tensor: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    return str(tensor.dtype), tuple(tensor.shape), tensor.contiguous().numpy().tobytes()


def detection_from_stream(
    entries: list[tuple[int, dict[str, str]]], failure: dict[str, Any]
) -> dict[str, Any]:
    """What the progress stream alone says about ``failure``: the fault event's wall clock and
    iteration, and the Redis clock of the replacement's (next attempt's) first report of the
    same rank and generation."""
    rank, gen, attempt = failure["rank"], failure["generation"], failure["attempt"]
    event = next(
        (
            r
            for _ms, r in entries
            if r.get("event") == "fault"
            and int(r["rank"]) == rank
            and int(r.get("gen", gen)) == gen
            and int(r.get("attempt", attempt)) == attempt
        ),
        None,
    )
    fault_at = None if event is None else float(event["at_unix_s"])
    replaced_at = next(
        (
            ms / 1000
            for ms, r in entries
            if "event" not in r
            and int(r["rank"]) == rank
            and int(r["gen"]) == gen
            and int(r.get("attempt", 0)) == attempt + 1
        ),
        None,
    )
    total = None if fault_at is None or replaced_at is None else replaced_at - fault_at
    return {
        "fault_at_unix_s": fault_at,
        "fault_iteration": None if event is None else int(event["t"]),
        "fault_to_replacement_report_s": total,
    }


def lost_in_run(
    entries: list[tuple[int, dict[str, str]]], generation: int, iteration: int, after: int = 2
) -> dict[str, float | None]:
    """The time the faulted run itself lost around the fault, from the stream's Redis clock.

    Iteration t is *complete* when every rank has reported it (the latest of the ranks' first
    reports of t). ``lost_s`` is the time from iteration ``iteration - 1`` complete to
    ``iteration + after`` complete, minus ``after + 1`` times the run's median step (difference
    of consecutive completions, outside that window and the first two iterations). The window
    reaches past the faulted iteration because a replacement's first iterations can be slower
    and peers that moved on wait for it in the next. Unlike the difference of two runs' wall
    times, it does not carry the noise of two whole runs (start-up, cold starts, evaluation).
    """
    first: dict[tuple[int, int], int] = {}  # (t, rank) -> server ms of its first report
    for ms, r in entries:
        if "event" in r or int(r["gen"]) != generation:
            continue
        first.setdefault((int(r["t"]), int(r["rank"])), ms)
    ranks = {rank for _t, rank in first}
    done = {
        t: max(first[(t, rank)] for rank in ranks) / 1000
        for t in {t for t, _rank in first}
        if all((t, rank) in first for rank in ranks)
    }
    lo, hi = iteration - 1, iteration + after
    steps = [
        done[t] - done[t - 1] for t in sorted(done) if t >= 2 and t - 1 in done and not lo < t <= hi
    ]
    if lo not in done or hi not in done or not steps:
        return {"lost_s": None, "median_step_s": None}
    step = statistics.median(steps)
    return {"lost_s": done[hi] - done[lo] - (after + 1) * step, "median_step_s": step}


def _faulted(
    case: Case,
    repeat: int,
    result: dict[str, Any],
    entries: list[tuple[int, dict[str, str]]],
    base: dict[str, Any],
    identical: bool,
    rank: int,
) -> dict[str, Any]:
    action, phase = case
    failures = [f for f in result["failures"] if f.get("rank") == rank]
    if not failures:
        raise RuntimeError(f"{action}@{phase}: the run reported no failure of rank {rank}")
    failure = failures[0]
    stream = detection_from_stream(entries, failure)
    struck = stream["fault_iteration"]
    struck = failure.get("iteration") if struck is None else struck
    lost = lost_in_run(entries, failure["generation"], struck) if struck is not None else {}
    detection, source = failure.get("detection_s"), "scheduler"
    if detection is None:
        total, recovery = stream["fault_to_replacement_report_s"], failure.get("recovery_s")
        detection = None if total is None or recovery is None else total - recovery
        source = "progress stream"
    return {
        "fault": action,
        "phase": phase,
        "repeat": repeat,
        "cause": failure["cause"],
        "failure_fault": failure.get("fault"),
        "failures_of_rank": len(failures),
        "fault_at_s": failure.get("fault_at_s"),
        "detected_s": failure.get("detected_s"),
        "detection_s": detection,
        "detection_source": source if detection is not None else None,
        "recovery_s": failure.get("recovery_s"),
        "fault_to_replacement_report_s": stream["fault_to_replacement_report_s"],
        "lost_s": lost.get("lost_s"),
        "median_step_s": lost.get("median_step_s"),
        "wall_s": result["wall_s"],
        "extra_wall_s": result["wall_s"] - base["wall_s"],
        "bit_identical": identical,
    }


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per case, in the order first seen: the median (and range) of each measured figure over
    repeats, and whether every repeat ended bit-identical."""
    cases = list(dict.fromkeys((r["fault"], r["phase"]) for r in runs))
    rows = []
    for action, phase in cases:
        mine = [r for r in runs if (r["fault"], r["phase"]) == (action, phase)]
        row: dict[str, Any] = {"fault": action, "phase": phase, "repeats": len(mine)}
        for key in (
            "detection_s",
            "recovery_s",
            "fault_to_replacement_report_s",
            "lost_s",
            "extra_wall_s",
        ):
            values = [r[key] for r in mine if r[key] is not None]
            row[key] = statistics.median(values) if values else None
            row[f"{key}_range"] = [min(values), max(values)] if values else None
        row["detection_sources"] = sorted({r["detection_source"] for r in mine} - {None})
        row["bit_identical"] = all(r["bit_identical"] for r in mine)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated ACTION@PHASE")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every case (and base)")
    parser.add_argument("--rank", type=int, default=1, help="the rank that fails")
    parser.add_argument("--iteration", type=int, default=5, help="the iteration it fails at")
    parser.add_argument("--heartbeat-timeout", type=float, default=3.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        cases = parse_cases(args.cases)
    except ValueError as exc:
        parser.error(str(exc))
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    from smlt.storage.redis_server import RedisServer

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    hb = ["--heartbeat-timeout", str(args.heartbeat_timeout)]
    runs: list[dict[str, Any]] = []
    bases: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="smlt-recovery-") as tmp, RedisServer() as server:
        work = Path(tmp)
        for repeat in range(args.repeats):
            out = f"base-{repeat}"
            base, _ = _run(work, out, "", hb, server.url)
            same = _identical(work / out, work / "base-0")
            bases.append({"repeat": repeat, "wall_s": base["wall_s"], "bit_identical": same})
            log(f"base #{repeat}: wall {base['wall_s']:.2f} s, same as base #0: {same}")
            for action, phase in cases:
                out = f"{action}-{phase}-{repeat}"
                spec = f"{action}:rank={args.rank}:iteration={args.iteration}:phase={phase}"
                result, entries = _run(work, out, spec, hb, server.url)
                identical = _identical(work / out, work / f"base-{repeat}")
                row = _faulted((action, phase), repeat, result, entries, base, identical, args.rank)
                runs.append(row)
                log(json.dumps({k: v for k, v in row.items() if k != "cause"}))
    data = {
        "command": command_line("benchmarks.recovery", argv),
        "task": DIGITS.rsplit("/", 1)[-1],
        "train_args": ARGS,
        "config": {
            "heartbeat_timeout_s": args.heartbeat_timeout,
            "fault_rank": args.rank,
            "fault_iteration": args.iteration,
            "note": "configured values, not measurements",
        },
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "baselines": bases,
        "summary": summarize(runs),
        "runs": runs,
    }
    write_outputs(data, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
