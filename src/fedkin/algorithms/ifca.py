"""IFCA (Ghosh et al. 2020): iterative federated clustering with K population models.

Prior: hard-assignment mixture, θ_i ∈ {w_1, …, w_K} (the λ → ∞ limit of Σ_k π_k N(w_k, λ⁻¹I)).
Local solver: j* = argmin_j f_i(w_j) on the round's batches, then K optimizer steps on f_i from
w_{j*}; message {Δ_i ⊗ e_{j*}, e_{j*}} (delta one-hot-masked by cluster, and the one-hot).
Population update: each chosen cluster k takes the weighted mean of its members' deltas,
    w_k ← ServerOpt_k(w_k, −Σ_i p_i e_ik Δ_i / Σ_i p_i e_ik);
clusters nobody chose stay unchanged. The personal model is w of the last chosen cluster; a
client that never trained has no cluster yet (assignment e = 0) and, at evaluation (``adapt``),
takes j* = argmin_j f_i(w_j) on its own training batches, as the paper assigns clusters.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedkin.algorithms.base import Algorithm, ServerStep
from fedkin.core.priors import hard_assignment
from fedkin.core.rng import hash_counters, normal
from fedkin.core.tree import Tree, tree_map


class IfcaConfig(BaseModel):
    """IFCA: K cluster models; each client trains the one with the lowest loss on its data."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["ifca"] = "ifca"
    num_clusters: int = Field(
        4,
        ge=1,
        description="number K of cluster (population) models (the paper uses 2–4; on digits 4 "
        "beat 2 on the pathological split and tied on Dirichlet)",
    )
    init: Literal["random", "perturb"] = Field(
        "random",
        description="cluster models at round 0: 'random' = cluster 0 is the run's initial model, "
        "cluster k ≥ 1 a fresh default initialization of the model drawn from (init_seed, k) "
        "(as in the reference code: K independent inits); 'perturb' = initial model + "
        "N(0, init_scale²) noise drawn from (init_seed, k)",
    )
    init_seed: int = Field(0, ge=0, description="seed of the cluster initializations (k ≥ 1)")
    init_scale: float = Field(
        0.01, gt=0, description="noise std of init='perturb' (ignored for 'random')"
    )


class Ifca(Algorithm):
    name = "ifca"
    Config = IfcaConfig
    has_global_model = False  # K models, no single global one; evaluation is per client
    per_client_metrics = ("cluster",)  # the cluster j* each client chose this round
    robust_delta = False  # the delta is masked by the chosen cluster

    # ----- population --------------------------------------------------------------------
    def _cluster_init(self, params: Tree, k: int) -> Tree:
        cfg = self.config
        if cfg.init == "perturb":
            out = {}
            for j, (name, t) in enumerate(params.items()):
                idx = torch.arange(t.numel())
                noise = normal(cfg.init_seed, k, j, idx).to(t.dtype).reshape(t.shape)
                out[name] = t + cfg.init_scale * noise
            return out
        seed = int(hash_counters(cfg.init_seed, k).item())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = copy.deepcopy(self.model)
            for m in fresh.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        named = dict(fresh.named_parameters())
        return {name: named[name].detach().clone() for name in params}

    def init_population(self, params: Tree) -> Tree:
        models = [params] + [
            self._cluster_init(params, k) for k in range(1, self.config.num_clusters)
        ]
        return {"clusters": tree_map(lambda *ts: torch.stack(ts), *models)}

    @staticmethod
    def cluster(clusters: Tree, k: int) -> Tree:
        return tree_map(lambda t: t[k], clusters)

    @staticmethod
    def select(clusters: Tree, onehot: torch.Tensor) -> Tree:
        """Σ_k e_k w_k — exactly w_j for a one-hot e = e_j (products with 0/1 are exact)."""
        return tree_map(lambda t: torch.tensordot(onehot.to(t.dtype), t, dims=1), clusters)

    # ----- client ----------------------------------------------------------------------------
    def init_client(self, population: Tree) -> Tree:
        """The last chosen cluster as a one-hot; all zeros until the client first trains."""
        return {"assign": torch.zeros(self.config.num_clusters)}

    def cluster_losses(self, clusters: Tree, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """f_i(w_k) for every cluster on the samples (x, y): ``[K]``."""
        k = self.config.num_clusters
        return torch.stack([self.data_loss(self.cluster(clusters, j), x, y) for j in range(k)])

    def choose(self, clusters: Tree, batches) -> torch.Tensor:
        """One-hot of j* = argmin_j f_i(w_j) on all samples of ``batches`` (xs ``[S, B, …]``)."""
        xs, ys = batches
        losses = self.cluster_losses(clusters, xs.reshape(-1, *xs.shape[2:]), ys.reshape(-1))
        return hard_assignment(losses.detach())

    def client_update(self, population: Tree, client: Tree, batches, ctx: Tree):
        clusters = population["clusters"]
        onehot = self.choose(clusters, batches)
        w = self.select(clusters, onehot)
        new, _, loss, _ = self.local_solve(w, self.plain_objective, batches)
        delta = tree_map(
            lambda a, b: onehot.reshape(-1, *([1] * a.dim())).to(a.dtype) * (a - b).unsqueeze(0),
            new,
            w,
        )
        cluster_id = (
            onehot * torch.arange(len(onehot), dtype=onehot.dtype, device=onehot.device)
        ).sum()
        metrics = {"train_loss": loss, "cluster": cluster_id}
        return {"delta": delta, "assign": onehot}, {"assign": onehot}, metrics

    # ----- server -------------------------------------------------------------------------------
    def population_update(self, population: Tree, aggregate: Tree, server: ServerStep) -> Tree:
        clusters, mass = population["clusters"], aggregate["assign"]
        models = []
        for k in range(self.config.num_clusters):
            w_k = self.cluster(clusters, k)
            if float(mass[k]) > 0:  # server side (not vmapped): a Python branch is fine here
                pseudo_grad = tree_map(lambda d, k=k: -d[k] / mass[k], aggregate["delta"])
                w_k = server(f"cluster{k}", w_k, pseudo_grad)
            models.append(w_k)
        return {"clusters": tree_map(lambda *ts: torch.stack(ts), *models)}

    def adapt(self, population: Tree, client: Tree, batches, ctx: Tree) -> Tree:
        """A client that never trained (e = 0) takes j* = argmin_j f_i(w_j) on its training
        batches; a client that trained keeps its last chosen cluster."""
        assign = client["assign"]
        chosen = self.choose(population["clusters"], batches).to(assign.dtype)
        return {"assign": torch.where(assign.sum() > 0, assign, chosen)}

    def personal_params(self, population: Tree, client: Tree) -> Tree:
        return self.select(population["clusters"], client["assign"])
