"""The digits runs on emulated Lambda and OpenWhisk end with the Ray run's parameters.

    python -m benchmarks.emulated_parity --json benchmarks/results/emulated_parity.json

Issue 9's closing runs, recorded rather than told. The benchmark starts ``smlt emulator`` (a
process of its own; containers run smlt's real worker entry points, PyTorch and all) and runs,
one after another, each as a user would type it (``smlt train examples/digits.py:Digits ...``):

- ``ray``: ``--backend ray --workers 3 --epochs 2 --seed 4``, the reference;
- ``aws_lambda``: the same with ``--backend aws_lambda``, boto3 finding the emulator through
  ``AWS_ENDPOINT_URL_LAMBDA``;
- ``openwhisk``: the same with ``--backend openwhisk``, through ``__OW_API_HOST`` and
  ``__OW_API_KEY``;
- ``aws_lambda_function_timeout``: a longer job (``--epochs 4 --batch-size 8``: 676 iterations
  instead of 12) on ``--backend aws_lambda --function-timeout T`` (``--function-timeout``,
  default 12 s): the workers hand over before their time limit and are invoked again, several
  generations in one job; its reference is ``ray_long``, the same job on Ray;
- ``aws_lambda_short_timeout``: the reference's own command with ``--function-timeout S``
  (``--short-timeout``, default 8 s), recorded whether it succeeds or fails. Its 12 iterations
  take half a second, so a limit can split them only by cutting into generation 0, whose
  workers first pay their cold start inside the invocation (the user's task imports
  scikit-learn there: 5 s on a quiet 2-core machine, over 12 s on a loaded one). If the cold
  start fits, the run takes two generations; if not, every worker times out before its first
  step, its replacement is another cold container, and the scheduler gives up ("failed 4 times
  without progress"). That is why the several-generations run is a longer job.

For each it records the run's generations (how each ended), its failures, its wall time, and
``max_abs_diff_vs_ray``: the largest |difference| between its final parameters (``model.pt``)
and its reference's (``reference``), over every tensor (``bit_identical`` when every tensor is
equal bit for bit).

**Credentials.** The emulator writes them to a file only its owner can read
(:meth:`~smlt.emulator.Emulator.write_env_file`); this benchmark reads that file and hands them
to the emulated runs in their environment, never on a command line, never to the Ray runs, and
checks that none of them occurs in what it writes (the JSON, and the outputs it keeps of a
failed run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._emulator import REPO, SECRETS, redacted, running_emulator
from benchmarks._output import command_line, write_outputs

TASK = "examples/digits.py:Digits"
BASE = ("--workers", "3", "--epochs", "2", "--seed", "4")
LONG = ("--workers", "3", "--epochs", "4", "--batch-size", "8", "--seed", "4")
ROLE = "arn:aws:iam::123456789012:role/smlt-parity"
IMAGE = "parity.example/smlt-worker:1"  # not pulled: the emulator runs smlt's entry points
#: The emulator's and the OpenWhisk backend's largest action memory (OpenWhisk's default, 512,
#: is what digits asks for; room for a retry with more memory after an out-of-memory).
OPENWHISK_MAX_MEMORY_MB = 2048
_RUN_TIMEOUT_S = 900.0


def run_environment(backend: str, emulator: dict[str, str], folder: Path) -> dict[str, str]:
    """The environment of one ``smlt train``: the emulator's variables only for the backends
    that talk to it."""
    env = {k: v for k, v in os.environ.items() if k not in emulator and k != "AWS_PROFILE"}
    env["WSK_CONFIG_FILE"] = str(folder / "no-wskprops")  # not the user's ~/.wskprops
    if backend == "aws_lambda":
        env.update(emulator, SMLT_LAMBDA_IMAGE=IMAGE, SMLT_LAMBDA_ROLE=ROLE)
    elif backend == "openwhisk":
        env.update(
            emulator,
            SMLT_OPENWHISK_IMAGE=IMAGE,
            SMLT_OPENWHISK_MAX_MEMORY_MB=str(OPENWHISK_MAX_MEMORY_MB),
        )
    return env


def train(
    backend: str, args: list[str], emulator: dict[str, str], folder: Path, name: str
) -> dict[str, Any]:
    """One ``smlt train``; what its result.json says of it, or how it failed."""
    out = folder / name
    args = ["train", TASK, "--backend", backend, *args]
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "smlt", *args, "--output", str(out)],
        cwd=REPO,
        env=run_environment(backend, emulator, folder),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=_RUN_TIMEOUT_S,
    )
    run: dict[str, Any] = {
        "command": "smlt " + " ".join(args),
        "process_wall_s": time.monotonic() - began,
        "exit_code": done.returncode,
    }
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        run["error"] = redacted("\n".join(errors) or done.stderr[-2000:], emulator)
        return run
    result = json.loads((out / "result.json").read_text())
    return {
        **run,
        "wall_s": result["wall_s"],
        "iterations": result["iterations"],
        "generations": len(result["generations"]),
        "generation_iterations": [
            [g["start_iteration"], g["stop_iteration"]] for g in result["generations"]
        ],
        "generations_ended_because": [g["ended_because"] for g in result["generations"]],
        "failures": [
            {k: f.get(k) for k in ("rank", "generation", "iteration", "attempt", "cause")}
            for f in result["failures"]
        ],
        "model": str(out / "model.pt"),
    }


def compare(model: str, reference: str) -> dict[str, Any]:
    """Largest |difference| over every tensor, and whether all are equal bit for bit."""
    import torch

    got, want = torch.load(model), torch.load(reference)
    if got.keys() != want.keys():
        raise RuntimeError(f"{model} and {reference} hold different tensors")
    diffs = [float((got[k].double() - want[k].double()).abs().max()) for k in want]
    return {
        "max_abs_diff_vs_ray": max(diffs),
        "bit_identical": all(torch.equal(got[k], want[k]) for k in want),
    }


def plan(
    function_timeout_s: float, short_timeout_s: float
) -> dict[str, tuple[str, list[str], str]]:
    """Every run: (backend, arguments, the Ray run it is compared with)."""
    long_limit = ["--function-timeout", f"{function_timeout_s:g}"]
    short_limit = ["--function-timeout", f"{short_timeout_s:g}"]
    return {
        "ray": ("ray", [*BASE], "ray"),
        "aws_lambda": ("aws_lambda", [*BASE], "ray"),
        "openwhisk": ("openwhisk", [*BASE], "ray"),
        "ray_long": ("ray", [*LONG], "ray_long"),
        "aws_lambda_function_timeout": ("aws_lambda", [*LONG, *long_limit], "ray_long"),
        "aws_lambda_short_timeout": ("aws_lambda", [*BASE, *short_limit], "ray"),
    }


def measure(function_timeout_s: float, short_timeout_s: float, runs: list[str]) -> dict[str, Any]:
    runs_plan = plan(function_timeout_s, short_timeout_s)
    unknown = sorted(set(runs) - set(runs_plan))
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; known: {sorted(runs_plan)}")
    # Each reference first, then what is compared with it.
    wanted = set(runs) | {runs_plan[r][2] for r in runs}
    order = [r for r in runs_plan if r in wanted]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="smlt-parity-") as name:
        folder = Path(name)
        args = ["--openwhisk-max-memory-mb", str(OPENWHISK_MAX_MEMORY_MB)]
        with running_emulator(folder, args) as emulator:
            for run in order:
                backend, arguments, _ = runs_plan[run]
                results[run] = train(backend, arguments, emulator, folder, run)
                got = results[run]
                print(f"{run}: {got.get('generations', got.get('error'))}", file=sys.stderr)
        for run, result in results.items():
            reference = results[runs_plan[run][2]]
            if "model" not in reference:
                raise RuntimeError(f"the reference run failed: {reference['error']}")
            if "model" in result:
                result["reference"] = runs_plan[run][2]
                result.update(compare(result["model"], reference["model"]))
        for result in results.values():
            result.pop("model", None)
        text = json.dumps(results)
        leaked = [n for n in SECRETS if emulator.get(n) and emulator[n] in text]
        if leaked:
            raise RuntimeError(f"a credential ({', '.join(leaked)}) reached the results")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--function-timeout",
        type=float,
        default=12.0,
        help="the time limit, s, of the longer job that must take several generations",
    )
    parser.add_argument(
        "--short-timeout",
        type=float,
        default=8.0,
        help="the time limit, s, of the reference's command expected to fail",
    )
    parser.add_argument(
        "--runs",
        default="aws_lambda,openwhisk,aws_lambda_function_timeout,aws_lambda_short_timeout",
        help="which runs (their Ray references are added)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    runs = [r for r in args.runs.split(",") if r]
    data: dict[str, Any] = {
        "command": command_line("benchmarks.emulated_parity", argv),
        "task": TASK,
        "load_average_before": list(os.getloadavg()),
    }
    data["runs"] = measure(args.function_timeout, args.short_timeout, runs)
    data["load_average_after"] = list(os.getloadavg())
    write_outputs(data, args.json)


if __name__ == "__main__":
    main()
