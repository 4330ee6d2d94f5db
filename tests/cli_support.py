"""Running the ``smlt`` command as a user does, and checking that it left no process behind.

Every process a command starts inherits a marker in its environment (``SMLT_TEST_MARKER``), which
is how :func:`assert_nothing_left` finds stragglers: Ray workers, an embedded Redis, an actor.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

__all__ = ["assert_nothing_left", "processes_with", "run_smlt"]


def run_smlt(
    args: list[str],
    cwd: Path,
    timeout_s: float = 60,
    extra_env: dict[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess[str], str]:
    """``python -m smlt ARGS`` in ``cwd`` with a private object store ``cwd/objects``; returns
    the finished process and its marker."""
    marker = uuid.uuid4().hex
    env = {
        **os.environ,
        "SMLT_TEST_MARKER": marker,
        "SMLT_OBJECT_STORE": str(cwd / "objects"),
        **(extra_env or {}),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "smlt", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        cwd=cwd,
    )
    return proc, marker


def processes_with(marker: str) -> list[str]:
    """The processes (``pid: command``) whose environment carries ``marker``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if f"SMLT_TEST_MARKER={marker}".encode() in environ:
            found.append(f"{pid}: {cmdline[:120]}")
    return found


def assert_nothing_left(marker: str) -> None:
    deadline = time.monotonic() + 10  # Ray's processes exit a moment after the driver
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_with(marker) == []
