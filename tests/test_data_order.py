"""The shard-aware sample order and per-sample transform randomness, as pure logic.

What is shown (the training runs that hold smlt to a plain PyTorch loop on these orders are in
tests/test_data_pipeline.py):

- the global batch of every iteration is the same for n in {1, 2, 3, 5}: the ranks' slices,
  concatenated in rank order, are the batch ``smlt.global_batches`` names; every epoch visits
  every sample once, and epochs differ;
- a worker reads a fraction of the shards per epoch (at most 18 of 64 at n = 4, where a global
  permutation makes every worker read all 64), and ``worker_shards`` names exactly the shards its
  indices fall in, in the order it first needs them;
- a sampler built at iteration t (a resume, a re-scale, a replacement) gives what one that
  walked from 0 gives;
- the shuffle's quality on single-class shards is the README's table, and a worker of a 5 GB set
  reads the README's number of shards an iteration;
- ``SampleRandom``'s draws depend on (seed, epoch, index) only: not on the other samples of the
  batch or their order; they change with the epoch and seed; their distributions are right;
- ``check_transform`` refuses a transform that draws from torch's global generator or mixes
  samples, naming the task's method.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import smlt
from smlt.errors import ConfigError, TaskError
from smlt.task import check_transform, load_task, run_transform
from smlt.worker.sampler import STREAMS, WINDOW_SHARDS, GlobalBatchSampler

SIZES = [37] * 9 + [11]  # 344 samples in 10 shards, the last one short
BATCH = 40  # 9 iterations an epoch, the last of 24 samples


def _batches(n: int, epochs: int, sizes: list[int] = SIZES, batch: int = BATCH) -> list[np.ndarray]:
    """Every global batch of ``epochs`` epochs, as the n ranks' slices put back together."""
    sampler = GlobalBatchSampler(sum(sizes), batch, seed=7, shard_sizes=sizes)
    out = []
    for t in range(epochs * sampler.iterations_per_epoch):
        slices = [sampler.worker_indices(t, r, n) for r in range(n)]
        assert {size for _, size in slices} == {len(sampler.global_batch(t))}
        out.append(np.concatenate([indices for indices, _ in slices]))
    return out


def test_the_global_batch_is_the_same_for_every_number_of_workers() -> None:
    expected = [
        b
        for epoch in range(2)
        for b in smlt.global_batches(sum(SIZES), BATCH, seed=7, epoch=epoch, shard_sizes=SIZES)
    ]
    assert [len(b) for b in expected] == [40] * 8 + [24] + [40] * 8 + [24]
    for n in (1, 2, 3, 5):
        got = _batches(n, 2)
        assert len(got) == len(expected)
        for t, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert np.array_equal(a, b), f"n={n}: global batch {t} differs"
    per_epoch = len(expected) // 2
    for epoch in range(2):
        seen = np.concatenate(expected[epoch * per_epoch : (epoch + 1) * per_epoch])
        assert np.array_equal(np.sort(seen), np.arange(sum(SIZES))), "not every sample once"
    assert not np.array_equal(expected[0], expected[per_epoch]), "epoch 1 repeats epoch 0"


def test_the_order_depends_on_the_seed_and_the_shard_layout() -> None:
    one = smlt.global_batches(344, BATCH, seed=7, epoch=0, shard_sizes=SIZES)
    other_seed = smlt.global_batches(344, BATCH, seed=8, epoch=0, shard_sizes=SIZES)
    one_shard = smlt.global_batches(344, BATCH, seed=7, epoch=0)
    assert not np.array_equal(one[0], other_seed[0])
    assert not np.array_equal(one[0], one_shard[0])
    again = smlt.global_batches(344, BATCH, seed=7, epoch=0, shard_sizes=SIZES)
    assert all(np.array_equal(a, b) for a, b in zip(one, again, strict=True))


@pytest.mark.parametrize(
    ("sizes", "problem"),
    [([100, 200], "add up to 300"), ([344, 0], "positive"), ([], "positive")],
)
def test_a_shard_layout_that_does_not_fit_the_data_set_is_refused(
    sizes: list[int], problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        GlobalBatchSampler(344, BATCH, seed=0, shard_sizes=sizes)


def test_a_worker_reads_a_fraction_of_the_shards_each_epoch() -> None:
    """64 shards of 100 samples, B = 256: each of 4 workers reads 1/4 of the epoch's order, a
    contiguous run of 1,600 samples, which spans at most 9 windows of 2 shards: 18 shards. A
    global permutation (what smlt did before) makes every worker read all 64."""
    sizes = [100] * 64
    sampler = GlobalBatchSampler(6400, 256, seed=1, shard_sizes=sizes)
    assert (STREAMS, WINDOW_SHARDS) == (16, 2), "the bound below assumes these"
    for epoch in range(3):
        first = epoch * sampler.iterations_per_epoch
        stop = first + sampler.iterations_per_epoch
        per_worker = [set(sampler.worker_shards(first, stop, r, 4)) for r in range(4)]
        assert max(len(s) for s in per_worker) <= 18, [len(s) for s in per_worker]
        assert set().union(*per_worker) == set(range(64))
    permutation = np.random.default_rng(0).permutation(6400)
    old_rank0 = {int(i) // 100 for t in range(25) for i in permutation[t * 256 : t * 256 + 64]}
    assert len(old_rank0) == 64


def test_worker_shards_are_the_shards_of_its_indices_in_order_of_first_use() -> None:
    sampler = GlobalBatchSampler(sum(SIZES), BATCH, seed=3, shard_sizes=SIZES)
    starts = np.cumsum([0, *SIZES])
    for n, rank in ((1, 0), (3, 1), (5, 4)):
        expected: list[int] = []
        for t in range(4, 13):  # across the epoch boundary
            indices, _ = sampler.worker_indices(t, rank, n)
            for shard in np.searchsorted(starts, indices, side="right") - 1:
                if int(shard) not in expected:
                    expected.append(int(shard))
        assert sampler.worker_shards(4, 13, rank, n) == expected


def test_a_sampler_started_mid_epoch_continues_the_same_order() -> None:
    """What a resumed, re-scaled or replacement worker does: build the sampler and ask for
    iteration t first."""
    walked = GlobalBatchSampler(sum(SIZES), BATCH, seed=7, shard_sizes=SIZES)
    history = [walked.global_batch(t) for t in range(20)]
    for t in (5, 9, 13, 19):
        fresh = GlobalBatchSampler(sum(SIZES), BATCH, seed=7, shard_sizes=SIZES)
        assert np.array_equal(fresh.global_batch(t), history[t])
        assert np.array_equal(fresh.global_batch(t - 5), history[t - 5])  # and back again


def _label_distance(batches: list[np.ndarray], labels: np.ndarray, classes: int) -> float:
    """Mean total-variation distance between each batch's label histogram and the data set's."""
    whole = np.bincount(labels, minlength=classes) / len(labels)
    return float(
        np.mean(
            [
                0.5 * np.abs(np.bincount(labels[b], minlength=classes) / len(b) - whole).sum()
                for b in batches
            ]
        )
    )


@pytest.mark.parametrize(
    ("shards", "classes", "shard_aware", "permutation"),
    [
        (32, 10, 0.051, 0.072),
        (32, 100, 0.099, 0.140),
        (128, 10, 0.204, 0.075),
        (128, 100, 0.671, 0.234),
        (640, 10, 0.206, 0.075),
        (640, 100, 0.718, 0.250),
    ],
)
def test_the_shuffle_on_single_class_shards_is_the_readmes_table(
    shards: int, classes: int, shard_aware: float, permutation: float
) -> None:
    """The worst case for a shard-aware shuffle: every shard of 250 samples holds one class.
    Up to C x W = 32 shards the order is as good as a global permutation; beyond, a batch
    mixes at most 32 shards. The README's table is these figures (seed 0, epoch 0, B = 256)."""
    n = shards * 250
    labels = np.repeat(np.arange(shards) % classes, 250)
    new = smlt.global_batches(n, 256, seed=0, epoch=0, shard_sizes=[250] * shards)
    full = smlt.global_batches(n, 256, seed=0, epoch=0)  # one shard: a global permutation
    none = [np.arange(s, min(s + 256, n)) for s in range(0, n, 256)]
    assert _label_distance(new, labels, classes) == pytest.approx(shard_aware, abs=6e-4)
    assert _label_distance(full, labels, classes) == pytest.approx(permutation, abs=6e-4)
    assert _label_distance(none, labels, classes) > 0.75


def test_a_worker_of_a_5_gb_set_reads_the_readmes_shards_an_iteration() -> None:
    """1.7 M samples of 3 KB in shards of 64 MiB (21,845 samples), B = 4,096: at most 10 shards
    an iteration for a worker of 4, 34 for a worker alone (what its disk cache must hold)."""
    sizes = [21_845] * 77 + [1_700_000 - 77 * 21_845]
    sampler = GlobalBatchSampler(1_700_000, 4096, seed=3, shard_sizes=sizes)
    for workers, most in ((4, 10), (1, 34)):
        counts = [
            len(sampler.worker_shards(t, t + 1, 0, workers))
            for t in range(0, sampler.iterations_per_epoch, 5)
        ]
        assert max(counts) == most, (workers, max(counts))


# -- SampleRandom ------------------------------------------------------------------------------


def test_a_sample_draws_the_same_whatever_else_is_in_its_batch() -> None:
    whole = smlt.SampleRandom(5, 2, [3, 7, 11, 19])
    part = smlt.SampleRandom(5, 2, [19, 7])
    a, b = whole.random(3), part.random(3)
    assert a.shape == (4, 3) and a.dtype == torch.float32
    assert torch.equal(a[[3, 1]], b)
    assert torch.equal(whole.integers(0, 10, 2)[[3, 1]], part.integers(0, 10, 2))
    assert torch.equal(whole.normal()[[3, 1]], part.normal())
    assert torch.equal(whole.seeds[[3, 1]], part.seeds)
    assert not torch.equal(whole.random(3), a), "a second call repeats the first"


def test_uniform_draws_never_reach_one() -> None:
    """The largest 64-bit draw there is maps below 1.0 in float32 (a 53-bit float64 rounded to
    float32 would give 1.0)."""
    rng = smlt.SampleRandom(0, 0, [0])
    rng._bits = lambda shape: np.full((1, *shape), np.iinfo(np.uint64).max, dtype=np.uint64)
    top = rng.random(4)
    assert top.dtype == torch.float32 and float(top.max()) < 1.0


def test_draws_change_with_the_epoch_and_the_seed() -> None:
    base = smlt.SampleRandom(5, 0, range(64)).random()
    assert not torch.equal(base, smlt.SampleRandom(5, 1, range(64)).random())
    assert not torch.equal(base, smlt.SampleRandom(6, 0, range(64)).random())
    assert torch.equal(base, smlt.SampleRandom(5, 0, range(64)).random())


def test_the_draws_have_the_distributions_they_name() -> None:
    rng = smlt.SampleRandom(0, 0, range(20_000))
    u = rng.random()
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    k = rng.integers(-2, 3)
    assert set(k.tolist()) == {-2, -1, 0, 1, 2}
    assert np.all(np.abs(np.bincount(k.numpy() + 2) / 20_000 - 0.2) < 0.015)
    z = rng.normal()
    assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1) < 0.03
    with pytest.raises(ValueError, match="low < high"):
        rng.integers(3, 3)
    assert int(rng.seeds.min()) >= 0


# -- check_transform -------------------------------------------------------------------------

TRANSFORMS = textwrap.dedent(
    '''
    import torch
    import smlt


    class Base(smlt.Task):
        def data(self):
            return torch.arange(24.0).reshape(8, 3), torch.arange(8)

        def model(self):
            torch.manual_seed(0)
            return torch.nn.Linear(3, 1)

        def optimizer(self, model):
            return torch.optim.SGD(model.parameters(), lr=0.1)

        def loss(self, model, batch):
            return model(batch[0]).square().mean()


    class Noise(Base):
        def transform(self, batch, epoch, rng):
            x, y = batch
            return x + rng.normal(3), y


    class GlobalRandom(Base):
        """Draws from torch's global generator: a re-executed iteration would differ."""

        def transform(self, batch, epoch, rng):
            x, y = batch
            return x + torch.rand(x.shape), y


    class BatchStatistics(Base):
        """Normalizes by the batch's mean: a sample's output depends on its neighbours."""

        def transform(self, batch, epoch, rng):
            x, y = batch
            return x - x.mean(0), y


    class DropsRows(Base):
        def transform(self, batch, epoch, rng):
            return tuple(t[:1] for t in batch)


    class NotATuple(Base):
        def transform(self, batch, epoch, rng):
            return batch[0]
    '''
)


@pytest.fixture(scope="module")
def transforms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("transforms") / "transforms.py"
    path.write_text(TRANSFORMS)
    return path


def _head(path: Path) -> tuple[torch.Tensor, ...]:
    return tuple(torch.as_tensor(t) for t in load_task(f"{path}:Base").data())


def test_a_per_sample_transform_passes_and_changes_the_samples(transforms: Path) -> None:
    task = load_task(f"{transforms}:Noise")
    head = _head(transforms)
    out = check_transform(task, head, seed=0)
    assert out[0].shape == (4, 3) and not torch.equal(out[0], head[0][:4])
    assert torch.equal(out[1], head[1][:4])
    plain = load_task(f"{transforms}:Base")
    assert check_transform(plain, head, seed=0) is head  # no transform: nothing run


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("GlobalRandom", "draw all randomness from the rng"),
        ("BatchStatistics", "treat each sample on its own"),
        ("DropsRows", "keeps one row per sample"),
        ("NotATuple", "expected a tuple of tensors"),
    ],
)
def test_a_transform_that_breaks_a_rule_is_refused_naming_it(
    transforms: Path, name: str, message: str
) -> None:
    with pytest.raises(TaskError, match=message) as caught:
        check_transform(load_task(f"{transforms}:{name}"), _head(transforms), seed=0)
    assert f"{name}.transform() in task file" in str(caught.value)


def test_a_transform_that_raises_is_a_task_error(transforms: Path) -> None:
    task = load_task(f"{transforms}:Noise")
    with pytest.raises(TaskError, match="Noise.transform"):
        run_transform(task, (torch.zeros(2, 5), torch.zeros(2)), 0, smlt.SampleRandom(0, 0, [0, 1]))
