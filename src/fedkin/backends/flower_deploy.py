"""A Flower deployment you can follow: ``fedkin flower deploy`` and ``fedkin flower run``.

``fedkin flower deploy DIR [CONFIG.yaml] [key=value …]`` validates the experiment, then writes

* ``DIR/app/pyproject.toml`` — the Flower app (:func:`~fedkin.backends.flower_app.
  write_flower_project`), whose ServerApp writes its results to ``DIR/run`` (absolute path, on
  the SuperLink's host): ``config.yaml``, ``metrics.jsonl``, ``summary.json``, ``population.pt``;
* ``DIR/certs/`` — a CA (``ca.crt``, ``ca.key``) and a server certificate (``server.pem``,
  ``server.key``) for the given ``--host`` names/IPs, made with the ``cryptography`` package
  (skipped with ``--insecure``);
* ``DIR/flwr-home/config.toml`` — the ``flwr`` CLI's connection to the SuperLink (absolute
  certificate path, or ``insecure = true``);

and prints the SuperLink, SuperNode (one per client id, each with its own ``--port``) and
``flwr run`` commands, with the absolute paths of this environment's Flower executables (so no
virtualenv needs to be activated). ``fedkin flower run DIR`` submits the app and exits non-zero
unless the run wrote ``DIR/run/summary.json`` (``flwr run`` itself exits 0 when, e.g., a node
is missing and the ServerApp fails).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fedkin.backends.flower_app import DATA_FILE_KEY, FAILURE_FILE
from fedkin.core.errors import RunFailure, UserError

#: Name of the SuperLink connection in ``flwr-home/config.toml``.
CONNECTION = "fedkin"


def write_certificates(directory: Path, hosts: list[str], days: int = 365) -> dict[str, Path]:
    """A new CA and a server certificate signed by it, valid for ``hosts`` (DNS names or IP
    addresses, as subject alternative names) for ``days``; PEM files in ``directory``:
    ``ca.crt``, ``ca.key``, ``server.pem``, ``server.key``. Keys are ECDSA P-256."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise UserError("certificates need at least one --host (the SuperLink's name or IP)")
    now = dt.datetime.now(dt.UTC)

    def sign(subject, issuer, public_key, ca_key, extensions):
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(ca_key, hashes.SHA256())

    def usage(**on: bool):
        flags = [
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ]
        return x509.KeyUsage(**{f: on.get(f, False) for f in flags})

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedkin deployment CA")])
    ca = sign(
        ca_name,
        ca_name,
        ca_key.public_key(),
        ca_key,
        [
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (usage(digital_signature=True, key_cert_sign=True, crl_sign=True), True),
        ],
    )
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = sign(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]),
        ca_name,
        key.public_key(),
        ca_key,
        [
            (x509.SubjectAlternativeName(names), False),
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (usage(digital_signature=True, key_agreement=True), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        ],
    )
    directory.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    private = {
        "encoding": pem,
        "format": serialization.PrivateFormat.PKCS8,
        "encryption_algorithm": serialization.NoEncryption(),
    }
    paths = {
        "ca": directory / "ca.crt",
        "ca_key": directory / "ca.key",
        "cert": directory / "server.pem",
        "key": directory / "server.key",
    }
    paths["ca"].write_bytes(ca.public_bytes(pem))
    paths["ca_key"].write_bytes(ca_key.private_bytes(**private))
    paths["cert"].write_bytes(cert.public_bytes(pem))
    paths["key"].write_bytes(key.private_bytes(**private))
    for name in ("ca_key", "key"):
        paths[name].chmod(0o600)
    return paths


@dataclass
class Deployment:
    """The files of a deployment directory and the commands that run it."""

    directory: Path
    nodes: int
    host: str  # the SuperLink's address as the nodes and the `flwr` CLI reach it
    port: int  # the SuperLink's port
    node_port: int  # the first SuperNode's runtime API port (node i uses node_port + i)
    insecure: bool
    node_data: list[str] = field(default_factory=list)  # node i's own data file (local-files)

    @property
    def app(self) -> Path:
        return self.directory / "app"

    @property
    def run_dir(self) -> Path:
        return self.directory / "run"

    @property
    def flwr_home(self) -> Path:
        return self.directory / "flwr-home"

    @property
    def certs(self) -> dict[str, Path]:
        d = self.directory / "certs"
        return {"ca": d / "ca.crt", "cert": d / "server.pem", "key": d / "server.key"}

    def _tls(self) -> list[str]:
        c = self.certs
        return ["--ssl-ca-certfile", str(c["ca"]), "--ssl-certfile", str(c["cert"]),
                "--ssl-keyfile", str(c["key"])]  # fmt: skip

    def superlink(self) -> list[str]:
        return [
            executable("flower-superlink"),
            *(["--insecure"] if self.insecure else self._tls()),
            "--host", "0.0.0.0" if self.host not in ("127.0.0.1", "localhost") else self.host,
            "--port", str(self.port),
            "--disable-runtime-dependency-installation",
        ]  # fmt: skip

    def supernode(self, client: int) -> list[str]:
        security = (
            ["--insecure"]
            if self.insecure
            else ["--root-certificates", str(self.certs["ca"]), *self._tls()]
        )
        return [
            executable("flower-supernode"),
            "--superlink", f"{self.host}:{self.port}",
            *security,
            "--node-config", self.node_config(client),
            "--host", "127.0.0.1",
            "--port", str(self.node_port + client),
        ]  # fmt: skip

    def node_config(self, client: int) -> str:
        """SuperNode ``client``'s ``--node-config``: its client id and, with node-local data,
        its data file."""
        config = f"partition-id={client} num-partitions={self.nodes}"
        if self.node_data:
            config += f' {DATA_FILE_KEY}="{self.node_data[client]}"'
        return config

    def flwr_run(self) -> list[str]:
        return [executable("flwr"), "run", str(self.app), CONNECTION, "--stream"]

    def config_toml(self) -> str:
        """The ``flwr`` CLI's SuperLink connection (valid TOML, absolute paths)."""
        security = (
            "insecure = true"
            if self.insecure
            else f"root-certificates = {_toml_string(str(self.certs['ca']))}"
        )
        return (
            f"[superlink]\ndefault = {_toml_string(CONNECTION)}\n\n"
            f"[superlink.{CONNECTION}]\n"
            f"address = {_toml_string(f'{self.host}:{self.port}')}\n{security}\n"
        )

    def instructions(self) -> str:
        """The commands, in order, ready to paste."""
        nodes = "\n".join(shlex.join(self.supernode(i)) + " &" for i in range(self.nodes))
        mode = "insecure (no TLS: loopback or a trusted network only)" if self.insecure else "TLS"
        data = (
            "reads its own data file on its host (the server reads none)"
            if self.node_data
            else "builds the config's dataset and takes its client"
        )
        return (
            f"# fedkin Flower deployment in {self.directory} ({mode})\n"
            "# 0. in every shell below: Flower starts its helpers (flower-superexec, "
            "flwr-clientapp) by name,\n#    so this environment's executables go first on PATH\n"
            f'export PATH={shlex.quote(str(bin_dir()))}:"$PATH"\n'
            f"# 1. the SuperLink (on {self.host}):\n{shlex.join(self.superlink())} &\n"
            f"# 2. one SuperNode per client id 0..{self.nodes - 1}, each on its own --port; each "
            f"{data};\n#    on other hosts, with fedkin installed and this directory copied "
            "to the same path:\n"
            f"{nodes}\n"
            "# 3. submit the run (stops non-zero unless summary.json was written):\n"
            f"{shlex.join([executable('fedkin'), 'flower', 'run', str(self.directory)])}\n"
            f"#    or with Flower's CLI directly:\n"
            f"FLWR_HOME={shlex.quote(str(self.flwr_home))} {shlex.join(self.flwr_run())}\n"
            f"# results: {self.run_dir}/ (config.yaml, metrics.jsonl, summary.json, "
            f"population.pt; {FAILURE_FILE} if the run failed)\n"
        )


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def bin_dir() -> Path:
    """This Python environment's ``bin`` directory (where fedkin's and Flower's scripts are)."""
    return Path(sys.executable).parent


def executable(name: str) -> str:
    """The absolute path of ``name`` in :func:`bin_dir`."""
    return str(bin_dir() / name)


def deploy(
    directory: Path,
    config_path: str | None,
    overrides: list[str],
    hosts: list[str],
    port: int,
    node_port: int,
    insecure: bool,
    node_data: list[str] | None = None,
) -> Deployment:
    """Validate the experiment and write the deployment directory (see the module doc).
    ``node_data``: with ``data.name=local-files``, SuperNode i's own data file (one per client;
    made absolute, not read here: the paths are on the nodes' hosts)."""
    from fedkin.backends.flower_app import write_flower_project
    from fedkin.config import load_config

    directory = directory.resolve()
    config = load_config(config_path, overrides)
    n = config.data.num_clients
    node_data = [str(Path(p).expanduser().absolute()) for p in node_data or []]
    if config.data.name == "local-files" and len(node_data) != n:
        raise UserError(
            f"data.name=local-files: give each of the {n} SuperNodes its data file, "
            f"--node-data PATH once per client id 0..{n - 1} in order (got {len(node_data)})"
        )
    if node_data and config.data.name != "local-files":
        raise UserError(
            "--node-data needs data.name=local-files (with data.input_shape and "
            f"data.num_classes); the experiment has data.name={config.data.name}"
        )
    bad = [p for p in node_data if any(c in p for c in '"\\\n')]
    if bad:
        raise UserError(
            f"--node-data {bad[0]!r}: a path with quotes or backslashes cannot be passed in "
            "Flower's --node-config"
        )
    if directory.exists() and any(directory.iterdir()):
        raise UserError(f"{directory} is not empty; choose a new deployment directory")
    deployment = Deployment(directory, n, hosts[0], port, node_port, insecure, node_data)
    write_flower_project(
        deployment.app,
        overrides=shlex.join(overrides),
        config_path=str(Path(config_path).resolve()) if config_path else "",
        run_dir=str(deployment.run_dir),
    )
    if not insecure:  # loopback too: each SuperNode serves its ClientApps on 127.0.0.1
        loopback = [h for h in ("127.0.0.1", "localhost") if h not in hosts]
        write_certificates(directory / "certs", [*hosts, *loopback])
    deployment.flwr_home.mkdir(parents=True)
    (deployment.flwr_home / "config.toml").write_text(deployment.config_toml())
    (directory / "commands.sh").write_text(deployment.instructions())
    return deployment


def submit(directory: Path) -> None:
    """``flwr run`` the deployment's app; :class:`RunFailure` with the ServerApp's error if it
    left one, and unless it wrote a new ``summary.json``."""
    import os

    directory = directory.resolve()
    home = directory / "flwr-home"
    if not (home / "config.toml").exists():
        raise UserError(f"{directory} is not a deployment directory (fedkin flower deploy)")
    summary, failure = directory / "run" / "summary.json", directory / "run" / FAILURE_FILE
    failure.unlink(missing_ok=True)  # a failure of an earlier submission
    before = _version(summary)
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": os.pathsep.join([str(bin_dir()), os.environ.get("PATH", "")]),
    }
    command = [executable("flwr"), "run", str(directory / "app"), CONNECTION, "--stream"]
    code = subprocess.run(command, env=env).returncode
    if failure.exists():
        raise RunFailure(f"the run failed: {failure.read_text().strip()} (also in {failure})")
    if code != 0:
        raise RunFailure(f"`flwr run` exited with code {code}.")
    if not summary.exists() or _version(summary) == before:
        raise RunFailure(
            f"the run ended without writing {summary} (a SuperNode missing or failing? see "
            "the SuperLink's and SuperNodes' output)."
        )
    print(f"written: {directory / 'run'}/ (config.yaml, metrics.jsonl, summary.json)")
    lost = lost_replies(directory / "run" / "metrics.jsonl")
    if lost:
        print(f"fedkin: warning: the run finished without {lost} (failed or timed-out "
              "SuperNodes; see their output)", file=sys.stderr)  # fmt: skip


def lost_replies(metrics: Path) -> str:
    """What a finished run missed, from its records: train replies dropped and evaluation
    replies missing, summed over rounds ("" if none)."""
    import json

    dropped = missing = 0.0
    for line in metrics.read_text().splitlines() if metrics.exists() else ():
        record = json.loads(line)
        dropped += record.get("dropped_clients", 0.0)
        missing += record.get("eval_missing_clients", 0.0)
    parts = [f"{n:g} {what}" for n, what in ((dropped, "training replies"),
                                              (missing, "evaluation replies")) if n]  # fmt: skip
    return " and ".join(parts)


def _version(path: Path) -> tuple[int, int] | None:
    """``path``'s (inode, mtime in ns), or None if it does not exist: a rewrite changes it."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns
