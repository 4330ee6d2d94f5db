"""The artifact manager: package a task, then rebuild it the way a cold worker does.

The data reader's own tests are in test_reader.py."""

from __future__ import annotations

import itertools
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from smlt.client.artifacts import package_task
from smlt.errors import ConfigError, ObjectNotFoundError, ObjectStoreError, TaskError
from smlt.storage.artifacts import (
    MANIFEST_FORMAT,
    ArtifactManifest,
    artifact_prefix,
    load_packaged_task,
    manifest_key,
)
from smlt.storage.objects import LocalObjectStore, ObjectStore, open_object_store
from smlt.storage.reader import DataReader
from smlt.task import check_task, load_task

pytest_plugins = ["tests.s3_server"]

DIGITS = str(Path(__file__).resolve().parent.parent / "examples" / "digits.py") + ":Digits"
DIGITS_TRAIN_SAMPLES = 1347
DIGITS_BYTES_PER_SAMPLE = 64 * 4 + 8  # float32 pixels + int64 label
SMALL_SHARD_BYTES = 100 * DIGITS_BYTES_PER_SAMPLE + 7  # 100 samples per shard, 14 shards


@pytest.fixture(scope="module")
def digits_data() -> tuple[torch.Tensor, ...]:
    return check_task(load_task(DIGITS)).tensors


def test_manifest_fields(store: ObjectStore) -> None:
    manifest = package_task(DIGITS, store, "job-1", shard_bytes=SMALL_SHARD_BYTES)
    assert manifest.job_id == "job-1"
    assert (manifest.source_file, manifest.class_name) == ("digits.py", "Digits")
    assert manifest.num_samples == DIGITS_TRAIN_SAMPLES
    assert [(t.dtype, t.sample_shape) for t in manifest.tensors] == [
        ("float32", (64,)),
        ("int64", ()),
    ]
    assert manifest.bytes_per_sample == DIGITS_BYTES_PER_SAMPLE
    assert len(manifest.shards) == 14
    ranges = [(s.start, s.stop) for s in manifest.shards]
    assert ranges[0] == (0, 100) and ranges[-1] == (1300, DIGITS_TRAIN_SAMPLES)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert all(s.num_bytes <= SMALL_SHARD_BYTES for s in manifest.shards)
    assert manifest.total_bytes == DIGITS_TRAIN_SAMPLES * DIGITS_BYTES_PER_SAMPLE
    assert len({s.sha256 for s in manifest.shards}) == 14

    prefix = artifact_prefix("job-1")
    expected_keys = {manifest_key("job-1"), f"{prefix}source/digits.py"}
    expected_keys |= {s.key for s in manifest.shards}
    assert set(store.list(prefix)) == expected_keys
    assert store.get_bytes(manifest.source_key) == Path(DIGITS.split(":")[0]).read_bytes()

    raw = json.loads(store.get_bytes(manifest_key("job-1")))
    assert raw["format"] == MANIFEST_FORMAT
    assert raw["shards"][1] == {
        "key": f"{prefix}shards/00001.bin",
        "start": 100,
        "stop": 200,
        "num_bytes": 100 * DIGITS_BYTES_PER_SAMPLE,
        "sha256": manifest.shards[1].sha256,
    }
    assert ArtifactManifest.load(store, "job-1") == manifest


def test_manifest_is_written_last(tmp_path: Path) -> None:
    """A reader polling the store must never find a manifest before all shards exist."""
    written: list[str] = []

    class RecordingStore(LocalObjectStore):
        def put_bytes(self, key: str, data: bytes) -> None:
            written.append(key)
            super().put_bytes(key, data)

    manifest = package_task(DIGITS, RecordingStore(tmp_path), "j", shard_bytes=SMALL_SHARD_BYTES)
    assert written[-1] == manifest_key("j")
    assert set(written[:-1]) == {manifest.source_key, *(s.key for s in manifest.shards)}


def test_one_sample_per_shard_at_least(tmp_path: Path) -> None:
    manifest = package_task(DIGITS, LocalObjectStore(tmp_path), "tiny", shard_bytes=1)
    assert len(manifest.shards) == DIGITS_TRAIN_SAMPLES
    assert all(s.stop - s.start == 1 for s in manifest.shards)


def test_default_shard_size_gives_one_shard(tmp_path: Path) -> None:
    manifest = package_task(DIGITS, LocalObjectStore(tmp_path), "one")
    assert [(s.start, s.stop) for s in manifest.shards] == [(0, DIGITS_TRAIN_SAMPLES)]


def test_missing_manifest_is_a_typed_error(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFoundError, match="job 'never' has no artifact") as info:
        ArtifactManifest.load(store, "never")
    assert manifest_key("never") in str(info.value)


def test_corrupt_manifest_is_a_typed_error(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    package_task(DIGITS, store, "m")
    store.put_bytes(manifest_key("m"), b'{"format": "smlt-artifact/2", "job_id": "m"}')
    with pytest.raises(ObjectStoreError, match="not a valid artifact manifest"):
        ArtifactManifest.load(store, "m")
    store.put_bytes(manifest_key("m"), b'{"format": "smlt-artifact/99"}')
    with pytest.raises(ObjectStoreError, match="smlt-artifact/99"):
        ArtifactManifest.load(store, "m")
    # A run packaged before the shard-aware order: refused, not continued in another order.
    store.put_bytes(manifest_key("m"), b'{"format": "smlt-artifact/1", "job_id": "m"}')
    with pytest.raises(ObjectStoreError, match="smlt-artifact/1.*Package the task again"):
        ArtifactManifest.load(store, "m")


def test_worker_cold_start_from_url_and_job_id(
    store: ObjectStore, tmp_path: Path, digits_data: tuple[torch.Tensor, ...]
) -> None:
    """Everything a worker needs, rebuilt from two strings into a fresh cache folder."""
    package_task(DIGITS, store, "cold", shard_bytes=SMALL_SHARD_BYTES)
    url = store.url
    worker_store = open_object_store(url)
    manifest = ArtifactManifest.load(worker_store, "cold")
    task = load_packaged_task(worker_store, manifest, tmp_path / "fresh")
    assert type(task).__name__ == "Digits"
    module_file = Path(sys.modules[type(task).__module__].__file__ or "")
    assert module_file.is_relative_to(tmp_path / "fresh")  # imported from the worker's cache
    reader = DataReader.open(url, "cold", tmp_path / "fresh")
    batch = reader.rows(np.arange(10, 20))
    assert torch.equal(batch[0], digits_data[0][10:20])
    model = task.model()
    loss = task.loss(model, batch)
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_packaged_source_runs_even_after_the_original_moves(
    tmp_path: Path, digits_data: tuple[torch.Tensor, ...]
) -> None:
    original = tmp_path / "user" / "digits.py"
    original.parent.mkdir()
    shutil.copy(DIGITS.split(":")[0], original)
    store = LocalObjectStore(tmp_path / "objects")
    manifest = package_task(f"{original}:Digits", store, "moved")
    original.unlink()
    task = load_packaged_task(store, manifest, tmp_path / "worker")
    cached = tmp_path / "worker" / "source" / manifest.source_sha256[:16] / "digits.py"
    assert cached.is_file()
    assert torch.equal(check_task(task).tensors[1], digits_data[1])


def test_tampered_source_is_refused(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    manifest = package_task(DIGITS, store, "tamper")
    store.put_bytes(manifest.source_key, b"import os\n")
    with pytest.raises(ObjectStoreError, match="does not match the hash"):
        load_packaged_task(store, manifest, tmp_path / "worker")


def test_repackaging_replaces_old_shards(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    package_task(DIGITS, store, "re", shard_bytes=SMALL_SHARD_BYTES)
    manifest = package_task(DIGITS, store, "re")
    assert len(store.list(artifact_prefix("re") + "shards/")) == len(manifest.shards) == 1


def test_package_rejects_bad_input(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    with pytest.raises(ConfigError, match="invalid job id"):
        package_task(DIGITS, store, "../escape")
    with pytest.raises(ConfigError, match="shard_bytes must be at least 1"):
        package_task(DIGITS, store, "j", shard_bytes=0)
    bad = tmp_path / "bad.py"
    source = Path(DIGITS.split(":")[0]).read_text()
    loss_line = "cross_entropy(model(x), y)"
    bad.write_text(source.replace(loss_line, loss_line + ".detach()"))
    with pytest.raises(TaskError, match=r"Digits\.loss\(\) .*does not depend on the model"):
        package_task(f"{bad}:Digits", store, "j")
    assert store.list("") == []  # nothing written for a task that fails its checks


# -- manifest paths cannot escape the job's artifact -----------------------------------------


@pytest.fixture(scope="module")
def packaged(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalObjectStore, dict[str, Any]]:
    """A packaged job ("esc", three shards) and its manifest as JSON, to be tampered with."""
    store = LocalObjectStore(tmp_path_factory.mktemp("escape"))
    package_task(DIGITS, store, "esc", shard_bytes=500 * DIGITS_BYTES_PER_SAMPLE)
    return store, json.loads(store.get_bytes(manifest_key("esc")))


def _load_tampered(
    packaged: tuple[LocalObjectStore, dict[str, Any]], field: str, value: object
) -> ArtifactManifest:
    store, raw = packaged
    tampered = json.loads(json.dumps(raw))
    if field == "shard":
        tampered["shards"][2]["key"] = value
    else:
        tampered[field] = value
    store.put_bytes(manifest_key("esc"), json.dumps(tampered).encode())
    try:
        return ArtifactManifest.load(store, "esc")
    finally:
        store.put_bytes(manifest_key("esc"), json.dumps(raw).encode())


def test_untampered_manifest_passes(packaged: tuple[LocalObjectStore, dict[str, Any]]) -> None:
    manifest = _load_tampered(packaged, "source_file", "digits.py")
    assert manifest.source_file == "digits.py" and len(manifest.shards) == 3


@pytest.mark.parametrize(
    "name",
    [
        "../digits.py",
        "/home/user/.bashrc.py",
        "sub/digits.py",
        "..\\digits.py",
        "sub\\digits.py",
        "C:digits.py",
        "digits.py\x00.txt",
        "digits.txt",
        ".py",
        ".hidden.py",
        "..py",
        "",
        7,
    ],
)
def test_source_file_must_be_a_plain_py_name(
    packaged: tuple[LocalObjectStore, dict[str, Any]], name: object
) -> None:
    with pytest.raises(
        ObjectStoreError, match="source_file .* is not a plain .py file name"
    ) as info:
        _load_tampered(packaged, "source_file", name)
    assert repr(name) in str(info.value)


ESCAPING_KEYS = [
    "jobs/other/artifact/source/digits.py",  # another job's artifact
    "jobs/esc/artifact/../../other/artifact/x",  # climbs out
    "jobs/esc/artifact/source/../../../../etc/passwd",
    "jobs/esc/artifact/",  # the prefix itself
    "jobs/esc/artifact//x",  # empty segment
    "jobs/esc/artifact/.hidden",
    "jobs/esc/artifact/source\\..\\..\\x",
    "jobs/esc/artifact/x\x00y",
    "/etc/passwd",
    "jobs/esc/artifactx/y",
]


@pytest.mark.parametrize("key", ESCAPING_KEYS)
def test_source_key_must_lie_under_the_artifact(
    packaged: tuple[LocalObjectStore, dict[str, Any]], key: str
) -> None:
    with pytest.raises(ObjectStoreError, match="source_key .* does not lie under") as info:
        _load_tampered(packaged, "source_key", key)
    assert repr(key) in str(info.value) and "'jobs/esc/artifact/'" in str(info.value)


@pytest.mark.parametrize("key", [*ESCAPING_KEYS, None])
def test_shard_keys_must_lie_under_the_artifact(
    packaged: tuple[LocalObjectStore, dict[str, Any]], key: str | None
) -> None:
    with pytest.raises(ObjectStoreError, match=r"shards\[2\]\.key .* does not lie under"):
        _load_tampered(packaged, "shard", key)


def test_from_json_checks_paths_too() -> None:
    """Not only load: whoever parses a manifest gets the check."""
    raw: dict[str, Any] = {
        "job_id": "j",
        "source_file": "task.py",
        "source_key": "jobs/j/artifact/source/task.py",
        "source_sha256": "0" * 64,
        "class_name": "T",
        "num_samples": 1,
        "tensors": [{"dtype": "float32", "sample_shape": []}],
        "shards": [
            {
                "key": "jobs/k/artifact/shards/0.bin",
                "start": 0,
                "stop": 1,
                "num_bytes": 4,
                "sha256": "0" * 64,
            }
        ],
        "total_bytes": 4,
        "created_unix_s": 0.0,
        "format": MANIFEST_FORMAT,
    }
    with pytest.raises(ObjectStoreError, match=r"m\.json: shards\[0\]\.key 'jobs/k/"):
        ArtifactManifest.from_json(json.dumps(raw).encode(), where="m.json")
    raw["shards"][0]["key"] = "jobs/j/artifact/shards/0.bin"
    assert ArtifactManifest.from_json(json.dumps(raw).encode()).shards[0].num_bytes == 4
