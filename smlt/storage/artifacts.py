"""The artifact format (paper component 1a): a task's code and data, as workers find them.

A worker is a stateless function that is handed ``(object store url, job id)`` and nothing else.
Everything else it needs is in the store, under ``jobs/<job>/artifact/``::

    manifest.json          what is where: written LAST, so its presence means "complete"
    source/<file>.py       the task file, imported on the worker with load_task
    shards/00000.bin ...   contiguous runs of samples, each at most shard_bytes

A shard is raw bytes, no pickle and no torch serialization: for each tensor in ``data()`` order,
the C-contiguous little-endian rows ``[start, stop)`` one after the other. The manifest carries
the dtypes and per-sample shapes needed to cut them apart, and a SHA-256 per shard so a worker
never trains on a truncated or corrupted download. Loading a shard therefore runs no code from the
file, and it is one read plus a few ``torch.frombuffer`` views.

The client writes it (:func:`smlt.client.artifacts.package_task`); on the worker,
:func:`load_packaged_task` imports the task and :class:`DataReader` turns
global sample indices into rows, downloading only the shards it needs into a local cache folder
(``/tmp`` on Lambda) and keeping a few in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import tempfile
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path, PureWindowsPath
from typing import Any

import numpy as np
import torch

from smlt.errors import ConfigError, ObjectNotFoundError, ObjectStoreError
from smlt.storage.objects import ObjectStore, open_object_store
from smlt.task import Task, load_task

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "MANIFEST_FORMAT",
    "ArtifactManifest",
    "DataReader",
    "Shard",
    "TensorSpec",
    "artifact_prefix",
    "default_cache_dir",
    "file_sha256",
    "load_packaged_task",
    "manifest_key",
]

#: 64 MiB, not the paper's 250 MB (§5): workers read a few shards per epoch and prefetch them,
#: so smaller shards give each worker finer regions and smaller downloads ahead (MosaicML
#: Streaming settles on about 64 MB too). ``smlt train --shard-mb`` sets another size.
DEFAULT_SHARD_BYTES = 64 * 2**20
#: Bumped whenever the manifest or shard layout changes incompatibly.
MANIFEST_FORMAT = "smlt-artifact/1"
DEFAULT_SHARDS_IN_MEMORY = 2

_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_HASH_CHUNK_BYTES = 8 * 2**20

if sys.byteorder != "little":  # pragma: no cover - every platform smlt targets is little-endian
    raise ImportError("smlt shards are little-endian; this machine is not")


def artifact_prefix(job_id: str) -> str:
    """``jobs/<job>/artifact/``: everything package_task writes lives under it."""
    if not _JOB_ID.fullmatch(job_id):
        raise ConfigError(
            f"invalid job id {job_id!r}: 1-128 letters, digits, '_', '.' or '-', starting with a "
            "letter or digit."
        )
    return f"jobs/{job_id}/artifact/"


def manifest_key(job_id: str) -> str:
    return artifact_prefix(job_id) + "manifest.json"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of ``data()``: its dtype name (``"float32"``) and the shape of one sample."""

    dtype: str
    sample_shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ObjectStoreError(f"artifact manifest names unknown dtype {self.dtype!r}")
        return dtype

    @property
    def bytes_per_sample(self) -> int:
        return math.prod(self.sample_shape) * self.torch_dtype.itemsize


@dataclass(frozen=True)
class Shard:
    """Samples ``[start, stop)`` stored under ``key``, ``num_bytes`` long, hashed ``sha256``."""

    key: str
    start: int
    stop: int
    num_bytes: int
    sha256: str


@dataclass(frozen=True)
class ArtifactManifest:
    """What package_task wrote; the JSON form is the contract with workers (see module doc)."""

    job_id: str
    source_file: str
    source_key: str
    source_sha256: str
    class_name: str
    num_samples: int
    tensors: tuple[TensorSpec, ...]
    shards: tuple[Shard, ...]
    total_bytes: int
    created_unix_s: float
    format: str = MANIFEST_FORMAT
    #: What the client measured of the task's memory use on a tiny batch, for workers to size
    #: their micro-batches by (:class:`smlt.worker.memory.MemoryProfile`, as a dict); the
    #: same numbers for every attempt of every worker. None: not measured (packaged unchecked).
    memory_profile: dict[str, Any] | None = None

    @property
    def bytes_per_sample(self) -> int:
        return sum(spec.bytes_per_sample for spec in self.tensors)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, *, where: str = "manifest") -> ArtifactManifest:
        try:
            raw = json.loads(data)
            if raw.get("format") != MANIFEST_FORMAT:
                raise ObjectStoreError(
                    f"{where} has format {raw.get('format')!r}; this smlt reads "
                    f"{MANIFEST_FORMAT!r}. Package the task again with this version."
                )
            manifest = cls(
                **{
                    **raw,
                    "tensors": tuple(
                        TensorSpec(t["dtype"], tuple(t["sample_shape"])) for t in raw["tensors"]
                    ),
                    "shards": tuple(Shard(**s) for s in raw["shards"]),
                }
            )
            manifest._check_paths(where)
            return manifest
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ObjectStoreError(f"{where} is not a valid artifact manifest: {exc}") from exc

    def _check_paths(self, where: str) -> None:
        """Refuse names that reach outside this job's artifact.

        A worker writes ``source_file`` into its cache folder and fetches every key from the
        store; a manifest it did not write (a shared bucket, a tampered object) must not be able
        to make it overwrite ``~/.bashrc`` or read another job's data.
        """
        if not _is_plain_py_name(self.source_file):
            raise ObjectStoreError(
                f"{where}: source_file {self.source_file!r} is not a plain .py file name (no "
                "'/', '\\', '..', NUL, drive or leading '.')"
            )
        prefix = artifact_prefix(self.job_id)  # ConfigError (a ValueError) for a bad job id
        keys = [("source_key", self.source_key)]
        keys += [(f"shards[{i}].key", shard.key) for i, shard in enumerate(self.shards)]
        for field, key in keys:
            if not _is_key_under(key, prefix):
                raise ObjectStoreError(
                    f"{where}: {field} {key!r} does not lie under {prefix!r} (or has an empty, "
                    "'.'-prefixed or '..' segment, a backslash or NUL)"
                )

    @classmethod
    def load(cls, store: ObjectStore, job_id: str) -> ArtifactManifest:
        """Read the manifest of ``job_id``; ObjectNotFoundError if it was never (fully) packaged."""
        key = manifest_key(job_id)
        try:
            data = store.get_bytes(key)
        except ObjectNotFoundError as exc:
            raise ObjectNotFoundError(
                f"job {job_id!r} has no artifact in {store.url}: {key} is missing. Either the job "
                "id is wrong or package_task did not finish (the manifest is written last)."
            ) from exc
        manifest = cls.from_json(data, where=f"{store.url}/{key}")
        if manifest.job_id != job_id:
            raise ObjectStoreError(
                f"{store.url}/{key} belongs to job {manifest.job_id!r}, not {job_id!r}"
            )
        return manifest


def load_packaged_task(store: ObjectStore, manifest: ArtifactManifest, cache_dir: Path) -> Task:
    """Fetch the task file into ``cache_dir`` (verified against the manifest) and import it.

    The file keeps its own name (tracebacks read naturally) inside a folder named by its hash,
    so two jobs' ``task.py`` never overwrite each other.
    """
    path = Path(cache_dir) / "source" / manifest.source_sha256[:16] / manifest.source_file
    if not (path.is_file() and file_sha256(path) == manifest.source_sha256):
        store.get_file(manifest.source_key, path)
        if file_sha256(path) != manifest.source_sha256:
            path.unlink(missing_ok=True)
            raise ObjectStoreError(
                f"task source {store.url}/{manifest.source_key} does not match the hash in the "
                f"manifest of job {manifest.job_id!r}; it was modified after packaging."
            )
    return load_task(f"{path}:{manifest.class_name}")


def _is_plain_py_name(name: object) -> bool:
    """A file name that is the same file name on POSIX and Windows, ending in ``.py``."""
    return (
        isinstance(name, str)
        and len(name) > len(".py")
        and name.endswith(".py")
        and not name.startswith(".")
        and ".." not in name
        and not any(c in name for c in "/\\\0")
        and PureWindowsPath(name).name == name  # no drive: "C:task.py"
    )


def _is_key_under(key: object, prefix: str) -> bool:
    """``key`` names an object below ``prefix`` by the object store's key rules (no empty or
    dot-led segment, hence no ``..``; no backslash) and has no NUL."""
    if not (isinstance(key, str) and key.startswith(prefix) and len(key) > len(prefix)):
        return False
    segments = key[len(prefix) :].split("/")
    return not any(not seg or seg.startswith(".") or "\\" in seg or "\0" in seg for seg in segments)


def default_cache_dir(job_id: str) -> Path:
    """``$SMLT_CACHE_DIR/<job>`` or ``<tmp>/smlt-cache/<job>``: ``/tmp`` is writable on Lambda."""
    root = os.environ.get("SMLT_CACHE_DIR") or str(Path(tempfile.gettempdir()) / "smlt-cache")
    return Path(root) / job_id


class DataReader:
    """Rows of the packaged training set by global index, for one worker.

    Shards are downloaded on first use into ``cache_dir`` (named by hash, so a re-packaged job
    never reads stale bytes), verified, and the ``shards_in_memory`` most recently used are kept
    decoded. Workers that read their partition in order touch each shard once per epoch; a sampler
    that jumps across the whole set touches many, which costs disk reads but no downloads.
    """

    def __init__(
        self,
        store: ObjectStore,
        manifest: ArtifactManifest,
        cache_dir: Path,
        *,
        shards_in_memory: int = DEFAULT_SHARDS_IN_MEMORY,
    ) -> None:
        if shards_in_memory < 1:
            raise ConfigError(f"shards_in_memory must be at least 1, got {shards_in_memory}")
        self.store = store
        self.manifest = manifest
        self.cache_dir = Path(cache_dir) / "shards"
        self.shards_in_memory = shards_in_memory
        self._starts = np.array([s.start for s in manifest.shards], dtype=np.int64)
        self._memory: OrderedDict[int, tuple[torch.Tensor, ...]] = OrderedDict()
        self._downloads = 0
        self._bytes_downloaded = 0
        self._disk_loads = 0
        self._memory_hits = 0

    @classmethod
    def open(cls, store_url: str, job_id: str, cache_dir: Path | None = None) -> DataReader:
        """The reader a worker builds from ``(store url, job id)`` alone."""
        store = open_object_store(store_url)
        manifest = ArtifactManifest.load(store, job_id)
        return cls(store, manifest, cache_dir or default_cache_dir(job_id))

    def shard_ids(self, indices: np.ndarray) -> np.ndarray:
        """Which shard holds each global index (after checking the indices are in range)."""
        indices = np.asarray(indices)
        if indices.ndim != 1 or not (indices.size == 0 or np.issubdtype(indices.dtype, np.integer)):
            raise ConfigError(
                f"indices must be a 1-D integer array, got dtype {indices.dtype} "
                f"and shape {indices.shape}"
            )
        n = self.manifest.num_samples
        if indices.size and (indices.min() < 0 or indices.max() >= n):
            bad = indices[(indices < 0) | (indices >= n)][0]
            raise ConfigError(
                f"sample index {int(bad)} is out of range [0, {n}) of job {self.manifest.job_id!r}"
            )
        return np.searchsorted(self._starts, indices, side="right") - 1

    def rows(self, indices: np.ndarray) -> tuple[torch.Tensor, ...]:
        """The samples at ``indices``, in that order, one tensor per tensor of ``data()``."""
        indices = np.asarray(indices)
        owners = self.shard_ids(indices)
        out = tuple(
            torch.empty((len(indices), *spec.sample_shape), dtype=spec.torch_dtype)
            for spec in self.manifest.tensors
        )
        for shard_id in np.unique(owners):
            positions = torch.from_numpy(np.flatnonzero(owners == shard_id))
            local = torch.from_numpy(
                indices[positions.numpy()].astype(np.int64) - self._starts[shard_id]
            )
            for target, source in zip(out, self._shard(int(shard_id)), strict=True):
                target[positions] = source[local]
        return out

    def statistics(self) -> dict[str, int]:
        """Counters: downloads, bytes downloaded, loads from the disk cache, memory hits."""
        return {
            "downloads": self._downloads,
            "bytes_downloaded": self._bytes_downloaded,
            "disk_loads": self._disk_loads,
            "memory_hits": self._memory_hits,
            "shards_in_memory": len(self._memory),
        }

    def _shard(self, shard_id: int) -> tuple[torch.Tensor, ...]:
        if shard_id in self._memory:
            self._memory.move_to_end(shard_id)
            self._memory_hits += 1
            return self._memory[shard_id]
        tensors = self._decode(self.manifest.shards[shard_id], self._local_copy(shard_id))
        self._memory[shard_id] = tensors
        while len(self._memory) > self.shards_in_memory:
            self._memory.popitem(last=False)
        return tensors

    def _local_copy(self, shard_id: int) -> bytearray:
        """The verified bytes of a shard: from the disk cache, else downloaded once."""
        shard = self.manifest.shards[shard_id]
        path = self.cache_dir / f"{shard.sha256}.bin"
        if path.is_file():
            data = _read_bytearray(path)
            if hashlib.sha256(data).hexdigest() == shard.sha256:
                self._disk_loads += 1
                return data
            path.unlink(missing_ok=True)  # damaged cache file: fetch a fresh copy below
        try:
            self.store.get_file(shard.key, path)
        except ObjectNotFoundError as exc:
            raise ObjectNotFoundError(
                f"data shard {shard.key} (samples [{shard.start}, {shard.stop})) of job "
                f"{self.manifest.job_id!r} is missing from {self.store.url}; package the task "
                "again."
            ) from exc
        self._downloads += 1
        self._bytes_downloaded += shard.num_bytes
        data = _read_bytearray(path)
        if hashlib.sha256(data).hexdigest() != shard.sha256 or len(data) != shard.num_bytes:
            path.unlink(missing_ok=True)
            raise ObjectStoreError(
                f"data shard {shard.key} of job {self.manifest.job_id!r} in {self.store.url} is "
                f"corrupt: {len(data)} bytes whose SHA-256 does not match the manifest "
                f"({shard.num_bytes} bytes expected); package the task again."
            )
        return data

    def _decode(self, shard: Shard, data: bytearray) -> tuple[torch.Tensor, ...]:
        rows = shard.stop - shard.start
        tensors = []
        offset = 0
        for spec in self.manifest.tensors:
            dtype = spec.torch_dtype
            count = rows * math.prod(spec.sample_shape)
            if count == 0:
                flat = torch.empty(0, dtype=dtype)
            else:
                flat = torch.frombuffer(data, dtype=dtype, count=count, offset=offset)
            tensors.append(flat.view(rows, *spec.sample_shape))
            offset += count * dtype.itemsize
        return tuple(tensors)


def _read_bytearray(path: Path) -> bytearray:
    # A bytearray is writable, so torch.frombuffer shares it without a copy or a warning.
    data = bytearray(path.stat().st_size)
    with open(path, "rb") as f:
        f.readinto(data)
    return data


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in chunks (a data shard may be 250 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
