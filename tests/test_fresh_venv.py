"""Issue 17's "done when", in a fresh virtual environment with fedkin installed from a wheel of
this checkout: a plugin module outside the package (the example's, copied to a scratch
directory) registers an algorithm, a dataset and a model; ``fedkin run --plugin`` runs it,
``fedkin run --resume DIR`` continues an interrupted run without ``--plugin``, ``fedkin
compare`` runs it, and Ray (2 workers) and Flower's Simulation Runtime give the in-process
numbers.

What "fresh" means here, cheaply and without a network: ``python -m venv --without-pip`` makes
an empty environment; a ``.pth`` file puts the shared environment's site-packages (torch, Ray,
Flower, pip, …) *after* the venv's own on ``sys.path`` — a ``.pth`` line adds a directory
without running the ``.pth`` files inside it, so the shared environment's editable fedkin is
not on the path —; then ``pip install --no-deps --no-index`` installs the wheel built from
this checkout (src, pyproject.toml, README.md copied to a scratch directory, so the checkout
gets no build files). Every command runs with the venv's console script, from a scratch
directory, with ``PYTHONPATH`` holding only the plugin's directory. The test checks that
``fedkin`` is imported from the venv. It does not re-resolve the dependencies from PyPI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import drop_timings
from fedkin.tracking import read_records
from test_examples import EXAMPLE, EXAMPLES, PLUGIN, interrupted_run

REPO = Path(__file__).resolve().parents[1]


def make_venv(root: Path) -> Path:
    """A venv at ``root / "venv"`` with this checkout's wheel installed; returns its ``bin``."""
    package = root / "package"
    package.mkdir()
    shutil.copytree(REPO / "src", package / "src", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, package / name)
    python = sys.executable
    quiet = {"check": True, "capture_output": True, "text": True, "timeout": 600}
    subprocess.run([python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(root / "dist"), str(package)], **quiet)  # fmt: skip
    (wheel,) = (root / "dist").glob("fedkin-*.whl")
    venv = root / "venv"
    subprocess.run([python, "-m", "venv", "--without-pip", str(venv)], **quiet)
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c", where], **quiet).stdout.strip()
    (Path(purelib) / "_shared_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], **quiet)  # fmt: skip
    return venv / "bin"


@pytest.mark.slow
def test_plugin_runs_resumes_compares_and_matches_on_ray_and_flower_in_a_fresh_venv(tmp_path):
    pytest.importorskip("ray")
    pytest.importorskip("flwr")
    bin_dir = make_venv(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(EXAMPLES / f"{PLUGIN}.py", work / f"{PLUGIN}.py")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHONPATH=str(work), PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")

    def run(*args: str) -> str:
        proc = subprocess.run(
            args, cwd=work, env=env, capture_output=True, text=True, timeout=900
        )  # fmt: skip
        assert proc.returncode == 0, (
            f"$ {' '.join(args)}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        )
        return proc.stdout

    where = run(str(bin_dir / "python"), "-c", "import fedkin; print(fedkin.__file__)")
    assert where.startswith(str(tmp_path / "venv")), where
    fedkin = str(bin_dir / "fedkin")

    run(fedkin, "run", "--plugin", PLUGIN, *EXAMPLE, "--out", "runs/ref", "--quiet")
    reference = drop_timings(read_records(work / "runs/ref"))

    assert "interrupted at round 3" in run(str(bin_dir / "python"), "-c",
                                           interrupted_run(work / "runs/cut"))  # fmt: skip
    run(fedkin, "run", "--resume", "runs/cut", "--quiet")  # no --plugin: config.yaml has it
    assert drop_timings(read_records(work / "runs/cut")) == reference

    run(fedkin, "compare", "--plugin", PLUGIN, *EXAMPLE, "--algorithms", "laplace-ditto,ditto",
        "--seeds", "1", "--out", "runs/cmp", "--quiet")  # fmt: skip
    compared = work / "runs/cmp/runs/laplace-ditto-seed0"
    assert drop_timings(read_records(compared)) == reference
    rows = json.loads((work / "runs/cmp/results.json").read_text())["rows"]
    assert {r["algorithm"] for r in rows} == {"laplace-ditto", "ditto"}

    expected = [r for r in reference if r["kind"] == "eval"]
    keys = [k for k in expected[0] if k.endswith(("_acc_mean", "_acc_weighted", "_loss"))]
    assert keys
    for name, backend in (("ray", ["backend.name=ray", "backend.workers=2"]),
                          ("flower", ["backend.name=flower"])):  # fmt: skip
        run(fedkin, "run", "--plugin", PLUGIN, *EXAMPLE, *backend, "--out", f"runs/{name}",
            "--quiet")  # fmt: skip
        got = [r for r in read_records(work / "runs" / name) if r["kind"] == "eval"]
        assert len(got) == len(expected), name
        for e, g in zip(expected, got, strict=True):
            for k in keys:
                assert g[k] == pytest.approx(e[k], rel=1e-5, abs=1e-6), (name, k)
