from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from smlt.errors import ConfigError, StoreUnavailableError
from smlt.storage.redis_server import RedisServer, connect, redact_url


def test_server_is_private_and_configured_for_shards(redis_server: RedisServer) -> None:
    client = connect(redis_server.url)
    cfg = client.config_get("*")
    assert cfg["bind"] == "127.0.0.1"
    assert cfg["maxmemory-policy"] == "noeviction"
    assert cfg["save"] == ""
    assert cfg["appendonly"] == "no"
    assert cfg["lazyfree-lazy-expire"] == "yes"
    # No password, no access.
    anonymous = redis.Redis(host="127.0.0.1", port=redis_server.port)
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()


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
