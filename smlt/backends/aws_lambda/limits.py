"""AWS Lambda's limits, in one place (platform-facts.md, from the AWS Lambda docs and quotas).

Recheck a number here before relying on it: AWS changes quotas, and an account may have
raised or lowered ones (concurrency above all).
"""

from __future__ import annotations

__all__ = [
    "ASYNC_PAYLOAD_BYTES",
    "DEFAULT_CONCURRENCY",
    "MAX_MEMORY_MB",
    "MAX_TIMEOUT_S",
    "MIN_MEMORY_MB",
    "SYNC_PAYLOAD_BYTES",
    "ZIP_UNZIPPED_BYTES",
    "ZIP_UPLOAD_BYTES",
]

#: Memory 128-10,240 MB in 1 MB steps ("Configuring function memory").
MIN_MEMORY_MB = 128
MAX_MEMORY_MB = 10240
#: A function runs at most 900 s (Lambda quotas).
MAX_TIMEOUT_S = 900
#: Concurrent executions per region by default; accounts can have it raised (or start lower).
DEFAULT_CONCURRENCY = 1000
#: Invocation payload: 6 MB synchronous (request and response), 1 MB asynchronous.
SYNC_PAYLOAD_BYTES = 6 * 2**20
ASYNC_PAYLOAD_BYTES = 1 * 2**20
#: A zip package: 50 MB zipped for a direct upload, 250 MB unzipped (layers included). PyTorch
#: alone unpacks to far more than 250 MB, so a worker that trains needs the container image.
ZIP_UPLOAD_BYTES = 50 * 2**20
ZIP_UNZIPPED_BYTES = 250 * 2**20
