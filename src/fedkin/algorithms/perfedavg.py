"""Per-FedAvg: personalized FL as model-agnostic meta-learning (Fallah, Mokhtari & Ozdaglar 2020).

Prior: θ_i = w − α∇f_i(w) (one adaptation step away from the shared initialization w); client
objective F_i(w) = f_i(w − α∇f_i(w)).
Local solver: K meta-steps from w on fresh batches D, D′ (, D″): w′ = w − α∇f_i(w; D) and
first_order: w ← w − β∇f_i(w′; D′);   hessian_free: w ← w − β(I − α∇²f_i(w; D″))∇f_i(w′; D′)
(Hessian-vector product exact by autodiff, or the finite difference with δ); message Δ_i = w_i − w.
Population update: as FedAvg. Personal model (``adapt``, at evaluation): `adapt_steps` α-steps of
SGD on f_i from the current w. No per-client state persists.

Meta-step t uses the round's batches number kt, kt+1 (, kt+2) mod S (k = 2 or 3 batches per step),
so raise client.local_steps to draw more distinct batches.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.func import grad, jvp

from fedkin.algorithms.base import Algorithm
from fedkin.core.tree import Tree, tree_add, tree_map, tree_sub
from fedkin.optim import Optimizer, sgd


class PerFedAvgConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["perfedavg"] = "perfedavg"
    variant: Literal["first_order", "hessian_free"] = Field(
        "first_order",
        description="first_order: drop the Hessian term (FO); hessian_free: keep it via a "
        "Hessian-vector product on a third batch (HF)",
    )
    alpha: float = Field(0.05, gt=0, description="α: adaptation (inner) step size")
    beta: float | None = Field(
        None,
        gt=0,
        description="β: meta (outer) step size of plain SGD; None: the client optimizer "
        "(client.optimizer) applies the meta-gradient. With first_order and β = α = 0.05 the "
        "meta-model's own loss diverges on Fashion-MNIST Dirichlet(0.1) (2.3 → 23 in 12 rounds, "
        "one class predicted for every input) while its adapted models stay at ~70%; "
        "hessian_free or α = β = 0.01 do not diverge (benchmarks/results/perfedavg_fmnist). "
        "pFedMe's reference code uses β = 0.001–0.003 below α = 0.005–0.03",
    )
    delta: float = Field(
        0.0,
        ge=0,
        description="HF only: 0 = exact Hessian-vector product (forward-over-reverse autodiff); "
        "> 0 = finite difference (∇f(w + δv) − ∇f(w − δv)) / 2δ",
    )
    adapt_steps: int = Field(
        1, ge=1, description="α-steps from the global model that give the personal model"
    )


class PerFedAvg(Algorithm):
    name = "perfedavg"
    Config = PerFedAvgConfig

    @property
    def outer_optimizer(self) -> Optimizer:
        beta = self.config.beta
        return self.client_optimizer if beta is None else sgd(beta)

    def hvp(self, params: Tree, v: Tree, x: torch.Tensor, y: torch.Tensor) -> Tree:
        """∇²f_i(params; x, y) · v."""
        grad_fn = grad(self.data_loss)
        delta = self.config.delta
        if delta == 0:
            return jvp(lambda p: grad_fn(p, x, y), (params,), (v,))[1]
        plus = grad_fn(tree_add(params, v, delta), x, y)
        minus = grad_fn(tree_add(params, v, -delta), x, y)
        return tree_map(lambda a, b: (a - b) / (2 * delta), plus, minus)

    def meta_grad(self, w: Tree, batches, t: int) -> tuple[Tree, torch.Tensor]:
        """The meta-gradient of meta-step t and the loss at the adapted point w′."""
        cfg = self.config
        xs, ys = batches
        hf = cfg.variant == "hessian_free"
        k, n = (3 if hf else 2), xs.shape[0]
        b1, b2, b3 = (k * t) % n, (k * t + 1) % n, (k * t + 2) % n
        grad_fn = grad(self.plain_objective, has_aux=True)
        g1, _ = grad_fn(w, xs[b1], ys[b1])
        w_prime = tree_add(w, g1, -cfg.alpha)
        g2, loss = grad_fn(w_prime, xs[b2], ys[b2])
        if hf:
            hv = self.hvp(w, g2, xs[b3], ys[b3])
            g2 = tree_add(g2, hv, -cfg.alpha)
        return g2, loss

    def personalize(self, w: Tree, batches) -> Tree:
        cfg = self.config
        params, _, _, _ = self.local_solve(
            w, self.plain_objective, batches, optimizer=sgd(cfg.alpha), steps=cfg.adapt_steps
        )
        return params

    def client_update(self, population: Tree, client: Tree, batches, ctx: Tree):
        w = population["global"]
        outer = self.outer_optimizer
        theta, opt = w, outer.init(w)
        loss_sum = torch.zeros((), device=batches[0].device)
        for t in range(self.local_steps):
            g, loss = self.meta_grad(theta, batches, t)
            theta, opt = outer.step(g, opt, theta)
            loss_sum = loss_sum + loss.detach()
        metrics = {"train_loss": loss_sum / self.local_steps}
        return {"delta": tree_sub(theta, w)}, client, metrics

    def adapt(self, population: Tree, client: Tree, batches, ctx: Tree) -> Tree:
        return {"params": self.personalize(population["global"], batches)}

    def personal_params(self, population: Tree, client: Tree) -> Tree:
        return client["params"]
