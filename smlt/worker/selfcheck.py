"""One real update of a task, run on the user's machine before any worker is paid for.

The client-side checks of :mod:`smlt.task` call the user's methods; this runs what the workers
will run with them: the model flattened, the optimizer rebuilt over shards as two owners would
(or stepped whole, for an optimizer that is replicated), one step on a tiny batch from the
gradient as the workers flatten it (a sparse gradient made dense here too), and the optimizer
state through its encoding and back. An optimizer that smlt cannot run (a class whose
constructor rejects its own defaults, a state that cannot be stored) then fails here, in seconds,
with its name and cause, rather than on every worker after deployment.
"""

from __future__ import annotations

import torch

from smlt.errors import TaskError
from smlt.protocol.model import FlatModel
from smlt.protocol.state import ShardState, decode_optimizer_state, encode_optimizer_state
from smlt.sync.shards import shard_slice
from smlt.task import Batch, Task
from smlt.worker.optim import ShardOptimizer, is_shardable

__all__ = ["check_update"]

_OWNERS = 2


def check_update(task: Task, batch: Batch, *, seed: int = 0) -> str:
    """Run one smlt update of ``task`` on ``batch``; returns how the optimizer is run
    (``"sharded"`` or ``"replicated"``). Raises TaskError naming the optimizer and the cause."""
    torch.manual_seed(seed)
    model = task.model()
    flat = FlatModel(model)
    optimizer = task.optimizer(model)
    name = type(optimizer).__name__
    mode = "sharded" if is_shardable(optimizer) else "replicated"
    try:
        task.loss(model, batch).backward()
    except Exception as exc:  # check_loss ran it forward already; this is its backward pass
        raise TaskError(
            f"{type(task).__name__}.loss() failed in its backward pass: {type(exc).__name__}: {exc}"
        ) from exc
    names = {id(p): n for n, p in model.named_parameters()}
    sparse = [names[id(p)] for p in flat.params if p.grad is not None and p.grad.is_sparse]
    try:
        grad = flat.gradient(1.0)
        has_grad = flat.has_grad()
        if mode == "sharded":
            for s in range(_OWNERS):
                sl = shard_slice(flat.size, _OWNERS, s)
                owner = ShardOptimizer(optimizer, flat, sl.start, sl.stop)
                owner.step(grad[sl], has_grad)
                state = owner.state()
                owner.load_state(ShardState.from_bytes(state.to_bytes(), "self-check"))
        else:
            flat.load_gradient(grad, has_grad)  # dense, as the workers' mean gradient is
            optimizer.step()
            blob = encode_optimizer_state(optimizer)
            optimizer.load_state_dict(decode_optimizer_state(blob, "self-check"))
    except TaskError:
        raise
    except Exception as exc:
        hint = ""
        if sparse:
            hint = (
                f" ({', '.join(sparse)} made a sparse gradient; smlt's workers sum gradients as "
                "dense vectors, so the optimizer must take dense ones)"
            )
        raise TaskError(
            f"{type(task).__name__}.optimizer() returned a {name}, which smlt's workers cannot "
            f"run ({mode}): {type(exc).__name__}: {exc}{hint}"
        ) from exc
    return mode
