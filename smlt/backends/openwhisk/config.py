"""The OpenWhisk backend's settings, found the way the ``wsk`` CLI finds them.

Where the API is and who we are, in order: backend options (``api_host``, ``auth``,
``namespace``); the ``__OW_API_HOST``, ``__OW_API_KEY`` and ``__OW_NAMESPACE`` environment
variables; the ``APIHOST``, ``AUTH`` and ``NAMESPACE`` properties of ``~/.wskprops`` (or the
file ``WSK_CONFIG_FILE`` names). ``AUTH`` is the namespace's ``uuid:key``, sent as HTTP Basic
credentials: it is a secret, never part of a message, a ``repr`` or a log line. An ``APIHOST``
without a scheme means HTTPS, as for ``wsk``.

What to deploy: the worker's Docker image (``image`` / ``SMLT_OPENWHISK_IMAGE``, built from
``docker/Dockerfile.openwhisk`` on OpenWhisk's Python runtime), run as a "blackbox" action with
``code``, a one-line ``main`` that calls :func:`smlt.worker.entrypoints.openwhisk_main`, injected
at the action's initialisation (the Python runtime's own convention).

OpenWhisk's default limits (apache/openwhisk docs/reference.md) are small for training: 512 MB
and 300 s per action, 100 concurrent activations per namespace; operators raise them, and the
``max_memory_mb``, ``max_duration_s`` and ``max_concurrency`` options (or
``SMLT_OPENWHISK_MAX_MEMORY_MB``, ``SMLT_OPENWHISK_MAX_DURATION_S``,
``SMLT_OPENWHISK_MAX_CONCURRENCY``) say what yours allow. ``timeout_s``, an action's limit when
a run gives no ``--function-timeout``, defaults to ``max_duration_s``.
TLS certificates are verified unless ``verify_tls`` is False (for a local test deployment with a
self-signed certificate; plain ``http://`` needs no TLS at all) or a CA bundle's path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from smlt.backends.retry import ThrottleRetry
from smlt.errors import ConfigError

__all__ = [
    "DEFAULT_BLOCKING_WINDOW_S",
    "DEFAULT_CODE",
    "OpenWhiskConfig",
    "read_wskprops",
]

#: The main OpenWhisk's Python runtime calls, importing the worker's entry point from the image.
DEFAULT_CODE = (
    "from smlt.worker.entrypoints import openwhisk_main\n\n\n"
    "def main(args):\n"
    "    return openwhisk_main(args)\n"
)
#: How long a blocking invoke waits before OpenWhisk answers 202 with the activation id
#: (OpenWhisk's maximum, 60 s; then the activation record is polled).
DEFAULT_BLOCKING_WINDOW_S = 60.0
#: OpenWhisk's default limits (docs/reference.md): memory 128-512 MB, 300 s, 100 concurrent.
MIN_MEMORY_MB = 128
DEFAULT_MAX_MEMORY_MB = 512
DEFAULT_MAX_DURATION_S = 300
DEFAULT_CONCURRENCY = 100
#: 1 MB of parameters per invocation.
PAYLOAD_BYTES = 2**20


def read_wskprops(path: Path) -> dict[str, str]:
    """The ``KEY=VALUE`` properties of a ``.wskprops`` file ({} if there is none)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    props = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            props[key.strip()] = value.strip()
    return props


@dataclass(frozen=True)
class OpenWhiskConfig:
    """Validated at construction; see the module docstring."""

    api_host: str | None = None
    auth: str | None = field(default=None, repr=False)
    namespace: str = "_"
    image: str | None = None
    code: str = DEFAULT_CODE
    verify_tls: bool | str = True
    action_prefix: str = "smlt-"
    timeout_s: int | None = None
    max_memory_mb: int = DEFAULT_MAX_MEMORY_MB
    max_duration_s: int = DEFAULT_MAX_DURATION_S
    max_concurrency: int = DEFAULT_CONCURRENCY
    blocking_window_s: float = DEFAULT_BLOCKING_WINDOW_S
    #: Longest wait, past an activation's time limit, for its record to appear.
    record_grace_s: float = 120.0
    throttle: ThrottleRetry = field(default_factory=ThrottleRetry)

    def __post_init__(self) -> None:
        if self.api_host is not None:
            parts = urlsplit(self.base_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"OpenWhisk API host {self.api_host!r} is not a URL or host")
        if self.auth is not None:
            user, sep, key = self.auth.partition(":")
            if not (sep and user and key):
                # Never echo the value: it is a secret, even a malformed one.
                raise ConfigError("the OpenWhisk auth key must look like UUID:KEY")
        if not self.namespace or "/" in self.namespace:
            raise ConfigError(f"bad OpenWhisk namespace {self.namespace!r}")
        if not MIN_MEMORY_MB <= self.max_memory_mb:
            raise ConfigError(f"max_memory_mb must be >= {MIN_MEMORY_MB}")
        if self.max_duration_s < 1:
            raise ConfigError(f"max_duration_s must be >= 1, got {self.max_duration_s}")
        if self.timeout_s is None:
            object.__setattr__(self, "timeout_s", self.max_duration_s)
        assert self.timeout_s is not None
        if not 1 <= self.timeout_s <= self.max_duration_s:
            raise ConfigError(
                f"timeout_s must be in [1, max_duration_s={self.max_duration_s}], "
                f"got {self.timeout_s}"
            )
        if self.max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if not 0 < self.blocking_window_s <= DEFAULT_BLOCKING_WINDOW_S:
            raise ConfigError(f"blocking_window_s must be in (0, {DEFAULT_BLOCKING_WINDOW_S:g}]")

    @classmethod
    def resolve(
        cls, options: Mapping[str, Any], env: Mapping[str, str] | None = None
    ) -> OpenWhiskConfig:
        """Options over ``__OW_*`` variables over ``.wskprops`` (module docstring)."""
        env = os.environ if env is None else env
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - names)
        if unknown:
            raise ConfigError(
                f"unknown option(s) for the openwhisk backend: {unknown}; known: {sorted(names)}"
            )
        props_path = Path(env.get("WSK_CONFIG_FILE") or Path.home() / ".wskprops")
        props = read_wskprops(props_path)
        values = dict(options)
        for name, variable, prop in (
            ("api_host", "__OW_API_HOST", "APIHOST"),
            ("auth", "__OW_API_KEY", "AUTH"),
            ("namespace", "__OW_NAMESPACE", "NAMESPACE"),
        ):
            if values.get(name) is None:
                found = env.get(variable) or props.get(prop)
                if found:
                    values[name] = found
                else:
                    values.pop(name, None)
        if values.get("image") is None:
            values["image"] = env.get("SMLT_OPENWHISK_IMAGE") or None
        for name in ("max_memory_mb", "max_duration_s", "max_concurrency"):
            variable = f"SMLT_OPENWHISK_{name.upper()}"
            if name not in values and env.get(variable):
                try:
                    values[name] = int(env[variable])
                except ValueError:
                    raise ConfigError(
                        f"{variable}={env[variable]!r} is not a whole number"
                    ) from None
        return cls(**values)

    @property
    def base_url(self) -> str:
        """The API host as a URL (``https://`` when it names none), without a trailing slash."""
        host = (self.api_host or "").strip().rstrip("/")
        return host if "://" in host else f"https://{host}"

    @property
    def credentials(self) -> tuple[str, str]:
        """(uuid, key) for HTTP Basic auth."""
        self.require_connection()
        assert self.auth is not None
        user, _, key = self.auth.partition(":")
        return user, key

    def require_connection(self) -> None:
        """Raise ConfigError unless the API host and the auth key are known."""
        if not self.api_host:
            raise ConfigError(
                "the openwhisk backend needs the API host: set APIHOST in ~/.wskprops, "
                "__OW_API_HOST, or the backend option api_host"
            )
        if not self.auth:
            raise ConfigError(
                "the openwhisk backend needs the namespace's auth key: set AUTH in "
                "~/.wskprops, __OW_API_KEY, or the backend option auth"
            )

    def require_deployable(self) -> None:
        """Raise ConfigError unless an action can be created (connection and image)."""
        self.require_connection()
        if not self.image:
            raise ConfigError(
                "the openwhisk backend needs the worker's Docker image: set "
                "SMLT_OPENWHISK_IMAGE to the image built from docker/Dockerfile.openwhisk "
                "(see docs/deploy-openwhisk.md), or the backend option image"
            )
