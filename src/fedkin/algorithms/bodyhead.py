"""Shared body/head split for representation-sharing algorithms (FedRep, FedPer).

Prior: θ_i = (φ, h_i) — a degenerate prior that ties every client's body φ to the population
body and leaves the head h_i free (flat prior). The population is Γ = {"body": φ}; each client
keeps {"head": h_i, "head_opt": optimizer state} for all rounds; the server averages body deltas
through the server optimizer. Subclasses supply only the local solver.

Which parameters are the head: ``head_layers`` names modules of the model (as in
``model.named_modules()``, e.g. ``["net.2"]`` for the default MLP); every parameter whose name is
``<module>.<param>`` belongs to the head. The default (None) is the last ``nn.Linear`` module
in registration order — the classifier of every model in the zoo (``net.<last>`` for the MLP,
``head.3`` for the CNN).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedkin.algorithms.base import Algorithm, ServerStep
from fedkin.core.errors import ConfigError
from fedkin.core.tree import Tree, tree_map


class BodyHeadConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    head_layers: list[str] | None = Field(
        None,
        description="module names (model.named_modules()) whose parameters form the personal "
        "head, a list such as net.2 for the default MLP; None: the last nn.Linear layer",
    )


def head_parameter_names(model: nn.Module, head_layers: list[str] | None) -> list[str]:
    """Names of the model's parameters that belong to the head (see module docstring)."""
    if head_layers is None:
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ConfigError(
                "algorithm.head_layers: the model has no nn.Linear layer to use as the head; "
                "name the head modules explicitly"
            )
        head_layers = [linears[-1]]
    modules = dict(model.named_modules())
    unknown = [h for h in head_layers if h not in modules or h == ""]
    if unknown:
        allowed = ", ".join(n for n in modules if n)
        raise ConfigError(f"algorithm.head_layers: unknown module(s) {unknown}; allowed: {allowed}")
    names = [
        n for n, _ in model.named_parameters() if any(n.startswith(h + ".") for h in head_layers)
    ]
    if not names:
        raise ConfigError(f"algorithm.head_layers: modules {head_layers} have no parameters")
    if len(names) == len(list(model.parameters())):
        raise ConfigError(
            f"algorithm.head_layers: {head_layers} cover every parameter of the model, so there "
            "is no shared body (with model 'logreg' use 'local', or choose 'mlp'/'cnn')"
        )
    return names


def split(params: Tree, head_names: list[str]) -> tuple[Tree, Tree]:
    """(body, head) sub-dicts of a flat parameter dict."""
    body = {k: v for k, v in params.items() if k not in head_names}
    head = {k: v for k, v in params.items() if k in head_names}
    return body, head


def merge(body: Tree, head: Tree) -> Tree:
    return {**body, **head}


class BodyHeadAlgorithm(Algorithm):
    """Base for FedRep/FedPer: population = shared body, client state = personal head."""

    has_global_model = False

    def __init__(self, config, model, client_optimizer, local_steps) -> None:
        super().__init__(config, model, client_optimizer, local_steps)
        self.head_names = head_parameter_names(model, config.head_layers)

    def split(self, params: Tree) -> tuple[Tree, Tree]:
        return split(params, self.head_names)

    def init_population(self, params: Tree) -> Tree:
        body, self._initial_head = self.split(params)  # every client's head starts here
        return {"body": body}

    def init_client(self, population: Tree) -> Tree:
        head = tree_map(lambda t: t.clone(), self._initial_head)
        return {"head": head, "head_opt": self.client_optimizer.init(head)}

    def population_update(self, population: Tree, aggregate: Tree, server: ServerStep) -> Tree:
        """φ ← ServerOpt(φ, −Σ_i p_i Δφ_i); heads never leave the clients."""
        pseudo_grad = tree_map(lambda d: -d, aggregate["delta"])
        return {**population, "body": server("body", population["body"], pseudo_grad)}

    def personal_params(self, population: Tree, client: Tree) -> Tree:
        return merge(population["body"], client["head"])
