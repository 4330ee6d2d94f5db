"""A version's state survives being cut for any number of owners, on a real Redis: parameters,
non-float buffers, and optimizer state, elementwise (per-element arrays) or replicated (slices
of one encoded whole)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smlt.errors import CodecError
from smlt.protocol.model import FlatModel
from smlt.protocol.state import (
    ShardState,
    Version,
    collect_from_store,
    encode_optimizer_state,
    publish_version,
    reshard_store,
)
from smlt.storage.redis_server import RedisServer
from smlt.sync import codec
from smlt.sync.keys import JobKeys
from smlt.sync.store import ParameterStore
from smlt.worker.optim import ShardOptimizer


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.Linear(7, 2)
    )


def _stepped(optimizer: str) -> tuple[FlatModel, Version]:
    """A model after two steps of ``optimizer`` and its whole state (as one owner holds it)."""
    model = _model()
    flat = FlatModel(model)
    model(torch.randn(6, 5)).pow(2).mean().backward()  # changes BatchNorm's buffers too
    if optimizer == "adam":
        owner = ShardOptimizer(torch.optim.Adam(model.parameters()), flat, 0, flat.size)
        for _ in range(2):
            owner.step(flat.gradient(1.0)[: flat.size], flat.has_grad())
        flat.values_numpy()[:] = owner.values_numpy()
        state = owner.state()
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(2):
            opt.step()
        blob = encode_optimizer_state(opt)
        state = ShardState(0, flat.size, blob=blob, blob_total=len(blob))
    version = Version(flat.values_numpy().copy(), flat.discrete_state(), state)
    return flat, version


@pytest.mark.parametrize("optimizer", ["adam", "replicated"])
def test_a_version_resharded_3_to_2_to_4_keeps_every_byte(
    optimizer: str, redis_server: RedisServer, job_id: str
) -> None:
    flat, version = _stepped(optimizer)
    assert flat.discrete_state()["0"] != FlatModel(_model()).discrete_state()["0"]
    store = ParameterStore.from_urls(redis_server.url)
    keys = JobKeys(job_id)
    publish_version(store, keys, 7, version, 3)
    reshard_store(store, keys, 7, 3, 2, flat.size)
    reshard_store(store, keys, 7, 2, 4, flat.size)
    back = collect_from_store(store, keys, 7, 4, flat.size)
    assert np.array_equal(back.values, version.values)
    assert back.buffers == version.buffers  # num_batches_tracked came along
    assert back.optimizer.to_bytes() == version.optimizer.to_bytes()
    # The old sharding's keys are gone: a reader with the wrong count is refused, typed.
    with pytest.raises(CodecError):
        collect_from_store(store, keys, 7, 3, flat.size)


def test_a_frame_of_another_sharding_is_a_typed_error(
    redis_server: RedisServer, job_id: str
) -> None:
    flat, version = _stepped("adam")
    store = ParameterStore.from_urls(redis_server.url)
    keys = JobKeys(job_id)
    publish_version(store, keys, 3, version, 2)
    # Shard 1 as a stale worker of a 3-owner generation would have written it: the right
    # header, the wrong number of values.
    wrong = codec.encode(
        codec.FrameHeader("param", job_id, 3, 1), version.values[: flat.size // 3], {"buffers": {}}
    )
    store.put(1, [(keys.param(3, 1), wrong)], ttl_s=60)
    with pytest.raises(CodecError, match="written under another sharding"):
        collect_from_store(store, keys, 3, 2, flat.size)
