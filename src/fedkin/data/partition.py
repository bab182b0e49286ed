"""Partitioners: split a pool of samples among clients, then each client into train/test.

Every partitioner returns one int64 index array per client; together they cover
``range(n_samples)`` exactly once (disjoint and covering). All randomness comes from
``numpy.random.default_rng(seed)``, so a partition is a pure function of its arguments.
Impossible requests (more clients than samples, …) raise :class:`DataError` saying what
to change.
"""

from __future__ import annotations

import numpy as np
import torch

from fedkin.core.errors import DataError

Labels = np.ndarray | torch.Tensor


def _as_labels(labels: Labels) -> np.ndarray:
    """Labels as a 1-D int64 numpy array."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    return np.asarray(labels, dtype=np.int64).reshape(-1)


def _check_capacity(n_samples: int, num_clients: int, min_size: int, what: str) -> None:
    if num_clients < 1:
        raise DataError(f"{what}: num_clients must be >= 1, got {num_clients}")
    if n_samples < num_clients * min_size:
        raise DataError(
            f"{what}: cannot give {num_clients} clients at least {min_size} samples each from "
            f"only {n_samples} samples; use at most {n_samples // max(min_size, 1)} clients "
            "(data.num_clients) or a smaller min_size."
        )


def _group(indices: np.ndarray, owner: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Split ``indices`` into per-client arrays according to ``owner`` (stable)."""
    order = np.argsort(owner, kind="stable")
    cuts = np.cumsum(np.bincount(owner, minlength=num_clients))[:-1]
    return [part.astype(np.int64) for part in np.split(indices[order], cuts)]


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers proportional to ``weights`` that sum exactly to ``total`` (Hamilton method)."""
    quota = total * weights / weights.sum()
    base = np.floor(quota).astype(np.int64)
    extra = total - int(base.sum())
    base[np.argsort(-(quota - base), kind="stable")[:extra]] += 1
    return base


def iid(n_samples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Uniformly random split into ``num_clients`` parts whose sizes differ by at most one."""
    _check_capacity(n_samples, num_clients, 1, "iid partition")
    perm = np.random.default_rng(seed).permutation(n_samples)
    return [part.astype(np.int64) for part in np.array_split(perm, num_clients)]


def dirichlet(
    labels: Labels,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 2,
    max_attempts: int = 100,
) -> list[np.ndarray]:
    """Label-skewed split (Hsu et al. 2019, as in PFLlib and flwr-datasets).

    For each class ``c`` draw proportions ``p_c ~ Dir(alpha · 1_K)`` over the ``K`` clients
    and deal the (shuffled) samples of class ``c`` out in those proportions. Small ``alpha``
    concentrates each class on few clients (strong skew); ``alpha → ∞`` approaches IID.
    The draw is repeated until every client holds at least ``min_size`` samples. If
    ``max_attempts`` draws all fail (very small ``alpha`` with many clients, e.g. digits with 100
    clients at alpha 0.1), the last draw is *topped up*: each short client receives samples, one
    at a time, of the majority class of the currently largest client — the skew is kept, only
    the few samples needed move.
    """
    y = _as_labels(labels)
    _check_capacity(len(y), num_clients, min_size, "dirichlet partition")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    by_class = [np.flatnonzero(y == c) for c in classes]
    class_sizes = np.array([len(ix) for ix in by_class])
    for _ in range(max_attempts):
        props = rng.dirichlet(np.full(num_clients, alpha), size=len(classes))  # [C, K]
        cuts = np.rint(np.cumsum(props, axis=1) * class_sizes[:, None]).astype(np.int64)
        cuts[:, -1] = class_sizes
        counts = np.diff(cuts, axis=1, prepend=0)  # [C, K], ≥ 0 since cuts are monotone
        if int(counts.sum(axis=0).min()) >= min_size:
            break
    else:
        _top_up(counts, min_size)
    pool = np.concatenate([rng.permutation(ix) for ix in by_class])
    owner = np.concatenate([np.repeat(np.arange(num_clients), row) for row in counts])
    return _group(pool, owner, num_clients)


def _top_up(counts: np.ndarray, min_size: int) -> None:
    """Move single samples into clients holding fewer than ``min_size`` (in place, [C, K])."""
    totals = counts.sum(axis=0)
    for k in np.flatnonzero(totals < min_size):
        while totals[k] < min_size:
            donor = int(np.argmax(totals))
            c = int(np.argmax(counts[:, donor]))
            counts[c, donor] -= 1
            counts[c, k] += 1
            totals[donor] -= 1
            totals[k] += 1


def pathological(
    labels: Labels, num_clients: int, classes_per_client: int, seed: int
) -> list[np.ndarray]:
    """Shard split of McMahan et al. 2017 (also pFedMe, QuPeD): each client gets
    ``k = classes_per_client`` label-pure shards, hence at most ``k`` classes.

    The samples are sorted by label (random order within a label) and cut into
    ``S = num_clients · k`` shards that never straddle two labels: every class gets one shard,
    and the remaining ``S − C`` shards go to the classes by the D'Hondt rule (largest current
    shard size first), which keeps shard sizes as equal as possible. The shards are shuffled
    and client ``i`` receives shards ``i·k … i·k + k − 1``.
    """
    y = _as_labels(labels)
    k = classes_per_client
    n_shards = num_clients * k
    _check_capacity(len(y), num_clients, k, "pathological partition")
    classes = np.unique(y)
    if n_shards < len(classes):
        raise DataError(
            f"pathological partition: {num_clients} clients x {k} classes per client = "
            f"{n_shards} shards cannot cover all {len(classes)} classes; raise data.num_clients "
            "or data.partition.classes_per_client so that their product is at least "
            f"{len(classes)}."
        )
    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
    sizes = np.array([len(ix) for ix in by_class])
    # D'Hondt: one shard per class, then the S − C largest quotients n_c / j (j ≥ 2).
    divisors = np.arange(2, n_shards - len(classes) + 2)
    quotients = sizes[:, None] / divisors[None, :]  # [C, S − C]
    quotients[divisors[None, :] > sizes[:, None]] = -1.0  # a shard needs ≥ 1 sample
    top = np.argsort(-quotients, axis=None, kind="stable")[: n_shards - len(classes)]
    shards_per_class = 1 + np.bincount(top // len(divisors), minlength=len(classes))
    shards = [
        shard
        for ix, q in zip(by_class, shards_per_class, strict=True)
        for shard in np.array_split(ix, q)
    ]
    owner_of_shard = np.empty(n_shards, dtype=np.int64)
    owner_of_shard[rng.permutation(n_shards)] = np.arange(n_shards) // k
    pool = np.concatenate(shards)
    owner = np.repeat(owner_of_shard, [len(s) for s in shards])
    return _group(pool, owner, num_clients)


def quantity_skew(
    n_samples: int, num_clients: int, seed: int, sigma: float = 1.0, min_size: int = 2
) -> list[np.ndarray]:
    """IID labels, unequal client sizes from a **lognormal**: weights
    ``w_i ~ LogNormal(0, sigma²)`` (``sigma`` is the std dev of ``log w_i``); client ``i``
    gets ``min_size`` samples plus its share ``w_i / Σw`` of the rest (largest-remainder
    rounding), drawn uniformly at random without replacement. ``sigma = 0`` gives equal sizes.
    """
    _check_capacity(n_samples, num_clients, min_size, "quantity-skew partition")
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, sigma, num_clients)
    sizes = min_size + _largest_remainder(n_samples - num_clients * min_size, weights)
    perm = rng.permutation(n_samples)
    return [part.astype(np.int64) for part in np.split(perm, np.cumsum(sizes)[:-1])]


def split_train_test(
    labels: Labels, parts: list[np.ndarray], test_fraction: float, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split every client's samples into disjoint train and test parts, stratified by label.

    A client with ``n`` samples gets ``t = clip(round(test_fraction · n), 1, n − 1)`` test
    samples. Its samples are ordered by label (random order within a label) and ``t`` of them
    are taken by systematic sampling with a random start: position ``i`` is a test sample iff
    ``⌊((i+1)·t + u)/n⌋ − ⌊(i·t + u)/n⌋ = 1`` with ``u`` uniform in ``[0, n)``. Each label
    thus gets within one sample of its proportional share of the test split, so train and test
    follow the same label distribution. Vectorized over all clients at once.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    y = _as_labels(labels)
    num_clients = len(parts)
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    too_small = int((sizes < 2).sum())
    if too_small:
        raise DataError(
            f"{too_small} of {num_clients} clients have fewer than 2 samples, so they cannot "
            "get both a train and a test sample; use fewer clients (data.num_clients), a more "
            "even partition (larger data.partition.alpha) or a larger data.partition.min_size."
        )
    rng = np.random.default_rng(seed)
    pool = np.concatenate(parts).astype(np.int64)
    owner = np.repeat(np.arange(num_clients), sizes)
    order = np.lexsort((rng.random(len(pool)), y[pool], owner))
    pool, owner = pool[order], owner[order]
    rank = np.arange(len(pool)) - (np.cumsum(sizes) - sizes)[owner]
    n_test = np.clip(np.floor(test_fraction * sizes + 0.5).astype(np.int64), 1, sizes - 1)
    start = np.floor(rng.random(num_clients) * sizes).astype(np.int64)
    n, t, u = sizes[owner], n_test[owner], start[owner]
    is_test = ((rank + 1) * t + u) // n - (rank * t + u) // n == 1
    train = _group(pool[~is_test], owner[~is_test], num_clients)
    test = _group(pool[is_test], owner[is_test], num_clients)
    return train, test
