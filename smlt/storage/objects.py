"""The object store: where task code, data shards and checkpoints live between invocations.

Serverless workers keep nothing across invocations, so everything a worker needs at cold start
comes from here, named by a key such as ``jobs/<job>/artifact/manifest.json``. Two
implementations share one small interface: :class:`LocalObjectStore` (a folder; the default, and
what the Ray backend uses on a laptop) and :class:`S3ObjectStore` (boto3). Pick one from a URL
with :func:`open_object_store`, so a worker can be handed a string and rebuild its store.

Keys are ``/``-separated relative names; a segment may not be empty or start with a dot, which
rules out ``..`` escapes from the local root and leaves dot-names free for temporary files.

Writes are atomic in both stores: a reader sees either the old object or the complete new one,
never a prefix of it. S3 gives that for free; the local store writes a temporary file beside the
target and ``os.replace``-s it into place.
"""

from __future__ import annotations

import builtins
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from smlt.errors import ConfigError, ObjectNotFoundError, ObjectStoreError

__all__ = [
    "DEFAULT_OBJECT_STORE_ENV",
    "LocalObjectStore",
    "ObjectStore",
    "S3ObjectStore",
    "default_local_root",
    "open_object_store",
]

#: Environment variable naming the object store used when none is given (a path or a URL).
DEFAULT_OBJECT_STORE_ENV = "SMLT_OBJECT_STORE"

_TMP_SUFFIX = ".smlt-tmp"
_COPY_CHUNK_BYTES = 8 * 2**20
_S3_DELETE_BATCH = 1000  # the DeleteObjects API limit


class ObjectStore(ABC):
    """Named blobs under one root. Keys are relative; ``url`` rebuilds the same store."""

    @property
    @abstractmethod
    def url(self) -> str:
        """A URL that :func:`open_object_store` turns back into an equivalent store."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically, replacing any previous object."""

    @abstractmethod
    def put_file(self, key: str, src: Path) -> None:
        """Upload the local file ``src`` under ``key`` atomically."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The object's content; :class:`ObjectNotFoundError` if there is none."""

    @abstractmethod
    def get_file(self, key: str, dest: Path) -> None:
        """Download the object to ``dest`` (parents created); ``dest`` appears only complete."""

    def get_chunks(
        self, key: str, chunk_bytes: int = _COPY_CHUNK_BYTES
    ) -> Generator[bytes, None, None]:
        """The object's content as consecutive pieces of at most ``chunk_bytes``, as it arrives.

        For a caller that checks or transforms the bytes on their way to disk (the data reader
        hashes a shard while it streams), so a large object is read once and never held whole.
        A generator: errors, :class:`ObjectNotFoundError` included, are raised by the first
        ``next()``, and a caller that stops early should ``close()`` it to free the connection.
        This fallback holds the object in memory; both stores here override it to stream.
        """
        data = self.get_bytes(key)
        for start in range(0, len(data), chunk_bytes):
            yield data[start : start + chunk_bytes]

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under exactly ``key``."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys starting with ``prefix`` (a plain string prefix, as in S3)."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with ``prefix``; return how many were deleted.

        An empty prefix is refused: wiping a whole store is never what a job means to do.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


class LocalObjectStore(ObjectStore):
    """A folder on local disk. Also the right store for a Ray cluster with a shared filesystem."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ObjectStoreError(
                f"cannot create the local object store folder {self.root}: {exc.strerror or exc}"
            ) from exc

    @property
    def url(self) -> str:
        return self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*_check_key(key).split("/"))

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        with self._errors("write", key):
            with _atomic_file(path) as f:
                f.write(data)

    def put_file(self, key: str, src: Path) -> None:
        path = self._path(key)
        with self._errors("write", key), open(src, "rb") as source, _atomic_file(path) as f:
            shutil.copyfileobj(source, f, _COPY_CHUNK_BYTES)

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        with self._errors("read", key):
            return path.read_bytes()

    def get_file(self, key: str, dest: Path) -> None:
        path = self._path(key)
        with self._errors("read", key), open(path, "rb") as source, _atomic_file(dest) as f:
            shutil.copyfileobj(source, f, _COPY_CHUNK_BYTES)

    def get_chunks(
        self, key: str, chunk_bytes: int = _COPY_CHUNK_BYTES
    ) -> Generator[bytes, None, None]:
        path = self._path(key)
        with self._errors("read", key), open(path, "rb") as source:
            while chunk := source.read(chunk_bytes):
                yield chunk

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        # Walk only the deepest folder the prefix pins down, not the whole store.
        folder_part = prefix.rpartition("/")[0]
        if folder_part:
            _check_key(folder_part)
        base = self.root.joinpath(*folder_part.split("/")) if folder_part else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith("."):
                    continue  # temporary files of in-flight writes
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise ConfigError(f"refusing to delete everything in {self.url}: empty prefix.")
        keys = self.list(prefix)
        for key in keys:
            with self._errors("delete", key):
                self._path(key).unlink(missing_ok=True)
        self._prune_empty_dirs(keys)
        return len(keys)

    def _prune_empty_dirs(self, keys: Sequence[str]) -> None:
        parents = {self._path(k).parent for k in keys}
        for folder in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            while folder != self.root:
                try:
                    folder.rmdir()
                except OSError:
                    break  # not empty (or already gone and the parent is not ours to judge)
                folder = folder.parent

    @contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        try:
            yield
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            if action == "read":
                raise ObjectNotFoundError(f"object {key!r} does not exist in {self.url}") from exc
            raise ObjectStoreError(
                f"cannot {action} object {key!r} in {self.url}: {exc.strerror or exc}"
            ) from exc
        except OSError as exc:
            raise ObjectStoreError(
                f"cannot {action} object {key!r} in {self.url}: {exc.strerror or exc}"
            ) from exc


class S3ObjectStore(ObjectStore):
    """A bucket (and optional key prefix) on S3 or anything that speaks its API.

    The endpoint, region and credentials come from boto3's usual sources, including
    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (native in botocore ≥ 1.31), which is how tests
    and MinIO users point it elsewhere. The client is created on first use and not pickled, so
    the store can be shipped to a Ray worker and reconnect there.
    """

    def __init__(self, bucket: str, prefix: str = "", *, client: Any = None) -> None:
        _check_bucket(bucket)
        prefix = prefix.strip("/")
        if prefix:
            _check_key(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self._client = client

    def __reduce__(self) -> tuple[Any, ...]:
        return (S3ObjectStore, (self.bucket, self.prefix))

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                import boto3
            except ImportError as exc:
                raise ConfigError(f"{self.url} needs boto3; install smlt[aws].") from exc
            with self._errors("connect to", ""):
                self._client = boto3.client("s3")
        return self._client

    def _full(self, key: str) -> str:
        key = _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_bytes(self, key: str, data: bytes) -> None:
        full = self._full(key)
        with self._errors("write", full):
            self.client.put_object(Bucket=self.bucket, Key=full, Body=data)

    def put_file(self, key: str, src: Path) -> None:
        full = self._full(key)
        with self._errors("write", full), open(src, "rb") as body:
            self.client.put_object(Bucket=self.bucket, Key=full, Body=body)

    def get_bytes(self, key: str) -> bytes:
        full = self._full(key)
        with self._errors("read", full):
            response = self.client.get_object(Bucket=self.bucket, Key=full)
            return bytes(response["Body"].read())

    def get_file(self, key: str, dest: Path) -> None:
        full = self._full(key)
        with self._errors("read", full):
            response = self.client.get_object(Bucket=self.bucket, Key=full)
            with _atomic_file(Path(dest)) as f:
                for chunk in response["Body"].iter_chunks(_COPY_CHUNK_BYTES):
                    f.write(chunk)

    def get_chunks(
        self, key: str, chunk_bytes: int = _COPY_CHUNK_BYTES
    ) -> Generator[bytes, None, None]:
        full = self._full(key)
        with self._errors("read", full):
            body = self.client.get_object(Bucket=self.bucket, Key=full)["Body"]
            try:
                yield from body.iter_chunks(chunk_bytes)
            finally:
                body.close()  # a caller that stops early must not leave the connection half-read

    def exists(self, key: str) -> bool:
        full = self._full(key)
        try:
            with self._errors("check", full):
                self.client.head_object(Bucket=self.bucket, Key=full)
        except ObjectNotFoundError:
            return False
        return True

    def _full_prefix(self, prefix: str) -> str:
        return f"{self.prefix}/{prefix}" if self.prefix else prefix

    def list(self, prefix: str = "") -> list[str]:
        full = self._full_prefix(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: builtins.list[str] = []
        with self._errors("list", full):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            )
            for page in pages:
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", ()))
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise ConfigError(f"refusing to delete everything in {self.url}: empty prefix.")
        keys = self.list(prefix)
        for i in range(0, len(keys), _S3_DELETE_BATCH):
            batch = [{"Key": self._full(k)} for k in keys[i : i + _S3_DELETE_BATCH]]
            with self._errors("delete", f"{self._full_prefix(prefix)}*"):
                response = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            if response.get("Errors"):
                first = response["Errors"][0]
                raise ObjectStoreError(
                    f"cannot delete {len(response['Errors'])} objects under "
                    f"s3://{self.bucket}/{self._full_prefix(prefix)}, e.g. {first.get('Key')!r}: "
                    f"{first.get('Code')}"
                )
        return len(keys)

    @contextmanager
    def _errors(self, action: str, full_key: str) -> Iterator[None]:
        """Translate botocore errors into smlt's; messages name bucket and key, never secrets."""
        from botocore.exceptions import (  # boto3 is optional; imported only when S3 is used
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        where = f"s3://{self.bucket}/{full_key}"
        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "Unknown"))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectNotFoundError(f"object {where} does not exist") from None
            if code == "NoSuchBucket":
                raise ObjectStoreError(
                    f"cannot {action} {where}: bucket {self.bucket!r} does not exist"
                ) from None
            if code in _AUTH_CODES or status == 403:
                raise ObjectStoreError(
                    f"cannot {action} {where}: access denied ({code}); check the AWS "
                    "credentials and the bucket policy"
                ) from None
            # Only the code and the server's message: a signature error's details can quote
            # the request, and we never want request material in a log.
            raise ObjectStoreError(
                f"cannot {action} {where}: {code} (HTTP {status}): {error.get('Message', '')}"
            ) from None
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise ObjectStoreError(
                f"cannot {action} {where}: no usable AWS credentials ({type(exc).__name__}); set "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role"
            ) from None
        except EndpointConnectionError as exc:
            endpoint = exc.kwargs.get("endpoint_url")
            raise ObjectStoreError(
                f"cannot {action} {where}: cannot reach the S3 endpoint {endpoint}"
            ) from None
        except BotoCoreError as exc:
            message = f"cannot {action} {where}: {type(exc).__name__}: {exc}"
            raise ObjectStoreError(message) from None


_AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "AllAccessDisabled",
        "403",
    }
)


def default_local_root() -> Path:
    """``$XDG_CACHE_HOME/smlt/objects`` (``~/.cache/smlt/objects``): the store when none is set."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(cache) / "smlt" / "objects"


def open_object_store(url: str | Path | None = None) -> ObjectStore:
    """The store a URL names: a path or ``file://`` URL → local, ``s3://bucket/prefix`` → S3.

    ``None`` means ``$SMLT_OBJECT_STORE`` if set, else :func:`default_local_root`. The string
    form round-trips: ``open_object_store(store.url)`` reopens the same store, which is how a
    stateless worker gets at its job's artifact.
    """
    if url is None:
        url = os.environ.get(DEFAULT_OBJECT_STORE_ENV) or default_local_root()
    if isinstance(url, Path):
        return LocalObjectStore(url)
    text = url.strip()
    if not text:
        raise ConfigError(
            "object store URL is empty; give a folder, file://... or s3://bucket/prefix."
        )
    if "://" not in text:
        return LocalObjectStore(Path(text))
    parsed = urlparse(text)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(
                f"object store URL {text!r} names host {parsed.netloc!r}; a "
                "file:// URL must be local (file:///absolute/path)."
            )
        return LocalObjectStore(Path(unquote(parsed.path)))
    if scheme == "s3":
        if parsed.query or parsed.fragment or parsed.username or parsed.password:
            raise ConfigError(
                f"object store URL {_redact(parsed)!r} must be "
                "s3://bucket/prefix, without credentials, query or fragment."
            )
        return S3ObjectStore(parsed.netloc, unquote(parsed.path))
    raise ConfigError(
        f"object store URL {_redact(parsed)!r} has unsupported scheme "
        f"{parsed.scheme!r}; use a folder, file:///path or s3://bucket/prefix."
    )


def _redact(parsed: Any) -> str:
    host = parsed.hostname or ""
    return f"{parsed.scheme}://{host}{parsed.path}"


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or any(not p or p.startswith(".") or "\\" in p for p in parts):
        raise ConfigError(
            f"invalid object key {key!r}: use '/'-separated names, none empty or starting with "
            "'.', no backslashes."
        )
    return key


def _check_bucket(bucket: str) -> None:
    ok_chars = all(c.islower() or c.isdigit() or c in ".-" for c in bucket)
    if not (3 <= len(bucket) <= 63 and ok_chars and bucket[0].isalnum() and bucket[-1].isalnum()):
        raise ConfigError(
            f"invalid S3 bucket name {bucket!r}: 3-63 characters of lowercase "
            "letters, digits, '.' and '-', starting and ending with a letter or "
            "digit."
        )


@contextmanager
def _atomic_file(dest: Path) -> Iterator[Any]:
    """A binary file handle whose content appears at ``dest`` only if the block succeeds."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, dest)
    finally:
        with suppress(FileNotFoundError):
            tmp.unlink()
