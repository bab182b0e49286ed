"""FedAvg + local fine-tuning (FedAvg-FT).

Prior: point mass θ_i = w during training; the personal model is T fine-tuning steps away from w.
Local solver: K optimizer steps on L_i from w; message Δ_i = w_i − w (exactly FedAvg). In the same
round the client fine-tunes the received w: θ_i = FT_i(w) = T steps of the client optimizer on L_i
from w with fresh optimizer state (on the round's batches), and stores θ_i.
Population update: as FedAvg, w ← ServerOpt(w, −Σ_i p_i Δ_i).

Personal model: FT_i(w) of the global model the client received at its last round (w itself
before its first round). ``adapt`` computes FT_i(w) from the *current* w;
:func:`fedkin.algorithms.adaptation.evaluate_adapted` reports that exact definition.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedkin.algorithms.adaptation import select
from fedkin.algorithms.base import Algorithm
from fedkin.core.tree import Tree


class FedAvgFtConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["fedavg_ft"] = "fedavg_ft"
    finetune_steps: int = Field(
        5,
        ge=0,
        description="T: client-optimizer steps of fine-tuning from the global model on the "
        "client's own data (0: the personal model is the global model)",
    )


class FedAvgFt(Algorithm):
    name = "fedavg_ft"
    Config = FedAvgFtConfig

    def init_client(self, population: Tree) -> Tree:
        return {"params": population["global"], "seen": torch.zeros(())}

    def finetune(self, w: Tree, batches) -> tuple[Tree, torch.Tensor]:
        params, _, loss = self.local_solve(
            w, self.plain_objective, batches, steps=self.config.finetune_steps
        )
        return params, loss

    def client_update(self, population: Tree, client: Tree, batches, ctx: Tree):
        w = population["global"]
        new, _, loss = self.local_solve(w, self.plain_objective, batches)
        personal, _ = self.finetune(w, batches)
        state = {"params": personal, "seen": torch.ones_like(client["seen"])}
        return self.delta_message(new, w), state, {"train_loss": loss}

    def adapt(self, population: Tree, client: Tree, batches, ctx: Tree) -> Tree:
        personal, _ = self.finetune(population["global"], batches)
        return {"params": personal, "seen": torch.ones_like(client["seen"])}

    def personal_params(self, population: Tree, client: Tree) -> Tree:
        if self.config.finetune_steps == 0:
            return population["global"]
        return select(client["seen"], client["params"], population["global"])
