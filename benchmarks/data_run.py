"""One ``smlt train`` of ``benchmarks/data.py``, watched from outside: memory and reads per process.

:func:`run_train` starts ``python -m smlt.cli train ...`` with a given source tree on
``PYTHONPATH`` (the code under test, or a worktree of the old commit) and a :class:`TreeWatch`
thread that polls the process tree of that command every ``interval_s``: for every descendant it
reads ``/proc/<pid>/status`` (``VmHWM``, the kernel's peak resident set) and ``/proc/<pid>/io``
(``rchar``: bytes the process read through read(2) and its kin, from disk or page cache, not
from sockets). Ray's raylet and its worker processes are descendants of the command; a process
is a worker of rank r once its title (``/proc/<pid>/cmdline``, set by Ray to ``ray::`` and the
task's name) names ``smlt-worker-<job>-g<gen>-r<r>`` (smlt/backends/ray_backend.py names its
tasks so); the scheduler, resource manager and evaluator are actors with other titles.

The run uses a Redis server the caller started (``SMLT_REDIS_URL``), so that the job's progress
stream can be copied while the run goes (:class:`StreamCopy`): each report carries the rank, the
iteration and the Redis server's clock (its stream id, ms) at the report. A rank's bytes per
iteration are its ``rchar`` between two of its reports (interpolated between polls) divided by
the iterations between them, which leaves out the cold start (imports, the first downloads).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np

__all__ = ["ManifestGrab", "RunWatch", "StreamCopy", "TreeWatch", "run_train"]

MB = 2**20
_WORKER_TITLE = re.compile(r"smlt-worker-.*-g(\d+)-r(\d+)")


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc (one pass)."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields start after the last ')'.
        ppid = int(stat.rpartition(")")[2].split()[1])
        out.setdefault(ppid, []).append(int(entry))
    return out


def _descendants(root: int) -> list[int]:
    tree = _children()
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(tree.get(pid, []))
    return found


def _read_proc(pid: int) -> tuple[str, int, int, int] | None:
    """(title, VmHWM bytes, VmRSS bytes, rchar) of ``pid``; None if it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
        with open(f"/proc/{pid}/io") as f:
            io = f.read()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    hwm = int(fields.get("VmHWM", "0 kB").split()[0]) * 1024
    rss = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    rchar = int(next(line for line in io.splitlines() if line.startswith("rchar")).split()[1])
    return title, hwm, rss, rchar


#: How long stopping a poller waits for its thread: one poll may be blocked in a Redis or store
#: call that the run's end makes fail.
JOIN_TIMEOUT_S = 30.0


class _Poller:
    """A daemon thread running ``_run`` between :meth:`start` and :meth:`stop` (or as a context
    manager); ``_run`` returns soon after ``self._stop`` is set."""

    _name = "poller"

    def _arm(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(JOIN_TIMEOUT_S)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        raise NotImplementedError


@dataclass
class TreeWatch(_Poller):
    """Polls the process tree under ``root`` until :meth:`stop`."""

    _name = "tree-watch"

    root: int
    interval_s: float = 0.2
    #: pid -> (generation, rank) for the processes seen running a worker task.
    ranks: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: pid -> (unix time, rchar) at the first poll that saw it running a worker task.
    task_seen: dict[int, tuple[float, int]] = field(default_factory=dict)
    #: pid -> peak resident set (VmHWM) last read, bytes.
    peak: dict[int, int] = field(default_factory=dict)
    #: pid -> title last read.
    titles: dict[int, str] = field(default_factory=dict)
    #: pid -> [(unix time, rchar)].
    reads: dict[int, list[tuple[float, int]]] = field(default_factory=dict)
    #: The largest sum of the tree's resident sets at one poll, bytes.
    tree_peak_rss: int = 0
    polls: int = 0

    def __post_init__(self) -> None:
        self._arm()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval_s)

    def poll(self) -> None:
        now = time.time()
        total = 0
        for pid in _descendants(self.root):
            got = _read_proc(pid)
            if got is None:
                continue
            title, hwm, rss, rchar = got
            total += rss
            self.titles[pid] = title
            self.peak[pid] = max(self.peak.get(pid, 0), hwm)
            match = _WORKER_TITLE.search(title)
            if match:
                self.ranks[pid] = (int(match.group(1)), int(match.group(2)))
                self.task_seen.setdefault(pid, (now, rchar))
            self.reads.setdefault(pid, []).append((now, rchar))
        self.tree_peak_rss = max(self.tree_peak_rss, total)
        self.polls += 1

    def rchar_at(self, pid: int, unix_s: float) -> float:
        """``pid``'s rchar at ``unix_s``, linear between the two polls around it."""
        times, values = zip(*self.reads[pid], strict=True)
        return float(np.interp(unix_s, times, values))


class StreamCopy(_Poller):
    """Copies the job's progress stream out of Redis while the run goes: the driver deletes the
    job's keys, stream and all, when the run ends."""

    _name = "stream-copy"

    def __init__(self, redis_url: str, interval_s: float = 0.2) -> None:
        self.redis_url = redis_url
        self.interval_s = interval_s
        self.entries: dict[str, list[tuple[str, dict[str, str]]]] = {}
        self._arm()

    def _run(self) -> None:
        from smlt.storage.redis_server import connect

        client = connect(self.redis_url)
        while True:
            stopping = self._stop.wait(self.interval_s)
            try:
                self._copy(client)
            except Exception:  # Redis going away at the end of the run: keep what was copied
                if stopping:
                    return
            if stopping:
                return

    def _copy(self, client: Any) -> None:
        for key in client.scan_iter("*:progress"):
            stream = _text(key)
            have = self.entries.setdefault(stream, [])
            start = f"({have[-1][0]}" if have else "-"
            for raw_id, fields in client.xrange(stream, min=start, max="+"):
                have.append((_text(raw_id), {_text(k): _text(v) for k, v in fields.items()}))

    def reports(self) -> list[dict[str, Any]]:
        """Every iteration report copied, with ``at_unix_s`` from its stream id (the Redis
        server's clock in ms: this machine's)."""
        out = []
        for entries in self.entries.values():
            for sid, fields in entries:
                if "event" not in fields:
                    out.append({**fields, "at_unix_s": int(sid.split("-")[0]) / 1000})
        return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ManifestGrab(_Poller):
    """Copies the job's artifact manifest out of the store as soon as it appears: a finished
    run deletes its packaged data, manifest and all, and the figures need its shard layout."""

    _name = "manifest-grab"

    def __init__(self, store_url: str, interval_s: float = 0.5) -> None:
        self.store_url = store_url
        self.interval_s = interval_s
        self.manifest: bytes | None = None
        self._arm()

    def _run(self) -> None:
        from smlt.storage.objects import open_object_store

        store = open_object_store(self.store_url)
        while self.manifest is None and not self._stop.wait(self.interval_s):
            keys = [k for k in store.list("jobs/") if k.endswith("/artifact/manifest.json")]
            if keys:
                self.manifest = store.get_bytes(keys[0])


@dataclass
class RunWatch:
    """What one watched run left: its result.json, its reports and the tree's polls."""

    command: list[str]
    result: dict[str, Any]
    reports: list[dict[str, Any]]
    watch: TreeWatch
    client_pid: int
    manifest: dict[str, Any]
    started_unix_s: float
    wall_s: float
    stderr_tail: str

    def worker_pids(self) -> dict[int, int]:
        """rank -> pid of the process that ran it (generation 0; one per rank here)."""
        return {rank: pid for pid, (gen, rank) in self.watch.ranks.items() if gen == 0}

    def client_peak_bytes(self) -> int:
        return self.watch.peak[self.client_pid]


def run_train(
    tree: Path,
    args: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    redis_url: str,
    store_url: str,
    output: Path,
    timeout_s: float,
) -> RunWatch:
    """``smlt train ARGS --output OUTPUT --object-store STORE_URL`` on the Redis at ``redis_url``
    with ``tree`` first on the path, in ``cwd`` (not a source tree, so that ``tree`` is the smlt
    imported), watched; the job's manifest copied out of the store while it is there."""
    command = [
        sys.executable,
        "-m",
        "smlt.cli",
        "train",
        *args,
        "--output",
        str(output),
        "--object-store",
        store_url,
    ]
    # The Redis URL carries its password: through the environment, never a command line.
    full_env = {
        **os.environ,
        **env,
        "PYTHONPATH": str(tree),
        "COLUMNS": "200",
        "SMLT_REDIS_URL": redis_url,
    }
    stderr_path = output.parent / f"{output.name}.stderr"
    started = time.perf_counter()
    started_unix_s = time.time()
    with (
        open(stderr_path, "w") as stderr,
        ManifestGrab(store_url) as grab,
        StreamCopy(redis_url) as stream,
    ):
        proc = subprocess.Popen(
            command, cwd=cwd, env=full_env, stdout=subprocess.DEVNULL, stderr=stderr
        )
        watch = TreeWatch(proc.pid)
        watch.start()
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        finally:
            watch.stop()
    wall_s = time.perf_counter() - started
    tail = stderr_path.read_text()[-3000:]
    if code != 0:
        raise RuntimeError(f"smlt train exited {code}:\n{tail}")
    result = json.loads((output / "result.json").read_text())
    if grab.manifest is None:
        raise RuntimeError(f"the run's manifest never appeared in {store_url}")
    reports = stream.reports()
    manifest = json.loads(grab.manifest)
    return RunWatch(
        command, result, reports, watch, proc.pid, manifest, started_unix_s, wall_s, tail
    )
