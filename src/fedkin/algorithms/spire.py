"""SPIRE (arXiv 2506.12303): a shared score-network backbone and lightweight client embeddings.

Prior: θ_i = (φ, e_i) — the backbone φ is shared by all clients (point mass), the client
embedding e_i ∈ ℝ^{d_e} is personal (flat prior). For the conditional DDPM
(:mod:`fedkin.models.diffusion`) e_i is added to the timestep embedding, so it acts as a
bias that steers the shared score network toward client i's distribution.

Federated pretraining (round r, client i):

    (φ_i, e_i') = K steps of the client optimizer on L_i(φ, e) from (φ, e_i)
    message: Δφ_i = φ_i − φ and e_i'
    φ ← ServerOpt(φ, −Σ p_i Δφ_i),   ē ← Σ p_i e_i'   (the cohort's mean embedding)

e_i' stays in client i's state (equivalently: client i alone updates row i of a server-side
embedding table); ē is kept only to initialize new clients. Like the rows of an
``nn.Embedding`` table, a training client's embedding starts at its own draw e_i ~ N(0, I)
(counter-based in the client id, at its first round), so clients are told apart from the start.

New-client adaptation (a held-out client; in fedkin's evaluation its ``client_update`` runs
with an evaluation ``phase`` in ``ctx``, see :mod:`fedkin.experiment`): the backbone is
frozen and only a fresh embedding, initialized at ē, is trained,

    e_new = ``adapt_steps`` Adam(``adapt_lr``) steps on e ↦ L_new(φ, e) from e = ē,

so d_e parameters are trained (64 for the default DDPM against ~1.6·10⁵ in φ). The backbone
is never changed by adaptation, so clients that trained before cannot forget.

Which parameters form the embedding: those whose name contains ``embedding_key`` (the DDPM's
``unet.class_embedding.weight``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedkin.algorithms.base import Algorithm, ServerStep
from fedkin.core.errors import ConfigError
from fedkin.core.rng import Stream
from fedkin.core.tasks import DIFFUSION
from fedkin.core.tree import Tree, tree_map
from fedkin.models.diffusion import EMBEDDING_KEY
from fedkin.optim.alias import adam

#: the initial embedding rows e_i ~ N(0, I), keyed by client id
INIT_STREAM = Stream(0).child("spire-embedding")


class SpireConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["spire"] = "spire"
    embedding_key: str = Field(
        EMBEDDING_KEY,
        min_length=1,
        description="parameters whose name contains this string form the client embedding "
        "(the conditional DDPM's class-embedding row)",
    )
    adapt_steps: int | None = Field(
        None,
        ge=0,
        description="Adam steps of new-client adaptation (embedding only); None: "
        "client.local_steps",
    )
    adapt_lr: float = Field(
        1e-2, gt=0, description="Adam learning rate of new-client embedding adaptation"
    )


def split_embedding(params: Tree, key: str) -> tuple[Tree, Tree]:
    """(backbone φ, embedding e) sub-dicts of a flat parameter dict."""
    return (
        {k: v for k, v in params.items() if key not in k},
        {k: v for k, v in params.items() if key in k},
    )


class Spire(Algorithm):
    name = "spire"
    Config = SpireConfig
    task = DIFFUSION

    def __init__(self, config, model, client_optimizer, local_steps) -> None:
        super().__init__(config, model, client_optimizer, local_steps)
        names = [k for k, _ in model.named_parameters()]
        hits = [k for k in names if config.embedding_key in k]
        if not hits or len(hits) == len(names):
            raise ConfigError(
                f"algorithm.embedding_key: {config.embedding_key!r} must name some but not all "
                "parameters of the model (model.name: 'ddpm' has unet.class_embedding.weight)"
            )
        self.adapt_optimizer = adam(config.adapt_lr)

    def split(self, params: Tree) -> tuple[Tree, Tree]:
        return split_embedding(params, self.config.embedding_key)

    # ----- the three pieces ----------------------------------------------------------------------
    def init_population(self, params: Tree) -> Tree:
        backbone, embedding = self.split(params)
        return {"global": backbone, "embedding_mean": embedding}

    def init_client(self, population: Tree) -> Tree:
        """ē, not yet replaced by the client's own draw (``drawn`` = 0)."""
        embedding = tree_map(lambda t: t.clone(), population["embedding_mean"])
        return {"embedding": embedding, "drawn": torch.zeros(())}

    def initial_embedding(self, client: Tree, client_id: torch.Tensor) -> Tree:
        """The stored embedding, or e_i ~ N(0, I) keyed by ``client_id`` before its first use."""

        def draw(t: torch.Tensor) -> torch.Tensor:
            e = INIT_STREAM.normal(client_id, torch.arange(t.numel())).reshape(t.shape)
            return torch.where(client["drawn"] > 0, t, e.to(t.dtype))

        return tree_map(draw, client["embedding"])

    def client_update(self, population: Tree, client: Tree, batches, ctx: Tree):
        done = torch.ones(())
        if "phase" in ctx:  # evaluation-time solve of a held-out client: adaptation from ē
            embedding, loss = self.adapt_embedding(population, client["embedding"], batches)
            return {}, {"embedding": embedding, "drawn": done}, {"train_loss": loss}
        phi = population["global"]
        start = self.initial_embedding(client, ctx["client_id"])
        params, _, loss, _ = self.local_solve({**phi, **start}, self.plain_objective, batches)
        backbone, embedding = self.split(params)
        message = {**self.delta_message(backbone, phi), "embedding": embedding}
        return message, {"embedding": embedding, "drawn": done}, {"train_loss": loss}

    def adapt_embedding(
        self, population: Tree, embedding: Tree, batches, steps: int | None = None
    ) -> tuple[Tree, torch.Tensor]:
        """e_new: Adam steps on the embedding alone (backbone frozen) from ``embedding``."""
        phi = population["global"]

        def objective(e: Tree, x: torch.Tensor, y: torch.Tensor):
            loss = self.data_loss({**phi, **e}, x, y)
            return loss, loss

        steps = self.config.adapt_steps if steps is None else steps
        embedding, _, loss, _ = self.local_solve(
            embedding, objective, batches, optimizer=self.adapt_optimizer, steps=steps
        )
        return embedding, loss

    def population_update(self, population: Tree, aggregate: Tree, server: ServerStep) -> Tree:
        """φ ← ServerOpt(φ, −Σ p_i Δφ_i); ē ← the cohort's weighted mean embedding."""
        new = self.server_step(population, aggregate, server)
        if "embedding" in aggregate:
            new = {**new, "embedding_mean": aggregate["embedding"]}
        return new

    def personal_params(self, population: Tree, client: Tree) -> Tree:
        return {**population["global"], **client["embedding"]}
