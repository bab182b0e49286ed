"""The Flower adapter: fedkin algorithms as a Flower ServerApp/ClientApp.

* fast: tree <-> ArrayRecord codec, the missing-extra error, run-config parsing, and the whole
  server/client protocol over an in-process fake Grid (population bit-identical to ``fedkin
  run``, personal states kept in ``context.state``, stale/duplicate messages refused);
* slow: Flower's Simulation Runtime (``flwr.simulation.run_simulation`` on Ray), and a real
  TLS deployment on loopback — ``flower-superlink`` + two ``flower-supernode`` processes and
  ``flwr run`` — checked against the in-process run.
"""

from __future__ import annotations

import os

# Before flwr is imported: no telemetry or update checks (the machine has loopback only).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import registered_algorithms, tiny_for
from fedkin.algorithms import ALGORITHMS
from fedkin.config import load_config
from fedkin.core.errors import UserError
from fedkin.core.tree import tree_leaves

flwr = pytest.importorskip("flwr")


from fedkin.backends import flower_app  # noqa: E402
from fedkin.backends.flower_app import (  # noqa: E402
    FlowerNotInstalledError,
    config_from_run_config,
    make_apps,
    record_to_tree,
    tree_to_record,
)
from fedkin.backends.flower_deploy import write_certificates  # noqa: E402
from flower_fake import FakeGrid, task_identity  # noqa: E402, F401 (autouse fixture)

TINY = ["data.num_clients=4", "cohort.clients_per_round=4", "rounds=2", "model.hidden=[16]"]


def tiny(*extra: str):
    return load_config(None, [*TINY, *extra])


def run_in_process(config, eval_every_round: bool = True):
    """``fedkin run``'s loop without a run directory: records and final population."""
    from fedkin.experiment import Experiment

    exp = Experiment(config)
    records = []
    while exp.round < config.rounds:
        records.append(exp.run_round())
        if eval_every_round or exp.round == config.rounds:
            records.append(exp.evaluate())
    return records, exp.population


def same_records(a: list[dict], b: list[dict], rel: float = 1e-6) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        for key, value in ra.items():
            if key.endswith("_s"):
                continue
            assert key in rb, key
            if isinstance(value, float):
                assert rb[key] == pytest.approx(value, rel=rel, abs=1e-7, nan_ok=True), key
            else:
                assert rb[key] == value, key


def run_fake(config, duplicate: bool = False, node_configs: list[dict] | None = None):
    server_app, client_app = make_apps(config)
    n = config.data.num_clients
    configs = node_configs or [{"partition-id": i, "num-partitions": n} for i in reversed(range(n))]
    grid = FakeGrid(client_app, configs, duplicate)
    server = server_app.fedkin_server
    server.run(grid)
    return server, grid


def run_both(config, exact: bool = True):
    """The config in-process and through the Flower protocol; asserts the population is
    bit-identical (same cohorts, batches, engine) — or, not ``exact``, equal to float32
    rounding — and the records agree. Returns the Flower server and grid."""
    expected_records, expected_population = run_in_process(config)
    server, grid = run_fake(config)
    assert not grid.errors
    for a, b in zip(
        tree_leaves(expected_population), tree_leaves(server.experiment.population), strict=True
    ):
        assert torch.equal(a, b) if exact else torch.testing.assert_close(a, b) is None
    same_records(expected_records, server.records, rel=1e-6 if exact else 1e-4)
    return server, grid


# ----- fast tests -------------------------------------------------------------------------------


def test_tree_record_roundtrip_keeps_structure_dtypes_and_shapes():
    tree = {
        "global": {"net.0.weight": torch.randn(3, 2), "net.0.bias": torch.randn(3)},
        "opt": {},
        "extras": {"count": torch.tensor(7), "mask": torch.tensor([True, False])},
        "half": torch.randn(4).to(torch.bfloat16),
        "ids": torch.arange(5),
    }
    back = record_to_tree(tree_to_record(tree))
    assert back.keys() == tree.keys() and back["opt"] == {}
    for a, b in zip(tree_leaves(tree), tree_leaves(back), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert record_to_tree(tree_to_record({})) == {}
    with pytest.raises(ValueError, match="may not contain"):
        tree_to_record({"a/b": torch.zeros(1)})


def test_without_flwr_the_adapter_names_the_extra(monkeypatch, cli, tmp_path, capsys):
    monkeypatch.delitem(vars(flower_app), "client_app", raising=False)  # built lazily
    monkeypatch.setitem(sys.modules, "flwr.clientapp", None)
    for use in (
        flower_app.require_flwr,
        lambda: make_apps(tiny()),
        lambda: flower_app.client_app,
    ):
        with pytest.raises(FlowerNotInstalledError, match=r"pip install 'fedkin\[flower\]'"):
            use()
    assert cli(["run", *TINY, "backend.name=flower", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'fedkin[flower]'" in err[0]
    assert issubclass(FlowerNotInstalledError, UserError)


def test_run_config_names_the_experiment(tmp_path):
    (tmp_path / "exp.yaml").write_text("rounds: 7\nalgorithm: {name: ditto, lam: 0.5}\n")
    config = config_from_run_config(
        {"fedkin-config": str(tmp_path / "exp.yaml"), "fedkin-overrides": "seed=3 model.hidden=[8]"}
    )
    assert (config.rounds, config.seed, config.algorithm.name) == (7, 3, "ditto")
    assert config.algorithm.lam == 0.5 and config.model.hidden == [8]
    assert config_from_run_config({}) == load_config(None, [])


def test_importable_apps_are_flower_apps():
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    assert isinstance(flower_app.server_app, ServerApp)
    assert isinstance(flower_app.client_app, ClientApp)
    assert {"server_app", "client_app"} <= set(flower_app.__all__)  # found by `flwr run`


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["algorithm.name=ditto", "eval.holdout_clients=0.25", "cohort.clients_per_round=2"],
        ["algorithm.name=fedprox", "cohort.weighting=uniform", "engine.name=sequential"],
        [
            "privacy.mechanism=central",
            "privacy.noise_multiplier=0.5",
            "cohort.weighting=uniform",
            "cohort.sampling=poisson",
            "cohort.clients_per_round=2",
        ],
        [
            "algorithm.name=local",
            "client_models=[{model: {name: mlp, hidden: [8]}, fraction: 0.5},"
            " {model: {name: logreg}, fraction: 0.5}]",
        ],
    ],
    ids=["fedavg", "ditto-holdout", "fedprox-sequential", "central-dp", "local-model-groups"],
)
def test_protocol_reproduces_the_in_process_run(extra):
    config = tiny("rounds=3", "eval.every=1", *extra)
    server, grid = run_both(config)
    # personal state lives in the context of every node that trained, and only there
    trained = {int(c) for r in range(config.rounds) for c in server.experiment.sample_cohort(r)}
    have = {
        int(c.node_config["partition-id"])
        for c in grid.contexts.values()
        if "fedkin-state" in c.state
    }
    assert have == trained


@pytest.mark.parametrize("algorithm", registered_algorithms())
def test_every_algorithm_runs_through_the_protocol(algorithm):
    """Each algorithm as a Flower app: equal to its in-process run (2 rounds, holdout clients
    so new-client evaluation crosses the wire too) — bit for bit on the classification MLP;
    to float32 rounding for the PCA's QR and the U-Net's convolutions, whose batched kernels
    (a cohort in-process, one client per node) round differently."""
    small = ("data.num_clients=4", "cohort.clients_per_round=3", "rounds=2", "eval.every=1")
    config = load_config(None, tiny_for(algorithm, *small, "eval.holdout_clients=0.25"))
    run_both(config, exact=ALGORITHMS[algorithm].task.name == "classification")


def test_empty_dp_cohort_releases_noise_and_writes_no_state():
    """Seed 4 samples nobody in rounds 1 and 4 (Poisson, q = 1/4): under central DP those
    rounds still release a noised update, shaped by client 0 whose state stays unwritten."""
    config = tiny(
        "algorithm.name=ditto",
        "privacy.mechanism=central",
        "privacy.noise_multiplier=0.5",
        "cohort.weighting=uniform",
        "cohort.sampling=poisson",
        "cohort.clients_per_round=1",
        "rounds=4",
        "eval.every=1",
        "seed=4",
        "privacy.release_diagnostics=true",  # to see the cohort sizes below
    )
    server, grid = run_both(config)
    exp = server.experiment
    assert [exp.round_cohort(r)[1] for r in range(4)] == [True, False, False, True]
    state_of = {int(c.node_config["partition-id"]): c.state for c in grid.contexts.values()}
    assert "fedkin-state" not in state_of[0]  # only ever a phantom
    assert [r["clients"] for r in server.records if r["kind"] == "train"] == [0, 1, 1, 0]


def test_local_dp_noise_is_added_on_the_nodes():
    """Under local DP no message leaves a node un-noised (norm ≫ C), and the server's average
    of the released messages equals the in-process run's."""
    config = tiny(
        "privacy.mechanism=local",
        "privacy.noise_multiplier=0.5",
        "privacy.clip=0.1",
        "cohort.weighting=uniform",
        "cohort.sampling=fixed",
        "eval.every=1",
    )
    _, grid = run_both(config)
    assert len(grid.train_replies) == config.rounds * config.cohort.clients_per_round
    for reply in grid.train_replies:
        sent = record_to_tree(reply.content["message"])
        norm = torch.sqrt(sum(t.pow(2).sum() for t in tree_leaves(sent)))
        assert norm > 10 * 0.1  # z·C·√d ≈ 0.05·√d for d ≈ 1.2k parameters: ≈ 1.7


def test_duplicate_delivery_trains_once():
    config = tiny("algorithm.name=ditto")
    _, expected_population = run_in_process(config)
    server, grid = run_fake(config, duplicate=True)
    assert len(grid.errors) == 2 * 4 and all("stale train message" in e for e in grid.errors)
    for a, b in zip(
        tree_leaves(expected_population), tree_leaves(server.experiment.population), strict=True
    ):
        assert torch.equal(a, b)


def test_nodes_must_map_one_to_one_to_clients():
    config = tiny("rounds=1")
    with pytest.raises(UserError, match="claim partition-id=0"):
        run_fake(config, node_configs=[{"partition-id": 0}] * 4)
    with pytest.raises(UserError, match="no node_config 'partition-id'"):
        run_fake(config, node_configs=[{"partition-id": i} for i in range(3)] + [{}])
    server_app, client_app = make_apps(config, node_timeout=0.5)
    grid = FakeGrid(client_app, [{"partition-id": i} for i in range(3)])  # client 3 never shows
    with pytest.raises(UserError, match=r"3 of 4 SuperNodes answered.*missing client ids: \[3\]"):
        server_app.fedkin_server.run(grid)


def test_run_dir_gets_config_metrics_summary_and_population(tmp_path):
    from fedkin.tracking import read_records

    config = tiny("rounds=1")
    server_app, client_app = make_apps(config, run_dir=tmp_path)
    server_app.fedkin_server.run(FakeGrid(client_app, [{"partition-id": i} for i in range(4)]))
    assert load_config(tmp_path / "config.yaml") == config
    assert [r["kind"] for r in read_records(tmp_path)] == ["train", "eval"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["runtime"] == "flower"
    saved = torch.load(tmp_path / "population.pt")
    assert torch.equal(
        saved["population"]["global"]["net.0.weight"],
        server_app.fedkin_server.experiment.population["global"]["net.0.weight"],
    )


#: A compressed, robust and attacked channel: top-k with error feedback (residuals on the nodes),
#: trimmed mean, and a sign flip of the honest mean by client 1 of 4 (omniscient: the server
#: simulates the adversary from the raw messages).
ROBUST_COMPRESSED = (
    "channel.aggregator.name=trimmed_mean",
    "channel.aggregator.f=1",
    "channel.compress.name=top_k",
    "channel.compress.density=0.1",
    "attack.name=sign_flip",
    "attack.fraction=0.25",
)


@pytest.mark.parametrize(
    "extra",
    [
        ROBUST_COMPRESSED,
        # the attack on the Byzantine node itself; QSGD's random rounding keyed by the client
        (
            "channel.aggregator.name=median",
            "channel.compress.name=qsgd",
            "attack.name=scaled",
            "attack.fraction=0.25",
        ),
        # compression under central DP: the node sends the encoded delta and its clip factor
        (
            "channel.compress.name=top_k",
            "channel.compress.density=0.2",
            "attack.name=gaussian",
            "attack.fraction=0.25",
            "privacy.mechanism=central",
            "privacy.noise_multiplier=0.5",
            "privacy.release_diagnostics=true",
            "cohort.weighting=uniform",
            "cohort.sampling=fixed",
            "privacy.accountant=rdp",
        ),
        # MoNNA with the clients' momentum on the nodes, top-k error feedback, and ALIE: the
        # server's simulated adversary sees the honest nodes' momenta
        (
            "channel.aggregator.name=monna",
            "channel.aggregator.f=1",
            "channel.momentum.beta=0.8",
            "channel.compress.name=top_k",
            "channel.compress.density=0.1",
            "attack.name=alie",
            "attack.fraction=0.25",
        ),
        # momentum under central DP: each node clips its momentum, which stays on the node
        (
            "channel.momentum.beta=0.8",
            "channel.compress.name=top_k",
            "channel.compress.density=0.2",
            "attack.name=scaled",
            "attack.fraction=0.25",
            "privacy.mechanism=central",
            "privacy.noise_multiplier=0.5",
            "cohort.weighting=uniform",
            "cohort.sampling=fixed",
            "privacy.accountant=rdp",
        ),
    ],
    ids=[
        "trimmed-topk-ef-signflip",
        "median-qsgd-scaled",
        "central-dp-topk-gaussian",
        "monna-momentum-topk-alie",
        "central-dp-momentum-topk-scaled",
    ],
)
def test_compressed_robust_attacked_channel_equals_the_in_process_run(extra):
    """The channel's client half on the nodes (compressed deltas on the wire, residuals in the
    nodes' context.state) and its server half in the shared round: the in-process records
    (bytes included) and population, bit for bit."""
    config = tiny("rounds=3", "eval.every=1", *extra)
    server, grid = run_both(config)
    sent = [reply.content for reply in grid.train_replies]
    encoded = [c for c in sent if "uplink" in c]
    assert encoded, "no compressed delta crossed the wire"
    if "channel.compress.name=top_k" in extra:
        d = sum(t.numel() for t in server.experiment.population["global"].values())
        k = -(-d * (2 if "privacy.mechanism=central" in extra else 1) // 10)
        assert all(len(c["uplink"]["delta"].numpy()) == 6 * k for c in encoded)
    error_feedback = "channel.compress.name=top_k" in extra
    residuals = [c for c in grid.contexts.values() if "fedkin-channel" in c.state]
    assert bool(residuals) == error_feedback
    if "channel.momentum.beta=0.8" in extra:  # each node's momentum equals the in-process one
        from fedkin.experiment import Experiment

        reference = Experiment(config)
        for _ in range(config.rounds):
            reference.run_round()
        for context in residuals:
            c = int(context.node_config["partition-id"])
            node = record_to_tree(context.state["fedkin-channel"])["momentum"]
            assert torch.equal(
                node, reference.channel_clients.gather(torch.tensor([c]))["momentum"][0]
            )
    train = [r for r in server.records if r["kind"] == "train"]
    private = (
        "privacy.mechanism=central" in extra and "privacy.release_diagnostics=true" not in extra
    )
    for r in train:  # (under DP a compressed run's byte counts are data-dependent: not released)
        assert "uplink_bytes" not in r if private else r["uplink_bytes"] > 0 < r["downlink_bytes"]


def test_flower_run_stops_like_the_in_process_run_on_the_budget(monkeypatch, tmp_path):
    """Same stop_reason, evaluation at the stop and checkpoint of the server side as
    in-process when the privacy budget runs out (the config's rounds raised after the noise was
    calibrated, as in test_privacy_learning)."""
    from fedkin.experiment import CHECKPOINT, Experiment

    config = tiny(
        "privacy.mechanism=central",
        "privacy.target_epsilon=1.5",
        "cohort.weighting=uniform",
        "cohort.sampling=poisson",
        "cohort.clients_per_round=2",
        "rounds=3",
        "privacy.release_diagnostics=true",
    )

    def longer(exp):
        exp.config = exp.config.model_copy(update={"rounds": 6})
        return exp

    exp = longer(Experiment(config))
    expected = exp.run(tmp_path, [])
    build = flower_app._experiment
    monkeypatch.setattr(flower_app, "_experiment", lambda *a: longer(build(*a)))
    server_app, client_app = make_apps(config, run_dir=tmp_path / "flower")
    summary = server_app.fedkin_server.run(
        FakeGrid(client_app, [{"partition-id": i} for i in range(4)])
    )
    assert "privacy budget" in expected["stop_reason"]
    assert summary["stop_reason"] == expected["stop_reason"] and summary["rounds"] == 3
    saved = torch.load(tmp_path / "flower" / CHECKPOINT, weights_only=False)
    assert saved["round"] == 3
    for a, b in zip(tree_leaves(exp.population), tree_leaves(saved["population"]), strict=True):
        assert torch.equal(a, b)


def test_flower_run_has_the_dead_round_guard():
    """Every update NaN for three rounds stops a Flower run with the in-process error."""
    from fedkin.core.errors import NonFiniteModelError
    from fedkin.experiment import Experiment

    config = tiny("rounds=10", "server.optimizer.lr=1e30")
    exp = Experiment(config)
    with pytest.raises(NonFiniteModelError, match="every client update was NaN/Inf") as local:
        while exp.round < config.rounds:
            exp.run_round()
    with pytest.raises(NonFiniteModelError) as flower:
        run_fake(config)
    assert str(flower.value) == str(local.value)


# ----- Flower's Simulation Runtime (Ray) ----------------------------------------------------------


@pytest.mark.slow
def test_fedkin_run_on_flower_reaches_the_in_process_result(cli, tmp_path, capsys):
    """``fedkin run backend.name=flower``: Flower's Simulation Runtime with 4 virtual
    SuperNodes gives the in-process records and population; resuming is refused clearly."""
    from fedkin.tracking import read_records

    overrides = [*TINY, "algorithm.name=ditto", "cohort.clients_per_round=3", "eval.every=1"]
    expected_records, expected_population = run_in_process(load_config(None, overrides))
    out = tmp_path / "flower-run"
    assert cli(["run", *overrides, "backend.name=flower", "--out", str(out), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    same_records(expected_records, read_records(out))
    population = torch.load(out / "population.pt")["population"]
    for a, b in zip(tree_leaves(expected_population), tree_leaves(population), strict=True):
        assert torch.equal(a, b)
    assert summary["runtime"] == "flower"
    assert summary["personal_acc_mean"] == pytest.approx(
        expected_records[-1]["personal_acc_mean"], abs=1e-6
    )
    assert cli(["run", "--resume", str(out)]) == 2
    assert "runs on Flower (backend.name=flower) cannot be resumed" in capsys.readouterr().err


@pytest.mark.slow
def test_simulation_runtime_runs_ifca_as_in_process():
    """IFCA (K cluster models, a one-hot in every message) on Flower's Simulation Runtime:
    the in-process records and population. AdaPeD / FedRep and central / local DP run on it
    in ``test_privacy_release.py``."""
    config = tiny(
        "algorithm.name=ifca",
        "algorithm.num_clusters=2",
        "cohort.clients_per_round=3",
        "eval.every=1",
    )
    expected_records, expected_population = run_in_process(config)
    server = flower_app.run_simulation(config)
    same_records(expected_records, server.records)
    assert any("cluster_by_client" in r for r in server.records)
    for a, b in zip(
        tree_leaves(expected_population), tree_leaves(server.experiment.population), strict=True
    ):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_simulation_runtime_runs_the_compressed_robust_channel_as_in_process():
    """Top-k with error feedback, trimmed mean and a sign-flip attack on Flower's Simulation
    Runtime: the in-process records (bytes included) and population, bit for bit."""
    config = tiny("rounds=3", "eval.every=1", *ROBUST_COMPRESSED)
    expected_records, expected_population = run_in_process(config)
    server = flower_app.run_simulation(config)
    same_records(expected_records, server.records)
    assert all(r["uplink_bytes"] > 0 for r in server.records if r["kind"] == "train")
    for a, b in zip(
        tree_leaves(expected_population), tree_leaves(server.experiment.population), strict=True
    ):
        assert torch.equal(a, b)


# ----- a real deployment on loopback with TLS ----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    """Until something accepts TCP connections on 127.0.0.1:port (or ``proc`` died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()[-2000:]}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(
        f"nothing listens on {port} after {timeout:g}s:\n{log.read_text()[-2000:]}"
    )


def _processes_mentioning(marker: str) -> list[int]:
    """PIDs whose command line contains ``marker`` (Flower's detached helper processes)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("flower-superlink") is None, reason="Flower CLIs not on PATH")
def test_tls_deployment_with_superlink_and_two_supernodes(tmp_path):
    """flower-superlink + 2 flower-supernode processes with TLS (a CA generated here), the app
    submitted with `flwr run`: a personalized algorithm (Ditto) under local DP. 2 rounds
    complete, the population equals the in-process run, the summary is private and holds no
    accuracy, and every process (including Flower's detached SuperExec/ClientApp helpers) is
    gone."""
    overrides = (
        "data.num_clients=2 cohort.clients_per_round=2 rounds=2 model.hidden=[16] "
        "algorithm.name=ditto privacy.mechanism=local privacy.noise_multiplier=1 "
        "cohort.weighting=uniform"
    )
    config = load_config(None, overrides.split())
    _, expected_population = run_in_process(config, eval_every_round=False)

    certs = write_certificates(tmp_path, ["localhost", "127.0.0.1"])
    tls = [
        "--ssl-ca-certfile",
        str(certs["ca"]),
        "--ssl-certfile",
        str(certs["cert"]),
        "--ssl-keyfile",
        str(certs["key"]),
    ]
    env = {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # no `uv sync`: no network
    }
    link_port = _free_port()
    node_ports = [_free_port(), _free_port()]
    started: list[tuple[str, subprocess.Popen]] = []

    def start(name: str, command: list[str]) -> None:
        home = tmp_path / f"home-{name}"
        home.mkdir()
        log = (tmp_path / f"{name}.log").open("w")
        proc = subprocess.Popen(
            command,
            env={**env, "FLWR_HOME": str(home)},
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        started.append((name, proc))

    run_dir = tmp_path / "run"
    app = flower_app.write_flower_project(
        tmp_path / "app", overrides=overrides, run_dir=str(run_dir)
    )
    cli_home = tmp_path / "home-cli"
    cli_home.mkdir()
    (cli_home / "config.toml").write_text(
        '[superlink]\ndefault = "fedkin-test"\n\n[superlink.fedkin-test]\n'
        f'address = "127.0.0.1:{link_port}"\nroot-certificates = "{certs["ca"]}"\n'
    )
    try:
        start(
            "superlink",
            [
                "flower-superlink",
                *tls,
                "--host",
                "127.0.0.1",
                "--port",
                str(link_port),
                "--disable-runtime-dependency-installation",
            ],
        )
        _wait_for_port(link_port, started[0][1], tmp_path / "superlink.log")
        for i, port in enumerate(node_ports):
            start(
                f"supernode{i}",
                [
                    "flower-supernode",
                    "--superlink",
                    f"127.0.0.1:{link_port}",
                    "--root-certificates",
                    str(certs["ca"]),
                    "--node-config",
                    f"partition-id={i} num-partitions=2",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    *tls,
                    "--max-retries",
                    "20",
                    "--max-wait-time",
                    "60",
                ],
            )
        result = subprocess.run(
            ["flwr", "run", str(app), "fedkin-test", "--stream"],
            env={**env, "FLWR_HOME": str(cli_home)},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=150,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert "Successfully started run" in result.stdout
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["rounds"] == 2 and summary["private"] is True
        assert summary["epsilon"] > 0 and not any("acc" in key for key in summary)
        population = torch.load(run_dir / "population.pt")["population"]
        for a, b in zip(tree_leaves(expected_population), tree_leaves(population), strict=True):
            assert torch.equal(a, b)
    finally:
        for _, proc in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc in started:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # Flower detaches its SuperExec/ClientApp helpers into their own sessions; they exit
        # with their parents. Wait for that, then make sure (by pid) nothing of ours is left.
        markers = [f"127.0.0.1:{p}" for p in (link_port, *node_ports)]
        deadline = time.monotonic() + 15
        left = [p for m in markers for p in _processes_mentioning(m)]
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = [p for m in markers for p in _processes_mentioning(m)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes still running after shutdown: {left}"
    for name, proc in started:
        assert proc.returncode in (0, -signal.SIGTERM), (name, proc.returncode)
