"""Differential privacy shared by estimation and learning: mechanisms and accounting.

The names below load on first use, so importing a submodule (e.g. the config schema) does not
import dp-accounting and scipy.
"""

from __future__ import annotations

import importlib
from typing import Any

_SOURCES = {
    "BudgetExceededError": "accountant",
    "PrivacyAccountant": "accountant",
    "PrivacyBudget": "accountant",
    "PrivacyEvent": "accountant",
    "UnsupportedAccountingError": "accountant",
    "calibrate_noise_multiplier": "accountant",
    "add_gaussian_noise": "mechanisms",
    "clip_box": "mechanisms",
    "clip_l2": "mechanisms",
    "gaussian_noise": "mechanisms",
    "gaussian_sigma": "mechanisms",
}

__all__ = sorted(_SOURCES)


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module 'fedkin.privacy' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fedkin.privacy.{_SOURCES[name]}"), name)
