"""ResNet-18 on generated 32x32 colour images: a compute-heavy task with 11 M parameters.

Run it with::

    smlt train examples/resnet18.py:ResNet18 --epochs 3 --batch-size 128 --workers 4

The network is the CIFAR variant (3x3 stem, no max-pool, BasicBlock x [2, 2, 2, 2]) written in
plain torch, so workers need no torchvision. The images are synthetic so nothing is downloaded:
each class has a fixed smooth colour pattern, and every sample is its class pattern plus noise,
which a convolutional net learns in an epoch or two.

Note: the model has BatchNorm, whose batch statistics depend on the per-worker batch; n workers x
B/n is therefore close to, not equal to, one worker x B. Use examples/digits.py for exactness
checks.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from smlt.task import Task

NUM_CLASSES = 10
TRAIN_SAMPLES = 2048
TEST_SAMPLES = 512
IMAGE_SIZE = 32
NOISE_STD = 1.0
DATA_SEED = 0
MODEL_SEED = 0


def make_images(num_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` images (N, 3, 32, 32) and labels (N,); the class patterns never vary."""
    patterns_rng = torch.Generator().manual_seed(DATA_SEED)
    coarse = torch.randn(NUM_CLASSES, 3, 4, 4, generator=patterns_rng)
    patterns = nn.functional.interpolate(coarse, size=IMAGE_SIZE, mode="bilinear")
    rng = torch.Generator().manual_seed(seed)
    labels = torch.randint(NUM_CLASSES, (num_samples,), generator=rng)
    noise = NOISE_STD * torch.randn(num_samples, 3, IMAGE_SIZE, IMAGE_SIZE, generator=rng)
    return patterns[labels] + noise, labels


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (projected when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks_per_stage: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
        )
        stages: list[nn.Module] = []
        in_channels = 64
        for stage, num_blocks in enumerate(blocks_per_stage):
            out_channels = 64 * 2**stage
            for block in range(num_blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                stages.append(BasicBlock(in_channels, out_channels, stride))
                in_channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stages(self.stem(x))
        return self.head(features.mean(dim=(2, 3)))


class ResNet18(Task):
    """ResNet-18 (CIFAR stem) on synthetic images, SGD with momentum and weight decay."""

    def data(self) -> tuple[torch.Tensor, torch.Tensor]:
        return make_images(TRAIN_SAMPLES, seed=1)

    def model(self) -> nn.Module:
        torch.manual_seed(MODEL_SEED)
        return ResNet((2, 2, 2, 2), NUM_CLASSES)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out accuracy and loss, with BatchNorm normalizing by each 128-image test batch.

        Running statistics are per-process buffers, not parameters: they lag behind fast-moving
        weights and are not what data-parallel workers agree on. Batch statistics on a copy of
        the model make the metric depend on the parameters alone (and leave the model as is).
        """
        x, y = make_images(TEST_SAMPLES, seed=2)
        probe = copy.deepcopy(model).train()
        with torch.no_grad():
            logits = torch.cat([probe(chunk) for chunk in x.split(128)])
        return {
            "accuracy": (logits.argmax(dim=1) == y).float().mean().item(),
            "loss": nn.functional.cross_entropy(logits, y).item(),
        }
