"""What QuPeL and QuPeD share: a quantized personal model (x_i, c_i) trained by alternating
proximal steps (``core/quantize.py``), its configuration, and its deployable form Q_{c_i}(x_i).

Client state: full-precision weights x_i, per-layer sorted centers c_i (none for a
full-precision group), and the weight optimizer's state. The personal model a client uses (and
is evaluated with) is the hard-quantized Q_{c_i}(x_i), the model it would deploy.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedkin.algorithms.base import Algorithm
from fedkin.core import quantize as qz
from fedkin.core.tree import Tree
from fedkin.optim import Optimizer


class QuantizedConfig(BaseModel):
    """Quantization-aware training of the personal models (shared by qupel and quped)."""

    model_config = ConfigDict(extra="forbid")
    centers: int | None = Field(
        4,
        ge=2,
        description="centers M per quantized layer (2 = 1-bit, 4 = 2-bit; None = full precision); "
        "per client group: client_models[i].centers",
    )
    lam_p: float = Field(
        0.5, ge=0, description="collaboration weight λ_p (QuPeL: penalty; QuPeD: KD weight)"
    )
    penalty: qz.Penalty = Field(
        "l2", description="distance penalty R(x, c): 'l1' Σ min_j |x−c_j| or 'l2' Σ min_j (x−c_j)²"
    )
    lam0: float = Field(
        1e-3,
        ge=0,
        description="λ₀ of the distance penalty; round r uses λ_r = λ₀·(r+1) (the code grows λ "
        "per epoch; its CNN default is 1e-6 with 250 epochs)",
    )
    lam_max: float | None = Field(None, gt=0, description="cap on λ_r (None: no cap)")
    center_lr: float = Field(
        1e-4, ge=0, description="center step size η₂ (the code: 1e-4 early in training)"
    )
    center_grad_clip: float = Field(
        10.0, gt=0, description="center gradients are clamped to ±this (as in the code)"
    )
    code_l1_center_sign: bool = Field(
        False,
        description="ℓ1 center step with the authors' code's sign, c_j += η₂λ(#below − #above) "
        "(moves centers away from their members); False: the descent step (#above − #below)",
    )
    freeze_round: int | None = Field(
        None,
        ge=0,
        description="from this round on (0-based) the weights are frozen at Q_c(x) and only the "
        "centers are fine-tuned (the code's freeze epoch); None: never",
    )
    finetune_lr: float = Field(
        1e-6,
        ge=0,
        description="center learning rate after freeze_round, with λ = 0 (the code: 1e-6); "
        "0 keeps the centers fixed too",
    )


class QuantizedPersonal(Algorithm):
    """Base of the algorithms whose personal model is (x_i, c_i), used as Q_{c_i}(x_i)."""

    supports_model_groups = True

    def __init__(self, config, model, client_optimizer, local_steps) -> None:
        super().__init__(config, model, client_optimizer, local_steps)
        self.layers = qz.quantized_layers(self.initial_params()) if config.centers else []

    def init_client(self, population: Tree) -> Tree:
        x = self.initial_params()
        c = qz.init_centers(x, self.layers, self.config.centers) if self.layers else {}
        return {"x": x, "c": c, "opt": self.client_optimizer.init(x)}

    def frozen(self, ctx: Tree) -> torch.Tensor:
        """0-d bool: is this round in the final freeze-and-fine-tune phase?"""
        r = self.config.freeze_round
        if r is not None:
            return ctx["round"] >= r
        return torch.zeros((), dtype=torch.bool, device=ctx["round"].device)

    def solver(self, ctx: Tree) -> Optimizer:
        """The alternating proximal step of this round (λ_r, freeze flag from ``ctx``)."""
        cfg = self.config
        return qz.prox_optimizer(
            self.client_optimizer,
            qz.lam_at(cfg.lam0, ctx["round"], cfg.lam_max),
            cfg.center_lr,
            cfg.penalty,
            self.frozen(ctx),
            cfg.finetune_lr,
            cfg.center_grad_clip,
            cfg.code_l1_center_sign,
        )

    def quantized(self, personal: Tree) -> Tree:
        """Q_c(x) (straight-through gradients); x itself for a full-precision group."""
        return qz.quantize_tree(personal["x"], personal["c"])

    def personal_params(self, population: Tree, client: Tree) -> Tree:
        return self.quantized(client)

    @property
    def bits(self) -> int:
        """Bits per quantized weight (32 for a full-precision group)."""
        return qz.bits_for(self.config.centers) if self.config.centers else 32
