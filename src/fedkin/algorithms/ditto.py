"""Ditto (Li, Hu, Beirami & Smith 2021).

Prior: Gaussian around the global model, R(v_i; w) = λ/2 ‖v_i − w‖²; personal objective
f_i(v_i) + λ/2 ‖v_i − w‖², global objective Σ_i p_i f_i(w).
Local solver: (global copy) K client-optimizer steps on f_i from w, message Δ_i = w_i − w;
(personal) P steps v_i ← v_i − η(∇f_i(v_i) + λ(v_i − w)) on the same batches, centred at the
received w, with persistent v_i and persistent optimizer state.
Population update: as FedAvg, w ← ServerOpt(w, −Σ_i p_i Δ_i). Personal model: v_i.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedkin.algorithms.base import Algorithm
from fedkin.core.tree import Tree


class DittoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["ditto"] = "ditto"
    lam: float = Field(
        1.0, ge=0, description="λ in λ/2‖v_i − w‖²: 0 gives Local, λ → ∞ gives FedAvg"
    )
    personal_steps: int | None = Field(
        None, ge=1, description="personal steps per round (None: client.local_steps)"
    )


class Ditto(Algorithm):
    name = "ditto"
    Config = DittoConfig
    supports_dp_sgd = True
    supports_zeroth_order = True

    def init_client(self, population: Tree) -> Tree:
        v = population["global"]
        return {"params": v, "opt": self.client_optimizer.init(v)}

    def client_update(self, population: Tree, client: Tree, batches, ctx: Tree):
        w = population["global"]
        new, _, loss, dp_global = self.local_solve(w, self.plain_objective, batches, ctx=ctx)
        v, opt, _, dp_personal = self.local_solve(
            client["params"],
            self.gaussian_objective(w, self.config.lam),
            batches,
            opt_state=client["opt"],
            steps=self.config.personal_steps,
            ctx=ctx,
            noise_tag=1,
        )
        metrics = self.with_dp_steps({"train_loss": loss}, dp_global, dp_personal)
        return self.delta_message(new, w), {"params": v, "opt": opt}, metrics

    def personal_params(self, population: Tree, client: Tree) -> Tree:
        return client["params"]
