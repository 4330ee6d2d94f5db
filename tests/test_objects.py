"""The object store, local and S3 (moto over real HTTP), through one set of behaviours."""

from __future__ import annotations

import os
import pickle
import threading
from pathlib import Path

import pytest

from smlt.errors import ConfigError, ObjectNotFoundError, ObjectStoreError
from smlt.storage.objects import (
    LocalObjectStore,
    ObjectStore,
    S3ObjectStore,
    default_local_root,
    open_object_store,
)

pytest_plugins = ["tests.s3_server"]


def test_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 1000
    store.put_bytes("jobs/j1/a.bin", payload)
    assert store.get_bytes("jobs/j1/a.bin") == payload
    assert store.exists("jobs/j1/a.bin")
    assert not store.exists("jobs/j1/b.bin")
    dest = tmp_path / "down" / "nested" / "a.bin"
    store.get_file("jobs/j1/a.bin", dest)
    assert dest.read_bytes() == payload
    assert [p.name for p in dest.parent.iterdir()] == ["a.bin"]  # no temporary leftovers


def test_put_file_and_overwrite(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"first")
    store.put_file("x/y", src)
    assert store.get_bytes("x/y") == b"first"
    store.put_bytes("x/y", b"second")
    assert store.get_bytes("x/y") == b"second"


def test_empty_object(store: ObjectStore) -> None:
    store.put_bytes("empty", b"")
    assert store.exists("empty")
    assert store.get_bytes("empty") == b""


def test_missing_key_is_object_not_found(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFoundError, match="jobs/none/manifest.json") as info:
        store.get_bytes("jobs/none/manifest.json")
    assert isinstance(info.value, KeyError) and isinstance(info.value, ObjectStoreError)
    dest = tmp_path / "never.bin"
    with pytest.raises(ObjectNotFoundError, match="missing.bin"):
        store.get_file("missing.bin", dest)
    assert not dest.exists()


def test_list_and_delete_prefix(store: ObjectStore) -> None:
    for key in ["jobs/a/1", "jobs/a/2", "jobs/ab/1", "jobs/b/1", "other"]:
        store.put_bytes(key, key.encode())
    assert store.list("jobs/a/") == ["jobs/a/1", "jobs/a/2"]
    assert store.list("jobs/a") == ["jobs/a/1", "jobs/a/2", "jobs/ab/1"]
    assert store.list("") == ["jobs/a/1", "jobs/a/2", "jobs/ab/1", "jobs/b/1", "other"]
    assert store.list("nothing/") == []
    assert store.delete_prefix("jobs/a/") == 2
    assert store.list("") == ["jobs/ab/1", "jobs/b/1", "other"]
    assert store.delete_prefix("jobs/a/") == 0
    with pytest.raises(ConfigError, match="empty prefix"):
        store.delete_prefix("")


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "../escape", "a/./b", "a/.hidden", "a\\b"])
def test_invalid_keys_are_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(ConfigError, match="invalid object key"):
        store.put_bytes(key, b"x")


def test_url_round_trips(store: ObjectStore) -> None:
    store.put_bytes("k", b"v")
    again = open_object_store(store.url)
    assert type(again) is type(store)
    assert again.url == store.url
    assert again.get_bytes("k") == b"v"


def test_store_survives_pickling(store: ObjectStore) -> None:
    """Ray ships stores to workers by pickling; the S3 client must reconnect there."""
    store.put_bytes("p", b"pickled")
    if isinstance(store, S3ObjectStore):
        _ = store.client  # create the client so the test proves it is not pickled
    again = pickle.loads(pickle.dumps(store))
    assert again.get_bytes("p") == b"pickled"


def test_local_reader_never_sees_a_partial_object(tmp_path: Path) -> None:
    """Writers replace a large object while a reader polls: every read is one whole version."""
    store = LocalObjectStore(tmp_path)
    size_bytes = 4 * 2**20
    versions = [bytes([v]) * size_bytes for v in range(4)]
    store.put_bytes("big", versions[0])
    stop = threading.Event()
    seen: list[bytes] = []

    def writer() -> None:
        for i in range(40):
            store.put_bytes("big", versions[i % len(versions)])
        stop.set()

    thread = threading.Thread(target=writer)
    thread.start()
    while not stop.is_set():
        seen.append(store.get_bytes("big"))
    thread.join()
    assert seen, "the reader never ran"
    assert all(data in versions for data in seen)
    assert store.list("") == ["big"]  # no temporary files visible or left behind
    assert sorted(os.listdir(tmp_path)) == ["big"]


def test_local_failed_write_leaves_no_object(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    with pytest.raises(ObjectStoreError, match="cannot write object 'nope'"):
        store.put_file("nope", tmp_path / "does-not-exist.bin")
    assert not store.exists("nope")
    assert os.listdir(tmp_path) == []


def test_open_object_store_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = open_object_store(tmp_path / "p")
    assert isinstance(local, LocalObjectStore) and local.root == tmp_path / "p"
    assert open_object_store(str(tmp_path / "q")).url == (tmp_path / "q").as_uri()
    assert isinstance(open_object_store(f"file://{tmp_path}/r"), LocalObjectStore)
    s3 = open_object_store("s3://my-bucket/a/b/")
    assert isinstance(s3, S3ObjectStore)
    assert (s3.bucket, s3.prefix, s3.url) == ("my-bucket", "a/b", "s3://my-bucket/a/b")
    assert open_object_store("s3://my-bucket").url == "s3://my-bucket"

    monkeypatch.setenv("SMLT_OBJECT_STORE", str(tmp_path / "from-env"))
    assert open_object_store(None).url == (tmp_path / "from-env").as_uri()
    monkeypatch.delenv("SMLT_OBJECT_STORE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_local_root() == tmp_path / "cache" / "smlt" / "objects"
    assert open_object_store(None).url == (tmp_path / "cache" / "smlt" / "objects").as_uri()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("gs://bucket/x", "unsupported scheme 'gs'"),
        ("", "empty"),
        ("s3://ab", "invalid S3 bucket name 'ab'"),
        ("s3://Upper/x", "invalid S3 bucket name"),
        ("s3://key:secret@bucket/x", "without credentials"),
        ("file://remote-host/x", "must be local"),
    ],
)
def test_open_object_store_rejects(url: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as info:
        open_object_store(url)
    assert "secret" not in str(info.value)


def test_s3_endpoint_comes_from_the_environment(s3_bucket: str, s3_endpoint: str) -> None:
    store = open_object_store(f"s3://{s3_bucket}")
    assert store.client.meta.endpoint_url == s3_endpoint  # type: ignore[attr-defined]


def test_s3_missing_bucket_is_a_typed_error(s3_endpoint: str) -> None:
    store = open_object_store("s3://smlt-no-such-bucket-here/x")
    with pytest.raises(ObjectStoreError, match="bucket 'smlt-no-such-bucket-here' does not exist"):
        store.put_bytes("k", b"v")


def test_s3_bad_credentials_never_appear_in_messages(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """moto accepts any key, so simulate refusal with a client whose call fails like S3 does."""
    from botocore.exceptions import ClientError

    class RefusingClient:
        def get_object(self, **kwargs: object) -> None:
            raise ClientError(
                {
                    "Error": {"Code": "InvalidAccessKeyId", "Message": "key AKIASECRET123 bad"},
                    "ResponseMetadata": {"HTTPStatusCode": 403},
                },
                "GetObject",
            )

    store = S3ObjectStore(s3_bucket, client=RefusingClient())
    with pytest.raises(ObjectStoreError, match="access denied") as info:
        store.get_bytes("k")
    assert "AKIASECRET123" not in str(info.value)
    assert f"s3://{s3_bucket}/k" in str(info.value)


def test_s3_unreachable_endpoint(monkeypatch: pytest.MonkeyPatch, s3_endpoint: str) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url="http://127.0.0.1:9",  # discard port: nothing listens
        config=Config(retries={"max_attempts": 1}, connect_timeout=1),
    )
    store = S3ObjectStore("smlt-bucket", client=client)
    with pytest.raises(
        ObjectStoreError, match=r"cannot reach the S3 endpoint http://127\.0\.0\.1:9"
    ):
        store.get_bytes("k")
