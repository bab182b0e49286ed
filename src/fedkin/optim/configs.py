"""Optimizer configs: one pydantic class per registered optimizer, each with ``build()``.

Every config carries the shared options of :class:`BaseOptimizerConfig` (learning rate,
its schedule, gradient clipping) and says what comes between clipping and the learning rate
(:meth:`BaseOptimizerConfig.direction`); ``transform()`` is the whole chain, ``build()`` the
optimizer. ``fedkin list optimizers`` shows them with their options.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from fedkin.optim.alias import adam_transform
from fedkin.optim.optimizer import Optimizer, from_transform
from fedkin.optim.precision import low_precision
from fedkin.optim.schedules import ScheduleConfig
from fedkin.optim.transform import (
    GradientTransformation,
    add_decayed_weights,
    chain,
    clip_by_global_norm,
    label_by_ndim,
    partition,
    scale_by_adam,
    scale_by_learning_rate,
    trace,
)


class BaseOptimizerConfig(BaseModel):
    """Options shared by every optimizer: g → clip → direction → −η_t·(…)."""

    model_config = ConfigDict(extra="forbid")
    #: True if the optimizer needs the loss, not only a gradient: its ``Optimizer`` has a
    #: ``perturbation`` (SAM), so it works only where the local solver takes every step
    sharpness_aware: ClassVar[bool] = False
    lr: float = Field(0.1, gt=0, description="learning rate η (peak value under a schedule)")
    schedule: ScheduleConfig = Field(
        default_factory=ScheduleConfig, description="how η changes with the step count"
    )
    clip_norm: float | None = Field(
        None, gt=0, description="clip the gradient to this global ℓ2 norm first (None: off)"
    )
    precision: Literal["fp32", "bf16-stochastic", "bf16-nearest"] = Field(
        "fp32",
        description="'fp32'; or weights and optimizer state kept in bf16 with updates rounded "
        "stochastically (unbiased) or to nearest (small updates are lost)",
    )
    rounding_seed: int = Field(0, ge=0, description="seed of the stochastic-rounding bits")

    def direction(self) -> GradientTransformation | None:
        """The transformation between clipping and the learning rate (None: identity)."""
        return None

    def transform(self) -> GradientTransformation:
        return chain(
            clip_by_global_norm(self.clip_norm) if self.clip_norm else None,
            self.direction(),
            scale_by_learning_rate(self.schedule.build(self.lr)),
        )

    def build(self) -> Optimizer:
        if self.precision == "fp32":
            return from_transform(self.transform(), self.lr)
        rounding = "stochastic" if self.precision == "bf16-stochastic" else "nearest"
        return low_precision(self.transform(), rounding, self.rounding_seed, self.lr)


class SgdConfig(BaseOptimizerConfig):
    """SGD with heavy-ball momentum and L2 weight decay (torch.optim.SGD)."""

    name: Literal["sgd"] = "sgd"
    momentum: float = Field(0.0, ge=0, lt=1, description="heavy-ball momentum μ")
    nesterov: bool = Field(False, description="Nesterov momentum: u = g + μm")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay λ (added to g)")

    def direction(self) -> GradientTransformation | None:
        if not (self.weight_decay or self.momentum):
            return None
        return chain(add_decayed_weights(self.weight_decay), trace(self.momentum, self.nesterov))


class AdamConfig(BaseOptimizerConfig):
    """Adam (torch.optim.Adam)."""

    name: Literal["adam"] = "adam"
    lr: float = Field(1e-3, gt=0, description="learning rate η (peak value under a schedule)")
    b1: float = Field(0.9, ge=0, lt=1, description="first-moment decay β₁")
    b2: float = Field(0.999, ge=0, lt=1, description="second-moment decay β₂")
    eps: float = Field(1e-8, gt=0, description="denominator ε")

    def direction(self) -> GradientTransformation | None:
        return scale_by_adam(self.b1, self.b2, self.eps)


class AdamWConfig(AdamConfig):
    """AdamW: Adam with decoupled weight decay (torch.optim.AdamW)."""

    name: Literal["adamw"] = "adamw"  # type: ignore[assignment]
    weight_decay: float = Field(0.01, ge=0, description="decoupled weight decay λ")

    def direction(self) -> GradientTransformation | None:
        return chain(super().direction(), add_decayed_weights(self.weight_decay))


class MatrixOptimizerConfig(BaseOptimizerConfig):
    """Base of optimizers for 2-D weights (Muon, SWAN, FRUGAL): their direction on the
    matrices, AdamW on every other parameter (biases, conv kernels), routed by
    :func:`~fedkin.optim.transform.partition`:

        matrices:  u = −η_t·(direction(g) + λθ);    the rest:  AdamW(η_other, λ_other).
    """

    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay λ (2-D weights)")
    other_lr: float = Field(1e-3, gt=0, description="AdamW learning rate of non-2-D parameters")
    other_weight_decay: float = Field(0.0, ge=0, description="AdamW decay of non-2-D parameters")

    @abstractmethod
    def matrix_direction(self) -> GradientTransformation:
        """The direction on 2-D weights (before decay and the learning rate)."""

    def transform(self) -> GradientTransformation:
        matrix = chain(
            self.matrix_direction(),
            add_decayed_weights(self.weight_decay),
            scale_by_learning_rate(self.schedule.build(self.lr)),
        )
        other = adam_transform(
            self.schedule.build(self.other_lr), weight_decay=self.other_weight_decay
        )
        return chain(
            clip_by_global_norm(self.clip_norm) if self.clip_norm else None,
            partition({"matrix": matrix, "other": other}, label_by_ndim()),
        )
