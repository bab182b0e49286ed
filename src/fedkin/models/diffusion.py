"""A conditional DDPM for personalized generation (SPIRE, ADEPT-DGM): diffusers' ``UNet2DModel``
as the noise predictor ε_φ(x_t, t, e) and its ``DDPMScheduler`` as the noise schedule.

Model (Ho et al. 2020, ε-prediction, linear β schedule β_1..β_T, ᾱ_t = Π_{s≤t}(1 − β_s)):

    x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε,   ε ~ N(0, I),  t ~ U{0, …, T−1},
    L(φ, e) = E_{t,ε} ‖ε − ε_φ(x_t, t, e)‖² / D      (D = pixels; the diffusion task's loss).

The client embedding e ∈ ℝ^{d_e} (d_e = the time-embedding width, ``embedding_dim``, by default
4·channels[0] as in diffusers) is added to the timestep embedding: it is the U-Net's
class-embedding table with **one row**, the row of the client that holds the model
(``unet.class_embedding.weight``, shape ``[1, d_e]``), looked up with class label 0. A
server-side table E ∈ ℝ^{m×d_e} of which client i updates only row i is the same thing; keeping
the row in the client's parameters lets every algorithm treat it as an ordinary parameter (SPIRE
keeps it on the client, FedAvg averages it, Local trains it).

Images: data rows in [0, 1] are reshaped to ``image_shape`` and mapped to x_0 = 2x − 1;
samples are mapped back by (x + 1)/2.

Calling convention (a model that ``owns_loss``, see :mod:`fedkin.algorithms.base`):

* ``model(x, targets=noise)`` is the training loss; ``noise`` ``[B, 1 + D]`` holds per sample a
  uniform u ∈ [0, 1) (t = ⌊u·T⌋) and ε, drawn counter-based by the diffusion task
  (:data:`fedkin.core.tasks.DIFFUSION`) so that every engine and a resumed run see the same
  noise.
* ``model(x)`` is the per-sample residual ε_φ(x_t, t) − ε ``[B, D]`` under a *fixed* evaluation
  noise (slot b of every batch gets the same (t_b, ε_b)), which the diffusion task turns into
  the denoising MSE and score.

vmap: diffusers' ``nn.GroupNorm`` fails under ``torch.func.vmap`` in torch 2.13
("NYI: querying is_contiguous inside of vmap"), so every GroupNorm is replaced by
:class:`VmapGroupNorm` (the same affine group normalization written with reshapes and means;
tested equal). The U-Net is built without attention blocks (``add_attention=False``), whose CPU
attention kernel has no vmap batching rule; with both, the model runs on the vectorized engine.
"""

from __future__ import annotations

import copy
import math
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedkin.core.rng import Stream

#: parameters whose name contains this are the client embedding e (SPIRE's personal part)
EMBEDDING_KEY = "class_embedding"
#: the fixed evaluation noise of ``model(x)``
EVAL_STREAM = Stream(0).child("ddpm-eval")


class VmapGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` computed with reshapes and means, so it runs under ``vmap``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], self.num_groups, -1)
        mean = h.mean(-1, keepdim=True)
        var = h.var(-1, unbiased=False, keepdim=True)
        h = ((h - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        if not self.affine:
            return h
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        return h * self.weight.reshape(shape) + self.bias.reshape(shape)


def make_vmappable(module: nn.Module) -> nn.Module:
    """Replace every ``nn.GroupNorm`` in ``module`` by a :class:`VmapGroupNorm` (same state)."""
    for name, child in module.named_children():
        if type(child) is nn.GroupNorm:
            new = VmapGroupNorm(child.num_groups, child.num_channels, child.eps, child.affine)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            make_vmappable(child)
    return module


class ConditionalDDPM(nn.Module):
    """ε_φ(x_t, t, e): a small diffusers U-Net with a one-row class-embedding table (e)."""

    owns_loss = True
    #: trained by denoising: algorithms use the diffusion task (noise drawn with the batches)
    denoises = True

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        channels: list[int],
        layers_per_block: int,
        norm_groups: int,
        timesteps: int,
        beta_start: float,
        beta_end: float,
        embedding_dim: int | None = None,
    ) -> None:
        from diffusers import DDPMScheduler, UNet2DModel

        super().__init__()
        c, h, w = image_shape
        self.image_shape = tuple(image_shape)
        self.unet = make_vmappable(
            UNet2DModel(
                sample_size=(h, w),
                in_channels=c,
                out_channels=c,
                block_out_channels=tuple(channels),
                down_block_types=("DownBlock2D",) * len(channels),
                up_block_types=("UpBlock2D",) * len(channels),
                layers_per_block=layers_per_block,
                norm_num_groups=norm_groups,
                add_attention=False,
                num_class_embeds=1,
                time_embedding_dim=embedding_dim,
            )
        )
        self.scheduler = DDPMScheduler(
            num_train_timesteps=timesteps,
            beta_schedule="linear",
            beta_start=beta_start,
            beta_end=beta_end,
            prediction_type="epsilon",
        )
        # ᾱ_t as a buffer: diffusers' add_noise reassigns scheduler state, which must not
        # happen inside vmap/grad (the scheduler would keep a transformed tensor)
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone(), False)
        self.timesteps = timesteps
        self.pixels = math.prod(image_shape)

    def epsilon(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε_φ(x_t, t, e) for a batch ``x_t`` ``[B, C, H, W]`` and timesteps ``t`` ``[B]``."""
        label = torch.zeros(x_t.shape[0], dtype=torch.long)
        return self.unet(x_t, t, class_labels=label).sample

    def residual(self, x: torch.Tensor, u: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """ε_φ(x_t, t) − ε ``[B, D]`` for data rows ``x`` in [0, 1], t = ⌊u·T⌋ and noise ε."""
        x0 = 2 * x.reshape(-1, *self.image_shape) - 1
        eps = eps.reshape(x0.shape).to(x0.dtype)
        t = (u * self.timesteps).long().clamp(max=self.timesteps - 1)
        abar = self.alphas_cumprod[t].to(x0.dtype).reshape(-1, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps  # = DDPMScheduler.add_noise
        return (self.epsilon(x_t, t) - eps).reshape(x0.shape[0], -1)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is not None:
            return self.residual(x, targets[:, 0], targets[:, 1:]).pow(2).mean()
        slots = torch.arange(x.shape[0]).unsqueeze(1)
        u = EVAL_STREAM.uniform(slots, -1).squeeze(1).to(x.dtype)
        eps = EVAL_STREAM.normal(slots, torch.arange(self.pixels)).to(x.dtype)
        return self.residual(x, u, eps)

    @torch.no_grad()
    def sample(self, params: dict, n: int, steps: int, seed: int) -> torch.Tensor:
        """``n`` images in [0, 1] ``[n, C, H, W]`` from the model with parameters ``params``:
        ancestral DDPM sampling on ``steps`` evenly spaced timesteps of the T-step schedule
        (diffusers' ``DDPMScheduler.step``, x̂_0 clipped to [−1, 1]), starting from
        x_T ~ N(0, I); all noise from a generator seeded by ``seed``."""
        model = copy.deepcopy(self)
        model.load_state_dict({**model.state_dict(), **params})
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(steps)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(n, *self.image_shape, generator=gen)
        for t in scheduler.timesteps:
            eps = model.epsilon(x, torch.full((n,), int(t), dtype=torch.long))
            x = scheduler.step(eps, int(t), x, generator=gen).prev_sample
        return ((x + 1) / 2).clamp(0, 1)


class DdpmConfig(BaseModel):
    """Conditional DDPM (diffusion task; SPIRE, ADEPT-DGM or any algorithm)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["ddpm"] = "ddpm"
    channels: list[Annotated[int, Field(gt=0)]] = Field(
        [16, 32],
        min_length=1,
        description="U-Net block widths (diffusers block_out_channels), one down/up block "
        "each; every width a multiple of norm_groups",
    )
    embedding_dim: int | None = Field(
        None,
        gt=0,
        description="d_e, the width of the timestep embedding and so of the client embedding "
        "added to it (diffusers time_embedding_dim); None: 4·channels[0]",
    )
    layers_per_block: int = Field(1, gt=0, description="ResNet layers per U-Net block")
    norm_groups: int = Field(8, gt=0, description="groups of every GroupNorm")
    timesteps: int = Field(1000, gt=1, description="diffusion steps T of the training schedule")
    beta_start: float = Field(1e-4, gt=0, lt=1, description="β_1 of the linear β schedule")
    beta_end: float = Field(0.02, gt=0, lt=1, description="β_T of the linear β schedule")

    def build(self, feature_shape: tuple[int, ...], image_shape, num_classes: int) -> nn.Module:
        from fedkin.core.errors import ConfigError

        if image_shape is None:
            raise ConfigError("model.name: 'ddpm' needs image data; this dataset is tabular")
        bad = [c for c in self.channels if c % self.norm_groups]
        if bad:
            raise ConfigError(
                f"model.channels: {bad} are not multiples of model.norm_groups={self.norm_groups}"
            )
        return ConditionalDDPM(
            tuple(image_shape),
            list(self.channels),
            self.layers_per_block,
            self.norm_groups,
            self.timesteps,
            self.beta_start,
            self.beta_end,
            self.embedding_dim,
        )
