"""Personal models defined by adapting the global model: θ_i = A_i(w) (FedAvg-FT, Per-FedAvg).

For these algorithms the personal model is a function of the *current* population model w and
the client's own training data, e.g. T fine-tuning steps or Per-FedAvg's α-step(s). They define

    adapt(Γ, s_i, batches, ctx) -> s_i'      (pure and vmappable, like ``client_update``)

which writes A_i(w) into the client state. Because ``personal_params(Γ, s_i)`` has no access to
data, each such algorithm also stores A_i(w_t) at every round t it takes part in, so the
framework's standard personal evaluation sees the adaptation of the global model the client
last received (and w itself before its first round). :func:`evaluate_adapted` instead re-adapts
every client from the current Γ on its own train batches and evaluates the result on its test
split: the exact definition, at the cost of one adaptation pass per evaluation.
"""

from __future__ import annotations

import torch

from fedkin.core.rng import Stream
from fedkin.core.tree import Tree, tree_map


def select(flag: torch.Tensor, if_true: Tree, if_false: Tree) -> Tree:
    """Leafwise ``where(flag > 0, a, b)`` for a scalar flag (batched under vmap)."""
    return tree_map(lambda a, b: torch.where(flag > 0, a, b), if_true, if_false)


class _Rows:
    """A store-like view (``gather``) of stacked client states."""

    def __init__(self, data: Tree) -> None:
        self.data = data

    def gather(self, rows: torch.Tensor) -> Tree:
        return tree_map(lambda t: t[rows], self.data)


def _cat(parts: list[Tree]) -> Tree:
    return {
        k: _cat([p[k] for p in parts]) if isinstance(v, dict) else torch.cat([p[k] for p in parts])
        for k, v in parts[0].items()
    }


def evaluate_adapted(
    algorithm,
    engine,
    population: Tree,
    store,
    dataset,
    stream: Stream,
    round_: int,
    steps: int,
    batch_size: int,
    clients: torch.Tensor | None = None,
    prefix: str = "adapted",
    chunk: int = 1024,
) -> dict:
    """Personal metrics of θ_i = A_i(w) adapted from the *current* population on each client's
    own train batches (``steps`` batches of ``batch_size`` drawn from ``stream`` at ``round_``),
    evaluated on its test split, summarized over ``clients`` (default: all; row j of ``store``
    must hold client j, i.e. one client group). Returns ``summarize(prefix, …)`` statistics."""
    from fedkin.core.evaluate import evaluate_personal, summarize  # evaluate imports algorithms

    if clients is None:
        clients = torch.arange(dataset.num_clients)
    parts = []
    for start in range(0, len(clients), chunk):
        ids = clients[start : start + chunk]
        batches = dataset.sample_train_batches(ids, stream, round_, steps, batch_size)
        ctx = {
            "client_id": ids,
            "num_samples": dataset.train_sizes[ids].to(torch.float32),
            "round": torch.full_like(ids, round_),
        }
        parts.append(
            engine.map(
                algorithm.adapt, (population, store.gather(ids), batches, ctx), (None, 0, 1, 0)
            )
        )
    adapted = _Rows(_cat(parts))
    correct, loss = evaluate_personal(algorithm, engine, population, adapted, dataset, clients)
    return summarize(prefix, correct, loss, dataset.test_sizes[clients].to(torch.float64))
