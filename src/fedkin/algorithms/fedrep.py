"""FedRep (Collins et al. 2021): shared representation, personal heads trained first.

Prior: θ_i = (φ, h_i) — body φ shared by all clients, head h_i personal (flat prior).
Local solver: h_i ← ``head_steps`` steps on L_i(φ, h) over h (φ fixed, h_i's optimizer state
persists); then φ_i ← ``body_steps`` steps on L_i(φ, h_i) over φ from φ (h_i fixed).
Message Δφ_i = φ_i − φ. Population update: φ ← ServerOpt(φ, −Σ_i p_i Δφ_i); h_i stays local.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedkin.algorithms.bodyhead import BodyHeadAlgorithm, BodyHeadConfig, merge
from fedkin.core.tree import Tree


class FedRepConfig(BodyHeadConfig):
    """FedRep: personal heads (trained first, body fixed), then the shared body is trained."""

    name: Literal["fedrep"] = "fedrep"
    head_steps: int = Field(
        10,
        ge=0,
        description="local steps on the head per round (body fixed); the reference code uses "
        "local_ep − local_rep_ep = 9–10 head epochs per body epoch",
    )
    body_steps: int | None = Field(
        None,
        ge=0,
        description="local steps on the body per round (head fixed); None: client.local_steps",
    )


class FedRep(BodyHeadAlgorithm):
    name = "fedrep"
    Config = FedRepConfig

    def client_update(self, population: Tree, client: Tree, batches, ctx: Tree):
        phi = population["body"]

        def head_objective(head: Tree, x, y):
            loss = self.data_loss(merge(phi, head), x, y)
            return loss, loss

        head, head_opt, _, _ = self.local_solve(
            client["head"],
            head_objective,
            batches,
            opt_state=client["head_opt"],
            steps=self.config.head_steps,
        )

        def body_objective(body: Tree, x, y):
            loss = self.data_loss(merge(body, head), x, y)
            return loss, loss

        body, _, loss, _ = self.local_solve(
            phi, body_objective, batches, steps=self.config.body_steps
        )
        state = {"head": head, "head_opt": head_opt}
        return self.delta_message(body, phi), state, {"train_loss": loss}
