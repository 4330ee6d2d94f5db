"""Resident memory of a container's processes, read from ``/proc``.

A platform's memory limit is a cgroup limit on everything the container runs; the emulator has no
cgroup, so it measures what the cgroup would count, the resident set of the container's process
and its descendants (a DataLoader's workers count too), and kills the container when that goes
over the limit. ``RLIMIT_AS`` would be simpler and wrong: it limits address space, which torch
reserves far beyond what it touches, so it kills healthy workers and misses nothing else.

Reading one ``statm`` is cheap (tens of microseconds); finding descendants means reading every
process's ``stat`` (milliseconds), so callers do that less often than they read ``statm``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["descendants", "rss_bytes"]

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int) -> int:
    """Resident bytes of one process; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            fields = f.read().split()
        return int(fields[1]) * _PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return 0


def descendants(roots: Iterable[int]) -> dict[int, list[int]]:
    """For each root pid, the pids of all its living descendants (children, their children...)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return {root: [] for root in roots}
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name sits in parentheses and may itself hold spaces or parentheses.
        fields = stat.rpartition(b")")[2].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: dict[int, list[int]] = {}
    for root in roots:
        tree, stack = [], list(children.get(root, ()))
        while stack:
            pid = stack.pop()
            tree.append(pid)
            stack.extend(children.get(pid, ()))
        found[root] = tree
    return found
