"""pFedMe: personalized FL with Moreau envelopes (Dinh, Tran & Nguyen 2020).

Prior: Gaussian around the client's copy of the global model, R(θ; w_i) = λ/2 ‖θ − w_i‖²;
client objective F_i(w_i) = min_θ f_i(θ) + λ/2 ‖θ − w_i‖² (Moreau envelope, ∇F_i = λ(w_i − θ̂)).
Local solver: w_i = θ = w; for each of the K local steps (one batch each): N inner steps on that
batch θ ← θ − η_p(∇f_i(θ) + λ(θ − w_i)) (θ warm-starts from the previous step), then
w_i ← w_i − ηλ(w_i − θ) (the client optimizer on the envelope gradient); message Δ_i = w_i − w.
Population update: w ← (1 − β) w + β Σ_i p_i w_i, i.e. ServerOpt(w, −β Δ̄).
Personal model: θ̂_i, the last inner solution of the client's last round.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedkin.algorithms.base import Algorithm, ServerStep
from fedkin.core.tree import Tree, tree_map, tree_sub
from fedkin.optim import sgd


class PFedMeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["pfedme"] = "pfedme"
    lam: float = Field(
        15.0,
        gt=0,
        description="λ in λ/2‖θ − w_i‖²; keep client lr·λ < 2 and personal_lr·λ < 2 for stability",
    )
    inner_steps: int = Field(
        5, ge=1, description="N: inner steps on each batch that approximate the prox θ̂(w_i)"
    )
    personal_lr: float = Field(0.1, gt=0, description="η_p: step size of the inner steps")
    beta: float = Field(
        1.0, gt=0, le=2, description="β in w ← (1 − β)w + β·avg(w_i) (1: plain averaging)"
    )


class PFedMe(Algorithm):
    name = "pfedme"
    Config = PFedMeConfig
    supports_dp_sgd = True

    def init_client(self, population: Tree) -> Tree:
        return {"params": population["global"]}

    def envelope_grad(self, w_i: Tree, theta: Tree) -> Tree:
        """∇F_i(w_i) = λ(w_i − θ̂) for the approximate prox θ̂."""
        return tree_map(lambda a, b: self.config.lam * (a - b), w_i, theta)

    def client_update(self, population: Tree, client: Tree, batches, ctx: Tree):
        cfg = self.config
        w = population["global"]
        inner = sgd(cfg.personal_lr)
        w_i, theta = w, w
        opt = self.client_optimizer.init(w_i)
        loss_sum, dp = torch.zeros((), device=batches[0].device), []
        for s in range(self.local_steps):
            b = s % batches[0].shape[0]
            theta, _, loss, dp_inner = self.local_solve(
                theta,
                self.gaussian_objective(w_i, self.config.lam),
                batches,
                optimizer=inner,
                steps=cfg.inner_steps,
                ctx=ctx,
                noise_tag=s,
                batch=b,
            )
            w_i, opt = self.client_optimizer.step(self.envelope_grad(w_i, theta), opt, w_i)
            loss_sum = loss_sum + loss
            dp.append(dp_inner)
        metrics = self.with_dp_steps({"train_loss": loss_sum / self.local_steps}, *dp)
        return {"delta": tree_sub(w_i, w)}, {"params": theta}, metrics

    def population_update(self, population: Tree, aggregate: Tree, server: ServerStep) -> Tree:
        return self.server_step(population, aggregate, server, self.config.beta)

    def personal_params(self, population: Tree, client: Tree) -> Tree:
        return client["params"]
