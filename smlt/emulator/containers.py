"""Subprocess "containers", kept warm per function configuration like the platforms keep theirs.

A container is one Python process running :mod:`smlt.emulator.runtime` for one function
revision (handler, code, memory size, environment). The first invocation of a revision starts
one, and pays the import of the handler's module: a real cold start. When the invocation ends the
container waits, idle, for the next one of the same revision, and serves it without importing
anything again (a warm start), as Lambda and OpenWhisk reuse theirs. A change of configuration
is a new revision: its invocations get new containers, and the old ones are stopped.

The pool enforces what the platforms enforce:

- **concurrency**: every busy container is one concurrent execution. The API decides what is too
  many (``admit`` raises :class:`~smlt.errors.ThrottledError`), under the pool's lock, so two
  requests can never both take the last slot;
- **memory**: a monitor thread measures each busy container's resident memory (process and
  descendants, :mod:`smlt.emulator.procfs`) every ``memory_poll_s`` and kills a container over
  its limit, which the APIs answer as the platform answers an out-of-memory. A peak between two
  readings is caught afterwards: the runtime reports its ``ru_maxrss`` with every answer;
- **time**: the invocation waits for the answer until the deadline, then kills the container.

A container's process, and how the pool talks to it, is :mod:`smlt.emulator.process`.
"""

from __future__ import annotations

import concurrent.futures
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smlt.emulator import procfs
from smlt.emulator.process import REAP_TIMEOUT_S, ContainerProcess, ContainerSpec, Launcher
from smlt.errors import ThrottledError

__all__ = [
    "PROVISION_TIMEOUT_S",
    "Admit",
    "ContainerInfo",
    "ContainerPool",
    "ContainerSpec",
    "Lease",
    "Outcome",
    "PoolStatistics",
]

#: Descendant processes are looked up this often (reading all of /proc takes milliseconds).
_DESCENDANTS_EVERY_S = 1.0
#: The longest a new container's interpreter may take to start, before the init phase (which
#: the function's limits govern) begins.
PROVISION_TIMEOUT_S = 30.0

#: ``admit(busy_by_function, busy_total)`` raises ThrottledError to refuse an invocation.
Admit = Callable[[Mapping[str, int], int], None]


@dataclass(frozen=True)
class Outcome:
    """How one invocation ended.

    ``status``: ``ok`` (the handler returned ``body``), ``error`` (the handler raised or answered
    an error; details in ``answer``), ``init_error`` (the handler could not be imported),
    ``timeout``, ``oom``, ``crash`` (the process died: ``exit_reason``), or ``provision`` (no
    process could be started). ``phase`` says whether it ended during ``init`` or ``run``.
    """

    status: str
    phase: str = "run"
    answer: Mapping[str, Any] = field(default_factory=dict)
    body: bytes = b""
    duration_ms: float = 0.0
    init_ms: float | None = None
    max_memory_mb: int = 0
    logs: str = ""
    exit_reason: str = ""
    pid: int = 0


@dataclass(frozen=True)
class ContainerInfo:
    pid: int
    platform: str
    function: str
    revision: str
    memory_mb: int
    busy: bool
    invocations: int


@dataclass(frozen=True)
class PoolStatistics:
    containers: int
    busy: int
    cold_starts: int
    timeouts: int
    out_of_memory: int
    crashes: int


class ContainerPool:
    """The containers of one platform; see the module docstring."""

    def __init__(
        self,
        platform: str,
        *,
        python: str,
        base_env: Mapping[str, str],
        workdir: Path,
        idle_timeout_s: float,
        memory_poll_s: float,
    ) -> None:
        self.platform = platform
        self._python = python
        self._base_env = dict(base_env)
        self._workdir = workdir
        self._idle_timeout_s = idle_timeout_s
        self._memory_poll_s = memory_poll_s
        self._cond = threading.Condition()
        self._containers: list[ContainerProcess] = []
        self._busy = Counter[str]()
        self._current: dict[str, str] = {}  # function -> the revision its containers must run
        self._counts = Counter[str]()
        self._closed = threading.Event()
        self._launcher = Launcher(f"emulator-{platform}-launcher")
        self._monitor = threading.Thread(
            target=self._watch, name=f"emulator-{platform}-monitor", daemon=True
        )
        self._monitor.start()

    # -- taking and giving back --------------------------------------------------------------

    def acquire(
        self, spec: ContainerSpec, admit: Admit, *, wait_until: float | None = None
    ) -> Lease:
        """A lease on a warm container of ``spec``, or on a slot for a new one.

        Raises ThrottledError if ``admit`` refuses; with ``wait_until`` (monotonic seconds),
        waits for a slot until then first (Lambda queues asynchronous invocations).
        """
        stale: list[ContainerProcess] = []
        with self._cond:
            while True:
                if self._closed.is_set():
                    raise ThrottledError("the emulator is stopping")
                try:
                    admit(self._busy, sum(self._busy.values()))
                    break
                except ThrottledError:
                    remaining_s = (wait_until or 0) - time.monotonic()
                    if remaining_s <= 0:
                        self._counts["throttled"] += 1
                        raise
                    self._cond.wait(min(remaining_s, 1.0))
            if self._current.get(spec.function) != spec.revision:
                self._current[spec.function] = spec.revision
                stale = self._pop_idle(lambda c: c.spec.function == spec.function)
            # An idle container that died meanwhile (killed from outside) is not served: the
            # platform would start a fresh environment, and so do we.
            stale += self._pop_idle(lambda c: c.proc.poll() is not None)
            warm = self._claim_idle(spec)
            self._busy[spec.function] += 1
        for container in stale:
            container.discard()
        return Lease(self, spec, warm)

    def _pop_idle(self, match: Callable[[ContainerProcess], bool]) -> list[ContainerProcess]:
        """Remove the idle containers ``match`` selects from the pool (to be discarded)."""
        taken = [c for c in self._containers if not c.busy and match(c)]
        for container in taken:
            self._containers.remove(container)
        return taken

    def _pop_idle_since(self, oldest: float) -> list[ContainerProcess]:
        """Remove the containers idle since before ``oldest`` (monotonic seconds)."""
        return self._pop_idle(lambda c: c.last_used < oldest)

    def _claim_idle(self, spec: ContainerSpec) -> ContainerProcess | None:
        """An idle container of ``spec``'s revision, now busy: the most recently used one, the
        likeliest to still have its caches hot."""
        idle = [
            c
            for c in self._containers
            if not c.busy and c.spec.function == spec.function and c.spec.revision == spec.revision
        ]
        if not idle:
            return None
        container = max(idle, key=lambda c: c.last_used)
        container.busy = True
        return container

    def _release(self, spec: ContainerSpec, container: ContainerProcess | None, keep: bool) -> None:
        discard = None
        with self._cond:
            self._busy[spec.function] -= 1
            if self._busy[spec.function] <= 0:
                del self._busy[spec.function]
            if container is not None:
                current = self._current.get(spec.function) == spec.revision
                if keep and current and not self._closed.is_set():
                    container.busy = False
                    container.last_used = time.monotonic()
                elif container in self._containers:  # not already taken by close()
                    self._containers.remove(container)
                    discard = container
            self._cond.notify_all()
        if discard is not None:
            discard.discard()

    def retire(self, function: str) -> None:
        """Stop the function's idle containers now and its busy ones when they finish (the
        function was deleted)."""
        with self._cond:
            self._current.pop(function, None)
            stale = self._pop_idle(lambda c: c.spec.function == function)
        for container in stale:
            container.discard()

    def _start(self, spec: ContainerSpec) -> ContainerProcess:
        container = self._launcher.start_container(
            self._python, spec, self._base_env, self._workdir
        )
        with self._cond:
            self._containers.append(container)
            self._counts["cold_starts"] += 1
        return container

    # -- watching ----------------------------------------------------------------------------

    def _watch(self) -> None:
        tree: dict[int, list[int]] = {}
        tree_at = 0.0
        while not self._closed.wait(self._memory_poll_s):
            now = time.monotonic()
            with self._cond:
                busy = [c for c in self._containers if c.busy]
                expired = self._pop_idle_since(now - self._idle_timeout_s)
            for container in expired:
                container.discard()
            if busy and now - tree_at > _DESCENDANTS_EVERY_S:
                tree, tree_at = procfs.descendants(c.pid for c in busy), now
            for container in busy:
                pids = [container.pid, *tree.get(container.pid, ())]
                rss = sum(procfs.rss_bytes(pid) for pid in pids)
                container.peak_rss_bytes = max(container.peak_rss_bytes, rss)
                if rss > container.limit_bytes and not container.oom_killed:
                    container.oom_killed = True
                    container.kill()

    # -- looking -----------------------------------------------------------------------------

    def containers(self) -> list[ContainerInfo]:
        with self._cond:
            return [
                ContainerInfo(
                    c.pid,
                    self.platform,
                    c.spec.function,
                    c.spec.revision,
                    c.spec.memory_mb,
                    c.busy,
                    c.invocations,
                )
                for c in self._containers
            ]

    def statistics(self) -> PoolStatistics:
        with self._cond:
            return PoolStatistics(
                containers=len(self._containers),
                busy=sum(self._busy.values()),
                cold_starts=self._counts["cold_starts"],
                timeouts=self._counts["timeouts"],
                out_of_memory=self._counts["oom"],
                crashes=self._counts["crash"],
            )

    def _count(self, status: str) -> None:
        with self._cond:
            self._counts["timeouts" if status == "timeout" else status] += 1

    def close(self) -> None:
        """Kill every container and stop the pool's threads. Safe to call twice."""
        self._closed.set()
        with self._cond:
            idle = self._pop_idle(lambda c: True)
            busy = list(self._containers)
            self._cond.notify_all()
        for container in idle:
            container.discard()
        # A busy container's pipes belong to its invocation until the lease is released (which
        # discards it, the pool being closed); killing it ends the invocation at once.
        for container in busy:
            container.kill()
        self._monitor.join(REAP_TIMEOUT_S)
        self._launcher.close()


class Lease:
    """One invocation's hold on a container (or on a slot for a new one); release it once."""

    def __init__(
        self, pool: ContainerPool, spec: ContainerSpec, container: ContainerProcess | None
    ):
        self._pool = pool
        self.spec = spec
        self._container = container
        self._keep = True
        self._released = False

    @property
    def cold(self) -> bool:
        return self._container is None

    def invoke(
        self,
        header: Mapping[str, Any],
        body: bytes,
        *,
        timeout_s: float,
        init_grace_s: float,
        init_overflows: bool,
    ) -> Outcome:
        """Run one invocation; never raises for what the function does.

        A cold start first imports the handler, for at most ``init_grace_s``; if
        ``init_overflows`` (Lambda), a longer import goes on at the expense of the function's
        timeout, else (OpenWhisk) it is a timeout. The run's deadline is its start plus
        ``timeout_s``; ``header["deadline_ms"]`` tells the handler when that is.
        """
        started = time.monotonic()
        init_ms: float | None = None
        if self._container is None:
            try:
                self._container = self._pool._start(self.spec)
            except (OSError, concurrent.futures.TimeoutError) as exc:
                self._keep = False
                return Outcome("provision", phase="init", exit_reason=str(exc))
            failed = self._wait_until_up(started)
            if failed is not None:
                return failed
            started = time.monotonic()  # the init phase starts once the container is up
            init_bound = started + init_grace_s + (timeout_s if init_overflows else 0.0)
            ended = self._wait(init_bound, phase="init", started=started, timeout_s=timeout_s)
            if isinstance(ended, Outcome):
                return ended
            answer, _ = ended
            init_ms = (time.monotonic() - started) * 1000
            if not answer.get("ok"):
                self._keep = False
                return self._finish("init_error", "init", answer, b"", 0.0, init_ms)
        else:
            self._container.truncate_log()
        container = self._container
        container.invocations += 1
        run_deadline = started + min((init_ms or 0.0) / 1000, init_grace_s) + timeout_s
        wall_deadline_s = time.time() + (run_deadline - time.monotonic())
        request = {**header, "deadline_ms": int(wall_deadline_s * 1000)}
        run_started = time.monotonic()
        try:
            container.send(request, body)
        except OSError:
            return self._ended_abnormally("run", run_started, init_ms)
        ended = self._wait(
            run_deadline, phase="run", started=run_started, timeout_s=timeout_s, init_ms=init_ms
        )
        if isinstance(ended, Outcome):
            return ended
        answer, payload = ended
        duration_ms = (time.monotonic() - run_started) * 1000
        status = "ok" if answer.get("ok") else "error"
        return self._finish(status, "run", answer, payload, duration_ms, init_ms)

    def _wait_until_up(self, started: float) -> Outcome | None:
        """None once the new container's runtime says it is up; else how its start failed (a
        platform that cannot start a container answers with its own error, not the function's)."""
        assert self._container is not None
        try:
            up = self._container.receive(started + PROVISION_TIMEOUT_S)
        except TimeoutError:
            up = None
        if up is not None:
            return None
        self._container.kill()
        self._keep = False
        if self._container.oom_killed:
            return self._ended_abnormally("init", started, None)
        reason = f"the container did not start within {PROVISION_TIMEOUT_S:g} s"
        return Outcome("provision", phase="init", exit_reason=reason, pid=self._container.pid)

    def _wait(
        self,
        deadline: float,
        *,
        phase: str,
        started: float,
        timeout_s: float,
        init_ms: float | None = None,
    ) -> tuple[dict[str, Any], bytes] | Outcome:
        """The container's next answer, or the Outcome of its death or of the deadline."""
        assert self._container is not None
        try:
            ended = self._container.receive(deadline)
        except TimeoutError:
            self._container.kill()
            self._keep = False
            self._pool._count("timeout")
            duration_ms = timeout_s * 1000 if phase == "run" else 0.0
            init = (time.monotonic() - started) * 1000 if phase == "init" else init_ms
            return self._finish("timeout", phase, {}, b"", duration_ms, init, count=False)
        if ended is None:
            return self._ended_abnormally(phase, started, init_ms)
        answer, payload = ended
        container = self._container
        container.peak_rss_bytes = max(container.peak_rss_bytes, answer.get("max_rss_kb", 0) * 1024)
        if container.peak_rss_bytes > container.limit_bytes:
            # Over the limit between two readings: the platform would have killed it then.
            container.oom_killed = True
            container.kill()
            return self._ended_abnormally(phase, started, init_ms)
        return answer, payload

    def _ended_abnormally(self, phase: str, started: float, init_ms: float | None) -> Outcome:
        assert self._container is not None
        self._keep = False
        reason = self._container.exit_reason()
        status = "oom" if self._container.oom_killed else "crash"
        duration_ms = (time.monotonic() - started) * 1000
        if phase == "init":
            init_ms, duration_ms = duration_ms, 0.0
        return self._finish(status, phase, {}, b"", duration_ms, init_ms, exit_reason=reason)

    def _finish(
        self,
        status: str,
        phase: str,
        answer: Mapping[str, Any],
        body: bytes,
        duration_ms: float,
        init_ms: float | None,
        *,
        exit_reason: str = "",
        count: bool = True,
    ) -> Outcome:
        assert self._container is not None
        if count and status in ("oom", "crash"):
            self._pool._count(status)
        return Outcome(
            status=status,
            phase=phase,
            answer=answer,
            body=body,
            duration_ms=duration_ms,
            init_ms=init_ms,
            max_memory_mb=math.ceil(self._container.peak_rss_bytes / 2**20),
            logs=self._container.read_log(),
            exit_reason=exit_reason,
            pid=self._container.pid,
        )

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pool._release(self.spec, self._container, self._keep)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
