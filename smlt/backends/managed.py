"""What marks a platform resource as smlt's, so that cleaning removes those and only those.

Every function (Lambda) or action (OpenWhisk) smlt creates carries two labels, as tags or
annotations: :data:`MANAGED_KEY` = ``"true"`` and :data:`JOB_KEY` = the job id. Names are not
trusted (a user may well call a function ``smlt-something``); only the label is. A backend's
``clean()`` removes what it deployed for its job; ``remove_managed()`` removes every labelled
resource of the account or namespace, which is what ``smlt clean --backend NAME`` does.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

__all__ = ["JOB_KEY", "MANAGED_KEY", "MANAGED_VALUE", "ManagedResource", "resource_name"]

MANAGED_KEY = "smlt:managed"
MANAGED_VALUE = "true"
JOB_KEY = "smlt:job"

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class ManagedResource:
    """One labelled function or action, as ``remove_managed`` found (and removed) it."""

    name: str
    job_id: str
    #: When it was last created or updated (a running job updates it every generation).
    modified_unix_s: float


def resource_name(prefix: str, job_id: str, suffix: str = "", *, max_length: int = 64) -> str:
    """``prefix + job_id + suffix`` in the characters both platforms accept in a name (letters,
    digits, ``-`` and ``_``), shortened with a hash of the job id if it would be too long, so
    that two jobs never share a name."""
    base = _UNSAFE.sub("-", job_id).strip("-") or "job"
    name = f"{prefix}{base}{suffix}"
    if len(name) <= max_length:
        return name
    digest = hashlib.sha256(job_id.encode()).hexdigest()[:10]
    keep = max(1, max_length - len(prefix) - len(suffix) - len(digest) - 1)
    return f"{prefix}{base[:keep]}-{digest}{suffix}"
