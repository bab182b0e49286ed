"""ADEPT (AISTATS 2025, arXiv 2402.12537): hierarchical-Bayes personalized unsupervised learning,
for the linear autoencoder (ADEPT-AE) and PCA on the Stiefel manifold (ADEPT-PCA).

Prior: θ_ik ~ N(μ_k, σ_k²) per coordinate, σ_k² ~ InvGamma(α, β); with n_i training samples the
client's MAP objective is (ADEPT's ``sep_logsumexp``, priors.gaussian_inverse_gamma_penalty)

    F_i(θ_i, σ) = L_i(θ_i) + (1/n_i)·R(θ_i, σ; μ),
    R = (2α + 3) Σ_k log σ_k + ½ Σ_k (2β + (θ_ik − μ_k)²)/σ_k²,

L_i the reconstruction loss (1/B) Σ_b ‖x_b − x̂_b‖². σ is learned: a large between-client spread
gives a large σ, a weak pull to μ and local behaviour; a small spread gives collaboration.

Local solver (one round = τ = ``client.local_steps`` iterations; client copy μ_i ← μ):

    σ_i = clamp(σ − η_σ·clip∞(∂_σ R(θ_i, σ; μ), 10), 1e-3, 1e2)   if round ≥ warmup_rounds,
          else σ_i = σ                                          (σ moves at sync steps only)
    for each step with batch B:
        g   = clip∞(∇_θ [L_i(θ_i; B) + (1/n_i)·R(θ_i, σ_i; μ_i)], θ_clip)   (∇_θ R = (θ − μ_i)/σ_i²)
        θ_i ← ClientOpt(θ_i, g)
        μ_i ← μ_i − η_μ·clip∞(2(μ_i − θ_i), μ_clip)                      (∇ of ‖θ_i − μ_i‖²)

clip∞(g, c) scales the whole tree g so that its largest |entry| is at most c (torch's
``clip_grad_norm_(…, norm_type='inf')``). ∂_σ R = (2α+3)/σ − (2β + (θ−μ)²)/σ³ is unscaled by
1/n_i, as in the code. Message: (Δμ_i = μ_i − μ, Δσ_i = σ_i − σ).

Population update: μ ← ServerOpt(μ, −Σ p_i Δμ_i) (server SGD with lr 1: the average of the μ_i),
σ ← clamp(σ + Σ p_i Δσ_i, 1e-3, 1e2). Since every client steps σ from the same σ, the average
is one step on the mean gradient, whose zero is σ_k² = (2β + mean_i (θ_ik − μ_k)²)/(2α + 3): the
between-client variance (plus 2β) for the default α = −1. Personal model: θ_i.

ADEPT-PCA (model ``pca``, x̂ = UUᵀx with U ∈ St(d, k)): the same prior on the basis U_i; the θ
gradient is projected on the tangent space, g ← g − U sym(Uᵀg), and after the optimizer step U_i
is retracted to St(d, k) by QR (Q·sign(diag R)) or polar (U(UᵀU)^{-1/2} = PVᵀ for U = PSVᵀ);
the server re-orthonormalizes the averaged μ the same way. For orthonormal U,
L_i(U) = tr S_i − tr(Uᵀ S_i U): PCA. The released code runs the linear AE instead (no
constraint); ADEPT-AE is that (model ``linear-ae``).

Differences from the released code (adept_ae/main.py): n_i is the client's training-set size
(the AE code divides by its config value ``train_num``, the diffusion code by |D_i|); the
per-epoch "lazy" gate on σ (loss-improvement threshold) is not reproduced, only the warm-up;
personal models start at μ (the code draws them per client); σ's gradient is the one at the
sync step (the code lets it accumulate between sync steps).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.func import grad

from fedkin.algorithms.base import Algorithm, ServerStep
from fedkin.core.errors import ConfigError
from fedkin.core.priors import gaussian_inverse_gamma_penalty
from fedkin.core.tasks import RECONSTRUCTION
from fedkin.core.tree import Tree, tree_leaves, tree_map, tree_sub

SIGMA_MIN, SIGMA_MAX = 1e-3, 1e2
SIGMA_GRAD_CLIP = 10.0


def clip_inf(tree: Tree, limit: float) -> Tree:
    """Scale ``tree`` by min(1, limit / max |entry|) (inf-norm clipping; vmappable)."""
    peak = torch.stack([t.abs().max() for t in tree_leaves(tree)]).max()
    factor = torch.clamp(limit / peak.clamp(min=1e-12), max=1.0)
    return tree_map(lambda t: t * factor, tree)


def qr_retract(u: torch.Tensor) -> torch.Tensor:
    """The Q factor of U = QR with sign(diag R) ≥ 0 (a continuous retraction to St(d, k))."""
    q, r = torch.linalg.qr(u)
    sign = torch.diagonal(r, dim1=-2, dim2=-1).sign()
    return q * torch.where(sign == 0, torch.ones_like(sign), sign).unsqueeze(-2)


def polar_retract(u: torch.Tensor) -> torch.Tensor:
    """U (UᵀU)^{-1/2} = PVᵀ for the thin SVD U = PSVᵀ: the closest orthonormal matrix."""
    p, _, vh = torch.linalg.svd(u, full_matrices=False)
    return p @ vh


RETRACTIONS = {"qr": qr_retract, "polar": polar_retract}


class AdeptConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["adept-ae"] = "adept-ae"
    sigma_init: float = Field(
        1.0,
        ge=SIGMA_MIN,
        le=SIGMA_MAX,
        description="initial prior std σ of every coordinate (ADEPT AE configs: 1.0)",
    )
    sigma_lr: float = Field(
        1e-3, ge=0, description="step size η_σ of the σ update (0 keeps σ fixed; ADEPT: 1e-3)"
    )
    warmup_rounds: int = Field(
        0, ge=0, description="rounds before σ starts to move (ADEPT's lazy_epochs)"
    )
    alpha: float = Field(
        -1.0,
        gt=-1.5,
        description="inverse-gamma shape α; log σ has coefficient 2α + 3 (ADEPT: −1, i.e. 1)",
    )
    beta: float = Field(
        1e-6, ge=0, description="inverse-gamma scale β (ADEPT's xi: 1e-6 in the AE configs)"
    )
    mu_lr: float = Field(
        1e-2, gt=0, description="step size η_μ of the client's μ_i ← μ_i − η_μ·2(μ_i − θ_i)"
    )
    mu_clip: float = Field(1.0, gt=0, description="inf-norm clip of the μ_i gradient (ADEPT: 1)")
    theta_clip: float = Field(
        1.0, gt=0, description="inf-norm clip of the θ_i gradient before the optimizer (ADEPT: 1)"
    )


class AdeptPcaConfig(AdeptConfig):
    name: Literal["adept-pca"] = "adept-pca"  # type: ignore[assignment]
    retraction: Literal["qr", "polar"] = Field(
        "qr", description="retraction to the Stiefel manifold after each step and on the server"
    )


class AdeptAe(Algorithm):
    name = "adept-ae"
    Config = AdeptConfig
    task = RECONSTRUCTION

    def __init__(self, config, model, client_optimizer, local_steps) -> None:
        super().__init__(config, model, client_optimizer, local_steps)
        self.check_model(model)

    def check_model(self, model) -> None:
        """Refuse a model this variant cannot train (AE/PCA: a reconstruction model)."""
        if not getattr(model, "reconstructs", False):
            raise ConfigError(
                f"algorithm.name: {self.name!r} learns reconstructions x̂ of x; model.name must "
                "be 'linear-ae' or 'pca' (or a model with reconstructs = True)"
            )

    # ----- manifold hooks (identity for the unconstrained autoencoder) --------------------------
    def project(self, params: Tree, g: Tree) -> Tree:
        return g

    def retract(self, params: Tree) -> Tree:
        return params

    # ----- the three pieces ----------------------------------------------------------------------
    def init_population(self, params: Tree) -> Tree:
        sigma = tree_map(lambda t: torch.full_like(t, self.config.sigma_init), params)
        return {"global": self.retract(params), "sigma": sigma}

    def init_client(self, population: Tree) -> Tree:
        theta = population["global"]
        return {"params": theta, "opt": self.client_optimizer.init(theta)}

    def prior(self, theta: Tree, mu: Tree, sigma: Tree) -> torch.Tensor:
        cfg = self.config
        return gaussian_inverse_gamma_penalty(theta, mu, sigma, cfg.alpha, cfg.beta)

    def sigma_step(self, theta: Tree, mu: Tree, sigma: Tree, round_: torch.Tensor) -> Tree:
        """σ_i at a sync step: a clipped gradient step on R, clamped; σ before warm-up ends."""
        cfg = self.config
        g = clip_inf(grad(lambda s: self.prior(theta, mu, s))(sigma), SIGMA_GRAD_CLIP)
        on = round_ >= cfg.warmup_rounds
        return tree_map(
            lambda s, d: torch.where(on, (s - cfg.sigma_lr * d).clamp(SIGMA_MIN, SIGMA_MAX), s),
            sigma,
            g,
        )

    def client_update(self, population: Tree, client: Tree, batches, ctx: Tree):
        cfg = self.config
        mu, theta, opt = population["global"], client["params"], client["opt"]
        sigma = self.sigma_step(theta, mu, population["sigma"], ctx["round"])
        scale = 1.0 / ctx["num_samples"]

        def objective(params: Tree, x: torch.Tensor, y: torch.Tensor, center: Tree):
            loss = self.data_loss(params, x, y)
            return loss + scale * self.prior(params, center, sigma), loss

        grad_fn = grad(objective, has_aux=True)
        xs, ys = batches
        mu_i, loss_sum = mu, torch.zeros(())
        for s in range(self.local_steps):
            b = s % xs.shape[0]
            g, loss = grad_fn(theta, xs[b], ys[b], mu_i)
            g = clip_inf(self.project(theta, g), cfg.theta_clip)
            theta, opt = self.client_optimizer.step(g, opt, theta)
            theta = self.retract(theta)
            pull = clip_inf(tree_map(lambda m, t: 2 * (m - t), mu_i, theta), cfg.mu_clip)
            mu_i = tree_map(lambda m, d: m - cfg.mu_lr * d, mu_i, pull)
            loss_sum = loss_sum + loss.detach()
        message = {"delta": tree_sub(mu_i, mu), "sigma_delta": tree_sub(sigma, population["sigma"])}
        sigma_mean = torch.cat([t.reshape(-1) for t in tree_leaves(sigma)]).mean()
        metrics = {"train_loss": loss_sum / max(self.local_steps, 1), "sigma_mean": sigma_mean}
        return message, {"params": theta, "opt": opt}, metrics

    def population_update(self, population: Tree, aggregate: Tree, server: ServerStep) -> Tree:
        """μ through the server optimizer, then retracted (PCA); σ ← clamp(σ + mean Δσ_i)."""
        if "delta" not in aggregate:
            return population
        new = self.server_step(population, aggregate, server)
        sigma = tree_map(
            lambda s, d: (s + d).clamp(SIGMA_MIN, SIGMA_MAX),
            population["sigma"],
            aggregate["sigma_delta"],
        )
        return {**new, "global": self.retract(new["global"]), "sigma": sigma}

    def personal_params(self, population: Tree, client: Tree) -> Tree:
        return client["params"]


class AdeptPca(AdeptAe):
    """ADEPT on the Stiefel manifold: every 2-D parameter (the ``pca`` model's basis) is kept
    orthonormal (Riemannian gradient, retraction; server re-orthonormalization)."""

    name = "adept-pca"
    Config = AdeptPcaConfig

    def __init__(self, config, model, client_optimizer, local_steps) -> None:
        super().__init__(config, model, client_optimizer, local_steps)
        bad = [k for k, v in model.named_parameters() if v.dim() != 2 or v.shape[0] < v.shape[1]]
        if bad:
            raise ConfigError(
                f"algorithm.name: 'adept-pca' needs a model whose parameters are d×k bases "
                f"(model.name: 'pca'); {', '.join(bad)} is not"
            )

    def project(self, params: Tree, g: Tree) -> Tree:
        def tangent(u: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
            ug = u.transpose(-2, -1) @ d
            return d - u @ (0.5 * (ug + ug.transpose(-2, -1)))

        return tree_map(tangent, params, g)

    def retract(self, params: Tree) -> Tree:
        return tree_map(RETRACTIONS[self.config.retraction], params)
