"""Tasks: what a model's output is scored against — the training loss and the eval metrics.

An :class:`~fedkin.algorithms.Algorithm` declares its task (``Algorithm.task``); the default
is :data:`CLASSIFICATION`, so classification numbers are unchanged. A task gives

* ``loss(out, x, y)``        the batch training loss L_i(θ; batch) of the model output ``out``;
* ``per_sample(out, x, y)``  ``(score [B], loss [B])`` for evaluation, summed per client and
  summarized over clients as ``<prefix>_<score_name>_{mean,weighted,std,p10}`` and
  ``<prefix>_<loss_name>`` (see :func:`fedkin.core.evaluate.summarize`).

Tasks:

* classification: ``out`` = logits; loss = mean cross-entropy; score = 1[argmax = y] (``acc``),
  eval loss = cross-entropy (``loss``).
* reconstruction (autoencoders, PCA; ``y`` unused): ``out`` = x̂ with ``x``'s shape; training
  loss = (1/B) Σ_b ‖x_b − x̂_b‖² (squared error summed over features, averaged over the batch,
  as ADEPT's code does); score = energy captured 1 − ‖x_b − x̂_b‖²/‖x_b‖² (``energy``, averaged
  over samples as ADEPT's ``evaluate_energy``); eval loss = per-sample MSE ‖x_b − x̂_b‖²/d
  (``mse``).
* diffusion (denoising models, ``denoises = True``: :mod:`fedkin.models.diffusion`; ``y`` is
  replaced by drawn noise): training batches carry per sample a uniform u (the timestep
  t = ⌊u·T⌋) and ε ~ N(0, I), drawn by ``draw`` counter-based in (stream, round, client, step,
  slot, pixel), so engines, backends and resumed runs see the same noise; the model owns its
  loss E‖ε − ε_φ(x_t, t)‖²/D. For evaluation ``out`` = the residual ε_φ(x_t, t) − ε ``[B, D]``
  under the model's fixed evaluation noise; score = 1 − ‖r‖²/D (``denoise``: the fraction of
  the unit noise variance explained), eval loss = ‖r‖²/D (``eps_mse``). Sample quality (KID,
  FID) is a property of a client's generator, not of a test sample:
  :mod:`fedkin.bench.diffusion` computes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Draw = Callable[..., tuple[torch.Tensor, ...]]
PerSample = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Task:
    """A training loss and per-sample evaluation (score, loss) with their metric names."""

    name: str
    loss: Fn
    per_sample: PerSample
    score_name: str
    loss_name: str
    #: ``draw(batches, stream, clients, round)``: the training batches with randomness the loss
    #: needs (diffusion noise) put in place of ``y``; None: batches are used as sampled
    draw: Draw | None = None
    #: True if a sample's evaluation depends on its slot in the evaluated batch (the DDPM's
    #: fixed evaluation noise is keyed by slot): evaluation then runs one client's split at a
    #: time, so a client scores the same in-process, on a Flower node and in any chunking
    per_client_eval: bool = False


def _class_per_sample(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    hit = (logits.argmax(-1) == y).to(logits.dtype)
    return hit, F.cross_entropy(logits, y, reduction="none")


def _sq_err(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (x_hat - x).reshape(x.shape[0], -1).pow(2).sum(1)


def _recon_loss(x_hat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _sq_err(x_hat, x).mean()


def _recon_per_sample(x_hat: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    err = _sq_err(x_hat, x)
    energy = x.reshape(x.shape[0], -1).pow(2).sum(1)
    return 1 - err / energy.clamp(min=1e-12), err / x[0].numel()


CLASSIFICATION = Task(
    "classification",
    lambda logits, x, y: F.cross_entropy(logits, y),
    _class_per_sample,
    "acc",
    "loss",
)
RECONSTRUCTION = Task("reconstruction", _recon_loss, _recon_per_sample, "energy", "mse")


def _residual_loss(r: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return r.pow(2).mean()


def _residual_per_sample(r: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    mse = r.pow(2).mean(1)
    return 1 - mse, mse


def draw_diffusion_noise(
    batches: tuple[torch.Tensor, ...], stream, clients: torch.Tensor, round_: int
) -> tuple[torch.Tensor, ...]:
    """``(xs, noise, …)``: ``ys`` ``[S, C, B]`` (steps, clients, batch) replaced by
    ``[S, C, B, 1 + D]`` holding per sample u ~ U[0, 1) and ε ~ N(0, I_D), D = the features of
    ``xs`` ``[S, C, B, …]``."""
    xs, rest = batches[0], batches[2:]
    s, c, b = xs.shape[:3]
    d = xs[0, 0, 0].numel()
    keys = (
        round_,
        clients.reshape(1, c, 1, 1),
        torch.arange(s).reshape(s, 1, 1, 1),
        torch.arange(b).reshape(1, 1, b, 1),
    )
    u = stream.uniform(*keys, -1)
    eps = stream.normal(*keys, torch.arange(d))
    return (xs, torch.cat([u, eps], -1).to(xs.dtype), *rest)


DIFFUSION = Task(
    "diffusion",
    _residual_loss,
    _residual_per_sample,
    "denoise",
    "eps_mse",
    draw_diffusion_noise,
    per_client_eval=True,
)

#: Every built-in task (``fedkin compare`` reads a run's task off its metric names).
TASKS = (CLASSIFICATION, RECONSTRUCTION, DIFFUSION)
