"""A small transformer encoder that learns whether a marker token occurs in a sequence.

Run it with::

    smlt train examples/transformer.py:Transformer --epochs 5 --batch-size 128 --workers 4

or, the recipe transformers are usually trained with (AdamW, a linear warm-up into a cosine
decay, gradients clipped to norm 1)::

    smlt train examples/transformer.py:TransformerWarmupCosine \\
        --epochs 5 --batch-size 128 --workers 2

Sequences of 32 tokens from a vocabulary of 32; token 1 is the marker and appears (once, at a
random position) in half of them. The label is whether it appears, a rule that needs attention
over the whole sequence but is learned within a few epochs. Data are generated from fixed seeds.
"""

from __future__ import annotations

import torch
from torch import nn

from smlt.task import Task

VOCAB_SIZE = 32
SEQUENCE_LENGTH = 32
MARKER_TOKEN = 1
FIRST_PLAIN_TOKEN = 2  # 0 is reserved (padding), 1 is the marker
TRAIN_SAMPLES = 4096
TEST_SAMPLES = 1024
D_MODEL = 64
NUM_HEADS = 4
NUM_LAYERS = 2
MODEL_SEED = 0


def make_sequences(num_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (N, 32) int64 and labels (N,) int64: 1 iff the marker token occurs."""
    rng = torch.Generator().manual_seed(seed)
    tokens = torch.randint(
        FIRST_PLAIN_TOKEN, VOCAB_SIZE, (num_samples, SEQUENCE_LENGTH), generator=rng
    )
    labels = torch.randint(2, (num_samples,), generator=rng)
    positions = torch.randint(SEQUENCE_LENGTH, (num_samples,), generator=rng)
    rows = torch.nonzero(labels).squeeze(1)
    tokens[rows, positions[rows]] = MARKER_TOKEN
    return tokens, labels


class MarkerClassifier(nn.Module):
    """Token + learned position embeddings → TransformerEncoder → mean pool → 2 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, D_MODEL)
        self.position = nn.Parameter(0.02 * torch.randn(SEQUENCE_LENGTH, D_MODEL))
        layer = nn.TransformerEncoderLayer(
            D_MODEL, NUM_HEADS, dim_feedforward=4 * D_MODEL, dropout=0.0, batch_first=True
        )
        # The nested-tensor fast path only matters for padded batches, which we never have.
        self.encoder = nn.TransformerEncoder(layer, NUM_LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(D_MODEL, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embed(tokens) + self.position)
        return self.head(hidden.mean(dim=1))


class Transformer(Task):
    """Two encoder layers, d_model 64, Adam."""

    def data(self) -> tuple[torch.Tensor, torch.Tensor]:
        return make_sequences(TRAIN_SAMPLES, seed=1)

    def model(self) -> nn.Module:
        torch.manual_seed(MODEL_SEED)
        return MarkerClassifier()

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        tokens, labels = batch
        return nn.functional.cross_entropy(model(tokens), labels)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        tokens, labels = make_sequences(TEST_SAMPLES, seed=2)
        model.eval()
        with torch.no_grad():
            logits = model(tokens)
        model.train()
        return {
            "accuracy": (logits.argmax(dim=1) == labels).float().mean().item(),
            "loss": nn.functional.cross_entropy(logits, labels).item(),
        }


#: The run :class:`TransformerWarmupCosine`'s schedule is laid out for (the docstring's command):
#: a schedule spans a number of optimizer steps, so it must know the run's length. A run longer
#: than the schedule is refused before it starts; a shorter one ends part-way down the cosine.
EPOCHS = 5
BATCH_SIZE = 128
TOTAL_STEPS = EPOCHS * -(-TRAIN_SAMPLES // BATCH_SIZE)  # iterations: epochs x ceil(N / B)
WARMUP_STEPS = TOTAL_STEPS // 10


class TransformerWarmupCosine(Transformer):
    """The same model under AdamW, 10% linear warm-up then cosine decay, clipped to norm 1."""

    clip_grad_norm = 1.0

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)

    def scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        warmup = torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=0.1, total_iters=WARMUP_STEPS
        )
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=TOTAL_STEPS - WARMUP_STEPS
        )
        return torch.optim.lr_scheduler.SequentialLR(
            optimizer, [warmup, cosine], milestones=[WARMUP_STEPS]
        )
