"""Per-client sufficient statistics: the only view of the data the estimators need.

Client ``i`` holds ``n_i`` samples ``x_ij ∈ R^d``. Under the Gaussian model (and, for counts,
the Bernoulli model) everything an estimator uses is

* ``n_i`` — the number of samples,
* ``x̄_i = (1/n_i) Σ_j x_ij`` — the client mean (a vector of ``d`` coordinates),
* ``W_i = Σ_j (x_ij − x̄_i)²`` — the within-client sum of squares, per coordinate.

Each is computed by the client from its own samples; nothing here mixes clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClientData:
    """Sufficient statistics of ``m`` clients with ``d``-dimensional samples.

    ``counts`` is ``[m]``, ``means`` and ``within_ss`` are ``[m, d]`` (float64);
    ``binary`` records whether every sample was 0 or 1 (Bernoulli data).
    """

    clients: tuple[str, ...]
    columns: tuple[str, ...]
    counts: torch.Tensor
    means: torch.Tensor
    within_ss: torch.Tensor
    binary: bool

    @property
    def m(self) -> int:
        return len(self.clients)

    @property
    def d(self) -> int:
        return len(self.columns)

    @classmethod
    def from_samples(
        cls,
        client_index: torch.Tensor,
        values: torch.Tensor,
        clients: Sequence[str],
        columns: Sequence[str] = ("value",),
    ) -> ClientData:
        """Statistics from flat samples: ``values[k]`` (``[N, d]``) belongs to client
        ``clients[client_index[k]]``. Every client must have at least one sample."""
        values = values.to(torch.float64).reshape(len(client_index), -1)
        m = len(clients)
        counts = torch.bincount(client_index, minlength=m).to(torch.float64)
        if bool((counts == 0).any()):
            raise ValueError("every client needs at least one sample")
        sums = torch.zeros(m, values.shape[1], dtype=torch.float64).index_add_(
            0, client_index, values
        )
        means = sums / counts[:, None]
        dev = values - means[client_index]
        within = torch.zeros_like(means).index_add_(0, client_index, dev * dev)
        binary = bool(((values == 0) | (values == 1)).all())
        return cls(tuple(clients), tuple(columns), counts, means, within, binary)
