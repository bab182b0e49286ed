"""Trusted-direction projection: keep client updates inside a clean reference subspace.

Deng, Huang, Ozkara et al. ("Directional Alignment Mitigates Reward Hacking in Reinforcement
Learning for Language Models") find that clean training moves along a stable low-dimensional set
of dominant singular directions of its parameter updates, that hacked runs drift away from it,
and constrain updates to the clean subspace. Here it is a server step (a pre-aggregation, so it
composes with any rule) over the round's flat client messages u_i ∈ ℝ^d:

Reference subspace. Stack m trusted updates as the rows of G ∈ ℝ^{m×d} and take its thin SVD
G = U Σ Vᵀ; keep V_k ∈ ℝ^{d×k}, the right singular vectors of the k largest singular values
(directions with σ_j ≤ 10⁻⁶ σ_1 are dropped), and P = V_k V_kᵀ. The trusted updates are either

* ``source=trusted_data``: the algorithm's own local solver, run by the server from the current
  population on its small trusted dataset (m seeded batch sequences; the dataset is a seeded
  sample of ``size`` training examples, as FLTrust's root dataset is), recomputed every
  ``refresh`` rounds; or
* ``source=clean_rounds``: the accepted client messages of the first R rounds, declared clean
  (they pass unchanged); the basis is computed once, when round R arrives.

The paper takes singular directions of each weight matrix's update; a channel step sees a
message as one vector, so here the subspace is spanned by whole updates (model-agnostic, and the
same for every algorithm's ``delta``).

Projection (``mode=project``): u ↦ P u = V_k (V_kᵀ u).
Clipping (``mode=clip``): with r = (I − P) u, u ↦ P u + r · min(1, ρ ‖P u‖ / ‖r‖): the
orthogonal part keeps at most ρ times the in-subspace norm (ρ = 0 is the projection). Both are
contractions: ‖u'‖² = ‖P u‖² + ‖r'‖² ≤ ‖u‖².

Metric: ``trusted_drift`` = mean_i ‖(I − P) u_i‖ / ‖u_i‖ over the round's accepted messages,
before the step (0 for u_i = 0). It is computed from client messages, so it is client-derived:
``privacy/release.py``'s allow-lists do not name it, and a DP run never releases it (the step
itself is refused under DP, like every pre-aggregation: see ``central_dp_conflict``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedkin.channel.aggregators import AggState, StatefulPre, TrustedUpdates
from fedkin.channel.flat import flatten
from fedkin.core.rng import Stream
from fedkin.core.tree import Tree, tree_map
from fedkin.engine.engines import SequentialEngine
from fedkin.registry import register_preaggregator


def top_k_basis(g: torch.Tensor, k: int, rtol: float = 1e-6) -> torch.Tensor:
    """``[k', d]`` orthonormal rows: the right singular vectors of ``g [m, d]`` for its k largest
    singular values, without those ≤ rtol · σ_1 (k' ≤ k; 0 rows if g is 0)."""
    _, s, vh = torch.linalg.svd(g.to(torch.float64), full_matrices=False)
    top = s[:k]
    keep = top > rtol * top.max() if len(top) and top.max() > 0 else torch.zeros_like(top) > 0
    return vh[:k][keep].to(g.dtype)


def project(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """P x = V_k (V_kᵀ x) for each row of ``x [n, d]``; ``basis`` is V_kᵀ ``[k, d]``."""
    return (x @ basis.T) @ basis


def clip_orthogonal(x: torch.Tensor, basis: torch.Tensor, ratio: float) -> torch.Tensor:
    """P x + r · min(1, ρ‖P x‖/‖r‖) with r = (I − P) x, per row."""
    p = project(x, basis)
    r = x - p
    rn = torch.linalg.vector_norm(r, dim=1)
    limit = ratio * torch.linalg.vector_norm(p, dim=1)
    scale = torch.where(rn > limit, limit / rn.clamp(min=torch.finfo(x.dtype).tiny), 1.0)
    return p + r * scale[:, None]


def drift(x: torch.Tensor, basis: torch.Tensor) -> float:
    """mean_i ‖(I − P) x_i‖ / ‖x_i‖ (rows with x_i = 0 count 0)."""
    norm = torch.linalg.vector_norm(x, dim=1)
    off = torch.linalg.vector_norm(x - project(x, basis), dim=1)
    return float(torch.where(norm > 0, off / norm.clamp(min=torch.finfo(x.dtype).tiny), 0).mean())


class TrustedDirectionConfig(BaseModel):
    """Trusted-direction projection onto the top-k singular directions of trusted updates.

    Each message is projected onto the subspace (or its orthogonal part clipped); the round's
    mean relative distance to the subspace is recorded as ``trusted_drift``."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["trusted_direction"] = "trusted_direction"
    k: int = Field(4, ge=1, description="dimension k of the reference subspace")
    mode: Literal["project", "clip"] = Field(
        "project",
        description="project onto the subspace, or clip the orthogonal part to ratio · ‖P u‖",
    )
    ratio: float = Field(1.0, ge=0, description="mode=clip: orthogonal norm kept ≤ ratio·‖P u‖")
    source: Literal["trusted_data", "clean_rounds"] = Field(
        "trusted_data",
        description="trusted_data: updates the server computes on its trusted dataset; "
        "clean_rounds: the client messages of the first clean_rounds rounds",
    )
    size: int = Field(
        64, ge=1, description="source=trusted_data: examples in the server's trusted dataset"
    )
    updates: int = Field(
        8, ge=1, description="source=trusted_data: trusted updates m per refresh (m ≥ k)"
    )
    refresh: int = Field(
        5, ge=1, description="source=trusted_data: rounds between recomputations of the basis"
    )
    clean_rounds: int = Field(3, ge=1, description="source=clean_rounds: rounds declared clean (R)")
    reads_trusted_updates: ClassVar[bool] = True

    def problem(self, key: str) -> str | None:
        """Why this step (at config path ``key``) cannot run, or None."""
        if self.source == "trusted_data" and self.k > self.updates:
            return (
                f"{key}.k={self.k} must be ≤ {key}.updates={self.updates} (the basis is the top "
                "k of m trusted updates)"
            )
        return None

    def build(self, seed: int = 0, trusted_updates: TrustedUpdates | None = None) -> StatefulPre:
        if self.source == "trusted_data" and trusted_updates is None:
            raise ValueError(
                "trusted_direction with source=trusted_data needs the server's trusted "
                "dataset (an Experiment provides it); use source=clean_rounds otherwise"
            )
        clean = self.source == "clean_rounds"

        def init(d: int) -> AggState:
            state = {"basis": torch.zeros(0, d), "refreshed": torch.tensor(-1)}
            return {**state, "rows": torch.zeros(0, d)} if clean else state

        def apply(x: torch.Tensor, w: torch.Tensor, state: AggState, round_: int):
            state = dict(state)
            if clean and round_ < self.clean_rounds:  # declared clean: collect, pass unchanged
                state["rows"] = torch.cat([state["rows"].to(x.dtype), x])
                return x, w, state, {}
            if clean and state["refreshed"] < 0:
                state["basis"] = top_k_basis(state["rows"], self.k)
                state["rows"] = state["rows"][:0]
                state["refreshed"] = torch.tensor(round_)
            elif not clean and (
                state["refreshed"] < 0 or round_ - int(state["refreshed"]) >= self.refresh
            ):
                assert trusted_updates is not None
                state["basis"] = top_k_basis(trusted_updates(round_).to(x.dtype), self.k)
                state["refreshed"] = torch.tensor(round_)
            basis = state["basis"].to(x.dtype)
            metrics = {"trusted_drift": drift(x, basis)}
            out = (
                project(x, basis)
                if self.mode == "project"
                else clip_orthogonal(x, basis, self.ratio)
            )
            return out, w, state, metrics

        return StatefulPre(init, apply)


register_preaggregator(TrustedDirectionConfig)


class TrustedData:
    """The server's trusted dataset and the algorithm's local solver run on it.

    ``size`` rows are a seeded sample of all training clients' training rows (a simulation of a
    small clean dataset the server collected from the same distribution). ``updates(round)``
    runs ``client_update`` from the current population for m virtual clients, each on its own
    seeded batch sequence of the trusted rows (``steps`` batches of ``batch_size``), and
    returns their flat model deltas ``[m, d]``."""

    def __init__(
        self,
        dataset: Any,
        clients: torch.Tensor,
        algorithm: Any,
        population: Callable[[], Tree],
        *,
        size: int,
        updates: int,
        steps: int,
        batch_size: int,
        seed: int,
    ) -> None:
        pool = torch.cat([dataset.train_index[c, : dataset.train_sizes[c]] for c in clients])
        stream = Stream(seed).child("trusted")
        pick = stream.child("rows").keys(pool).argsort()[: min(size, len(pool))]
        self.rows = pool[pick].sort().values
        self.dataset, self.algorithm, self.population = dataset, algorithm, population
        self.m, self.steps, self.batch_size = updates, steps, batch_size
        self.stream = stream.child("batches")
        self.first_id = int(dataset.num_clients)  # virtual client ids after the real ones

    def batches(self, round_: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [S, m, B, …]``, ``y [S, m, B]``: virtual client j's pass over a seeded
        permutation of the trusted rows (wrapping around)."""
        n, slots = len(self.rows), torch.arange(self.steps * self.batch_size)
        rows = (
            torch.stack(
                [
                    self.rows[self.stream.keys(round_, j, torch.arange(n)).argsort()[slots % n]]
                    for j in range(self.m)
                ]
            )
            .view(self.m, self.steps, self.batch_size)
            .transpose(0, 1)
        )
        return self.dataset.x[rows], self.dataset.y[rows]

    def __call__(self, round_: int) -> torch.Tensor:
        population = self.population()
        ids = self.first_id + torch.arange(self.m)
        ctx = {
            "client_id": ids,
            "num_samples": torch.full((self.m,), float(len(self.rows))),
            "round": torch.full_like(ids, round_),
        }
        template = self.algorithm.init_client(population)
        states = tree_map(lambda t: torch.stack([t] * self.m), template)
        messages, _, _ = SequentialEngine().map(
            self.algorithm.client_update,
            (population, states, self.batches(round_), ctx),
            (None, 0, 1, 0),
        )
        return flatten(messages["delta"])[0]


def trusted_updates(
    channel: Any,
    dataset: Any,
    clients: torch.Tensor,
    algorithm: Any,
    population: Callable[[], Tree],
    *,
    steps: int,
    batch_size: int,
    seed: int,
) -> TrustedUpdates | None:
    """The trusted-data source for a channel whose aggregator has a trusted-direction step with
    ``source=trusted_data`` (None otherwise)."""
    for pre in getattr(channel.aggregator, "pre", []):
        if isinstance(pre, TrustedDirectionConfig) and pre.source == "trusted_data":
            return TrustedData(
                dataset,
                clients,
                algorithm,
                population,
                size=pre.size,
                updates=pre.updates,
                steps=steps,
                batch_size=batch_size,
                seed=seed,
            )
    return None
