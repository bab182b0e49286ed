"""Federated Mutual Learning (Shen et al. 2020): a personal model and a shared "meme" model
distil into each other (deep mutual learning) on every local batch.

Prior: KD coupling of the personal model v_i to the population meme w on output space.
Local solver, per step on one batch, both from the same forward pass (teachers detached):
    v_i ← v_i − η∇_v[α·CE(v_i) + (1−α)·KD(v_i‖w_i)]
    w_i ← w_i − η∇_w[β·CE(w_i) + (1−β)·KD(w_i‖v_i)]
with KD(s‖t) = T²·KL(p_t ‖ p_s); v_i and its optimizer state persist, w_i starts at w.
Message Δw_i = w_i − w. Population update: w ← ServerOpt(w, −Σ_i p_i Δw_i).
Checked against PFLlib clientfml.py and the authors' Train_mutual.py (ZJU-DAI): as in the
authors' code the teachers are detached and KL is a batch mean (PFLlib back-propagates into the
teacher and averages KL over classes too); PFLlib's gradient clipping (norm 10) is omitted.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedkin.algorithms.base import Algorithm
from fedkin.algorithms.common import PERSONAL_INIT_FIELD, PersonalInit, on_first_visit
from fedkin.core.priors import distillation_penalty
from fedkin.core.tree import Tree, tree_map
from fedkin.optim import routed


class FmlConfig(BaseModel):
    """FML: personal model and shared meme model trained by mutual distillation."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["fml"] = "fml"
    alpha: float = Field(
        0.9,
        ge=0,
        le=1,
        description="personal model's CE weight α (KD weight 1 − α). 0.9 as in a PFLlib-derived "
        "FML port; PFLlib's shared CLI flags default to α = 1, β = 0 (no mutual learning) and the "
        "authors' code sums CE + KL unweighted. On digits α = 0.9, β = 0.1 beat α = β = 0.5 by "
        "1.5 (pathological) and 8 (Dirichlet) points",
    )
    beta: float = Field(
        0.1, ge=0, le=1, description="meme model's CE weight β (KD weight 1 − β); see alpha"
    )
    temperature: float = Field(1.0, gt=0, description="softmax temperature T of the KD terms")
    personal_init: PersonalInit = PERSONAL_INIT_FIELD


class Fml(Algorithm):
    name = "fml"
    Config = FmlConfig

    def __init__(self, config, model, client_optimizer, local_steps) -> None:
        super().__init__(config, model, client_optimizer, local_steps)
        self.solver = routed({"v": client_optimizer, "w": client_optimizer})

    def step_objective(self, params: Tree, x, y):
        """Sum of both losses; each model's teacher is detached, so ∇_v and ∇_w are the two
        mutual-learning gradients of one shared forward pass."""
        a, b, t = self.config.alpha, self.config.beta, self.config.temperature
        z_v, z_w = self.logits(params["v"], x), self.logits(params["w"], x)
        ce_v = self.logits_loss(z_v, params["v"], x, y)
        loss_v = a * ce_v + (1 - a) * distillation_penalty(z_v, z_w, t)
        ce_w = self.logits_loss(z_w, params["w"], x, y)
        loss_w = b * ce_w + (1 - b) * distillation_penalty(z_w, z_v, t)
        return loss_v + loss_w, ce_v

    def init_client(self, population: Tree) -> Tree:
        v = tree_map(lambda t: t.clone(), population["global"])
        return {"v": v, "opt": self.client_optimizer.init(v), "seen": torch.zeros(())}

    def _start(self, population: Tree, client: Tree) -> Tree:
        if self.config.personal_init == "global":
            return on_first_visit(client["seen"], client["v"], population["global"])
        return client["v"]

    def client_update(self, population: Tree, client: Tree, batches, ctx: Tree):
        w = population["global"]
        params, state, loss, _ = self.local_solve(
            {"v": self._start(population, client), "w": w},
            self.step_objective,
            batches,
            optimizer=self.solver,
            opt_state={"v": client["opt"], "w": self.client_optimizer.init(w)},
        )
        new_client = {
            "v": params["v"],
            "opt": state["v"],
            "seen": torch.ones((), device=loss.device),
        }
        return self.delta_message(params["w"], w), new_client, {"train_loss": loss}

    def personal_params(self, population: Tree, client: Tree) -> Tree:
        return self._start(population, client)
