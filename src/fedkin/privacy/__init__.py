"""Differential privacy shared by estimation and learning: mechanisms and accounting."""

from fedkin.privacy.accountant import (
    BudgetExceededError,
    PrivacyAccountant,
    PrivacyBudget,
    PrivacyEvent,
    UnsupportedAccountingError,
    calibrate_noise_multiplier,
)
from fedkin.privacy.mechanisms import (
    add_gaussian_noise,
    clip_box,
    clip_l2,
    gaussian_noise,
    gaussian_sigma,
)

__all__ = [
    "BudgetExceededError",
    "PrivacyAccountant",
    "PrivacyBudget",
    "PrivacyEvent",
    "UnsupportedAccountingError",
    "add_gaussian_noise",
    "calibrate_noise_multiplier",
    "clip_box",
    "clip_l2",
    "gaussian_noise",
    "gaussian_sigma",
]
