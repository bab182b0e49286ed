"""FedKSeed (Qin et al., ICML 2024, arXiv 2312.06353): zeroth-order clients that send
(seed, scalar) pairs from a shared pool of K seeds.

Prior: point mass, θ_i = w (as FedAvg).
Local solver: S ZO-SGD (MeZO) steps from w; step s draws a pool index
k_s = hash(round, client, s) mod K, rebuilds z_{k_s} from it, takes two forward passes for
p_s = (L(θ + εz) − L(θ − εz))/(2ε) and sets θ ← θ − η p_s z_{k_s}. No backward pass.
Message: c ∈ ℝ^K with c_k = −η Σ_{s: k_s = k} p_s (the client's pairs, accumulated per index;
the simulation carries them as a K-vector so the channel can average them).
Population update: w ← ServerOpt(w, −Σ_k c̄_k z_k), c̄ the weighted average of the clients' c
— exactly the average of the clients' deltas, since each delta is Σ_k c_k z_k.

On the wire (:func:`encode_scalars`; the channel counts ``len`` of the buffer): S pairs — the
nonzero c_k as float32 (a pool index drawn twice is one pair; (0, +0.0) pads to S), then their
pool indices with b = ⌈log₂ K⌉ bits each (12 for the default K = 4096), packed MSB first and
zero-padded to a byte: 4S + ⌈Sb/8⌉ bytes per client and round (S = 10: 55 bytes; the same for
every client, so the count reveals nothing of the data), against 4·d bytes for a full fp32
delta of d parameters. The server decodes the buffer back to c exactly (float32 values, no
rounding), so learning is what it would be without the wire. Under local DP the noised release
is dense and goes as K pairs.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from fedkin.algorithms.base import Algorithm, ServerStep
from fedkin.channel.compressors import pack_bits, unpack_bits
from fedkin.channel.runtime import WireCodec
from fedkin.core.rng import hash_counters
from fedkin.core.tree import Tree, tree_add, tree_map
from fedkin.optim.zeroth import reconstruct, seed_direction, spsa_scalar


class FedKSeedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["fedkseed"] = "fedkseed"
    pool_size: int = Field(4096, ge=1, description="K: number of shared seeds in the pool")
    pool_seed: int = Field(0, ge=0, description="seed from which the pool's directions derive")
    lr: float = Field(1e-3, gt=0, description="ZO-SGD step size η of the clients")
    eps: float = Field(1e-3, gt=0, description="perturbation scale ε of the SPSA estimate")


def index_bits(pool_size: int) -> int:
    """b = ⌈log₂ K⌉: the bits that name one of K pool indices (at least 1)."""
    return max(1, math.ceil(math.log2(pool_size)))


def encode_scalars(scalars: torch.Tensor, pool_size: int, pairs: int = 0) -> bytes:
    """One client's message c ∈ ℝ^K as bytes: its n nonzero entries as float32, padded with
    (index 0, +0.0) to at least ``pairs`` entries, then their indices with :func:`index_bits` bits
    each. The count is not sent: the buffer has L = 4n + ⌈nb/8⌉ bytes, so
    8L ∈ [(32 + b)n, (32 + b)n + 7] and n = ⌊8L/(32 + b)⌋. With ``pairs`` = S local steps the
    length is the same for every client (n ≤ S distinct indices drawn), whatever its data."""
    c = scalars.detach().to(torch.float32)
    idx = torch.nonzero(c).flatten()
    pad = max(pairs - len(idx), 0)
    values = torch.cat([c[idx], torch.zeros(pad)]).numpy().astype("<f4").tobytes()
    return values + pack_bits(torch.cat([idx, idx.new_zeros(pad)]).numpy(), index_bits(pool_size))


def decode_scalars(buffer: bytes, pool_size: int) -> torch.Tensor:
    """Inverse of :func:`encode_scalars`: the float32 K-vector c (padding adds +0.0)."""
    n = 8 * len(buffer) // (32 + index_bits(pool_size))
    values = torch.from_numpy(np.frombuffer(buffer[: 4 * n], dtype="<f4").copy())
    idx = torch.from_numpy(unpack_bits(buffer[4 * n :], index_bits(pool_size), n).astype(np.int64))
    return torch.zeros(pool_size).index_put_((idx,), values, accumulate=True)


class FedKSeed(Algorithm):
    name = "fedkseed"
    Config = FedKSeedConfig

    def client_update(self, population: Tree, client: Tree, batches, ctx: Tree):
        cfg = self.config
        w = population["global"]
        xs, ys = batches
        theta = w
        scalars = torch.zeros(cfg.pool_size, device=xs.device)
        loss_sum = torch.zeros((), device=xs.device)
        for s in range(self.local_steps):
            b = s % xs.shape[0]
            k = hash_counters(cfg.pool_seed, ctx["round"], ctx["client_id"], s) % cfg.pool_size
            z = seed_direction(w, cfg.pool_seed, k)
            x, y = xs[b], ys[b]
            p, loss = spsa_scalar(lambda q, x=x, y=y: self.data_loss(q, x, y), theta, z, cfg.eps)
            theta = tree_add(theta, z, -cfg.lr * p)
            scalars = scalars + torch.nn.functional.one_hot(k, cfg.pool_size) * (-cfg.lr * p)
            loss_sum = loss_sum + loss.detach()
        metrics = {"train_loss": loss_sum / max(self.local_steps, 1)}
        return {"scalars": scalars}, client, metrics

    def wire_codecs(self) -> dict[str, WireCodec]:
        """The message key ``scalars`` goes on the wire as :func:`encode_scalars`' buffer of
        S = ``client.local_steps`` (index, scalar) pairs."""
        k, steps = self.config.pool_size, self.local_steps
        return {
            "scalars": WireCodec(
                lambda c: encode_scalars(c, k, steps), lambda buffer: decode_scalars(buffer, k)
            )
        }

    def population_update(self, population: Tree, aggregate: Tree, server: ServerStep) -> Tree:
        if "scalars" not in aggregate:
            return population
        w = population["global"]
        delta = reconstruct(w, self.config.pool_seed, aggregate["scalars"])
        pseudo_grad = tree_map(lambda d: -d, delta)
        return {**population, "global": server("global", w, pseudo_grad)}
