"""A hand-batched local solve for the commonest workload: FedAvg on an MLP with plain SGD.

Under ``vmap(grad(...))`` every local step pays functorch's per-operator batching and the
autograd engine's bookkeeping on top of the matmuls. For FedAvg's local solve on the zoo MLP
(flatten → [Linear → ReLU]* → Linear) with the classification task (mean cross-entropy) and
plain SGD, the gradients are short enough to write out for the whole cohort at once, with the
client as the batch dimension of ``bmm``. For client ``i``, step ``s``, batch ``x`` of ``B``
rows, layers ``l = 1..L`` (``h_0 = x``):

    a_l = h_{l−1} W_lᵀ + b_l,   h_l = relu(a_l) (l < L),   z = a_L
    ℓ = (1/B) Σ_b [logsumexp(z_b) − z_{b, y_b}],   δ_L = (softmax(z) − onehot(y)) / B
    ∇W_l = δ_lᵀ h_{l−1},   ∇b_l = Σ_b δ_l,   δ_{l−1} = (δ_l W_l) ⊙ 1[a_{l−1} > 0]
    W_l ← W_l − η ∇W_l,   b_l ← b_l − η ∇b_l

and the message is ``Δ_i = θ_i − w``, the metric the mean of ``ℓ`` over steps — the outputs
of :meth:`FedAvg.client_update <fedkin.algorithms.fedavg.FedAvg.client_update>`, equal to the
vmap path's up to float reassociation (tested).

It applies only when all of these hold, and the engine falls back to ``vmap`` otherwise: the
algorithm is exactly FedAvg, without DP-SGD, on the classification task; the model is the zoo
``MLP`` (and the population model the same module); the client optimizer is plain SGD —
checked by its behaviour: ``init`` gives an empty state (no momentum, no step count for a
schedule) and one step on a probe is exactly ``θ − η g`` (no weight decay, no clipping), and
it is neither sharpness-aware nor zeroth-order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fedkin.core.tree import tree_leaves


def _plain_sgd(optimizer: Any) -> bool:
    """Whether ``optimizer`` is θ ← θ − η g with a constant η, probed on a random tree."""
    lr = optimizer.lr
    if lr is None or optimizer.perturbation is not None or optimizer.estimator is not None:
        return False  # sharpness-aware and zeroth-order optimizers do not step on g
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, 2, generator=g)}
    grads = {"w": 1e3 * torch.randn(3, 2, generator=g)}  # large: a clip would show
    state = optimizer.init(params)
    if not isinstance(state, dict) or tree_leaves(state):
        return False
    new, _ = optimizer.step(grads, state, params)
    return torch.equal(new["w"], params["w"] - lr * grads["w"])


def _linear_layers(model: torch.nn.Module) -> list[str] | None:
    """Parameter-name prefixes of the zoo MLP's Linear layers, or None for another model."""
    from fedkin.models.zoo import MLP

    if type(model) is not MLP:
        return None
    names = []
    for i, layer in enumerate(model.net):
        if isinstance(layer, torch.nn.Linear):
            names.append(f"net.{i}")
        elif not isinstance(layer, torch.nn.ReLU):
            return None
    return names


def fast_client_update(fn: Callable[..., Any], in_dims: tuple[int | None, ...]) -> Any:
    """The hand-batched equivalent of mapping ``fn`` over a cohort with ``in_dims``, or None
    when ``fn`` is not a FedAvg ``client_update`` this module covers."""
    from fedkin.algorithms.fedavg import FedAvg
    from fedkin.core.tasks import CLASSIFICATION

    algorithm = getattr(fn, "__self__", None)
    if (
        type(algorithm) is not FedAvg
        or getattr(fn, "__func__", None) is not FedAvg.client_update
        or in_dims[0] is not None
        or in_dims[2] != 1
        or algorithm.dp_sgd is not None
        or algorithm.task is not CLASSIFICATION
        or algorithm.global_model is not algorithm.model
        or not _plain_sgd(algorithm.client_optimizer)
    ):
        return None
    layers = _linear_layers(algorithm.model)
    if layers is None:
        return None
    lr, steps = float(algorithm.client_optimizer.lr), algorithm.local_steps

    def run(population: dict, client: Any, batches: tuple, ctx: Any) -> tuple:
        if len(batches) != 2 or (in_dims[1] is None and tree_leaves(client)):
            raise NotCoveredError
        xs, ys = batches
        n = xs.shape[1]
        w = population["global"]
        weights = [w[f"{p}.weight"].expand(n, -1, -1) for p in layers]
        biases = [w[f"{p}.bias"].expand(n, -1) for p in layers]
        loss_sum = torch.zeros(n)
        for s in range(steps):
            b = s % xs.shape[0]
            x, y = xs[b].flatten(2), ys[b]
            hs, pre = [x], []
            for i, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
                a = torch.baddbmm(bias.unsqueeze(1), hs[-1], weight.transpose(1, 2))
                pre.append(a)
                if i < len(layers) - 1:
                    hs.append(a.relu())
            log_p = torch.log_softmax(pre[-1], -1)
            loss_sum = loss_sum - log_p.gather(2, y.unsqueeze(2)).squeeze(2).mean(1)
            delta = log_p.exp()  # B·δ_L: the 1/B goes into the step size
            delta.scatter_add_(2, y.unsqueeze(2), torch.full(y.unsqueeze(2).shape, -1.0))
            step = -lr / x.shape[1]
            new_w, new_b = [], []
            for i in range(len(layers) - 1, -1, -1):
                # W − η/B · (Bδ)ᵀh in one fused baddbmm; b − η/B · Σ_b Bδ
                new_w.append(torch.baddbmm(weights[i], delta.transpose(1, 2), hs[i], alpha=step))
                new_b.append(torch.add(biases[i], delta.sum(1), alpha=step))
                if i > 0:  # relu's backward: keep δ where the pre-activation was positive
                    back = torch.bmm(delta, weights[i])
                    delta = torch.ops.aten.threshold_backward(back, pre[i - 1], 0.0)
            weights, biases = new_w[::-1], new_b[::-1]
        delta_tree = {}
        for p, weight, bias in zip(layers, weights, biases, strict=True):
            delta_tree[f"{p}.weight"] = weight - w[f"{p}.weight"]
            delta_tree[f"{p}.bias"] = bias - w[f"{p}.bias"]
        return {"delta": delta_tree}, client, {"train_loss": loss_sum / max(steps, 1)}

    return run


class NotCoveredError(Exception):
    """Raised by a fast path for inputs it does not cover; the engine then uses vmap."""
