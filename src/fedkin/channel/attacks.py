"""Byzantine attacks: what a fixed, seeded subset of clients sends instead of honest updates.

An attack replaces the rows of the Byzantine clients in a round's stacked messages ``[K, d]``.
Omniscient attacks (sign flip of the honest mean, ALIE, IPM, mimic) see the round's honest
messages; the others see only their own. Label flipping is data poisoning: the client trains
honestly on labels ``(C − 1) − y`` (:func:`flip_labels`) and its message passes unchanged.
Randomness (Gaussian) is keyed by (round, client, coordinate), so runs reproduce exactly.
"""

from __future__ import annotations

import statistics
from abc import abstractmethod
from collections.abc import Callable
from typing import ClassVar, Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedkin.core.rng import Stream
from fedkin.registry import ATTACK_REGISTRY, register_attack


class Attack(NamedTuple):
    """``apply(messages [K, d], byzantine [K] bool, round, client_ids [K]) -> messages``;
    ``poisons_labels``: the Byzantine clients train on flipped labels."""

    apply: Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor], torch.Tensor]
    poisons_labels: bool


def byzantine_clients(seed: int, num_clients: int, fraction: float) -> torch.Tensor:
    """Bool ``[num_clients]``: the ⌊fraction · N⌋ clients with the smallest seeded keys. Fixed for
    the whole run, independent of cohorts."""
    count = int(fraction * num_clients)
    keys = Stream(seed).child("byzantine").keys(torch.arange(num_clients))
    mask = torch.zeros(num_clients, dtype=torch.bool)
    mask[keys.argsort()[:count]] = True
    return mask


def flip_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label flipping: y ↦ (C − 1) − y."""
    return num_classes - 1 - y


def sign_flip(honest: torch.Tensor) -> torch.Tensor:
    """−mean(honest)."""
    return -honest.mean(dim=0)


def inner_product_manipulation(honest: torch.Tensor, tau: float) -> torch.Tensor:
    """IPM (Xie et al. 2020): −τ · mean(honest); its inner product with the honest mean is
    −τ‖μ‖² < 0."""
    return -tau * honest.mean(dim=0)


def alie_z(n: int, f: int) -> float:
    """Baruch et al. (2019): s = ⌊n/2 + 1⌋ − f supporters needed, z_max = Φ⁻¹((n − s)/n)."""
    s = max(1, n // 2 + 1 - f)
    return statistics.NormalDist().inv_cdf((n - s) / n)


def a_little_is_enough(honest: torch.Tensor, z: float) -> torch.Tensor:
    """ALIE: μ + z·σ per coordinate (σ with ddof = 1, as ByzFL; 0 for a single message)."""
    if len(honest) < 2:
        return honest.mean(dim=0)
    return honest.mean(dim=0) + z * honest.std(dim=0, correction=1)


def mimic(honest: torch.Tensor, index: int) -> torch.Tensor:
    """Mimic: copy one honest client's message (the ``index``-th honest one of the round)."""
    return honest[index % len(honest)]


# ---------------------------------------------------------------------------------------------
# Configs (registered by name)


class Seen(NamedTuple):
    """What a Byzantine client knows when it forms its message."""

    own: torch.Tensor  # its own honestly trained message [d]
    honest: torch.Tensor  # the round's honest messages [h, d] (omniscient attacks only)
    n: int  # messages in the round
    f: int  # Byzantine messages in the round
    round: int
    client: int


class _AttackBase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fraction: float = Field(
        0.2, ge=0, lt=1, description="fraction of the population that is Byzantine (fixed, seeded)"
    )
    poisons_labels: ClassVar[bool] = False
    omniscient: ClassVar[bool] = False

    @abstractmethod
    def _message(self, seen: Seen, stream: Stream) -> torch.Tensor:
        """The Byzantine message ``[d]`` sent instead of ``seen.own``."""

    def _sees_honest(self) -> bool:
        return self.omniscient

    def build(self, seed: int = 0) -> Attack:
        """The attack as a pure function of the round's messages. Omniscient attacks with no
        honest message in the round leave the messages unchanged (there is nothing to see)."""
        stream = Stream(seed).child(f"attack/{self.name}")

        def apply(messages, byzantine, round_, client_ids):
            honest = messages[~byzantine]
            if not byzantine.any() or (self._sees_honest() and len(honest) == 0):
                return messages
            out = messages.clone()
            f = int(byzantine.sum())
            for row in byzantine.nonzero().squeeze(1).tolist():
                seen = Seen(messages[row], honest, len(messages), f, round_, int(client_ids[row]))
                out[row] = self._message(seen, stream)
            return out

        return Attack(apply, self.poisons_labels)


class SignFlipConfig(_AttackBase):
    """Sign flip: send −s × the mean of the honest messages (or × the own message).

    s = 1 is ByzFL's ``SignFlipping`` and the bit flipping of Karimireddy et al. (2021). Under
    the plain mean with f of n messages flipped the aggregate is (1 − f(1 + s)/n)·μ: for s = 1
    and f < n/2 still a descent direction (training slows), reversed only for s > n/f − 1."""

    name: Literal["sign_flip"] = "sign_flip"
    reference: Literal["honest_mean", "own"] = Field(
        "honest_mean", description="flip the round's honest mean (omniscient) or the own update"
    )
    scale: float = Field(1.0, gt=0, description="magnitude s of the flipped message")

    def _sees_honest(self) -> bool:
        return self.reference == "honest_mean"

    def _message(self, seen, stream):
        flipped = sign_flip(seen.honest) if self.reference == "honest_mean" else -seen.own
        return self.scale * flipped


class ScaledConfig(_AttackBase):
    """Scaled update: send λ × the own honest update (model-replacement style boosting)."""

    name: Literal["scaled"] = "scaled"
    scale: float = Field(10.0, description="factor λ applied to the own update")

    def _message(self, seen, stream):
        return self.scale * seen.own


class GaussianConfig(_AttackBase):
    """Gaussian noise: send N(μ, σ²I), drawn per (round, client, coordinate)."""

    name: Literal["gaussian"] = "gaussian"
    mu: float = Field(0.0, description="mean μ of every coordinate")
    sigma: float = Field(1.0, ge=0, description="standard deviation σ of every coordinate")

    def _message(self, seen, stream):
        z = stream.normal(seen.round, seen.client, torch.arange(seen.own.numel()))
        return (self.mu + self.sigma * z).to(seen.own.dtype)


class LabelFlipConfig(_AttackBase):
    """Label flipping: train honestly on labels (C − 1) − y; the message is sent unchanged."""

    name: Literal["label_flip"] = "label_flip"
    poisons_labels: ClassVar[bool] = True

    def _message(self, seen, stream):
        return seen.own


class NonFiniteConfig(_AttackBase):
    """NaN/Inf: send a message whose every entry is NaN or +Inf."""

    name: Literal["nonfinite"] = "nonfinite"
    value: Literal["nan", "inf"] = Field("nan", description="the value sent in every coordinate")

    def _message(self, seen, stream):
        return torch.full_like(seen.own, float(self.value))


class AlieConfig(_AttackBase):
    """A little is enough (Baruch et al. 2019): μ + z·σ of the honest messages per coordinate."""

    name: Literal["alie"] = "alie"
    z: float | None = Field(
        None, description="multiplier z in μ + zσ (None: −z_max of Baruch et al. for n, f)"
    )
    omniscient: ClassVar[bool] = True

    def _message(self, seen, stream):
        z = -alie_z(seen.n, seen.f) if self.z is None else self.z
        return a_little_is_enough(seen.honest, z)


class IpmConfig(_AttackBase):
    """Inner-product manipulation (Xie et al. 2020): send −τ · mean of the honest messages."""

    name: Literal["ipm"] = "ipm"
    tau: float = Field(0.1, gt=0, description="factor τ (small τ targets robust rules)")
    omniscient: ClassVar[bool] = True

    def _message(self, seen, stream):
        return inner_product_manipulation(seen.honest, self.tau)


class MimicConfig(_AttackBase):
    """Mimic: every Byzantine client copies one honest client's message of the round."""

    name: Literal["mimic"] = "mimic"
    index: int = Field(0, ge=0, description="which honest message of the round is copied")
    omniscient: ClassVar[bool] = True

    def _message(self, seen, stream):
        return mimic(seen.honest, self.index)


for _cls in (
    SignFlipConfig,
    ScaledConfig,
    GaussianConfig,
    LabelFlipConfig,
    NonFiniteConfig,
    AlieConfig,
    IpmConfig,
    MimicConfig,
):
    register_attack(_cls)
#: An attack's config: any registered one (``fedkin.register_attack``).
AttackConfig = ATTACK_REGISTRY.field
#: name → config class of every registered attack.
ATTACKS = ATTACK_REGISTRY
