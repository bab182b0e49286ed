"""FedPer (Arivazhagan et al. 2019): shared base layers, personal heads trained jointly.

Prior: θ_i = (φ, h_i) — body φ shared by all clients, head h_i personal (flat prior).
Local solver: K joint steps on L_i(φ, h) over (φ, h) from (φ, h_i); the head's optimizer state
persists, the body's restarts each round. Message Δφ_i = φ_i − φ.
Population update: φ ← ServerOpt(φ, −Σ_i p_i Δφ_i); h_i stays local.
"""

from __future__ import annotations

from typing import Literal

from fedkin.algorithms.bodyhead import BodyHeadAlgorithm, BodyHeadConfig, merge
from fedkin.core.tree import Tree
from fedkin.optim import routed


class FedPerConfig(BodyHeadConfig):
    """FedPer: body and personal head trained jointly; only the body is averaged."""

    name: Literal["fedper"] = "fedper"


class FedPer(BodyHeadAlgorithm):
    name = "fedper"
    Config = FedPerConfig

    def client_update(self, population: Tree, client: Tree, batches, ctx: Tree):
        phi = population["body"]
        opt = self.client_optimizer

        def objective(params: Tree, x, y):
            loss = self.data_loss(merge(params["body"], params["head"]), x, y)
            return loss, loss

        params, state, loss, _ = self.local_solve(
            {"body": phi, "head": client["head"]},
            objective,
            batches,
            optimizer=routed({"body": opt, "head": opt}),
            opt_state={"body": opt.init(phi), "head": client["head_opt"]},
        )
        new_state = {"head": params["head"], "head_opt": state["head"]}
        return self.delta_message(params["body"], phi), new_state, {"train_loss": loss}
