"""MEL: multi-level ensembles that keep serving when edge servers fail (arXiv 2506.20094).

Gudipaty, Hanafy, Ozkara, Liang, Milzman, Shenoy, Diggavi (2025). K upstream models
(*branches*) g_k, each a small zoo network with its own exit head h_k, run on K edge servers;
a downstream *combiner* C on another server maps their concatenated features to the ensemble
prediction through its exit head h_0. All parts are trained at once with one loss

    L = w_0 · E_m[ ℓ(h_0(C(m ⊙ g(x), m)), y) ] + Σ_k w_k · ℓ(h_k(g_k(x)), y)  −  γ · D,

* ℓ is cross-entropy, g(x) = (g_1(x), …, g_K(x)) concatenated, m ∈ {0,1}^K the live branches.
* **Branch feature dropout.** Each branch is dropped independently with probability p; masks
  with no branch left are excluded (nothing could be served), so
  P(m) ∝ Π_k (1−p)^{m_k} p^{1−m_k} over m ≠ 0. The expectation is computed exactly by
  enumerating the 2^K − 1 masks: the expected gradient of sampled dropout without its variance
  and without random draws, so the loss is a pure function that vmaps over clients and gives
  the same numbers in every engine. C also receives the mask bits m, so it knows which
  features are missing rather than guessing from zeros.
* **Diversity** D (off by default, γ = ``diversity``): negative correlation learning (Liu & Yao
  1999) of the exits, D = (1/K) Σ_k mean_batch ‖p_k − p̄‖², p_k = softmax(h_k(g_k(x))),
  p̄ = (1/K) Σ_k p_k. The paper says its loss encourages diversity, but its exact term could
  not be checked, so the explicit term is an option.

**Serving under a failure pattern** F (a set of dead components: 0 is the combiner, k is
branch k), see :meth:`MEL.predict`:

* combiner alive, all branches alive: h_0(C(g(x), 1)) (normal mode);
* combiner alive, some branches dead: h_0(C(m ⊙ g(x), m)) with m the live branches;
* combiner dead: log of the mean of the surviving exits' softmax probabilities (a single
  survivor serves its own logits).

Dead modules are never called. A pattern in which every branch is dead has no answer.

With w_0 = 0 no combiner is built: the loss separates into one term per branch, so the model
is an ensemble of independently trained networks served by averaging (the *independent
ensemble* baseline); with K = 1 it is exactly the branch network.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from fedkin.models.zoo import CnnConfig, MlpConfig, _ModelConfig

Pattern = frozenset[int]
"""Dead components: 0 is the combiner, k ∈ 1..K is branch k."""

BranchConfig = Annotated[MlpConfig | CnnConfig, Field(discriminator="name")]
MAX_BRANCHES = 8  # the dropout expectation enumerates 2^K − 1 masks


def pattern_name(dead: Pattern) -> str:
    """``"none"`` for normal mode, else e.g. ``"combiner+branch2"``."""
    if not dead:
        return "none"
    return "+".join("combiner" if c == 0 else f"branch{c}" for c in sorted(dead))


def dropout_masks(num_branches: int, p: float) -> list[tuple[tuple[bool, ...], float]]:
    """Branch masks m ≠ 0 with P(m) ∝ Π_k (1−p)^{m_k} p^{1−m_k}; masks of probability 0 are
    left out (with p = 0 only the full mask remains)."""
    masks = [m for m in itertools.product((True, False), repeat=num_branches) if any(m)]
    weights = [math.prod((1 - p) if alive else p for alive in m) for m in masks]
    total = sum(weights)
    return [(m, w / total) for m, w in zip(masks, weights, strict=True) if w > 0]


class MEL(nn.Module):
    """K branch networks with exits h_k and an optional combiner C → h_0 (module docstring).

    ``forward(x)`` serves the pattern set by :meth:`serving` (normal mode by default);
    ``forward(x, targets=y)`` returns the training loss L — the convention by which a model
    that ``owns_loss`` gives fedkin's algorithms its own data loss.
    """

    owns_loss: ClassVar[bool] = True

    def __init__(
        self,
        branches: list[nn.Module],
        num_classes: int,
        combiner_hidden: list[int],
        combiner_weight: float,
        branch_weights: list[float],
        branch_dropout: float,
        diversity: float,
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.dims = [b.classifier.in_features for b in branches]
        self.combiner: nn.Sequential | None = None
        if combiner_weight > 0:
            layers: list[nn.Module] = []
            width = sum(self.dims) + len(self.dims)  # features and mask bits
            for h in combiner_hidden:
                layers += [nn.Linear(width, h), nn.ReLU()]
                width = h
            layers.append(nn.Linear(width, num_classes))
            self.combiner = nn.Sequential(*layers)
        self.combiner_weight = combiner_weight
        self.branch_weights = list(branch_weights)
        self.masks = dropout_masks(len(branches), branch_dropout)
        self.diversity = diversity
        self.dead: Pattern = frozenset()

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    def failure_patterns(self) -> list[Pattern]:
        """Every pattern with an answer (at least one live branch), normal mode first."""
        components = range(0 if self.combiner is not None else 1, self.num_branches + 1)
        out = []
        for r in range(self.num_branches + 1):
            for dead in itertools.combinations(components, r):
                if any(k not in dead for k in range(1, self.num_branches + 1)):
                    out.append(frozenset(dead))
        return out

    @contextmanager
    def serving(self, dead: Pattern) -> Iterator[MEL]:
        """Make ``forward(x)`` serve failure pattern ``dead`` inside the ``with`` block."""
        previous, self.dead = self.dead, self._check(dead)
        try:
            yield self
        finally:
            self.dead = previous

    def _check(self, dead: Pattern) -> Pattern:
        dead = frozenset(dead)
        valid = set(range(1, self.num_branches + 1)) | ({0} if self.combiner is not None else set())
        if not dead <= valid:
            raise ValueError(f"failure pattern {sorted(dead)}: components are {sorted(valid)}")
        if all(k in dead for k in range(1, self.num_branches + 1)):
            raise ValueError(f"failure pattern {pattern_name(dead)}: no branch is left to answer")
        return dead

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is not None:
            return self.loss(x, targets)
        return self.predict(x, self.dead)

    def predict(self, x: torch.Tensor, dead: Pattern = frozenset()) -> torch.Tensor:
        """Logits (or log-probabilities) served under failure pattern ``dead``."""
        dead = self._check(dead)
        feats = {k: b.embed(x) for k, b in enumerate(self.branches) if k + 1 not in dead}
        if self.combiner is not None and 0 not in dead:
            return self._combine(feats, x)
        logits = [self.branches[k].classifier(f) for k, f in feats.items()]
        if len(logits) == 1:
            return logits[0]
        logp = torch.stack([F.log_softmax(z, -1) for z in logits])
        return torch.logsumexp(logp, 0) - math.log(len(logits))

    def _combine(self, feats: dict[int, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """h_0(C(m ⊙ g(x), m)) for the live branches ``feats`` (missing ones are zeros)."""
        batch = x.shape[0]
        mask = [k in feats for k in range(self.num_branches)]
        parts = [feats[k] if k in feats else x.new_zeros(batch, d) for k, d in enumerate(self.dims)]
        parts.append(x.new_tensor(mask, dtype=x.dtype).expand(batch, -1))
        return self.combiner(torch.cat(parts, -1))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """L = w_0 · E_m[ℓ(h_0(C(m ⊙ g, m)))] + Σ_k w_k ℓ(h_k(g_k)) − γ·D (module docstring)."""
        feats = [b.embed(x) for b in self.branches]
        exits = [b.classifier(f) for b, f in zip(self.branches, feats, strict=True)]
        total = sum(
            w * F.cross_entropy(z, y) for w, z in zip(self.branch_weights, exits, strict=True)
        )
        if self.combiner is not None:
            total = total + self.combiner_weight * sum(
                prob * F.cross_entropy(self._combine(self._live(feats, m), x), y)
                for m, prob in self.masks
            )
        if self.diversity > 0 and self.num_branches > 1:
            p = torch.stack([F.softmax(z, -1) for z in exits])
            spread = (p - p.mean(0)).pow(2).sum(-1).mean()
            total = total - self.diversity * spread
        return total

    @staticmethod
    def _live(feats: list[torch.Tensor], mask: tuple[bool, ...]) -> dict[int, torch.Tensor]:
        return {k: f for k, f in enumerate(feats) if mask[k]}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class MelConfig(_ModelConfig):
    """MEL multi-level ensemble: K branch networks with exits plus a combiner, one loss.

    See ``fedkin.models.mel`` for the loss and the serving rule of each failure pattern."""

    name: Literal["mel"] = "mel"
    branches: list[BranchConfig] = Field(
        default_factory=lambda: [MlpConfig(hidden=[32]), MlpConfig(hidden=[32])],
        min_length=1,
        max_length=MAX_BRANCHES,
        description="the K upstream models g_k with exits h_k, each an mlp (at least one hidden "
        "layer) or cnn config; its last layer is the exit, the layer before feeds the combiner",
    )
    combiner_hidden: list[Annotated[int, Field(gt=0)]] = Field(
        [32], description="widths of the combination layers C before the exit h_0 ([]: linear)"
    )
    combiner_weight: float = Field(
        1.0, ge=0, description="w_0, weight of the combiner's loss (0: no combiner is built)"
    )
    branch_weights: list[Annotated[float, Field(ge=0)]] | None = Field(
        None, description="w_k, weight of each branch exit's loss (None: 1 for every branch)"
    )
    branch_dropout: float = Field(
        0.25, ge=0, lt=1, description="p, probability of dropping each branch's features for C"
    )
    diversity: float = Field(
        0.0, ge=0, description="γ, weight of the negative-correlation diversity bonus (0: off)"
    )
    size_ratio: float | None = Field(
        None,
        gt=0,
        description="if set, all widths (branches and combiner) are scaled by one factor so the "
        "ensemble has size_ratio × the parameters of `reference`",
    )
    reference: BranchConfig | None = Field(
        None, description="the original model that size_ratio is relative to (mlp or cnn)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> MelConfig:
        if self.branch_weights is not None and len(self.branch_weights) != len(self.branches):
            raise ValueError(
                f"model.branch_weights has {len(self.branch_weights)} entries for "
                f"{len(self.branches)} branches; give one per branch or None"
            )
        for i, b in enumerate(self.branches):
            if isinstance(b, MlpConfig) and not b.hidden:
                raise ValueError(
                    f"model.branches.{i}.hidden: an mlp branch needs at least one hidden layer "
                    "(its features feed the combiner)"
                )
        if (self.size_ratio is None) != (self.reference is None):
            raise ValueError("model.size_ratio and model.reference must be set together")
        return self

    def scaled(self, factor: float) -> MelConfig:
        """This config with every width multiplied by ``factor`` (rounded, at least 1)."""

        def s(widths: list[int]) -> list[int]:
            return [max(1, round(w * factor)) for w in widths]

        branches = [
            b.model_copy(update={"hidden": s(b.hidden)})
            if isinstance(b, MlpConfig)
            else b.model_copy(update={"channels": s(b.channels), "hidden": s([b.hidden])[0]})
            for b in self.branches
        ]
        return self.model_copy(
            update={"branches": branches, "combiner_hidden": s(self.combiner_hidden)}
        )

    def resolved(self, feature_shape: tuple[int, ...], image_shape, num_classes: int) -> MelConfig:
        """The explicit-width config: with ``size_ratio`` set, the scaled widths whose parameter
        count is closest to size_ratio × |reference| (bisection on the common factor)."""
        if self.size_ratio is None:
            return self

        def count(cfg) -> int:
            with torch.device("meta"):
                return count_parameters(cfg.build(feature_shape, image_shape, num_classes))

        target = self.size_ratio * count(self.reference)
        plain = self.model_copy(update={"size_ratio": None, "reference": None})
        lo, hi = 0.0, 1.0
        while count(plain.scaled(hi)) < target:
            lo, hi = hi, 2 * hi
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if count(plain.scaled(mid)) < target else (lo, mid)
        candidates = [plain.scaled(f) for f in (lo, hi) if f > 0]
        return min(candidates, key=lambda c: abs(count(c) - target))

    def build(self, feature_shape: tuple[int, ...], image_shape, num_classes: int) -> MEL:
        cfg = self.resolved(feature_shape, image_shape, num_classes)
        branches = [b.build(feature_shape, image_shape, num_classes) for b in cfg.branches]
        weights = cfg.branch_weights or [1.0] * len(branches)
        return MEL(
            branches,
            num_classes,
            list(cfg.combiner_hidden),
            cfg.combiner_weight,
            weights,
            cfg.branch_dropout,
            cfg.diversity,
        )
