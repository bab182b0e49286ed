"""The algorithm interface: a prior, a local solver and a population update.

In the generative view, population parameters Γ generate client parameters θ_i ~ p(θ | Γ),
which generate data D_i ~ p(D | θ_i). A client solves the MAP problem

    min_θ  L_i(θ; D_i) + R(θ; Γ),        R = −log p(θ | Γ)  (scaled),

and the server re-estimates Γ from what clients send. An :class:`Algorithm` is exactly these
pieces, written as pure functions of trees of tensors so the engine can ``vmap`` them over a
cohort (or call them one client at a time):

* ``init_population(params) -> Γ``               the population state (e.g. ``{"global": w}``)
* ``init_client(Γ) -> s_i``                      persistent per-client state (personal model, …)
* ``client_update(Γ, s_i, batches, ctx) -> (message, s_i', metrics)``   the local solver
* ``population_update(Γ, aggregate, server) -> Γ'``                      the population update
* ``personal_params(Γ, s_i) -> θ_i``              the model client i uses for its own predictions

Messages travel through the channel (non-finite rejection, clipping, compression, noise,
aggregation) before ``population_update`` sees their aggregate. Algorithms never touch
threads, files or networks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, NamedTuple

import torch
from pydantic import BaseModel
from torch import nn
from torch.func import functional_call, grad, vmap

from fedkin.core.priors import gaussian_penalty
from fedkin.core.rng import Stream
from fedkin.core.tasks import CLASSIFICATION, DIFFUSION, RECONSTRUCTION, Task
from fedkin.core.tree import Tree, tree_map, tree_sub
from fedkin.optim import Optimizer
from fedkin.optim.optimizer import working
from fedkin.optim.transform import (
    GradientTransformation,
    apply_updates,
    differentially_private_aggregate,
)
from fedkin.optim.zeroth import mutable
from fedkin.privacy.config import DpSgdConfig

#: ``ctx["phase"]`` of local solves other than training (which passes none: phase 0): at
#: evaluation a held-out client's first ``client_update`` and ``adapt``. With the round and
#: client id it keeps the noise of every solve distinct.
PHASE_EVAL_INIT, PHASE_EVAL_ADAPT = 1, 2


class LocalSolve(NamedTuple):
    """What :meth:`Algorithm.local_solve` returns."""

    params: Tree
    state: Tree
    #: mean data loss over the steps
    loss: torch.Tensor
    #: ``[S]`` float: DP-SGD gradients computed on each of the S batches (zeros without DP-SGD);
    #: a function of the config only, summed over a ``client_update``'s solves into its
    #: ``dp_steps`` metric (:meth:`Algorithm.with_dp_steps`) for the example-level accountant
    dp_steps: torch.Tensor


class ServerStep:
    """Applies the server optimizer to population parameters with a pseudo-gradient (FedOpt).

    With SGD(lr=1, momentum=0) and pseudo-gradient −Δ̄ this is plain FedAvg: w ← w + Δ̄.
    The optimizer state lives in ``state`` and is checkpointed with the run.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        self.state: dict[str, Tree] = {}

    def __call__(self, key: str, params: Tree, pseudo_grad: Tree) -> Tree:
        state = self.state.get(key)
        if state is None:
            state = self.optimizer.init(params)
        new, self.state[key] = self.optimizer.step(pseudo_grad, state, params)
        return new


class Algorithm(ABC):
    """Base class; subclasses set ``name``, ``Config`` and override the pieces they change."""

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]
    #: False for algorithms without a population model (Local): global metrics are skipped.
    has_global_model: ClassVar[bool] = True
    #: True if clients may hold personal models of different architectures (``client_models``):
    #: the engine then runs one vectorized group per architecture. Requires that messages do
    #: not depend on the personal architecture.
    supports_model_groups: ClassVar[bool] = False
    #: True if, with ``client_models``, every group must keep the global architecture (the prior
    #: compares personal and global parameters, e.g. QuPeL); groups then differ in precision only.
    personal_shape_is_global: ClassVar[bool] = False
    #: Names of scalar metrics from ``client_update`` to log per client id (e.g. AdaPeD's ψ);
    #: every metric is also logged as its mean over the cohort's accepted clients.
    per_client_metrics: ClassVar[tuple[str, ...]] = ()
    #: True if every gradient on client data goes through :meth:`local_solve` with ``ctx``, so
    #: example-level DP-SGD (``privacy.dp_sgd``) covers the whole local computation.
    supports_dp_sgd: ClassVar[bool] = False
    #: True if every step of the client optimizer is a :meth:`local_solve` step, so a
    #: zeroth-order client optimizer (which steps on SPSA estimates of the objective, not on
    #: gradients) can run it.
    supports_zeroth_order: ClassVar[bool] = False
    #: What the model's output is scored against: the training loss of :meth:`data_loss` and
    #: the evaluation metrics (:mod:`fedkin.core.tasks`; reconstruction for ADEPT). A model
    #: with ``reconstructs = True`` (linear AE, PCA) makes any algorithm's instance use
    #: reconstruction, so Local and FedAvg train and evaluate it too; one with ``denoises =
    #: True`` (the DDPM) makes it use the diffusion task.
    task: Task = CLASSIFICATION
    #: True if the message's ``"delta"`` is one model delta per client, so a robust rule
    #: (``channel.aggregator``) may combine clients coordinate by coordinate; False when it is
    #: masked per cluster (IFCA). Other message keys are always averaged by weight.
    robust_delta: ClassVar[bool] = True

    def __init__(
        self, config: BaseModel, model: nn.Module, client_optimizer: Optimizer, local_steps: int
    ) -> None:
        self.config = config
        self.model = model
        #: the population model's architecture; differs from ``model`` (the personal one) only in
        #: a ``client_models`` group whose personal architecture is not ``model``
        self.global_model = model
        self.client_optimizer = client_optimizer
        self.local_steps = local_steps
        self.dp_sgd: DpSgdConfig | None = None  # see enable_dp_sgd
        if getattr(model, "reconstructs", False):
            self.task = RECONSTRUCTION
        if getattr(model, "denoises", False):
            self.task = DIFFUSION

    def enable_dp_sgd(self, config: DpSgdConfig, seed: int, batch_size: int) -> None:
        """Make every :meth:`local_solve` step an example-level DP-SGD step on Poisson batches
        of expected size ``batch_size`` (see :meth:`dp_aggregate`)."""
        self.dp_sgd = config
        self.dp_batch_size = batch_size
        self.dp_stream = Stream(seed).child("dp-sgd")

    # ----- the model as a function -------------------------------------------------------
    def initial_params(self) -> Tree:
        """This instance's model parameters at initialization (its group's architecture)."""
        return {k: v.detach().clone() for k, v in self.model.named_parameters()}

    def initial_global_params(self) -> Tree:
        """The population model's parameters at initialization."""
        return {k: v.detach().clone() for k, v in self.global_model.named_parameters()}

    def logits(self, params: Tree, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, params, (x,))

    def global_logits(self, params: Tree, x: torch.Tensor) -> torch.Tensor:
        """Logits of the population model (``global_model``'s architecture)."""
        return functional_call(self.global_model, params, (x,))

    @staticmethod
    def own_loss(model: nn.Module, params: Tree, x: torch.Tensor, y: torch.Tensor):
        """The training loss of a model that ``owns_loss`` (``model(x, targets=y)``, e.g. MEL's
        multi-exit loss; its ``model(x)`` still gives the logits that :meth:`logits` serves);
        None for every other model."""
        if not getattr(model, "owns_loss", False):
            return None
        return functional_call(model, params, (x,), {"targets": y})

    def data_loss(self, params: Tree, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """L_i(θ; batch): the task's loss (mean cross-entropy −log p(y | x, θ) by default), or
        the model's own loss."""
        own = self.own_loss(self.model, params, x, y)
        return self.task.loss(self.logits(params, x), x, y) if own is None else own

    def logits_loss(
        self,
        logits: torch.Tensor,
        params: Tree,
        x: torch.Tensor,
        y: torch.Tensor,
        model: nn.Module | None = None,
    ) -> torch.Tensor:
        """:meth:`data_loss` for objectives that already computed ``logits = model(x)`` (for a
        distillation term): the task's loss of those logits, or the model's own loss."""
        own = self.own_loss(self.model if model is None else model, params, x, y)
        return self.task.loss(logits, x, y) if own is None else own

    # ----- shared local solver -------------------------------------------------------------
    def local_solve(
        self,
        params: Tree,
        objective: Any,
        batches: tuple[torch.Tensor, ...],
        optimizer: Optimizer | None = None,
        opt_state: Tree | None = None,
        steps: int | None = None,
        ctx: Tree | None = None,
        noise_tag: int = 0,
        batch: int | None = None,
    ) -> LocalSolve:
        """Run ``steps`` optimizer steps on ``objective(params, x, y) -> (total, data_loss)``.

        ``batches`` are ``(xs [S, B, …], ys [S, B])``; step s uses batch ``s mod S`` (every
        step uses batch ``batch`` if given).
        Returns the new parameters, the optimizer state, the mean data loss over steps and the
        DP-SGD gradients computed on each batch (:class:`LocalSolve`).
        A sharpness-aware optimizer (``optimizer.perturbation``, :mod:`fedkin.optim.sam`) steps
        with a second gradient on the same batch, at θ + ε(g, θ).
        With a zeroth-order optimizer (``optimizer.estimator``) each step's "gradient" is its
        SPSA estimate of the objective's total from forward passes
        (:class:`~fedkin.optim.zeroth.ZerothOrder`; directions keyed by ``ctx``, ``noise_tag``
        and the step); outside ``vmap`` the solve works on its own copy of ``params``, which
        the estimator perturbs in place.
        An optimizer with a ``dtype`` (bf16, :mod:`fedkin.optim.precision`) gets the weights and
        inputs in it for every step; the result is returned in the received dtype.
        With DP-SGD on, ``batches`` are Poisson batches ``(xs, ys, masks)`` (see
        :meth:`~fedkin.data.federated.FederatedDataset.sample_poisson_batches`) and each step's
        gradient is the clip-and-noise transformation (:meth:`dp_aggregate`, its state the
        step count t that keys the noise) of the step's per-example gradients
        (:meth:`per_example_grads`); ``ctx`` (client id, round, phase) and ``noise_tag``
        (distinct per call within one ``client_update`` or ``adapt``) key the noise.
        """
        optimizer = optimizer or self.client_optimizer
        received = params
        params, batches = working(optimizer, params), (working(optimizer, batches[0]), *batches[1:])
        if self.dp_sgd is not None and optimizer.perturbation is not None:
            raise RuntimeError("DP-SGD with a sharpness-aware optimizer (sam, asam): unsupported")
        state = optimizer.init(params) if opt_state is None else opt_state
        steps = self.local_steps if steps is None else steps
        if self.dp_sgd is not None and len(batches) != 3:
            raise RuntimeError("DP-SGD needs Poisson batches (xs, ys, masks)")
        zo = optimizer.estimator
        if zo is not None and self.dp_sgd is not None:
            raise RuntimeError("DP-SGD with a zeroth-order optimizer: unsupported")
        if zo is not None and mutable():
            params = tree_map(lambda t: t.clone(memory_format=torch.contiguous_format), params)
        where = () if ctx is None else (ctx["round"], ctx["client_id"], ctx.get("phase", 0))
        num_batches, device = batches[0].shape[0], batches[0].device
        dp_steps = torch.zeros(num_batches, device=device)
        if self.dp_sgd is not None:
            aggregate = self.dp_aggregate(ctx, noise_tag)
            dp_state = aggregate.init(params)
        loss_sum = torch.zeros((), device=device)
        for s in range(steps):
            b = s % num_batches if batch is None else batch
            if self.dp_sgd is None:
                key = None if zo is None else zo.key(*where, noise_tag, s)
                x, y = batches[0][b], batches[1][b]
                g, data_loss = self.local_gradient(objective, params, optimizer, x, y, key)
            else:
                x, y, mask = (t[b] for t in batches)
                per_example, data_loss = self.per_example_grads(objective, params, x, y, mask)
                g, dp_state = aggregate.update(per_example, dp_state, params)
                dp_steps = dp_steps + (torch.arange(num_batches, device=device) == b)
            params, state = optimizer.step(g, state, params)
            loss_sum = loss_sum + data_loss.detach()
        if optimizer.dtype is not None:
            params = tree_map(lambda new, old: new.to(old.dtype), params, received)
        return LocalSolve(params, state, loss_sum / max(steps, 1), dp_steps)

    def with_dp_steps(self, metrics: Tree, *dp_steps: torch.Tensor) -> Tree:
        """``metrics`` of a ``client_update`` plus, under DP-SGD, ``dp_steps``: the sum of its
        solves' :attr:`LocalSolve.dp_steps` (``[S]``, the DP-SGD gradients it computed on each
        of its batches). The experiment's example-level accountant reads it
        (:meth:`fedkin.experiment.Experiment.count_dp_steps`); it depends on the config only."""
        if self.dp_sgd is None:
            return metrics
        return {**metrics, "dp_steps": sum(dp_steps[1:], dp_steps[0])}

    @staticmethod
    def local_gradient(
        objective: Any,
        params: Tree,
        optimizer: Optimizer,
        x: torch.Tensor,
        y: torch.Tensor,
        key: torch.Tensor | None = None,
    ) -> tuple[Any, torch.Tensor]:
        """What one :meth:`local_solve` step (without DP-SGD) hands ``optimizer.step``, and the
        data loss: the gradient of ``objective`` at θ (sharpness-aware optimizers: at
        θ + ε(g, θ), a second gradient on the same batch), or for a zeroth-order optimizer its
        SPSA estimate with directions named by ``key``."""
        if optimizer.estimator is not None:
            return optimizer.estimator.estimate(lambda p: objective(p, x, y), params, key)
        grad_fn = grad(objective, has_aux=True)
        g, data_loss = grad_fn(params, x, y)
        if optimizer.perturbation is not None:  # SAM: the gradient at θ + ε(g, θ)
            g, _ = grad_fn(apply_updates(params, optimizer.perturbation(g, params)), x, y)
        return g, data_loss

    @staticmethod
    def per_example_grads(
        objective: Any, params: Tree, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
    ) -> tuple[Tree, torch.Tensor]:
        """Per-example gradients ∇ℓ_j of ``objective`` on a Poisson batch (every leaf gets a
        leading example dimension; padded slots, mask False, are exact zeros) and the mean data
        loss over the taken examples. They come from ``vmap`` over the batch slots, nested
        inside the cohort's ``vmap``."""
        per_example = vmap(
            grad(lambda p, xi, yi: objective(p, xi[None], yi[None]), has_aux=True),
            in_dims=(None, 0, 0),
        )
        g, losses = per_example(params, x, y)
        taken = mask.to(losses.dtype)
        g = tree_map(lambda t: t * taken.reshape(-1, *([1] * (t.dim() - 1))).to(t.dtype), g)
        return g, (losses * taken).sum() / taken.sum().clamp(min=1)

    def dp_aggregate(self, ctx: Tree | None, noise_tag: int) -> GradientTransformation:
        """DP-SGD's clip-and-noise (Abadi et al. 2016) for one solve, as the transformation
        :func:`~fedkin.optim.transform.differentially_private_aggregate` of per-example
        gradients on a Poisson batch:

            g = ( Σ_{j: mask_j} clip_C(∇ℓ_j) + N(0, σ²C² I) ) / (q·n),   q = min(1, B/n),

        where the batch took each of the client's n examples independently with probability q
        and q·n = min(B, n) is its *expected* size (a data-independent denominator, as in
        Opacus), so one example changes the noised sum by at most C: exactly the
        Poisson-subsampled Gaussian mechanism the accountant composes. Noise is counter-based in
        (round, client, phase, noise_tag, t, leaf, element), t the transformation's step count
        (its state); ``ctx["phase"]`` (0 if absent: training) separates training from
        evaluation-time solves of the same round.
        """
        if ctx is None:
            raise RuntimeError(f"{type(self).__name__} must pass ctx to local_solve for DP-SGD")
        cfg = self.dp_sgd
        phase = ctx.get("phase", 0)

        def noise(count: torch.Tensor, leaf: int, numel: int) -> torch.Tensor:
            keys = (ctx["round"], ctx["client_id"], phase, noise_tag, count, leaf)
            return self.dp_stream.normal(*keys, torch.arange(numel, device=count.device))

        return differentially_private_aggregate(
            cfg.clip,
            cfg.noise_multiplier,
            ctx["num_samples"].clamp(max=self.dp_batch_size),
            noise,
        )

    def gaussian_objective(self, center: Tree, lam: float):
        """Objective with the Gaussian prior θ ~ N(center, λ⁻¹I): (L_i + λ/2‖θ − center‖², L_i)."""

        def objective(params: Tree, x: torch.Tensor, y: torch.Tensor):
            loss = self.data_loss(params, x, y)
            return loss + gaussian_penalty(params, center, lam), loss

        return objective

    def plain_objective(self, params: Tree, x: torch.Tensor, y: torch.Tensor):
        """Objective without a prior: (L_i, L_i)."""
        loss = self.data_loss(params, x, y)
        return loss, loss

    # ----- the three pieces ----------------------------------------------------------------
    def init_population(self, params: Tree) -> Tree:
        return {"global": params}

    def init_client(self, population: Tree) -> Tree:
        return {}

    @abstractmethod
    def client_update(
        self, population: Tree, client: Tree, batches: tuple[torch.Tensor, torch.Tensor], ctx: Tree
    ) -> tuple[Tree, Tree, Tree]:
        """The local solver: (message to the channel, new client state, scalar metrics)."""

    def population_update(self, population: Tree, aggregate: Tree, server: ServerStep) -> Tree:
        """Default: w ← ServerOpt(w, pseudo-gradient −Δ̄) for the averaged model delta Δ̄."""
        return self.server_step(population, aggregate, server)

    @staticmethod
    def server_step(
        population: Tree, aggregate: Tree, server: ServerStep, scale: float = 1.0
    ) -> Tree:
        """w ← ServerOpt(w, −scale·Δ̄); the population unchanged if no delta was aggregated."""
        if "delta" not in aggregate:
            return population
        pseudo_grad = tree_map(lambda d: -scale * d, aggregate["delta"])
        return {**population, "global": server("global", population["global"], pseudo_grad)}

    def personal_params(self, population: Tree, client: Tree) -> Tree:
        return population["global"]

    def adapt(self, population: Tree, client: Tree, batches, ctx: Tree) -> Tree:
        """Evaluation-time personalization s_i' = A_i(Γ, s_i; D_i) (pure, vmappable).

        Algorithms whose personal model is a function of the *current* population and the
        client's own data (FedAvg-FT: T fine-tuning steps; Per-FedAvg: α-steps) override this;
        evaluation then maps it over clients before ``personal_params``. Default: no change.
        """
        return client

    # ----- helpers shared by subclasses ---------------------------------------------------
    @staticmethod
    def delta_message(new_params: Tree, old_params: Tree) -> Tree:
        return {"delta": tree_sub(new_params, old_params)}
