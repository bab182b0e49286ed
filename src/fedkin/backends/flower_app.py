r"""Flower adapter: any fedkin algorithm as a Flower ``ServerApp`` + ``ClientApp``.

Each Flower SuperNode is one fedkin client: its ``node_config["partition-id"]`` is the client
id. It builds the same :class:`~fedkin.data.federated.FederatedDataset` from the same config
and seed (or reads its own ``data-file``, see below), so its data and its per-round batches
(counter-based in (seed, round, client)) are exactly those the in-process run uses.

What crosses the wire, per round (everything else stays where it is):

* server → sampled node: the population Γ (``ArrayRecord "population"``) and the round number
  (``ConfigRecord "config"``);
* node → server: what the channel's client half made of the algorithm's ``message`` tree
  (:mod:`fedkin.backends.flower_channel`: float32 ``ArrayRecord "message"``, a compressed delta
  as its encoder's bytes in ``"uplink"``), its scalar metrics (``ArrayRecord "metrics"``) and
  ``num-examples`` / ``ok`` (``MetricRecord "info"``). Under DP (:mod:`fedkin.privacy.release`)
  the node sends its release only: the clipped message (central; the server broadcasts the
  round's clip norm) or the clipped and noised one (local), plus, under adaptive clipping,
  whether it was clipped (``info["clipped"]``, the input of the noisy count), and under DP-SGD
  its data-independent ``dp_steps`` metric (the example-level accountant's input); other
  metrics, counts and ``ok`` only with ``privacy.release_diagnostics=true``.

The personal state s_i (personal model, optimizer state, algorithm extras) and the channel
state (error-feedback residual, momentum) live only in the node's ``context.state``
(``ArrayRecord``s ``"fedkin-state"`` and ``"fedkin-channel"``) and never leave it. Evaluation
runs on the nodes too: the server broadcasts Γ and each node returns its correct/loss sums on
its own test split (held-out "new" clients first adapt from Γ, as in-process); under DP it does
not run, and a node refuses to evaluate.

The node runs the algorithm's own ``client_update`` through the configured engine (a cohort of
one), then the run's channel client half (:class:`~fedkin.channel.runtime.RoundChannel`: momentum,
attack simulation, compression, DP release) — the same functions the in-process round runs for the
whole cohort. The server samples cohorts with the experiment's counter-based sampler and hands what
arrives to :func:`fedkin.round.server_update` (the channel's server half, the population update
with the server optimizer, the guards) inside :func:`fedkin.round.run` (stop reasons, evaluation,
checkpoints of the server side, trackers). Nothing about an algorithm or the channel is
re-implemented here, so one config gives the same population through either runtime. A Flower run
cannot be resumed: its ``checkpoint.pt`` holds the server side (Γ, server optimizer, accountant,
the channel's server state and the simulated adversary's residuals), while the clients' states live
on their nodes.

Use it in Python (``flwr.simulation.run_simulation``)::

    server_app, client_app = make_apps(config)
    run_simulation(server_app, client_app, num_supernodes=config.data.num_clients)

or deploy it: ``fedkin flower deploy`` (:mod:`fedkin.backends.flower_deploy`) writes a Flower
app directory (:func:`write_flower_project`: a ``pyproject.toml`` naming
``fedkin.backends.flower_app:server_app`` and ``:client_app``, whose run config carries the
experiment — ``fedkin-config``: a YAML path, ``fedkin-overrides``: ``key=value`` overrides —
and ``fedkin-run-dir``, where the ServerApp writes its results; default
``~/.fedkin/flower-runs/<run id>``, named in its log), TLS certificates and the ``flwr``
connection, and prints the exact SuperLink, SuperNode and ``flwr run`` commands (absolute
paths, one ``--port`` per SuperNode); ``tests/test_readme_deploy.py`` runs the README's copy
of them on loopback.

Each SuperNode is started with ``--node-config "partition-id=<client id> …"``. With
``data.name=local-files`` it also names its own data, ``data-file="<path>"`` (CSV, NPZ or
image folder, :mod:`fedkin.data.local_files`): the node trains and evaluates on that file only
(its held-out split made as in-process), the server reads no data at all — the model's shape
comes from ``data.input_shape`` and ``data.num_classes`` — and a node whose file is invalid
fails discovery with the loader's error. Without ``data-file`` (simulation, and deployments of
the built-in datasets) a node builds the config's dataset and takes client ``partition-id``.

Every node needs fedkin and torch installed (the app directory holds only the pyproject).
Flower starts a fresh ``flwr-clientapp`` process per message in deployment, so each message
re-imports torch and rebuilds the client's dataset view; the simulation keeps them cached.
"""

from __future__ import annotations

import functools
import json
import shlex
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedkin.config import ExperimentConfig, dump_config, load_config
from fedkin.core.errors import UserError
from fedkin.core.tree import Tree, tree_map

if TYPE_CHECKING:
    from fedkin.data.federated import FederatedDataset

__all__ = [
    "FlowerNotInstalledError",
    "FlowerServer",
    "client_app",  # noqa: F822 (module __getattr__)
    "config_from_run_config",
    "make_apps",
    "record_to_tree",
    "require_flwr",
    "run_simulation",
    "server_app",  # noqa: F822 (module __getattr__)
    "tree_to_record",
    "write_flower_project",
]

INSTALL_HINT = "pip install 'fedkin[flower]'"
STATE_KEY = "fedkin-state"
#: written to the run directory when a deployed run fails (the error, one line)
FAILURE_FILE = "failed.txt"
#: ``node_config`` key of a SuperNode's own data file (:mod:`fedkin.data.local_files`)
DATA_FILE_KEY = "data-file"
ROUND_KEY = "fedkin-round"
#: Run-config keys the importable ``server_app`` / ``client_app`` read, with their defaults.
RUN_CONFIG_DEFAULTS: dict[str, str | float] = {
    "fedkin-config": "",  # path to a fedkin YAML config ("" = defaults)
    "fedkin-overrides": "",  # whitespace-separated key=value overrides (shell quoting allowed)
    "fedkin-run-dir": "",  # server: results dir ("" = ~/.fedkin/flower-runs/<run id>)
    "fedkin-node-timeout": 120.0,  # server: seconds to wait for every client's SuperNode
    "fedkin-round-timeout": 600.0,  # server: seconds to wait for a round's replies
}


class FlowerNotInstalledError(UserError, ImportError):
    """The optional ``flwr`` dependency is missing."""


def require_flwr() -> None:
    """Raise :class:`FlowerNotInstalledError` (naming the extra to install) without flwr."""
    try:
        import flwr.clientapp
        import flwr.serverapp  # noqa: F401
    except ImportError as err:
        raise FlowerNotInstalledError(
            f"the Flower backend needs the optional `flwr` package ({err}); "
            f"install it with: {INSTALL_HINT}"
        ) from None


# ----- trees of tensors <-> Flower ArrayRecords ------------------------------------------------

_SEP = "/"
_BF16 = "@bfloat16"  # numpy has no bfloat16: sent as its int16 bit pattern, key-tagged


def tree_to_record(tree: Tree):
    """A nested ``dict[str, Tensor]`` as a flat ``ArrayRecord`` (keys joined by ``/``).

    Empty sub-trees are kept as a zero-size marker under ``"<path>/"`` so that
    :func:`record_to_tree` restores the exact structure; dtypes and shapes round-trip.
    """
    from flwr.app import Array, ArrayRecord

    record = ArrayRecord()

    def walk(node: Tree, prefix: str) -> None:
        if not node and prefix:
            record[prefix + _SEP] = Array.from_numpy_ndarray(np.zeros(0, np.float32))
        for key, value in node.items():
            if _SEP in key or key.endswith(_BF16):
                raise ValueError(f"tree key {key!r} may not contain {_SEP!r} or end in {_BF16}")
            path = f"{prefix}{_SEP}{key}" if prefix else key
            if isinstance(value, dict):
                walk(value, path)
                continue
            t = value.detach().cpu()
            if t.dtype == torch.bfloat16:
                t, path = t.view(torch.int16), path + _BF16
            record[path] = Array.from_numpy_ndarray(t.contiguous().numpy())

    walk(tree, "")
    return record


def record_to_tree(record) -> Tree:
    """Inverse of :func:`tree_to_record`."""
    tree: Tree = {}
    for path, array in record.items():
        parts = path.split(_SEP)
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        leaf = parts[-1]
        if leaf == "":  # empty sub-tree marker
            continue
        arr = array.numpy()
        t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
        if leaf.endswith(_BF16):
            t, leaf = t.view(torch.bfloat16), leaf.removesuffix(_BF16)
        node[leaf] = t
    return tree


def _stack(trees: list[Tree]) -> Tree:
    return tree_map(lambda *ts: torch.stack(ts), trees[0], *trees[1:])


def _row(tree: Tree, i: int = 0) -> Tree:
    return tree_map(lambda t: t[i], tree)


def _batch1(tree: Tree) -> Tree:
    return tree_map(lambda t: t.unsqueeze(0), tree)


# ----- configuration ---------------------------------------------------------------------------


def config_from_run_config(run_config: dict[str, Any]) -> ExperimentConfig:
    """The experiment named by a Flower run config (``fedkin-config``, ``fedkin-overrides``)."""
    path = str(run_config.get("fedkin-config", "") or "")
    overrides = shlex.split(str(run_config.get("fedkin-overrides", "") or ""))
    return load_config(path or None, overrides)


def _runtime_config(config: ExperimentConfig) -> ExperimentConfig:
    """The config as one Flower process runs it: in-process engine, client states in RAM
    (they are never used there: personal states live in the nodes' ``context.state``)."""
    from fedkin.backends import LocalBackendConfig
    from fedkin.core.store import StoreConfig

    return config.model_copy(update={"backend": LocalBackendConfig(), "store": StoreConfig()})


def _experiment(config: ExperimentConfig, dataset: FederatedDataset | None = None):
    from fedkin.experiment import Experiment

    return Experiment(_runtime_config(config), dataset=dataset)


# ----- the client side -------------------------------------------------------------------------

_RUNTIMES: dict[str, _ClientRuntime] = {}


def _client_id(context, config: ExperimentConfig) -> int:
    """The fedkin client id of this node: its ``node_config["partition-id"]``."""
    raw = context.node_config.get("partition-id")
    n = config.data.num_clients
    if raw is None:
        raise UserError(
            "this SuperNode has no node_config 'partition-id' (its fedkin client id); "
            f"start it with --node-config 'partition-id=<0..{n - 1}>'"
        )
    cid = int(raw)
    if not 0 <= cid < n:
        raise UserError(f"node_config partition-id={cid} is outside 0..{n - 1}")
    return cid


def _node_dataset(config: ExperimentConfig, cid: int, path: str) -> FederatedDataset:
    """Client ``cid``'s own data from ``path`` (a SuperNode's ``data-file``)."""
    from fedkin.data.local_files import LocalFilesConfig, node_dataset

    if not isinstance(config.data, LocalFilesConfig):
        raise UserError(
            f"node_config {DATA_FILE_KEY}={path!r} needs data.name=local-files (whose "
            "data.input_shape and data.num_classes give the model's shape); the experiment has "
            f"data.name={config.data.name}"
        )
    return node_dataset(config.data, config.seed, cid, path)


class _ClientRuntime:
    """What one node process needs, built once per config: the dataset, the client groups'
    algorithms, the initial population (for the state template) and the engine."""

    def __init__(self, config: ExperimentConfig, dataset: FederatedDataset | None) -> None:
        self.config = config
        self.experiment = _experiment(config, dataset)
        self.engine = config.engine.build()

    @classmethod
    def of(
        cls,
        config: ExperimentConfig,
        dataset: FederatedDataset | Callable[[], FederatedDataset] | None = None,
        token: str = "",
    ) -> _ClientRuntime:
        """The runtime of ``config`` (and of ``dataset``, or of the dataset the callable
        builds, identified by ``token``)."""
        key = config.model_dump_json() + token
        if key not in _RUNTIMES:
            _RUNTIMES.clear()  # one experiment per process at a time
            _RUNTIMES[key] = cls(config, dataset() if callable(dataset) else dataset)
        return _RUNTIMES[key]

    def client_id(self, context) -> int:
        return _client_id(context, self.config)

    def algorithm(self, cid: int):
        exp = self.experiment
        return exp.groups[int(exp.group_of[cid])].algorithm

    def state(self, cid: int, context) -> Tree:
        """This node's persistent state; never-trained clients start from ``init_client`` of
        the initial population (the in-process store's template)."""
        if STATE_KEY in context.state:
            return record_to_tree(context.state[STATE_KEY])
        return self.algorithm(cid).init_client(self.experiment.population)

    def ctx(self, cid: int, round_: int) -> Tree:
        ids = torch.tensor([cid])
        n = self.experiment.dataset.train_sizes[ids].to(torch.float32)
        return {"client_id": ids, "num_samples": n, "round": torch.full_like(ids, round_)}

    def local_update(self, cid: int, population: Tree, state: Tree, stream_name: str, r: int):
        """``client_update`` of one client through the engine (a cohort of one)."""
        ids = torch.tensor([cid])
        batches = self.experiment.client_batches(ids, stream_name, r)
        batches = self.experiment.channel.poison(batches, ids)  # label flip: Byzantine only
        return self.engine.map(
            self.algorithm(cid).client_update,
            (population, _batch1(state), batches, self.ctx(cid, r)),
            (None, 0, 1, 0),
        )


class _ClientHandlers:
    """The ClientApp's message handlers. ``config`` None: read it from the run config."""

    def __init__(
        self, config: ExperimentConfig | None, dataset: FederatedDataset | None = None
    ) -> None:
        self.config = config
        self.dataset = dataset
        # identifies the dataset in every process the handlers are copied to
        self.token = uuid.uuid4().hex if dataset is not None else ""

    def _config(self, context) -> ExperimentConfig:
        return self.config or config_from_run_config(context.run_config)

    def _runtime(self, context) -> _ClientRuntime:
        config = self._config(context)
        path = context.node_config.get(DATA_FILE_KEY)
        if path is None:  # the config's dataset; this node's client is its partition-id
            return _ClientRuntime.of(config, self.dataset, self.token)
        cid = _client_id(context, config)
        build = functools.partial(_node_dataset, config, cid, str(path))
        return _ClientRuntime.of(config, build, f"{DATA_FILE_KEY}={path} client={cid}")

    def query(self, message, context):
        """Which client this node is; a node with its own data file loads (and so validates)
        it first, so a bad file stops the run at discovery with the node's error."""
        from flwr.app import Message, MetricRecord, RecordDict

        if DATA_FILE_KEY in context.node_config:
            self._runtime(context)
        info = {"partition-id": _client_id(context, self._config(context))}
        return Message(RecordDict({"info": MetricRecord(info)}), reply_to=message)

    def train(self, message, context):
        """Train this node's client, then run the channel's client half on its message (attack
        simulation, compression; momentum and residual kept in ``context.state``; the DP
        release)
        and reply with what the release policy allows (:mod:`fedkin.backends.flower_channel`)."""
        from flwr.app import Message, MetricRecord, RecordDict

        from fedkin.backends import flower_channel as wire
        from fedkin.channel.runtime import model_size
        from fedkin.core.channel import finite_rows

        rt = self._runtime(context)
        cid = rt.client_id(context)
        config = message.content["config"]
        if int(config["client-id"]) != cid:
            raise UserError(f"message for client {config['client-id']} reached client {cid}")
        r = int(config["round"])
        last = context.state[ROUND_KEY]["round"] if ROUND_KEY in context.state else -1
        if r <= last:  # at-least-once delivery: never train twice on one round
            raise UserError(f"client {cid}: stale train message for round {r} (trained {last})")
        population = record_to_tree(message.content["population"])
        state = rt.state(cid, context)
        msg, states, metrics = rt.local_update(cid, population, state, "batches", r)
        ok = bool((finite_rows(msg, 1) & finite_rows(states, 1) & finite_rows(metrics, 1))[0])
        # a rejected update leaves the personal state as it was (as in-process); so does a
        # phantom run, which only shapes the noise release of an empty DP cohort
        phantom = bool(int(config.get("phantom", 0)))
        if ok and not phantom:
            context.state[STATE_KEY] = tree_to_record(_row(states))
        context.state[ROUND_KEY] = MetricRecord({"round": r})
        exp = rt.experiment
        channel, ids = exp.channel, torch.tensor([cid])
        content = RecordDict()
        info: dict[str, float] = {}
        d = model_size(msg)
        kept: dict[str, torch.Tensor] = {}  # this node's channel state (residual, momentum)
        if channel.client_keys and d is not None:
            kept = (
                record_to_tree(context.state[wire.CHANNEL_KEY])
                if wire.CHANNEL_KEY in context.state
                else channel.client_template(d)
            )
            kept = {k: v[None] for k, v in kept.items()}
        msg, kept = channel.momentum_step(msg, kept, torch.tensor([ok]))
        if channel.omniscient and bool(channel.byzantine[cid]):
            # the simulated omniscient adversary forms this client's message on the server
            content["message"] = tree_to_record(_row(msg))
        else:
            if channel.omniscient:  # what the simulated adversary sees of an honest client
                content["adversary-view"] = tree_to_record(_row(msg))
            clip = float(config["clip"]) if "clip" in config else None
            up = channel.client_half(msg, ids, torch.tensor([ok]), r, kept.get("residual"), clip)
            if up.residuals is not None:
                kept["residual"] = up.residuals
            for key, record in wire.pack(up).items():
                content[key] = record
            if exp.release.node_sends_clip_bit:
                info["clipped"] = int(up.was_clipped[0])
        if kept and not phantom:
            context.state[wire.CHANNEL_KEY] = tree_to_record(_row(kept))
        released = exp.release.client_metrics(metrics)  # under DP: data-independent ones only
        if released:
            content["metrics"] = tree_to_record(_row(released))
        if exp.release.node_reports:  # exact client-derived values: never under DP by default
            info.update({"num-examples": float(exp.dataset.train_sizes[cid]), "ok": int(ok)})
        if info:
            content["info"] = MetricRecord(info)
        return Message(content, reply_to=message)

    def evaluate(self, message, context):
        from flwr.app import Message, MetricRecord, RecordDict

        from fedkin.core.evaluate import evaluate_personal
        from fedkin.core.store import StackedStates

        rt = self._runtime(context)
        cid = rt.client_id(context)
        if not rt.experiment.release.client_evaluation:
            raise UserError(
                f"client {cid}: evaluation on client data is not released under "
                f"privacy.mechanism={rt.config.privacy.mechanism} "
                "(privacy.release_diagnostics=false)"
            )
        config = message.content["config"]
        population = record_to_tree(message.content["population"])
        x, y = rt.experiment.dataset.client_test(cid)
        out = {"test-count": float(len(y))}
        if bool(config["global"]):
            algorithm = rt.experiment.algorithm
            with torch.no_grad():  # the task's per-sample score and loss, as in-process
                logits = algorithm.global_logits(population["global"], x)
                score, losses = algorithm.task.per_sample(logits, x, y)
            out["global-correct"] = float(score.to(torch.float64).sum())
            out["global-loss"] = float(losses.to(torch.float64).sum())
        if bool(config["personal"]):
            # held-out ("adapt") client: one local run from Γ, not kept; then, as in-process,
            # the algorithm's adaptation
            alg, ids = rt.algorithm(cid), torch.tensor([cid])
            stored = None if bool(config["adapt"]) else _batch1(rt.state(cid, context))
            states = rt.experiment.eval_states(alg, ids, population, int(config["round"]), stored)
            correct, loss = evaluate_personal(
                alg, rt.engine, population, StackedStates(states), rt.experiment.dataset, ids
            )
            out["personal-correct"], out["personal-loss"] = float(correct[0]), float(loss[0])

        return Message(RecordDict({"eval": MetricRecord(out)}), reply_to=message)


def _client_app(
    config: ExperimentConfig | None,
    dataset: FederatedDataset | None = None,
    mods: list | None = None,
):
    from flwr.clientapp import ClientApp

    handlers = _ClientHandlers(config, dataset)
    app = ClientApp(mods=mods)
    app.query()(handlers.query)
    app.train()(handlers.train)
    app.evaluate()(handlers.evaluate)
    return app


# ----- the server side -------------------------------------------------------------------------


class FlowerServer:
    """The ServerApp's main loop: discover the nodes, run rounds and evaluations through the
    grid, aggregate with the experiment's channel and update the population.

    After a run: ``records`` (the same train/eval records ``fedkin run`` writes),
    ``summary``, and ``experiment.population``.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        run_dir: str | Path | None = None,
        node_timeout: float = 120.0,
        round_timeout: float = 600.0,
        dataset: FederatedDataset | None = None,
    ) -> None:
        self.config = config
        self.dataset = dataset
        self.run_dir = Path(run_dir) if run_dir else None
        self.node_timeout = node_timeout
        self.round_timeout = round_timeout
        self.records: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}
        self.experiment = None
        self.node_of: dict[int, int] = {}
        self.error: Exception | None = None

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> FlowerServer:
        get = {**RUN_CONFIG_DEFAULTS, **dict(run_config)}.get
        return cls(
            config_from_run_config(run_config),
            run_dir=str(get("fedkin-run-dir")) or None,
            node_timeout=float(get("fedkin-node-timeout")),
            round_timeout=float(get("fedkin-round-timeout")),
        )

    # ----- messaging ----------------------------------------------------------------------------
    def _send(self, grid, kind: str, contents: dict[int, Any], group: str, timeout: float):
        """Send ``contents[client]`` to each client's node; replies by client id (clients
        that failed or timed out are missing, with a warning)."""
        from flwr.app import Message
        from flwr.common import log

        messages = [
            Message(
                content,
                dst_node_id=self.node_of[c],
                message_type=kind,
                group_id=group,
                ttl=timeout,  # a message that missed its round expires instead of arriving late
            )
            for c, content in contents.items()
        ]
        client_of = {node: c for c, node in self.node_of.items()}
        replies: dict[int, Any] = {}
        for reply in grid.send_and_receive(messages, timeout=timeout):
            c = client_of.get(reply.metadata.src_node_id)
            if c is None:
                continue
            if reply.has_error():
                log(30, "fedkin: client %s failed (%s): %s", c, group, reply.error.reason)
                continue
            replies[c] = reply.content
        return replies

    def discover(self, grid) -> dict[int, int]:
        """Map every fedkin client id to the node whose ``partition-id`` it is."""
        from flwr.app import Message, MessageType, RecordDict

        need = self.experiment.dataset.num_clients
        deadline = time.monotonic() + self.node_timeout
        node_of: dict[int, int] = {}
        asked: set[int] = set()  # each node is asked once: no duplicate queries in flight
        pending: set[str] = set()
        while len(node_of) < need:
            if time.monotonic() > deadline:
                missing = sorted(set(range(need)) - set(node_of))
                raise UserError(
                    f"only {len(node_of)} of {need} SuperNodes answered within "
                    f"{self.node_timeout:g}s (one per fedkin client, node_config partition-id "
                    f"0..{need - 1}); missing client ids: {missing[:10]}"
                )
            new = [n for n in grid.get_node_ids() if n not in asked]
            if new:
                messages = [
                    Message(
                        RecordDict(),
                        dst_node_id=n,
                        message_type=MessageType.QUERY,
                        group_id="fedkin-discover",
                        ttl=self.node_timeout,
                    )
                    for n in new
                ]
                pending.update(grid.push_messages(messages))
                asked.update(new)
            for reply in grid.pull_messages(list(pending)) if pending else ():
                pending.discard(reply.metadata.reply_to_message_id)
                node = reply.metadata.src_node_id
                if reply.has_error():
                    raise UserError(
                        f"SuperNode {node} failed to report its client id: {reply.error.reason}"
                    )
                cid = int(reply.content["info"]["partition-id"])
                if cid in node_of:
                    raise UserError(
                        f"two SuperNodes ({node_of[cid]} and {node}) claim partition-id={cid}; "
                        "each fedkin client needs exactly one node"
                    )
                node_of[cid] = node
            if len(node_of) < need:
                time.sleep(0.1)
        return node_of

    # ----- one round ----------------------------------------------------------------------------
    def train_round(self, grid) -> dict[str, Any]:
        """A fedkin round (:func:`fedkin.round.run_round`) with the cohort trained, and the
        channel's client half run, on the nodes; the server half and the rest of the round are
        :func:`fedkin.round.server_update`."""
        from flwr.app import ConfigRecord, MessageType, RecordDict

        from fedkin import round as rounds

        exp = self.experiment
        r = exp.round
        t0 = time.perf_counter()
        cohort, phantom = exp.round_cohort(r)
        if len(cohort) == 0:
            return rounds.finish_round(exp, r, t0, {"clients": 0})
        population = tree_to_record(exp.population)
        round_config: dict[str, float] = {"round": r, "phantom": int(phantom)}
        if exp.privacy is not None:  # the clip norm (a released value) the nodes clip to
            round_config["clip"] = exp.channel_state.clip
        contents = {
            int(c): RecordDict(
                {
                    "population": population,
                    "config": ConfigRecord({**round_config, "client-id": int(c)}),
                }
            )
            for c in cohort
        }
        replies = self._send(grid, MessageType.TRAIN, contents, f"train-{r}", self.round_timeout)
        if not replies:
            raise RuntimeError(f"round {r + 1}: no client of the cohort replied")
        got = self._arrivals(cohort, replies, phantom)
        return rounds.server_update(exp, r, t0, phantom, cohort, got)

    def _arrivals(self, cohort: torch.Tensor, replies: dict[int, Any], phantom: bool):
        """The round's :class:`~fedkin.round.Arrivals` from the nodes' replies (a client
        without a reply: zero message, weight 0, counted as dropped)."""
        from fedkin.backends import flower_channel as wire
        from fedkin.core.channel import finite_rows
        from fedkin.round import Arrivals

        exp, r = self.experiment, self.experiment.round
        channel, k = exp.channel, len(cohort)
        received = {c: wire.unpack(reply, channel, r, c) for c, reply in replies.items()}
        first = next(iter(replies.values()))
        zero_msg = tree_map(torch.zeros_like, next(iter(received.values()))[0])
        reports = "metrics" in first  # the nodes send metrics unless the release policy forbids
        nan_metrics = (
            tree_map(lambda t: torch.full_like(t, float("nan")), record_to_tree(first["metrics"]))
            if reports
            else {}
        )
        messages, metrics, reported_ok, n_i, clipped = [], [], [], [], []
        uplink = 0.0
        for c in cohort.tolist():
            reply = replies.get(c)
            if reply is None:  # dropped: zero message, zero weight (never averaged in)
                messages.append(zero_msg)
                metrics.append(nan_metrics)
                reported_ok.append(False)
                n_i.append(0.0)
                clipped.append(False)
                continue
            info = reply.get("info", {})
            message, nbytes = received[c]
            messages.append(message)
            if not (channel.omniscient and bool(channel.byzantine[c])):
                uplink += nbytes  # (the adversary's rows are counted when it forms them)
            metrics.append(record_to_tree(reply["metrics"]) if reports else {})
            # without a report, a rejected update arrives as NaN (central) or as the release
            # of 0 (local DP): the non-finite filter is all the server needs
            reported_ok.append(bool(info.get("ok", 1)))
            n_i.append(float(info.get("num-examples", 0.0)))
            clipped.append(bool(info.get("clipped", 0)))
        stacked = _stack(messages)
        metrics = _stack(metrics) if reports else {}
        ok = torch.tensor(reported_ok) & finite_rows(metrics, k)
        was_clipped = torch.tensor(clipped)
        if channel.omniscient:  # the simulated adversary forms the Byzantine clients' messages
            stacked, ok, was_clipped, adversary_bytes = self._adversary(
                cohort, replies, received, stacked, ok, was_clipped, phantom
            )
            uplink += adversary_bytes
        ok = ok & finite_rows(stacked, k)
        if phantom:
            ok, uplink = torch.zeros_like(ok), 0.0
        n = torch.tensor(n_i, dtype=torch.float32)
        weights = n if exp.config.cohort.weighting == "samples" else torch.ones(k)
        return Arrivals(
            messages=stacked,
            weights=weights * ok,
            ok=ok,
            clients=cohort,
            metrics=metrics,
            was_clipped=was_clipped,
            uplink_bytes=uplink,
            dropped=k - len(replies),
        )

    def _adversary(self, cohort, replies, received, stacked, ok, was_clipped, phantom):
        """The Byzantine rows of an omniscient attack: the client half over the cohort's raw
        messages after the nodes' momentum (the Byzantine clients' own, the honest ones'
        ``adversary-view``), with the
        Byzantine clients' residuals kept by the adversary (the server's residual store).
        Returns the messages, ok, clip bits with those rows replaced and their bytes."""
        from fedkin.channel.runtime import model_size

        exp, r = self.experiment, self.experiment.round
        channel = exp.channel
        byz = channel.byzantine[cohort]
        raw_rows = []
        for j, c in enumerate(cohort.tolist()):
            reply = replies.get(c)
            if reply is None:
                raw_rows.append(tree_map(lambda t, j=j: t[j], stacked))
            elif bool(byz[j]):
                raw_rows.append(received[c][0])
            else:
                raw_rows.append(record_to_tree(reply["adversary-view"]))
        raw = _stack(raw_rows)
        d = model_size(raw)
        store = exp.channel_store(d) if channel.error_feedback and d is not None else None
        kept = store.gather(cohort) if store is not None else {}
        clip = exp.channel_state.clip
        present = torch.tensor([c in replies for c in cohort.tolist()])
        up = channel.client_half(raw, cohort, ok & present, r, kept.get("residual"), clip)
        rows = byz & present
        if store is not None and not phantom:  # (the momenta stay on the nodes)
            kept["residual"] = up.residuals
            store.scatter(cohort[rows], {k: v[rows] for k, v in kept.items()})
        messages = tree_map(
            lambda a, b: torch.where(rows.reshape(-1, *([1] * (a.dim() - 1))), b, a),
            stacked,
            up.messages,
        )
        ok = torch.where(rows, up.ok, ok)
        was_clipped = torch.where(rows, up.was_clipped, was_clipped)
        return messages, ok, was_clipped, float(up.uplink_bytes[rows].sum())

    def evaluate(self, grid) -> dict[str, Any]:
        """``Experiment.evaluate`` with every client evaluating on its own node."""
        from flwr.app import ConfigRecord, MessageType, RecordDict

        from fedkin.core.evaluate import summarize

        exp = self.experiment
        t0 = time.perf_counter()
        alg, n = exp.algorithm, exp.dataset.num_clients
        if not exp.release.client_evaluation:  # nothing to ask the nodes for (see train)
            record = {"round": exp.round, "kind": "eval", **exp.example_accounting()}
            return exp.release.record({**record, "eval_time_s": time.perf_counter() - t0})
        personal = exp.personalizes()
        population = tree_to_record(exp.population)
        contents = {
            c: RecordDict(
                {
                    "population": population,
                    "config": ConfigRecord(
                        {
                            "round": exp.round,
                            "adapt": not bool(exp.is_training[c]),
                            "personal": personal,
                            "global": alg.has_global_model,
                        }
                    ),
                }
            )
            for c in range(n)
        }
        replies = self._send(
            grid, MessageType.EVALUATE, contents, f"eval-{exp.round}", self.round_timeout
        )
        got = torch.zeros(n, dtype=torch.bool)
        counts, g_correct, g_loss, p_correct, p_loss = (
            torch.zeros(n, dtype=torch.float64) for _ in range(5)
        )
        for c, content in replies.items():
            ev = content["eval"]
            got[c] = True
            counts[c] = ev["test-count"]
            g_correct[c], g_loss[c] = ev.get("global-correct", 0.0), ev.get("global-loss", 0.0)
            p_correct[c] = ev.get("personal-correct", 0.0)
            p_loss[c] = ev.get("personal-loss", 0.0)
        record: dict[str, Any] = {"round": exp.round, "kind": "eval"}
        train = exp.is_training & got
        if alg.has_global_model:
            record.update(
                summarize("global", g_correct[train], g_loss[train], counts[train], alg.task)
            )
        correct, loss = (p_correct, p_loss) if personal else (g_correct, g_loss)
        record.update(summarize("personal", correct[train], loss[train], counts[train], alg.task))
        exp.client_accuracy = {"personal": (correct[train] / counts[train]).tolist()}
        new = exp.new_clients[got[exp.new_clients]]
        if len(new):
            record.update(summarize("new", correct[new], loss[new], counts[new], alg.task))
            exp.client_accuracy["new"] = (correct[new] / counts[new]).tolist()
        if not bool(got.all()):
            record["eval_missing_clients"] = float((~got).sum())
        record.update(exp.example_accounting())
        record["eval_time_s"] = time.perf_counter() - t0
        return exp.release.record(record)

    # ----- the loop -----------------------------------------------------------------------------
    def main(self, grid, context) -> None:
        """The ServerApp entry point; an error that stops the run (a guard, a lost cohort) is
        kept in ``error`` for :func:`run_simulation` to raise in the caller's thread."""
        try:
            self.run(grid)
        except Exception as err:
            self.error = err
            raise

    def run(self, grid) -> dict[str, Any]:
        """The run (:func:`fedkin.round.run`: guards, stop reasons, checkpoints of the server
        side, trackers) with rounds and evaluations over the grid."""
        from flwr.common import log

        from fedkin import round as rounds
        from fedkin.tracking import JsonlTracker

        cfg = self.config
        self.experiment = exp = _experiment(cfg, self.dataset)
        trackers: list[Any] = [_Collect(self.records)]
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
            trackers.append(JsonlTracker(self.run_dir))
        self.node_of = self.discover(grid)
        log(20, "fedkin: %d SuperNodes, one per client; %d rounds", len(self.node_of), cfg.rounds)

        def train_round() -> dict[str, Any]:
            record = self.train_round(grid)
            shown = {k: record[k] for k in ("train_loss", "epsilon") if k in record}
            log(20, "fedkin: round %d/%d %s", exp.round, cfg.rounds, shown)
            return record

        info = {"name": cfg.name, "rounds": cfg.rounds, "dataset": exp.dataset.summary()}
        self.summary = rounds.run(
            exp,
            self.run_dir,
            trackers,
            train_round=train_round,
            evaluate=lambda: self.evaluate(grid),
            info=info,
            runtime="flower",
        )
        if self.run_dir is not None:
            torch.save(
                {"round": exp.round, "population": exp.population}, self.run_dir / "population.pt"
            )
        log(20, "fedkin: done after %d rounds", exp.round)
        return self.summary


class _Collect:
    """A tracker keeping the records in a list (``FlowerServer.records``)."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def start(self, info: dict[str, Any]) -> None: ...

    def record(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def finish(self, summary: dict[str, Any]) -> None: ...


def _server_app(main):
    from flwr.serverapp import ServerApp

    app = ServerApp()
    app.main()(main)
    return app


def default_run_dir(run_id: int) -> Path:
    """Where a ServerApp whose run config names no ``fedkin-run-dir`` writes its results."""
    return Path.home() / ".fedkin" / "flower-runs" / str(run_id)


def _server_from_context(grid, context) -> None:
    """The deployed ServerApp: results go to ``fedkin-run-dir`` (default
    :func:`default_run_dir`), which the log names; a run that fails leaves the error in
    ``FAILURE_FILE`` there (``flwr run`` exits 0 anyway: ``fedkin flower run`` reads it)."""
    from flwr.common import log

    server = FlowerServer.from_run_config(context.run_config)
    if server.run_dir is None:
        server.run_dir = default_run_dir(context.run_id)
    log(20, "fedkin: results go to %s", server.run_dir)
    try:
        server.run(grid)
    except BaseException as err:
        server.run_dir.mkdir(parents=True, exist_ok=True)
        (server.run_dir / FAILURE_FILE).write_text(f"{type(err).__name__}: {err}\n")
        raise
    log(20, "fedkin: results written to %s", server.run_dir)


# ----- public entry points ---------------------------------------------------------------------


def make_apps(
    config: ExperimentConfig,
    run_dir: str | Path | None = None,
    node_timeout: float = 120.0,
    round_timeout: float = 600.0,
    dataset: FederatedDataset | None = None,
    mods: list | None = None,
):
    """``(ServerApp, ClientApp)`` running ``config``'s experiment; the ServerApp's
    :class:`FlowerServer` (records, summary, population) is ``server_app.fedkin_server``.

    ``dataset``: a prebuilt federated dataset for the server and every node instead of
    building ``config.data`` (as ``Experiment(config, dataset=…)``); ``mods``: Flower client
    mods wrapped around every node's handlers (e.g. to log what leaves a node)."""
    require_flwr()
    server = FlowerServer(config, run_dir, node_timeout, round_timeout, dataset)
    app = _server_app(server.main)
    app.fedkin_server = server
    return app, _client_app(config, dataset, mods)


def run_simulation(
    config: ExperimentConfig,
    run_dir: str | Path | None = None,
    client_cpus: float = 1.0,
    verbose: bool = False,
    dataset: FederatedDataset | None = None,
    mods: list | None = None,
) -> FlowerServer:
    """Run ``config`` on Flower's Simulation Runtime (Ray), one virtual SuperNode per client;
    returns the finished :class:`FlowerServer` (``dataset``, ``mods``: see :func:`make_apps`)."""
    require_flwr()
    from flwr.simulation import run_simulation as flwr_run_simulation

    server_app, client_app = make_apps(config, run_dir, dataset=dataset, mods=mods)
    # A Ray backend pool of this process holds its CPUs while idle and Ray never preempts
    # actors, so Flower's node actors would wait for them forever: stop the pool first.
    if "fedkin.backends.ray_backend" in sys.modules:
        sys.modules["fedkin.backends.ray_backend"].shutdown()
    flwr_run_simulation(
        server_app,
        client_app,
        num_supernodes=config.data.num_clients,
        backend_config={"client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0}},
        verbose_logging=verbose,
    )
    server = server_app.fedkin_server
    if server.error is not None:
        raise server.error
    return server


def write_flower_project(
    directory: str | Path,
    overrides: str = "",
    config_path: str = "",
    run_dir: str = "",
    name: str = "fedkin-flower",
) -> Path:
    """Write a minimal Flower app directory (``pyproject.toml``) for ``flwr run``: its
    components are this module's ``server_app`` / ``client_app``, its run config the
    experiment (``fedkin-config`` path and/or ``fedkin-overrides``). Returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    values = {
        **RUN_CONFIG_DEFAULTS,
        "fedkin-config": config_path,
        "fedkin-overrides": overrides,
        "fedkin-run-dir": run_dir,
    }
    run_config = "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items())
    (directory / "pyproject.toml").write_text(
        f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "A fedkin experiment as a Flower app"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedkin"

[tool.flwr.app.components]
serverapp = "fedkin.backends.flower_app:server_app"
clientapp = "fedkin.backends.flower_app:client_app"

[tool.flwr.app.config]
{run_config}
"""
    )
    return directory


def __getattr__(name: str):
    """``server_app`` / ``client_app``: built on first access (so importing this module does
    not need flwr); they read the experiment from the Flower run config."""
    if name == "server_app":
        require_flwr()
        app = globals()["server_app"] = _server_app(_server_from_context)
        return app
    if name == "client_app":
        require_flwr()
        app = globals()["client_app"] = _client_app(None)
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
