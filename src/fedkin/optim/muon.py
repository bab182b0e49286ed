"""Muon and MuonBP: momentum orthogonalized by a Newton–Schulz iteration, for 2-D weights.

Muon (Jordan et al. 2024; ``torch.optim.Muon``) on a matrix parameter W (m × n):

    B ← μB + (1−μ)G,   U = (1−μ)G + μB (Nesterov) or B,
    O = NS₅(U) ≈ polar factor of U,   W ← W − η·s(m, n)·O − ηλW,

with s = √max(1, m/n) ('original') or 0.2·√max(m, n) ('match_rms_adamw'), and NS₅ five steps of
the quintic X ← aX + (bA + cA²)X, A = XXᵀ, (a, b, c) = (3.4445, −4.7750, 2.0315), on X = U/‖U‖_F
in bf16 (transposed so that m ≤ n) — the same operations as torch 2.13's ``_muon.py``.

MuonBP (Khaled, Ozkara, Yu, Hong, Park 2025, arXiv 2510.16981): with W sharded by rows into b
blocks (tensor/FSDP dim-0 sharding), each block's momentum is orthogonalized on its own device
(no gather) except every P-th step, when the full matrix is gathered and orthogonalized:

    step t (t = 0, 1, …):  O = NS(U)                          if t mod P = 0  (step size η_full)
                           O = [NS(U₁); …; NS(U_b)]            otherwise       (step size η_block)

with the RMS-matching factor s of the full matrix on full steps and of the block shape on block
steps. P = 1 is Muon; P = ∞ is block-only Muon. Here the blocks are simulated on one machine
(the orthogonalization is a function of the block alone, so the numbers equal a sharded run's):
:func:`scale_by_muonbp` is the vmappable client optimizer, :class:`ShardedMuonBP` keeps each
shard's momentum on its own simulated device and counts the bytes it gathers, and
:func:`muonbp_costs` counts the Newton–Schulz FLOPs and gathered bytes (equal to the measured
ones, tested).
Under ``vmap`` both branches are computed and one is selected by ``torch.where`` (the step
count is a tensor), so the simulation saves no compute; the saving is what :func:`muonbp_costs`
reports.

Non-matrix parameters (biases, and conv kernels, which torch's Muon rejects) go to AdamW via
:func:`~fedkin.optim.transform.partition`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch._C._functorch import is_batchedtensor

from fedkin.core.tree import Tree, tree_map, tree_zeros_like
from fedkin.optim.configs import MatrixOptimizerConfig
from fedkin.optim.transform import GradientTransformation

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
AdjustLr = Literal["original", "match_rms_adamw"]


def _addmm(s: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, beta: float, alpha: float = 1.0):
    """β·S + α·M₁M₂ of bf16 matrices, rounded to bf16 once.

    Unbatched: ``torch.addmm`` (bit-identical to ``torch.optim.Muon``). Under ``vmap`` the
    batched ``addmm`` rounds the product before adding (Newton–Schulz outputs then differ by
    ~4%), so there the fp32-accumulated form is used; it equals the CPU kernel except for one
    bf16 ulp in about 1e-4 of the elements (measured), so vectorized and per-client runs of
    Muon agree to bf16 rounding, not bitwise.
    """
    if is_batchedtensor(s) or is_batchedtensor(m1) or is_batchedtensor(m2):
        return (beta * s.float() + alpha * (m1.float() @ m2.float())).bfloat16()
    return torch.addmm(s, m1, m2, beta=beta, alpha=alpha)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """≈ UVᵀ for G = UΣVᵀ: ``steps`` quintic Newton–Schulz iterations in bf16 (torch's order).

    Bit-identical to torch 2.13's ``_zeropower_via_newtonschulz`` outside ``vmap`` (see
    :func:`_addmm` for inside).
    """
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16()
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = _addmm(x, _addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def shape_factor(shape: tuple[int, ...], adjust: AdjustLr) -> float:
    """s(m, n): √max(1, m/n) ('original', Keller) or 0.2·√max(m, n) ('match_rms_adamw')."""
    m, n = shape[0], shape[1]
    return math.sqrt(max(1.0, m / n)) if adjust == "original" else 0.2 * math.sqrt(max(m, n))


def _momentum(grads: Tree, state: Tree, momentum: float, nesterov: bool) -> tuple[Tree, Tree]:
    buf = tree_map(lambda b, g: b.lerp(g, 1 - momentum), state["m"], grads)
    u = tree_map(lambda g, b: g.lerp(b, momentum), grads, buf) if nesterov else buf
    return u, buf


def scale_by_muon(
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    eps: float = 1e-7,
    adjust: AdjustLr = "original",
) -> GradientTransformation:
    """u = s(m, n)·NS(U) for every (2-D) leaf, U the (Nesterov) momentum of the gradients."""

    def init(params: Tree) -> Tree:
        return {"m": tree_zeros_like(params)}

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        u, buf = _momentum(grads, state, momentum, nesterov)
        out = tree_map(
            lambda x: (
                shape_factor(tuple(x.shape), adjust) * newton_schulz(x, ns_steps, eps).to(x.dtype)
            ),
            u,
        )
        return out, {"m": buf}

    return GradientTransformation(init, update)


def scale_by_muonbp(
    blocks: int,
    period: int,
    block_lr_ratio: float = 1.0,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    eps: float = 1e-7,
    adjust: AdjustLr = "original",
) -> GradientTransformation:
    """Block-periodic :func:`scale_by_muon`: full NS on steps t ≡ 0 (mod P), else NS of each of
    ``blocks`` row blocks, scaled by η_block/η_full = ``block_lr_ratio`` and the block's s."""

    def block_ns(x: torch.Tensor) -> torch.Tensor:
        parts = torch.chunk(x, blocks, dim=0)
        return torch.cat(
            [
                shape_factor(tuple(p.shape), adjust) * newton_schulz(p, ns_steps, eps).to(x.dtype)
                for p in parts
            ]
        )

    def init(params: Tree) -> Tree:
        return {"m": tree_zeros_like(params), "count": torch.zeros((), dtype=torch.int64)}

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        u, buf = _momentum(grads, state, momentum, nesterov)
        full = state["count"] % period == 0

        def direction(x: torch.Tensor) -> torch.Tensor:
            whole = shape_factor(tuple(x.shape), adjust) * newton_schulz(x, ns_steps, eps).to(
                x.dtype
            )
            return torch.where(full, whole, block_lr_ratio * block_ns(x))

        return tree_map(direction, u), {"m": buf, "count": state["count"] + 1}

    return GradientTransformation(init, update)


def muonbp_costs(shape: tuple[int, int], blocks: int, period: int, ns_steps: int = 5) -> dict:
    """Per-step Newton–Schulz FLOPs and gathered bytes for one m × n matrix sharded by rows.

    NS on an a × c matrix (a ≤ c after transposing) costs ``ns_steps``·(4a²c + 2a³) FLOPs
    (XXᵀ: 2a²c, A·A: 2a³, (bA+cA²)X: 2a²c). Muon gathers the (b−1)/b of the bf16 momentum held
    by other devices every step; MuonBP only every P-th step. Averages over P steps.
    """
    m, n = shape

    def ns_flops(r: int, c: int) -> int:
        a, c = min(r, c), max(r, c)
        return ns_steps * (4 * a * a * c + 2 * a**3)

    full = ns_flops(m, n)
    block = sum(ns_flops(len(rows), n) for rows in torch.arange(m).chunk(blocks))
    gathered = 2 * m * n * (blocks - 1) / blocks  # bf16 bytes from the other devices
    bp_flops = (full + (period - 1) * block) / period
    return {
        "muon_ns_flops": full,
        "muonbp_ns_flops": bp_flops,
        "flops_saved_fraction": 1 - bp_flops / full,
        "muon_gather_bytes": gathered,
        "muonbp_gather_bytes": gathered / period,
    }


class ShardedMuonBP:
    """MuonBP on one m × n matrix sharded by rows over ``len(rows)`` simulated devices, each
    holding its own gradient and momentum shard; the only communication is the gather of the
    other devices' bf16 (Nesterov) momentum on full steps, whose bytes are counted as they are
    moved (``gathered_bytes``: received by one device, averaged over devices).

    The updates equal :func:`scale_by_muonbp`'s on the whole matrix (the same block and full
    directions); ``torch.utils.flop_counter`` on :meth:`step` measures the Newton–Schulz FLOPs
    that :func:`muonbp_costs` counts. Not vmapped (it is the per-matrix view of a sharded run).
    """

    def __init__(
        self,
        shapes: list[tuple[int, int]],
        period: int,
        block_lr_ratio: float = 1.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        eps: float = 1e-7,
        adjust: AdjustLr = "original",
    ) -> None:
        self.period, self.ratio, self.mu, self.nesterov = period, block_lr_ratio, momentum, nesterov
        self.ns_steps, self.eps, self.adjust = ns_steps, eps, adjust
        self.momenta = [torch.zeros(shape) for shape in shapes]
        self.count = 0
        self.gathered_bytes = 0.0

    def _ns(self, x: torch.Tensor) -> torch.Tensor:
        factor = shape_factor(tuple(x.shape), self.adjust)
        return factor * newton_schulz(x, self.ns_steps, self.eps).to(x.dtype)

    def step(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each device's direction (before −η and decay) from its gradient shard."""
        self.momenta = [b.lerp(g, 1 - self.mu) for b, g in zip(self.momenta, grads, strict=True)]
        local = [
            g.lerp(b, self.mu) if self.nesterov else b
            for g, b in zip(grads, self.momenta, strict=True)
        ]
        full = self.count % self.period == 0
        self.count += 1
        if not full:
            return [self.ratio * self._ns(u) for u in local]
        sent = [u.bfloat16() for u in local]  # what goes over the wire
        received = [
            sum(t.numel() * t.element_size() for j, t in enumerate(sent) if j != k)
            for k in range(len(sent))
        ]
        self.gathered_bytes += sum(received) / len(received)
        whole = self._ns(torch.cat(local))  # every device orthogonalizes the gathered matrix
        return list(whole.split([u.size(0) for u in local]))


class MuonConfig(MatrixOptimizerConfig):
    """Muon on 2-D weights (torch.optim.Muon), AdamW on the other parameters."""

    name: Literal["muon"] = "muon"
    lr: float = Field(1e-3, gt=0, description="learning rate η of the 2-D weights")
    momentum: float = Field(0.95, ge=0, lt=1, description="momentum μ (EMA form, as torch)")
    nesterov: bool = Field(True, description="orthogonalize (1−μ)G + μB instead of B")
    weight_decay: float = Field(0.1, ge=0, description="decoupled weight decay λ (2-D weights)")
    ns_steps: int = Field(5, ge=1, le=99, description="Newton–Schulz iterations")
    eps: float = Field(1e-7, gt=0, description="ε in X / max(‖X‖_F, ε)")
    adjust_lr: AdjustLr = Field(
        "original",
        description="shape factor s: 'original' √max(1, m/n); 'match_rms_adamw' 0.2·√max(m, n)",
    )

    def matrix_direction(self) -> GradientTransformation:
        return scale_by_muon(self.momentum, self.nesterov, self.ns_steps, self.eps, self.adjust_lr)


class MuonBPConfig(MuonConfig):
    """MuonBP: Muon with block-periodic orthogonalization (row blocks simulated on one machine)."""

    name: Literal["muonbp"] = "muonbp"  # type: ignore[assignment]
    blocks: int = Field(2, ge=1, description="row blocks (shards) per matrix")
    period: int = Field(5, ge=1, description="P: full orthogonalization every P-th step")
    block_lr_ratio: float = Field(
        1.0, gt=0, description="η_block / η_full (block steps' step size relative to lr)"
    )

    def matrix_direction(self) -> GradientTransformation:
        return scale_by_muonbp(
            self.blocks,
            self.period,
            self.block_lr_ratio,
            self.momentum,
            self.nesterov,
            self.ns_steps,
            self.eps,
            self.adjust_lr,
        )
