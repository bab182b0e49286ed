"""Local-only training: no collaboration.

Prior: flat (independent clients), R = 0.
Local solver: K optimizer steps on L_i(θ_i) from the client's own persistent θ_i (initialized
from the initial model of the client's architecture group); the client's optimizer state
persists too. No message.
Population update: none.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from fedkin.algorithms.base import Algorithm
from fedkin.core.tree import Tree


class LocalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["local"] = "local"


class Local(Algorithm):
    name = "local"
    supports_dp_sgd = True
    supports_zeroth_order = True
    Config = LocalConfig
    has_global_model = False
    supports_model_groups = True

    def init_client(self, population: Tree) -> Tree:
        theta = self.initial_params()
        return {"params": theta, "opt": self.client_optimizer.init(theta)}

    def client_update(self, population: Tree, client: Tree, batches, ctx: Tree):
        theta, opt, loss, dp = self.local_solve(
            client["params"], self.plain_objective, batches, opt_state=client["opt"], ctx=ctx
        )
        return {}, {"params": theta, "opt": opt}, self.with_dp_steps({"train_loss": loss}, dp)

    def personal_params(self, population: Tree, client: Tree) -> Tree:
        return client["params"]
