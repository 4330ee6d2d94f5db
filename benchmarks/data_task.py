"""The task ``benchmarks/data.py`` trains: small images from a folder of ``.npy`` file pairs.

The folder (``SMLT_BENCH_DATA_DIR``, read only by ``data()``, which runs on the client) holds
``x_000.npy, y_000.npy, ...``: uint8 images of shape (3, 32, 32) and int64 labels, written by
:func:`benchmarks.data.generate`. The model is one linear layer on the image as float / 255, so
that a run measures the input pipeline, not the model.

Two classes, one per contract of ``data()``:

- :class:`StreamingImages` yields one chunk per file pair and never holds more than one file
  (the streaming contract: the client packages shard by shard);
- :class:`InMemoryImages` returns the whole set as two arrays, which is all the code before the
  streaming work (commit acb9d57) accepts: the client then holds the whole dataset, which is the
  cost being measured.

This file is shipped to the workers and imported there on its own, so it needs nothing beside
numpy, torch and smlt.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

import smlt

DATA_DIR_ENV = "SMLT_BENCH_DATA_DIR"
IMAGE_SHAPE = (3, 32, 32)
CLASSES = 10


def _pairs() -> list[tuple[Path, Path]]:
    folder = Path(os.environ[DATA_DIR_ENV])
    xs = sorted(folder.glob("x_*.npy"))
    return [(x, x.with_name("y_" + x.name[2:])) for x in xs]


class _Images(smlt.Task):
    def model(self) -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(int(np.prod(IMAGE_SHAPE)), CLASSES)
        )

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=0.01)

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x.float() / 255.0), y)


class StreamingImages(_Images):
    """One chunk per file pair, read through a memory map and copied out one file at a time."""

    def data(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for x_path, y_path in _pairs():
            x = np.load(x_path, mmap_mode="r")
            y = np.load(y_path, mmap_mode="r")
            yield np.ascontiguousarray(x), np.ascontiguousarray(y)


class InMemoryImages(_Images):
    """The whole set in memory: what the code before streaming sources requires."""

    def data(self) -> tuple[np.ndarray, np.ndarray]:
        pairs = _pairs()
        x = np.concatenate([np.load(xp, mmap_mode="r") for xp, _ in pairs])
        y = np.concatenate([np.load(yp, mmap_mode="r") for _, yp in pairs])
        return x, y
