"""Tests for fedkin.data: partitioners, train/test split, FederatedDataset, dataset builders."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from fedkin.core.errors import DataError, UserError
from fedkin.core.rng import Stream
from fedkin.data import DATASETS, PARTITIONS, DataConfig, FederatedDataset, build_dataset
from fedkin.data import partition as P
from fedkin.data.config import (
    DigitsConfig,
    DirichletPartition,
    FashionMnistConfig,
    IidPartition,
    PathologicalPartition,
    SyntheticConfig,
)
from fedkin.data.idx import read_idx

# ----- helpers --------------------------------------------------------------------------------


def labels_10(n: int = 2000, seed: int = 0) -> np.ndarray:
    """Unbalanced labels over 10 classes."""
    return np.random.default_rng(seed).choice(10, size=n, p=np.linspace(1, 2, 10) / 15)


def assert_disjoint_covering(parts: list[np.ndarray], n: int) -> None:
    flat = np.concatenate(parts)
    assert len(flat) == n
    assert np.array_equal(np.sort(flat), np.arange(n))


def classes_per_client(labels: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    return np.array([len(np.unique(labels[p])) for p in parts])


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    """Write ``array`` (uint8) as an IDX file, gzip-compressed if ``compress``."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def write_fashion(root: Path, n_train: int = 60, n_test: int = 20, compress: bool = True):
    """Tiny Fashion-MNIST look-alike in ``root``; returns the pooled images and labels."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n_train + n_test, 28, 28), dtype=np.uint8)
    labels = (np.arange(n_train + n_test) % 10).astype(np.uint8)
    sfx = ".gz" if compress else ""
    write_idx(root / f"train-images-idx3-ubyte{sfx}", images[:n_train], compress)
    write_idx(root / f"train-labels-idx1-ubyte{sfx}", labels[:n_train], compress)
    write_idx(root / f"t10k-images-idx3-ubyte{sfx}", images[n_train:], compress)
    write_idx(root / f"t10k-labels-idx1-ubyte{sfx}", labels[n_train:], compress)
    return images, labels


def indexed_dataset(sizes: list[int], test: int = 1) -> FederatedDataset:
    """Dataset whose feature 0 is the row number, so batches reveal which rows were drawn."""
    train_parts, test_parts, start = [], [], 0
    for n in sizes:
        train_parts.append(np.arange(start, start + n))
        test_parts.append(np.arange(start + n, start + n + test))
        start += n + test
    x = torch.arange(start, dtype=torch.float32)[:, None].repeat(1, 2)
    y = torch.arange(start) % 3
    return FederatedDataset.from_parts("indexed", x, y, 3, train_parts, test_parts)


def global_rng_state() -> tuple:
    return np.random.get_state()[1].copy(), torch.get_rng_state().clone()


# ----- partitioners ---------------------------------------------------------------------------

PARTITIONERS = {
    "iid": lambda y, k, s: P.iid(len(y), k, s),
    "dirichlet": lambda y, k, s: P.dirichlet(y, k, 0.5, s),
    "pathological": lambda y, k, s: P.pathological(y, k, 2, s),
    "quantity": lambda y, k, s: P.quantity_skew(len(y), k, s, sigma=1.0),
}


@pytest.mark.parametrize("name", PARTITIONERS)
def test_partitioners_disjoint_covering_deterministic(name):
    y = labels_10()
    fn = PARTITIONERS[name]
    parts = fn(y, 40, 7)
    assert len(parts) == 40 and all(len(p) > 0 for p in parts)
    assert_disjoint_covering(parts, len(y))
    again = fn(torch.as_tensor(y), 40, 7)  # torch labels give the same result
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = fn(y, 40, 8)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_dirichlet_small_alpha_gives_fewer_classes_per_client():
    y = labels_10(5000)
    skewed = classes_per_client(y, P.dirichlet(y, 20, 0.05, 0)).mean()
    even = classes_per_client(y, P.dirichlet(y, 20, 100.0, 0)).mean()
    assert skewed < 5 < even
    assert even == 10


def test_dirichlet_respects_min_size():
    y = labels_10(1000)
    parts = P.dirichlet(y, 50, 0.3, 1, min_size=5)
    assert min(len(p) for p in parts) >= 5


def test_dirichlet_tops_up_when_redraws_fail():
    # extreme skew: redraws fail, the last draw is topped up to min_size, deterministically
    parts = P.dirichlet(labels_10(300), 100, 0.001, 0, min_size=3)
    assert min(len(p) for p in parts) >= 3
    assert sorted(np.concatenate(parts).tolist()) == list(range(300))
    again = P.dirichlet(labels_10(300), 100, 0.001, 0, min_size=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_at_most_k_classes(k):
    y = labels_10(1797)
    parts = P.pathological(y, 100, k, 0)
    assert_disjoint_covering(parts, len(y))
    assert classes_per_client(y, parts).max() <= k
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() <= 2 * sizes.min() + 2 * k  # shards are nearly equal in size


def test_pathological_needs_enough_shards():
    with pytest.raises(DataError, match="cannot cover all 10 classes"):
        P.pathological(labels_10(), 4, 2, 0)


def test_quantity_skew_sizes_spread_with_sigma():
    flat = [len(p) for p in P.quantity_skew(3000, 30, 0, sigma=0.0)]
    skewed = [len(p) for p in P.quantity_skew(3000, 30, 0, sigma=1.5, min_size=3)]
    assert max(flat) - min(flat) <= 1
    assert min(skewed) >= 3 and max(skewed) > 4 * np.median(skewed)


@pytest.mark.parametrize("name", PARTITIONERS)
def test_too_many_clients_is_a_clear_error(name):
    with pytest.raises(DataError, match="2000 clients") as err:
        PARTITIONERS[name](labels_10(1797), 2000, 0)
    assert "1797 samples" in str(err.value) and "data.num_clients" in str(err.value)


def test_digits_with_too_many_clients_fails_before_training():
    with pytest.raises(UserError, match="2000 clients"):
        build_dataset(DigitsConfig(num_clients=2000), 0)


# ----- train/test split -----------------------------------------------------------------------


def test_split_is_disjoint_stratified_and_sized():
    y = labels_10(4000)
    parts = P.dirichlet(y, 20, 1.0, 0)
    train, test = P.split_train_test(y, parts, 0.25, 3)
    for part, tr, te in zip(parts, train, test, strict=True):
        assert len(np.intersect1d(tr, te)) == 0
        assert np.array_equal(np.sort(np.concatenate([tr, te])), np.sort(part))
        assert len(te) == int(np.floor(0.25 * len(part) + 0.5))
        # every label gets its proportional share of the test split, up to one sample
        n_c = np.bincount(y[part], minlength=10)
        t_c = np.bincount(y[te], minlength=10)
        assert np.all(np.abs(t_c - n_c * len(te) / len(part)) < 1 + 1e-9)


def test_split_every_client_gets_train_and_test():
    y = np.zeros(7, dtype=np.int64)
    train, test = P.split_train_test(y, [np.array([0, 1]), np.arange(2, 7)], 0.01, 0)
    assert [len(t) for t in train] == [1, 4] and [len(t) for t in test] == [1, 1]
    train, test = P.split_train_test(y, [np.array([0, 1]), np.arange(2, 7)], 0.99, 0)
    assert [len(t) for t in train] == [1, 1] and [len(t) for t in test] == [1, 4]


def test_split_rejects_clients_with_one_sample():
    with pytest.raises(DataError, match="1 of 2 clients have fewer than 2 samples"):
        P.split_train_test(np.zeros(3), [np.array([0]), np.array([1, 2])], 0.25, 0)


# ----- FederatedDataset -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> FederatedDataset:
    return build_dataset(DigitsConfig(num_clients=50), seed=0)


def test_digits_layout(digits):
    ds = digits
    assert ds.x.shape == (1797, 64) and ds.x.dtype == torch.float32
    assert float(ds.x.min()) >= 0.0 and float(ds.x.max()) == 1.0
    assert ds.image_shape == (1, 8, 8) and ds.num_clients == 50 and ds.num_classes == 10
    every = torch.cat([ds.train_index[ds.train_index >= 0], ds.test_index[ds.test_index >= 0]])
    assert torch.equal(every.sort().values, torch.arange(1797))  # each sample used exactly once
    assert int((ds.train_sizes + ds.test_sizes).sum()) == 1797
    x, y = ds.client_train(3)
    assert x.shape == (int(ds.train_sizes[3]), 64) and y.shape == (int(ds.train_sizes[3]),)
    s = ds.summary()
    assert s["num_clients"] == 50 and s["num_samples"] == 1797
    assert s["num_train"] + s["num_test"] == 1797
    assert s["train_size"]["min"] >= 1 and 1 <= s["mean_classes_per_client"] <= 10


def test_build_is_deterministic_in_seed(digits):
    again = build_dataset(DigitsConfig(num_clients=50), seed=0)
    other = build_dataset(DigitsConfig(num_clients=50), seed=1)
    assert torch.equal(digits.train_index, again.train_index)
    assert torch.equal(digits.test_index, again.test_index)
    assert not torch.equal(digits.train_sizes, other.train_sizes)


def test_validation_split_is_carved_from_train_only(digits):
    """with_validation moves round(f·n_i) (≤ n_i − 1) train rows per client to validation,
    deterministically in the stream; test rows and the other clients' rows are untouched."""
    carved = digits.with_validation(0.2, Stream(3).child("v"))
    assert torch.equal(carved.test_index, digits.test_index)
    n = digits.train_sizes
    expected = torch.minimum(torch.round(0.2 * n.to(torch.float64)).long(), n - 1)
    assert torch.equal(carved.val_sizes, expected) and bool((expected > 0).any())
    assert torch.equal(carved.train_sizes + carved.val_sizes, n)
    for i in range(digits.num_clients):
        train = set(carved.train_index[i, : int(carved.train_sizes[i])].tolist())
        val = set(carved.val_index[i, : int(carved.val_sizes[i])].tolist())
        assert not train & val
        assert train | val == set(digits.train_index[i, : int(n[i])].tolist())
    again = digits.with_validation(0.2, Stream(3).child("v"))
    assert torch.equal(again.val_index, carved.val_index)
    other = digits.with_validation(0.2, Stream(4).child("v"))
    assert not torch.equal(other.val_index, carved.val_index)
    # training batches come from the remaining train rows only
    xs, _ = carved.sample_train_batches(torch.arange(5), Stream(0), 0, 4, 8)
    for c in range(5):
        rows = carved.x[carved.train_index[c, : int(carved.train_sizes[c])]]
        assert all((rows == x).all(1).any() for x in xs[:, c].reshape(-1, xs.shape[-1]))
    with pytest.raises(ValueError, match="no 'val' split"):
        digits.test_batches(torch.arange(2), "val")


def test_empty_split_is_rejected():
    x, y = torch.zeros(3, 2), torch.zeros(3, dtype=torch.int64)
    with pytest.raises(DataError, match=r"0 of 2 clients have an empty train split and 1 .*test"):
        FederatedDataset.from_parts("t", x, y, 1, [[0], [1]], [[2], []])


def test_sample_train_batches_shape_and_membership(digits):
    cohort = torch.tensor([4, 0, 17])
    x, y = digits.sample_train_batches(cohort, Stream(0).child("b"), 2, steps=3, batch_size=5)
    assert x.shape == (3, 3, 5, 64) and y.shape == (3, 3, 5)
    for k, c in enumerate(cohort.tolist()):
        cx, cy = digits.client_train(c)
        for s in range(3):
            for j in range(5):
                hit = (cx == x[s, k, j]).all(dim=1) & (cy == y[s, k, j])
                assert hit.any()


def test_sample_train_batches_is_an_epoch_without_replacement():
    ds = indexed_dataset([12, 5, 30])
    cohort = torch.tensor([0, 1, 2])
    x, _ = ds.sample_train_batches(cohort, Stream(1), 0, steps=3, batch_size=4)
    rows = x[..., 0].long()  # [steps, K, B]
    for k in range(3):
        drawn = rows[:, k].reshape(-1)
        own = ds.train_index[k, : int(ds.train_sizes[k])]
        assert torch.isin(drawn, own).all()
    assert len(rows[:, 0].unique()) == 12  # steps*B == n: every train sample exactly once
    assert len(rows[:, 2].unique()) == 12  # steps*B < n: no repeats
    wrapped = rows[:, 1].reshape(-1)  # 12 draws from 5: repeated passes of one fixed order
    assert len(wrapped[:5].unique()) == 5 and torch.equal(wrapped[5:], wrapped[:7])


def test_sample_train_batches_ignores_cohort_order_and_composition():
    ds = indexed_dataset([9, 4, 7, 15, 6])
    stream = Stream(3).child("batches")
    a, ya = ds.sample_train_batches(torch.tensor([1, 3, 4]), stream, 5, steps=4, batch_size=3)
    b, yb = ds.sample_train_batches(torch.tensor([3, 0, 1]), stream, 5, steps=4, batch_size=3)
    assert torch.equal(a[:, 0], b[:, 2]) and torch.equal(a[:, 1], b[:, 0])
    assert torch.equal(ya[:, 0], yb[:, 2])
    c, _ = ds.sample_train_batches(torch.tensor([1, 3, 4]), stream, 6, steps=4, batch_size=3)
    assert not torch.equal(a, c)  # a new round reshuffles


def test_sample_train_batches_scales_to_many_clients():
    k = 10_000
    rng = np.random.default_rng(0)
    sizes = rng.integers(2, 12, size=k)
    ds = indexed_dataset(sizes.tolist())
    cohort = torch.arange(k - 1, -1, -1)
    x, y = ds.sample_train_batches(cohort, Stream(0), 0, steps=2, batch_size=8)
    assert x.shape == (2, k, 8, 2) and y.shape == (2, k, 8)
    rows = x[..., 0].long()
    owner = torch.repeat_interleave(torch.arange(k), torch.as_tensor(sizes) + 1)
    assert torch.equal(owner[rows], cohort[None, :, None].expand(2, k, 8))


@pytest.mark.parametrize("split", ["test", "train"])
def test_padded_eval_batches(digits, split):
    cohort = torch.tensor([5, 2, 9])
    fn = digits.test_batches if split == "test" else digits.train_batches
    one = digits.client_test if split == "test" else digits.client_train
    sizes = digits.test_sizes if split == "test" else digits.train_sizes
    x, y, mask = fn(cohort)
    width = int(sizes[cohort].max())
    assert x.shape == (3, width, 64) and y.shape == mask.shape == (3, width)
    assert torch.equal(mask.sum(1), sizes[cohort])
    for k, c in enumerate(cohort.tolist()):
        cx, cy = one(c)
        n = len(cy)
        assert torch.equal(x[k, :n], cx) and torch.equal(y[k, :n], cy)
        assert not x[k, n:].any() and not y[k, n:].any()


# ----- synthetic ------------------------------------------------------------------------------


def label_heterogeneity(ds: FederatedDataset) -> float:
    """Mean total-variation distance between the label distributions of two clients."""
    counts = ds.label_counts("all").double()
    p = counts / counts.sum(1, keepdim=True)
    tv = 0.5 * (p[:, None] - p[None]).abs().sum(-1)
    return float(tv.sum() / (len(p) * (len(p) - 1)))


def feature_heterogeneity(ds: FederatedDataset) -> float:
    """Mean squared distance between the feature means of two clients."""
    means = torch.stack([ds.client_train(i)[0].mean(0) for i in range(ds.num_clients)])
    return float(torch.cdist(means, means).pow(2).mean())


def test_synthetic_shapes_and_determinism():
    cfg = SyntheticConfig(num_clients=12, dim=20, num_classes=5)
    before = global_rng_state()
    ds = build_dataset(cfg, seed=4)
    after = global_rng_state()
    assert np.array_equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert ds.x.shape[1:] == (20,) and ds.num_clients == 12 and ds.image_shape is None
    assert int(ds.y.max()) < 5 and int((ds.train_sizes + ds.test_sizes).min()) >= 50
    again = build_dataset(cfg, seed=4)
    assert torch.equal(ds.x, again.x) and torch.equal(ds.test_index, again.test_index)
    assert not torch.equal(ds.x[:50], build_dataset(cfg, seed=5).x[:50])


def test_synthetic_client_data_does_not_depend_on_num_clients():
    small = build_dataset(SyntheticConfig(num_clients=3), seed=0)
    large = build_dataset(SyntheticConfig(num_clients=6), seed=0)
    n = len(small.x)
    assert torch.equal(small.x, large.x[:n]) and torch.equal(small.y, large.y[:n])


def test_synthetic_heterogeneity():
    def build(**kw):
        return build_dataset(SyntheticConfig(num_clients=20, **kw), seed=0)

    iid, niid = build(iid=True), build(alpha=0.0, beta=0.0)
    assert label_heterogeneity(iid) < 0.5 < label_heterogeneity(niid)
    # E‖v_k − v_l‖² = 2·dim·(1 + β²): features spread out as beta grows
    spreads = [feature_heterogeneity(build(beta=b)) for b in (0.0, 1.0, 3.0)]
    assert spreads[0] < spreads[1] < spreads[2]
    assert 0.5 * 2 * 60 < spreads[0] < 2 * 2 * 60


def test_synthetic_alpha_shifts_all_logits_equally():
    """u_k adds the same amount to every logit of client k, so alpha cannot change labels."""
    a = build_dataset(SyntheticConfig(num_clients=5, alpha=0.0), seed=2)
    b = build_dataset(SyntheticConfig(num_clients=5, alpha=3.0), seed=2)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_digits_build_leaves_global_rng_alone():
    before = global_rng_state()
    build_dataset(DigitsConfig(num_clients=10, partition=PathologicalPartition()), seed=0)
    after = global_rng_state()
    assert np.array_equal(before[0], after[0]) and torch.equal(before[1], after[1])


# ----- fashion-mnist --------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_loader_on_fixture(tmp_path, compress):
    images, labels = write_fashion(tmp_path, compress=compress)
    cfg = FashionMnistConfig(root=str(tmp_path), num_clients=4, partition=IidPartition())
    ds = build_dataset(cfg, seed=0)
    assert ds.x.shape == (80, 1, 28, 28) and ds.image_shape == (1, 28, 28)
    assert torch.equal(ds.x, torch.from_numpy(images).float().div(255).unsqueeze(1))
    assert torch.equal(ds.y, torch.from_numpy(labels).long())
    assert ds.num_clients == 4 and int((ds.train_sizes + ds.test_sizes).sum()) == 80


def test_fashion_mnist_max_samples(tmp_path):
    images, _ = write_fashion(tmp_path)
    cfg = FashionMnistConfig(root=str(tmp_path), num_clients=3, max_samples=30)
    ds = build_dataset(cfg, seed=0)
    pooled = torch.from_numpy(images).float().div(255).unsqueeze(1)
    assert len(ds.x) == 30
    assert all((pooled == row).flatten(1).all(1).any() for row in ds.x)


def test_fashion_mnist_missing_files(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((2, 28, 28)))
    with pytest.raises(DataError) as err:
        build_dataset(FashionMnistConfig(root=str(tmp_path)), seed=0)
    msg = str(err.value)
    assert str(tmp_path) in msg and "t10k-images-idx3-ubyte.gz" in msg
    assert "train-labels-idx1-ubyte.gz" in msg and "train-images" not in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "data.root" in msg


def test_idx_reader_rejects_corrupt_files(tmp_path):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(b"\x01\x02\x08\x03" + bytes(20))
    with pytest.raises(DataError, match="bad IDX magic"):
        read_idx(path, 3)
    write_idx(path, np.zeros((2, 3, 3)), compress=False)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DataError, match=r"shape \(2, 3, 3\) \(18 bytes.*17 bytes"):
        read_idx(path, 3)
    with pytest.raises(DataError, match="expected 1"):
        read_idx(path, 1)
    gz = tmp_path / "bad.gz"
    gz.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="not a valid gzip"):
        read_idx(gz, 1)


def test_fashion_mnist_mismatched_counts(tmp_path):
    write_fashion(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3))
    with pytest.raises(DataError, match=r"20 images but .* 3 labels"):
        build_dataset(FashionMnistConfig(root=str(tmp_path), num_clients=2), seed=0)


# ----- configs and registry -------------------------------------------------------------------


def test_configs_parse_and_validate():
    adapter = TypeAdapter(DataConfig)
    cfg = adapter.validate_python(
        {"name": "digits", "partition": {"name": "pathological", "classes_per_client": 3}}
    )
    assert isinstance(cfg, DigitsConfig) and cfg.partition.classes_per_client == 3
    assert isinstance(DigitsConfig().partition, DirichletPartition)
    assert DigitsConfig().partition.alpha == 0.3 and FashionMnistConfig().partition.alpha == 0.1
    with pytest.raises(ValidationError):
        adapter.validate_python({"name": "digits", "num_clientz": 3})
    with pytest.raises(ValidationError):
        adapter.validate_python({"name": "digits", "partition": {"name": "dirichlet", "alpha": 0}})
    with pytest.raises(ValidationError):
        adapter.validate_python({"name": "mnist"})


def test_registry_lists_documented_options():
    assert set(DATASETS) == {
        "digits",
        "synthetic",
        "fashion-mnist",
        "linear-gaussian",
        "local-files",
    }
    assert set(PARTITIONS) == {"iid", "dirichlet", "pathological", "quantity"}
    for cls in [*DATASETS.values(), *PARTITIONS.values()]:
        assert cls.model_config.get("extra") == "forbid"
        for field_name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{field_name} has no description"
    for name, cls in DATASETS.items():
        assert cls.model_fields["name"].default == name
