"""The README's deployment section, run as written: its ``fedkin flower deploy`` command (with
node-local data files), the SuperLink and SuperNode lines it prints, then its ``fedkin flower
run`` — on loopback, TLS, 2 SuperNodes, each with its own data file.

The block is the README code block with ``fedkin flower deploy`` (parsed by
``test_readme_commands.readme_blocks``, which runs every other README command; it leaves this
block's ``flower`` commands to this test). Changed only for isolation: the deployment gets
free ports (``--port``/``--node-port`` appended). The data files the README names in
``--node-data`` are written here (an NPZ and a CSV of 6 features, 3 classes); the summary
must equal an in-process ``fedkin run`` listing the same files in ``data.files``, and the
server's saved config lists no files (it never reads data).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_readme_commands import README, _fedkin, readme_blocks

pytest.importorskip("flwr")


def deploy_block():
    """The README's deployment block: its steps, the first being ``fedkin flower deploy``."""
    blocks = [
        b for b in readme_blocks(README.read_text()) if any(
            s.argv[:2] == ("flower", "deploy") for s in b.steps
        )
    ]  # fmt: skip
    assert len(blocks) == 1, "README.md should show one `fedkin flower deploy` block"
    steps = [s for s in blocks[0].steps if not s.cd]
    assert steps[0].argv[:2] == ("flower", "deploy")
    return steps


def test_the_readme_block_deploys_with_node_local_data():
    """Guards the parse (fast): the block deploys local-files with TLS and then submits."""
    deploy, *rest = deploy_block()
    assert "data.name=local-files" in deploy.argv and "--insecure" not in deploy.argv
    assert deploy.argv.count("--node-data") == 2
    assert [s.argv[:2] for s in rest] == [("flower", "run")]


def _node_files(argv: tuple[str, ...], cwd: Path) -> list[str]:
    """Write the data files the command names in ``--node-data`` (by their suffix)."""
    from test_local_files import write_csv, write_npz

    paths = [argv[i + 1] for i, a in enumerate(argv) if a == "--node-data"]
    for i, name in enumerate(paths):
        path = cwd / name
        path.parent.mkdir(parents=True, exist_ok=True)
        {".npz": write_npz, ".csv": write_csv}[path.suffix](path, 30 + 10 * i, seed=i)
    return paths


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("flwr") is None and not Path(sys.executable).with_name("flwr")
                    .exists(), reason="Flower CLIs not installed")  # fmt: skip
def test_readme_deployment_runs_as_written(tmp_path):
    from test_flower import _free_port
    from test_flower_deploy import deployment_env, printed_deployment

    deploy, *rest = deploy_block()
    cwd = tmp_path / "work"
    cwd.mkdir()
    files = _node_files(deploy.argv, cwd)
    env = deployment_env(tmp_path / "home")
    link_port, node_port = _free_port(), _free_port()
    ports = ["--port", str(link_port), "--node-port", str(node_port)]
    out = subprocess.run(
        [*_fedkin(), *deploy.argv, *ports],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    with printed_deployment(out.stdout, tmp_path, env, link_port) as export:
        for step in rest:  # `fedkin flower run deploy/`, as the README's user types it
            submit = subprocess.run(
                ["bash", "-c", f"{export}; {shlex.join([*_fedkin(), *step.argv])}"],
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    run_dir = cwd / "deploy" / "run"
    assert f"written: {run_dir}/" in submit.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["files"] == []

    # the same files, in-process: the nodes trained and evaluated on exactly them
    items = [a for a in deploy.argv[3:] if "=" in a and not a.startswith("--")]
    local = cwd / "local"
    listed = f"data.files=[{','.join(str(cwd / f) for f in files)}]"
    args = ["run", *items, listed, "--out", str(local), "--quiet"]
    proc = subprocess.run([*_fedkin(), *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = json.loads((local / "summary.json").read_text())
    assert summary["rounds"] == expected["rounds"] == 3
    for key in ("personal_acc_mean", "global_acc_mean", "global_loss", "personal_acc_by_client"):
        assert summary[key] == pytest.approx(expected[key], rel=1e-6), key
