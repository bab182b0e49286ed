"""Model zoo (``zoo``), the MEL multi-level ensemble (``mel``), linear
dimensionality-reduction models (``linear``: linear autoencoder, PCA projector) and the
conditional DDPM (``diffusion``)."""

from fedkin.models.diffusion import DdpmConfig
from fedkin.models.linear import LinearAeConfig, PcaConfig
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

for _cfg in (MelConfig, LinearAeConfig, PcaConfig, DdpmConfig):  # zoo: in models.zoo
    register_model(_cfg)

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
    "DdpmConfig",
    "LinearAeConfig",
    "LogRegConfig",
    "LogisticRegression",
    "MelConfig",
    "MlpConfig",
    "ModelConfig",
    "PcaConfig",
    "build_model",
]
