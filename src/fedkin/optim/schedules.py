"""Step-size schedules η(t): functions of a 0-d step-count tensor, so they vmap.

A schedule is called with the count t of updates taken so far (an ``int64`` 0-d tensor, 0 at
the first update) and returns η_t as a 0-d float tensor; only tensor ops are used, so the count
may be batched over clients. :class:`ScheduleConfig` is the config form every optimizer config
carries (``client.optimizer.schedule``).

Note: most algorithms re-initialize the client optimizer's state every round, so a client
schedule's t restarts each round (it counts local steps); the server optimizer's state persists,
so its t counts rounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

Schedule = Callable[[torch.Tensor], torch.Tensor]


def constant_schedule(value: float) -> Schedule:
    """η_t = η."""
    return lambda t: torch.full((), value, dtype=torch.float32, device=t.device)


def linear_schedule(init: float, end: float, steps: int) -> Schedule:
    """η_t = init + (end − init)·min(t, T)/T."""
    return lambda t: init + (end - init) * t.clamp(max=steps).to(torch.float32) / max(steps, 1)


def cosine_decay_schedule(init: float, steps: int, alpha: float = 0.0) -> Schedule:
    """η_t = init·((1 − α)·½(1 + cos(π·min(t, T)/T)) + α)."""

    def schedule(t: torch.Tensor) -> torch.Tensor:
        frac = t.clamp(max=steps).to(torch.float32) / max(steps, 1)
        return init * ((1 - alpha) * 0.5 * (1 + torch.cos(math.pi * frac)) + alpha)

    return schedule


def warmup_cosine_decay_schedule(
    peak: float, warmup_steps: int, decay_steps: int, alpha: float = 0.0
) -> Schedule:
    """Linear warmup 0 → peak over W steps, then cosine decay to α·peak over the next D."""
    warm = linear_schedule(0.0, peak, warmup_steps)
    cos = cosine_decay_schedule(peak, decay_steps, alpha)
    return lambda t: torch.where(t < warmup_steps, warm(t), cos((t - warmup_steps).clamp(min=0)))


class ScheduleConfig(BaseModel):
    """How the learning rate η changes with the optimizer's step count t."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["constant", "cosine", "linear"] = Field(
        "constant",
        description="'constant': η; 'cosine': linear warmup over warmup_steps then cosine decay "
        "to final_fraction·η over decay_steps; 'linear': η → final_fraction·η linearly over "
        "decay_steps",
    )
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps (kind 'cosine')")
    decay_steps: int = Field(100, ge=1, description="steps of decay (kinds 'cosine', 'linear')")
    final_fraction: float = Field(
        0.0, ge=0, le=1, description="η at the end of the decay as a fraction of η"
    )

    def build(self, lr: float) -> float | Schedule:
        """The schedule for peak learning rate ``lr`` (a plain float if constant)."""
        if self.kind == "constant":
            return lr
        if self.kind == "linear":
            return linear_schedule(lr, lr * self.final_fraction, self.decay_steps)
        return warmup_cosine_decay_schedule(
            lr, self.warmup_steps, self.decay_steps, self.final_fraction
        )
