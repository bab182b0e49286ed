"""ADEPT-DGM (AISTATS 2025, arXiv 2402.12537): ADEPT's hierarchical-Bayes prior on the
parameters of a personal diffusion model.

Everything but the loss is ADEPT's (:mod:`fedkin.algorithms.adept`): θ_ik ~ N(μ_k, σ_k²),
σ_k² ~ InvGamma(α, β), client objective

    F_i(θ_i, σ) = L_i(θ_i) + (1/n_i)·[(2α+3) Σ_k log σ_k + ½ Σ_k (2β + (θ_ik − μ_k)²)/σ_k²],

σ stepped at sync steps after the warm-up and clamped to [1e-3, 1e2], μ_i pulled toward θ_i,
μ and σ averaged by the server. L_i is the denoising loss E‖ε − ε_θ(x_t, t)‖²/D of the
conditional DDPM (:mod:`fedkin.models.diffusion`; the diffusion code of ADEPT also divides the
prior by |D_i|). The personal model is θ_i (its client-embedding row included).

Difference from the released code: its "diffusion" is a corrupt-and-predict model
(x̃ = (1 − a)x + a·U[0, 1], predict x); here it is the DDPM with ε-prediction that SPIRE uses,
so the two are compared on the same model. Defaults follow the code's DGM column
(σ init 0.8, η_σ 1e-3, β 1e-5); μ_i takes SGD steps (the code uses Adam with lr 0.1).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedkin.algorithms.adept import SIGMA_MAX, SIGMA_MIN, AdeptAe, AdeptConfig
from fedkin.core.errors import ConfigError
from fedkin.core.tasks import DIFFUSION


class AdeptDgmConfig(AdeptConfig):
    name: Literal["adept-dgm"] = "adept-dgm"  # type: ignore[assignment]
    sigma_init: float = Field(
        0.8,
        ge=SIGMA_MIN,
        le=SIGMA_MAX,
        description="initial prior std σ of every coordinate (ADEPT DGM config: 0.8)",
    )
    beta: float = Field(1e-5, ge=0, description="inverse-gamma scale β (ADEPT DGM's xi: 1e-5)")
    mu_lr: float = Field(
        0.1, gt=0, description="step size η_μ of the client's μ_i ← μ_i − η_μ·2(μ_i − θ_i)"
    )


class AdeptDgm(AdeptAe):
    name = "adept-dgm"
    Config = AdeptDgmConfig
    task = DIFFUSION

    def check_model(self, model) -> None:
        if not getattr(model, "denoises", False):
            raise ConfigError(
                "algorithm.name: 'adept-dgm' trains a personal diffusion model; model.name "
                "must be 'ddpm' (or a model with denoises = True)"
            )
