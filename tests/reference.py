"""A plain PyTorch training loop that replays an smlt run: the reference smlt is held to.

smlt promises that n workers x B/n give the parameters of one ordinary PyTorch loop over the
global batch B. This module *is* that ordinary loop, written as a user would write it, with
nothing from smlt but the two public functions that say which samples form each global batch
(:func:`smlt.global_batches`) and how torch is seeded before each loss
(:func:`smlt.iteration_seed`). It must stay obviously correct: no flattening, no sharding, no
gradient scaling, the user's own optimizer over the user's own model.
"""

from __future__ import annotations

import torch

import smlt

__all__ = ["reference_state_dict"]


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
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train(task, epochs=epochs, batch_size=batch_size, seed=seed)
    finally:
        torch.set_num_threads(previous)


def _train(task: smlt.Task, *, epochs: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    raw = task.data()
    assert isinstance(raw, tuple | list), "the reference replays tasks whose data() is tensors"
    data = tuple(torch.as_tensor(x) for x in raw)
    num_samples = len(data[0])
    torch.manual_seed(seed)
    model = task.model()
    optimizer = task.optimizer(model)
    t = 0  # the global iteration, counted across epochs
    for epoch in range(epochs):
        for idx in smlt.global_batches(num_samples, batch_size, seed=seed, epoch=epoch):
            index = torch.from_numpy(idx)
            optimizer.zero_grad()
            torch.manual_seed(smlt.iteration_seed(seed, t))
            task.loss(model, tuple(x[index] for x in data)).backward()
            optimizer.step()
            t += 1
    return {name: value.detach().clone() for name, value in model.state_dict().items()}
