"""Is a plan honest? ``smlt plan --backend ray``'s prediction against the ``smlt train`` it
predicts, on this machine.

For each example and fixed configuration (``--workers W --memory-mb M``), two commands run one
after the other, each in its own process, exactly as a user types them:

1. ``smlt plan TASK --epochs E --batch-size B --workers W --memory-mb M --backend ray --json``:
   one trial there (a short real run on a local Ray; see ``smlt.client.plan.RayTrials``) and
   the optimizer's prediction for the whole run: ``predicted_time_s``, ``predicted_cost_usd``;
2. ``smlt train TASK --epochs E --batch-size B --workers W --memory-mb M``: the real run, whose
   ``result.json`` gives ``wall_s`` (start-up and the driver's own time included) and
   ``cost_usd``.

The error of a case is (predicted - measured) / measured; the medians are of absolute errors.
The machine's load average is recorded before each command: the machine is shared, and a
plan measured under another load than its run is wrong by that much.

    python -m benchmarks.plan_accuracy --json benchmarks/results/plan_accuracy.json \\
        --plot benchmarks/results/plan_accuracy.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks._output import command_line, write_outputs
from benchmarks._smlt import run_smlt

ROOT = Path(__file__).resolve().parent.parent
#: (example, task, epochs, batch size, [(workers, memory_mb), ...])
EXAMPLES: tuple[tuple[str, str, int, int, tuple[tuple[int, int], ...]], ...] = (
    (
        "digits",
        f"{ROOT / 'examples' / 'digits.py'}:Digits",
        10,
        256,
        ((1, 1769), (2, 884), (4, 442)),
    ),
    (
        "transformer",
        f"{ROOT / 'examples' / 'transformer.py'}:Transformer",
        2,
        128,
        ((1, 1769), (2, 1769), (4, 884)),
    ),
)
#: Bounds on one command: a hang is a failure of the benchmark, not a wait.
PLAN_TIMEOUT_S = 600
TRAIN_TIMEOUT_S = 1800


def _case(
    example: str, task: str, epochs: int, batch_size: int, workers: int, memory_mb: int
) -> dict[str, Any]:
    job = ["--epochs", str(epochs), "--batch-size", str(batch_size)]
    config = ["--workers", str(workers), "--memory-mb", str(memory_mb)]
    with tempfile.TemporaryDirectory(prefix="smlt-bench-plan-") as out:
        load_plan = os.getloadavg()[0]
        planned, plan_s = run_smlt(
            ["plan", task, *job, *config, "--backend", "ray", "--json"],
            cwd=out,
            timeout_s=PLAN_TIMEOUT_S,
        )
        plan = json.loads(planned.stdout)
        load_train = os.getloadavg()[0]
        run_smlt(
            ["train", task, *job, *config, "--output", f"{out}/run", "--object-store", f"{out}/o"],
            cwd=out,
            timeout_s=TRAIN_TIMEOUT_S,
        )
        result = json.loads(Path(out, "run", "result.json").read_text())
    trial = plan["trial_details"][0]
    case = {
        "example": example,
        "workers": workers,
        "memory_mb": memory_mb,
        "epochs": epochs,
        "batch_size": batch_size,
        "iterations": result["iterations"],
        "predicted_time_s": plan["predicted_time_s"],
        "measured_time_s": result["wall_s"],
        "predicted_cost_usd": plan["predicted_cost_usd"],
        "measured_cost_usd": result["cost_usd"],
        "time_error": (plan["predicted_time_s"] - result["wall_s"]) / result["wall_s"],
        "cost_error": (plan["predicted_cost_usd"] - result["cost_usd"]) / result["cost_usd"],
        # What the prediction was made of (the trial's measurements) and what the run did.
        "trial_s_per_iteration": trial["s_per_iteration"],
        "trial": trial,
        "measured_generations_s": sum(g["wall_s"] for g in result["generations"]),
        "measured_billed_worker_s": result["billed_worker_s"],
        "plan_command_s": plan_s,
        "load_average_before_plan": load_plan,
        "load_average_before_train": load_train,
    }
    print(
        f"{example} {workers} x {memory_mb} MB: time {case['predicted_time_s']:.1f} s predicted, "
        f"{case['measured_time_s']:.1f} s measured ({case['time_error']:+.0%}); cost "
        f"${case['predicted_cost_usd']:.6f} vs ${case['measured_cost_usd']:.6f} "
        f"({case['cost_error']:+.0%})",
        flush=True,
    )
    return case


def run(args: argparse.Namespace) -> dict[str, Any]:
    wanted = set(args.examples.split(","))
    cases = [
        _case(name, task, epochs, batch_size, workers, memory_mb)
        for name, task, epochs, batch_size, configs in EXAMPLES
        if name in wanted
        for workers, memory_mb in configs
    ]
    return {
        "command": command_line("benchmarks.plan_accuracy", args.argv),
        "cpus": os.cpu_count(),
        "cases": cases,
        "median_time_error": statistics.median(abs(c["time_error"]) for c in cases),
        "median_cost_error": statistics.median(abs(c["cost_error"]) for c in cases),
    }


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = data["cases"]
    labels = [f"{c['example']}\n{c['workers']} x {c['memory_mb']}" for c in cases]
    x = range(len(cases))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, unit in ((left, "time_s", "wall time (s)"), (right, "cost_usd", "cost (USD)")):
        ax.bar([i - 0.2 for i in x], [c[f"predicted_{key}"] for c in cases], 0.4, label="plan")
        ax.bar([i + 0.2 for i in x], [c[f"measured_{key}"] for c in cases], 0.4, label="train")
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_ylabel(unit)
        ax.legend(fontsize=8)
    left.set_title(f"median |time error| {data['median_time_error']:.0%}", fontsize=10)
    right.set_title(f"median |cost error| {data['median_cost_error']:.0%}", fontsize=10)
    fig.suptitle("smlt plan --backend ray against smlt train, same configuration", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", default="digits,transformer")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    args.argv = argv
    write_outputs(run(args), args.json, args.plot, plot)


if __name__ == "__main__":
    main()
