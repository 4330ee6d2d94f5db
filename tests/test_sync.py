"""Scatter-reduce and the baselines against real Redis, ranks on threads."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest

from smlt.errors import CodecError, ShardTimeoutError
from smlt.storage.redis_server import RedisServer, connect
from smlt.sync import codec
from smlt.sync.baselines import AllToAll, Centralized
from smlt.sync.exchange import Exchange
from smlt.sync.keys import JobKeys
from smlt.sync.scatter_reduce import ScatterReduce, ShardUpdate
from smlt.sync.shards import shard_offsets, shard_slice
from smlt.sync.store import ParameterStore
from tests.conftest import run_ranks

SCHEMES: list[type[Exchange]] = [ScatterReduce, Centralized, AllToAll]
StoreFactory = Callable[[], ParameterStore]


def _gradients(workers: int, num_params: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((workers, num_params)).astype(np.float32)


def _run(
    scheme: type[Exchange],
    store_factory: StoreFactory,
    job: str,
    grads: np.ndarray,
    iterations: int = 2,
    **kwargs: object,
) -> list[list[np.ndarray]]:
    workers, num_params = grads.shape

    def rank(r: int) -> list[np.ndarray]:
        with scheme(
            store_factory(), job, rank=r, workers=workers, num_params=num_params, **kwargs
        ) as ex:
            return [ex.step(t, grads[r] * (t + 1)).copy() for t in range(iterations)]

    return run_ranks(workers, rank)


@pytest.mark.parametrize("num_params,workers", [(8, 4), (11, 8)])
def test_shard_offsets_cover_the_vector(num_params: int, workers: int) -> None:
    offsets = shard_offsets(num_params, workers)
    assert offsets[0] == 0 and offsets[-1] == num_params
    sizes = np.diff(offsets)
    assert sizes.max() - sizes.min() <= 1
    for s in range(workers):
        sl = shard_slice(num_params, workers, s)
        assert (sl.start, sl.stop) == (offsets[s], offsets[s + 1])


def test_shards_when_fewer_params_than_workers() -> None:
    assert shard_offsets(3, 5) == [0, 1, 2, 3, 3, 3]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.scheme)
@pytest.mark.parametrize("workers", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("num_params", [1001, 3], ids=["P-not-divisible", "P-tiny"])
def test_result_is_the_mean(
    scheme: type[Exchange],
    workers: int,
    num_params: int,
    store_factory: StoreFactory,
    job_id: str,
) -> None:
    grads = _gradients(workers, num_params)
    outputs = _run(scheme, store_factory, job_id, grads)
    for t in range(2):
        expected = (grads * (t + 1)).astype(np.float64).mean(axis=0)
        for r in range(workers):
            np.testing.assert_allclose(outputs[r][t], expected, rtol=1e-6, atol=1e-6)
        # Every worker ends the step with exactly the same vector.
        for r in range(1, workers):
            np.testing.assert_array_equal(outputs[r][t], outputs[0][t])


def test_sharded_store_over_two_instances(
    redis_server: RedisServer, redis_server_b: RedisServer, job_id: str
) -> None:
    grads = _gradients(5, 777)

    def factory() -> ParameterStore:
        return ParameterStore.from_urls([redis_server.url, redis_server_b.url])

    outputs = _run(ScatterReduce, factory, job_id, grads)
    np.testing.assert_allclose(outputs[0][0], grads.mean(axis=0), rtol=1e-6, atol=1e-6)
    # Shards 1 and 3 live on the second instance: its version-2 params are there.
    keys = JobKeys(job_id)
    assert connect(redis_server_b.url).exists(keys.param(2, 1), keys.param(2, 3)) == 2
    assert connect(redis_server.url).exists(keys.param(2, 1)) == 0


def test_update_hook_runs_on_owner_and_extra_values_are_stored(
    store_factory: StoreFactory, job_id: str, redis_server: RedisServer
) -> None:
    workers, num_params = 3, 10
    grads = _gradients(workers, num_params)
    params = np.arange(num_params, dtype=np.float32)
    keys = JobKeys(job_id)

    def rank(r: int) -> np.ndarray:
        def sgd(t: int, shard: int, mean: np.ndarray, sides: object) -> ShardUpdate:
            sl = shard_slice(num_params, workers, shard)
            state = codec.encode(codec.FrameHeader("optim", job_id, t + 1, shard), mean)
            return ShardUpdate(params[sl] - 0.5 * mean, extra=[(keys.optim(t + 1, shard), state)])

        with ScatterReduce(
            store_factory(), job_id, rank=r, workers=workers, num_params=num_params, update=sgd
        ) as ex:
            return ex.step(0, grads[r])

    outputs = run_ranks(workers, rank)
    expected = params - 0.5 * grads.mean(axis=0)
    for out in outputs:
        np.testing.assert_allclose(out, expected, rtol=1e-6)
    client = connect(redis_server.url)
    assert client.exists(*(keys.optim(1, s) for s in range(workers))) == workers


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.scheme)
def test_missing_rank_times_out_naming_it(
    scheme: type[Exchange], store_factory: StoreFactory, job_id: str
) -> None:
    workers, num_params, missing = 3, 30, 2
    grads = _gradients(workers, num_params)
    timeout_s = 1.0

    def rank(r: int) -> float:
        with scheme(
            store_factory(),
            job_id,
            rank=r,
            workers=workers,
            num_params=num_params,
            timeout_s=timeout_s,
        ) as ex:
            started = time.monotonic()
            with pytest.raises(ShardTimeoutError) as info:
                ex.step(0, grads[r])
            assert missing in info.value.missing or info.value.missing == (0,)
            assert "did not arrive within 1 s" in str(info.value)
            return time.monotonic() - started

    # Rank 2 never runs; the others must give up within their bound (plus slack).
    elapsed = run_ranks(workers - 1, rank)
    assert max(elapsed) < timeout_s + 2.5


def test_corrupt_frame_is_a_codec_error_naming_the_key(
    store_factory: StoreFactory, job_id: str
) -> None:
    workers, num_params = 2, 10
    keys = JobKeys(job_id)
    store = store_factory()
    # Rank 1's slice for owner 0 arrives corrupted (a flipped byte in the payload).
    good = codec.encode(codec.FrameHeader("grad", job_id, 0, 0, 1), np.ones(5, np.float32))
    bad = bytearray(good)
    bad[-1] ^= 0x01
    store.put(0, [(keys.grad(0, 0, 1), bytes(bad))], ttl_s=60, announce=(keys.grad_ready(0, 0), 1))
    with ScatterReduce(
        store, job_id, rank=0, workers=workers, num_params=num_params, timeout_s=2
    ) as ex:
        with pytest.raises(CodecError, match=keys.grad(0, 0, 1)):
            ex.step(0, np.zeros(num_params, np.float32))


def test_duplicated_rank_changes_nothing(
    store_factory: StoreFactory, job_id: str, redis_server: RedisServer
) -> None:
    """A second invocation of rank 1 (at-least-once platforms) runs beside the first; results
    and the bytes in the store are those of a run without the duplicate."""
    workers, num_params = 4, 1001
    grads = _gradients(workers, num_params)
    clean = _run(ScatterReduce, store_factory, job_id + "-clean", grads, iterations=1)
    client = connect(redis_server.url)
    clean_params = [client.get(JobKeys(job_id + "-clean").param(1, s)) for s in range(workers)]

    ranks_to_run = [0, 1, 2, 3, 1]  # rank 1 twice, at about the same time

    def invocation(i: int) -> np.ndarray:
        r = ranks_to_run[i]
        with ScatterReduce(
            store_factory(), job_id, rank=r, workers=workers, num_params=num_params, timeout_s=20
        ) as ex:
            return ex.step(0, grads[r]).copy()

    outputs = run_ranks(len(ranks_to_run), invocation)
    # A late duplicate, after the whole step finished, also gets the same result.
    outputs.append(invocation(1))
    for out in outputs:
        np.testing.assert_array_equal(out, clean[0][0])
    # Only the job id in the header differs; the payload bytes are identical.
    keys = JobKeys(job_id)
    for s in range(workers):
        frame = client.get(keys.param(1, s))
        header = codec.FrameHeader("param", job_id, 1, s)
        clean_header = codec.FrameHeader("param", job_id + "-clean", 1, s)
        assert (
            codec.decode(frame, header, "dup").tobytes()
            == codec.decode(clean_params[s], clean_header, "clean").tobytes()
        )


def test_two_jobs_on_one_redis_do_not_see_each_other(
    store_factory: StoreFactory, job_id: str, redis_server: RedisServer
) -> None:
    workers, num_params = 3, 101
    grads_a, grads_b = _gradients(workers, num_params, 1), _gradients(workers, num_params, 2)

    def both(i: int) -> list[np.ndarray]:
        job, grads = (job_id + "-a", grads_a) if i < workers else (job_id + "-b", grads_b)
        with ScatterReduce(
            store_factory(), job, rank=i % workers, workers=workers, num_params=num_params
        ) as ex:
            return [ex.step(t, grads[i % workers]).copy() for t in range(3)]

    outputs = run_ranks(2 * workers, both)
    for i, out in enumerate(outputs):
        grads = grads_a if i < workers else grads_b
        np.testing.assert_allclose(out[-1], grads.mean(axis=0), rtol=1e-6, atol=1e-6)
    client = connect(redis_server.url)
    keys_a = {k.decode() for k in client.scan_iter(JobKeys(job_id + "-a").pattern())}
    assert keys_a and all(k.startswith(f"smlt:{job_id}-a:") for k in keys_a)
    # What a step wrote is dropped one step later: what remains is the last two versions of
    # the params (and their announcements, which a replacement worker reads) and the last
    # step's slices, kept for a replacement or duplicate owner.
    final = JobKeys(job_id + "-a")
    expected = {final.param(v, s) for v in (2, 3) for s in range(workers)}
    expected |= {final.param_ready(2), final.param_ready(3)}
    expected |= {final.grad(2, s, r) for s in range(workers) for r in range(workers) if r != s}
    expected |= {final.grad_ready(2, s) for s in range(workers)}
    assert keys_a == expected


def test_wrong_gradient_shape_is_refused(store_factory: StoreFactory, job_id: str) -> None:
    with ScatterReduce(store_factory(), job_id, rank=0, workers=1, num_params=4) as ex:
        with pytest.raises(ValueError, match="float32 of shape"):
            ex.step(0, np.zeros(5, np.float32))
        with pytest.raises(ValueError, match="float32 of shape"):
            ex.step(0, np.zeros(4, np.float64))
