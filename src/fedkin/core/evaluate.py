"""Evaluation on every client's own test split.

* Global model: one forward pass of w over all clients' test samples (in chunks), then
  per-client sums via ``index_add`` — cost independent of how many clients there are.
* Personalized: client i's own model θ_i = personal_params(Γ, s_i) on its own test split,
  mapped over clients by the engine (padded test batches with a mask).

Per-client scores a_i (test sizes n_i) — accuracy for classification, energy captured for
reconstruction (the algorithm's :mod:`task <fedkin.core.tasks>`) — are summarized as mean,
weighted mean Σ a_i n_i / Σ n_i, std and 10th percentile over clients; the task's eval loss
(cross-entropy, reconstruction MSE) as its mean over all test samples.
"""

from __future__ import annotations

import torch

from fedkin.algorithms.base import Algorithm
from fedkin.core.store import ClientStore
from fedkin.core.tasks import CLASSIFICATION, Task
from fedkin.core.tree import Tree


def summarize(
    prefix: str,
    correct: torch.Tensor,
    loss_sum: torch.Tensor,
    count: torch.Tensor,
    task: Task = CLASSIFICATION,
) -> dict:
    """Summary statistics over clients of the per-client score (``correct``: its sum over a
    client's samples) and loss, named by ``task`` (``acc``/``loss`` for classification)."""
    count = count.to(torch.float64)
    acc = correct.to(torch.float64) / count.clamp(min=1)
    score = f"{prefix}_{task.score_name}"
    return {
        f"{score}_mean": float(acc.mean()),
        f"{score}_weighted": float(correct.sum() / count.sum()),
        f"{score}_std": float(acc.std(unbiased=False)),
        f"{score}_p10": float(torch.quantile(acc, 0.1)),
        f"{prefix}_{task.loss_name}": float(loss_sum.sum() / count.sum()),
    }


@torch.no_grad()
def evaluate_global(
    algorithm: Algorithm, params: Tree, dataset, chunk: int = 8192, split: str = "test"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-client (score sum, loss_sum) of the global model on each client's test split
    (``split="val"``: validation split); the score is the task's (correct predictions for
    classification). Samples of many clients share a chunk, unless the task's evaluation
    depends on a sample's slot (``Task.per_client_eval``): then each client's split is one
    batch, as a Flower node evaluates it."""
    table, _ = dataset.eval_split(split)
    mask = table >= 0
    owner = torch.arange(dataset.num_clients, device=table.device)
    owner = owner.unsqueeze(1).expand_as(table)[mask]
    index = table[mask]
    # sums on the host in float64 (which MPS lacks); the forward passes on the data's device
    correct = torch.zeros(dataset.num_clients, dtype=torch.float64, device="cpu")
    loss_sum = torch.zeros(dataset.num_clients, dtype=torch.float64, device="cpu")
    if algorithm.task.per_client_eval:
        for c in range(dataset.num_clients):
            idx = table[c][mask[c]]
            logits = algorithm.global_logits(params, dataset.x[idx])
            score, loss = algorithm.task.per_sample(logits, dataset.x[idx], dataset.y[idx])
            score, loss = score.cpu().to(torch.float64), loss.cpu().to(torch.float64)
            correct[c], loss_sum[c] = score.sum(), loss.sum()
        return correct, loss_sum
    for start in range(0, len(index), chunk):
        idx, who = index[start : start + chunk], owner[start : start + chunk]
        logits = algorithm.global_logits(params, dataset.x[idx])
        score, loss = algorithm.task.per_sample(logits, dataset.x[idx], dataset.y[idx])
        who = who.cpu()
        correct.index_add_(0, who, score.cpu().to(torch.float64))
        loss_sum.index_add_(0, who, loss.cpu().to(torch.float64))
    return correct, loss_sum


@torch.no_grad()
def evaluate_personal(
    algorithm: Algorithm,
    engine,
    population: Tree,
    store: ClientStore,
    dataset,
    clients: torch.Tensor,
    chunk: int = 1024,
    split: str = "test",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-client (score sum, loss_sum) of each client's personal model on its test split
    (``split="val"``: validation split).

    ``clients[j]`` is the dataset id of the client whose state is row ``j`` of ``store``.
    Results are CPU tensors, wherever the engine computed.
    """

    def one_client(pop: Tree, state: Tree, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor):
        logits = algorithm.logits(algorithm.personal_params(pop, state), x)
        m = m.to(logits.dtype)
        hit, loss = algorithm.task.per_sample(logits, x, y)
        return (hit * m).sum(), (loss * m).sum()

    corrects, losses = [], []
    for start in range(0, len(clients), chunk):
        rows = torch.arange(start, min(start + chunk, len(clients)), device="cpu")
        x, y, m = dataset.test_batches(clients[rows], split)
        c, loss = engine.map(
            one_client, (population, store.gather(rows), x, y, m), (None, 0, 0, 0, 0)
        )
        corrects.append(c)
        losses.append(loss)
    return torch.cat(corrects).cpu().to(torch.float64), torch.cat(losses).cpu().to(torch.float64)
