"""Recovery time per fault kind, measured on real runs (digits, 4 workers, local Ray + Redis).

    python -m benchmarks.recovery --json benchmarks/results/recovery.json

For each fault kind (``kill``, ``raise``, ``hang``, injected at rank 1, iteration 5 through
``SMLT_FAULTS``) it runs ``smlt train`` and reads, from the run's ``result.json``:

- ``recovery_s``: from the moment the scheduler saw the failure to the replacement worker's
  first report (re-invocation, cold start, reloading state from the store, recomputing the
  interrupted iteration);
- ``detection_s`` (hang only): the heartbeat timeout that had to expire first;
- ``extra_wall_s``: the run's wall time minus the fault-free run's, measured in the same
  session;
- whether ``model.pt`` is bit-identical to the fault-free run's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks._output import write_outputs

REPO = Path(__file__).resolve().parent.parent
DIGITS = f"{REPO / 'examples' / 'digits.py'}:Digits"
ARGS = ["--epochs", "3", "--batch-size", "128", "--workers", "4", "--seed", "3"]


def _run(work: Path, out: str, faults: str, extra: list[str]) -> dict[str, Any]:
    env = {**os.environ, "SMLT_FAULTS": faults, "SMLT_OBJECT_STORE": str(work / "objects")}
    subprocess.run(
        [sys.executable, "-m", "smlt", "train", DIGITS, *ARGS, "--output", out, *extra],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    result: dict[str, Any] = json.loads((work / out / "result.json").read_text())
    return result


def _identical(a: Path, b: Path) -> bool:
    sa, sb = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heartbeat-timeout", type=float, default=3.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    hb = ["--heartbeat-timeout", str(args.heartbeat_timeout)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = _run(work, "base", "", hb)
        rows = []
        for action in ("kill", "raise", "hang"):
            result = _run(work, action, f"{action}:rank=1:iteration=5", hb)
            [failure] = result["failures"]
            rows.append(
                {
                    "fault": action,
                    "cause": failure["cause"],
                    "recovery_s": failure["recovery_s"],
                    "detection_s": args.heartbeat_timeout if action == "hang" else None,
                    "extra_wall_s": result["wall_s"] - base["wall_s"],
                    "bit_identical": _identical(work / action, work / "base"),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    data = {
        "command": "python -m benchmarks.recovery "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "baseline_wall_s": base["wall_s"],
        "results": rows,
    }
    write_outputs(data, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
