"""APFL: adaptive personalized federated learning (Deng, Kamani & Mahdavi 2020).

Prior: interpolation, θ_i = α_i v_i + (1 − α_i) w with a client-specific local model v_i.
Local solver: w_i = w; K steps on one batch each, all gradients at the pre-step point, with
v̄_i = α_i v_i + (1 − α_i) w_i:  w_i ← w_i − η∇f_i(w_i);
v_i ← v_i − η∇_v f_i(v̄_i) = v_i − ηα_i∇f_i(v̄_i);
adaptive α: α_i ← clip(α_i − η_α⟨v_i − w_i, ∇f_i(v̄_i)⟩, 0, 1); message Δ_i = w_i − w.
Population update: as FedAvg. Personal model: α_i v_i + (1 − α_i) w with the current w.
v_i, its optimizer state and α_i persist across rounds.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.func import grad

from fedkin.algorithms.base import Algorithm
from fedkin.core.tree import Tree, tree_dot, tree_map, tree_scale, tree_sub


class ApflConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["apfl"] = "apfl"
    alpha: float = Field(
        0.5,
        ge=0,
        le=1,
        description="mixing weight α of the personal model αv_i + (1 − α)w "
        "(the initial value of every client's α_i when adaptive_alpha)",
    )
    adaptive_alpha: bool = Field(
        True,
        description="learn α_i per client by SGD on f_i(α v_i + (1 − α) w_i), clipped to [0, 1]",
    )
    alpha_lr: float = Field(0.01, gt=0, description="η_α: step size of the α_i update")


def mix(alpha: torch.Tensor | float, v: Tree, w: Tree) -> Tree:
    """α v + (1 − α) w."""
    return tree_map(lambda a, b: alpha * a + (1 - alpha) * b, v, w)


class Apfl(Algorithm):
    name = "apfl"
    Config = ApflConfig
    per_client_metrics = ("alpha",)

    def init_client(self, population: Tree) -> Tree:
        v = population["global"]
        return {
            "params": v,
            "opt": self.client_optimizer.init(v),
            "alpha": torch.full((), float(self.config.alpha)),
        }

    def mixed_grads(self, v: Tree, w: Tree, alpha: torch.Tensor, x, y):
        """(∇_v, ∂_α) of f_i(α v + (1 − α) w) and its value, from one gradient at v̄."""
        g, loss = grad(self.plain_objective, has_aux=True)(mix(alpha, v, w), x, y)
        return tree_scale(g, alpha), tree_dot(tree_sub(v, w), g), loss

    def client_update(self, population: Tree, client: Tree, batches, ctx: Tree):
        cfg = self.config
        xs, ys = batches
        w = population["global"]
        opt_w = self.client_optimizer.init(w)
        w_i, v, opt_v, alpha = w, client["params"], client["opt"], client["alpha"]
        grad_fn = grad(self.plain_objective, has_aux=True)
        loss_sum = torch.zeros((), device=batches[0].device)
        for s in range(self.local_steps):
            x, y = xs[s % xs.shape[0]], ys[s % xs.shape[0]]
            g_w, loss = grad_fn(w_i, x, y)
            g_v, g_alpha, _ = self.mixed_grads(v, w_i, alpha, x, y)
            w_i, opt_w = self.client_optimizer.step(g_w, opt_w, w_i)
            v, opt_v = self.client_optimizer.step(g_v, opt_v, v)
            if cfg.adaptive_alpha:
                alpha = (alpha - cfg.alpha_lr * g_alpha).clamp(0.0, 1.0)
            loss_sum = loss_sum + loss.detach()
        state = {"params": v, "opt": opt_v, "alpha": alpha.detach()}
        metrics = {"train_loss": loss_sum / self.local_steps, "alpha": alpha.detach()}
        return self.delta_message(w_i, w), state, metrics

    def personal_params(self, population: Tree, client: Tree) -> Tree:
        return mix(client["alpha"], client["params"], population["global"])
