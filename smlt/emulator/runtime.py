"""The program inside an emulated container: import the handler once, then run invocations.

Run by the emulator, never imported by it::

    python runtime.py smlt-emulator-container PLATFORM FUNCTION HANDLER IN_FD OUT_FD PARENT_PID

It plays the part of Lambda's runtime interface client or OpenWhisk's action proxy. At start it
says it is up, imports the handler (the *init* phase: the cold start a real platform pays, torch
included) and reports how that went; then it answers one request at a time for as long as the
emulator keeps it warm. Requests and answers travel on two pipes (``IN_FD``, ``OUT_FD``) as
frames: a 4-byte length and a JSON header, then a 4-byte length and the body (the event or the
result, JSON text), so a 6 MB payload is never escaped inside another JSON string. The
handler's own stdout and stderr go to the container's log file, which is what the platforms show
as logs.

It imports only the standard library (the handler imports what it needs) and is run by path, not
with ``-m smlt...``, so that a container's start costs an interpreter and nothing of smlt's. Like
``smlt/storage/redis_launcher.py`` it asks Linux to kill it when the emulator dies (the emulator
starts every container from one long-lived thread, because the death signal follows the thread
that started the child); it then checks that its parent is still the emulator.

Lambda handlers get ``(event, context)`` with the context object of Lambda's Python runtime
(``get_remaining_time_in_millis()``, ``aws_request_id``, ``function_name``, ...;
``memory_limit_in_mb`` is a string there, and here). OpenWhisk handlers get ``main(params)``
with ``__OW_ACTIVATION_ID``, ``__OW_DEADLINE`` (ms since the epoch) and the other ``__OW_*``
variables set in ``os.environ`` for the activation, as the action proxy sets them.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import signal
import struct
import sys
import time
import traceback
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

_LENGTH = struct.Struct(">I")
_PR_SET_PDEATHSIG = 1
MARKER = "smlt-emulator-container"
# The per-activation variables an OpenWhisk container set for its last activation.
_ACTIVATION_ENV: set[str] = set()


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(3)


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _receive(fd: int) -> tuple[dict[str, Any], bytes] | None:
    parts = []
    for _ in range(2):
        raw = _read_exactly(fd, _LENGTH.size)
        if raw is None:
            return None
        part = _read_exactly(fd, _LENGTH.unpack(raw)[0])
        if part is None:
            return None
        parts.append(part)
    return json.loads(parts[0]), parts[1]


def _send(fd: int, header: dict[str, Any], body: bytes = b"") -> None:
    data = json.dumps(header).encode()
    view = memoryview(_LENGTH.pack(len(data)) + data + _LENGTH.pack(len(body)) + body)
    while view:
        view = view[os.write(fd, view) :]


def _max_rss_kb() -> int:
    """The container's peak resident memory (KiB). Its own peak is ``VmHWM``, not
    ``ru_maxrss``: Linux carries ``ru_maxrss`` over ``execve`` from the process that started
    the container, so a container started by a 300 MB pytest would report 300 MB at birth."""
    own = _own_peak_kb()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return int(max(own, children))


def _own_peak_kb() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # not Linux: the best known


def _load(spec: str) -> Callable[..., Any]:
    """The handler function; raises _InitError shaped like Lambda's runtime errors."""
    if ":" in spec:
        module_name, _, name = spec.rpartition(":")
    else:
        module_name, _, name = spec.rpartition(".")
    if not module_name or not name:
        raise _InitError(
            "Runtime.MalformedHandlerName", f"Bad handler '{spec}': expected module.function"
        )
    module_name = module_name.replace("/", ".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise _InitError(
            "Runtime.ImportModuleError", f"Unable to import module '{module_name}': {exc}"
        ) from exc
    except SyntaxError as exc:
        raise _InitError(
            "Runtime.UserCodeSyntaxError", f"Syntax error in module '{module_name}': {exc}"
        ) from exc
    handler = getattr(module, name, None)
    if not callable(handler):
        raise _InitError(
            "Runtime.HandlerNotFound", f"Handler '{name}' missing on module '{module_name}'"
        )
    return handler


class _InitError(Exception):
    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


class LambdaContext:
    """The context object of Lambda's Python runtime, for one invocation."""

    def __init__(self, header: dict[str, Any]) -> None:
        self.aws_request_id: str = header["request_id"]
        self.function_name: str = header["function_name"]
        self.function_version = "$LATEST"
        self.invoked_function_arn: str = header["invoked_function_arn"]
        self.memory_limit_in_mb = str(header["memory_mb"])
        self.log_group_name = f"/aws/lambda/{self.function_name}"
        self.log_stream_name: str = header["log_stream_name"]
        self.identity = None
        client_context = header.get("client_context")
        self.client_context = (
            SimpleNamespace(
                client=client_context.get("client"),
                custom=client_context.get("custom"),
                env=client_context.get("env"),
            )
            if isinstance(client_context, dict)
            else None
        )
        self._deadline_ms: int = header["deadline_ms"]

    def get_remaining_time_in_millis(self) -> int:
        return max(self._deadline_ms - int(time.time() * 1000), 0)


def _run_lambda(
    handler: Callable[..., Any], header: dict[str, Any], body: bytes
) -> tuple[dict[str, Any], bytes]:
    request_id = header["request_id"]
    try:
        event = json.loads(body)
        result = handler(event, LambdaContext(header))
    except Exception as exc:
        stack = traceback.format_list(traceback.extract_tb(exc.__traceback__)[1:])
        print(f"[ERROR] {type(exc).__name__}: {exc}", file=sys.stderr)
        traceback.print_exc()
        error = {
            "errorMessage": str(exc),
            "errorType": type(exc).__name__,
            "requestId": request_id,
            "stackTrace": stack,
        }
        return {"ok": False, "error": error}, b""
    try:
        payload = json.dumps(result).encode()
    except (TypeError, ValueError) as exc:
        error = {
            "errorMessage": f"Unable to marshal response: {exc}",
            "errorType": "Runtime.MarshalError",
            "requestId": request_id,
            "stackTrace": [],
        }
        return {"ok": False, "error": error}, b""
    return {"ok": True}, payload


def _run_openwhisk(
    handler: Callable[..., Any], header: dict[str, Any], body: bytes
) -> tuple[dict[str, Any], bytes]:
    # Variables of the previous activation go (an __OW_API_KEY given to one activation must not
    # outlive it); the container's static ones (__OW_API_HOST, ...) were set at its start.
    env = {**header["env"], "__OW_DEADLINE": str(header["deadline_ms"])}
    for name in _ACTIVATION_ENV - env.keys():
        os.environ.pop(name, None)
    os.environ.update(env)
    _ACTIVATION_ENV.clear()
    _ACTIVATION_ENV.update(env)
    try:
        result = handler(json.loads(body))
    except Exception as exc:
        # The Python action proxy turns an exception into an error result (an application
        # error) and prints the traceback to stderr.
        traceback.print_exc()
        result = {"error": f"An error has occurred: {type(exc).__name__}: {exc}"}
    if not isinstance(result, dict):
        return {"ok": False, "error": "The action did not return a dictionary."}, b""
    try:
        return {"ok": True}, json.dumps(result).encode()
    except (TypeError, ValueError):
        return {"ok": False, "error": "The action did not return a dictionary."}, b""


def main(argv: list[str]) -> int:
    if len(argv) != 7 or argv[0] != MARKER:
        print(
            f"usage: runtime.py {MARKER} PLATFORM FUNCTION HANDLER IN OUT PARENT", file=sys.stderr
        )
        return 2
    platform, _function, spec = argv[1], argv[2], argv[3]
    in_fd, out_fd, parent_pid = int(argv[4]), int(argv[5]), int(argv[6])
    _die_with_parent(parent_pid)
    # Run by path, Python put this file's folder first on sys.path; the container's working
    # directory (the function's code, Lambda's /var/task) takes its place.
    sys.path[0] = os.getcwd()
    # The container is up: from here on, the import is the init phase the platforms time (a
    # platform's own container start is not the function's; here, an interpreter's start on a
    # busy machine would otherwise eat an OpenWhisk action's whole time limit).
    _send(out_fd, {"ready": True})
    started = time.monotonic()
    try:
        handler = _load(spec)
    except _InitError as exc:
        print(f"[ERROR] {exc.error_type}: {exc}", file=sys.stderr)
        init = {"ok": False, "errorType": exc.error_type, "errorMessage": str(exc)}
    except Exception as exc:  # the module raised while being imported
        traceback.print_exc()
        init = {"ok": False, "errorType": type(exc).__name__, "errorMessage": str(exc)}
    else:
        init = {"ok": True}
    sys.stdout.flush()
    sys.stderr.flush()
    init["init_ms"] = (time.monotonic() - started) * 1000
    init["max_rss_kb"] = _max_rss_kb()
    _send(out_fd, init)
    if not init["ok"]:
        return 1
    run = _run_lambda if platform == "lambda" else _run_openwhisk
    while True:
        request = _receive(in_fd)
        if request is None:  # the emulator closed the pipe: the container is being stopped
            return 0
        answer, payload = run(handler, *request)
        sys.stdout.flush()
        sys.stderr.flush()
        answer["max_rss_kb"] = _max_rss_kb()
        _send(out_fd, answer, payload)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
