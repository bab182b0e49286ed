"""fedkin: personalized federated learning and estimation (generative view).

The public Python API (imported on first use, so ``import fedkin`` stays fast):

* ``load_config(path, overrides, plugins)`` → :class:`ExperimentConfig`
* ``run(config_or_path, run_dir)`` → the summary dict (the Python form of ``fedkin run``)
* ``Experiment`` — a live run: ``Experiment.load(run_dir)``, ``.personal_model(client_id)``,
  ``.personal_params(client_id)``, ``.population``, ``.run_round()``, ``.evaluate()``
* ``read_records(run_dir)`` → the records of ``metrics.jsonl``
* ``Algorithm`` — the base class of algorithms (prior, local solver, population update)
* ``register_algorithm``, ``register_dataset``, ``register_model``, ``register_optimizer``,
  ``register_aggregator``, ``register_preaggregator``, ``register_compressor``,
  ``register_attack`` and ``load_plugins`` — extend fedkin without forking it
  (see :mod:`fedkin.registry`)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_config": "fedkin.config",
    "ExperimentConfig": "fedkin.config",
    "Experiment": "fedkin.experiment",
    "run": "fedkin.runs",
    "read_records": "fedkin.tracking",
    "Algorithm": "fedkin.algorithms.base",
    "register_algorithm": "fedkin.registry",
    "register_dataset": "fedkin.registry",
    "register_model": "fedkin.registry",
    "register_optimizer": "fedkin.registry",
    "register_aggregator": "fedkin.registry",
    "register_preaggregator": "fedkin.registry",
    "register_compressor": "fedkin.registry",
    "register_attack": "fedkin.registry",
    "load_plugins": "fedkin.plugins",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedkin' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
