"""Noise mechanisms and clipping shared by private estimation and private learning.

The Gaussian mechanism releases ``f(D) + N(0, ς² I)`` with ``ς = z · Δ₂``, where ``Δ₂`` is the
L2 sensitivity of ``f`` (the largest ``‖f(D) − f(D')‖₂`` over neighbouring datasets) and ``z``
the *noise multiplier*. The privacy of one release depends on ``z`` alone, which is why the
accountant (:mod:`fedkin.privacy.accountant`) records noise multipliers, not standard
deviations. State the neighbouring relation you computed ``Δ₂`` for: changing one user's whole
data ("replace one") has twice the sensitivity of adding or removing a user for a clipped sum.

Noise is drawn from a caller-supplied :class:`torch.Generator`, never from global RNG state.
A seeded generator is reproducible, which is right for simulations and tests; a real release
needs a secret seed (anyone who knows the seed can subtract the noise).
"""

from __future__ import annotations

import torch


def gaussian_sigma(sensitivity: float, noise_multiplier: float) -> float:
    """Standard deviation ``ς = z · Δ₂`` of the Gaussian mechanism."""
    if sensitivity < 0 or noise_multiplier < 0:
        raise ValueError(
            f"sensitivity and noise_multiplier must be >= 0, got {sensitivity}, {noise_multiplier}"
        )
    return float(sensitivity) * float(noise_multiplier)


def gaussian_noise(
    shape: tuple[int, ...] | torch.Size,
    std: float | torch.Tensor,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``N(0, std²)`` draws of ``shape``; a tensor ``std`` broadcasts against ``shape``."""
    return torch.randn(shape, generator=generator, dtype=dtype) * torch.as_tensor(std, dtype=dtype)


def add_gaussian_noise(
    value: torch.Tensor, sensitivity: float, noise_multiplier: float, generator: torch.Generator
) -> torch.Tensor:
    """The Gaussian mechanism: ``value + N(0, (z Δ₂)² I)``."""
    std = gaussian_sigma(sensitivity, noise_multiplier)
    return value + gaussian_noise(value.shape, std, generator, value.dtype)


def clip_l2(x: torch.Tensor, radius: float, center: torch.Tensor | None = None) -> torch.Tensor:
    """Project each row (last dimension) of ``x`` onto the L2 ball of ``radius`` around ``center``.

    ``Π(x) = c + (x − c) · min(1, r / ‖x − c‖₂)``. After projection a sum over users has
    add/remove sensitivity ``r`` and replace-one sensitivity ``2r``.
    """
    c = torch.zeros(x.shape[-1], dtype=x.dtype) if center is None else center.to(x.dtype)
    delta = x - c
    norm = torch.linalg.vector_norm(delta, dim=-1, keepdim=True)
    scale = torch.clamp(radius / torch.clamp(norm, min=torch.finfo(x.dtype).tiny), max=1.0)
    return c + delta * scale


def clip_box(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Clamp each coordinate of ``x`` into ``[low_k, high_k]`` (broadcast on the last dimension).

    The clamped value lies in a box of half-widths ``h = (high − low)/2`` around its centre, so a
    sum over users has replace-one L2 sensitivity ``2‖h‖₂``.
    """
    return torch.minimum(torch.maximum(x, low.to(x.dtype)), high.to(x.dtype))
