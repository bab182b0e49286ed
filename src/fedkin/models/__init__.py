"""Model zoo (``zoo``) and the MEL multi-level ensemble (``mel``)."""

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
from fedkin.registry import MODEL_REGISTRY, register_model

register_model(MelConfig)  # the zoo's models register in fedkin.models.zoo

#: A model's config: any registered model (``fedkin.register_model``).
ModelConfig = MODEL_REGISTRY.field
#: name → config class of every registered model (built-ins and plugins).
MODELS = MODEL_REGISTRY

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
