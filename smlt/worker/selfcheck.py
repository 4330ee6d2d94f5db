"""One real update of a task, run on the user's machine before any worker is paid for.

The client-side checks of :mod:`smlt.task` call the user's methods; this runs what the workers
will run with them: the model flattened, the optimizer rebuilt over shards as two owners would
(or stepped whole, for an optimizer that is replicated), one step on a tiny batch from the
gradient as the workers flatten it (a sparse gradient made dense here too), clipped by its global
norm if the task asks for it, with the learning rate (and whatever else) the task's schedule
sets, and the optimizer state through its encoding and back; then the schedule steps on, through
the whole run when its length is known. An optimizer that smlt cannot run (a class whose
constructor rejects its own defaults, a state that cannot be stored), a schedule that cannot
last the run or a clip norm that is not a positive number then fails here, in seconds, with its
name and cause, rather than on every worker after deployment. The forward pass runs under the
run's precision, as the workers' does, so an op that has no bfloat16 kernel fails here too.
"""

from __future__ import annotations

import torch

from smlt.errors import TaskError
from smlt.protocol.model import FlatModel
from smlt.protocol.state import ShardState, decode_optimizer_state, encode_optimizer_state
from smlt.sync.shards import shard_slice
from smlt.task import Batch, Task, clip_grad_norm
from smlt.worker.clipping import clip_, norm_pieces, piece_norms, total_norm
from smlt.worker.optim import ShardOptimizer, is_shardable
from smlt.worker.precision import check_precision, compute_precision
from smlt.worker.schedule import Schedule, apply_hyperparameters

__all__ = ["check_update"]

_OWNERS = 2


def check_update(
    task: Task,
    batch: Batch,
    *,
    seed: int = 0,
    iterations: int | None = None,
    iterations_per_epoch: int | None = None,
    precision: str = "fp32",
) -> str:
    """Run one smlt update of ``task`` on ``batch``; returns how the optimizer is run
    (``"sharded"`` or ``"replicated"``). Raises TaskError naming the optimizer, the schedule
    or the clip norm, and the cause.

    With ``iterations`` (the run's length) and ``iterations_per_epoch``, the task's schedule is
    then stepped through every iteration of the run, as the workers will step it (a OneCycleLR
    whose ``total_steps`` is shorter than the run fails here); without, once. ``precision``
    (``"bf16"``: the forward pass and loss under bfloat16 autocast) is the run's.
    """
    precision = check_precision(precision)
    clip_norm = clip_grad_norm(task)
    torch.manual_seed(seed)
    model = task.model()
    flat = FlatModel(model)
    optimizer = task.optimizer(model)
    name = type(optimizer).__name__
    mode = "sharded" if is_shardable(optimizer) else "replicated"
    owners = []
    if mode == "sharded":
        owners = [
            (sl, ShardOptimizer(optimizer, flat, sl.start, sl.stop))
            for sl in (shard_slice(flat.size, _OWNERS, s) for s in range(_OWNERS))
        ]
    # The workers' schedule: over the user's optimizer when owners step rebuilt ones, over an
    # optimizer of its own when the user's steps.
    driver = optimizer if mode == "sharded" else task.optimizer(model)
    per_epoch = iterations_per_epoch or iterations or 1  # unknown: the run is one epoch
    schedule = Schedule(task, driver, iterations_per_epoch=per_epoch)
    # check_loss ran the forward pass in float32 already; this one is in the workers' precision.
    under = "" if precision == "fp32" else f" under --precision {precision}"
    try:
        with compute_precision(precision):
            loss = task.loss(model, batch)
    except Exception as exc:
        where, hint = "", ""
        if precision == "bf16":
            where = " (its forward pass in torch.autocast('cpu', dtype=torch.bfloat16))"
            hint = (
                ". Run with --precision fp32, or keep that op in float32: call it on .float() "
                "inputs inside torch.autocast('cpu', enabled=False)"
            )
        raise TaskError(
            f"{type(task).__name__}.loss() failed{under}{where}: {type(exc).__name__}: {exc}{hint}"
        ) from exc
    try:
        loss.backward()
    except Exception as exc:
        raise TaskError(
            f"{type(task).__name__}.loss() failed in its backward pass{under}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    names = {id(p): n for n, p in model.named_parameters()}
    sparse = [names[id(p)] for p in flat.params if p.grad is not None and p.grad.is_sparse]
    try:
        grad = flat.gradient(1.0)
        has_grad = flat.has_grad()
        hyper = schedule.hyperparameters(0)
        if mode == "sharded":
            norms = [
                piece_norms(grad[sl], sl.start, norm_pieces(flat, sl.start, sl.stop, has_grad))
                for sl, _owner in owners
            ]
            for sl, owner in owners:
                if clip_norm is not None:
                    clip_(grad[sl], sl.start, flat, total_norm(norms), clip_norm)
                owner.set_hyperparameters(hyper)
                owner.step(grad[sl], has_grad)
                state = owner.state()
                owner.load_state(ShardState.from_bytes(state.to_bytes(), "self-check"))
        else:
            pieces = norm_pieces(flat, 0, flat.size, has_grad, whole=True)
            if clip_norm is not None:
                clip_(grad, 0, flat, total_norm([piece_norms(grad, 0, pieces)]), clip_norm)
            flat.load_gradient(grad, has_grad)  # dense, as the workers' mean gradient is
            apply_hyperparameters(optimizer, hyper)
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
    # The schedule through the run (the last iteration's learning rate is the last one a worker
    # needs), or one step when the run's length is unknown.
    schedule.lr(iterations - 1 if iterations else per_epoch)
    return mode
