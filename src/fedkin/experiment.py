"""One federated experiment: build the parts from a config; evaluate; checkpoint.

:class:`Experiment` holds the live state of a run (population, client groups and their stores,
server optimizer, DP mechanism, the channel and its state) and answers what a round needs
(cohorts, batches). The round itself — train the cohort, the channel, the server update, the
guards — and the run loop are :mod:`fedkin.round`, shared with the Ray and Flower runtimes.

All randomness is a function of (seed, round, client), so a run resumed from its checkpoint
produces exactly the records an uninterrupted run produces.

Devices (``engine.device``): the dataset's samples and index tables, the models, the
population, the client groups' stores (a disk store's map stays on the CPU; its rows move) and
every input of the engine are placed on the device, so a cohort trains without host copies.
The channel (attack, compression and its residuals, the DP release and noise) and the run's
bookkeeping (cohorts, sizes, records) run on the CPU: a round's messages cross to the host
once, and the aggregate comes back for the population update. Checkpoints hold CPU tensors
and load onto the configured device.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedkin import round as rounds
from fedkin.algorithms import ALGORITHMS, Algorithm, ServerStep
from fedkin.algorithms.base import PHASE_EVAL_ADAPT, PHASE_EVAL_INIT
from fedkin.channel.runtime import ChannelState, build_channel
from fedkin.channel.trusted import trusted_updates
from fedkin.config import ClientModelGroup, ExperimentConfig, holdout_count, load_config
from fedkin.core.errors import UserError
from fedkin.core.evaluate import evaluate_global, evaluate_personal, summarize
from fedkin.core.rng import Stream
from fedkin.core.store import ClientStore, MemoryStore, StackedStates, make_store
from fedkin.core.tree import Tree, to_device, tree_map
from fedkin.data import build_dataset
from fedkin.data.federated import FederatedDataset
from fedkin.engine.plan import EnginePlan, largest_cohort
from fedkin.models import build_model
from fedkin.models.mel import pattern_name
from fedkin.privacy.release import ReleasePolicy
from fedkin.registry import OPTIMIZER_REGISTRY
from fedkin.round import Tracker, cat_rows

if TYPE_CHECKING:  # dp-accounting (and scipy) load only when a run is private
    from fedkin.privacy.federated import UserLevelDP

CHECKPOINT = "checkpoint.pt"


@dataclass
class ClientGroup:
    """Clients sharing one personal architecture: its algorithm instance and state store.

    Row ``j`` of ``store`` is client ``members[j]`` (members sorted ascending).
    """

    algorithm: Algorithm
    members: torch.Tensor
    store: ClientStore

    def rows(self, clients: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(self.members, clients)


def engine_plan(config: ExperimentConfig, dataset: FederatedDataset) -> EnginePlan:
    """What the engine is told in advance: rounds, the largest cohort, local steps."""
    n = dataset.num_clients
    pool = n - holdout_count(n, config.eval.holdout_clients)
    poisson = config.cohort.sampling == "poisson"
    largest = largest_cohort(config.cohort.clients_per_round, pool, poisson)
    return EnginePlan(config.rounds, largest, config.client.local_steps, varying=poisson)


class Experiment:
    """Holds the live state of a run (population, client groups and stores, server, round)."""

    def __init__(
        self,
        config: ExperimentConfig,
        run_dir: Path | None = None,
        dataset: FederatedDataset | None = None,
    ) -> None:
        """``dataset``: a prebuilt federated dataset to use instead of building ``config.data``
        (e.g. the synthetic million-client population of ``fedkin bench scale``)."""
        self.config = config
        self.run_dir = run_dir
        self.stream = Stream(config.seed)
        #: where the engine computes, and where its inputs (data, models, states) are made
        self.device = torch.device(config.engine.device)
        with torch.device("cpu"):  # built on the host whatever torch's default device
            built = build_dataset(config.data, config.seed) if dataset is None else dataset
        n_new = holdout_count(built.num_clients, config.eval.holdout_clients)
        order = torch.argsort(
            self.stream.child("holdout").keys(torch.arange(built.num_clients, device="cpu"))
        )
        self.new_clients = order[len(order) - n_new :].sort().values
        if config.eval.new_client_train_samples is not None:
            built = built.with_train_cap(
                config.eval.new_client_train_samples,
                Stream(config.seed).child("data").child("new-client-cap"),
                clients=self.new_clients,
                key="eval.new_client_train_samples",
            )
        self.dataset = built.to(self.device)
        self.engine = config.backend.wrap(config.engine.build(engine_plan(config, self.dataset)))
        self.groups = self._build_groups()
        self.algorithm: Algorithm = self.groups[0].algorithm
        self.model = self.algorithm.model
        self.population: Tree = self.algorithm.init_population(
            self.algorithm.initial_global_params()
        )
        for g, group in enumerate(self.groups):
            group.store = make_store(
                config.store,
                group.algorithm.init_client(self.population),
                len(group.members),
                run_dir / "client_state" / f"group{g}" if run_dir else None,
                self.device,
            )
        self.server = ServerStep(OPTIMIZER_REGISTRY.build(config.server.optimizer))
        self.round = 0  # rounds completed
        self.client_accuracy: dict[str, list[float]] = {}  # per-client, from the last evaluate()
        self.is_training = torch.ones(self.dataset.num_clients, dtype=torch.bool, device="cpu")
        self.is_training[self.new_clients] = False
        self.training_clients = torch.nonzero(self.is_training).squeeze(1)
        self.privacy: UserLevelDP | None = None
        self.release = ReleasePolicy.of(config)  # what records and summaries may carry
        if config.privacy.enabled:
            from fedkin.privacy.federated import UserLevelDP

            self.privacy = UserLevelDP(
                config.privacy,
                population=len(self.training_clients),
                cohort_size=config.cohort.clients_per_round,
                sampling=config.cohort.sampling,
                rounds=config.rounds,
                seed=config.seed,
            )
        self.channel = build_channel(
            config,
            self.dataset.num_clients,
            self.dataset.num_classes,
            self.privacy,
            trusted_updates(
                config.channel,
                self.dataset,
                self.training_clients,
                self.algorithm,
                lambda: self.population,
                steps=config.client.local_steps,
                batch_size=config.client.batch_size,
                seed=config.seed,
            ),
            codecs=self.algorithm.wire_codecs() if hasattr(self.algorithm, "wire_codecs") else None,
        )
        self.channel_state = ChannelState(clip=self.privacy.clip if self.privacy else None)
        #: per-client channel state (error-feedback residuals, momenta), sized by d on first use
        self.channel_clients: ClientStore | None = None
        self.participation = torch.zeros(self.dataset.num_clients, dtype=torch.long, device="cpu")
        #: DP-SGD gradients on each batch of one client_update (sorted, unused batches left
        #: out), from the clients' ``dp_steps`` metric (:meth:`count_dp_steps`)
        self.dp_sgd_uses: list[int] = []
        if config.privacy.dp_sgd is not None:
            for group in self.groups:
                group.algorithm.enable_dp_sgd(
                    config.privacy.dp_sgd, config.seed, config.client.batch_size
                )
        self.stop_reason = ""
        self.dead_rounds = 0  # consecutive rounds in which every client update was rejected

    def channel_store(self, d: int) -> ClientStore:
        """The clients' channel state (:meth:`RoundChannel.client_template`: error-feedback
        ``"residual"``, ``"momentum"``, each ``[d]``), one row per client (a disk store under
        ``client_state/channel`` with ``store.backend=disk``), on the CPU with the channel
        that reads them."""
        if self.channel_clients is None:
            self.channel_clients = make_store(
                self.config.store,
                self.channel.client_template(d),
                self.dataset.num_clients,
                self.run_dir / "client_state" / "channel" if self.run_dir else None,
                "cpu",
            )
        return self.channel_clients

    def _build_groups(self) -> list[ClientGroup]:
        """One group per personal architecture (and precision); clients are assigned by a seeded
        permutation. Every group's algorithm shares one population (global) model, built from
        ``model``; a group's ``centers`` overrides ``algorithm.centers``."""
        cfg, ds = self.config, self.dataset
        n = ds.num_clients
        specs = cfg.client_models or [ClientModelGroup(model=cfg.model, fraction=1.0)]
        order = torch.argsort(self.stream.child("model-groups").keys(torch.arange(n, device="cpu")))
        bounds = [round(n * sum(s.fraction for s in specs[: g + 1])) for g in range(len(specs))]
        with torch.device("cpu"):  # initialized on the host: the same numbers on every device
            global_model = build_model(
                cfg.model, ds.feature_shape, ds.image_shape, ds.num_classes, cfg.seed
            ).to(self.device)
        global_model.requires_grad_(False)
        groups, start = [], 0
        for g, (spec, stop) in enumerate(zip(specs, bounds, strict=True)):
            seed = cfg.seed if g == 0 else cfg.seed + 7919 * g
            with torch.device("cpu"):
                model = build_model(
                    spec.model, ds.feature_shape, ds.image_shape, ds.num_classes, seed
                ).to(self.device)
            model.requires_grad_(False)
            alg_cfg = cfg.algorithm
            if cfg.client_models and "centers" in type(alg_cfg).model_fields:
                alg_cfg = alg_cfg.model_copy(update={"centers": spec.centers})
            client_optimizer = OPTIMIZER_REGISTRY.build(cfg.client.optimizer)
            algorithm = ALGORITHMS[cfg.algorithm.name](
                alg_cfg, model, client_optimizer, cfg.client.local_steps
            )
            algorithm.global_model = global_model
            members = order[start:stop].sort().values
            groups.append(ClientGroup(algorithm, members, store=None))  # type: ignore[arg-type]
            start = stop
        self.group_of = torch.empty(n, dtype=torch.long, device="cpu")
        for g, group in enumerate(groups):
            self.group_of[group.members] = g
        return groups

    @property
    def store(self) -> ClientStore:
        """The client store when all clients share one architecture."""
        if len(self.groups) != 1:
            raise AttributeError("this experiment has several client groups; use .groups[g].store")
        return self.groups[0].store

    # ----- one round ----------------------------------------------------------------------------
    def sample_cohort(self, round_: int) -> torch.Tensor:
        """Training clients of a round, a function of (seed, round) only: exactly k without
        replacement, or (Poisson) each independently with probability q = k / N."""
        k, pool = self.config.cohort.clients_per_round, self.training_clients
        stream = self.privacy.cohort_stream if self.privacy else self.stream.child("cohort")
        if self.config.cohort.sampling == "poisson":
            return pool[stream.uniform(round_, pool) < k / len(pool)]
        keys = stream.keys(round_, pool)  # k smallest keys: a uniform k-subset, O(N) per round
        return pool[torch.topk(keys, k, largest=False, sorted=False).indices].sort().values

    def round_cohort(self, round_: int) -> tuple[torch.Tensor, bool]:
        """The clients that train in a round, and whether they are a phantom.

        An empty Poisson cohort under central DP still releases noise (an unchanged model
        would reveal that nobody was sampled): one client then runs only to shape the release,
        with weight 0 and its state not written (``phantom`` True).
        """
        cohort = self.sample_cohort(round_)
        if len(cohort) == 0 and self.privacy is not None and self.privacy.central:
            return self.training_clients[:1], True
        return cohort, False

    def run_round(self) -> dict[str, Any]:
        """One round (:func:`fedkin.round.run_round`); returns its record."""
        return rounds.run_round(self)

    def client_batches(self, clients: torch.Tensor, name: str, round_: int):
        """Local batches of ``clients`` in a round, from the stream ``name``: fixed-size slices
        of a shuffle, or under DP-SGD Poisson batches ``(xs, ys, masks)`` (what the example-level
        accountant assumes). A task that draws randomness for its loss (diffusion noise) puts it
        in place of the labels, from the stream ``name + "-noise"``."""
        cfg, ds = self.config, self.dataset
        poisson = cfg.privacy.dp_sgd is not None
        sample = ds.sample_poisson_batches if poisson else ds.sample_train_batches
        steps, size = cfg.client.local_steps, cfg.client.batch_size
        batches = sample(clients, self.stream.child(name), round_, steps, size)
        draw = self.algorithm.task.draw
        if draw is None:
            return batches
        return draw(batches, self.stream.child(name + "-noise"), clients, round_)

    def count_dp_steps(self, metrics: Tree) -> Tree:
        """The clients' metrics without ``dp_steps`` (``[K, S]``, DP-SGD gradients on each
        batch of a ``client_update``: :meth:`~fedkin.algorithms.base.Algorithm.with_dp_steps`),
        which goes into the example-level ledger :attr:`dp_sgd_uses` instead of a record."""
        if "dp_steps" not in metrics:
            return metrics
        from fedkin.privacy.dp_sgd import batch_uses

        self.dp_sgd_uses = batch_uses(metrics["dp_steps"], self.dp_sgd_uses)
        return {k: v for k, v in metrics.items() if k != "dp_steps"}

    def example_epsilon(self) -> float:
        """Example-level ε under DP-SGD of the most exposed training client: its Poisson
        batches (q_i = min(1, B/n_i)) composed over the batches of a round and its
        participations, by dp-accounting (RDP); see :mod:`fedkin.privacy.dp_sgd`."""
        from fedkin.privacy.dp_sgd import example_epsilon

        dp = self.config.privacy.dp_sgd
        if dp is None:
            return 0.0
        return example_epsilon(
            dp.noise_multiplier,
            dp.delta,
            self.config.client.batch_size,
            self.dataset.train_sizes,
            self.participation,
            self.dp_sgd_uses,
        )

    def example_accounting(self) -> dict[str, float]:
        """What an eval record carries under DP-SGD whichever runtime trained the clients:
        ``example_epsilon``; nothing without DP-SGD."""
        if self.config.privacy.dp_sgd is None:
            return {}
        return {"example_epsilon": self.example_epsilon()}

    # ----- evaluation ---------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        """The eval record: under DP only what :mod:`fedkin.privacy.release` allows (the
        evaluation on client data below does not even run unless diagnostics are released)."""
        t0 = time.perf_counter()
        record: dict[str, Any] = {"round": self.round, "kind": "eval"}
        if self.release.client_evaluation:
            record.update(self.evaluate_clients())
        record.update(self.example_accounting())
        record["eval_time_s"] = time.perf_counter() - t0
        return self.release.record(record)

    def evaluate_clients(self) -> dict[str, Any]:
        """Global and personalized accuracy over training clients; new-client accuracy over the
        held-out clients after one local adaptation from the population (``new_*``)."""
        record: dict[str, Any] = {}
        alg, ds = self.algorithm, self.dataset
        counts = ds.test_sizes.to(torch.float64)
        train = self.is_training
        if alg.has_global_model:
            g_correct, g_loss = evaluate_global(alg, self.population["global"], ds)
            record.update(
                summarize("global", g_correct[train], g_loss[train], counts[train], alg.task)
            )
        if self.personalizes():
            correct, loss = self._evaluate_personal(self._training_states)
        else:
            correct, loss = g_correct, g_loss
        record.update(summarize("personal", correct[train], loss[train], counts[train], alg.task))
        self.client_accuracy = {"personal": (correct[train] / counts[train]).tolist()}
        if len(self.new_clients):
            new = self.new_clients
            if self.personalizes():
                correct, loss = self._evaluate_personal(self._new_client_states)
            record.update(summarize("new", correct[new], loss[new], counts[new], alg.task))
            self.client_accuracy["new"] = (correct[new] / counts[new]).tolist()
        if self.config.eval.failure_patterns:
            record.update(self.failure_accuracy())
        if self.dataset.val_index is not None:
            record.update(self._validation_metrics())
        return record

    def failure_accuracy(self) -> dict[str, float]:
        """Weighted accuracy over training clients of the MEL model served under each failure
        pattern (``global_acc_<pattern>``, and ``personal_acc_<pattern>`` if personalized)."""
        alg, ds, train = self.algorithm, self.dataset, self.is_training
        counts = ds.test_sizes.to(torch.float64)[train]
        out: dict[str, float] = {}
        models = {id(m): m for m in (alg.model, alg.global_model)}.values()
        for dead in self.model.failure_patterns():
            name = pattern_name(dead)
            with contextlib.ExitStack() as serving:
                for m in models:
                    serving.enter_context(m.serving(dead))
                if alg.has_global_model:
                    correct, _ = evaluate_global(alg, self.population["global"], ds)
                    out[f"global_acc_{name}"] = float(correct[train].sum() / counts.sum())
                if self.personalizes():
                    correct, _ = self._evaluate_personal(self._training_states)
                    out[f"personal_acc_{name}"] = float(correct[train].sum() / counts.sum())
        return out

    def _validation_metrics(self) -> dict[str, Any]:
        """``val_global_*`` / ``val_personal_*``: as on the test split, on the validation split
        of the training clients that have one (``data.validation_fraction``)."""
        alg, ds = self.algorithm, self.dataset
        counts = ds.val_sizes.to(torch.float64)
        keep = self.is_training & (ds.val_sizes > 0)
        out: dict[str, Any] = {}
        if alg.has_global_model:
            correct, loss = evaluate_global(alg, self.population["global"], ds, split="val")
            out.update(summarize("val_global", correct[keep], loss[keep], counts[keep], alg.task))
        if self.personalizes():
            correct, loss = self._evaluate_personal(self._training_states, split="val")
        out.update(summarize("val_personal", correct[keep], loss[keep], counts[keep], alg.task))
        return out

    def personalizes(self) -> bool:
        alg = self.algorithm
        return (
            type(alg).personal_params is not Algorithm.personal_params
            or self._adapts(alg)
            or not alg.has_global_model
        )

    @staticmethod
    def _adapts(algorithm: Algorithm) -> bool:
        return type(algorithm).adapt is not Algorithm.adapt

    def _evaluate_personal(
        self, states_of, split: str = "test"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-client personal (correct, loss_sum) on ``split``; ``states_of(group)`` gives a
        store and the client ids of its rows. Clients not covered stay zero."""
        n = self.dataset.num_clients
        correct = torch.zeros(n, dtype=torch.float64, device="cpu")
        loss = torch.zeros(n, dtype=torch.float64, device="cpu")
        for g in self.groups:
            store, clients = states_of(g)
            if len(clients):
                c, l_ = evaluate_personal(
                    g.algorithm,
                    self.engine,
                    self.population,
                    store,
                    self.dataset,
                    clients,
                    split=split,
                )
                correct[clients], loss[clients] = c, l_
        return correct, loss

    def _training_states(self, group: ClientGroup) -> tuple[Any, torch.Tensor]:
        """Stored states of the group's clients (adapted first, if the algorithm adapts)."""
        if not self._adapts(group.algorithm):
            return group.store, group.members
        clients = group.members[self.is_training[group.members]]
        return self._prepare_states(group, clients, fresh=False), clients

    def _new_client_states(self, group: ClientGroup) -> tuple[Any, torch.Tensor]:
        """Held-out clients: a fresh ``init_client`` state after one run of the local solver
        (and the algorithm's adaptation)."""
        clients = group.members[~self.is_training[group.members]]
        return self._prepare_states(group, clients, fresh=True), clients

    def _prepare_states(
        self, group: ClientGroup, clients: torch.Tensor, fresh: bool, chunk: int = 1024
    ) -> StackedStates:
        parts = [
            self.eval_states(
                group.algorithm,
                ids,
                self.population,
                self.round,
                None if fresh else group.store.gather(group.rows(ids)),
            )
            for ids in clients.split(chunk)
        ]
        return StackedStates(cat_rows(parts) if parts else {})

    def eval_states(
        self,
        algorithm: Algorithm,
        clients: torch.Tensor,
        population: Tree,
        round_: int,
        states: Tree | None = None,
    ) -> Tree:
        """The stacked states whose personal models are evaluated for ``clients``: their stored
        ``states``, or (None, held-out clients) a fresh ``init_client`` state after one
        ``client_update`` from Γ; then ``adapt``, if the algorithm has one. Batches are
        counter-based in (round, client), so a Flower node evaluating its own client computes
        exactly the in-process numbers."""

        def ctx(phase: int) -> Tree:  # a phase of its own keys the DP-SGD noise of each solve
            ids = clients.cpu()
            return to_device(
                {
                    "client_id": ids,
                    "num_samples": self.dataset.train_sizes[ids].to(torch.float32),
                    "round": torch.full_like(ids, round_),
                    "phase": torch.full_like(ids, phase),
                },
                self.device,
            )

        if states is None:
            template = MemoryStore(algorithm.init_client(population), len(clients))
            _, states, _ = self.engine.map(
                algorithm.client_update,
                (
                    population,
                    template.gather(torch.arange(len(clients))),
                    self.client_batches(clients, "adapt", round_),
                    ctx(PHASE_EVAL_INIT),
                ),
                (None, 0, 1, 0),
            )
        if self._adapts(algorithm):
            batches = self.client_batches(clients, "adapt-eval", round_)
            states = self.engine.map(
                algorithm.adapt,
                (population, states, batches, ctx(PHASE_EVAL_ADAPT)),
                (None, 0, 1, 0),
            )
        return states

    # ----- personal models (the Python API) -----------------------------------------------------
    def personal_params(self, client_id: int) -> Tree:
        """θ_i = personal_params(Γ, s_i): the parameters client ``client_id`` predicts with,
        exactly as evaluation uses them — its stored state (adapted first if the algorithm
        adapts); for a held-out client, a fresh state after one local update from Γ."""
        n = self.dataset.num_clients
        if not 0 <= client_id < n:
            raise UserError(f"client id {client_id} is outside 0..{n - 1}")
        group = self.groups[int(self.group_of[client_id])]
        ids = torch.tensor([client_id])
        if not self.is_training[client_id]:
            states = self.eval_states(group.algorithm, ids, self.population, self.round)
        else:
            states = group.store.gather(group.rows(ids))
            if self._adapts(group.algorithm):
                states = self.eval_states(group.algorithm, ids, self.population, self.round, states)
        state = tree_map(lambda t: t[0], states)
        return group.algorithm.personal_params(self.population, state)

    def personal_model(self, client_id: int) -> torch.nn.Module:
        """Client ``client_id``'s personal model as a standalone ``nn.Module`` (a copy of its
        group's architecture holding :meth:`personal_params`), in eval mode."""
        params = self.personal_params(client_id)
        model = copy.deepcopy(self.groups[int(self.group_of[client_id])].algorithm.model)
        model.load_state_dict({**model.state_dict(), **params})
        return model.eval()

    # ----- checkpoints --------------------------------------------------------------------------
    @classmethod
    def load(cls, run_dir: str | Path) -> Experiment:
        """The experiment of a run directory at its last checkpoint (its files are not
        changed; to continue training use ``fedkin run --resume``)."""
        run_dir = Path(run_dir)
        if not (run_dir / CHECKPOINT).exists():
            raise UserError(f"{run_dir} has no {CHECKPOINT}")
        experiment = cls(load_config(run_dir / "config.yaml"), run_dir)
        experiment.load_checkpoint(run_dir)
        return experiment

    def state_dict(self) -> dict[str, Any]:
        """The run's state as CPU tensors, whatever ``engine.device`` (loadable on any)."""
        return {
            "round": self.round,
            "population": to_device(self.population, "cpu"),
            "server": to_device(self.server.state, "cpu"),
            "privacy": self.privacy.state_dict() if self.privacy else None,
            "participation": self.participation,
            "dp_sgd_uses": self.dp_sgd_uses,
            "stores": [g.store.state_dict() for g in self.groups],
            "channel": dataclasses.asdict(self.channel_state),
            "channel_clients": None
            if self.channel_clients is None
            else {
                "d": next(iter(self.channel_clients.template.values())).numel(),
                "store": self.channel_clients.state_dict(),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round = state["round"]
        self.population = to_device(state["population"], self.device)
        self.server.state = to_device(state["server"], self.device)
        if self.privacy is not None:
            self.privacy.load_state_dict(state["privacy"])
        self.participation = state["participation"]
        self.dp_sgd_uses = state["dp_sgd_uses"]
        for group, store_state in zip(self.groups, state["stores"], strict=True):
            group.store.load_state_dict(store_state, self.round)
        self.channel_state = ChannelState(**state["channel"])
        if state["channel_clients"] is not None:
            store = self.channel_store(state["channel_clients"]["d"])
            store.load_state_dict(state["channel_clients"]["store"], self.round)

    def save_checkpoint(self, run_dir: Path) -> None:
        """Atomic write: a crash mid-write leaves the previous checkpoint intact."""
        tmp = run_dir / (CHECKPOINT + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, run_dir / CHECKPOINT)
        for group in self.groups:
            group.store.commit(self.round)
        if self.channel_clients is not None:
            self.channel_clients.commit(self.round)

    def load_checkpoint(self, run_dir: Path) -> None:
        state = torch.load(run_dir / CHECKPOINT, weights_only=False, map_location="cpu")
        self.load_state_dict(state)

    # ----- the loop -----------------------------------------------------------------------------
    def run(self, run_dir: Path, trackers: list[Tracker]) -> dict[str, Any]:
        """The remaining rounds in this process (:func:`fedkin.round.run`); the summary."""
        info = {
            "name": self.config.name,
            "run_dir": str(run_dir),
            "rounds": self.config.rounds,
            "start_round": self.round,
            "dataset": self.dataset.summary(),
        }
        return rounds.run(
            self,
            run_dir,
            trackers,
            train_round=self.run_round,
            evaluate=self.evaluate,
            info=info,
        )
