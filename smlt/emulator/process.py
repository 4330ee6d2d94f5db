"""A container's process: starting it, talking to its runtime, measuring, killing, reaping.

The emulator and :mod:`smlt.emulator.runtime` talk over two pipes in frames: a 4-byte length and a
JSON header, then a 4-byte length and a body. Reading waits with ``poll`` (not ``select``, which
fails past file descriptor 1024, and a hundred containers hold three each) and never past the
caller's deadline.

Every container is started by one long-lived thread (:class:`Launcher`): a container asks Linux
to kill it when the thread that started it ends (``PR_SET_PDEATHSIG`` follows the thread, not the
process), and request threads end all the time. Each runs in a session of its own, so a Ctrl-C
in the emulator's terminal does not reach it and ``killpg`` takes whatever it started too.
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smlt.emulator.runtime import MARKER

__all__ = ["ContainerProcess", "ContainerSpec", "Launcher"]

_RUNTIME = str(Path(__file__).with_name("runtime.py"))
_LENGTH = struct.Struct(">I")
#: The most of a container's log kept per invocation (OpenWhisk's default log limit is 10 MB;
#: Lambda's tail is 4 KB).
_LOG_LIMIT_BYTES = 1 << 20
_SPAWN_TIMEOUT_S = 30.0
REAP_TIMEOUT_S = 5.0


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


class Launcher:
    """Starts containers from one thread that lives as long as the pool (see the module doc)."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def start_container(
        self, python: str, spec: ContainerSpec, environment: Mapping[str, str], workdir: Path
    ) -> ContainerProcess:
        """A new container for ``spec``, its stdout and stderr going to a log in ``workdir``.
        Raises OSError if the process cannot be started."""
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        log = workdir / f"{spec.function}-{uuid.uuid4().hex[:12]}.log"
        log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        argv = [
            python,
            _RUNTIME,
            MARKER,
            spec.platform,
            spec.function,
            spec.handler,
            str(to_child_r),
            str(from_child_w),
            str(os.getpid()),
        ]
        env = {**environment, **spec.environment}
        try:
            proc = self._run(
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
        return ContainerProcess(spec, proc, to_child_w, from_child_r, log)

    def _run(self, start: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
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
        self._thread.join(REAP_TIMEOUT_S)


class ContainerProcess:
    """One container's process, the pipes to its runtime, and its log file."""

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
            self.proc.wait(REAP_TIMEOUT_S)
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
            code = self.proc.wait(REAP_TIMEOUT_S)
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
