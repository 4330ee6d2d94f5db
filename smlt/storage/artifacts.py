"""The artifact format (paper component 1a): a task's code and data, as workers find them.

A worker is a stateless function that is handed ``(object store url, job id)`` and nothing else.
Everything else it needs is in the store, under ``jobs/<job>/artifact/``::

    manifest.json          what is where: written LAST, so its presence means "complete"
    source/<file>.py       the task file, imported on the worker with load_task
    shards/00000.bin ...   contiguous runs of samples, each at most shard_bytes

A shard is raw bytes, no pickle and no torch serialization: for each tensor in ``data()`` order,
the C-contiguous little-endian rows ``[start, stop)`` one after the other. The manifest carries
the dtypes and per-sample shapes needed to cut them apart, and a SHA-256 per shard so a worker
never trains on a truncated or corrupted download. Reading a shard therefore runs no code from the
file, and a row is found by arithmetic alone: its offset in each tensor's section.

The client writes it (:func:`smlt.client.artifacts.package_task`); on the worker,
:func:`load_packaged_task` imports the task and :class:`smlt.storage.reader.DataReader` turns
global sample indices into rows, streaming the shards it needs into a bounded local cache folder
(``/tmp`` on Lambda) and reading only the rows it needs from them.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path, PureWindowsPath
from typing import Any

import torch

from smlt.errors import ConfigError, ObjectNotFoundError, ObjectStoreError
from smlt.storage.objects import ObjectStore
from smlt.task import Task, load_task

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "MANIFEST_FORMAT",
    "ArtifactManifest",
    "Shard",
    "TensorSpec",
    "artifact_prefix",
    "check_shard_bytes",
    "default_cache_dir",
    "file_sha256",
    "load_packaged_task",
    "manifest_key",
]

#: 64 MiB, not the paper's 250 MB (§5): workers read a few shards per epoch and prefetch them,
#: so smaller shards give each worker finer regions and smaller downloads ahead (MosaicML
#: Streaming settles on about 64 MB too). ``smlt train --shard-mb`` sets another size.
DEFAULT_SHARD_BYTES = 64 * 2**20
#: Bumped whenever the manifest or shard layout changes incompatibly, or what workers make of
#: it: 2 since the sample order became shard-aware (:mod:`smlt.worker.sampler`), so a run packaged
#: under 1 is refused on resume instead of continuing in another order than it began.
MANIFEST_FORMAT = "smlt-artifact/2"

_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_HASH_CHUNK_BYTES = 8 * 2**20

if sys.byteorder != "little":  # pragma: no cover - every platform smlt targets is little-endian
    raise ImportError("smlt shards are little-endian; this machine is not")


def check_shard_bytes(shard_bytes: int) -> int:
    """The most bytes of samples in one shard, checked: a whole number of at least 1."""
    integral = isinstance(shard_bytes, numbers.Integral) and not isinstance(shard_bytes, bool)
    if not integral or shard_bytes < 1:
        raise ConfigError(
            f"shard_bytes must be at least 1 (--shard-mb must be > 0), got {shard_bytes!r}"
        )
    return int(shard_bytes)


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

    @property
    def shard_sizes(self) -> list[int]:
        """Samples per shard, in index order: the layout the sample order is drawn over."""
        return [shard.stop - shard.start for shard in self.shards]

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


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in chunks (a data shard may be 250 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
