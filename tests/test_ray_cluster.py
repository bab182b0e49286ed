"""`backend.address`: a run joins an existing Ray cluster and gets the in-process numbers.

The test starts a real Ray head node (``ray start --head --block``) in its own process group,
runs ``fedkin run backend.name=ray backend.address=…`` in a separate interpreter (so this
process's Ray session, if any, is not involved), and stops the head by signalling its group.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

OVERRIDES = [
    "algorithm.name=ditto",
    "data.num_clients=8",
    "cohort.clients_per_round=4",
    "rounds=2",
    "model.hidden=[16]",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray head exited: {process.stderr.read()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"ray head did not listen on {port} within {timeout:g}s")


@pytest.mark.slow
def test_run_joins_an_existing_cluster(cli, tmp_path, capsys):
    pytest.importorskip("ray")
    bin_dir = Path(sys.executable).parent
    port = _free_port()
    temp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # Ray's socket paths must be short
    env = {**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    head = subprocess.Popen(
        [
            str(bin_dir / "ray"),
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
            "--block",
            f"--temp-dir={temp}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for_port(port, head)
        joined = subprocess.run(
            [
                str(bin_dir / "fedkin"),
                "run",
                *OVERRIDES,
                "backend.name=ray",
                f"backend.address=127.0.0.1:{port}",
                "backend.workers=2",
                "--out",
                str(tmp_path / "ray"),
                "--quiet",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert joined.returncode == 0, joined.stderr[-3000:]
        drivers = list(temp.glob("session_*/logs/python-core-driver-*.log"))
        assert drivers, "no driver connected to the cluster the test started"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)
    on_cluster = json.loads(joined.stdout.strip().splitlines()[-1])
    assert cli(["run", *OVERRIDES, "--out", str(tmp_path / "local"), "--quiet"]) == 0
    local = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("personal_acc_mean", "global_acc_mean", "personal_loss", "global_loss"):
        assert on_cluster[key] == pytest.approx(local[key], rel=1e-5), key
