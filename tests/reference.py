"""A plain PyTorch training loop that replays an smlt run: the reference smlt is held to.

smlt promises that n workers x B/n give the parameters of one ordinary PyTorch loop over the
global batch B. This module *is* that ordinary loop, written as a user would write it, with
nothing from smlt but the public functions that say which samples form each global batch
(:func:`smlt.global_batches`, given the packaged data set's shard layout), how torch is seeded
before each loss (:func:`smlt.iteration_seed`), and which random draws a task's ``transform``
gets per sample (:class:`smlt.SampleRandom`). It must stay obviously correct: no flattening,
no sharding, no gradient scaling, the user's own optimizer over the user's own model; the
task's learning-rate schedule and gradient clipping exactly as the PyTorch documentation writes them
(``clip_grad_norm_`` between ``backward()`` and ``step()``, ``scheduler.step()`` after
``optimizer.step()``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import smlt

__all__ = ["ReferenceRun", "reference_run", "reference_state_dict"]


@dataclass(frozen=True)
class ReferenceRun:
    """What the loop ended with, and what it used at every iteration."""

    state: dict[str, torch.Tensor]
    #: The learning rate of param group 0 that each iteration's optimizer step used.
    lrs: list[float]
    #: The global gradient norm each iteration's ``clip_grad_norm_`` returned (before clipping);
    #: empty when the task does not clip.
    grad_norms: list[float]


def reference_state_dict(
    task: smlt.Task, *, epochs: int, batch_size: int, seed: int, threads: int = 1
) -> dict[str, torch.Tensor]:
    """The ``state_dict()`` (parameters and every buffer, integer ones included) after training
    ``task`` for ``epochs`` epochs of global batch ``batch_size``, as
    ``smlt.train(task, epochs=epochs, batch_size=batch_size, seed=seed)`` would at 1 worker.

    Torch runs with ``threads`` intra-op threads, 1 by default as in smlt's local Ray workers
    (Ray sets ``OMP_NUM_THREADS=1`` for a task with a fraction of a CPU): some CPU kernels split
    their sums across threads (BatchNorm's batch statistics do), so the thread count changes the
    float rounding, and a one-worker run is bit-identical only to a reference on as many threads.
    """
    run = reference_run(task, epochs=epochs, batch_size=batch_size, seed=seed, threads=threads)
    return run.state


def reference_run(
    task: smlt.Task,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    threads: int = 1,
    max_iterations: int | None = None,
    shard_sizes: list[int] | None = None,
) -> ReferenceRun:
    """:func:`reference_state_dict`, with the learning rate and gradient norm of every
    iteration; the loop stops after ``max_iterations`` iterations if given. ``shard_sizes``:
    the run's shard layout (``result.json``'s ``data.shard_sizes``) if it has several shards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train(
            task,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            max_iterations=max_iterations,
            shard_sizes=shard_sizes,
        )
    finally:
        torch.set_num_threads(previous)


def _train(
    task: smlt.Task,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    max_iterations: int | None,
    shard_sizes: list[int] | None,
) -> ReferenceRun:
    raw = task.data()
    assert isinstance(raw, tuple | list), "the reference replays tasks whose data() is tensors"
    data = tuple(torch.as_tensor(x) for x in raw)
    num_samples = len(data[0])
    torch.manual_seed(seed)
    model = task.model()
    optimizer = task.optimizer(model)
    scheduler = task.scheduler(optimizer)
    lrs: list[float] = []
    grad_norms: list[float] = []
    t = 0  # the global iteration, counted across epochs
    for epoch in range(epochs):
        batches = smlt.global_batches(
            num_samples, batch_size, seed=seed, epoch=epoch, shard_sizes=shard_sizes
        )
        for idx in batches:
            if t == max_iterations:
                break
            index = torch.from_numpy(idx)
            batch = tuple(x[index] for x in data)
            if type(task).transform is not smlt.Task.transform:
                batch = task.transform(batch, epoch, smlt.SampleRandom(seed, epoch, idx))
            optimizer.zero_grad()
            torch.manual_seed(smlt.iteration_seed(seed, t))
            task.loss(model, batch).backward()
            if task.clip_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), task.clip_grad_norm)
                grad_norms.append(float(norm))
            lrs.append(float(optimizer.param_groups[0]["lr"]))
            optimizer.step()
            if scheduler is not None and task.scheduler_interval == "iteration":
                scheduler.step()
            t += 1
        if scheduler is not None and task.scheduler_interval == "epoch":
            scheduler.step()
    state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    return ReferenceRun(state, lrs, grad_norms)
