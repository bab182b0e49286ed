"""Model zoo (``zoo``) and the MEL multi-level ensemble (``mel``)."""

from typing import Annotated

from pydantic import Field

from fedkin.models.mel import MEL, MelConfig
from fedkin.models.zoo import (
    CNN,
    MLP,
    CnnConfig,
    LogisticRegression,
    LogRegConfig,
    MlpConfig,
    build_model,
)

ModelConfig = Annotated[
    LogRegConfig | MlpConfig | CnnConfig | MelConfig, Field(discriminator="name")
]
MODELS = {"logreg": LogRegConfig, "mlp": MlpConfig, "cnn": CnnConfig, "mel": MelConfig}

__all__ = [
    "CNN",
    "MEL",
    "MLP",
    "MODELS",
    "CnnConfig",
    "LogRegConfig",
    "LogisticRegression",
    "MelConfig",
    "MlpConfig",
    "ModelConfig",
    "build_model",
]
