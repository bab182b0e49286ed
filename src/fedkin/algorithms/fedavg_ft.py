"""FedAvg + local fine-tuning (FedAvg-FT).

Prior: point mass θ_i = w during training; the personal model is T fine-tuning steps away from w.
Local solver: K optimizer steps on L_i from w; message Δ_i = w_i − w (exactly FedAvg).
Population update: as FedAvg, w ← ServerOpt(w, −Σ_i p_i Δ_i).
Personal model (``adapt``, at evaluation): θ_i = FT_i(w) = T steps of the client optimizer on L_i
from the *current* w with fresh optimizer state. No per-client state persists. With
``finetune_layers`` only those modules' parameters move (partial fine-tuning, e.g. the last
layer); the rest stay at w.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedkin.algorithms.base import Algorithm
from fedkin.algorithms.bodyhead import head_parameter_names, split
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
    finetune_layers: list[str] | None = Field(
        None,
        description="module names (model.named_modules()) whose parameters are fine-tuned, "
        "e.g. [unet.conv_out] for the DDPM's last layer; None: every parameter",
    )


class FedAvgFt(Algorithm):
    name = "fedavg_ft"
    Config = FedAvgFtConfig
    supports_dp_sgd = True
    supports_zeroth_order = True

    def client_update(self, population: Tree, client: Tree, batches, ctx: Tree):
        w = population["global"]
        new, _, loss, dp = self.local_solve(w, self.plain_objective, batches, ctx=ctx)
        return self.delta_message(new, w), client, self.with_dp_steps({"train_loss": loss}, dp)

    def __init__(self, config, model, client_optimizer, local_steps) -> None:
        super().__init__(config, model, client_optimizer, local_steps)
        layers = config.finetune_layers
        self.tuned_names = None if layers is None else head_parameter_names(model, layers)

    def adapt(self, population: Tree, client: Tree, batches, ctx: Tree) -> Tree:
        w = population["global"]
        if self.tuned_names is None:
            tuned, objective = w, self.plain_objective
        else:
            frozen, tuned = split(w, self.tuned_names)

            def objective(part: Tree, x, y):
                return self.plain_objective({**frozen, **part}, x, y)

        params, *_ = self.local_solve(
            tuned, objective, batches, steps=self.config.finetune_steps, ctx=ctx
        )
        return {"params": {**w, **params}}

    def personal_params(self, population: Tree, client: Tree) -> Tree:
        return client["params"]
