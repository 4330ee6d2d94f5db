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

Every container is started by one long-lived thread (:class:`_Launcher`): a container asks Linux
to kill it when the thread that started it ends, and request threads end all the time.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import queue
import select
import signal
import struct
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smlt.emulator import procfs
from smlt.emulator.runtime import MARKER
from smlt.errors import ThrottledError

__all__ = [
    "ContainerInfo",
    "ContainerPool",
    "ContainerSpec",
    "Lease",
    "Outcome",
    "PoolStatistics",
]

_RUNTIME = str(Path(__file__).with_name("runtime.py"))
_LENGTH = struct.Struct(">I")
#: The most of a container's log kept per invocation (OpenWhisk's default log limit is 10 MB;
#: Lambda's tail is 4 KB).
_LOG_LIMIT_BYTES = 1 << 20
#: Descendant processes are looked up this often (reading all of /proc takes milliseconds).
_DESCENDANTS_EVERY_S = 1.0
_SPAWN_TIMEOUT_S = 30.0
_REAP_TIMEOUT_S = 5.0

#: ``admit(busy_by_function, busy_total)`` raises ThrottledError to refuse an invocation.
Admit = Callable[[Mapping[str, int], int], None]


@dataclass(frozen=True)
class ContainerSpec:
    """What a container runs. Containers are shared only within one ``(function, revision)``."""

    platform: str  # "lambda" or "openwhisk"
    function: str
    revision: str
    handler: str
    memory_mb: int
    code_dir: Path
    environment: Mapping[str, str] = field(default_factory=dict)


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


class _Launcher:
    """Runs ``subprocess.Popen`` on one thread that lives as long as the pool (see module doc)."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def start(self, start: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
        future: concurrent.futures.Future[subprocess.Popen[bytes]] = concurrent.futures.Future()
        self._jobs.put((future, start))
        return future.result(_SPAWN_TIMEOUT_S)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, start = job
            try:
                future.set_result(start())
            except BaseException as exc:
                future.set_exception(exc)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(_REAP_TIMEOUT_S)


class _Container:
    def __init__(
        self,
        spec: ContainerSpec,
        proc: subprocess.Popen[bytes],
        send_fd: int,
        recv_fd: int,
        log: Path,
    ) -> None:
        self.spec = spec
        self.proc = proc
        self.log = log
        self.busy = True
        self.invocations = 0
        self.last_used = time.monotonic()
        self.peak_rss_bytes = 0
        self.oom_killed = False
        self._send_fd = send_fd
        self._recv_fd = recv_fd
        self._buffer = bytearray()
        self._poller = select.poll()
        self._poller.register(recv_fd, select.POLLIN)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def limit_bytes(self) -> int:
        return self.spec.memory_mb * 2**20

    def send(self, header: Mapping[str, Any], body: bytes) -> None:
        data = json.dumps(header).encode()
        view = memoryview(_LENGTH.pack(len(data)) + data + _LENGTH.pack(len(body)) + body)
        while view:
            view = view[os.write(self._send_fd, view) :]

    def receive(self, deadline: float) -> tuple[dict[str, Any], bytes] | None:
        """The next answer; None if the process closed its end (it died). Raises TimeoutError
        at ``deadline`` (monotonic seconds)."""
        while True:
            frame = self._take_frame()
            if frame is not None:
                return json.loads(frame[0]), frame[1]
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise TimeoutError
            if self._poller.poll(math.ceil(min(remaining_s, 1.0) * 1000)):
                chunk = os.read(self._recv_fd, 1 << 20)
                if not chunk:
                    return None
                self._buffer += chunk

    def _take_frame(self) -> tuple[bytes, bytes] | None:
        buf, parts, at = self._buffer, [], 0
        for _ in range(2):
            if len(buf) < at + _LENGTH.size:
                return None
            size = _LENGTH.unpack_from(buf, at)[0]
            at += _LENGTH.size
            if len(buf) < at + size:
                return None
            parts.append(bytes(buf[at : at + size]))
            at += size
        del buf[:at]
        return parts[0], parts[1]

    def kill(self) -> None:
        """SIGKILL the container's process group (its process and whatever it started)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def discard(self) -> None:
        """Kill, reap, close the pipes, delete the log."""
        self.kill()
        try:
            self.proc.wait(_REAP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        for fd in (self._send_fd, self._recv_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.log.unlink(missing_ok=True)

    def exit_reason(self) -> str:
        """How the process ended, in the words of Lambda's runtime errors."""
        try:
            code = self.proc.wait(_REAP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return "runtime stopped answering"
        if code < 0:
            try:
                return f"signal: {signal.strsignal(-code) or -code}".lower()
            except ValueError:
                return f"signal: {-code}"
        return f"exit status {code}"

    def truncate_log(self) -> None:
        os.truncate(self.log, 0)

    def read_log(self) -> str:
        try:
            with open(self.log, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - _LOG_LIMIT_BYTES))
                return f.read().decode(errors="replace")
        except OSError:
            return ""


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
        self._containers: list[_Container] = []
        self._busy = Counter[str]()
        self._current: dict[str, str] = {}  # function -> the revision its containers must run
        self._counts = Counter[str]()
        self._closed = threading.Event()
        self._launcher = _Launcher(f"emulator-{platform}-launcher")
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
        stale: list[_Container] = []
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
            warm = self._claim_idle(spec)
            self._busy[spec.function] += 1
        for container in stale:
            container.discard()
        return Lease(self, spec, warm)

    def _pop_idle(self, match: Callable[[_Container], bool]) -> list[_Container]:
        """Remove the idle containers ``match`` selects from the pool (to be discarded)."""
        taken = [c for c in self._containers if not c.busy and match(c)]
        for container in taken:
            self._containers.remove(container)
        return taken

    def _pop_idle_since(self, oldest: float) -> list[_Container]:
        """Remove the containers idle since before ``oldest`` (monotonic seconds)."""
        return self._pop_idle(lambda c: c.last_used < oldest)

    def _claim_idle(self, spec: ContainerSpec) -> _Container | None:
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

    def _release(self, spec: ContainerSpec, container: _Container | None, keep: bool) -> None:
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

    def _start(self, spec: ContainerSpec) -> _Container:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        log = self._workdir / f"{spec.function}-{uuid.uuid4().hex[:12]}.log"
        log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        argv = [
            self._python,
            _RUNTIME,
            MARKER,
            self.platform,
            spec.function,
            spec.handler,
            str(to_child_r),
            str(from_child_w),
            str(os.getpid()),
        ]
        env = {**self._base_env, **spec.environment}
        try:
            proc = self._launcher.start(
                lambda: subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_fd,
                    stderr=log_fd,
                    pass_fds=(to_child_r, from_child_w),
                    cwd=spec.code_dir,
                    env=env,
                    start_new_session=True,  # one process group: killpg takes its children too
                )
            )
        except BaseException:
            for fd in (to_child_w, from_child_r):
                os.close(fd)
            log.unlink(missing_ok=True)
            raise
        finally:
            for fd in (to_child_r, from_child_w, log_fd):
                os.close(fd)
        container = _Container(spec, proc, to_child_w, from_child_r, log)
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
        self._monitor.join(_REAP_TIMEOUT_S)
        self._launcher.close()


class Lease:
    """One invocation's hold on a container (or on a slot for a new one); release it once."""

    def __init__(self, pool: ContainerPool, spec: ContainerSpec, container: _Container | None):
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
