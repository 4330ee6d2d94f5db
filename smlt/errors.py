"""Every error smlt raises, in one tree.

Vendor errors (redis-py, boto3, HTTP, Ray) are translated at the boundary where they occur, so a
caller only ever has to know this module. Each message names what is wrong and where: the key,
the rank, the file, the method.

::

    SmltError
    ├── ConfigError                  bad input from the user: options, goals, URLs
    │   ├── TaskError                a task file that fails to import or breaks the Task contract
    │   └── InfeasibleGoalError      no configuration meets the deadline or budget
    ├── StoreError                   the parameter store (Redis)
    │   ├── StoreUnavailableError    cannot connect, authenticate, or the connection was lost
    │   ├── RedisServerError         the embedded redis-server did not start or died
    │   ├── ShardTimeoutError        a shard did not arrive within its bound (names shard and rank)
    │   ├── StoreFullError           Redis refused a write: maxmemory reached (noeviction)
    │   ├── CodecError               a corrupt, truncated or mismatched frame (names the key)
    │   └── StaleVersionError        a worker's start version is gone: a late duplicate or retry
    ├── ObjectStoreError             the object store (local folder or S3)
    │   └── ObjectNotFoundError      a key that should exist does not
    ├── BackendError                 a serverless platform or Ray
    │   ├── BackendAuthError         credentials refused
    │   ├── ThrottledError           the platform refused for rate or concurrency
    │   ├── FunctionTimeoutError     the function hit its time limit
    │   ├── OutOfMemoryError         the function exceeded its memory
    │   ├── WorkerError              the worker's handler raised (carries the remote traceback)
    │   └── CapacityError            the cluster cannot hold the requested workers x memory
    ├── CallbackError                a callback given to train() raised: the run was stopped
    └── TrainingError                a run that cannot continue (repeated failure, diverged loss)

    SmltWarning (a UserWarning)      a run that works but wastes: idle workers, a cut batch
"""

from __future__ import annotations

__all__ = [
    "BackendAuthError",
    "BackendError",
    "CallbackError",
    "CapacityError",
    "CodecError",
    "ConfigError",
    "FunctionTimeoutError",
    "InfeasibleGoalError",
    "ObjectNotFoundError",
    "ObjectStoreError",
    "OutOfMemoryError",
    "RedisServerError",
    "ShardTimeoutError",
    "SmltError",
    "SmltWarning",
    "StaleVersionError",
    "StoreError",
    "StoreFullError",
    "StoreUnavailableError",
    "TaskError",
    "ThrottledError",
    "TrainingError",
    "WorkerError",
]


class SmltError(Exception):
    """Base of every error smlt raises on purpose."""


class ConfigError(SmltError, ValueError):
    """The user's input is wrong: an option, a goal, a URL. Fix the input and run again."""


class TaskError(ConfigError):
    """A task file failed to import, or a Task method is missing or returned the wrong thing."""


class InfeasibleGoalError(ConfigError):
    """No configuration in the search space meets the deadline or budget."""


class StoreError(SmltError):
    """The parameter store (Redis) failed."""


class StoreUnavailableError(StoreError):
    """Redis cannot be reached or refused our credentials."""


class RedisServerError(StoreError):
    """The embedded redis-server could not be started, or died."""


class ShardTimeoutError(StoreError, TimeoutError):
    """A shard expected from a peer did not arrive within its bound.

    ``missing`` lists the ranks whose contribution never came, so the scheduler can re-invoke
    exactly those workers.
    """

    def __init__(self, message: str, *, missing: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.missing = missing


class StoreFullError(StoreError):
    """Redis refused a write because it reached ``maxmemory``.

    smlt runs Redis with ``noeviction`` (an LRU policy would silently drop a shard mid-iteration),
    so a full store refuses writes instead. The message says what to do: give Redis more memory,
    spread the shards over more instances, or keep fewer versions in flight.
    """


class CodecError(StoreError):
    """A frame read from the store is corrupt, truncated, or belongs to another key."""


class StaleVersionError(StoreError):
    """The version an invocation starts from is no longer in the store.

    Versions are deleted two steps after their successors exist, so only an invocation that
    arrives long after its peers moved on meets this: a duplicate delivered late by an
    at-least-once platform, or a retry the store has outlived. It fails at once instead of
    waiting the shard timeout for announcements that were deleted with the version.
    """


class ObjectStoreError(SmltError):
    """The object store (local folder or S3) failed."""


class ObjectNotFoundError(ObjectStoreError, KeyError):
    """An object that should exist is not in the object store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class BackendError(SmltError):
    """A serverless platform or Ray refused or failed an invocation."""


class BackendAuthError(BackendError):
    """The platform refused our credentials."""


class ThrottledError(BackendError):
    """The platform refused the invocation for rate or concurrency; retry later.

    ``retry_after_s`` is the wait the platform asked for, when it said (Lambda's
    ``retryAfterSeconds``, an HTTP ``Retry-After``); backends wait at least that long."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class FunctionTimeoutError(BackendError, TimeoutError):
    """The function ran into its time limit."""


class OutOfMemoryError(BackendError, MemoryError):
    """The function exceeded its memory limit."""


class WorkerError(BackendError):
    """The worker's handler raised. ``remote_traceback`` holds the worker's own traceback."""

    def __init__(self, message: str, *, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.remote_traceback = remote_traceback


class CapacityError(BackendError):
    """The cluster cannot hold the requested workers x memory at once."""


class CallbackError(SmltError):
    """A callback given to ``train()`` or ``resume()`` raised; the run was stopped as Ctrl-C
    stops it. ``callback`` is the callback, and the exception it raised is the ``__cause__``."""

    def __init__(self, message: str, *, callback: object = None) -> None:
        super().__init__(message)
        self.callback = callback


class TrainingError(SmltError):
    """The run cannot continue: a failure that repeats, or a loss that is not finite."""


class SmltWarning(UserWarning):
    """A configuration that runs but not as asked, or wastes money: the batch was cut to the
    data set, workers that get no sample are billed. Also recorded in ``result.json``."""
