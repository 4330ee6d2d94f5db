"""The precision of the workers' forward pass (``--precision``): float32, or bfloat16 autocast.

Under ``"bf16"`` the user's forward pass and loss run inside
``torch.autocast("cpu", dtype=torch.bfloat16)``: matrix products and convolutions take bfloat16
copies of their inputs, while the ops autocast keeps in float32 (losses, softmax, norms) stay
there. The backward pass runs *outside* the context, as PyTorch's autocast recipe prescribes:
autograd replays each op in the dtype its forward used, and the gradients that reach the
parameters are float32, because the parameters are. Everything smlt keeps is therefore float32
whatever the precision: the flat parameter vector, the gradient it exchanges, the optimizer
state, the checkpoints. Only the arithmetic of the forward and backward passes changes.

bfloat16 keeps float32's exponent (no overflow, so no loss scaling, unlike float16) with an
8-bit mantissa, so it does not promise 1 x B's bits; it does keep smlt's other promise: the CPU
kernels are deterministic for a given thread count, so a re-executed iteration (a replacement
for a killed worker) computes the same bytes as the first execution did.

Whether it is faster depends on the CPU: with AVX-512 BF16 or AMX the matrix products run in
bfloat16 natively; without (AVX2 only), every bfloat16 op converts to float32 and back around
float32 arithmetic and is usually *slower* (``benchmarks/precision.py`` measures it).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from smlt.protocol.payload import PRECISIONS, check_precision

__all__ = ["PRECISIONS", "check_precision", "compute_precision"]


def compute_precision(precision: str) -> contextlib.AbstractContextManager[Any]:
    """The context the user's forward pass and loss run in: bfloat16 autocast on the CPU for
    ``"bf16"``, nothing for ``"fp32"``. Leave it before ``backward()``."""
    if check_precision(precision) == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
