"""Datasets larger than the client's memory: ``data()`` yields chunks (or is an
``IterableDataset``), smlt checks each chunk as it packages it, and the client's checks,
calibration and plan use the head of the stream only.

Real PyTorch, a real object store (a local folder, and S3 over HTTP through moto), task files
written to disk and loaded as ``smlt train`` loads them.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import IterableDataset

import smlt
import smlt.task
from smlt.client.artifacts import package_task
from smlt.client.goals import calibrate
from smlt.client.plan import count_samples, profile_task
from smlt.errors import ConfigError, TaskError
from smlt.storage.artifacts import ArtifactManifest, Shard, artifact_prefix
from smlt.storage.objects import LocalObjectStore, ObjectStore
from smlt.task import HEAD_SAMPLES, StreamData, TaskData, check_task
from tests.cli_support import assert_nothing_left, run_smlt

pytest_plugins = ["tests.s3_server"]

#: Bytes of one sample of the tasks below: 8 float32 features and an int64 label.
BYTES_PER_SAMPLE = 8 * 4 + 8

#: What every task file starts with: the chunk a generator yields, and the model around it.
PREAMBLE = """
import os

import numpy as np
import torch

import smlt

PRODUCED = [0]  # samples the generator has handed out so far (the laziness test reads it)


def chunk(i, n):
    x = (np.arange(n * 8, dtype=np.float32).reshape(n, 8) + 1000 * i) / 1000
    y = (np.arange(n) + i) % 3
    return x, y


class Base(smlt.Task):
    def model(self):
        torch.manual_seed(0)
        return torch.nn.Linear(8, 3)

    def optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=0.1)

    def loss(self, model, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y)
"""


def chunk(i: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The task files' ``chunk``: chunk ``i`` of ``n`` rows, distinct from every other."""
    x = (np.arange(n * 8, dtype=np.float32).reshape(n, 8) + 1000 * i) / 1000
    y = (np.arange(n) + i) % 3
    return x, y


def task_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "task.py"
    path.write_text(PREAMBLE + textwrap.dedent(body))
    return path


def generator_task(tmp_path: Path, sizes: list[int], name: str = "Chunks") -> str:
    """A task whose ``data()`` yields chunks of ``sizes`` rows, counting what it produced."""
    body = f"""
    class {name}(Base):
        def data(self):
            for i, n in enumerate({sizes!r}):
                PRODUCED[0] += n
                yield chunk(i, n)
    """
    return f"{task_file(tmp_path, body)}:{name}"


def expected_rows(sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [chunk(i, n) for i, n in enumerate(sizes)]
    return (
        torch.from_numpy(np.concatenate([x for x, _ in parts])),
        torch.from_numpy(np.concatenate([y for _, y in parts])),
    )


def packaged_rows(store: ObjectStore, manifest: ArtifactManifest) -> tuple[torch.Tensor, ...]:
    """Every row of the artifact, cut out of the raw shards by the format alone (for each
    tensor in order, its rows ``[start, stop)``), without smlt's reader."""
    columns: list[list[torch.Tensor]] = [[] for _ in manifest.tensors]
    for shard in manifest.shards:
        payload = store.get_bytes(shard.key)
        assert len(payload) == shard.num_bytes
        offset, rows = 0, shard.stop - shard.start
        for column, spec in zip(columns, manifest.tensors, strict=True):
            size = rows * spec.bytes_per_sample
            flat = torch.frombuffer(
                bytearray(payload[offset : offset + size]), dtype=spec.torch_dtype
            )
            column.append(flat.reshape(rows, *spec.sample_shape))
            offset += size
        assert offset == len(payload)
    return tuple(torch.cat(column) for column in columns)


def loaded_module(path: Path) -> ModuleType:
    """The module load_task imported ``path`` as (its name is derived from the path)."""
    return next(m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == str(path))


# --- packaging -------------------------------------------------------------------------------


def test_a_generator_packages_to_uniform_shards_of_its_rows(
    store: ObjectStore, tmp_path: Path
) -> None:
    """Chunks of any size (one empty) become shards of equal size but the last, whose rows are
    the chunks concatenated, on a local folder and on S3 alike."""
    sizes = [7, 150, 1, 0, 90, 33]
    spec = generator_task(tmp_path, sizes)
    manifest = package_task(spec, store, "gen", shard_bytes=50 * BYTES_PER_SAMPLE)

    assert manifest.num_samples == sum(sizes) == 281
    assert [(s.start, s.stop) for s in manifest.shards] == [
        (0, 50),
        (50, 100),
        (100, 150),
        (150, 200),
        (200, 250),
        (250, 281),
    ]
    assert [(t.dtype, t.sample_shape) for t in manifest.tensors] == [
        ("float32", (8,)),
        ("int64", ()),
    ]
    assert manifest.memory_profile is not None  # measured on the head
    x, y = packaged_rows(store, manifest)
    want_x, want_y = expected_rows(sizes)
    assert torch.equal(x, want_x) and torch.equal(y, want_y)


def test_a_stream_packages_exactly_as_the_same_data_in_memory(tmp_path: Path) -> None:
    """Streaming changes how the shards are written, not what they hold: the same rows given
    as one tuple give byte-identical shards."""
    sizes = [40, 130, 25]
    (tmp_path / "s").mkdir()
    streamed = package_task(
        generator_task(tmp_path / "s", sizes),
        LocalObjectStore(tmp_path / "objects"),
        "streamed",
        shard_bytes=60 * BYTES_PER_SAMPLE,
    )
    (tmp_path / "m").mkdir()
    body = f"""
    class Whole(Base):
        def data(self):
            parts = [chunk(i, n) for i, n in enumerate({sizes!r})]
            return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])
    """
    whole = package_task(
        f"{task_file(tmp_path / 'm', body)}:Whole",
        LocalObjectStore(tmp_path / "objects"),
        "whole",
        shard_bytes=60 * BYTES_PER_SAMPLE,
    )

    def layout(m: ArtifactManifest) -> list[tuple[int, int, str]]:
        return [(s.start, s.stop, s.sha256) for s in m.shards]

    assert layout(streamed) == layout(whole)
    assert streamed.memory_profile == whole.memory_profile


def test_packaging_is_lazy(tmp_path: Path) -> None:
    """When shard k is uploaded, the generator has produced no more than the samples of
    shards 0..k and one chunk: nothing is read ahead, nothing held back."""
    chunk_rows, shard_rows, chunks = 100, 130, 10
    spec = generator_task(tmp_path, [chunk_rows] * chunks)
    path = Path(spec.rpartition(":")[0])
    seen: list[tuple[int, int]] = []

    def on_shard(shard: Shard) -> None:
        seen.append((shard.stop, loaded_module(path).PRODUCED[0]))

    manifest = package_task(
        spec,
        LocalObjectStore(tmp_path / "objects"),
        "lazy",
        shard_bytes=shard_rows * BYTES_PER_SAMPLE,
        on_shard=on_shard,
    )
    assert manifest.num_samples == chunk_rows * chunks
    assert len(seen) == len(manifest.shards) == 8
    for stop, produced in seen:
        assert stop <= produced <= stop + chunk_rows, seen
    assert seen[0][1] < manifest.num_samples  # the first shard went up before the data was read


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("x.astype(np.float64), y", r"tensor 0 is float64, but the first chunk's was float32"),
        ("x[:, :7], y", r"tensor 0 has samples of shape \(7,\), but the first chunk's had \(8,\)"),
        ("x, y[:-1]", r"holds tensors of unequal length \[50, 49\]"),
        ("(x,)", r"has 1 tensors, but the first chunk had 2"),
        ("torch.from_numpy(x)", r"is a tensor of shape \(50, 8\); expected a tuple"),
        ("x, y.astype(str)", r"returned element 1 as a numpy array of dtype <U"),
    ],
    ids=["dtype", "shape", "length", "tensors", "bare-tensor", "strings"],
)
def test_a_bad_chunk_is_a_task_error_naming_it_and_leaves_no_artifact(
    tmp_path: Path, bad: str, message: str
) -> None:
    body = f"""
    class Bad(Base):
        def data(self):
            for i in range(4):
                x, y = chunk(i, 50)
                yield ({bad}) if i == 2 else (x, y)
    """
    path = task_file(tmp_path, body)
    store = LocalObjectStore(tmp_path / "objects")
    with pytest.raises(TaskError, match=message) as caught:
        package_task(f"{path}:Bad", store, "bad", shard_bytes=30 * BYTES_PER_SAMPLE)
    assert "chunk 2 (counting from 0) of Bad.data() in task file" in str(caught.value)
    assert str(path) in str(caught.value)
    assert store.list(artifact_prefix("bad")) == []  # the shards already written are gone


def test_an_error_inside_the_generator_names_the_chunk_and_the_line(tmp_path: Path) -> None:
    body = """
    class Missing(Base):
        def data(self):
            for i in range(5):
                if i == 3:
                    np.load(os.path.join(os.path.dirname(__file__), "missing.npy"))
                yield chunk(i, 80)
    """
    path = task_file(tmp_path, body)
    with pytest.raises(TaskError) as caught:
        package_task(f"{path}:Missing", LocalObjectStore(tmp_path / "objects"), "missing")
    text = str(caught.value)
    assert "raised FileNotFoundError while producing chunk 3 (counting from 0)" in text
    assert "(at task.py line" in text


class Stream(smlt.Task):
    """A task of the test module itself: ``data()`` yields ``sizes`` chunks."""

    def __init__(self) -> None:
        self.sizes: tuple[int, ...] = ()
        self.batches: list[torch.Tensor] = []  # every batch loss() was given

    def data(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i, n in enumerate(self.sizes):
            yield chunk(i, n)

    def model(self) -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Linear(8, 3)

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=0.1)

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        self.batches.append(x)
        return torch.nn.functional.cross_entropy(model(x), y)


class InMemory(Stream):
    def data(self) -> Any:
        return chunk(0, 9)


def stream_of(*sizes: int) -> Stream:
    task = Stream()
    task.sizes = sizes
    return task


@pytest.mark.parametrize(
    ("sizes", "got"), [((), "no chunk at all"), ((0, 0), "2 chunks, all of them empty")]
)
def test_an_empty_stream_is_a_task_error(sizes: tuple[int, ...], got: str) -> None:
    with pytest.raises(TaskError, match=rf"Stream.data\(\) .* yielded no samples \({got}\)"):
        check_task(stream_of(*sizes))


def test_the_head_is_the_first_samples_copied_and_the_chunks_replay_from_the_first() -> None:
    data = check_task(stream_of(30, 0, 50, 70))
    assert isinstance(data, StreamData)
    assert data.head.num_samples == HEAD_SAMPLES
    want_x, _ = expected_rows([30, 0, 50, 70])
    assert torch.equal(data.head.tensors[0], want_x[:HEAD_SAMPLES])
    assert data.dtypes == (torch.float32, torch.int64)
    assert data.bytes_per_sample == BYTES_PER_SAMPLE
    assert [c.num_samples for c in data.chunks] == [30, 0, 50, 70]
    assert list(data.chunks) == []  # one-shot, as the generator is
    short = check_task(stream_of(5, 3))
    assert short.head.num_samples == 8  # a stream shorter than a head is all head
    in_memory = check_task(InMemory())
    assert isinstance(in_memory, TaskData) and in_memory.head is in_memory


# --- an IterableDataset -----------------------------------------------------------------------


class Samples(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """``count`` samples, one by one, as the rows of ``chunk(0, count)``; ``bad`` is a sample
    of the wrong shape. Counts what it produced."""

    def __init__(self, count: int, bad: int | None = None, length: int | None = None) -> None:
        self.count, self.bad, self.length, self.produced = count, bad, length, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = chunk(0, self.count)
        for i in range(self.count):
            self.produced += 1
            row = torch.from_numpy(x[i])
            yield (row[:7] if i == self.bad else row), torch.tensor(y[i])

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("no length")
        return self.length


class FromDataset(Stream):
    dataset: Samples = Samples(0)

    def data(self) -> Any:
        return self.dataset


def dataset_task(dataset: Samples) -> FromDataset:
    task = FromDataset()
    task.dataset = dataset
    return task


def test_an_iterable_dataset_is_collated_into_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(smlt.task, "ITERABLE_CHUNK_BYTES", 10 * BYTES_PER_SAMPLE)
    data = check_task(dataset_task(Samples(95)))
    assert isinstance(data, StreamData)
    assert data.declared_samples is None
    assert [c.num_samples for c in data.chunks] == [10] * 9 + [5]  # ten samples a chunk
    x, y = chunk(0, 95)

    body = """
    from torch.utils.data import IterableDataset

    class Rows(IterableDataset):
        def __iter__(self):
            x, y = chunk(0, 95)
            for i in range(95):
                yield torch.from_numpy(x[i]), int(y[i])

    class FromRows(Base):
        def data(self):
            return Rows()
    """
    store = LocalObjectStore(tmp_path / "objects")
    manifest = package_task(
        f"{task_file(tmp_path, body)}:FromRows", store, "rows", shard_bytes=40 * BYTES_PER_SAMPLE
    )
    assert manifest.num_samples == 95
    assert [s.stop - s.start for s in manifest.shards] == [40, 40, 15]
    got_x, got_y = packaged_rows(store, manifest)
    assert torch.equal(got_x, torch.from_numpy(x)) and torch.equal(got_y, torch.from_numpy(y))


def test_a_bad_sample_of_an_iterable_dataset_names_its_chunk_and_samples(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(smlt.task, "ITERABLE_CHUNK_BYTES", 10 * BYTES_PER_SAMPLE)
    # Sample 25 is in the head, read by check_task; sample 125 only when the chunks are.
    with pytest.raises(TaskError, match=r"samples 20 to 29, which could not be stacked"):
        check_task(dataset_task(Samples(300, bad=25)))
    data = check_task(dataset_task(Samples(300, bad=125)))
    assert isinstance(data, StreamData)
    with pytest.raises(TaskError, match=r"samples 120 to 129, which could not be stacked"):
        list(data.chunks)


# --- the client's checks, calibration and plan see the head only ------------------------------


def test_the_client_checks_run_on_the_head_before_any_later_chunk_is_read(
    tmp_path: Path,
) -> None:
    """Chunks after the first refuse to be produced until the task's source is in the store,
    which package_task writes after every check: a check (loss, reduction, update, memory
    measure) that read past the head would fail the packaging."""
    objects = tmp_path / "objects"
    source = objects / "jobs" / "guarded" / "artifact" / "source" / "task.py"
    body = f"""
    class Guarded(Base):
        def data(self):
            for i in range(6):
                if i > 0 and not os.path.exists({str(source)!r}):
                    raise RuntimeError(f"chunk {{i}} was read before packaging began")
                yield chunk(i, 100)
    """
    path = task_file(tmp_path, body)
    manifest = package_task(f"{path}:Guarded", LocalObjectStore(objects), "guarded")
    assert manifest.num_samples == 600
    assert manifest.memory_profile is not None

    # The calibration of a goal, and the plan's profile, read the head alone too.
    task = smlt.task.load_task(f"{path}:Guarded")
    source.unlink()
    assert calibrate(task, 256, samples=64, repeats=1).s_per_sample > 0
    with pytest.raises(TaskError, match="chunk 1 was read before packaging began"):
        list(check_task(task).chunks)  # the guard does guard


def test_calibration_repeats_the_heads_rows_to_fill_a_larger_batch() -> None:
    task = stream_of(40, 40, 40)
    data = check_task(task)
    calibrate(task, 100, data=data, samples=100, repeats=1)
    timed = task.batches[-1]
    head_x = data.head.tensors[0]
    assert timed.shape[0] == 100 and head_x.shape[0] == HEAD_SAMPLES
    assert torch.equal(timed[:HEAD_SAMPLES], head_x)
    assert torch.equal(timed[HEAD_SAMPLES:], head_x[: 100 - HEAD_SAMPLES])
    short = stream_of(10)  # the whole stream is shorter than the batch: no repeats
    calibrate(short, 100, data=check_task(short), samples=100, repeats=1)
    assert short.batches[-1].shape[0] == 10


def test_the_plan_counts_a_generator_by_reading_it_once() -> None:
    task = stream_of(100, 0, 250, 7)
    assert count_samples(check_task(task)) == 357
    profile = profile_task(stream_of(100, 0, 250, 7), rows=16)
    assert profile.num_samples == 357


def test_the_plan_takes_an_iterable_datasets_declared_length_without_reading_it() -> None:
    dataset = Samples(5000, length=5000)
    assert count_samples(check_task(dataset_task(dataset))) == 5000
    assert dataset.produced < 5000  # the head's chunk, not the data set
    unknown = Samples(300)
    assert count_samples(check_task(dataset_task(unknown))) == 300
    assert unknown.produced == 300


def test_the_plan_finds_a_bad_chunk_while_counting() -> None:
    class Bad(Stream):
        def data(self) -> Iterator[Any]:
            yield chunk(0, 70)
            yield chunk(1, 10)[0].astype(np.float64), chunk(1, 10)[1]

    with pytest.raises(TaskError, match=r"chunk 1 \(counting from 0\).*float64"):
        count_samples(check_task(Bad()))


# --- the shard size ---------------------------------------------------------------------------


def test_train_refuses_a_shard_size_below_one_byte() -> None:
    with pytest.raises(ConfigError, match="--shard-mb must be > 0"):
        smlt.train(stream_of(10), shard_bytes=0)


@pytest.mark.parametrize("command", ["train", "plan"])
@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_shard_mb_below_or_at_zero_exits_2_naming_the_flag(
    tmp_path: Path, command: str, value: str
) -> None:
    (tmp_path / "task.py").write_text(PREAMBLE)
    proc, marker = run_smlt([command, "task.py:Base", "--shard-mb", value], tmp_path, 60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: --shard-mb must be > 0"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "objects").exists()
    assert_nothing_left(marker)
