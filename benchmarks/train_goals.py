"""Issue 8's live goals, as a user runs them: ``smlt train`` with a deadline on the Ray backend,
and with a budget nothing can meet.

1. ``smlt train examples/digits.py:Digits --epochs 10 --batch-size 256 --deadline 2m``: the
   run's trials (each an ordinary generation of the run), the configuration chosen and why,
   whether the deadline was met (``wall_s`` in ``result.json``), the bill;
2. ``smlt train examples/digits.py:Digits --epochs 10 --batch-size 256 --budget 0.00001``: must
   be refused before any worker runs (exit 2, no output folder), naming the cheapest cost.

Each command runs in its own process in a scratch folder; the JSON keeps what ``result.json``
and the refusal said.

    python -m benchmarks.train_goals --json benchmarks/results/train_goals.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from benchmarks._output import command_line, write_outputs
from benchmarks._smlt import run_smlt

ROOT = Path(__file__).resolve().parent.parent
JOB = ["examples/digits.py:Digits", "--epochs", "10", "--batch-size", "256"]
#: Bounds on each command: a hang fails the benchmark instead of waiting for ever.
TIMEOUT_S = 900


def _deadline_run(scratch: str) -> dict[str, Any]:
    args = ["train", str(ROOT / JOB[0]), *JOB[1:], "--deadline", "2m"]
    output = Path(scratch, "deadline")
    load = os.getloadavg()[0]
    _, took_s = run_smlt([*args, "--output", str(output)], cwd=scratch, timeout_s=TIMEOUT_S)
    result = json.loads((output / "result.json").read_text())
    search = result["search"]
    return {
        "command": "smlt " + " ".join(["train", *JOB, "--deadline", "2m"]),
        "backend": result["backend"],
        "load_average_before": load,
        "goal": result["goal"],
        "wall_s": result["wall_s"],
        "cost_usd": result["cost_usd"],
        "cost": result["cost"],
        "trials": search["trials"],
        "chosen": search["chosen"],
        "configs": result["configs"],
        "generations": [
            {k: g[k] for k in ("start_iteration", "stop_iteration", "workers", "memory_mb")}
            | {"ended_because": g["ended_because"]}
            for g in result["generations"]
        ],
        "final_metrics": result["final_metrics"],
        "command_s": took_s,
    }


def _impossible_budget(scratch: str) -> dict[str, Any]:
    output = Path(scratch, "budget")
    done, took_s = run_smlt(
        ["train", str(ROOT / JOB[0]), *JOB[1:], "--budget", "0.00001", "--output", str(output)],
        cwd=scratch,
        timeout_s=TIMEOUT_S,
        check=False,  # the refusal is the result
    )
    refusal = " ".join(line for line in done.stderr.splitlines() if "error" in line)
    return {
        "command": "smlt " + " ".join(["train", *JOB, "--budget", "0.00001"]),
        "exit_code": done.returncode,
        "stderr": " ".join(refusal.split()),
        "seconds_to_refuse": took_s,
        "output_folder_written": output.exists(),
        "ray_started": "Token authentication" in done.stderr,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="smlt-bench-goals-") as scratch:
        deadline = _deadline_run(scratch)
        print(
            f"deadline 2m: {'met' if deadline['goal']['met'] else 'MISSED'} in "
            f"{deadline['wall_s']:.1f} s, {len(deadline['trials'])} trials, "
            f"${deadline['cost_usd']:.6f}",
            flush=True,
        )
        budget = _impossible_budget(scratch)
        print(f"budget $0.00001: exit {budget['exit_code']}: {budget['stderr']}", flush=True)
    return {
        "command": command_line("benchmarks.train_goals", args.argv),
        "cpus": os.cpu_count(),
        "deadline_run": deadline,
        "impossible_budget": budget,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.argv = argv
    write_outputs(run(args), args.json)


if __name__ == "__main__":
    main()
