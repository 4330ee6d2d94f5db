"""How long does ``smlt plan`` take for a job of 1,000 workers and 10,000 iterations on the sim?

The job: a synthetic task of 1M parameters, 400k samples, batch 4,096 (100 iterations an
epoch) for 100 epochs, 50 ms per sample on one vCPU (compute-heavy, so that many workers are
worth probing), 16 store instances. Two plans, each timed from the call to the decision on
this machine's wall clock:

- ``search``: ``--fastest`` over workers 1..1,000 x Lambda's memory range (the optimizer's
  trials on the sim: small ones through the real scheduler on trio's mock clock, large ones
  at the model's coarse grain);
- ``fixed``: ``--workers 1000 --memory-mb 3008`` (one trial there).

    python -m benchmarks.plan_scale --json benchmarks/results/plan_scale.json
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from benchmarks._output import command_line, write_outputs

SAMPLES = 4096 * 100
BATCH_SIZE = 4096
EPOCHS = 100


def run(args: argparse.Namespace) -> dict[str, Any]:
    from smlt.client.plan import TaskProfile, plan_task
    from smlt.optimizer.goals import Fastest

    profile = TaskProfile("synthetic:Big", 1_000_000, SAMPLES, 0.05, 2, 0.0)
    plans: dict[str, Any] = {}
    for name, options in (
        ("search", {"goal": Fastest()}),
        ("fixed", {"workers": 1000, "memory_mb": 3008}),
    ):
        load = os.getloadavg()[0]
        started = time.perf_counter()
        result = plan_task(
            profile, epochs=EPOCHS, batch_size=BATCH_SIZE, store_instances=16, **options
        )
        took_s = time.perf_counter() - started
        decision = result.decision
        plans[name] = {
            "planning_s": took_s,
            "load_average_before": load,
            "iterations": result.job_iterations,
            "trials": len(result.trials),
            "largest_trial_workers": max(t["workers"] for t in result.trials),
            "grains": sorted({t["grain"] for t in result.trials}),
            "workers": decision.workers,
            "memory_mb": decision.memory_mb,
            "predicted_time_s": decision.predicted.time_s,
            "predicted_cost_usd": decision.predicted.cost_usd,
        }
        print(
            f"{name}: planned in {took_s:.1f} s, {len(result.trials)} trials, "
            f"{decision.workers} x {decision.memory_mb} MB",
            flush=True,
        )
    return {
        "command": command_line("benchmarks.plan_scale", args.argv),
        "cpus": os.cpu_count(),
        "job": {"samples": SAMPLES, "batch_size": BATCH_SIZE, "epochs": EPOCHS},
        "max_workers": 1000,
        "plans": plans,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.argv = argv
    write_outputs(run(args), args.json)


if __name__ == "__main__":
    main()
