"""``smlt emulator`` in a process of its own, for the backend contract tests.

The platform is another process, as a cloud would be: the test process (PyTorch and Ray loaded,
hundreds of MB) is not the parent of the emulator's containers, so nothing of its size is ever
charged to a container's memory. Run as ``python -m tests.contract_emulator CONFIG_JSON
ENV_FILE``: it starts :class:`~smlt.emulator.Emulator` with the JSON's options, writes the
client environment to ENV_FILE (mode 0600, :meth:`Emulator.write_env_file`), and serves until
its standard input closes or it gets SIGTERM.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

from smlt.emulator import Emulator


def main() -> None:
    options = json.loads(sys.argv[1])
    env_file = Path(sys.argv[2])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def stdin_closed() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=stdin_closed, daemon=True).start()
    with Emulator(**options) as emulator:
        emulator.write_env_file(env_file)
        stop.wait()


if __name__ == "__main__":
    main()
