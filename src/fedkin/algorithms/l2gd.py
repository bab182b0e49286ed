"""L2GD / L2SGD (Hanzely & Richtárik 2020), in the simplified form of the Ditto reference code.

Prior: Gaussian around the population model, R(x_i; w) = λ/2 ‖x_i − w‖², with w the (running)
mean of the personal models: min Σ_i f_i(x_i) + λ/2 Σ_i ‖x_i − x̄‖².
Local solver: K steps x_i ← x_i − η(∇f_i(x_i) + λ(x_i − w)) from the persistent x_i (persistent
optimizer state); message Δ_i = x_i − w (the personal model's offset, not a training delta).
Population update: w ← w + ρ Σ_i p_i (x_i − w), i.e. ServerOpt(w, −ρ Δ̄); ρ = K/N in the reference.
Personal model: x_i.

Differences from the original L2GD: there the averaging step is random (probability p) and
scaled by ηλ/(np), and x̄ is the exact mean over all clients; here every round is one local
phase followed by one damped averaging step over the cohort, as in the Ditto code.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedkin.algorithms.base import Algorithm, ServerStep
from fedkin.core.tree import Tree


class L2gdConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["l2gd"] = "l2gd"
    lam: float = Field(1.0, ge=0, description="λ in λ/2‖x_i − w‖² (0: Local)")
    mix_rate: float = Field(
        1.0,
        gt=0,
        le=1,
        description="ρ in w ← w + ρ·avg(x_i − w); the Ditto reference code uses "
        "ρ = K/N = cohort.clients_per_round / data.num_clients",
    )


class L2gd(Algorithm):
    name = "l2gd"
    Config = L2gdConfig
    supports_dp_sgd = True
    supports_zeroth_order = True

    def init_client(self, population: Tree) -> Tree:
        x = population["global"]
        return {"params": x, "opt": self.client_optimizer.init(x)}

    def client_update(self, population: Tree, client: Tree, batches, ctx: Tree):
        w = population["global"]
        x_i, opt, loss, dp = self.local_solve(
            client["params"],
            self.gaussian_objective(w, self.config.lam),
            batches,
            opt_state=client["opt"],
            ctx=ctx,
        )
        metrics = self.with_dp_steps({"train_loss": loss}, dp)
        return self.delta_message(x_i, w), {"params": x_i, "opt": opt}, metrics

    def population_update(self, population: Tree, aggregate: Tree, server: ServerStep) -> Tree:
        return self.server_step(population, aggregate, server, self.config.mix_rate)

    def personal_params(self, population: Tree, client: Tree) -> Tree:
        return client["params"]
