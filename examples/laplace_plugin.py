"""An example fedkin plugin: a custom algorithm, dataset and model, registered on import.

Load it on any command with ``--plugin laplace_plugin`` (from this directory, or with it on
``PYTHONPATH``); the run's ``config.yaml`` records it, so ``fedkin run --resume DIR`` and
``fedkin compare`` find it again. See ``examples/README.md``.

* ``laplace-ditto`` — Ditto with a Laplace prior instead of a Gaussian one (sparse
  personalization): each client changes only the coordinates its data insists on.
* ``rotated-blobs`` — a generative dataset in the spirit of fedkin: population class means,
  one rotation angle per client, the client's data drawn around its rotated means.
* ``resmlp`` — a residual MLP with LayerNorm.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

import fedkin
from fedkin.core.rng import Stream
from fedkin.core.tree import Tree, tree_leaves, tree_map
from fedkin.data.federated import FederatedDataset
from fedkin.optim import Optimizer

# ----- algorithm: Ditto with a Laplace prior ---------------------------------------------------


def soft_threshold(u: torch.Tensor, tau: float) -> torch.Tensor:
    """S_τ(u) = sign(u)·max(|u| − τ, 0), the proximal operator of τ‖·‖₁."""
    return torch.sign(u) * torch.clamp(u.abs() - tau, min=0)


def prox_sgd_l1(lr: float, lam: float, center: Tree) -> Optimizer:
    """Proximal gradient (ISTA) on f(v) + λ‖v − c‖₁: v ← c + S_ηλ(v − η∇f(v) − c)."""

    def init(params: Tree) -> Tree:
        return {}

    def step(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        def prox(v: torch.Tensor, g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return c + soft_threshold(v - lr * g - c, lr * lam)

        return tree_map(prox, params, grads, center), state

    return Optimizer(init, step)


class LaplaceDittoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["laplace-ditto"] = "laplace-ditto"
    lam: float = Field(
        0.01,
        ge=0,
        description="λ in λ‖v_i − w‖₁ (a Laplace prior of scale 1/λ around w): 0 trains "
        "personal models freely, λ ≥ max|∇f_i| keeps v_i = w",
    )
    lr: float = Field(
        0.1, gt=0, description="step size η of the personal proximal steps (threshold ηλ)"
    )
    personal_steps: int | None = Field(
        None, ge=1, description="personal steps per round (None: client.local_steps)"
    )


@fedkin.register_algorithm
class LaplaceDitto(fedkin.Algorithm):
    """Ditto with a Laplace prior (sparse personalization).

    Prior: p(v_i | w) ∝ exp(−λ‖v_i − w‖₁), so R(v_i; w) = λ‖v_i − w‖₁; personal objective
    f_i(v_i) + λ‖v_i − w‖₁, global objective Σ_i p_i f_i(w) (as in Ditto).
    Local solver: (global copy) K client-optimizer steps on f_i from w, message Δ_i = w_i − w;
    (personal) P proximal-gradient steps v_i ← w + S_ηλ(v_i − η∇f_i(v_i) − w), S the
    soft-threshold, on the same batches, with persistent v_i. The ℓ1 prox sets every
    coordinate whose pull |v − η∇f − w| is below ηλ exactly back to w, so v_i − w is sparse;
    the metric ``personal_density`` is the fraction of coordinates where v_i ≠ w.
    Population update: as FedAvg, w ← ServerOpt(w, −Σ_i p_i Δ_i). Personal model: v_i.
    """

    name = "laplace-ditto"
    Config = LaplaceDittoConfig
    supports_dp_sgd = True

    def init_client(self, population: Tree) -> Tree:
        return {"params": population["global"]}

    def client_update(self, population: Tree, client: Tree, batches, ctx: Tree):
        cfg = self.config
        w = population["global"]
        new, _, loss, dp_global = self.local_solve(w, self.plain_objective, batches, ctx=ctx)
        v, _, _, dp_personal = self.local_solve(
            client["params"],
            self.plain_objective,
            batches,
            optimizer=prox_sgd_l1(cfg.lr, cfg.lam, w),
            steps=cfg.personal_steps,
            ctx=ctx,
            noise_tag=1,
        )
        moved = sum((a != b).sum() for a, b in zip(tree_leaves(v), tree_leaves(w), strict=True))
        size = sum(t.numel() for t in tree_leaves(w))
        metrics = {"train_loss": loss, "personal_density": moved / size}
        # under DP-SGD: the DP steps of both solves, for the example-level accountant
        metrics = self.with_dp_steps(metrics, dp_global, dp_personal)
        return self.delta_message(new, w), {"params": v}, metrics

    def personal_params(self, population: Tree, client: Tree) -> Tree:
        return client["params"]


# ----- dataset: rotated Gaussian blobs ---------------------------------------------------------


class RotatedBlobsConfig(BaseModel):
    """Gaussian class blobs, rotated by a client-specific angle (feature-shift heterogeneity)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["rotated-blobs"] = Field("rotated-blobs", description="Dataset name.")
    num_clients: int = Field(20, gt=0, description="Number of clients.")
    samples_per_client: int = Field(80, ge=4, description="Samples of every client.")
    dim: int = Field(6, ge=2, description="Feature dimension.")
    num_classes: int = Field(4, ge=2, description="Number of classes.")
    separation: float = Field(2.0, gt=0, description="Std dev of the population class means.")
    rotation_std: float = Field(
        1.0, ge=0, description="Std dev (radians) of each client's rotation angle φ_i."
    )
    noise_std: float = Field(1.0, gt=0, description="Std dev of the noise around a class mean.")
    test_fraction: float = Field(
        0.25, gt=0, lt=1, description="Share of each client's samples held out for testing."
    )


def rotate_pairs(x: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """R(φ)x: rotate every coordinate pair (x₀, x₁), (x₂, x₃), … of ``x [..., d]`` by the angle
    ``φ`` (broadcast over the leading dims); an odd last coordinate is kept."""
    pairs = x[..., : x.shape[-1] // 2 * 2].unflatten(-1, (-1, 2))
    cos, sin = phi.cos()[..., None], phi.sin()[..., None]
    first = cos * pairs[..., 0] - sin * pairs[..., 1]
    second = sin * pairs[..., 0] + cos * pairs[..., 1]
    rotated = torch.stack([first, second], dim=-1).flatten(-2)
    return torch.cat([rotated, x[..., rotated.shape[-1] :]], dim=-1)


def build_rotated_blobs(cfg: RotatedBlobsConfig, stream: Stream) -> FederatedDataset:
    """Γ: class means μ_k ~ N(0, s²I_d); client i: angle φ_i ~ N(0, σ²) and the rotation R_i by
    φ_i of every coordinate pair; its samples y ~ Uniform{0..C−1}, x ~ N(R_i μ_y, ν²I_d). The
    Bayes classifier of client i is the global one rotated by φ_i, so a single global model
    loses accuracy as σ grows. All draws are counter-based in (seed, client, sample): the data
    is a function of the seed only."""
    n_clients, n, d, c = cfg.num_clients, cfg.samples_per_client, cfg.dim, cfg.num_classes
    means = cfg.separation * stream.child("means").normal(torch.arange(c)[:, None], torch.arange(d))
    phi = cfg.rotation_std * stream.child("angle").normal(torch.arange(n_clients))
    client, sample = torch.arange(n_clients)[:, None], torch.arange(n)[None, :]
    y = (stream.child("label").uniform(client, sample) * c).long()  # [clients, n]
    mu = rotate_pairs(means[y], phi[:, None])  # [clients, n, d]
    noise = stream.child("noise").normal(client[..., None], sample[..., None], torch.arange(d))
    x = (mu + cfg.noise_std * noise).to(torch.float32).reshape(n_clients * n, d)
    n_test = min(n - 1, max(1, round(cfg.test_fraction * n)))
    rows = torch.arange(n_clients * n).reshape(n_clients, n)  # samples are i.i.d. within a client
    return FederatedDataset.from_parts(
        "rotated-blobs",
        x,
        y.reshape(-1),
        c,
        list(rows[:, : n - n_test]),
        list(rows[:, n - n_test :]),
    )


fedkin.register_dataset(RotatedBlobsConfig, build_rotated_blobs)


# ----- model: residual MLP ---------------------------------------------------------------------


class ResidualMLP(nn.Module):
    """h₀ = W_in x;  h_{l+1} = h_l + ReLU(W_l LayerNorm(h_l));  logits = W_out h_L."""

    def __init__(self, in_features: int, width: int, blocks: int, num_classes: int) -> None:
        super().__init__()
        self.inp = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.ReLU())
            for _ in range(blocks)
        )
        self.out = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


@fedkin.register_model
class ResMlpConfig(BaseModel):
    """Residual MLP with LayerNorm: flatten → Linear → [h + ReLU(Linear(LN(h)))]* → Linear."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["resmlp"] = "resmlp"
    width: int = Field(32, gt=0, description="width of the residual stream")
    blocks: int = Field(2, ge=0, description="number of residual blocks")

    def build(self, feature_shape: tuple[int, ...], image_shape, num_classes: int) -> nn.Module:
        return ResidualMLP(math.prod(feature_shape), self.width, self.blocks, num_classes)
