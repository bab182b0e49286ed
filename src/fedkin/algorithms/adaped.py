"""AdaPeD (Ozkara et al., ICLR 2023): adaptive personalization via distillation.

Prior on the output distribution: p(θ_i | w, ψ) ∝ exp(−KD(θ_i‖w)/(2ψ)), so client i minimizes
    F_i(θ_i, w, ψ) = f_i(θ_i) + s·[KD(θ_i‖w)/(2ψ) + ½ log ψ],   KD(θ‖w) = T²·KL(p_w ‖ p_θ),
(s = 1/n_i by default, see ``prior_scale``) with ∂F_i/∂ψ = s·(1/(2ψ) − KD/(2ψ²)), stationary at
ψ* = KD. Each local step updates, from one minibatch and simultaneously:
θ_i ← θ_i − η∇_θ F_i;  w_i ← w_i − η∇_w[c·f_i(w_i) + s·KD_w/(2ψ)];  ψ_i ← ψ_i − η_ψ ∂F_i/∂ψ
(or the same step on log ψ). Message (Δw_i, Δψ_i); the server sets
w ← ServerOpt(w, −Σ p_i Δw_i) and ψ ← clamp(ψ + Σ p_i Δψ_i); θ_i (and its optimizer state) persist.

Checked against the paper: only the abstract could be read here (KD-based, "information-geometry
regularization", ψ learned and averaged with w). The exact update order, the KD direction of the
w-step, the ψ parameterization and all constants are documented options; the defaults were
picked on digits (pathological and Dirichlet splits), see the config descriptions.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedkin.algorithms.base import Algorithm, ServerStep
from fedkin.algorithms.common import PERSONAL_INIT_FIELD, PersonalInit, on_first_visit
from fedkin.core.priors import distillation_penalty
from fedkin.core.tree import Tree, tree_map
from fedkin.optim import projected_sgd, routed


class AdaPeDConfig(BaseModel):
    """AdaPeD: personal models distilled from the global model with a learned weight 1/(2ψ)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["adaped"] = "adaped"
    temperature: float = Field(
        1.0, gt=0, description="softmax temperature T of the KD term (scaled by T²)"
    )
    global_ce_weight: float = Field(
        1.0, ge=0, description="weight c of the global copy's own cross-entropy c·f_i(w_i)"
    )
    global_kd_direction: Literal["mutual", "joint", "none"] = Field(
        "mutual",
        description="KD term of the w-step: 'mutual' = θ_i teaches w_i, KD(w_i‖θ_i)/(2ψ) (as in "
        "QuPeD/FML); 'joint' = the gradient of the same KD(θ_i‖w_i)/(2ψ) w.r.t. the teacher w_i "
        "(the exact gradient of F_i); 'none' = w_i trains on c·f_i only",
    )
    psi_init: float = Field(1.0, gt=0, description="initial ψ of the population")
    psi_lr: float = Field(
        1.0,
        gt=0,
        description="step size η_ψ of the ψ update (on log ψ if psi_param='log'); the step is "
        "also scaled by s = 1/n_i under prior_scale='per_sample' (1.0 beat 0.1 on the digits "
        "Dirichlet split, tied on the pathological one)",
    )
    psi_param: Literal["log", "direct"] = Field(
        "log",
        description="'log': gradient step on ρ = log ψ (∂F/∂ρ = ½ − KD/(2ψ); curvature ½ at ψ*, "
        "stable for any KD scale); 'direct': gradient step on ψ itself (curvature 1/(2ψ*²), "
        "stiff when KD is small); both clamp ψ between psi_min and psi_max",
    )
    psi_min: float = Field(1e-3, gt=0, description="lower bound on ψ (caps the KD weight)")
    psi_max: float = Field(1e2, gt=0, description="upper bound on ψ")
    prior_scale: Literal["one", "per_sample"] = Field(
        "per_sample",
        description="weight s of the prior terms, F_i = f_i(θ) + s·(KD/(2ψ) + ½ log ψ): "
        "'per_sample' (s = 1/n_i: the MAP objective n_i f_i(θ) − log p(θ | w, ψ) divided by n_i, "
        "the prior counted once against n_i samples) or 'one' (s = 1); ψ* = KD either way. "
        "On digits 'per_sample' gave 97.5% vs 94.2% personal accuracy (pathological split)",
    )
    personal_init: PersonalInit = PERSONAL_INIT_FIELD

    @model_validator(mode="after")
    def _bounds(self) -> AdaPeDConfig:
        if not self.psi_min <= self.psi_init <= self.psi_max:
            raise ValueError(
                f"algorithm.psi_init={self.psi_init} must lie in [psi_min, psi_max] = "
                f"[{self.psi_min}, {self.psi_max}]"
            )
        return self


class AdaPeD(Algorithm):
    name = "adaped"
    Config = AdaPeDConfig
    per_client_metrics = ("psi", "kd")  # ψ_i after the local steps, KD(θ_i‖w_i) on batch 0

    def __init__(self, config, model, client_optimizer, local_steps) -> None:
        super().__init__(config, model, client_optimizer, local_steps)
        c = config
        lo, hi = (
            (math.log(c.psi_min), math.log(c.psi_max))
            if c.psi_param == "log"
            else (
                c.psi_min,
                c.psi_max,
            )
        )
        self.solver = routed(
            {
                "theta": client_optimizer,
                "w": client_optimizer,
                "u": projected_sgd(c.psi_lr, lo, hi),
            }
        )

    # ----- ψ parameterization ------------------------------------------------------------
    def to_u(self, psi: torch.Tensor) -> torch.Tensor:
        return torch.log(psi) if self.config.psi_param == "log" else psi

    def to_psi(self, u: torch.Tensor) -> torch.Tensor:
        return torch.exp(u) if self.config.psi_param == "log" else u

    # ----- objective -------------------------------------------------------------------------
    def kd(self, student_logits, teacher_logits, detach_teacher: bool = True) -> torch.Tensor:
        return distillation_penalty(
            student_logits, teacher_logits, self.config.temperature, detach_teacher
        )

    def client_objective(self, theta: Tree, w: Tree, psi, x, y) -> torch.Tensor:
        """F_i(θ, w, ψ) = f_i(θ) + KD(θ‖w)/(2ψ) + ½ log ψ on one batch (gradients flow to θ, ψ
        and — through the teacher — to w)."""
        kd = self.kd(self.logits(theta, x), self.logits(w, x), detach_teacher=False)
        return self.data_loss(theta, x, y) + kd / (2 * psi) + 0.5 * torch.log(psi)

    def step_objective(self, params: Tree, x, y, scale=1.0):
        """One scalar whose partial gradients are the three AdaPeD directions at once:
        ∇_θ F_i, ∇_w [c f_i(w) + s·KD_w/(2ψ)], and ∂F_i/∂u (stop-gradients keep them apart);
        ``scale`` is the prior weight s."""
        cfg = self.config
        theta, w = params["theta"], params["w"]
        psi = self.to_psi(params["u"])
        coupling = scale / psi.detach()  # s/ψ, no gradient to ψ
        z_t, z_w = self.logits(theta, x), self.logits(w, x)
        ce_t = self.logits_loss(z_t, theta, x, y)
        kd_t = self.kd(z_t, z_w)  # θ is the student, w the (detached) teacher
        psi_term = 0.5 * torch.log(psi) + kd_t.detach() / (2 * psi)
        total = ce_t + kd_t * coupling / 2 + scale * psi_term
        if cfg.global_ce_weight:
            total = total + cfg.global_ce_weight * self.logits_loss(z_w, w, x, y)
        if cfg.global_kd_direction == "mutual":
            total = total + self.kd(z_w, z_t) * coupling / 2
        elif cfg.global_kd_direction == "joint":
            total = total + self.kd(z_t.detach(), z_w, detach_teacher=False) * coupling / 2
        return total, ce_t

    # ----- the three pieces ----------------------------------------------------------------
    def init_population(self, params: Tree) -> Tree:
        return {"global": params, "psi": torch.tensor(float(self.config.psi_init))}

    def init_client(self, population: Tree) -> Tree:
        theta = tree_map(lambda t: t.clone(), population["global"])
        return {
            "theta": theta,
            "opt": self.client_optimizer.init(theta),
            "seen": torch.zeros(()),
        }

    def _start(self, population: Tree, client: Tree) -> Tree:
        if self.config.personal_init == "global":
            return on_first_visit(client["seen"], client["theta"], population["global"])
        return client["theta"]

    def client_update(self, population: Tree, client: Tree, batches, ctx: Tree):
        w, psi = population["global"], population["psi"]
        params = {"theta": self._start(population, client), "w": w, "u": self.to_u(psi)}
        state = {"theta": client["opt"], "w": self.client_optimizer.init(w), "u": {}}
        scale = 1.0 / ctx["num_samples"] if self.config.prior_scale == "per_sample" else 1.0

        def objective(p: Tree, x, y):
            return self.step_objective(p, x, y, scale)

        params, state, loss = self.local_solve(
            params, objective, batches, optimizer=self.solver, opt_state=state
        )
        psi_i = self.to_psi(params["u"])
        xs, _ = batches
        kd = self.kd(self.logits(params["theta"], xs[0]), self.logits(params["w"], xs[0]))
        message = {**self.delta_message(params["w"], w), "psi_delta": psi_i - psi}
        new_client = {"theta": params["theta"], "opt": state["theta"], "seen": torch.ones(())}
        return message, new_client, {"train_loss": loss, "psi": psi_i, "kd": kd.detach()}

    def population_update(self, population: Tree, aggregate: Tree, server: ServerStep) -> Tree:
        """w through the server optimizer; ψ ← clamp(ψ + mean Δψ_i) (plain averaging of ψ_i)."""
        new = super().population_update(population, aggregate, server)
        psi = (population["psi"] + aggregate["psi_delta"]).clamp(
            self.config.psi_min, self.config.psi_max
        )
        return {**new, "psi": psi}

    def personal_params(self, population: Tree, client: Tree) -> Tree:
        return self._start(population, client)
