"""Under DP only the accounted release leaves the clients (``fedkin.privacy.release``).

Neighbouring datasets: the configured dataset, and a copy in which one training client —
one that is sampled — has different samples (features flipped, labels shifted, sizes kept).
Both runs use the same config, hence the same noise seed and cohort draws. Everything a run
writes (every field of every ``metrics.jsonl`` record, ``summary.json`` and the progress line,
timings aside) must be identical between the two, except the accounted releases named in
``ACCOUNTED``; the population model (the noised release itself) must differ, which shows the
change reached the mechanism. With ``privacy.release_diagnostics=true`` the same comparison
fails — it is the comparison that caught the leaks of issue 10.

The same holds in-process (every algorithm, central and local DP), on Ray (2 workers) and
through the Flower protocol, where every message a node sends is compared as well: under
central DP a node sends its clipped update and nothing else (no metrics, no example count),
under local DP only its noised release.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import sys

import pytest
import torch
from rich.console import Console

from conftest import registered_algorithms, tiny_config, tiny_for
from fedkin.algorithms import ALGORITHMS
from fedkin.config import load_config
from fedkin.core.errors import ConfigError
from fedkin.core.tree import tree_leaves
from fedkin.data import build_dataset
from fedkin.experiment import Experiment
from fedkin.privacy.release import NotPrivateWarning
from fedkin.tracking import SUMMARY, ConsoleTracker, JsonlTracker, read_records

MECHANISMS = {
    # Poisson cohorts: the cohort size is not released
    "central": (
        "privacy.mechanism=central",
        "privacy.noise_multiplier=1",
        "cohort.weighting=uniform",
        "cohort.sampling=poisson",
    ),
    # fixed cohorts of k: the cohort size is the config's
    "local": (
        "privacy.mechanism=local",
        "privacy.noise_multiplier=1",
        "cohort.weighting=uniform",
        "cohort.sampling=fixed",
    ),
}
#: 8 clients (2 held out as new clients), 4 per round, an evaluation after each of 2 rounds.
SMALL = (
    "data.num_clients=8",
    "eval.holdout_clients=0.25",
    "cohort.clients_per_round=4",
    "rounds=2",
    "eval.every=1",
)
#: Combinations the config refuses under DP, with the error naming the keys.
REFUSED = {"ifca": r"algorithm\.name=ifca cannot run with privacy\.mechanism="}
#: Adaptive clipping (count noise σ_b > z/2 = 0.5 for z = 1).
ADAPTIVE = ("privacy.adaptive_clip.count_noise=1",)
#: Accounted releases that may differ between neighbours: adaptive clipping's clip norm (a
#: function of the noisy count of unclipped updates).
ACCOUNTED = {"clip_norm"}
#: What a DP record / summary may hold (fedkin.privacy.release), spelled out independently.
TRAIN_KEYS = {"round", "kind", "epsilon", "clip_norm", "round_time_s"}
EVAL_KEYS = {"round", "kind", "eval_time_s"}
SUMMARY_KEYS = {
    "name",
    "algorithm",
    "rounds",
    "epsilon",
    "epsilon_rdp",
    "delta",
    "noise_multiplier",
    "planned_epsilon",
    "session_time_s",
    "eval_time_s",
    "private",
}


# ----- neighbouring datasets and runs ------------------------------------------------------------


def neighbours(config):
    """(dataset, its neighbour, the changed client): the client is the first training client
    sampled in the run, so its data enters the release."""
    dataset = build_dataset(config.data, config.seed)
    probe = Experiment(config, dataset=dataset)
    sampled = [int(c) for r in range(config.rounds) for c in probe.sample_cohort(r)]
    assert sampled, "no client is sampled in this config: pick another seed"
    client = sampled[0]
    rows = torch.cat(
        [
            dataset.train_index[client, : dataset.train_sizes[client]],
            dataset.test_index[client, : dataset.test_sizes[client]],
        ]
    )
    x, y = dataset.x.clone(), dataset.y.clone()
    x[rows] = x[rows].flip(-1)
    y[rows] = (y[rows] + 1) % dataset.num_classes
    return dataset, dataclasses.replace(dataset, x=x, y=y), client


class LineProbe:
    """A tracker after the console one: the progress line's metrics text after each record."""

    def __init__(self, console: ConsoleTracker) -> None:
        self.console = console
        self.lines: list[str] = []

    def start(self, info) -> None: ...

    def record(self, record) -> None:
        self.lines.append(self.console.progress.tasks[0].fields["metrics"])

    def finish(self, summary) -> None: ...


@dataclasses.dataclass
class Outcome:
    records: list[dict]
    summary: dict
    lines: list[str]
    population: dict


def run_in_process(config, dataset, run_dir) -> Outcome:
    """``fedkin run``'s loop with its trackers (progress line, metrics.jsonl, summary.json)."""
    run_dir.mkdir(parents=True)
    experiment = Experiment(config, run_dir, dataset=dataset)
    console = ConsoleTracker(Console(file=io.StringIO(), width=200))
    probe = LineProbe(console)
    experiment.run(run_dir, [console, probe, JsonlTracker(run_dir)])
    summary = json.loads((run_dir / SUMMARY).read_text())
    return Outcome(read_records(run_dir), summary, probe.lines, experiment.population)


def same(a, b) -> bool:
    both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return both_nan or a == b


def assert_same_release(a: dict, b: dict, where: str) -> None:
    """Identical keys and values, timings (``*_s``) and ``ACCOUNTED`` releases aside."""
    assert a.keys() == b.keys(), where
    for key in a:
        if not key.endswith("_s") and key not in ACCOUNTED:
            assert same(a[key], b[key]), f"{where}: {key} differs ({a[key]!r} vs {b[key]!r})"


def assert_neighbours_release_the_same(a: Outcome, b: Outcome) -> None:
    assert len(a.records) == len(b.records)
    for i, (ra, rb) in enumerate(zip(a.records, b.records, strict=True)):
        assert_same_release(ra, rb, f"record {i} ({ra['kind']}, round {ra['round']})")
    assert_same_release(a.summary, b.summary, "summary.json")
    assert a.lines == b.lines, "progress line"


def populations_differ(a: dict, b: dict) -> bool:
    return any(not torch.equal(x, y) for x, y in zip(tree_leaves(a), tree_leaves(b), strict=True))


#: Per-algorithm options that keep a tiny run tiny: once DP noise makes FedKSeed's aggregate of
#: seed-pool scalars dense, the server rebuilds its update from every one of the K directions.
TINY_OPTIONS = {"fedkseed": ("algorithm.pool_size=64",)}


def dp_config(algorithm: str, mechanism: str, *extra: str):
    """The DP config, or None after asserting that the config refuses the combination."""
    overrides = tiny_for(
        algorithm, *SMALL, *MECHANISMS[mechanism], *TINY_OPTIONS.get(algorithm, ()), *extra
    )
    if algorithm in REFUSED:
        with pytest.raises(ConfigError, match=REFUSED[algorithm]):
            load_config(None, overrides)
        return None
    return load_config(None, overrides)


def check_released_keys(outcome: Outcome, mechanism: str) -> None:
    # fixed cohorts (local): the cohort size k and, uncompressed, the bytes (k float32 messages)
    fixed = {"clients", "uplink_bytes", "downlink_bytes", "uplink_bytes_total"}
    fixed |= {"downlink_bytes_total"}
    train = TRAIN_KEYS | (fixed if mechanism == "local" else set())
    for record in outcome.records:
        assert set(record) <= (train if record["kind"] == "train" else EVAL_KEYS), record
        if record["kind"] == "train":  # bytes released exactly when data-independent
            assert ("uplink_bytes" in record) == (mechanism == "local"), record
    assert set(outcome.summary) == SUMMARY_KEYS and outcome.summary["private"] is True
    assert all(line.startswith("ε ") for line in outcome.lines), outcome.lines


# ----- every algorithm, central and local DP: in-process and through the Flower protocol ---------


@pytest.mark.parametrize("mechanism", sorted(MECHANISMS))
@pytest.mark.parametrize("algorithm", registered_algorithms())
def test_neighbouring_datasets_release_the_same(flower_identity, algorithm, mechanism, tmp_path):
    """Every registered algorithm (each on a tiny config of its task): in-process (records,
    summary.json, progress line) and through the Flower protocol on an in-process grid (every
    node message, the server's records); the Flower run is the in-process run."""
    config = dp_config(algorithm, mechanism)
    if config is None:
        return
    dataset, neighbour, _ = neighbours(config)
    a = run_in_process(config, dataset, tmp_path / "a")
    b = run_in_process(config, neighbour, tmp_path / "b")
    assert_neighbours_release_the_same(a, b)
    check_released_keys(a, mechanism)
    sends = algorithm != "local"  # Local sends nothing; for the rest the change reaches Γ
    assert populations_differ(a.population, b.population) == sends
    if not flower_identity:
        pytest.skip("flwr is not installed: the Flower half is skipped")

    server_a, sent_a = run_fake_flower(config, dataset)
    server_b, sent_b = run_fake_flower(config, neighbour)
    check_node_messages(sent_a, sent_b, config, sends)
    for ra, rb, rc in zip(a.records, server_a.records, server_b.records, strict=True):
        assert_same_release(ra, rb, "in-process vs flower")
        assert_same_release(rb, rc, "flower neighbours")
    assert server_a.summary["private"] is server_b.summary["private"] is True
    # bit for bit on the classification MLP; to float32 rounding for the PCA's QR and the
    # U-Net's convolutions, whose batched kernels (a cohort in-process, one client per node)
    # round differently
    exact = ALGORITHMS[algorithm].task.name == "classification"
    for x, y in zip(
        tree_leaves(a.population), tree_leaves(server_a.experiment.population), strict=True
    ):
        assert torch.equal(x, y) if exact else torch.testing.assert_close(x, y) is None


def test_adaptive_clip_norm_is_the_only_accounted_difference(tmp_path):
    config = dp_config("ditto", "central", "privacy.adaptive_clip.target_quantile=0.5", *ADAPTIVE)
    dataset, neighbour, _ = neighbours(config)
    a = run_in_process(config, dataset, tmp_path / "a")
    b = run_in_process(config, neighbour, tmp_path / "b")
    assert_neighbours_release_the_same(a, b)
    check_released_keys(a, "central")
    assert all("clip_norm" in r for r in a.records if r["kind"] == "train")


@pytest.mark.parametrize("algorithm", ["adaped", "apfl", "fedavg"])
def test_with_release_diagnostics_the_comparison_fails_and_the_run_is_not_private(
    algorithm, tmp_path
):
    """The opt-in brings back exact client-derived values (here AdaPeD's ψ_i, APFL's α_i,
    the train loss, accuracies): the neighbours' records then differ, which is what the
    comparison above rules out; the run warns and its summary says it is not private."""
    config = dp_config(algorithm, "central", "privacy.release_diagnostics=true")
    dataset, neighbour, client = neighbours(config)
    with pytest.warns(NotPrivateWarning, match="release_diagnostics"):
        a = run_in_process(config, dataset, tmp_path / "a")
    with pytest.warns(NotPrivateWarning):
        b = run_in_process(config, neighbour, tmp_path / "b")
    with pytest.raises(AssertionError, match="differs"):
        assert_neighbours_release_the_same(a, b)
    assert (
        a.summary["private"] is False and "release_diagnostics" in a.summary["not_private_reason"]
    )
    assert "personal_acc_mean" in a.summary and "train_loss" in a.records[0]
    per_client = ALGORITHMS[algorithm].per_client_metrics
    if per_client:
        trained = [r for r in a.records if f"{per_client[0]}_by_client" in r]
        assert any(str(client) in r[f"{per_client[0]}_by_client"] for r in trained)


def test_without_privacy_nothing_is_withheld(tmp_path):
    config = tiny_config(*SMALL, "algorithm.name=adaped")
    out = run_in_process(config, build_dataset(config.data, config.seed), tmp_path / "a")
    assert "private" not in out.summary and "psi_by_client" in out.records[0]
    assert "personal_acc_mean" in out.summary


def test_ifca_under_dp_is_refused_in_one_line(cli, capsys):
    for mechanism in MECHANISMS:
        overrides = [*SMALL, *MECHANISMS[mechanism], "algorithm.name=ifca"]
        assert cli(["run", *overrides, "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "algorithm.name=ifca" in err[0]
        assert f"privacy.mechanism={mechanism}" in err[0]


# ----- Ray: a representative set on 2 workers ----------------------------------------------------


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    from fedkin.backends import ray_backend

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray_backend.shutdown()
    ray.shutdown()


@pytest.mark.parametrize(
    ("algorithm", "mechanism"), [("adaped", "central"), ("apfl", "local"), ("fedrep", "central")]
)
def test_neighbours_on_ray_release_the_same_records(ray_instance, algorithm, mechanism, tmp_path):
    config = dp_config(algorithm, mechanism, "backend.name=ray", "backend.workers=2")
    dataset, neighbour, _ = neighbours(config)
    a = run_in_process(config, dataset, tmp_path / "a")
    b = run_in_process(config, neighbour, tmp_path / "b")
    assert_neighbours_release_the_same(a, b)
    check_released_keys(a, mechanism)
    assert populations_differ(a.population, b.population)


# ----- Flower: every message a node sends --------------------------------------------------------


def flower():
    pytest.importorskip("flwr")
    from fedkin.backends import flower_app

    return flower_app


@pytest.fixture
def flower_identity(monkeypatch) -> bool:
    """What a Flower runtime sets in the ServerApp's process before messages are created;
    False without flwr (tests then skip their Flower half)."""
    try:
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:
        return False
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
    return True


def content_of(reply) -> dict:
    """A reply's records as plain values: trees of tensors and dicts of scalars."""
    from flwr.app import ArrayRecord

    fa = flower()
    return {
        name: fa.record_to_tree(record) if isinstance(record, ArrayRecord) else dict(record)
        for name, record in reply.content.items()
    }


def update_norm(tree: dict) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tree_leaves(tree)))


def check_node_messages(sent_a: list, sent_b: list, config, sends: bool = True) -> None:
    """``sent``: (message type, client id, content) of every reply the nodes sent, in order.
    Identical between neighbours except the update; under central DP a train reply is the
    clipped update (plus, with adaptive clipping, the clipped bit its noisy count uses) and
    nothing else; under local DP the noised release only; no evaluation leaves a node."""
    assert [(t, c) for t, c, _ in sent_a] == [(t, c) for t, c, _ in sent_b]
    assert {t for t, _, _ in sent_a} == {"query", "train"}
    adaptive = config.privacy.adaptive_clip is not None
    changed = 0
    for (kind, client, a), (_, _, b) in zip(sent_a, sent_b, strict=True):
        if kind == "query":
            assert a == b == {"info": {"partition-id": client}}
            continue
        allowed = {"message", "info"} if adaptive else {"message"}
        assert set(a) == set(b) and set(a) <= allowed and "message" in a, (client, set(a))
        if adaptive:
            assert set(a["info"]) == {"clipped"}
        if config.privacy.mechanism == "central":  # the clipped update, nothing else
            assert update_norm(a["message"]) <= config.privacy.clip * (1 + 1e-6)
        leaves_a, leaves_b = tree_leaves(a["message"]), tree_leaves(b["message"])
        changed += any(not torch.equal(x, y) for x, y in zip(leaves_a, leaves_b, strict=True))
    assert bool(changed) == sends, "the changed client's update never differed"


def run_fake_flower(config, dataset):
    from flower_fake import FakeGrid

    fa = flower()
    server_app, client_app = fa.make_apps(config, dataset=dataset)
    n = config.data.num_clients
    grid = FakeGrid(client_app, [{"partition-id": i} for i in range(n)])
    server = server_app.fedkin_server
    server.run(grid)
    assert not grid.errors, grid.errors
    sent = [(kind, client, content_of(reply)) for kind, client, reply in grid.sent]
    return server, sent


def test_flower_adaptive_clipping_sends_the_clipped_bit_only(flower_identity):
    config = dp_config("fedavg", "central", "privacy.adaptive_clip.target_quantile=0.5", *ADAPTIVE)
    dataset, neighbour, _ = neighbours(config)
    server_a, sent_a = run_fake_flower(config, dataset)
    _, sent_b = run_fake_flower(config, neighbour)
    check_node_messages(sent_a, sent_b, config)
    local = Experiment(config, dataset=dataset)
    for _ in range(config.rounds):
        local.run_round()
    assert local.channel_state.clip == server_a.experiment.channel_state.clip
    assert local.channel_state.clip != config.privacy.clip
    for x, y in zip(
        tree_leaves(local.population), tree_leaves(server_a.experiment.population), strict=True
    ):
        assert torch.equal(x, y)


def test_flower_node_refuses_to_evaluate_under_dp(flower_identity):
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    fa = flower()
    config = dp_config("ditto", "local")
    _, client_app = fa.make_apps(config)
    context = Context(
        run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
    )
    ask = Message(
        RecordDict(
            {
                "population": fa.tree_to_record(Experiment(config).population),
                "config": ConfigRecord(
                    {"round": 0, "adapt": False, "personal": True, "global": True}
                ),
            }
        ),
        dst_node_id=1,
        message_type="evaluate",
        group_id="eval-0",
    )
    with pytest.raises(Exception, match=r"not released under privacy\.mechanism=local"):
        client_app(ask, context)


# ----- Flower's real Simulation Runtime ----------------------------------------------------------


class NodeLog:
    """A Flower client mod: saves every reply its node sends (as plain values) to ``directory``,
    one file per message, so the test can read what left the nodes' processes."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def __call__(self, message, context, call_next):
        reply = call_next(message, context)
        if not reply.has_error():
            entry = (
                message.metadata.message_type,
                int(context.node_config["partition-id"]),
                int(message.content["config"]["round"]) if "config" in message.content else -1,
                content_of(reply),
            )
            name = f"{os.getpid()}-{message.metadata.message_id or id(message)}.pt"
            torch.save(entry, os.path.join(self.directory, name))
        return reply


def simulate(config, dataset, log_dir):
    """``config`` on Flower's Simulation Runtime (4 virtual SuperNodes on Ray); every node reply
    logged by :class:`NodeLog`. Returns the server and the replies sorted by (round, client)."""
    fa = flower()
    import ray

    # the mod travels to Flower's Ray actors by value (they cannot import tests/)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    log_dir.mkdir()
    server = fa.run_simulation(config, dataset=dataset, mods=[NodeLog(str(log_dir))])
    entries = [torch.load(p, weights_only=False) for p in log_dir.iterdir()]
    order = {"query": 0, "train": 1, "evaluate": 2}
    entries.sort(key=lambda e: (order[e[0]], e[2], e[1]))
    return server, [(kind, client, content) for kind, client, _, content in entries]


SIM = ("data.num_clients=4", "eval.holdout_clients=0", "cohort.clients_per_round=3")


def same_population_as_in_process(config, dataset, server) -> None:
    local = Experiment(config, dataset=dataset)
    for _ in range(config.rounds):
        local.run_round()
    for x, y in zip(
        tree_leaves(local.population), tree_leaves(server.experiment.population), strict=True
    ):
        assert torch.equal(x, y)


@pytest.mark.slow
def test_simulation_runtime_neighbours_send_only_the_release(tmp_path):
    """Flower's real Simulation Runtime, AdaPeD under central DP: the nodes' messages (logged
    inside the Ray actors) differ between neighbours only in the update, and the run equals
    the in-process one bit for bit."""
    config = dp_config("adaped", "central", *SIM)
    dataset, neighbour, _ = neighbours(config)
    server_a, sent_a = simulate(config, dataset, tmp_path / "a")
    server_b, sent_b = simulate(config, neighbour, tmp_path / "b")
    check_node_messages(sent_a, sent_b, config)
    assert server_a.summary["private"] is True
    for ra, rb in zip(server_a.records, server_b.records, strict=True):
        assert_same_release(ra, rb, "flower record")
    same_population_as_in_process(config, dataset, server_a)


@pytest.mark.slow
def test_simulation_runtime_local_dp_nodes_send_the_noised_release_only(tmp_path):
    """FedRep under local DP on the real runtime: each train reply is the noised message alone
    (noise z·C·√d ≫ C), and the population equals the in-process run's."""
    config = dp_config("fedrep", "local", *SIM)
    dataset = build_dataset(config.data, config.seed)
    server, sent = simulate(config, dataset, tmp_path / "a")
    trains = [content for kind, _, content in sent if kind == "train"]
    assert {kind for kind, _, _ in sent} == {"query", "train"}
    assert len(trains) == config.rounds * config.cohort.clients_per_round
    assert all(set(c) == {"message"} for c in trains)
    assert all(update_norm(c["message"]) > 5 * config.privacy.clip for c in trains)
    same_population_as_in_process(config, dataset, server)


def test_compare_under_dp_needs_the_diagnostics_opt_in():
    """``fedkin compare`` ranks by accuracy on client data: under DP it asks for the opt-in."""
    from fedkin.compare import plan

    dp = [*SMALL, *MECHANISMS["central"]]
    with pytest.raises(ConfigError, match=r"privacy\.release_diagnostics=true"):
        plan(None, dp, ["fedavg"], 1)
    _, section = plan(None, [*dp, "privacy.release_diagnostics=true"], ["fedavg"], 1)
    assert section.algorithms == ["fedavg"]
