"""bf16 against float32 compute on the ResNet-18 and transformer examples, in one run.

    python -m benchmarks.precision --json benchmarks/results/precision.json \\
        --plot benchmarks/results/precision.png

For each example, two real ``smlt.train`` runs one after the other, identical but for
``precision`` (``"fp32"``, then ``"bf16"``: the forward pass and loss under
``torch.autocast("cpu", dtype=torch.bfloat16)``, the backward pass in the dtypes autocast chose;
parameters, optimizer state and the exchange float32 either way). From each run's history
(``result.json``): the time per iteration (``iter_s``: compute, the exchange and the update,
on the slowest rank) and its compute part (``compute_s``: the user's forward and backward), as
the **median over the iterations after the first ``--warmup``** (workers' cold start, the first
call of each kernel); and the held-out metrics ``evaluate()`` gave at the end
(``final_metrics``), which say whether bf16's 8-bit mantissa cost accuracy.

The runs are bounded as in ``benchmarks/e2e.py``: a derived task cuts the example's training
set so that ``--epochs`` epochs are the benchmarked number of iterations. The two precisions of
an example run back to back, so the machine's load (it is shared) drifts as little as possible
between them; the load average is recorded before and after every run.

Why bf16 can be slower on a CPU: a bfloat16 matrix product is fast only where the CPU has
instructions for it (AVX-512 BF16, ``avx512_bf16``; AMX, ``amx_bf16``), which oneDNN then uses.
Without them (an AVX2 CPU), every bfloat16 op converts its operands to float32, computes in
float32 and rounds the result back, and autocast adds the casts of weights and activations
around each op: more work than float32 alone, for half the bytes moved. The JSON records the
CPU's flags and a probe of the raw kernel (a 1024 x 1024 matrix product in each dtype) so that
the figure can be read against them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._output import command_line, write_outputs
from benchmarks.e2e import Example, derive_task

__all__ = ["EXAMPLES", "Setting", "cpu_facts", "main", "matmul_probe", "measure", "summarize"]

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Setting:
    """How one example is benchmarked: ``samples`` of its training set, ``epochs`` over them,
    global batch ``batch_size`` (the iterations are ``epochs * ceil(samples / batch_size)``)."""

    example: Example
    samples: int
    epochs: int

    @property
    def iterations(self) -> int:
        return self.epochs * -(-self.samples // self.example.batch_size)


EXAMPLES = {
    # On this machine's AVX2 CPU a bfloat16 ResNet-18 step is 15-20x a float32 one (~40 s for 8
    # samples on one thread): 6 iterations of 16 keep the pair of runs within minutes.
    "resnet18": Setting(Example("examples/resnet18.py:ResNet18", batch_size=16), 96, 1),
    # ~0.3 s a step in float32, ~5x that in bf16: one whole epoch, 32 iterations.
    "transformer": Setting(Example("examples/transformer.py:Transformer", batch_size=128), 4096, 1),
}


def cpu_facts() -> dict[str, Any]:
    """The CPU and whether it computes bfloat16 natively."""
    import torch

    flags: list[str] = []
    model = platform.processor()
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    relevant = sorted(f for f in flags if f.startswith(("avx", "amx")) or "bf16" in f)
    return {
        "model": model,
        "vector_flags": relevant,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "mkldnn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    }


def matmul_probe(size: int = 1024, repeats: int = 9) -> dict[str, float]:
    """Median seconds of one ``size`` x ``size`` matrix product per dtype, on one thread (as a
    worker computes: Ray gives a task of one CPU one thread)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a = torch.randn(size, size).to(dtype)
            b = torch.randn(size, size).to(dtype)
            a @ b  # the first call picks the kernel
            times = []
            for _ in range(repeats):
                began = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - began)
            out[f"{name}_s"] = statistics.median(times)
    finally:
        torch.set_num_threads(previous)
    out["bf16_over_fp32"] = out["bf16_s"] / out["fp32_s"]
    return out


def _load() -> dict[str, Any]:
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout
    return {"load_average": list(os.getloadavg()), "uptime": uptime.strip()}


def summarize(history: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Medians of ``iter_s`` and ``compute_s`` over the iterations from ``warmup`` on."""
    measured = [h for h in history if h["iteration"] >= warmup]
    if not measured:
        raise ValueError(f"no iteration left after skipping {warmup}")
    return {
        "iterations_measured": len(measured),
        "iter_median_s": statistics.median(h["iter_s"] for h in measured),
        "compute_median_s": statistics.median(h["compute_s"] for h in measured),
        "iter_mean_s": statistics.fmean(h["iter_s"] for h in measured),
        "first_loss": history[0]["loss"],
        "last_loss": history[-1]["loss"],
    }


def measure(
    name: str, setting: Setting, precision: str, workers: int, warmup: int, folder: Path
) -> dict[str, Any]:
    """One ``smlt.train`` of the example in ``precision``, summarized."""
    import smlt

    run_dir = folder / f"{name}-{precision}"
    run_dir.mkdir()
    spec = derive_task(setting.example, name, setting.samples, run_dir)
    before = _load()
    began = time.monotonic()
    result = smlt.train(
        spec,
        epochs=setting.epochs,
        batch_size=setting.example.batch_size,
        workers=workers,
        backend="ray",
        precision=precision,
        output=run_dir / "out",
        object_store=str(run_dir / "objects"),
    )
    wall_s = time.monotonic() - began
    recorded = json.loads((run_dir / "out" / "result.json").read_text())
    if result.iterations != setting.iterations:
        raise RuntimeError(f"{name}: ran {result.iterations} iterations, not {setting.iterations}")
    return {
        "example": name,
        "task": setting.example.spec,
        "precision": precision,
        "workers": workers,
        "memory_mb": result.configs[0]["memory_mb"],
        "batch_size": setting.example.batch_size,
        "samples": setting.samples,
        "epochs": setting.epochs,
        "iterations": result.iterations,
        "training": recorded["training"],
        # What the workers put through the model at once (the whole slice unless it did not
        # fit), as the history reports it.
        "micro_batch_used": sorted(
            {h["micro_batch"] for h in result.history if "micro_batch" in h}
        ),
        **summarize(result.history, warmup),
        "final_metrics": recorded["final_metrics"],
        "wall_s": wall_s,
        "load_before": before,
        "load_after": _load(),
        "history_iter_s": [h["iter_s"] for h in result.history],
        "history_compute_s": [h["compute_s"] for h in result.history],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", default=",".join(EXAMPLES), help="comma-separated")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="leading iterations left out")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    names = [e for e in args.examples.split(",") if e]
    unknown = [e for e in names if e not in EXAMPLES]
    if unknown:
        parser.error(f"unknown examples {unknown}; choose from {sorted(EXAMPLES)}")

    import torch

    from smlt.backends.ray_backend import ensure_ray

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    began = time.monotonic()
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": cpu_facts(),
        "load_at_start": _load(),
    }
    info["matmul_probe"] = matmul_probe()
    log(f"matmul 1024^2 on one thread: {info['matmul_probe']}")
    started_ray = ensure_ray()  # one local Ray for every run, as e2e.py does
    results: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="smlt-precision-") as tmp:
            for name in names:
                for precision in PRECISIONS:
                    row = measure(
                        name, EXAMPLES[name], precision, args.workers, args.warmup, Path(tmp)
                    )
                    results.append(row)
                    log(
                        f"{name:<12} {precision}  iter {row['iter_median_s']:.3f} s  compute "
                        f"{row['compute_median_s']:.3f} s  metrics {row['final_metrics']}  "
                        f"[{row['wall_s']:.0f} s, load {row['load_after']['load_average'][0]:.1f}]"
                    )
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    info["load_at_end"] = _load()
    data = {
        "command": command_line("benchmarks.precision", argv),
        "machine": info,
        "warmup": args.warmup,
        "statistic": "median over the iterations after the warm-up, of the history's iter_s "
        "(slowest rank) and compute_s (slowest rank's forward and backward)",
        "results": results,
        "speedups": speedups(results),
        "total_wall_s": time.monotonic() - began,
    }
    write_outputs(data, args.json, args.plot, plot)
    return 0


def speedups(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per example: float32's median over bf16's (> 1: bf16 is faster)."""
    by = {(r["example"], r["precision"]): r for r in results}
    out = {}
    for name in sorted({r["example"] for r in results}):
        fp32, bf16 = by.get((name, "fp32")), by.get((name, "bf16"))
        if fp32 is None or bf16 is None:
            continue
        out[name] = {
            "iter": fp32["iter_median_s"] / bf16["iter_median_s"],
            "compute": fp32["compute_median_s"] / bf16["compute_median_s"],
        }
    return out


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = data["results"]
    names = sorted({r["example"] for r in results}, key=[r["example"] for r in results].index)
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
    colours = {"fp32": "#1f77b4", "bf16": "#d62728"}
    for ax, name in zip(axes[0], names, strict=True):
        rows = [r for r in results if r["example"] == name]
        for k, row in enumerate(rows):
            p = row["precision"]
            ax.bar(k - 0.2, row["iter_median_s"], 0.4, color=colours[p], alpha=0.9)
            ax.bar(k + 0.2, row["compute_median_s"], 0.4, color=colours[p], alpha=0.45)
            metrics = row["final_metrics"]
            label = f"acc {metrics['accuracy']:.3f}" if "accuracy" in metrics else ""
            ax.annotate(
                label,
                (k, max(row["iter_median_s"], row["compute_median_s"])),
                ha="center",
                va="bottom",
                fontsize=9,
            )
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([f"{r['precision']}\niteration | compute" for r in rows], fontsize=9)
        ratio = data["speedups"].get(name, {})
        ax.set_title(
            f"{name}: speed-up fp32/bf16 {ratio.get('iter', float('nan')):.2f}x per iteration "
            f"({ratio.get('compute', float('nan')):.2f}x compute)\n"
            f"bf16 takes {1 / ratio.get('iter', float('nan')):.1f}x float32's time",
            fontsize=10,
        )
        ax.set_ylabel("median seconds (after warm-up)")
        ax.margins(y=0.15)
    cpu = data["machine"]["cpu"]
    native = "native bf16" if cpu["avx512_bf16"] or cpu["amx_bf16"] else "no native bf16 (AVX2)"
    fig.suptitle(
        f"smlt.train, {results[0]['workers']} workers: float32 vs bfloat16 autocast "
        f"({cpu['model']}, {native})",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
