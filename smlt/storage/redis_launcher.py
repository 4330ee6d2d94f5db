"""Start redis-server so that it dies with the process that asked for it.

Run in the child, never imported by the parent::

    python -I -S path/to/redis_launcher.py PARENT_PID REDIS_SERVER CONFIG_FILE

It asks Linux to SIGKILL it when its parent dies (``prctl(PR_SET_PDEATHSIG)``), then ``execv``-s
redis-server. The death signal survives ``execve``, and ``execv`` keeps the process id, so
:attr:`RedisServer.pid <smlt.storage.redis_server.RedisServer.pid>` is the server's pid. A driver
killed with SIGKILL runs no cleanup; this is what keeps its Redis from outliving it. Elsewhere
(macOS) it only execs: there ``RedisServer.stop()`` and the context manager are the guard.

Why a separate program and not ``Popen(preexec_fn=...)``: ``preexec_fn`` runs Python between
``fork`` and ``exec`` in a copy of a process that may run other threads (the driver runs Ray and
trio threads), and a lock one of them held at the fork stays locked forever in the child. Here
the child is a fresh interpreter that runs nothing but these few lines.

Why the parent passes its pid: if the parent dies between ``fork`` and the ``prctl`` below, the
signal was never armed. The child checks afterwards that its parent is still the one that started
it, and exits without starting Redis if not.

Why the parent runs this file by path with ``-I -S`` rather than ``-m smlt.storage...``: ``-m``
imports the ``smlt`` package first, which imports torch (one to two seconds per server start).
This file imports only the standard library, so the interpreter starts in about 20 ms. The
password is not an argument: it is in the configuration file, in a folder only the user can read.

Caveat: Linux sends the signal when the *thread* that started the child exits, not the process.
Start a ``RedisServer`` on a thread that lives as long as the server should (the main thread, or
the thread that holds the ``with RedisServer()`` block).
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["EXIT_CANNOT_EXEC", "EXIT_PARENT_GONE", "die_with_parent", "main"]

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
#: Exit code when the parent was gone before the death signal was armed (no Redis started).
EXIT_PARENT_GONE = 3
#: Exit code for a bad command line or an exec that failed (like a shell's 127).
EXIT_CANNOT_EXEC = 127


def die_with_parent() -> None:
    """On Linux, have the kernel SIGKILL this process when its parent (thread) dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(errno)}")


def main(argv: list[str]) -> int:
    """Arm the death signal, check the parent, exec redis-server; returns only on failure."""
    if len(argv) != 3 or not argv[0].isdigit():
        print("usage: redis_launcher.py PARENT_PID REDIS_SERVER CONFIG_FILE", file=sys.stderr)
        return EXIT_CANNOT_EXEC
    parent_pid, binary, config = int(argv[0]), argv[1], argv[2]
    die_with_parent()
    if os.getppid() != parent_pid:
        print(f"parent {parent_pid} is gone; not starting redis-server", file=sys.stderr)
        return EXIT_PARENT_GONE
    try:
        os.execv(binary, [binary, config])
    except OSError as exc:
        print(f"cannot run {binary}: {exc}", file=sys.stderr)
    return EXIT_CANNOT_EXEC


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
