"""`fedkin flower deploy|run`: certificates, files and commands; (slow) the printed commands
run on loopback with 2 SuperNodes and TLS."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
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


@pytest.mark.slow
def test_the_printed_commands_deploy_on_loopback_with_tls(cli, capsys, tmp_path):
    """Run `fedkin flower deploy`'s output as printed: a SuperLink and 2 SuperNodes with TLS,
    then its submit command; the summary equals the in-process run's."""
    from fedkin.config import load_config
    from fedkin.runs import run
    from test_flower import _free_port, _processes_mentioning, _wait_for_port

    link_port = _free_port()
    node_port = _free_port()
    directory = tmp_path / "d"
    args = ["flower", "deploy", str(directory), *SMALL, "eval.every=1"]
    assert cli([*args, "--port", str(link_port), "--node-port", str(node_port)]) == 0
    lines = [c for c in capsys.readouterr().out.splitlines() if c and c[0] != "#"]
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "home"),
        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),  # this checkout's fedkin
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    started = []
    try:
        export, *commands = lines  # each command as a user's shell runs it after the export
        assert export.startswith("export PATH=")
        for line in commands[:3]:  # the SuperLink and the 2 SuperNodes, each ending in " &"
            log = (tmp_path / f"p{len(started)}.log").open("w")
            shell = ["bash", "-c", f"{export}; exec {line.removesuffix(' &')}"]
            started.append(subprocess.Popen(shell, env=env, stdout=log, stderr=log,
                                            start_new_session=True))  # fmt: skip
            if len(started) == 1:
                _wait_for_port(link_port, started[0], tmp_path / "p0.log")
        submit = subprocess.run(
            ["bash", "-c", f"{export}; {commands[3]}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert submit.returncode == 0, submit.stdout[-2000:] + submit.stderr[-2000:]
    finally:
        for proc in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in started:
            proc.wait(timeout=30)
        for port in (link_port, node_port, node_port + 1):
            marker = f"127.0.0.1:{port}"
            for pid in _processes_mentioning(marker):
                os.kill(pid, signal.SIGKILL)
    summary = json.loads((directory / "run" / "summary.json").read_text())
    expected = run(load_config(None, [*SMALL, "eval.every=1"]), tmp_path / "local")
    for key in ("personal_acc_mean", "global_acc_mean", "rounds"):
        assert summary[key] == pytest.approx(expected[key], rel=1e-6), key
