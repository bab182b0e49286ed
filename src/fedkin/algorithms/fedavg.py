"""FedAvg / FedOpt (McMahan et al. 2017; Reddi et al. 2021).

Prior: point mass, θ_i = w for every client.
Local solver: K optimizer steps on L_i from w; message Δ_i = w_i − w.
Population update: w ← ServerOpt(w, −Σ_i p_i Δ_i) (SGD with lr 1 is plain averaging; server
momentum gives FedAvgM, server Adam gives FedAdam).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from fedkin.algorithms.base import Algorithm
from fedkin.core.tree import Tree


class FedAvgConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["fedavg"] = "fedavg"


class FedAvg(Algorithm):
    name = "fedavg"
    supports_dp_sgd = True
    supports_zeroth_order = True
    Config = FedAvgConfig

    def client_update(self, population: Tree, client: Tree, batches, ctx: Tree):
        w = population["global"]
        new, _, loss, dp = self.local_solve(w, self.plain_objective, batches, ctx=ctx)
        return self.delta_message(new, w), client, self.with_dp_steps({"train_loss": loss}, dp)
