"""The request and response the two APIs see: plain values, no sockets.

The HTTP server turns each request into a :class:`Request` and writes back the :class:`Response`
an API returns, so the APIs are plain functions of their input (the httpx lesson: describe
behaviour, not transport) and the server is the only place that knows about connections.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

__all__ = ["Request", "Response", "new_id", "path_segment"]


@dataclass(frozen=True)
class Request:
    """One HTTP request. ``headers`` has lower-case names; ``path`` is still percent-encoded
    (a Lambda ARN in a path arrives as ``arn%3Aaws%3A...``), so routes split it before
    decoding a segment with :func:`path_segment`."""

    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def query_value(self, name: str) -> str | None:
        """The first value of a query parameter, or None."""
        values = self.query.get(name)
        return values[0] if values else None


@dataclass
class Response:
    """What an API answers; the server adds ``Content-Length``."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, value: Any, headers: Mapping[str, str] | None = None) -> Response:
        body = json.dumps(value, separators=(",", ":")).encode()
        return cls(status, body, {"Content-Type": "application/json", **(headers or {})})


def path_segment(raw: str) -> str:
    """A path segment as the client meant it (``%3A`` back to ``:``)."""
    return unquote(raw)


def new_id() -> str:
    """32 hex digits: OpenWhisk's activation and transaction ids have this form."""
    return secrets.token_hex(16)
