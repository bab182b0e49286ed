"""`FederatedDataset`: one tensor store plus padded per-client train/test index tables.

All samples of all clients live in ``x`` / ``y``. Client ``i`` owns the rows
``train_index[i, :train_sizes[i]]`` (train) and ``test_index[i, :test_sizes[i]]`` (test);
the tables are padded with ``-1``. An optional validation split (``val_index`` /
``val_sizes``, see :meth:`FederatedDataset.with_validation`) is carved out of the train rows:
validation samples are never trained on. Because the tables are rectangular, a whole cohort's
batches are produced by one gather (``x[index_table[clients, …]]``) with no Python loop
over clients.

A process may hold the data of only some clients (``local_clients``): a Flower deployment's
server holds none (the shapes come from the config), each SuperNode only its own
(:mod:`fedkin.data.local_files`). The other clients' splits are empty, and asking for their
samples raises :class:`~fedkin.core.errors.DataError` instead of returning nothing.

Devices: :meth:`FederatedDataset.to` puts ``x``, ``y`` and the index tables on a device
(``engine.device``); the cohort's batches are then drawn and gathered there (the counter-based
keys included), never on the CPU. The per-client sizes and ``local_clients`` are bookkeeping
read on the host and stay on the CPU; client ids may be given on either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from fedkin.core.errors import DataError
from fedkin.core.rng import Stream

# Larger than any rng key (keys live in [0, 2**32)), so padded slots always sort last.
_PAD_KEY = 2**33


def pad_index(parts: Sequence[np.ndarray | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack per-client index arrays into an int64 table ``[num_clients, max_len]`` padded
    with ``-1``, and return it with the int64 sizes ``[num_clients]``."""
    sizes = torch.tensor([len(p) for p in parts], dtype=torch.int64, device="cpu")
    width = int(sizes.max()) if len(parts) else 0
    table = torch.full((len(parts), width), -1, dtype=torch.int64, device="cpu")
    if width:
        flat = [torch.as_tensor(np.asarray(p), dtype=torch.int64, device="cpu") for p in parts]
        flat = torch.cat(flat)
        owner = torch.repeat_interleave(torch.arange(len(parts), device="cpu"), sizes)
        starts = torch.cumsum(sizes, 0) - sizes
        rank = torch.arange(len(flat), device="cpu") - starts[owner]
        table[owner, rank] = flat
    return table, sizes


def check_splits(
    train_sizes: torch.Tensor, test_sizes: torch.Tensor, clients: torch.Tensor | None = None
) -> None:
    """Raise :class:`DataError` unless every client (of ``clients``, default all) has ≥1 train
    and ≥1 test sample."""
    if clients is not None:
        train_sizes, test_sizes = train_sizes[clients], test_sizes[clients]
    bad_train = int((train_sizes < 1).sum())
    bad_test = int((test_sizes < 1).sum())
    if bad_train or bad_test:
        raise DataError(
            f"{bad_train} of {len(train_sizes)} clients have an empty train split and "
            f"{bad_test} have an empty test split; every client needs at least 1 train and "
            "1 test sample. Use fewer clients (data.num_clients), a more even partition "
            "(larger data.partition.alpha) or a larger data.partition.min_size."
        )


def _gather_padded(
    x: torch.Tensor, y: torch.Tensor, table: torch.Tensor, sizes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of a padded index table (already selected for a cohort), cut to the cohort's
    largest size; padded slots get x = 0, y = 0 and mask = False. ``sizes`` may be on the CPU."""
    width = int(sizes.max()) if len(sizes) else 0
    idx = table[:, :width]
    mask = idx >= 0
    safe = idx.clamp(min=0)
    xs = x[safe] * mask.view(*mask.shape, *([1] * (x.dim() - 1))).to(x.dtype)
    ys = y[safe].masked_fill(~mask, 0)
    return xs, ys, mask


def _ids(clients: torch.Tensor | int | Sequence[int]) -> torch.Tensor:
    """Client ids as a CPU int64 tensor (for the host-side sizes and checks)."""
    return torch.as_tensor(clients, dtype=torch.int64, device="cpu")


@dataclass
class FederatedDataset:
    """Samples of all clients in one store, with per-client padded train/test index tables.

    ``x``: float32 ``[N, *feature_shape]``; ``y``: int64 ``[N]`` in ``[0, num_classes)``;
    ``train_index`` / ``test_index``: int64 ``[num_clients, max_size]`` padded with ``-1``;
    ``train_sizes`` / ``test_sizes``: int64 ``[num_clients]``; ``image_shape``: ``(C, H, W)``
    view of one sample for CNNs (``None`` for tabular data); ``val_index`` / ``val_sizes``:
    the optional per-client validation split (``None``: none); ``local_clients``: the sorted
    ids of the clients whose samples this process holds (``None``: all of them). ``x``, ``y``
    and the index tables share one device (:meth:`to`); sizes and ``local_clients`` are CPU.
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    train_index: torch.Tensor
    train_sizes: torch.Tensor
    test_index: torch.Tensor
    test_sizes: torch.Tensor
    image_shape: tuple[int, int, int] | None = None
    val_index: torch.Tensor | None = None
    val_sizes: torch.Tensor | None = None
    local_clients: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.x.dtype != torch.float32 or self.y.dtype != torch.int64:
            raise TypeError(f"x must be float32 and y int64, got {self.x.dtype} and {self.y.dtype}")
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} rows but y has {len(self.y)}")
        if self.image_shape is not None and int(np.prod(self.image_shape)) != int(
            np.prod(self.feature_shape)
        ):
            raise ValueError(
                f"image_shape {self.image_shape} does not match feature shape {self.feature_shape}"
            )
        check_splits(self.train_sizes, self.test_sizes, self.local_clients)

    def require_local(self, clients: torch.Tensor | int) -> None:
        """Raise :class:`DataError` if a client's samples are not in this process."""
        if self.local_clients is None:
            return
        ids = _ids(clients).reshape(-1)
        missing = ids[~torch.isin(ids, self.local_clients)]
        if len(missing):
            here = self.local_clients[:10].tolist()
            raise DataError(
                f"the data of client(s) {missing[:10].tolist()} is not in this process (it "
                f"holds {f'clients {here}' if here else 'no client data'}); with "
                "data.name=local-files list one file per client in data.files, or run a Flower "
                "deployment whose SuperNodes name their own (--node-config data-file=…)"
            )

    @classmethod
    def from_parts(
        cls,
        name: str,
        x: torch.Tensor,
        y: torch.Tensor,
        num_classes: int,
        train_parts: Sequence[np.ndarray | torch.Tensor],
        test_parts: Sequence[np.ndarray | torch.Tensor],
        image_shape: tuple[int, int, int] | None = None,
        local_clients: torch.Tensor | None = None,
    ) -> FederatedDataset:
        """Build from per-client lists of row indices into ``x`` / ``y``."""
        train_index, train_sizes = pad_index(train_parts)
        test_index, test_sizes = pad_index(test_parts)
        return cls(
            name,
            x,
            y,
            num_classes,
            train_index,
            train_sizes,
            test_index,
            test_sizes,
            image_shape,
            local_clients=local_clients,
        )

    @property
    def device(self) -> torch.device:
        """Where the samples and index tables are (batches are made there)."""
        return self.x.device

    def to(self, device: str | torch.device) -> FederatedDataset:
        """This dataset with ``x``, ``y`` and the index tables on ``device`` (a no-op for
        tensors already there); sizes and ``local_clients`` stay on the CPU."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            x=move(self.x),
            y=move(self.y),
            train_index=move(self.train_index),
            test_index=move(self.test_index),
            val_index=move(self.val_index),
        )

    @property
    def num_clients(self) -> int:
        """Number of clients."""
        return int(self.train_index.shape[0])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one sample's features, as stored in ``x``."""
        return tuple(self.x.shape[1:])

    def client_train(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All train samples ``(x, y)`` of client ``i``."""
        self.require_local(i)
        idx = self.train_index[i, : int(self.train_sizes[i])]
        return self.x[idx], self.y[idx]

    def client_test(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All test samples ``(x, y)`` of client ``i``."""
        self.require_local(i)
        idx = self.test_index[i, : int(self.test_sizes[i])]
        return self.x[idx], self.y[idx]

    def sample_train_batches(
        self, clients: torch.Tensor, stream: Stream, round: int, steps: int, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Minibatches for ``steps`` local steps of every client in a cohort, step-major.

        For client ``c`` with ``n`` train samples, the epoch order in round ``r`` is
        ``perm = argsort(stream.keys(r, c, p) for p < n)``; step ``s``, slot ``j`` takes train
        position ``perm[(s·B + j) mod n]``. So a client sees no repeat until it has seen all of
        its data (sampling without replacement, wrapping into a new pass of the same order),
        and the batches depend only on (seed, round, client id) — never on which other clients
        are in the cohort or on their order. One vectorized gather, no loop over clients.

        Returns ``x [steps, K, B, *feature_shape]`` and ``y [steps, K, B]`` on :attr:`device`.
        """
        ids = _ids(clients)
        self.require_local(ids)
        width = int(self.train_sizes[ids].max()) if len(ids) else 0
        clients, sizes = ids.to(self.device), self.train_sizes[ids].to(self.device)  # [K]
        table = self.train_index[clients, :width]  # [K, M]
        positions = torch.arange(width, device=table.device)
        keys = stream.keys(round, clients[:, None], positions[None, :])
        keys = keys.masked_fill(positions[None, :] >= sizes[:, None], _PAD_KEY)
        perm = torch.argsort(keys, dim=1, stable=True)  # [K, M]; valid positions first
        slots = torch.arange(steps * batch_size, device=table.device)
        order = torch.gather(perm, 1, slots[None, :] % sizes[:, None])  # [K, S·B]
        rows = torch.gather(table, 1, order).view(len(clients), steps, batch_size)
        rows = rows.transpose(0, 1)  # [S, K, B]
        return self.x[rows], self.y[rows]

    def with_validation(self, fraction: float, stream: Stream) -> FederatedDataset:
        """This dataset with ``round(fraction · n_i)`` of each client's ``n_i`` train samples
        moved to its validation split (at most ``n_i − 1``: every client keeps a train sample;
        a client with a single train sample gets no validation samples). Which samples move is
        a function of (stream, client, position) only."""
        if self.val_index is not None:
            raise ValueError("this dataset already has a validation split")
        sizes, table = self.train_sizes, self.train_index.cpu()  # built on the host
        positions = torch.arange(table.shape[1], device="cpu")
        clients = torch.arange(self.num_clients, device="cpu")
        keys = stream.keys(clients[:, None], positions[None, :])
        keys = keys.masked_fill(positions[None, :] >= sizes[:, None], _PAD_KEY)
        shuffled = torch.gather(table, 1, torch.argsort(keys, dim=1, stable=True))
        n_val = torch.round(fraction * sizes.to(torch.float64)).long()
        n_val = torch.minimum(n_val, (sizes - 1).clamp(min=0))  # clients without data: none
        val = [shuffled[i, : int(k)] for i, k in enumerate(n_val)]
        train = [
            shuffled[i, int(k) : int(n)] for i, (k, n) in enumerate(zip(n_val, sizes, strict=True))
        ]
        train_index, train_sizes = pad_index(train)
        val_index, val_sizes = pad_index(val)
        return replace(
            self,
            train_index=train_index.to(self.device),
            train_sizes=train_sizes,
            val_index=val_index.to(self.device),
            val_sizes=val_sizes,
        )

    def with_train_cap(
        self,
        n: int,
        stream: Stream,
        clients: torch.Tensor | None = None,
        key: str = "data.train_per_client",
    ) -> FederatedDataset:
        """This dataset with the train split of ``clients`` (default: every client) cut to
        ``n`` samples: those with the ``n`` smallest keys of (stream, client, position), so the
        subset for ``n`` lies inside the one for any larger ``n``; the other clients keep
        theirs unchanged. A capped client with fewer than ``n`` is an error naming ``key``."""
        all_clients = torch.arange(self.num_clients, device="cpu")
        clients = all_clients if clients is None else clients.cpu()
        sizes = self.train_sizes.cpu()
        short = clients[sizes[clients] < n]
        if len(short):
            fewest = int(sizes[clients].min())
            raise DataError(
                f"{key}: {n} exceeds the {fewest} training samples of client "
                f"{int(short[0])} ({len(short)} clients hold fewer than {n}); "
                f"allowed: 1..{fewest} or null (all)"
            )
        table = self.train_index.cpu()  # built on the host
        positions = torch.arange(table.shape[1], device="cpu")
        keys = stream.keys(all_clients[:, None], positions[None, :])
        keys = keys.masked_fill(positions[None, :] >= sizes[:, None], _PAD_KEY)
        capped = torch.gather(table, 1, torch.argsort(keys, dim=1, stable=True)[:, :n])
        chosen = set(clients.tolist())
        rows = [capped[c] if c in chosen else table[c, : sizes[c]] for c in range(len(table))]
        train_index, train_sizes = pad_index(rows)
        return replace(self, train_index=train_index.to(self.device), train_sizes=train_sizes)

    def eval_split(self, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
        """The padded index table and sizes of the ``"test"`` or ``"val"`` split."""
        if split == "test":
            return self.test_index, self.test_sizes
        if split == "val" and self.val_index is not None:
            return self.val_index, self.val_sizes
        raise ValueError(f"no {split!r} split (have: test{', val' * (self.val_index is not None)})")

    def sample_poisson_batches(
        self, clients: torch.Tensor, stream: Stream, round: int, steps: int, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Poisson-sampled minibatches (for DP-SGD), step-major, as padded tensors with a mask.

        In round ``r``, step ``s``, train sample ``p`` of client ``c`` (with ``n`` samples) is
        in the batch iff ``stream.uniform(r, c, s, p) < q``, ``q = min(1, B/n)``: independently
        for every sample and step, so batch sizes are Binomial(n, q) with mean ``min(B, n)``.
        This is the sampling the Poisson-subsampled Gaussian accountant assumes. The selected
        samples of a (step, client) fill the first slots of the batch axis in train order;
        the axis is as wide as the largest batch drawn for the cohort (at least 1), and the
        remaining slots hold x = 0, y = 0, mask = False.

        Returns ``x [steps, K, W, *feature_shape]``, ``y [steps, K, W]``, ``mask [steps, K, W]``
        on :attr:`device`.
        """
        ids = _ids(clients)
        self.require_local(ids)
        width = int(self.train_sizes[ids].max()) if len(ids) else 0
        clients, sizes = ids.to(self.device), self.train_sizes[ids].to(self.device)  # [K]
        table = self.train_index[clients, :width]  # [K, M]
        q = (batch_size / sizes.to(torch.float64)).clamp(max=1.0)
        positions = torch.arange(width, device=table.device)
        u = stream.uniform(
            round,
            clients[:, None, None],
            torch.arange(steps, device=table.device)[None, :, None],
            positions[None, None, :],
        )  # [K, S, M]
        take = (u < q[:, None, None]) & (positions < sizes[:, None])[:, None, :]
        batch_width = max(int(take.sum(-1).max()) if take.numel() else 0, 1)
        # selected positions first, in train order: sort keys p (taken) or M + p (not taken)
        order = torch.where(take, positions, width + positions).sort(dim=-1).values
        order = order[..., :batch_width]  # [K, S, W]
        mask = order < width
        safe = order.masked_fill(~mask, 0).clamp(max=max(width - 1, 0))
        rows = torch.gather(table[:, None, :].expand(-1, steps, -1), 2, safe)  # [K, S, W]
        rows, mask = rows.transpose(0, 1), mask.transpose(0, 1)  # [S, K, W]
        shape = (*mask.shape, *([1] * (self.x.dim() - 1)))
        xs = self.x[rows] * mask.view(shape).to(self.x.dtype)
        ys = self.y[rows].masked_fill(~mask, 0)
        return xs, ys, mask

    def test_batches(
        self, clients: torch.Tensor, split: str = "test"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every test (or ``split="val"``: validation) sample of a cohort, padded to the
        largest such split among ``clients``: ``x [K, T, *feature_shape]``, ``y [K, T]``,
        ``mask [K, T]`` (bool; padded slots hold x = 0, y = 0, mask = False), on :attr:`device`."""
        index, sizes = self.eval_split(split)
        ids = _ids(clients)
        self.require_local(ids)
        return _gather_padded(self.x, self.y, index[ids.to(index.device)], sizes[ids])

    def train_batches(
        self, clients: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every train sample of a cohort, padded like :meth:`test_batches`."""
        ids = _ids(clients)
        self.require_local(ids)
        table = self.train_index[ids.to(self.device)]
        return _gather_padded(self.x, self.y, table, self.train_sizes[ids])

    def label_counts(self, split: str = "train") -> torch.Tensor:
        """Per-client label histogram, int64 ``[num_clients, num_classes]``, of the ``"train"``,
        ``"test"`` or ``"all"`` split."""
        tables = {"train": [self.train_index], "test": [self.test_index]}
        tables["all"] = tables["train"] + tables["test"]
        if split not in tables:
            raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
        counts = self.y.new_zeros(self.num_clients, self.num_classes)
        for table in tables[split]:
            mask = table >= 0
            labels = self.y[table.clamp(min=0)].masked_fill(~mask, 0)
            counts.scatter_add_(1, labels, mask.to(torch.int64))
        return counts.cpu()

    def summary(self) -> dict[str, object]:
        """Sizes and heterogeneity at a glance (plain Python values, JSON-serializable); the
        statistics cover the clients whose data is here (``local_clients``)."""
        here = slice(None) if self.local_clients is None else self.local_clients

        def stats(sizes: torch.Tensor) -> dict[str, float] | None:
            s = sizes[here].to(torch.float64)
            if not len(s):
                return None
            return {
                "min": int(s.min()),
                "median": float(torch.quantile(s, 0.5)),
                "max": int(s.max()),
                "mean": float(s.mean()),
            }

        classes_per_client = (self.label_counts("all") > 0)[here].sum(dim=1).to(torch.float64)
        local = {} if self.local_clients is None else {"local_clients": len(self.local_clients)}
        return {
            "name": self.name,
            "num_clients": self.num_clients,
            "num_samples": len(self.x),
            "num_train": int(self.train_sizes.sum()),
            "num_test": int(self.test_sizes.sum()),
            "num_classes": self.num_classes,
            "feature_shape": list(self.feature_shape),
            "image_shape": list(self.image_shape) if self.image_shape else None,
            "train_size": stats(self.train_sizes),
            "test_size": stats(self.test_sizes),
            "mean_classes_per_client": (
                float(classes_per_client.mean()) if len(classes_per_client) else None
            ),
            **local,
        }
