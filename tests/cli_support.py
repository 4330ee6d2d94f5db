"""Running the ``smlt`` command as a user does, and checking that it left no process behind.

Every process a command starts inherits a marker in its environment (``SMLT_TEST_MARKER``), which
is how :func:`assert_nothing_left` finds stragglers: Ray workers, an embedded Redis, an actor. The
marker is unique per command, so a sibling test session (pytest-xdist runs the suite on several
processes) neither hides nor adds stragglers.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from smlt.storage.redis_server import find_redis_server

__all__ = ["Watched", "assert_nothing_left", "processes_with", "run_smlt", "run_smlt_watched"]


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


@dataclass(frozen=True)
class Watched:
    """A finished ``smlt`` command, how long it took, and what it started."""

    proc: subprocess.CompletedProcess[str]
    marker: str
    #: Start to exit, as the user waits for it.
    wall_s: float
    #: User + system time of the command and of the processes it waited for: its own work,
    #: whatever else the machine runs. The wall time is that plus every wait, for a CPU too, and
    #: a machine that runs the suite on several processes (or anything else) stretches it.
    cpu_s: float
    #: "Ray" and/or "Redis" if the command started them, even if it stopped them again.
    started: list[str]


def run_smlt_watched(
    args: list[str],
    cwd: Path,
    timeout_s: float = 60,
    extra_env: dict[str, str] | None = None,
) -> Watched:
    """:func:`run_smlt`, watched: for checks that must fail fast, before Ray or Redis start.

    Whether they started is seen directly, not guessed from the time: Ray's session folders go
    to a private ``RAY_TMPDIR`` (Ray creates one at every start and leaves it), and the embedded
    Redis is started through a wrapper (``SMLT_REDIS_SERVER``) that notes each start.
    """
    with tempfile.TemporaryDirectory(prefix="smlt-watch-", ignore_cleanup_errors=True) as folder:
        watch = Path(folder)
        redis_started = watch / "redis-started"
        wrapper = watch / "redis-server"
        wrapper.write_text(
            f'#!/bin/sh\necho started >> "{redis_started}"\nexec "{find_redis_server()}" "$@"\n'
        )
        wrapper.chmod(0o700)
        env = {"RAY_TMPDIR": str(watch), "SMLT_REDIS_SERVER": str(wrapper), **(extra_env or {})}
        # The only children this process waits for meanwhile are the command and what it waited
        # for (the session's Ray and Redis are reaped at the session's end).
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        began = time.monotonic()
        proc, marker = run_smlt(args, cwd, timeout_s, env)
        wall_s = time.monotonic() - began
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        signs = {"Ray": watch / "ray", "Redis": redis_started}
        started = [name for name, sign in signs.items() if sign.exists()]
    return Watched(proc, marker, wall_s, cpu_s, started)


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
    """Every process that carries ``marker`` is gone, at the latest a minute from now.

    Ray's processes exit a moment after their driver: on an idle machine within a second or two;
    on a loaded one (the suite runs on several processes, each with its own Ray) the raylet
    notices its driver later. The wait ends as soon as nothing is left, so a generous bound
    costs nothing; what is proven (nothing outlives the command) is the same.
    """
    deadline = time.monotonic() + 60
    left = processes_with(marker)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = processes_with(marker)
    assert left == [], f"still running a minute after the command ended: {left}"
