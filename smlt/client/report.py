"""What a run leaves in its output folder: ``result.json``, ``model.pt`` and plots.

``result.json`` is the run's record for people and tools: final metrics, per-iteration history,
configurations and generations, cost. It never holds a credential: Redis URLs appear redacted
(the password replaced by ``***``), and nothing else secret is known to the driver.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["plot_run", "write_result"]


def write_result(output_dir: Path, result: dict[str, Any]) -> Path:
    """Write ``result.json`` atomically (a crash never leaves half a file)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "result.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=_jsonable, allow_nan=False))
    tmp.replace(path)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def plot_run(
    output_dir: Path, history: list[dict[str, Any]], epochs: list[dict[str, Any]]
) -> list[Path]:
    """Loss, throughput and per-phase time over the run; returns the files written."""
    if not history:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [h["iteration"] for h in history]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(its, [h["loss"] for h in history], lw=1, label="training loss (global batch)")
    if epochs:
        ax.plot(
            [e["iteration"] for e in epochs],
            [e["train_loss"] for e in epochs],
            "o",
            ms=4,
            label="training loss at epoch end",
        )
    ax.set(xlabel="iteration", ylabel="loss", title="Loss")
    ax.set_yscale("log" if min(h["loss"] for h in history) > 0 else "linear")
    not_metrics = {"epoch", "iteration", "train_loss", "samples_per_s"}
    metric_names = sorted({k for e in epochs for k in e} - not_metrics)
    if metric_names:
        twin = ax.twinx()
        for name in metric_names:
            twin.plot(
                [e["iteration"] for e in epochs],
                [e.get(name, float("nan")) for e in epochs],
                "s--",
                ms=4,
                label=f"held-out {name}",
            )
        twin.set_ylabel(", ".join(metric_names))
        twin.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    written.append(_save(fig, output_dir / "loss.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["wall_s"] for h in history], [h["samples_per_s"] for h in history], lw=1)
    ax.set(xlabel="seconds since start", ylabel="samples / s", title="Throughput")
    ax.grid(alpha=0.3)
    written.append(_save(fig, output_dir / "throughput.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    # The categories the benchmarks use: smlt's own CPU work is not hidden inside "sync".
    parts = {
        "data": [h["data_s"] for h in history],
        "compute (your loss and backward)": [h["compute_s"] for h in history],
        "optimizer update": [h.get("update_s", 0.0) for h in history],
        "smlt CPU (frames, sums)": [h.get("codec_s", 0.0) for h in history],
        "communication and waiting": [
            max(0.0, h["sync_s"] - h.get("update_s", 0.0) - h.get("codec_s", 0.0)) for h in history
        ],
    }
    # One polygon per part (not one bar per iteration and part): cheap for long runs.
    ax.stackplot(its, *parts.values(), labels=list(parts), step="mid", alpha=0.8)
    ax.plot(its, [h["iter_s"] for h in history], "k-", lw=0.8, label="iteration (slowest rank)")
    ax.set(
        xlabel="iteration",
        ylabel="seconds",
        title="Time per iteration (each part: its slowest rank)",
    )
    ax.legend(fontsize=8, loc="upper left")  # "best" placement can take seconds
    written.append(_save(fig, output_dir / "phases.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
