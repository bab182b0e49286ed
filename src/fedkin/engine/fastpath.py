"""A hand-batched local solve for the commonest workloads: FedAvg on the zoo MLP or CNN
with plain SGD.

Under ``vmap(grad(...))`` every local step pays functorch's per-operator batching and the
autograd engine's bookkeeping on top of the arithmetic, and for a convolution with per-client
weights functorch's batching rule of the backward does about half as much arithmetic again
as the per-client backward (benchmarks/results/throughput.md). For FedAvg's local solve with
the classification task (mean cross-entropy) and plain SGD, the gradients are short enough to
write out for the whole cohort at once (:mod:`fedkin.engine.batched_layers`: the client is the
batch dimension of ``bmm`` for linear layers and the group of a grouped convolution for
convolutions). For client ``i``, step ``s``, batch ``x`` of ``B`` rows and the model's layers
``f_l(·; θ_l)``, ``l = 1..L`` (``h_0 = x``):

    h_l = f_l(h_{l−1}; θ_l),   z = h_L
    ℓ = (1/B) Σ_b [logsumexp(z_b) − z_{b, y_b}],   δ_L = (softmax(z) − onehot(y)) / B
    ∇θ_l = (∂h_l/∂θ_l)ᵀ δ_l,   δ_{l−1} = (∂h_l/∂h_{l−1})ᵀ δ_l   (not below the first θ)
    θ_l ← θ_l − η ∇θ_l

— for a linear layer ``∇W_l = δ_lᵀ h_{l−1}``, ``∇b_l = Σ_b δ_l``, ``δ_{l−1} = δ_l W_l``; for
ReLU ``δ_{l−1} = δ_l ⊙ 1[h_l > 0]`` — and the message is ``Δ_i = θ_i − w``, the metric the
mean of ``ℓ`` over steps: the outputs of
:meth:`FedAvg.client_update <fedkin.algorithms.fedavg.FedAvg.client_update>`, equal to the
vmap path's up to float reassociation (tested).

It applies only when all of these hold, and the engine falls back to ``vmap`` otherwise (its
``last_path`` says which ran): the algorithm is exactly FedAvg, without DP-SGD, on the
classification task; the model is the zoo ``MLP`` or ``CNN`` built from layers
:func:`~fedkin.engine.batched_layers.batched_layer` covers (and the population model the same
module); the client optimizer is plain SGD — checked by its behaviour: ``init`` gives an empty
state (no momentum, no step count for a schedule) and one step on a probe is exactly
``θ − η g`` (no weight decay, no clipping), and it is neither sharpness-aware nor zeroth-order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fedkin.core.tree import tree_leaves
from fedkin.engine.batched_layers import ClientFlatten, ClientImages, Layer, batched_layer

#: CNN activations in channels-last memory (NHWC): the grouped convolutions run much faster
#: so on this CPU (see benchmarks/results/throughput.md, CNN fast path)
CHANNELS_LAST = True


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


def _layers(model: torch.nn.Module) -> list[Layer] | None:
    """The batched layers of the zoo MLP or CNN (:mod:`fedkin.engine.batched_layers`), or None
    for another model or a layer they do not cover."""
    from fedkin.models.zoo import CNN, MLP

    if type(model) is MLP:
        layers: list[Layer] = [ClientFlatten()]
        blocks = [("net", model.net)]
    elif type(model) is CNN:
        layers = [ClientImages(tuple(model.image_shape), CHANNELS_LAST)]
        blocks = [("features", model.features), ("head", model.head)]
    else:
        return None
    for name, block in blocks:
        for i, module in enumerate(block):
            layer = batched_layer(module, f"{name}.{i}")
            if layer is None:
                return None
            layers.append(layer)
    covered = {k for layer in layers for k in layer.names}
    return layers if covered == {k for k, _ in model.named_parameters()} else None


def sgd_step(
    layers: tuple[Layer, ...],
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One plain-SGD step of every client on its mean cross-entropy: the new parameters
    (client dimension leading) and each client's loss ``[n]`` before the step."""
    n = x.shape[0]
    h, saved = x, []
    for layer in layers:
        h, kept = layer.forward(h, tuple(params[k] for k in layer.names), n)
        saved.append(kept)
    log_p = torch.log_softmax(h, -1)  # [n, B, K]
    loss = -log_p.gather(2, y.unsqueeze(2)).squeeze(2).mean(1)
    delta = log_p.exp()  # B·δ_L: the 1/B goes into the step size
    minus_one = torch.full(y.unsqueeze(2).shape, -1.0, dtype=delta.dtype, device=delta.device)
    delta.scatter_add_(2, y.unsqueeze(2), minus_one)
    first = next(i for i, layer in enumerate(layers) if layer.names)  # no δ below it
    new = dict(params)
    for i in range(len(layers) - 1, first - 1, -1):
        layer = layers[i]
        p = tuple(params[k] for k in layer.names)
        delta, updated = layer.backward(delta, saved[i], p, lr / y.shape[1], i > first)
        new.update(zip(layer.names, updated, strict=True))
    return new, loss


@dataclass(frozen=True)
class FastSolve:
    """FedAvg's ``client_update`` for a whole cohort through :func:`sgd_step`; ``model`` names
    the covered model (``mlp`` or ``cnn``)."""

    model: str
    layers: tuple[Layer, ...]
    lr: float
    steps: int
    in_dims: tuple[int | None, ...]

    def __call__(self, population: dict, client: Any, batches: tuple, ctx: Any) -> tuple:
        if len(batches) != 2 or (self.in_dims[1] is None and tree_leaves(client)):
            raise NotCoveredError
        xs, ys = batches
        n = xs.shape[1]
        w = population["global"]
        params = {k: v.expand(n, *v.shape) for k, v in w.items()}
        loss_sum = torch.zeros(n, device=xs.device)
        for s in range(self.steps):
            b = s % xs.shape[0]
            params, loss = sgd_step(self.layers, params, xs[b], ys[b], self.lr)
            loss_sum = loss_sum + loss
        delta = {k: params[k] - v for k, v in w.items()}
        return {"delta": delta}, client, {"train_loss": loss_sum / max(self.steps, 1)}


def fast_client_update(fn: Callable[..., Any], in_dims: tuple[int | None, ...]) -> FastSolve | None:
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
    layers = _layers(algorithm.model)
    if layers is None:
        return None
    model = type(algorithm.model).__name__.lower()
    lr = float(algorithm.client_optimizer.lr)
    return FastSolve(model, tuple(layers), lr, algorithm.local_steps, tuple(in_dims))


class NotCoveredError(Exception):
    """Raised by a fast path for inputs it does not cover; the engine then uses vmap."""
