"""Randomness for worker-side transforms that does not depend on who draws it.

``Task.transform(batch, epoch, rng)`` augments samples on the worker, after they are read and
before the loss. For n workers x B/n to equal 1 x B, the random draws a sample gets must depend
on the sample and the epoch only: not on the worker it landed on, its position in that worker's
slice, the micro-batch it is computed in, or whether the iteration is run again after a fault.
A generator shared by the batch cannot give that (its k-th draw goes to whichever sample is
k-th). :class:`SampleRandom` gives every sample a stream of its own, keyed by
(seed, epoch, global sample index), and draws a row per sample from each.

The streams are counter-based: draw j of call k for sample i is a SplitMix64 hash of
(key(seed, epoch, i), k, j). Hashing is vectorized over the batch (no per-sample Python), costs
nothing to set up, and gives the same bits on every machine and numpy version. Floats take the
top 24 bits (float32) or 53 bits (float64, for integers and normals), as numpy's generators do.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["SampleRandom"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finalizer (Steele, Lea, Flood 2014), elementwise on uint64 arrays."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # uint64 products wrap, as meant
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _MIX1
        x = (x ^ (x >> np.uint64(27))) * _MIX2
        return x ^ (x >> np.uint64(31))


def _key(*parts: int) -> np.uint64:
    key = np.zeros(1, dtype=np.uint64)
    for part in parts:
        key = _splitmix64(key ^ np.uint64(part % 2**64))
    return key[0]


class SampleRandom:
    """Independent random draws per sample, keyed by (seed, epoch, sample index).

    Every method returns one row per sample of the batch, shape ``(len(batch), *shape)``;
    successive calls give fresh draws. Write a transform as if for one sample and vectorize::

        def transform(self, batch, epoch, rng):
            x, y = batch
            flip = rng.random() < 0.5                       # (b,) bool
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            shift = rng.integers(-4, 5, 2)                  # (b, 2) int64
            ...
            return x, y

    ``seeds`` gives each sample's 63-bit key, for code that wants a ``torch.Generator`` per
    sample (``torch.Generator().manual_seed(int(s))``).
    """

    def __init__(self, seed: int, epoch: int, indices: Sequence[int] | np.ndarray) -> None:
        index = np.asarray(indices, dtype=np.int64).astype(np.uint64)
        self.epoch = epoch
        self._keys = _splitmix64(index ^ _key(seed, epoch))
        self._calls = 0

    def __len__(self) -> int:
        return int(self._keys.size)

    @property
    def seeds(self) -> torch.Tensor:
        """One non-negative int64 per sample, a function of (seed, epoch, index) only."""
        return torch.from_numpy((self._keys >> np.uint64(1)).astype(np.int64))

    def _bits(self, shape: Sequence[int]) -> np.ndarray:
        """Fresh uint64 bits, ``(len(self), *shape)``: the next call's draws."""
        self._calls += 1
        count = math.prod(shape)
        call = _splitmix64(self._keys ^ _key(self._calls))  # (b,)
        draws = np.arange(count, dtype=np.uint64)
        bits = _splitmix64(call[:, None] ^ _splitmix64(draws)[None, :])
        return bits.reshape(len(self), *shape)

    def _uniform(self, shape: Sequence[int]) -> np.ndarray:
        return (self._bits(shape) >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def random(self, *shape: int) -> torch.Tensor:
        """Uniform floats in [0, 1), float32: the top 24 bits, so no draw rounds up to 1.0 (a
        53-bit draw cast to float32 would, about once in 2**25)."""
        top = (self._bits(shape) >> np.uint64(40)).astype(np.float32)
        return torch.from_numpy(top * np.float32(2.0**-24))

    def integers(self, low: int, high: int, *shape: int) -> torch.Tensor:
        """Uniform integers in [low, high), int64."""
        if high <= low:
            raise ValueError(f"integers needs low < high, got [{low}, {high})")
        u = self._uniform(shape)
        return torch.from_numpy(
            np.minimum(low + np.floor(u * (high - low)), high - 1).astype(np.int64)
        )

    def normal(self, *shape: int) -> torch.Tensor:
        """Standard normal floats, float32 (Box-Muller on two uniform draws)."""
        u1 = 1.0 - self._uniform(shape)  # (0, 1]: log is finite
        u2 = self._uniform(shape)
        z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
        return torch.from_numpy(z.astype(np.float32))
