"""`fedkin flower deploy|run`: certificates, files and commands, and the helpers that run the
printed commands (``tests/test_readme_deploy.py`` runs the README's deployment with them: TLS,
a SuperLink and 2 SuperNodes on loopback, each with its own data file)."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import shlex
import signal
import subprocess
import tomllib
from pathlib import Path

import pytest

from fedkin.backends import flower_deploy
from fedkin.core.errors import RunFailure

SMALL = ["data.num_clients=2", "cohort.clients_per_round=2", "rounds=2", "model.hidden=[16]"]


def test_certificates_chain_to_the_ca_and_name_every_host(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    paths = flower_deploy.write_certificates(tmp_path, ["127.0.0.1", "link.example"], days=3)
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
    cert.verify_directly_issued_by(ca)  # raises unless signed by the CA
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert sans.get_values_for_type(x509.DNSName) == ["link.example"]
    life = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=2) < life <= dt.timedelta(days=3)
    assert oct(paths["key"].stat().st_mode & 0o777) == "0o600"
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(paths["key"].read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


@pytest.mark.parametrize("insecure", [False, True], ids=["tls", "insecure"])
def test_deploy_writes_the_app_config_and_prints_absolute_commands(cli, capsys, tmp_path, insecure):
    directory = tmp_path / "d"
    args = ["flower", "deploy", str(directory), *SMALL, "--port", "7000", "--node-port", "7100"]
    assert cli([*args, *(["--insecure"] if insecure else [])]) == 0
    printed = capsys.readouterr().out
    assert printed == (directory / "commands.sh").read_text()
    toml = tomllib.loads((directory / "flwr-home" / "config.toml").read_text())
    link = toml["superlink"][toml["superlink"]["default"]]
    assert link["address"] == "127.0.0.1:7000"
    app = tomllib.loads((directory / "app" / "pyproject.toml").read_text())
    assert app["tool"]["flwr"]["app"]["config"]["fedkin-run-dir"] == str(directory / "run")
    export, *lines = [c for c in printed.splitlines() if c[:1] != "#"]
    assert export == f'export PATH={flower_deploy.bin_dir()}:"$PATH"'
    commands = [shlex.split(c.removesuffix(" &")) for c in lines]
    superlink, *nodes = [c for c in commands if "flower-super" in c[0]]
    assert all(os.path.isabs(c[0]) and os.path.exists(c[0]) for c in commands if c[0][0] == "/")
    assert [n[n.index("--port") + 1] for n in nodes] == ["7100", "7101"]  # one port each
    assert [n[n.index("--node-config") + 1] for n in nodes] == [
        "partition-id=0 num-partitions=2",
        "partition-id=1 num-partitions=2",
    ]
    if insecure:
        assert link["insecure"] is True and "--insecure" in superlink
        assert all("--insecure" in n for n in nodes) and not (directory / "certs").exists()
    else:
        assert link["root-certificates"] == str(directory / "certs" / "ca.crt")
        assert os.path.isabs(link["root-certificates"])
        assert all(
            n[n.index("--root-certificates") + 1] == link["root-certificates"] for n in nodes
        )
    assert f"results: {directory / 'run'}/" in printed


def test_deploy_refuses_a_bad_config_or_a_used_directory(cli, capsys, tmp_path):
    assert cli(["flower", "deploy", str(tmp_path / "a"), "algorithm.name=nope"]) == 2
    assert "algorithm.name: 'nope' is not one of" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("")
    assert cli(["flower", "deploy", str(tmp_path / "b"), *SMALL]) == 2
    assert "is not empty" in capsys.readouterr().err


LOCAL = ["data.name=local-files", "data.input_shape=[6]", "data.num_classes=3", *SMALL]


def test_deploy_gives_each_supernode_its_own_data_file(cli, capsys, tmp_path, monkeypatch):
    """--node-data puts node i's file into its --node-config as Flower parses it (absolute);
    local-files needs one per node, and other datasets refuse it."""
    pytest.importorskip("flwr")
    from flwr.common.config import parse_config_args

    monkeypatch.chdir(tmp_path)
    directory = tmp_path / "d"
    files = ["--node-data", "data/node 0.npz", "--node-data", "/srv/node1.csv"]
    assert cli(["flower", "deploy", str(directory), *LOCAL, *files]) == 0
    nodes = [shlex.split(c.removesuffix(" &")) for c in capsys.readouterr().out.splitlines()
             if "flower-supernode" in c]  # fmt: skip
    configs = [parse_config_args([n[n.index("--node-config") + 1]]) for n in nodes]
    assert configs == [
        {"partition-id": 0, "num-partitions": 2, "data-file": str(tmp_path / "data/node 0.npz")},
        {"partition-id": 1, "num-partitions": 2, "data-file": "/srv/node1.csv"},
    ]
    app = tomllib.loads((directory / "app" / "pyproject.toml").read_text())
    assert "data.files" not in app["tool"]["flwr"]["app"]["config"]["fedkin-overrides"]
    assert cli(["flower", "deploy", str(tmp_path / "e"), *LOCAL, *files[:2]]) == 2
    assert "--node-data PATH once per client id 0..1 in order (got 1)" in capsys.readouterr().err
    assert cli(["flower", "deploy", str(tmp_path / "f"), *SMALL, *files]) == 2
    assert "--node-data needs data.name=local-files" in capsys.readouterr().err


def test_run_fails_when_no_summary_is_written(cli, capsys, tmp_path, monkeypatch):
    """`flwr run` exiting 0 without the run finishing (e.g. a missing SuperNode) is exit 1."""
    directory = tmp_path / "d"
    assert cli(["flower", "deploy", str(directory), *SMALL, "--insecure"]) == 0
    fake = tmp_path / "flwr"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setattr(flower_deploy, "executable", lambda name: str(fake))
    capsys.readouterr()
    assert cli(["flower", "run", str(directory)]) == 1
    assert "ended without writing" in capsys.readouterr().err
    with pytest.raises(RunFailure, match="exited with code 3"):
        fake.write_text("#!/bin/sh\nexit 3\n")
        flower_deploy.submit(directory)
    # a finished run that lost replies of failing nodes succeeds, and says so
    run = directory / "run"
    lines = ['{"round": 1, "kind": "train", "dropped_clients": 1.0}',
             '{"round": 1, "kind": "eval", "eval_missing_clients": 2.0}']  # fmt: skip
    script = f"mkdir -p {run}\necho '{{}}' > {run}/summary.json\n"
    script += "".join(f"echo '{line}' >> {run}/metrics.jsonl\n" for line in lines)
    fake.write_text("#!/bin/sh\n" + script)
    capsys.readouterr()
    assert cli(["flower", "run", str(directory)]) == 0
    assert "without 1 training replies and 2 evaluation replies" in capsys.readouterr().err
    # a ServerApp that failed left its error in the run directory: that is the message
    failed = directory / "run" / "failed.txt"
    fake.write_text(f"#!/bin/sh\nmkdir -p {failed.parent}\necho 'UserError: 1 of 2' > {failed}\n")
    capsys.readouterr()
    assert cli(["flower", "run", str(directory)]) == 1
    assert "the run failed: UserError: 1 of 2" in capsys.readouterr().err


def deployment_env(home: Path) -> dict[str, str]:
    """The environment the printed commands run in: this checkout's fedkin, no telemetry."""
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),  # this checkout's fedkin
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }


@contextlib.contextmanager
def printed_deployment(printed: str, logs: Path, env: dict[str, str], link_port: int):
    """Start the SuperLink and SuperNode lines of ``fedkin flower deploy``'s output as a user's
    shell runs them (after its ``export PATH=…`` line); yields the export line. On exit every
    process started (and Flower's helpers, found by the deployment's ports) is stopped."""
    from test_flower import _processes_mentioning, _wait_for_port

    export, *commands = [c for c in printed.splitlines() if c and c[0] != "#"]
    assert export.startswith("export PATH=")
    servers = [c for c in commands if c.endswith(" &")]  # the SuperLink, then the SuperNodes
    assert len(servers) >= 2 and "flower-superlink" in servers[0]
    ports = [int(shlex.split(c)[shlex.split(c).index("--port") + 1]) for c in servers]
    started = []
    try:
        for line in servers:
            log = (logs / f"p{len(started)}.log").open("w")
            shell = ["bash", "-c", f"{export}; exec {line.removesuffix(' &')}"]
            started.append(subprocess.Popen(shell, env=env, stdout=log, stderr=log,
                                            start_new_session=True))  # fmt: skip
            if len(started) == 1:
                _wait_for_port(link_port, started[0], logs / "p0.log")
        yield export
    finally:
        for proc in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in started:
            proc.wait(timeout=30)
        for port in ports:
            for pid in _processes_mentioning(f"127.0.0.1:{port}"):
                os.kill(pid, signal.SIGKILL)
