"""QuPeL: quantized personalized FL (Ozkara, Singh, Data & Diggavi 2021, arXiv 2102.11786).

Prior: client i's personal model is the quantized Q_{c_i}(x_i), tied to the global w by a
Gaussian in parameter space and to its centers by the distance penalty (QuPeL eq. (2)):

    min_{x_i, c_i}  f_i(Q_{c_i}(x_i)) + λ_r R(x_i, c_i) + (λ_p/2) ‖Q_{c_i}(x_i) − w‖²,
    min_w  Σ_i p_i (λ_p/2) ‖Q_{c_i}(x_i) − w‖²   ⇒   w = Σ_i p_i Q_{c_i}(x_i).

Local solver: K alternating proximal steps (``core.quantize.prox_optimizer``): one
straight-through gradient g of f_i(Q(x)) + (λ_p/2)‖Q(x) − w‖² (the code's ``qupel=True`` adds
λ_p(Q(x) − w) to the gradient of the quantized copy), then x ← prox_{η₁λ_r R(·,c)}(x − η₁ g_x),
c ← prox_{η₂λ_r R(x,·)}(c − η₂ g_c), c sorted; after ``freeze_round`` only the centers move.
Message Δ_i = Q_{c_i}(x_i) − w. Population update: w ← ServerOpt(w, −Σ p_i Δ_i), which with
server SGD(lr=1) is the exact minimizer w = Σ_i p_i Q_{c_i}(x_i) of the global problem (the
paper's w-step is a gradient step on the same objective; RECALL, not checked against the PDF).
Personal models and w share one architecture; groups may differ in precision (``centers``).
With λ_p = 0 and no centers this is Local.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedkin.algorithms.quantized import QuantizedConfig, QuantizedPersonal
from fedkin.core.priors import gaussian_penalty
from fedkin.core.tree import Tree


class QuPeLConfig(QuantizedConfig):
    """QuPeL: hard-quantized personal models with a parameter-space penalty to w."""

    name: Literal["qupel"] = "qupel"
    lam_p: float = Field(
        0.1, ge=0, description="λ_p in (λ_p/2)‖Q_c(x_i) − w‖²: 0 gives (quantized) Local"
    )


class QuPeL(QuantizedPersonal):
    name = "qupel"
    Config = QuPeLConfig
    personal_shape_is_global = True

    def client_update(self, population: Tree, client: Tree, batches, ctx: Tree):
        w = population["global"]

        def objective(p: Tree, x, y):
            q = self.quantized(p)
            loss = self.data_loss(q, x, y)
            return loss + gaussian_penalty(q, w, self.config.lam_p), loss

        personal, opt, loss, _ = self.local_solve(
            {"x": client["x"], "c": client["c"]},
            objective,
            batches,
            optimizer=self.solver(ctx),
            opt_state=client["opt"],
        )
        message = self.delta_message(self.quantized(personal), w)
        return message, {**personal, "opt": opt}, {"train_loss": loss}
