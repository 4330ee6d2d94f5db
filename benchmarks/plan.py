"""How well does a plan predict a real run? ``smlt plan``'s time per iteration against the
local Ray backend's, for a few fixed configurations of ``examples/digits.py``.

For each (workers, memory_mb): the plan's prediction (one sim trial there, as
``smlt plan --workers W --memory-mb M`` does) on a sim platform set to this machine instead of
Lambda (loopback between the workers and the embedded Redis: ``--bandwidth-mbps``; a local
round trip: ``--request-latency-ms``), then a real ``smlt.train`` at the same configuration on
local Ray, whose median ``iter_s`` (the first iteration of each generation left out) is the
measured figure. ``--backend ray`` (calibrating the sim on Ray itself) is not built yet: this is
the error that calibration would remove, measured.

    python -m benchmarks.plan --json benchmarks/results/plan.json \\
        --plot benchmarks/results/plan.png
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._output import command_line, write_outputs

ROOT = Path(__file__).resolve().parent.parent
DIGITS = f"{ROOT / 'examples' / 'digits.py'}:Digits"
CONFIGS = ((1, 1769), (2, 884), (4, 442))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import smlt
    from smlt.client.plan import plan_task, profile_task

    profile = profile_task(DIGITS)
    local = {
        "bandwidth_mbps": args.bandwidth_mbps,
        "request_latency_s": args.request_latency_ms / 1e3,
    }
    cases = []
    for workers, memory_mb in CONFIGS:
        plan = plan_task(
            profile,
            epochs=args.epochs,
            batch_size=args.batch_size,
            workers=workers,
            memory_mb=memory_mb,
            **local,
        )
        predicted = plan.decision.predicted.s_per_iteration
        step = plan.platform.iteration(workers, memory_mb, args.batch_size)
        with tempfile.TemporaryDirectory(prefix="smlt-bench-plan-") as out:
            started = time.perf_counter()
            result = smlt.train(
                DIGITS,
                epochs=args.epochs,
                batch_size=args.batch_size,
                workers=workers,
                memory_mb=memory_mb,
                backend="ray",
                output=Path(out) / "run",
                object_store=str(Path(out) / "objects"),
            )
            train_s = time.perf_counter() - started
        # The first iteration of a generation pays for warm-up (allocations, first shards).
        firsts = {g["start_iteration"] for g in result.generations}
        steady = [h["iter_s"] for h in result.history if h["iteration"] not in firsts]
        measured = statistics.median(steady)
        cases.append(
            {
                "workers": workers,
                "memory_mb": memory_mb,
                "predicted_s_per_iteration": predicted,
                "measured_s_per_iteration": measured,
                "error": (predicted - measured) / measured,
                # The sim's parts of that iteration (no noise: the model's own figures).
                "predicted_compute_s": step.compute_s,
                "predicted_sync_s": step.sync_s,
                "measured_compute_s": statistics.median(
                    h["compute_s"] for h in result.history if h["iteration"] not in firsts
                ),
                "measured_sync_s": statistics.median(
                    h["sync_s"] for h in result.history if h["iteration"] not in firsts
                ),
                "iterations": len(result.history),
                "train_wall_s": result.wall_s,
                "driver_s": train_s,
            }
        )
        print(
            f"{workers} x {memory_mb} MB: predicted {predicted:.4f} s/iteration, "
            f"measured {measured:.4f} ({cases[-1]['error']:+.0%})",
            flush=True,
        )
    return {
        "command": command_line("benchmarks.plan", args.argv),
        "task": DIGITS.rpartition("/")[2],
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "profile": profile.to_dict(),
        "sim_platform": local,
        "cases": cases,
        "median_abs_error": statistics.median(abs(c["error"]) for c in cases),
    }


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = data["cases"]
    labels = [f"{c['workers']} x {c['memory_mb']} MB" for c in cases]
    x = range(len(cases))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.bar(
        [i - 0.2 for i in x],
        [c["predicted_s_per_iteration"] for c in cases],
        0.4,
        label="smlt plan (sim, local figures)",
    )
    ax.bar(
        [i + 0.2 for i in x],
        [c["measured_s_per_iteration"] for c in cases],
        0.4,
        label="smlt train (local Ray), median",
    )
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("s / iteration")
    ax.set_title(
        f"digits, batch {data['batch_size']}: median |error| {data['median_abs_error']:.0%}",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--bandwidth-mbps",
        type=float,
        default=8 * 3700.0,
        help="the workers' link to Redis (loopback: 3.7 GB/s measured)",
    )
    parser.add_argument("--request-latency-ms", type=float, default=0.2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    args.argv = argv
    write_outputs(run(args), args.json, args.plot, plot)


if __name__ == "__main__":
    main()
