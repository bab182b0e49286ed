"""The example plugin (examples/laplace_plugin.py): its math, and every way of running it —
``fedkin run --plugin``, resume without ``--plugin`` in a fresh process, ``fedkin compare``
(``tests/test_fresh_venv.py`` runs these again in a fresh venv with fedkin installed from a
wheel, plus Ray with 2 workers and Flower's Simulation Runtime, which give the in-process
numbers)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import drop_timings
from fedkin.algorithms import ALGORITHMS
from fedkin.config import load_config
from fedkin.data import build_dataset
from fedkin.experiment import Experiment
from fedkin.optim import sgd
from fedkin.plugins import load_plugins
from fedkin.tracking import read_records

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SRC = Path(__file__).resolve().parents[1] / "src"
PLUGIN = "laplace_plugin"
#: The example's three parts, on a tiny population (16 clients, 4 per round, 4 rounds).
EXAMPLE = [
    "algorithm.name=laplace-ditto",
    "data.name=rotated-blobs",
    "data.num_clients=16",
    "data.samples_per_client=40",
    "model.name=resmlp",
    "model.width=16",
    "cohort.clients_per_round=4",
    "client.local_steps=3",
    "client.batch_size=8",
    "rounds=4",
    "eval.every=1",
]


@pytest.fixture
def plugin(isolated_registries, monkeypatch):
    """The example plugin loaded from examples/ (as with it on PYTHONPATH), forgotten after."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    sys.modules.pop(PLUGIN, None)  # import afresh: an earlier test's registrations were undone
    (module,) = load_plugins([PLUGIN])
    yield module
    sys.modules.pop(PLUGIN, None)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The example run in-process by ``fedkin run --plugin`` (run directory), built once."""
    from fedkin.cli.main import main

    out = tmp_path_factory.mktemp("example") / "ref"
    sys.path.insert(0, str(EXAMPLES))
    try:
        assert main(["run", "--plugin", PLUGIN, *EXAMPLE, "--out", str(out), "--quiet"]) == 0
    finally:
        sys.path.remove(str(EXAMPLES))
        sys.modules.pop(PLUGIN, None)
    return out


def fresh_process(args: list[str], pythonpath: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``args`` in a new Python process that sees fedkin and ``pythonpath`` only."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(pythonpath)])}
    result = subprocess.run(
        [sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# ----- the algorithm's math -------------------------------------------------------------------


CTX = {"client_id": torch.tensor(0), "num_samples": torch.tensor(10.0), "round": torch.tensor(0)}


def _tiny_algorithm(lam: float, lr: float = 0.1):
    """LaplaceDitto on a 3→2 linear model, 2 local steps of SGD(lr)."""
    cls = ALGORITHMS["laplace-ditto"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
    return cls(cls.Config(lam=lam, lr=lr), model, sgd(lr), 2)


def _batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, 3, generator=g), torch.randint(0, 2, (2, 5), generator=g)


def test_laplace_prox_step_is_the_soft_threshold(plugin):
    lp = plugin

    u = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.5])
    assert torch.equal(lp.soft_threshold(u, 0.5), torch.tensor([-1.5, 0.0, 0.0, 0.0, 1.0]))
    # one personal step by hand: v' = w + S_ηλ(v − η∇f(v) − w)
    alg = _tiny_algorithm(lam=0.3, lr=0.5)
    w = alg.initial_params()
    v = {k: t + 0.1 * torch.arange(t.numel()).reshape(t.shape) for k, t in w.items()}
    x, y = _batches()
    grads = torch.func.grad(lambda p: alg.data_loss(p, x[0], y[0]))(v)
    step = lp.prox_sgd_l1(0.5, 0.3, w).step
    new, _ = step(grads, {}, v)
    for k in w:
        expected = w[k] + lp.soft_threshold(v[k] - 0.5 * grads[k] - w[k], 0.15)
        torch.testing.assert_close(new[k], expected, rtol=0, atol=0)


def test_laplace_ditto_limits(plugin):
    """λ = 0 is Ditto(λ = 0) with SGD; a λ above every gradient keeps v = w exactly; in
    between, v − w is sparse."""
    x, y = _batches()
    free = _tiny_algorithm(lam=0.0)
    w = {"global": free.initial_params()}
    _, state, metrics = free.client_update(w, free.init_client(w), (x, y), CTX)
    ditto = ALGORITHMS["ditto"](ALGORITHMS["ditto"].Config(lam=0.0), free.model, sgd(0.1), 2)
    _, ditto_state, _ = ditto.client_update(w, ditto.init_client(w), (x, y), CTX)
    for k in state["params"]:
        torch.testing.assert_close(state["params"][k], ditto_state["params"][k])
    assert float(metrics["personal_density"]) == 1.0

    stiff = _tiny_algorithm(lam=1e3)
    _, state, metrics = stiff.client_update(w, stiff.init_client(w), (x, y), CTX)
    assert all(torch.equal(state["params"][k], w["global"][k]) for k in w["global"])
    assert float(metrics["personal_density"]) == 0.0

    sparse = _tiny_algorithm(lam=0.3)
    _, state, metrics = sparse.client_update(w, sparse.init_client(w), (x, y), CTX)
    assert 0.0 < float(metrics["personal_density"]) < 1.0


def test_rotate_pairs_is_a_rotation_of_every_coordinate_pair(plugin):
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    phi = torch.tensor([0.3, 1.0, -2.0])
    rotated = plugin.rotate_pairs(x, phi)
    for i, p in enumerate(phi):
        r = torch.tensor([[p.cos(), -p.sin()], [p.sin(), p.cos()]])
        for a in (0, 2):
            torch.testing.assert_close(rotated[i, a : a + 2], r @ x[i, a : a + 2])
    assert torch.equal(rotated[:, 4], x[:, 4])  # the odd coordinate is kept


def test_rotated_blobs_is_a_function_of_the_seed(plugin):
    config = load_config(None, [*EXAMPLE, f"plugins=[{PLUGIN}]"])
    a, b = build_dataset(config.data, 0), build_dataset(config.data, 0)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, build_dataset(config.data, 1).x)
    assert a.num_clients == 16 and a.feature_shape == (6,) and a.num_classes == 4
    assert a.train_sizes.tolist() == [30] * 16 and a.test_sizes.tolist() == [10] * 16
    assert set(a.y.tolist()) == {0, 1, 2, 3}


# ----- running it ------------------------------------------------------------------------------


def test_run_records_the_plugin_and_personal_models_match_evaluation(reference):
    saved = yaml.safe_load((reference / "config.yaml").read_text())
    assert saved["plugins"] == [PLUGIN]
    assert (saved["algorithm"]["name"], saved["data"]["name"], saved["model"]["name"]) == (
        "laplace-ditto",
        "rotated-blobs",
        "resmlp",
    )
    records = read_records(reference)
    assert [r["round"] for r in records if r["kind"] == "eval"] == [1, 2, 3, 4]
    assert all(0 < r["personal_density"] < 1 for r in records if r["kind"] == "train")


def test_resume_in_a_fresh_process_without_plugin_flag(reference, tmp_path):
    """The plugin lives outside the package (a tmp dir on PYTHONPATH). A fresh process runs
    the example and is interrupted after round 2; another fresh process resumes it with
    ``fedkin run --resume DIR`` (no --plugin): the records equal the uninterrupted run's."""
    shutil.copy(EXAMPLES / f"{PLUGIN}.py", tmp_path / f"{PLUGIN}.py")
    run_dir = tmp_path / "run"
    out = fresh_process(["-c", interrupted_run(run_dir)], tmp_path, tmp_path).stdout
    assert "interrupted at round 3" in out
    fresh_process(
        ["-m", "fedkin.cli.main", "run", "--resume", str(run_dir), "--quiet"], tmp_path, tmp_path
    )
    assert drop_timings(read_records(run_dir)) == drop_timings(read_records(reference))


def interrupted_run(run_dir: Path) -> str:
    """A Python script that runs the example (plugin loaded by name) into ``run_dir`` and
    stops it (as Ctrl-C would) at round 3's train record, before that round is checkpointed."""
    return (
        "from pathlib import Path\n"
        "import fedkin\n"
        "from fedkin.runs import new_run\n"
        "from fedkin.tracking import JsonlTracker\n"
        "class Stop:\n"
        "    def start(self, info): pass\n"
        "    def finish(self, summary): pass\n"
        "    def record(self, r):\n"
        "        if (r['round'], r['kind']) == (3, 'train'): raise KeyboardInterrupt\n"
        f"config = fedkin.load_config(None, {EXAMPLE!r}, plugins=['{PLUGIN}'])\n"
        f"exp = new_run(config, Path({str(run_dir)!r}))\n"
        "try:\n"
        "    exp.run(exp.run_dir, [JsonlTracker(exp.run_dir), Stop()])\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted at round', exp.round)\n"
    )


def test_compare_runs_the_plugin_algorithm_with_the_in_process_numbers(
    cli, plugin, reference, tmp_path, capsys
):
    out = tmp_path / "cmp"
    args = ["compare", "--plugin", PLUGIN, *EXAMPLE, "--algorithms", "laplace-ditto,ditto"]
    assert cli([*args, "--seeds", "1", "--out", str(out), "--quiet"]) == 0
    assert "| laplace-ditto |" in capsys.readouterr().out
    run = out / "runs" / "laplace-ditto-seed0"
    assert yaml.safe_load((run / "config.yaml").read_text())["plugins"] == [PLUGIN]
    assert drop_timings(read_records(run)) == drop_timings(read_records(reference))
    rows = {r["algorithm"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    summary = json.loads((reference / "summary.json").read_text())
    assert rows["laplace-ditto"]["personal_acc_mean"]["mean"] == summary["personal_acc_mean"]


def test_experiment_api_on_the_example(plugin, reference):
    experiment = Experiment.load(reference)
    summary = json.loads((reference / "summary.json").read_text())
    model = experiment.personal_model(5)
    assert type(model).__name__ == "ResidualMLP"
    x, y, mask = experiment.dataset.test_batches(torch.tensor([5]))
    with torch.no_grad():
        accuracy = (model(x[0]).argmax(-1) == y[0])[mask[0]].float().mean()
    assert float(accuracy) == pytest.approx(summary["personal_acc_by_client"][5])
