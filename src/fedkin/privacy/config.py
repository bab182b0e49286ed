"""Configuration of user-level differential privacy for federated learning."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AdaptiveClipConfig(BaseModel):
    """Quantile-tracking clip norm (Andrew et al. 2021): C ← C·exp(−η(b̄ − γ)), where b̄ is the
    noisy fraction of cohort updates with norm ≤ C."""

    model_config = ConfigDict(extra="forbid")
    target_quantile: float = Field(0.5, gt=0, lt=1, description="γ: quantile of update norms")
    learning_rate: float = Field(0.2, gt=0, description="η: geometric step of the clip norm")
    count_noise: float | None = Field(
        None,
        gt=0,
        description="σ_b, std of the noise on the clipped count (default: expected cohort / 20)",
    )


class DpSgdConfig(BaseModel):
    """Example-level DP-SGD inside each client: per-sample gradients clipped to ``clip`` and
    Gaussian noise of std ``noise_multiplier``·clip added to their sum at every local step."""

    model_config = ConfigDict(extra="forbid")
    clip: float = Field(1.0, gt=0, description="per-example gradient L2 clip norm")
    noise_multiplier: float = Field(1.0, gt=0, description="noise std / clip")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ at which example-level ε is reported")


class PrivacyConfig(BaseModel):
    """User-level DP of population messages (personal models never leave the client).

    ``central``: each client's message is clipped to L2 norm C; the server adds N(0, (zC)²) to
    the sum and divides by the expected cohort size (DP-FedAvg, McMahan et al. 2018).
    ``local``: each client adds the noise to its own clipped message before sending.
    Give either ``noise_multiplier`` z or ``target_epsilon`` (z is then calibrated for the
    planned rounds before training).
    """

    model_config = ConfigDict(extra="forbid")
    mechanism: Literal["none", "central", "local"] = Field(
        "none", description="none | central (DP-FedAvg) | local (noise added on the client)"
    )
    clip: float = Field(1.0, gt=0, description="L2 clip norm C of each client's message")
    noise_multiplier: float | None = Field(None, gt=0, description="z: noise std = z·C")
    target_epsilon: float | None = Field(
        None, gt=0, description="calibrate z so the planned rounds spend this ε"
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the (ε, δ) guarantee")
    epsilon_budget: float | None = Field(
        None,
        gt=0,
        description="stop training before ε would exceed this (default: target_epsilon)",
    )
    accountant: Literal["pld", "rdp"] = Field(
        "pld", description="dp-accounting backend (rdp is reported as a cross-check)"
    )
    adaptive_clip: AdaptiveClipConfig | None = Field(
        None, description="track a quantile of update norms instead of a fixed C (central only)"
    )
    dp_sgd: DpSgdConfig | None = Field(None, description="example-level DP-SGD inside clients")
    secret_noise: bool = Field(
        False,
        description="draw DP noise and Poisson cohorts from a secret random seed kept only in "
        "the checkpoint (use in deployments: with the default, noise is reproducible from "
        "the config's seed, which is right for experiments but not a real guarantee)",
    )
    release_diagnostics: bool = Field(
        False,
        description="also release exact client-derived diagnostics (per-client ψ/KD/cluster/α, "
        "train loss, clipped fraction, cohort and rejection counts, accuracy on the clients' "
        "data); prints a warning and marks the run not private in summary.json (for "
        "simulations that measure utility; see fedkin.privacy.release)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> PrivacyConfig:
        if self.mechanism == "none":
            return self
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "privacy: give exactly one of privacy.noise_multiplier and privacy.target_epsilon"
            )
        if self.adaptive_clip is not None and self.mechanism != "central":
            raise ValueError("privacy.adaptive_clip needs privacy.mechanism=central")
        return self

    @property
    def enabled(self) -> bool:
        return self.mechanism != "none"

    @property
    def budget_epsilon(self) -> float | None:
        return self.epsilon_budget if self.epsilon_budget is not None else self.target_epsilon
