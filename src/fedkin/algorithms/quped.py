"""QuPeD: quantized personalized FL via distillation (Ozkara, Singh, Data & Diggavi, NeurIPS 2021,
arXiv 2107.13892).

Prior: in output space. Client i's personal model Q̃_{c_i}(x_i) (soft quantizer, sharpness P;
its own precision and architecture) is distilled from the global w, and the distance penalty
pulls x_i to its centers (QuPeD eq. (4)):

    client:  min_{x_i,c_i} (1−λ_p)·f_i(Q̃_{c_i}(x_i)) + λ_p·KD(Q̃_{c_i}(x_i) ‖ w) + λ_r R(x_i, c_i)
    global:  min_w Σ_i p_i [(1−λ_p)·f_i(w) + λ_p·KD(w ‖ Q̃_{c_i}(x_i))]      (mutual distillation)

with KD(s‖t) = T²·KL(p_t ‖ p_s) (``core.priors.distillation_penalty``; the code's
``(1−λ_p)·CE + λ_p·T²·KL``).
Local solver (QuPeD Algorithm 2): per step, one forward pass of both models on a batch (teachers
detached) gives ∇_x, ∇_c of the client objective's smooth part and ∇_w of the global one; then
x ← prox_{η₁λ_r R(·,c)}(x − η₁∇_x), c ← prox_{η₂λ_r R(x,·)}(c − η₂∇_c) (sorted), w_i ← w_i − η∇_w.
From ``freeze_round`` on the weights are frozen at Q_c(x), the hard quantizer replaces Q̃ and
only the centers are fine-tuned. Message Δw_i = w_i − w; population update
w ← ServerOpt(w, −Σ p_i Δw_i). The personal model used and evaluated is Q_{c_i}(x_i).
The global architecture is ``model``; only KD couples personal models of other architectures
(``client_models``) to it. Checked against kazkara/QuPeD ``utils.update_prox`` (the federated
driver is not released): the code distils into the *hard*-quantized copy and does not divide the
student logits by T; here the student is Q̃ (the paper) and both logits are divided by T.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from fedkin.algorithms.quantized import QuantizedConfig, QuantizedPersonal
from fedkin.core import quantize as qz
from fedkin.core.priors import distillation_penalty
from fedkin.core.tree import Tree
from fedkin.optim import routed


class QuPeDConfig(QuantizedConfig):
    """QuPeD: soft-quantized personal models distilled from a global model (mutual learning)."""

    name: Literal["quped"] = "quped"
    lam_p: float = Field(
        0.5, ge=0, le=1, description="KD weight λ_p in (1−λ_p)·CE + λ_p·KD, for both models"
    )
    sharpness: float = Field(
        1000.0, gt=0, description="sharpness P of the soft quantizer's sigmoids (P → ∞: hard)"
    )
    temperature: float = Field(1.0, gt=0, description="softmax temperature T of the KD terms")


class QuPeD(QuantizedPersonal):
    name = "quped"
    Config = QuPeDConfig

    def soft_quantized(self, personal: Tree, frozen: torch.Tensor) -> Tree:
        """Q̃_c(x) while training; Q_c(x) once frozen (selected elementwise, so it vmaps)."""
        p = self.config.sharpness

        def quantizer(x, c):
            return torch.where(frozen, qz.hard_quantize(x, c), qz.soft_quantize(x, c, p))

        return qz.quantize_tree(personal["x"], personal["c"], quantizer)

    def client_update(self, population: Tree, client: Tree, batches, ctx: Tree):
        cfg, w = self.config, population["global"]
        frozen = self.frozen(ctx)
        a, t = cfg.lam_p, cfg.temperature

        def objective(p: Tree, x, y):
            q = self.soft_quantized(p["q"], frozen)
            z_q, z_w = self.logits(q, x), self.global_logits(p["w"], x)
            ce_q = self.logits_loss(z_q, q, x, y)
            loss_q = (1 - a) * ce_q + a * distillation_penalty(z_q, z_w, t)
            ce_w = self.logits_loss(z_w, p["w"], x, y, self.global_model)
            loss_w = (1 - a) * ce_w + a * distillation_penalty(z_w, z_q, t)
            return loss_q + loss_w, ce_q

        params, state, loss, _ = self.local_solve(
            {"q": {"x": client["x"], "c": client["c"]}, "w": w},
            objective,
            batches,
            optimizer=routed({"q": self.solver(ctx), "w": self.client_optimizer}),
            opt_state={"q": client["opt"], "w": self.client_optimizer.init(w)},
        )
        new_client = {**params["q"], "opt": state["q"]}
        return self.delta_message(params["w"], w), new_client, {"train_loss": loss}
