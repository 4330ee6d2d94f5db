"""One HTTP server for both APIs, and :class:`Emulator`, the handle tests and the CLI hold.

Lambda's routes start with their API version (``/2015-03-31/...``), OpenWhisk's with
``/api/v1/``, so one port serves both and one URL is both ``AWS_ENDPOINT_URL_LAMBDA`` and
``__OW_API_HOST``. The server is the standard library's threading server: a thread per
connection, so a blocking invoke holds one thread and nothing else; it binds 127.0.0.1 unless
told otherwise.

**Credentials** are generated at start unless given, kept in memory, and never logged: the log
has methods, paths and statuses, never headers. :meth:`Emulator.write_env_file` writes them for a
shell to ``source``, in a file only its owner can read. Containers inherit the emulator's
environment (it stands in for the image's ``ENV`` and the execution role's credentials) minus
the emulator's own settings (``SMLT_EMULATOR_*``, which may hold the OpenWhisk key) and any
``__OW_*`` variable (a container gets the ones OpenWhisk sets, no others).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shlex
import shutil
import socket
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from smlt.emulator import lambda_api, openwhisk_api
from smlt.emulator.config import AwsCredentials, EmulatorConfig
from smlt.emulator.containers import ContainerInfo, ContainerPool, PoolStatistics
from smlt.emulator.lambda_api import LambdaApi
from smlt.emulator.messages import Request, Response
from smlt.emulator.openwhisk_api import OpenWhiskApi
from smlt.errors import ConfigError

__all__ = ["Emulator", "EmulatorStatistics", "PlatformStatistics"]

logger = logging.getLogger("smlt.emulator")

#: The largest request body read (a CreateFunction with a 50 MB zip, base64 in JSON, fits).
MAX_BODY_BYTES = 80 * 2**20
#: An idle keep-alive connection is closed after this long.
CONNECTION_IDLE_S = 120.0
#: Connections waiting to be accepted: room for every worker of the largest fan-out at once.
LISTEN_BACKLOG = 1024
_STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class PlatformStatistics:
    invocations: int
    throttled: int
    billed_ms: int
    containers: int
    busy: int
    cold_starts: int
    timeouts: int
    out_of_memory: int
    crashes: int


@dataclass(frozen=True)
class EmulatorStatistics:
    aws_lambda: PlatformStatistics
    openwhisk: PlatformStatistics


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # The listen backlog. socketserver's default, 5, is overrun when a generation's hundred
    # workers connect at once (a fan-out through a fresh connection pool): the kernel then drops
    # or resets connections the server has not accepted yet, and boto3 reported
    # ConnectionClosedError (benchmarks/fanout.py, 100 workers). Linux caps it at somaxconn.
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], emulator: Emulator) -> None:
        self.emulator = emulator
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "smlt-emulator"
    timeout = CONNECTION_IDLE_S
    # TCP_NODELAY on every connection. An answer goes out in two writes (the headers, then the
    # body); with Nagle's algorithm the body waited for the ACK of the headers, which a client in
    # delayed-ACK mode sends up to 40 ms later (seen as 48 ms warm invocations, against 7 ms
    # with this line, while benchmarks/fanout.py was written).
    disable_nagle_algorithm = True
    server: _Server

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PUT = do_DELETE = do_GET

    def _serve(self) -> None:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            return self._write(Response.json(411, {"message": "Content-Length is required"}))
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            return self._write(Response.json(413, {"message": "Request body too large"}))
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        request = Request(
            method=self.command,
            path=parts.path,
            query=parse_qs(parts.query, keep_blank_values=True),
            headers={name.lower(): value for name, value in self.headers.items()},
            body=body,
        )
        try:
            response = self.server.emulator._route(request)
        except Exception:
            # A bug in the emulator: logged with the path, never the headers (credentials).
            logger.exception("emulator error on %s %s", request.method, request.path)
            response = Response.json(500, {"message": "internal error in the emulator"})
        self._write(response)

    def _write(self, response: Response) -> None:
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        # http.server logs the request line (method, path, query) and the status; no headers.
        logger.debug("%s %s", self.address_string(), format % args)


def _container_environment(extra: Mapping[str, str]) -> dict[str, str]:
    inherited = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("SMLT_EMULATOR_", "__OW_"))
    }
    return {**inherited, **extra}


class Emulator:
    """A local AWS Lambda and OpenWhisk; a context manager.

    >>> with Emulator(max_concurrency=4) as emu:               # doctest: +SKIP
    ...     client = boto3.client("lambda", endpoint_url=emu.lambda_url,
    ...                           aws_access_key_id=emu.aws_credentials.access_key_id, ...)

    Options are :class:`~smlt.emulator.config.EmulatorConfig`'s fields, or pass ``config``.
    """

    def __init__(self, config: EmulatorConfig | None = None, **options: Any) -> None:
        if config is not None and options:
            raise ConfigError("give Emulator either a config or options, not both")
        self.config = config if config is not None else EmulatorConfig(**options)
        self.aws_credentials: AwsCredentials
        self.openwhisk_auth: str
        self.aws_credentials, self.openwhisk_auth = self.config.generate_credentials()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._workdir: Path | None = None
        self._pools: dict[str, ContainerPool] = {}
        self._lambda: LambdaApi | None = None
        self._openwhisk: OpenWhiskApi | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Emulator:
        if self._server is not None:
            raise ConfigError("this Emulator is already started")
        config = self.config
        try:
            server = _Server((config.host, config.port), self)
        except OSError as exc:
            raise ConfigError(
                f"the emulator cannot listen on {config.host}:{config.port}: {exc}"
            ) from exc
        self._server = server
        self._workdir = Path(tempfile.mkdtemp(prefix="smlt-emulator-"))  # mode 0700
        environment = _container_environment(config.container_env)
        for platform in ("lambda", "openwhisk"):
            folder = self._workdir / platform
            folder.mkdir(mode=0o700)
            self._pools[platform] = ContainerPool(
                platform,
                python=config.python,
                base_env=environment,
                workdir=folder,
                idle_timeout_s=config.idle_timeout_s,
                memory_poll_s=config.memory_poll_s,
            )
        self._lambda = LambdaApi(config, self.aws_credentials, self._pools["lambda"], self._workdir)
        self._openwhisk = OpenWhiskApi(
            config, self.openwhisk_auth, self._pools["openwhisk"], self._workdir, lambda: self.url
        )
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="emulator-http",
            daemon=True,
        )
        self._thread.start()
        logger.info("smlt emulator serving Lambda and OpenWhisk on %s", self.url)
        if not _is_loopback(self.host):
            logger.warning(
                "the emulator listens on %s, not loopback: whoever reaches it with the "
                "credentials can run code as this user, and plain HTTP shows them on the network",
                self.host,
            )
        return self

    def stop(self) -> None:
        """Stop serving, kill every container, delete the code folders. Safe to call twice."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._lambda is not None:
            self._lambda.stop()
        for pool in self._pools.values():
            pool.close()
        if self._lambda is not None:
            self._lambda.join(_STOP_TIMEOUT_S)
        if self._openwhisk is not None:
            self._openwhisk.join(_STOP_TIMEOUT_S)
        if self._thread is not None:
            self._thread.join(_STOP_TIMEOUT_S)
            self._thread = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> Emulator:
        return self.start() if self._server is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- where and how to reach it -----------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """The address the server is bound to."""
        if self._server is None:
            raise ConfigError("the emulator is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def host(self) -> str:
        return self.address[0]

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def lambda_url(self) -> str:
        """``AWS_ENDPOINT_URL_LAMBDA`` (boto3's ``endpoint_url``)."""
        return self.url

    @property
    def openwhisk_url(self) -> str:
        """``__OW_API_HOST``."""
        return self.url

    def client_environment(self) -> dict[str, str]:
        """The variables that point boto3 and OpenWhisk clients at this emulator. The AWS keys
        are included only when the emulator generated them (a given key id is the user's)."""
        env = {"AWS_ENDPOINT_URL_LAMBDA": self.lambda_url}
        if self.config.aws_access_key_id is None:
            env["AWS_ACCESS_KEY_ID"] = self.aws_credentials.access_key_id
            env["AWS_SECRET_ACCESS_KEY"] = self.aws_credentials.secret_access_key
        env["AWS_DEFAULT_REGION"] = self.aws_credentials.region
        env["__OW_API_HOST"] = self.openwhisk_url
        env["__OW_API_KEY"] = self.openwhisk_auth
        return env

    def write_env_file(self, path: Path) -> Path:
        """Write :meth:`client_environment` as ``export`` lines, readable by the owner only
        (created 0600 and renamed into place, so it is never readable by others even briefly)."""
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        text = "".join(
            f"export {k}={shlex.quote(v)}\n" for k, v in self.client_environment().items()
        )
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return path

    # -- looking inside ----------------------------------------------------------------------

    def containers(self) -> list[ContainerInfo]:
        """Every living container (pid, platform, function, memory, busy): a test can kill one
        to see how a client copes with a dead worker."""
        return [info for pool in self._pools.values() for info in pool.containers()]

    def statistics(self) -> EmulatorStatistics:
        if self._lambda is None or self._openwhisk is None:
            raise ConfigError("the emulator is not started")
        lam, ow = self._lambda.statistics(), self._openwhisk.statistics()
        return EmulatorStatistics(
            aws_lambda=_platform(lam["invocations"], lam, self._pools["lambda"].statistics()),
            openwhisk=_platform(ow["activations"], ow, self._pools["openwhisk"].statistics()),
        )

    def _route(self, request: Request) -> Response:
        assert self._lambda is not None and self._openwhisk is not None
        if request.path.startswith(openwhisk_api.PATH_PREFIX):
            return self._openwhisk.handle(request)
        if request.path.startswith(lambda_api.PATH_PREFIXES):
            return self._lambda.handle(request)
        return Response.json(404, {"message": f"no such API: {request.path}"})

    def __repr__(self) -> str:
        where = self.url if self._server is not None else "stopped"
        return f"Emulator({where})"


def _platform(
    invocations: int, counts: Mapping[str, int], pool: PoolStatistics
) -> PlatformStatistics:
    return PlatformStatistics(
        invocations=invocations,
        throttled=counts["throttled"],
        billed_ms=counts["billed_ms"],
        containers=pool.containers,
        busy=pool.busy,
        cold_starts=pool.cold_starts,
        timeouts=pool.timeouts,
        out_of_memory=pool.out_of_memory,
        crashes=pool.crashes,
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
