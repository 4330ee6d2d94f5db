"""The sharded optimizer against the user's optimizer on the whole model, class by class.

For every optimizer smlt shards, three owners stepping their shards must produce exactly the
parameters (and state) the unsharded optimizer produces, including parameters that get no
gradient on some steps (skipped, as PyTorch skips them), and state that round-trips through its
encoding and a re-cut for another number of owners. Plain torch is the reference.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from smlt.errors import TaskError
from smlt.protocol.model import FlatModel
from smlt.protocol.state import ShardState, decode_optimizer_state, encode_optimizer_state
from smlt.sync.shards import shard_slice
from smlt.task import check_loss_reduction, check_model, check_task, load_task
from smlt.worker.optim import ELEMENTWISE_OPTIMIZERS, ShardOptimizer, is_shardable
from smlt.worker.selfcheck import check_update

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
    "Adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01, amsgrad=True),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    "Adamax": lambda p: torch.optim.Adamax(p, lr=0.01),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, initial_accumulator_value=0.1),
    "Adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True),
    "NAdam": lambda p: torch.optim.NAdam(p, lr=0.01),
    "RAdam": lambda p: torch.optim.RAdam(p, lr=0.01),
    "Rprop": lambda p: torch.optim.Rprop(p, lr=0.01),
    "ASGD": lambda p: torch.optim.ASGD(p, lr=0.01, t0=2),
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def test_every_elementwise_class_is_covered() -> None:
    assert {c.__name__ for c in ELEMENTWISE_OPTIMIZERS} == set(OPTIMIZERS)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_three_owners_step_exactly_like_the_whole_optimizer(name: str) -> None:
    make = OPTIMIZERS[name]
    reference = _model()
    ref_opt = make(reference.parameters())
    model = _model()
    flat = FlatModel(model)
    user = make(model.parameters())
    assert is_shardable(user)
    owners = [
        ShardOptimizer(user, flat, sl.start, sl.stop)
        for sl in (shard_slice(flat.size, 3, s) for s in range(3))
    ]
    rng = np.random.default_rng(1)
    for step in range(6):
        grads = [rng.standard_normal(tuple(p.shape)).astype(np.float32) for p in flat.params]
        # The first layer's bias gets no gradient on odd steps: PyTorch skips it then.
        has_grad = [not (i == 1 and step % 2) for i in range(len(flat.params))]
        for p, g, has in zip(reference.parameters(), grads, has_grad, strict=True):
            p.grad = torch.from_numpy(g) if has else None
        ref_opt.step()
        mean = np.concatenate([g.reshape(-1) for g in grads])
        new = np.concatenate([owner.step(mean[owner.lo : owner.hi], has_grad) for owner in owners])
        flat.values_numpy()[:] = new
        if step == 3:  # the state survives encoding, a re-cut for 2 owners, and a re-cut back
            whole = ShardState.concatenate(
                [ShardState.from_bytes(o.state().to_bytes(), "test") for o in owners]
            )
            two = whole.split(flat.size, 2)
            back = ShardState.concatenate(two).split(flat.size, 3)
            for owner, state in zip(owners, back, strict=True):
                owner.sync_from_flat()
                owner.load_state(state)
    expected = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
    assert torch.equal(flat.values, expected), name


def test_adamw_rebuilds_on_this_torch() -> None:
    # AdamW's defaults hold decoupled_weight_decay, which its constructor rejects.
    model = _model()
    flat = FlatModel(model)
    owner = ShardOptimizer(torch.optim.AdamW(model.parameters()), flat, 0, flat.size)
    assert type(owner.optimizer) is torch.optim.AdamW


def test_a_subclass_is_not_sharded() -> None:
    class Mine(torch.optim.SGD):
        pass

    assert not is_shardable(Mine(_model().parameters(), lr=0.1))


def test_replicated_state_round_trips_byte_for_byte() -> None:
    model = _model()
    opt = torch.optim.LBFGS(model.parameters(), history_size=3)
    x = torch.randn(4, 7)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    blob = encode_optimizer_state(opt)
    again = torch.optim.LBFGS(_model().parameters(), history_size=3)
    again.load_state_dict(decode_optimizer_state(blob, "test"))
    assert encode_optimizer_state(again) == blob


TASKS = textwrap.dedent(
    """
    import torch
    from smlt.task import Task

    class Base(Task):
        def data(self):
            g = torch.Generator().manual_seed(0)
            return torch.randn(16, 3, generator=g), torch.randn(16, 1, generator=g)
        def model(self):
            torch.manual_seed(0)
            return torch.nn.Linear(3, 1)
        def optimizer(self, model):
            return torch.optim.AdamW(model.parameters(), lr=0.01)
        def loss(self, model, batch):
            x, y = batch
            return torch.nn.functional.mse_loss(model(x), y)

    class Summed(Base):
        def loss(self, model, batch):
            x, y = batch
            return torch.nn.functional.mse_loss(model(x), y, reduction="sum")

    class SummedDeclared(Summed):
        loss_reduction = "sum"

    class MeanDeclaredSum(Base):
        loss_reduction = "sum"

    class Nonsense(Base):
        loss_reduction = "median"

    class Unstorable(Base):
        def optimizer(self, model):
            return Keeps(model.parameters(), lr=0.1)

    class Keeps(torch.optim.SGD):
        # Not elementwise (a subclass), so replicated, and its state holds a function.
        def step(self, closure=None):
            for p in self.param_groups[0]["params"]:
                self.state[p]["hook"] = print
            return super().step(closure)
    """
)


@pytest.fixture(scope="module")
def task_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tasks") / "reductions.py"
    path.write_text(TASKS)
    return path


def _check(task_file: Path, name: str) -> str:
    task = load_task(f"{task_file}:{name}")
    data = check_task(task)
    check_loss_reduction(task, check_model(task), data)
    return check_update(task, data.rows(0, 2))


def test_self_check_runs_adamw_sharded(task_file: Path) -> None:
    assert _check(task_file, "Base") == "sharded"


def test_an_undeclared_sum_is_refused_on_the_client(task_file: Path) -> None:
    with pytest.raises(TaskError, match=r"sums over its batch.*loss_reduction = 'sum'"):
        _check(task_file, "Summed")
    assert _check(task_file, "SummedDeclared") == "sharded"
    with pytest.raises(TaskError, match=r"averages over its batch.*loss_reduction = 'mean'"):
        _check(task_file, "MeanDeclaredSum")
    with pytest.raises(TaskError, match="must be 'mean'"):
        _check(task_file, "Nonsense")


def test_an_optimizer_state_smlt_cannot_store_fails_on_the_client(task_file: Path) -> None:
    with pytest.raises(TaskError, match=r"Keeps, which smlt's workers cannot run \(replicated\)"):
        _check(task_file, "Unstorable")
