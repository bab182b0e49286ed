"""One federated experiment: build the parts from a config, run rounds, evaluate, checkpoint.

A round: sample a cohort (counter-based, from (seed, round)) → draw each client's batches →
the engine runs the algorithm's local solver over the cohort → non-finite results are
rejected and counted → the channel aggregates messages → the algorithm updates the population
with the server optimizer → a metrics record goes to the trackers.

All randomness is a function of (seed, round, client), so a run resumed from its checkpoint
produces exactly the records an uninterrupted run produces.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from fedkin.algorithms import ALGORITHMS, Algorithm, ServerStep
from fedkin.config import ExperimentConfig
from fedkin.core.channel import Channel, finite_rows
from fedkin.core.errors import NonFiniteModelError
from fedkin.core.evaluate import evaluate_global, evaluate_personal, summarize
from fedkin.core.rng import Stream
from fedkin.core.store import ClientStore
from fedkin.core.tree import Tree, tree_leaves
from fedkin.data import build_dataset
from fedkin.models import build_model

CHECKPOINT = "checkpoint.pt"


class Tracker(Protocol):
    """Subscribes to the run's records; the loop knows nothing else about it."""

    def start(self, info: dict[str, Any]) -> None: ...
    def record(self, record: dict[str, Any]) -> None: ...
    def finish(self, summary: dict[str, Any]) -> None: ...


class Experiment:
    """Holds the live state of a run (population, client store, server state, round)."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.stream = Stream(config.seed)
        self.dataset = build_dataset(config.data, config.seed)
        ds = self.dataset
        self.model = build_model(
            config.model, ds.feature_shape, ds.image_shape, ds.num_classes, seed=config.seed
        )
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.algorithm: Algorithm = ALGORITHMS[config.algorithm.name](
            config.algorithm,
            self.model,
            config.client.optimizer.build(),
            config.client.local_steps,
        )
        self.engine = config.engine.build()
        init = {k: v.detach().clone() for k, v in self.model.named_parameters()}
        self.population: Tree = self.algorithm.init_population(init)
        self.store = ClientStore(self.algorithm.init_client(self.population), ds.num_clients)
        self.server = ServerStep(config.server.optimizer.build())
        self.channel = Channel()
        self.round = 0  # rounds completed

    # ----- one round ----------------------------------------------------------------------------
    def sample_cohort(self, round_: int) -> torch.Tensor:
        n, k = self.dataset.num_clients, self.config.cohort.clients_per_round
        keys = self.stream.child("cohort").keys(round_, torch.arange(n))
        return torch.argsort(keys)[:k].sort().values

    def run_round(self) -> dict[str, Any]:
        r, cfg, ds = self.round, self.config, self.dataset
        t0 = time.perf_counter()
        cohort = self.sample_cohort(r)
        batches = ds.sample_train_batches(
            cohort, self.stream.child("batches"), r, cfg.client.local_steps, cfg.client.batch_size
        )
        n_i = ds.train_sizes[cohort].to(torch.float32)
        ctx = {"client_id": cohort, "num_samples": n_i, "round": torch.full_like(cohort, r)}
        messages, states, metrics = self.engine.map(
            self.algorithm.client_update,
            (self.population, self.store.gather(cohort), batches, ctx),
            (None, 0, 1, 0),
        )
        k = len(cohort)
        ok = finite_rows(messages, k) & finite_rows(states, k) & finite_rows(metrics, k)
        self.store.scatter(cohort, states, keep=ok)
        weights = (n_i if cfg.cohort.weighting == "samples" else torch.ones(k)) * ok
        aggregate, channel_metrics = self.channel(messages, weights)
        if ok.any():
            self.population = self.algorithm.population_update(
                self.population, aggregate, self.server
            )
        if not all(torch.isfinite(t).all() for t in tree_leaves(self.population)):
            raise NonFiniteModelError(
                f"the population model became NaN/Inf in round {r + 1}; the run stopped. "
                "Lower the learning rates (client.optimizer.lr, server.optimizer.lr). "
                f"The last good checkpoint is round {self.round}."
            )
        self.round += 1
        loss = metrics["train_loss"][ok]
        return {
            "round": self.round,
            "kind": "train",
            "clients": k,
            "train_loss": float(loss.mean()) if len(loss) else float("nan"),
            **channel_metrics,
            "rejected_updates": float((~ok).sum()),
            "round_time_s": time.perf_counter() - t0,
        }

    # ----- evaluation ---------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        record: dict[str, Any] = {"round": self.round, "kind": "eval"}
        alg = self.algorithm
        if alg.has_global_model:
            glob = evaluate_global(alg, self.population["global"], self.dataset)
            record.update(summarize("global", *glob))
        personalizes = type(alg).personal_params is not Algorithm.personal_params
        pers = (
            evaluate_personal(alg, self.engine, self.population, self.store, self.dataset)
            if personalizes or not alg.has_global_model
            else glob
        )
        record.update(summarize("personal", *pers))
        record["eval_time_s"] = time.perf_counter() - t0
        return record

    # ----- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "population": self.population,
            "server": self.server.state,
            "store": self.store.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round = state["round"]
        self.population = state["population"]
        self.server.state = state["server"]
        self.store.load_state_dict(state["store"])

    def save_checkpoint(self, run_dir: Path) -> None:
        """Atomic write: a crash mid-write leaves the previous checkpoint intact."""
        tmp = run_dir / (CHECKPOINT + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, run_dir / CHECKPOINT)

    def load_checkpoint(self, run_dir: Path) -> None:
        self.load_state_dict(torch.load(run_dir / CHECKPOINT, weights_only=False))

    # ----- the loop -----------------------------------------------------------------------------
    def run(self, run_dir: Path, trackers: list[Tracker]) -> dict[str, Any]:
        cfg = self.config
        info = {
            "name": cfg.name,
            "run_dir": str(run_dir),
            "rounds": cfg.rounds,
            "start_round": self.round,
            "dataset": self.dataset.summary(),
        }
        for t in trackers:
            t.start(info)
        last_eval: dict[str, Any] = {}
        t_start = time.perf_counter()
        while self.round < cfg.rounds:
            record = self.run_round()
            for t in trackers:
                t.record(record)
            if self.round % cfg.eval.every == 0 or self.round == cfg.rounds:
                last_eval = self.evaluate()
                for t in trackers:
                    t.record(last_eval)
            if self.round % cfg.checkpoint.every == 0 or self.round == cfg.rounds:
                self.save_checkpoint(run_dir)
        summary = {
            "name": cfg.name,
            "algorithm": cfg.algorithm.name,
            "rounds": self.round,
            "session_time_s": time.perf_counter() - t_start,
            **{k: v for k, v in last_eval.items() if k not in ("kind", "round")},
        }
        for t in trackers:
            t.finish(summary)
        return summary
