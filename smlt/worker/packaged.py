"""The task as a worker gets it: the packaged source, verified, then imported."""

from __future__ import annotations

from pathlib import Path

from smlt.errors import ObjectStoreError
from smlt.storage.artifacts import ArtifactManifest, file_sha256
from smlt.storage.objects import ObjectStore
from smlt.task import Task, load_task

__all__ = ["load_packaged_task"]


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
