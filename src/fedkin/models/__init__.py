"""Model zoo."""

from fedkin.models.zoo import (
    CNN,
    MLP,
    MODELS,
    CnnConfig,
    LogisticRegression,
    LogRegConfig,
    MlpConfig,
    ModelConfig,
    build_model,
)

__all__ = [
    "CNN",
    "MLP",
    "MODELS",
    "CnnConfig",
    "LogRegConfig",
    "LogisticRegression",
    "MlpConfig",
    "ModelConfig",
    "build_model",
]
