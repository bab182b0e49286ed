"""Zeroth-order (SPSA) gradient estimates from seeds: MeZO (Malladi et al. 2023), ZO-SGD with
q perturbations, ZO-Adam, Sparse MeZO (Liu et al. 2024), and FedKSeed's seed pool (Qin et al.
2024).

**SPSA.** For directions z_j ~ N(0, I) regenerated from seeds (j = 1…q),

    p_j = (L(θ + ε m⊙z_j) − L(θ − ε m⊙z_j)) / (2ε),      ĝ = (1/q) Σ_j p_j·(m⊙z_j),

two forward passes per direction and no backward. With m = 1 (MeZO), E[ĝ] = E[zzᵀ]∇L + O(ε²)
= ∇L + O(ε²) (for a quadratic the central difference is exact, so ĝ is unbiased for every ε);
q directions divide the variance by q (ZO-SGD with q perturbations, "n-SPSA" in MeZO §2).
The optimizer chain then runs on ĝ as on a gradient: ZO-SGD is −ηĝ, ZO-Adam is Adam's moments
on ĝ (``scale_by_adam`` → −η), exactly as ZO-Bench's ZO-Adam runs ``torch.optim.Adam`` on ĝ.

**Sparse MeZO** perturbs and updates only small-magnitude weights: per parameter tensor
(layer) l, m_l = 1[|θ_l| ≤ h_l] with h_l the ⌈ρ·n_l⌉-th smallest |θ_l| (ρ = ``density``, the
fraction of each layer perturbed; the reference code calls the quantile "sparsity"). The mask
is computed from the unperturbed θ at the start of each step and kept for the step (1 byte per
parameter), so +ε, −2ε, +ε and the update all touch the same coordinates.

**The seed trick.** z_j is counter-based (:func:`fedkin.core.rng.normal` of (seed, key, j,
leaf, element)) with key = hash(round, client, phase, solve, step): a :class:`SeedGradient`
holds ĝ as (key, the q scalars p_j/q, masks) — never z itself — and any engine, machine or
later replay rebuilds the same z. On the sequential engine the local solve owns its copy of
θ, so (as MeZO's ``zo_perturb_parameters``/``zo_update``) θ is perturbed in place
(θ += εz; θ −= 2εz; θ += εz — restored up to float rounding) and a plain ZO-SGD step
θ −= η Σ_j (p_j/q) m⊙z_j is applied in place too, regenerating z in chunks of
d/64 elements: the memory of a step is the weights, one forward's activations, and
a chunk of z (plus Sparse MeZO's masks) — that of inference. Under ``vmap`` (the vectorized
engine) tensors are batched views that cannot be mutated in place, so θ ± εz are
temporaries, and each z_j is generated once per step and ĝ kept dense (memory there is the
cohort's anyway; regenerating z costs ~70 integer/float operations per element). Chains
with state (momentum, Adam), clipping, schedules or bf16 materialize ĝ and step as a
first-order optimizer would.

**FedKSeed** restricts the directions to a pool of K shared seeds: a client's local ZO-SGD
trajectory Δ = −η Σ_s p_s z_{k_s} is then Σ_k c_k z_k with c_k = −η Σ_{s: k_s = k} p_s, so
(index, scalar) pairs reconstruct it exactly (:func:`seed_direction`, :func:`reconstruct`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import ClassVar, Literal, NamedTuple

import torch
from pydantic import Field

from fedkin.core.rng import hash_counters, normal
from fedkin.core.tree import Tree, tree_add, tree_leaves, tree_map, tree_scale, tree_zeros_like
from fedkin.optim.configs import AdamConfig, BaseOptimizerConfig, SgdConfig
from fedkin.optim.optimizer import Optimizer

#: z is regenerated in place in chunks of d/CHUNK_FRACTION elements (d parameters), clamped to
#: [MIN_CHUNK, MAX_CHUNK]: the counter-based normal's temporaries (~40 bytes per element: int64
#: hashes, float64 Box–Muller) then stay under a sixth of the fp32 weights' bytes
CHUNK_FRACTION, MIN_CHUNK, MAX_CHUNK = 64, 256, 1 << 16


def seed_direction(params: Tree, seed: int, *index: torch.Tensor | int) -> Tree:
    """z(index) ~ N(0, I) shaped like ``params`` (counter-based; ``index`` may be batched)."""
    leaf = iter(range(len(tree_leaves(params))))

    def draw(v: torch.Tensor) -> torch.Tensor:
        z = normal(seed, *index, next(leaf), torch.arange(v.numel(), device=v.device))
        return z.reshape(v.shape).to(v.dtype)

    return tree_map(draw, params)


def spsa_scalar(
    loss: Callable[[Tree], torch.Tensor], params: Tree, z: Tree, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """p = (L(θ + εz) − L(θ − εz))/(2ε), the projected gradient along z (two forwards), and
    the mean of the two losses (≈ L(θ))."""
    plus = loss(tree_add(params, z, eps))
    minus = loss(tree_add(params, z, -eps))
    return (plus - minus) / (2 * eps), (plus + minus) / 2


def reconstruct(params: Tree, seed: int, scalars: torch.Tensor) -> Tree:
    """Σ_k c_k z_k over the pool (``scalars`` = c, one per pool index; zeros are skipped)."""
    total = tree_map(torch.zeros_like, params)
    for k in torch.nonzero(scalars).flatten().tolist():
        total = tree_add(total, seed_direction(params, seed, k), scalars[k])
    return total


# ----- SPSA estimates held as seeds ------------------------------------------------------------


class SeedGradient(NamedTuple):
    """ĝ = Σ_j coefs[j]·(m ⊙ z_j) with z_j = z(seed, key, j): a gradient estimate as seeds."""

    #: c_j = p_j/q, one per direction (a [q] tensor; batched under vmap)
    coefs: torch.Tensor
    #: 0-d hash naming this step's directions
    key: torch.Tensor
    #: Sparse MeZO's masks (bool, shaped like the parameters), or None: every coordinate
    masks: Tree | None
    #: True if the parameters are the solver's own tensors, updated in place
    inplace: bool
    #: ĝ itself when it was estimated without in-place updates (under ``vmap``, where memory is
    #: the cohort's anyway): each z_j is then generated once per step, not four times
    dense: Tree | None = None


def mutable() -> bool:
    """True outside ``torch.func`` transforms: tensors may then be updated in place. Inside
    ``vmap`` (or ``grad``) they may not — a tensor shared by the cohort is not batched, so
    adding a per-client z to it in place is an error."""
    return torch._C._functorch.maybe_current_level() is None


def add_directions(
    params: Tree,
    seed: int,
    key: torch.Tensor,
    coefs: Sequence[tuple[int, torch.Tensor | float]],
    masks: Tree | None = None,
    inplace: bool = False,
) -> Tree:
    """θ + Σ_{(j, c)} c·(m ⊙ z_j): in place (chunk by chunk, returning ``params`` itself) or as
    a new tree."""
    leaves = tree_leaves(params)
    leaf = iter(range(len(leaves)))
    mask_leaves = iter(tree_leaves(masks) if masks is not None else [])
    d = sum(t.numel() for t in leaves)
    chunk = min(max(d // CHUNK_FRACTION, MIN_CHUNK), MAX_CHUNK)

    def one(p: torch.Tensor) -> torch.Tensor:
        i, m = next(leaf), next(mask_leaves, None)
        if not inplace:
            idx = torch.arange(p.numel())
            step = sum(c * normal(seed, key, j, i, idx) for j, c in coefs)
            step = step.reshape(p.shape).to(p.dtype)
            return p + (step * m if m is not None else step)
        flat, mflat = p.view(-1), (m.view(-1) if m is not None else None)
        for start in range(0, p.numel(), chunk):
            end = min(start + chunk, p.numel())
            idx = torch.arange(start, end)
            for j, c in coefs:
                z = normal(seed, key, j, i, idx).to(p.dtype).mul_(c)
                if mflat is not None:
                    z.mul_(mflat[start:end])
                flat[start:end].add_(z)
        return p

    with torch.no_grad():
        out = tree_map(one, params)
    return params if inplace else out


def densify(params: Tree, seed: int, g: SeedGradient) -> Tree:
    """ĝ as a tree of tensors shaped like ``params`` (for chains that need it)."""
    if g.dense is not None:
        return g.dense
    coefs = [(j, g.coefs[j]) for j in range(g.coefs.shape[0])]
    return add_directions(tree_map(torch.zeros_like, params), seed, g.key, coefs, g.masks)


def magnitude_masks(params: Tree, density: float, low_memory: bool = True) -> Tree:
    """Sparse MeZO's masks m_l = 1[|θ_l| ≤ h_l], h_l the ⌈ρ·n_l⌉-th smallest |θ_l|.

    ``low_memory``: h_l is found by bisection on the bit patterns of |θ_l| in fp32
    (non-negative floats order as their int32 bits): 31 halvings of [0, +inf) pin it exactly.
    Each count runs over eighths of the tensor, so besides the kept bool mask only an
    eighth-sized temporary is alive (``kthvalue`` copies the tensor several times over).
    Otherwise ``kthvalue`` (31 passes fewer). Both give the same exact h_l; both vmap.
    """

    def bits(p: torch.Tensor) -> torch.Tensor:
        return p.detach().abs().float().view(torch.int32)

    def mask(p: torch.Tensor) -> torch.Tensor:
        flat = p.reshape(-1)
        n = flat.shape[0]
        k = min(max(1, math.ceil(density * n - 1e-9)), n)  # ⌈ρn⌉
        if not low_memory:
            return bits(p) <= bits(flat.abs().kthvalue(k).values)
        step = max(-(-n // 8), MIN_CHUNK)
        lo = torch.zeros((), dtype=torch.int32)
        hi = torch.full((), 0x7F800000, dtype=torch.int32)  # +inf: count(≤ hi) ≥ k
        for _ in range(31):
            mid = lo + (hi - lo) // 2
            count = sum(
                torch.count_nonzero(bits(flat[i : i + step]) <= mid) for i in range(0, n, step)
            )
            enough = count >= k
            hi, lo = torch.where(enough, mid, hi), torch.where(enough, lo, mid + 1)
        return torch.cat([bits(flat[i : i + step]) <= hi for i in range(0, n, step)]).view(p.shape)

    return tree_map(mask, params)


class ZerothOrder(NamedTuple):
    """The SPSA estimator of a zeroth-order optimizer (see module doc)."""

    #: perturbation scale ε
    eps: float
    #: q directions per step, averaged
    perturbations: int
    #: seed of the directions
    seed: int
    #: Sparse MeZO's ρ (fraction of each tensor perturbed), or None: all coordinates
    density: float | None = None

    def key(self, *counters: torch.Tensor | int) -> torch.Tensor:
        """The 0-d key of one step's directions, from e.g. (round, client, phase, solve, step)."""
        return hash_counters(self.seed, *counters)

    def estimate(
        self,
        objective: Callable[[Tree], tuple[torch.Tensor, torch.Tensor]],
        params: Tree,
        key: torch.Tensor,
    ) -> tuple[SeedGradient, torch.Tensor]:
        """ĝ of ``objective(θ) -> (total, data loss)``'s total at θ = ``params`` and the mean
        data loss of the 2q forward passes. Perturbs ``params`` in place (restoring them up to
        rounding) when :func:`mutable`; no autograd graph is built."""
        inplace, q = mutable(), self.perturbations
        masks = None
        if self.density is not None:
            masks = magnitude_masks(params, self.density, low_memory=inplace)
        eps, scalars, losses, dense = self.eps, [], [], None
        with torch.no_grad():
            for j in range(q):
                if inplace:
                    plus = objective(
                        add_directions(params, self.seed, key, [(j, eps)], masks, True)
                    )
                    add_directions(params, self.seed, key, [(j, -2 * eps)], masks, True)
                    minus = objective(params)
                    add_directions(params, self.seed, key, [(j, eps)], masks, True)
                else:
                    z = add_directions(tree_zeros_like(params), self.seed, key, [(j, 1.0)], masks)
                    plus = objective(tree_add(params, z, eps))
                    minus = objective(tree_add(params, z, -eps))
                scalars.append((plus[0] - minus[0]) / (2 * eps))
                losses.append((plus[1] + minus[1]) / 2)
                if not inplace:
                    c = scalars[-1] / q
                    dense = tree_scale(z, c) if dense is None else tree_add(dense, z, c)
        coefs = torch.stack(scalars) / q
        return SeedGradient(coefs, key, masks, inplace, dense), torch.stack(losses).mean()


def zeroth_order(estimator: ZerothOrder, inner: Optimizer, fused_lr: float | None) -> Optimizer:
    """A zeroth-order optimizer: ``inner``'s chain stepping on ĝ, with ``estimator`` attached
    for :meth:`~fedkin.algorithms.base.Algorithm.local_solve`. ``fused_lr`` = η marks plain
    ZO-SGD, whose step θ − ηĝ = θ + Σ_j (−η c_j) m⊙z_j is applied from the seeds (in place
    when the solver owns θ) without materializing ĝ."""

    def step(grads: SeedGradient, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        if not isinstance(grads, SeedGradient):
            raise TypeError(
                "a zeroth-order optimizer steps on SPSA estimates from Algorithm.local_solve; "
                "this algorithm passed it a gradient"
            )
        if fused_lr is None:
            return inner.step(densify(params, estimator.seed, grads), state, params)
        if grads.dense is not None:
            return tree_add(params, grads.dense, -fused_lr), state
        coefs = [(j, -fused_lr * grads.coefs[j]) for j in range(grads.coefs.shape[0])]
        new = add_directions(params, estimator.seed, grads.key, coefs, grads.masks, grads.inplace)
        return new, state

    return Optimizer(inner.init, step, inner.lr, estimator=estimator)


# ----- configs ----------------------------------------------------------------------------------


class ZerothOrderConfig(BaseOptimizerConfig):
    """Options of every zeroth-order optimizer: the SPSA estimate ĝ takes the gradient's place
    in the chain g → clip → direction → −η_t·(…). Needs no backward pass; works with the
    algorithms whose gradients all come from the shared local solver."""

    zeroth_order: ClassVar[bool] = True
    lr: float = Field(1e-3, gt=0, description="learning rate η (peak value under a schedule)")
    zo_eps: float = Field(1e-3, gt=0, description="perturbation scale ε of the SPSA estimate")
    perturbations: int = Field(
        1, ge=1, description="q: directions per step, their estimates averaged (2q forwards)"
    )
    zo_seed: int = Field(0, ge=0, description="seed of the perturbation directions z")

    def estimator(self) -> ZerothOrder:
        return ZerothOrder(self.zo_eps, self.perturbations, self.zo_seed)

    def build(self) -> Optimizer:
        plain = (
            self.direction() is None
            and self.clip_norm is None
            and self.precision == "fp32"
            and self.schedule.kind == "constant"
        )
        return zeroth_order(self.estimator(), super().build(), self.lr if plain else None)


class ZoSgdConfig(ZerothOrderConfig, SgdConfig):
    """ZO-SGD: the average of q SPSA estimates, then SGD (momentum: ZO-SGD-MMT)."""

    name: Literal["zo-sgd"] = "zo-sgd"  # type: ignore[assignment]
    perturbations: int = Field(
        4, ge=1, description="q: directions per step, their estimates averaged (2q forwards)"
    )


class MezoConfig(ZoSgdConfig):
    """MeZO: in-place ZO-SGD with one SPSA direction per step, z regenerated from its seed."""

    name: Literal["mezo"] = "mezo"  # type: ignore[assignment]
    perturbations: int = Field(
        1, ge=1, description="q: directions per step, their estimates averaged (2q forwards)"
    )


class SparseMezoConfig(MezoConfig):
    """Sparse MeZO: MeZO on the small-magnitude weights only (per-tensor magnitude mask)."""

    name: Literal["sparse-mezo"] = "sparse-mezo"  # type: ignore[assignment]
    density: float = Field(
        0.25,
        gt=0,
        le=1,
        description="ρ: fraction of each parameter tensor perturbed and updated, its "
        "smallest-magnitude entries (mask recomputed from θ every step)",
    )

    def estimator(self) -> ZerothOrder:
        return ZerothOrder(self.zo_eps, self.perturbations, self.zo_seed, self.density)


class ZoAdamConfig(ZerothOrderConfig, AdamConfig):
    """ZO-Adam: Adam's moments on the SPSA estimate (2 states per parameter)."""

    name: Literal["zo-adam"] = "zo-adam"  # type: ignore[assignment]
