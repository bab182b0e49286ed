"""What an estimator returns: per-client estimates plus the population it borrowed from."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Fit:
    """One family's answer for every client.

    ``estimates`` and ``sd`` are ``[m, d]``; ``sd`` is NaN where it is not defined and
    ``sd_name`` says what it is (``"posterior_sd"`` for empirical Bayes, ``"std_error"`` for the
    local mean). ``hyper`` holds the fitted population parameters per coordinate (e.g. ``mu``,
    ``tau2``, ``sigma2``); ``notes`` state every fallback that was taken.
    """

    estimates: torch.Tensor
    sd: torch.Tensor | None = None
    sd_name: str = "posterior_sd"
    hyper: dict[str, list[float]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
