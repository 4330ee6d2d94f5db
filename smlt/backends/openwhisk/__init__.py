"""The Apache OpenWhisk backend (REST over httpx): :class:`OpenWhiskBackend`, its
:class:`OpenWhiskConfig`, and the translation of OpenWhisk's answers
(:mod:`smlt.backends.openwhisk.errors`)."""

from __future__ import annotations

from smlt.backends.openwhisk.backend import OpenWhiskBackend, OpenWhiskInvocation
from smlt.backends.openwhisk.config import OpenWhiskConfig

__all__ = ["OpenWhiskBackend", "OpenWhiskConfig", "OpenWhiskInvocation"]
