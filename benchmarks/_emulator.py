"""``smlt emulator`` in a process of its own, for the benchmarks that need a platform.

The emulator writes the credentials it accepts to a file only its owner can read
(:meth:`~smlt.emulator.Emulator.write_env_file`); :func:`running_emulator` reads them from there
and hands them to the caller, never to a command line.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = ["REPO", "SECRETS", "read_env_file", "redacted", "running_emulator"]

REPO = Path(__file__).resolve().parent.parent
#: The variables of the emulator's environment file that are secrets.
SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "__OW_API_KEY")
_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 30.0


@contextmanager
def running_emulator(
    folder: Path, args: Sequence[str] = (), env: Mapping[str, str] | None = None
) -> Iterator[dict[str, str]]:
    """``python -m smlt emulator --port 0 ARGS`` with ``env`` added to this process's
    environment (the containers inherit it); yields the client environment from its file. Its
    log is ``folder/emulator.log``."""
    env_file = folder / "emulator.env"
    argv = [sys.executable, "-m", "smlt", "emulator", "--port", "0", "--env-file", str(env_file)]
    with open(folder / "emulator.log", "wb") as log:
        process = subprocess.Popen(
            [*argv, *args],
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not (env_file.exists() and env_file.read_text().strip()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"smlt emulator did not start within {_START_TIMEOUT_S:g} s: "
                    + (folder / "emulator.log").read_text()[-2000:]
                )
            time.sleep(0.05)
        yield read_env_file(env_file)
    finally:
        process.terminate()
        try:
            process.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(_STOP_TIMEOUT_S)


def read_env_file(path: Path) -> dict[str, str]:
    """The ``export NAME=value`` lines :meth:`Emulator.write_env_file` writes."""
    found = {}
    for line in path.read_text().splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        found[name] = shlex.split(value)[0]
    return found


def redacted(text: str, emulator: Mapping[str, str]) -> str:
    """``text`` with every secret of the emulator's environment replaced by ``***``."""
    for name in SECRETS:
        if emulator.get(name):
            text = text.replace(emulator[name], "***")
    return text
