"""FedProx (Li et al. 2020).

Prior: Gaussian around the population model, R(θ; w) = μ/2 ‖θ − w‖², used only inside the
local solve (no persistent personal model).
Local solver: K steps on L_i(θ) + μ/2 ‖θ − w‖² from θ = w; message Δ_i = θ − w.
Population update: as FedAvg.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedkin.algorithms.base import Algorithm
from fedkin.core.tree import Tree


class FedProxConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["fedprox"] = "fedprox"
    mu: float = Field(0.01, ge=0, description="proximal strength μ in μ/2‖θ − w‖²")


class FedProx(Algorithm):
    name = "fedprox"
    supports_dp_sgd = True
    supports_zeroth_order = True
    Config = FedProxConfig

    def client_update(self, population: Tree, client: Tree, batches, ctx: Tree):
        w = population["global"]
        objective = self.gaussian_objective(w, self.config.mu)
        new, _, loss, dp = self.local_solve(w, objective, batches, ctx=ctx)
        return self.delta_message(new, w), client, self.with_dp_steps({"train_loss": loss}, dp)
