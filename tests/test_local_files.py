"""Clients' own data files (``data.name=local-files``, :mod:`fedkin.data.local_files`): the three
formats, one clear error per kind of bad input, the held-out split, and node-local data through
the Flower protocol (a server that reads no data, nodes that read only their own file)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedkin.config import load_config
from fedkin.core.errors import DataError, UserError
from fedkin.data import build_dataset
from fedkin.data.local_files import LocalFilesConfig, node_dataset, read_client_file

try:  # the Flower protocol tests below need the optional flwr
    from flower_fake import FakeGrid, task_identity  # noqa: F401 (autouse fixture)
except ImportError:
    FakeGrid = None
needs_flwr = pytest.mark.skipif(FakeGrid is None, reason="needs the optional flwr")

DIM, CLASSES = 6, 3


def write_npz(path: Path, n: int, seed: int, **extra) -> Path:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = rng.normal(size=(n, DIM)) + y[:, None]
    np.savez(path, x=x.astype(np.float32), y=y, **extra)
    return path


def write_csv(path: Path, n: int, seed: int, label: str = "label") -> Path:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = rng.normal(size=(n, DIM)) - y[:, None]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*(f"f{j}" for j in range(DIM)), label])
        w.writerows([*row.tolist(), int(c)] for row, c in zip(x, y, strict=True))
    return path


def write_images(root: Path, per_class: int, size=(5, 4), mode: str = "L", names=("0", "1")):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in names:
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            shape = (size[0], size[1]) if mode == "L" else (size[0], size[1], 3)
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(pixels, mode).save(root / name / f"{k}.png")
    return root


def cfg(**kw) -> LocalFilesConfig:
    return LocalFilesConfig(**{"input_shape": [DIM], "num_classes": CLASSES, **kw})


def test_npz_csv_and_image_folder_load_as_validated_tensors(tmp_path):
    ((x, y),) = read_client_file(write_npz(tmp_path / "a.npz", 10, 0), cfg())
    raw = np.load(tmp_path / "a.npz")
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, torch.from_numpy(raw["x"])) and torch.equal(y, torch.from_numpy(raw["y"]))

    ((x, y),) = read_client_file(write_csv(tmp_path / "b.csv", 7, 1), cfg())
    rows = list(csv.reader((tmp_path / "b.csv").open()))[1:]
    assert x.shape == (7, DIM) and y.tolist() == [int(r[-1]) for r in rows]
    assert x[3].tolist() == pytest.approx([float(v) for v in rows[3][:-1]])

    folder = write_images(tmp_path / "img", per_class=3)
    ((x, y),) = read_client_file(folder, cfg(input_shape=[1, 5, 4], num_classes=2))
    assert x.shape == (6, 1, 5, 4) and y.tolist() == [0, 0, 0, 1, 1, 1]
    from PIL import Image

    first = np.asarray(Image.open(folder / "0" / "0.png"), dtype=np.float32) / 255
    assert torch.equal(x[0, 0], torch.from_numpy(first))
    rgb = write_images(tmp_path / "rgb", 2, mode="RGB", names=("cat", "dog"))
    named = cfg(input_shape=[3, 5, 4], num_classes=3, class_names=["bird", "cat", "dog"])
    ((x, y),) = read_client_file(rgb, named)
    assert x.shape == (4, 3, 5, 4) and y.tolist() == [1, 1, 2, 2]  # labels by class_names


def _error(path, config) -> str:
    with pytest.raises(DataError) as err:
        read_client_file(path, config)
    return str(err.value)


def test_every_bad_input_names_the_file_and_what_was_expected(tmp_path):
    npz = write_npz(tmp_path / "a.npz", 10, 0)
    assert _error(tmp_path / "nope.npz", cfg()).startswith(f"{tmp_path / 'nope.npz'}: no such")
    msg = _error(npz, cfg(input_shape=[5]))
    assert str(npz) in msg and "per-sample shape [6]; expected [5]" in msg
    msg = _error(npz, cfg(num_classes=2))
    assert str(npz) in msg and "outside 0..1 (data.num_classes=2)" in msg
    np.savez(tmp_path / "nolabels.npz", x=np.zeros((3, DIM)))
    assert "missing array(s) ['y']" in _error(tmp_path / "nolabels.npz", cfg())
    np.savez(tmp_path / "frac.npz", x=np.zeros((3, DIM)), y=np.array([0.5, 1, 2]))
    assert "integer labels 0..2" in _error(tmp_path / "frac.npz", cfg())
    np.savez(tmp_path / "len.npz", x=np.zeros((3, DIM)), y=np.array([0, 1]))
    assert "x has 3 samples but y has 2" in _error(tmp_path / "len.npz", cfg())
    np.savez(tmp_path / "nan.npz", x=np.full((3, DIM), np.nan), y=np.array([0, 1, 2]))
    assert "NaN or infinite" in _error(tmp_path / "nan.npz", cfg())

    csv_file = write_csv(tmp_path / "b.csv", 5, 1)
    msg = _error(csv_file, cfg(input_shape=[4]))
    assert str(csv_file) in msg and "6 feature columns; expected 4" in msg
    assert "no label column 'y' (data.label_column)" in _error(csv_file, cfg(label_column="y"))
    (tmp_path / "text.csv").write_text("f0,f1,f2,f3,f4,f5,label\n1,2,3,x,5,6,0\n")
    assert "is not a number" in _error(tmp_path / "text.csv", cfg())
    (tmp_path / "short.csv").write_text("f0,f1,f2,f3,f4,f5,label\n1,2,3\n")
    assert "line 2 has 3 fields" in _error(tmp_path / "short.csv", cfg())

    folder = write_images(tmp_path / "img", 1, size=(6, 6))
    msg = _error(folder, cfg(input_shape=[1, 5, 4], num_classes=2))
    assert str(folder / "0" / "0.png") in msg and "is 6x6 (HxW); expected 5x4" in msg
    msg = _error(write_images(tmp_path / "named", 1, names=("cat",)), cfg(input_shape=[1, 5, 4]))
    assert str(tmp_path / "named" / "cat") in msg and "named by their label 0..2" in msg
    assert "needs data.input_shape=[C, H, W]" in _error(folder, cfg())
    (tmp_path / "a.txt").write_text("")
    assert "unknown format '.txt'" in _error(tmp_path / "a.txt", cfg())


def test_config_errors_name_the_key():
    base = ["data.name=local-files", "data.input_shape=[6]", "data.num_classes=3"]
    with pytest.raises(UserError, match=r"data.files: lists 1 files for data.num_clients=2"):
        load_config(None, [*base, "data.num_clients=2", "data.files=[a.npz]"])
    with pytest.raises(UserError, match=r"data.input_shape: must be \[d\] or \[C, H, W\]"):
        load_config(None, [*base, "data.input_shape=[2,3]"])
    with pytest.raises(UserError, match=r"data.class_names: 1 names for data.num_classes=3"):
        load_config(None, [*base, "data.class_names=[a]"])


def test_held_out_split_is_the_same_on_a_node_and_in_process(tmp_path):
    """A node reading only its file holds client c's rows exactly as the in-process dataset
    listing every file does; the split is seeded per client; the file's own test split wins."""
    files = [
        str(write_npz(tmp_path / "a.npz", 20, 0)),
        str(write_csv(tmp_path / "b.csv", 9, 1)),
        str(write_npz(tmp_path / "c.npz", 8, 2, x_test=np.ones((3, DIM)), y_test=[0, 1, 2])),
    ]
    config = cfg(num_clients=3, files=files, test_fraction=0.25, validation_fraction=0.2)
    full = build_dataset(config, seed=5)
    assert full.local_clients is None
    assert full.test_sizes.tolist() == [5, 2, 3] and full.val_sizes.tolist() == [3, 1, 2]
    for c, path in enumerate(files):
        node = node_dataset(config, 5, c, path)
        assert node.local_clients.tolist() == [c]
        for split in ("client_train", "client_test"):
            for a, b in zip(getattr(node, split)(c), getattr(full, split)(c), strict=True):
                assert torch.equal(a, b)
        for split in ("test", "val"):
            for a, b in zip(node.test_batches([c], split), full.test_batches([c], split),
                            strict=True):  # fmt: skip
                assert torch.equal(a, b)
        other = (c + 1) % 3
        with pytest.raises(DataError, match=rf"client\(s\) \[{other}\] is not in this process"):
            node.client_train(other)
    x_test, y_test = full.client_test(2)
    assert torch.equal(x_test, torch.ones(3, DIM)) and y_test.tolist() == [0, 1, 2]
    assert build_dataset(config, seed=6).client_test(0)[1].shape == (5,)
    assert not torch.equal(build_dataset(config, seed=6).test_index[0], full.test_index[0])


def test_a_server_without_files_holds_no_data_but_builds_the_model(tmp_path):
    from fedkin.experiment import Experiment

    config = load_config(None, ["data.name=local-files", "data.num_clients=3",
                                "data.input_shape=[1,5,4]", "data.num_classes=4",
                                "model.name=cnn", "cohort.clients_per_round=2"])  # fmt: skip
    exp = Experiment(config)
    assert len(exp.dataset.x) == 0 and exp.dataset.local_clients.tolist() == []
    assert exp.dataset.image_shape == (1, 5, 4)
    logits = exp.algorithm.global_logits(exp.population["global"], torch.zeros(2, 1, 5, 4))
    assert logits.shape == (2, 4)
    summary = exp.dataset.summary()
    assert summary["num_samples"] == 0 and summary["local_clients"] == 0
    with pytest.raises(DataError, match="holds no client data"):
        exp.run_round()


# ----- node-local data through the Flower protocol ----------------------------------------------

DEPLOYED = [
    "data.name=local-files",
    "data.num_clients=3",
    "data.input_shape=[6]",
    "data.num_classes=3",
    "cohort.clients_per_round=2",
    "eval.holdout_clients=0.34",
    "model.hidden=[16]",
    "rounds=2",
    "eval.every=1",
]


@pytest.fixture
def node_files(tmp_path) -> list[str]:
    return [
        str(write_npz(tmp_path / "n0.npz", 30, 0)),
        str(write_csv(tmp_path / "n1.csv", 24, 1)),
        str(write_npz(tmp_path / "n2.npz", 12, 2)),
    ]


def _fake_deployment(config, node_configs):
    from fedkin.backends.flower_app import make_apps

    server_app, client_app = make_apps(config)
    grid = FakeGrid(client_app, node_configs)
    return server_app.fedkin_server, grid


@needs_flwr
def test_nodes_train_on_their_own_files_and_the_server_reads_none(node_files):
    """The server's config lists no files; node i reads only its data-file. Population and
    records equal the in-process run listing the same files (held-out client included)."""
    from fedkin.core.tree import tree_leaves
    from test_flower import run_in_process, same_records

    expected_records, expected_population = run_in_process(
        load_config(None, [*DEPLOYED, f"data.files=[{','.join(node_files)}]"])
    )
    server, grid = _fake_deployment(
        load_config(None, DEPLOYED),
        [{"partition-id": i, "data-file": node_files[i]} for i in reversed(range(3))],
    )
    server.run(grid)
    assert not grid.errors
    assert len(server.experiment.dataset.x) == 0  # the server never held a sample
    for a, b in zip(
        tree_leaves(expected_population), tree_leaves(server.experiment.population), strict=True
    ):
        assert torch.equal(a, b)
    same_records(expected_records, server.records)
    assert "new_acc_mean" in server.records[-1]


@needs_flwr
def test_a_bad_node_file_stops_the_run_at_discovery_with_its_error(node_files, tmp_path):
    bad = write_npz(tmp_path / "wide.npz", 10, 3)
    np.savez(bad, x=np.zeros((10, DIM + 1), np.float32), y=np.zeros(10, np.int64))
    configs = [{"partition-id": i, "data-file": p} for i, p in enumerate(node_files)]
    configs[1]["data-file"] = str(bad)
    server, grid = _fake_deployment(load_config(None, DEPLOYED), configs)
    with pytest.raises(UserError, match=rf"{bad}: x has per-sample shape \[7\]; expected \[6\]"):
        server.run(grid)
    digits = load_config(None, ["data.num_clients=3", "cohort.clients_per_round=2"])
    server, grid = _fake_deployment(digits, configs)
    with pytest.raises(UserError, match=r"data-file=.* needs data.name=local-files"):
        server.run(grid)


@needs_flwr
def test_the_deployed_server_app_always_writes_results_or_its_error(tmp_path, monkeypatch):
    """Without ``fedkin-run-dir`` the ServerApp writes to ~/.fedkin/flower-runs/<run id>; a run
    that fails (a SuperNode missing) leaves its error in ``failed.txt`` there."""
    from flwr.app import Context, RecordDict

    from fedkin.backends.flower_app import FAILURE_FILE, _client_app, _server_from_context

    monkeypatch.setenv("HOME", str(tmp_path))
    overrides = "data.num_clients=2 cohort.clients_per_round=2 rounds=1 model.hidden=[16]"
    run_config = {"fedkin-overrides": overrides, "fedkin-node-timeout": 0.5}
    nodes = [{"partition-id": 0}, {"partition-id": 1}]
    client_app = _client_app(None)
    for grid, run_id in ((FakeGrid(client_app, nodes), 7), (FakeGrid(client_app, nodes[:1]), 8)):
        for context in grid.contexts.values():
            context.run_config = run_config
        server = Context(run_id, 0, {}, RecordDict(), run_config)
        if run_id == 7:
            _server_from_context(grid, server)
        else:
            with pytest.raises(UserError, match="only 1 of 2 SuperNodes answered"):
                _server_from_context(grid, server)
    runs = tmp_path / ".fedkin" / "flower-runs"
    assert json.loads((runs / "7" / "summary.json").read_text())["rounds"] == 1
    assert not (runs / "7" / FAILURE_FILE).exists()
    failure = (runs / "8" / FAILURE_FILE).read_text()
    assert failure.startswith("UserError: only 1 of 2 SuperNodes answered within 0.5s")


def test_relative_files_are_recorded_as_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(None, [
        "data.name=local-files", "data.num_clients=2", "data.input_shape=[6]",
        "data.num_classes=3", "data.files=[a.npz,sub/b.csv]", "cohort.clients_per_round=2",
    ])  # fmt: skip
    assert config.data.files == [str(tmp_path / "a.npz"), str(tmp_path / "sub" / "b.csv")]
