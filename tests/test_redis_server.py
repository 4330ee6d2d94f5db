"""The embedded redis-server: private, hardened, bounded, and gone when its parent is."""

from __future__ import annotations

import ast
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from smlt.errors import ConfigError, StoreUnavailableError
from smlt.storage import redis_launcher
from smlt.storage.redis_server import (
    DEFAULT_MAXMEMORY_FRACTION,
    RedisServer,
    connect,
    default_maxmemory_mb,
    find_redis_server,
    redact_url,
)

SMLT = Path(__file__).resolve().parent.parent / "smlt"


def _info(server: RedisServer, section: str) -> dict[str, Any]:
    return cast(dict[str, Any], connect(server.url).info(section))


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the sockets listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if int(hex_port, 16) == port and state == "0A":  # 0A = LISTEN
                found.add(address)
    return found


def test_server_is_private_and_configured_for_shards(redis_server: RedisServer) -> None:
    # CONFIG GET is gone (see below), so check what INFO reports, the sockets the kernel lists,
    # and the very file the server says it loaded.
    memory = _info(redis_server, "memory")
    assert memory["maxmemory_policy"] == "noeviction"
    assert memory["maxmemory"] > 0
    assert _info(redis_server, "persistence")["aof_enabled"] == 0
    assert _listening_addresses(redis_server.port) == {"0100007F"}  # 127.0.0.1 only
    config = Path(_info(redis_server, "server")["config_file"]).read_text().splitlines()
    for line in (
        'save ""',
        "appendonly no",
        "lazyfree-lazy-expire yes",
        "lazyfree-lazy-user-del yes",
    ):
        assert line in config
    # No password, no access.
    anonymous = redis.Redis(host="127.0.0.1", port=redis_server.port)
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()


@pytest.mark.parametrize(
    "command",
    [
        ("CONFIG", "GET", "dir"),
        ("CONFIG", "SET", "dir", "/tmp"),
        ("DEBUG", "SLEEP", "0"),
        ("MODULE", "LIST"),
        ("MODULE", "LOAD", "/nonexistent.so"),
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_admin_commands_are_refused(redis_server: RedisServer, command: tuple[str, ...]) -> None:
    with pytest.raises(redis.ResponseError, match="unknown command"):
        connect(redis_server.url).execute_command(*command)


def test_data_commands_still_work(redis_server: RedisServer) -> None:
    client = connect(redis_server.url)
    client.set("smlt:test:hardened:v", b"x" * 100, ex=60)
    assert client.get("smlt:test:hardened:v") == b"x" * 100
    entry = client.xadd("smlt:test:hardened:s", {b"r": 3})
    assert client.xread({"smlt:test:hardened:s": "0-0"}, block=10) == [
        [b"smlt:test:hardened:s", [(entry, {b"r": b"3"})]]
    ]
    assert client.eval("return redis.call('STRLEN', KEYS[1])", 1, "smlt:test:hardened:v") == 100
    assert client.unlink("smlt:test:hardened:v", "smlt:test:hardened:s") == 2


def test_config_folder_is_private_and_removed_on_stop() -> None:
    server = RedisServer().start()
    try:
        config = Path(_info(server, "server")["config_file"])
        assert stat.S_IMODE(config.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        assert server.password in config.read_text()  # where the password lives: nowhere else
    finally:
        server.stop()
    assert not config.parent.exists()


def test_password_is_on_no_command_line(tmp_path: Path) -> None:
    """/proc/<pid>/cmdline is readable by every user of the machine.

    redis-server overwrites its own command line once it runs, so looking at /proc afterwards
    would miss a password passed as an argument: a wrapper records the arguments and the
    environment redis-server is started with, before it execs the real one.
    """
    record = tmp_path / "argv"
    wrapper = tmp_path / "redis-server"
    wrapper.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\nenv >> {record}\n'
        f'exec {find_redis_server()} "$@"\n'
    )
    wrapper.chmod(0o700)
    with RedisServer(binary=str(wrapper)) as server:
        password = server.password.encode()
        assert connect(server.url).ping()
        assert record.read_bytes().count(b"\n") > 2  # the wrapper did run
        assert password not in record.read_bytes()
        seen_redis = False
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue  # exited meanwhile
            assert password not in cmdline, f"pid {proc.name}: {cmdline[:200]!r}"
            seen_redis = seen_redis or int(proc.name) == server.pid
        assert seen_redis


def test_pid_is_the_redis_server_itself(redis_server: RedisServer) -> None:
    """The launcher execs redis-server in place, so ``pid`` is the server, not a wrapper."""
    assert Path(f"/proc/{redis_server.pid}/comm").read_text().strip() == "redis-server"


def test_launcher_execs_only_while_its_parent_lives(tmp_path: Path) -> None:
    """If the parent died before the death signal was armed, nothing must start."""
    marker = tmp_path / "ran"
    script = tmp_path / "script.sh"
    script.write_text(f"touch {marker}\n")
    launcher = Path(redis_launcher.__file__)
    # /bin/sh stands in for redis-server; it runs the "config file" as a script.
    ok = subprocess.run(
        [sys.executable, "-I", "-S", launcher, str(os.getpid()), "/bin/sh", script], timeout=30
    )
    assert ok.returncode == 0 and marker.exists()
    marker.unlink()
    not_parent = os.getppid()  # alive, but not the launcher's parent
    gone = subprocess.run(
        [sys.executable, "-I", "-S", launcher, str(not_parent), "/bin/sh", script], timeout=30
    )
    assert gone.returncode == redis_launcher.EXIT_PARENT_GONE
    assert not marker.exists()


def test_no_subprocess_in_smlt_uses_preexec_fn() -> None:
    """preexec_fn runs Python between fork and exec; with other threads running (Ray, trio)
    the child can deadlock on a lock copied in its held state. The launcher replaces it."""
    offenders = []
    for path in SMLT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.keyword) and node.arg == "preexec_fn":
                offenders.append(f"{path.relative_to(SMLT.parent)}:{node.value.lineno}")
    assert offenders == []


MiB = 2**20


def test_maxmemory_is_bounded_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SMLT_REDIS_MAXMEMORY_MB", raising=False)
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    expected_mb = default_maxmemory_mb()
    assert 0 < expected_mb * MiB <= physical * DEFAULT_MAXMEMORY_FRACTION
    with RedisServer() as server:
        assert _info(server, "memory")["maxmemory"] == expected_mb * MiB


def test_maxmemory_from_environment_and_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMLT_REDIS_MAXMEMORY_MB", "48")
    with RedisServer() as server:
        assert _info(server, "memory")["maxmemory"] == 48 * MiB
    with RedisServer(maxmemory_mb=32) as server:  # the argument wins over the environment
        assert _info(server, "memory")["maxmemory"] == 32 * MiB
    with RedisServer(maxmemory_mb=0) as server:  # explicitly unbounded
        assert _info(server, "memory")["maxmemory"] == 0


@pytest.mark.parametrize("value", ["lots", "-1", "1.5"])
def test_bad_maxmemory_is_a_config_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("SMLT_REDIS_MAXMEMORY_MB", value)
    with pytest.raises(ConfigError, match="SMLT_REDIS_MAXMEMORY_MB"):
        RedisServer()
    monkeypatch.delenv("SMLT_REDIS_MAXMEMORY_MB")
    with pytest.raises(ConfigError, match="maxmemory_mb"):
        RedisServer(maxmemory_mb=-1)


def test_url_works_from_another_process(redis_server: RedisServer) -> None:
    code = (
        "import sys; from smlt.storage.redis_server import connect; "
        "c = connect(sys.argv[1]); c.set('smlt:test:cross-process', b'yes')"
    )
    subprocess.run([sys.executable, "-c", code, redis_server.url], check=True, timeout=30)
    assert connect(redis_server.url).get("smlt:test:cross-process") == b"yes"


def test_password_never_appears_in_repr_or_safe_url(redis_server: RedisServer) -> None:
    assert redis_server.password not in repr(redis_server)
    assert redis_server.password not in redis_server.safe_url
    assert redis_server.password in redis_server.url


def test_stop_ends_the_process_and_is_idempotent() -> None:
    server = RedisServer().start()
    url = server.url
    assert server.is_alive()
    server.stop()
    server.stop()
    assert not server.is_alive()
    with pytest.raises(StoreUnavailableError):
        connect(url, timeout_s=1)


def test_unreachable_url_fails_fast_with_redacted_message() -> None:
    started = time.monotonic()
    # Port 1 on loopback: nothing listens, the connection is refused at once.
    with pytest.raises(StoreUnavailableError) as info:
        connect("redis://:hunter2@127.0.0.1:1/0", timeout_s=2)
    assert time.monotonic() - started < 5
    assert "hunter2" not in str(info.value)
    assert "127.0.0.1:1" in str(info.value)


def test_wrong_password_is_named(redis_server: RedisServer) -> None:
    with pytest.raises(StoreUnavailableError, match="refused the password"):
        connect(f"redis://:wrong@127.0.0.1:{redis_server.port}/0")


def test_not_a_redis_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not a Redis URL"):
        connect("http://127.0.0.1:6379")


def test_redact_url() -> None:
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("rediss://user:pw@h:1/0") == "rediss://user:***@h:1/0"
    # A password in the query (redis-py reads it there too) and IPv6 brackets.
    assert redact_url("redis://[::1]:1/0?password=pw&db=2") == "redis://[::1]:1/0?password=***&db=2"
    assert redact_url("redis://:pw@[::1]:1/0") == "redis://:***@[::1]:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


def test_server_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """A driver killed with SIGKILL runs no cleanup; its Redis must not outlive it."""
    code = (
        "import sys, time; from smlt.storage.redis_server import RedisServer; "
        "s = RedisServer().start(); print(s.pid, flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    redis_pid = int(parent.stdout.readline())
    parent.kill()
    parent.communicate(timeout=10)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{redis_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    state = (
        Path(f"/proc/{redis_pid}/stat").read_text().split()[2]
        if Path(f"/proc/{redis_pid}/stat").exists()
        else "gone"
    )
    assert state in ("gone", "Z"), f"redis-server {redis_pid} outlived its parent ({state})"
