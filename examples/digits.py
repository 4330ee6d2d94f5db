"""Handwritten digits (8x8, 10 classes) with a small MLP: the quickest end-to-end smlt run.

Run it with::

    smlt train examples/digits.py:Digits --epochs 10 --batch-size 256 --workers 4

scikit-learn's ``load_digits`` has 1797 samples; 25% are held out (fixed split) and ``evaluate``
reports accuracy and loss on them, so the numbers of different runs are comparable.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from smlt.task import Task

TEST_FRACTION = 0.25
SPLIT_SEED = 0
MODEL_SEED = 0


def _split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y
    )
    # Pixels are 0..16; scaling to 0..1 lets plain SGD with lr 0.1 converge in a few epochs.
    return (
        torch.tensor(x_train, dtype=torch.float32) / 16,
        torch.tensor(y_train, dtype=torch.int64),
        torch.tensor(x_test, dtype=torch.float32) / 16,
        torch.tensor(y_test, dtype=torch.int64),
    )


class Digits(Task):
    """64 pixels → 128 hidden units → 10 classes, SGD with momentum."""

    def data(self) -> tuple[torch.Tensor, torch.Tensor]:
        x_train, y_train, _, _ = _split()
        return x_train, y_train

    def model(self) -> torch.nn.Module:
        torch.manual_seed(MODEL_SEED)  # every worker must start from the same weights
        return torch.nn.Sequential(
            torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
        )

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        _, _, x_test, y_test = _split()
        model.eval()
        with torch.no_grad():
            logits = model(x_test)
        model.train()
        return {
            "accuracy": (logits.argmax(dim=1) == y_test).float().mean().item(),
            "loss": torch.nn.functional.cross_entropy(logits, y_test).item(),
        }
