"""Running ``smlt`` as a user types it, for the benchmarks that measure the command itself."""

from __future__ import annotations

import os
import subprocess
import sys
import time

__all__ = ["run_smlt"]


def run_smlt(
    args: list[str], *, cwd: str, timeout_s: float, check: bool = True
) -> tuple[subprocess.CompletedProcess[str], float]:
    """``smlt ARGS`` in its own process in ``cwd`` (where ``smlt plan`` writes ``plans/``), a
    wide console so that its tables do not wrap; the finished process and its wall seconds.
    ``timeout_s`` bounds it (a hang fails the benchmark); with ``check``, an exit other than 0
    raises, with the end of its stderr."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "smlt.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200"},
    )
    took_s = time.perf_counter() - started
    if check and done.returncode != 0:
        raise RuntimeError(
            f"smlt {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}"
        )
    return done, took_s
