"""Model zoo: plain ``torch.nn.Module``s, called by the engine through ``functional_call``.

Every model takes one batch ``x`` of shape ``[B, *feature_shape]`` and returns logits
``[B, num_classes]``; the client dimension is added by ``vmap``, never seen by the model.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedkin.registry import MODEL_REGISTRY, register_model


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: logits = W·flatten(x) + b."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    """Fully connected network: flatten → [Linear → ReLU]* → Linear."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (the input of :attr:`classifier`); needs a hidden layer."""
        return self.net[:-1](x.flatten(1))

    @property
    def classifier(self) -> nn.Linear:
        return self.net[-1]


class CNN(nn.Module):
    """Small CNN (FedAvg/PFLlib style): [Conv5×5 → ReLU → MaxPool2]×L → FC → ReLU → FC."""

    def __init__(
        self, image_shape: tuple[int, int, int], channels: list[int], hidden: int, num_classes: int
    ) -> None:
        super().__init__()
        c, h, w = image_shape
        blocks: list[nn.Module] = []
        for out in channels:
            blocks += [nn.Conv2d(c, out, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = out, h // 2, w // 2
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )
        self.image_shape = tuple(image_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(-1, *self.image_shape)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features: the output of the hidden fully connected layer."""
        return self.head[:-1](self.features(x.reshape(-1, *self.image_shape)))

    @property
    def classifier(self) -> nn.Linear:
        return self.head[-1]


class _ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LogRegConfig(_ModelConfig):
    name: Literal["logreg"] = "logreg"

    def build(self, feature_shape: tuple[int, ...], image_shape, num_classes: int) -> nn.Module:
        return LogisticRegression(math.prod(feature_shape), num_classes)


class MlpConfig(_ModelConfig):
    name: Literal["mlp"] = "mlp"
    hidden: list[Annotated[int, Field(gt=0)]] = Field([128], description="hidden layer widths")

    def build(self, feature_shape: tuple[int, ...], image_shape, num_classes: int) -> nn.Module:
        return MLP(math.prod(feature_shape), list(self.hidden), num_classes)


class CnnConfig(_ModelConfig):
    name: Literal["cnn"] = "cnn"
    channels: list[Annotated[int, Field(gt=0)]] = Field(
        [32, 64], min_length=1, description="conv channels per block (5×5 conv, 2×2 max-pool)"
    )
    hidden: int = Field(512, gt=0, description="width of the fully connected layer")

    def build(self, feature_shape: tuple[int, ...], image_shape, num_classes: int) -> nn.Module:
        if image_shape is None:
            from fedkin.core.errors import ConfigError

            raise ConfigError(
                "model.name: 'cnn' needs image data; this dataset is tabular (use mlp)"
            )
        return CNN(tuple(image_shape), list(self.channels), self.hidden, num_classes)


for _cfg in (LogRegConfig, MlpConfig, CnnConfig):
    register_model(_cfg)


def build_model(
    cfg: BaseModel,
    feature_shape: tuple[int, ...],
    image_shape: tuple[int, int, int] | None,
    num_classes: int,
    seed: int,
) -> nn.Module:
    """Build the model with weights drawn from ``seed`` without touching global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODEL_REGISTRY.build(cfg, tuple(feature_shape), image_shape, num_classes)
