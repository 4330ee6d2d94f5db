"""Backends by name: ``get_backend("ray", address=...)``.

The registry holds import paths, not classes, so choosing a backend imports only that backend's
SDK (Ray takes a second to import; boto3 is not installed everywhere). Every backend takes its
options as keyword arguments and validates them at construction; the serverless ones also read
their platform's own configuration (boto3's for ``aws_lambda``, ``~/.wskprops`` and ``__OW_*``
for ``openwhisk``), so they need no options to be chosen from the command line.
"""

from __future__ import annotations

import importlib
from typing import Any

from smlt.backends.base import Backend
from smlt.errors import ConfigError

__all__ = ["BACKENDS", "PLANNED_BACKENDS", "backend_class", "get_backend"]

#: Backend name -> "module:Class".
BACKENDS: dict[str, str] = {
    "ray": "smlt.backends.ray_backend:RayBackend",
    "aws_lambda": "smlt.backends.aws_lambda:LambdaBackend",
    "openwhisk": "smlt.backends.openwhisk:OpenWhiskBackend",
    "sim": "smlt.backends.sim:SimBackend",
}
#: Names that are part of the design but not built yet: asking for one says so.
PLANNED_BACKENDS: tuple[str, ...] = ()


def backend_class(name: str) -> type[Backend]:
    """The class of backend ``name`` (importing only its module); ``ConfigError`` for an
    unknown name."""
    target = BACKENDS.get(name)
    known = ", ".join(sorted(BACKENDS))
    if target is None:
        if name in PLANNED_BACKENDS:
            raise ConfigError(f"backend {name!r} is not available yet; available: {known}")
        raise ConfigError(
            f"unknown backend {name!r}; known backends: {known} "
            f"(planned: {', '.join(PLANNED_BACKENDS)})"
        )
    module_name, _, class_name = target.partition(":")
    cls: type[Backend] = getattr(importlib.import_module(module_name), class_name)
    return cls


def get_backend(name: str, **options: Any) -> Backend:
    """A new backend ``name`` built with ``options``; ``ConfigError`` for an unknown name or a
    bad option."""
    cls = backend_class(name)
    try:
        backend: Backend = cls(**options)
    except TypeError as exc:  # an option the backend does not take
        raise ConfigError(f"bad option for backend {name!r}: {exc}") from exc
    return backend
