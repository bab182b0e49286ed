"""Priors p(θ | Γ) as penalty terms R(θ; Γ) = −log p(θ | Γ) (up to constants and scaling).

A client's MAP objective is  L_i(θ; D_i) + R(θ; Γ).  Algorithms compose these terms with the
data loss instead of writing their own regularizers.
"""

from __future__ import annotations

import torch

from fedkin.core.tree import Tree, tree_leaves, tree_map, tree_sqnorm


def gaussian_penalty(theta: Tree, center: Tree, lam: float | torch.Tensor) -> torch.Tensor:
    """Isotropic Gaussian prior θ ~ N(w, λ⁻¹ I):  R(θ; w) = λ/2 ‖θ − w‖²."""
    return 0.5 * lam * tree_sqnorm(tree_map(torch.sub, theta, center))


def gaussian_inverse_gamma_penalty(
    theta: Tree, center: Tree, sigma: Tree, alpha: float, beta: float
) -> torch.Tensor:
    """Coordinate-wise Gaussian prior θ_k ~ N(μ_k, σ_k²) with hyperprior σ_k² ~ InvGamma(α, β)
    (ADEPT), as a function of θ and σ (up to constants):

        R(θ, σ; μ) = (2α + 3) Σ_k log σ_k + ½ Σ_k (2β + (θ_k − μ_k)²) / σ_k²

    ``sigma`` has ``theta``'s tree structure. ∂R/∂θ_k = (θ_k − μ_k)/σ_k² and
    ∂R/∂σ_k = (2α + 3)/σ_k − (2β + (θ_k − μ_k)²)/σ_k³, zero at σ_k² = (2β + (θ_k − μ_k)²)/(2α + 3).
    """
    out = 0.0
    for t, c, s in zip(tree_leaves(theta), tree_leaves(center), tree_leaves(sigma), strict=True):
        out = (
            out
            + (2 * alpha + 3) * torch.log(s).sum()
            + 0.5 * ((2 * beta + (t - c) ** 2) / s**2).sum()
        )
    return out


# ----- output-space prior (knowledge distillation) ---------------------------------------------


def distillation_penalty(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    detach_teacher: bool = True,
) -> torch.Tensor:
    """KD prior on predictive distributions (Hinton et al. 2015):

        KD(θ ‖ w) = T² · (1/B) Σ_b KL( softmax(z_w,b / T) ‖ softmax(z_θ,b / T) )

    with student logits z_θ and teacher logits z_w ``[B, C]`` (batch mean). It is 0 iff the two
    softmax outputs agree. ``detach_teacher=True`` stops the gradient through the teacher (the
    usual distillation step); ``False`` keeps it, giving the gradient of the term w.r.t. w too.
    Gradient w.r.t. the student logits: T · (softmax(z_θ/T) − softmax(z_w/T)) / B.
    """
    if detach_teacher:
        teacher_logits = teacher_logits.detach()
    log_q = torch.log_softmax(student_logits / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return temperature**2 * kl.mean()


# ----- mixture prior (clustered personalization) -----------------------------------------------


def _sq_dists(theta: Tree, centers: Tree) -> torch.Tensor:
    """‖θ − w_k‖² ``[K]``; ``centers`` is ``theta``'s tree stacked along dim 0 ``[K, …]``."""
    out = 0.0
    for t, c in zip(tree_leaves(theta), tree_leaves(centers), strict=True):
        out = out + (c - t.unsqueeze(0)).pow(2).reshape(c.shape[0], -1).sum(1)
    return out


def mixture_penalty(
    theta: Tree,
    centers: Tree,
    lam: float | torch.Tensor,
    log_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gaussian-mixture prior θ ~ Σ_k π_k N(w_k, λ⁻¹ I) (up to a constant):

        R(θ; {w_k}, π) = −log Σ_k π_k exp(−λ/2 ‖θ − w_k‖²)

    ``centers`` stacks the K centers along dim 0 of every leaf; ``log_weights`` is log π ``[K]``
    (uniform if None). ∇_θ R = Σ_k r_k λ (θ − w_k) with responsibilities
    r = :func:`mixture_responsibilities`. As λ → ∞ it tends to the hard-assignment
    penalty :func:`hard_mixture_penalty` (IFCA).
    """
    logits = -0.5 * lam * _sq_dists(theta, centers)
    if log_weights is not None:
        logits = logits + log_weights
    else:
        logits = logits - torch.log(torch.tensor(float(logits.shape[-1])))
    return -torch.logsumexp(logits, dim=-1)


def mixture_responsibilities(
    theta: Tree,
    centers: Tree,
    lam: float | torch.Tensor,
    log_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Posterior cluster probabilities r_k ∝ π_k exp(−λ/2 ‖θ − w_k‖²), shape ``[K]``."""
    logits = -0.5 * lam * _sq_dists(theta, centers)
    if log_weights is not None:
        logits = logits + log_weights
    return torch.softmax(logits, dim=-1)


def hard_mixture_penalty(theta: Tree, centers: Tree, lam: float | torch.Tensor) -> torch.Tensor:
    """Hard-assignment limit of the mixture prior: R(θ) = min_k λ/2 ‖θ − w_k‖²."""
    return 0.5 * lam * _sq_dists(theta, centers).min(dim=-1).values


def hard_assignment(scores: torch.Tensor) -> torch.Tensor:
    """One-hot ``[K]`` (float) of argmin_k scores_k (ties: lowest k) — the MAP cluster when the
    scores are per-cluster negative log-likelihoods, e.g. IFCA's j* = argmin_j f_i(w_j).
    Written with comparisons only, so it vmaps."""
    k = torch.argmin(scores, dim=-1, keepdim=True)
    return (torch.arange(scores.shape[-1], device=scores.device) == k).to(scores.dtype)
