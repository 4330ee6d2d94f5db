"""What the emulator is told at start: address, credentials, limits, and which handler to run.

Every tunable is a ``DEFAULT_*`` constant beside its ``SMLT_EMULATOR_*`` variable, read when a
config is built (not at import), and every field is checked when the config is built: a bad
value raises :class:`~smlt.errors.ConfigError` naming the field, before a port is opened.

**Which handler a container runs.** A Lambda function packaged as a zip names its handler in
``Handler`` (``module.function`` as on Lambda, or ``module:function``), imported from the
unpacked zip first and then from the emulator's own Python environment. There is no Docker here,
so an image (Lambda ``PackageType: Image``, an OpenWhisk ``blackbox`` action) is never pulled:
the emulator runs, in this order, the handler the image's ``ImageConfig.Command`` names (which is
how AWS base images take their handler; Lambda only), the handler ``image_handlers`` maps the
image URI to (exact URI first, then the URI without its tag or digest), or the platform default
(``lambda_handler`` / ``openwhisk_handler``, from ``SMLT_EMULATOR_LAMBDA_HANDLER`` /
``SMLT_EMULATOR_OPENWHISK_HANDLER``, else smlt's worker entry points). An OpenWhisk action with
inline code (``python:3``, or ``blackbox`` with ``exec.code``, which is how OpenWhisk's Python
runtime images take their code) runs that code's ``main`` (or the ``exec.main`` it names).
"""

from __future__ import annotations

import os
import re
import secrets
import string
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from smlt.errors import ConfigError

__all__ = [
    "DEFAULT_BLOCKING_WINDOW_S",
    "DEFAULT_IDLE_TIMEOUT_S",
    "DEFAULT_LAMBDA_HANDLER",
    "DEFAULT_MAX_CONCURRENCY",
    "DEFAULT_OPENWHISK_HANDLER",
    "DEFAULT_UPDATE_DELAY_S",
    "AwsCredentials",
    "EmulatorConfig",
    "parse_handler",
]

#: The smlt worker's entry points, run for images when nothing else names a handler.
DEFAULT_LAMBDA_HANDLER = "smlt.worker.entrypoints.lambda_handler"
DEFAULT_OPENWHISK_HANDLER = "smlt.worker.entrypoints.openwhisk_main"
#: Containers busy at once per platform. Lambda's account default is 1,000 and OpenWhisk's 100;
#: 100 subprocesses is already more than a laptop holds with torch imported in each.
DEFAULT_MAX_CONCURRENCY = 100
#: How long a created or updated Lambda function stays ``Pending`` / ``InProgress``: long enough
#: that a client which does not wait for the update is caught (invoking a Pending function is a
#: ResourceConflictException), short enough for tests.
DEFAULT_UPDATE_DELAY_S = 0.3
#: OpenWhisk's ``maxWaitForBlockingActivation``: a blocking invoke that takes longer answers 202.
DEFAULT_BLOCKING_WINDOW_S = 60.0
#: A warm container idle this long is stopped (Lambda keeps them some minutes; so do we).
DEFAULT_IDLE_TIMEOUT_S = 600.0
#: How often a busy container's resident memory is measured.
DEFAULT_MEMORY_POLL_S = 0.1
#: Lambda's init phase may take 10 s before it eats into the function's timeout.
DEFAULT_LAMBDA_INIT_TIMEOUT_S = 10.0
#: OpenWhisk's default action limits (apache/openwhisk docs/reference.md); operators raise both
#: for ML, and so can the emulator's user.
DEFAULT_OPENWHISK_MAX_MEMORY_MB = 512
DEFAULT_OPENWHISK_MAX_TIMEOUT_MS = 300_000
#: Lambda retries a failed asynchronous invocation twice, about 1 and 2 minutes later.
DEFAULT_EVENT_RETRY_DELAYS_S = (60.0, 120.0)

_KEY_ID_ALPHABET = string.ascii_uppercase + string.digits
_HANDLER = re.compile(r"^[A-Za-z_][\w./]*[:.][A-Za-z_]\w*$")
_AUTH = re.compile(r"^[^\s:]+:[^\s:]+$")


def parse_handler(spec: str, *, option: str = "handler") -> tuple[str, str]:
    """``(module, function)`` of ``module.function`` or ``module:function`` (``dir/mod.fn`` as
    Lambda allows it: the folder becomes a package path)."""
    if not _HANDLER.match(spec):
        raise ConfigError(
            f"{option} {spec!r} is not a handler: give module.function or module:function"
        )
    module, _, function = spec.rpartition(":") if ":" in spec else spec.rpartition(".")
    return module.replace("/", "."), function


def _env_float(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a number") from None


@dataclass(frozen=True)
class AwsCredentials:
    """What boto3 needs to talk to the emulator's Lambda API. The emulator checks the access key
    id (it does not verify SigV4 signatures), so treat the id like the secret: never log it."""

    access_key_id: str
    secret_access_key: str
    region: str

    def __repr__(self) -> str:
        return (
            f"AwsCredentials(access_key_id='***', secret_access_key='***', region={self.region!r})"
        )


def _generated_key_id() -> str:
    return "AKIA" + "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(16))


@dataclass(frozen=True)
class EmulatorConfig:
    """Everything :class:`~smlt.emulator.Emulator` is started with; checked at construction.

    ``openwhisk_auth`` (``UUID:KEY``) and ``aws_access_key_id`` are generated when not given.
    ``container_env`` is added to every container's environment (which otherwise is the
    emulator's own, standing in for the image's ``ENV`` and the function's execution role).
    """

    host: str = "127.0.0.1"
    port: int = 0
    openwhisk_auth: str | None = field(default=None, repr=False)
    aws_access_key_id: str | None = field(default=None, repr=False)
    region: str = "us-east-1"
    openwhisk_namespace: str = "guest"
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    lambda_handler: str = ""
    openwhisk_handler: str = ""
    image_handlers: Mapping[str, str] = field(default_factory=dict)
    container_env: Mapping[str, str] = field(default_factory=dict)
    python: str = sys.executable
    update_delay_s: float = -1.0
    blocking_window_s: float = -1.0
    idle_timeout_s: float = -1.0
    memory_poll_s: float = -1.0
    lambda_init_timeout_s: float = DEFAULT_LAMBDA_INIT_TIMEOUT_S
    openwhisk_max_memory_mb: int = DEFAULT_OPENWHISK_MAX_MEMORY_MB
    openwhisk_max_timeout_ms: int = DEFAULT_OPENWHISK_MAX_TIMEOUT_MS
    event_retry_delays_s: tuple[float, ...] = DEFAULT_EVENT_RETRY_DELAYS_S

    def __post_init__(self) -> None:
        # Negative sentinels mean "not given": take the environment, then the default.
        put = object.__setattr__
        for name, env, default in (
            ("update_delay_s", "SMLT_EMULATOR_UPDATE_DELAY_S", DEFAULT_UPDATE_DELAY_S),
            ("blocking_window_s", "SMLT_EMULATOR_BLOCKING_WINDOW_S", DEFAULT_BLOCKING_WINDOW_S),
            ("idle_timeout_s", "SMLT_EMULATOR_IDLE_TIMEOUT_S", DEFAULT_IDLE_TIMEOUT_S),
            ("memory_poll_s", "SMLT_EMULATOR_MEMORY_POLL_S", DEFAULT_MEMORY_POLL_S),
        ):
            if getattr(self, name) < 0:
                put(self, name, _env_float(env, default))
        if not self.lambda_handler:
            put(
                self,
                "lambda_handler",
                os.environ.get("SMLT_EMULATOR_LAMBDA_HANDLER") or DEFAULT_LAMBDA_HANDLER,
            )
        if not self.openwhisk_handler:
            put(
                self,
                "openwhisk_handler",
                os.environ.get("SMLT_EMULATOR_OPENWHISK_HANDLER") or DEFAULT_OPENWHISK_HANDLER,
            )
        put(self, "image_handlers", dict(self.image_handlers))
        put(self, "container_env", dict(self.container_env))
        put(self, "event_retry_delays_s", tuple(float(s) for s in self.event_retry_delays_s))
        self._check()

    def _check(self) -> None:
        if not self.host.strip():
            raise ConfigError("emulator host is empty: give an address such as 127.0.0.1")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"emulator port {self.port} is not in [0, 65535] (0: any free)")
        if self.openwhisk_auth is not None and not _AUTH.match(self.openwhisk_auth):
            raise ConfigError(
                "--openwhisk-auth is not of the form UUID:KEY (two non-empty parts, no spaces)"
            )
        if self.aws_access_key_id is not None and not re.fullmatch(
            r"[A-Za-z0-9]{4,128}", self.aws_access_key_id
        ):
            raise ConfigError("--aws-access-key-id must be 4-128 letters and digits")
        if not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", self.region):
            raise ConfigError(f"emulator region {self.region!r} is not an AWS region name")
        if not re.fullmatch(r"[A-Za-z0-9_@.\-]+", self.openwhisk_namespace):
            raise ConfigError(f"OpenWhisk namespace {self.openwhisk_namespace!r} is not valid")
        if self.max_concurrency < 1:
            raise ConfigError(f"--max-concurrency {self.max_concurrency} must be at least 1")
        parse_handler(self.lambda_handler, option="lambda_handler")
        parse_handler(self.openwhisk_handler, option="openwhisk_handler")
        for image, handler in self.image_handlers.items():
            parse_handler(handler, option=f"image_handlers[{image!r}]")
        for name in ("update_delay_s", "idle_timeout_s", "lambda_init_timeout_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"emulator {name} must be >= 0, got {getattr(self, name)}")
        for name in ("blocking_window_s", "memory_poll_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"emulator {name} must be > 0, got {getattr(self, name)}")
        if self.openwhisk_max_memory_mb < 128:
            raise ConfigError(
                f"openwhisk_max_memory_mb {self.openwhisk_max_memory_mb} is below 128 MB, "
                "OpenWhisk's minimum"
            )
        if self.openwhisk_max_timeout_ms < 100:
            raise ConfigError(
                f"openwhisk_max_timeout_ms {self.openwhisk_max_timeout_ms} is below 100 ms, "
                "OpenWhisk's minimum"
            )
        if any(delay < 0 for delay in self.event_retry_delays_s):
            raise ConfigError("event_retry_delays_s must all be >= 0")

    def generate_credentials(self) -> tuple[AwsCredentials, str]:
        """The credentials this emulator accepts: the given ones, else fresh random ones."""
        key_id = self.aws_access_key_id or _generated_key_id()
        aws = AwsCredentials(key_id, secrets.token_urlsafe(30), self.region)
        openwhisk = self.openwhisk_auth or f"{_uuid()}:{secrets.token_urlsafe(48)}"
        return aws, openwhisk


def _uuid() -> str:
    import uuid

    return str(uuid.uuid4())
