"""Shared fixtures for the foundation tests: tiny experiment configs and the CLI entry point."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

import pytest
import torch

# Tests run many tiny vmapped models; one intra-op thread avoids oversubscribing the 2 cores
# (several times faster here, and immune to other processes' load). Benchmarks keep the default.
torch.set_num_threads(1)

# A tiny but complete experiment: 20 digits clients, 5 per round, a 16-unit MLP, 2 local steps.
# Every variant section names its variant explicitly (data.name, model.name, …), so these
# overrides do not depend on how partial variant sections are defaulted.
TINY = [
    "data.name=digits",
    "data.num_clients=20",
    "data.partition.name=iid",
    "cohort.clients_per_round=5",
    "model.name=mlp",
    "model.hidden=[16]",
    "client.local_steps=2",
    "client.batch_size=8",
    "rounds=3",
]


def tiny(*extra: str) -> list[str]:
    """The tiny overrides followed by ``extra`` (later overrides win)."""
    return [*TINY, *extra]


# The reconstruction task's tiny experiment: 10 linear-Gaussian clients (d = 64), rank-5 PCA.
TINY_RECONSTRUCTION = [
    "data.name=linear-gaussian",
    "data.num_clients=10",
    "cohort.clients_per_round=5",
    "model.name=pca",
    "client.local_steps=2",
    "client.batch_size=8",
    "rounds=3",
]

# The diffusion task's: 6 digits clients, a 2-block U-Net of widths 8/16 (client embedding: 32
# numbers), trained with SGD (Adam's g/√v turns float noise on near-zero gradients into whole
# steps, which says nothing about engines or runtimes).
TINY_DDPM = [
    "data.name=digits",
    "data.num_clients=6",
    "data.partition.name=iid",
    "cohort.clients_per_round=4",
    "model.name=ddpm",
    "model.channels=[8,16]",
    "model.norm_groups=4",
    "client.local_steps=2",
    "client.batch_size=8",
    "client.optimizer.name=sgd",
    "client.optimizer.lr=0.05",
    "rounds=2",
]

TINY_BY_TASK = {
    "classification": TINY,
    "reconstruction": TINY_RECONSTRUCTION,
    "diffusion": TINY_DDPM,
}


def tiny_for(algorithm: str, *extra: str) -> list[str]:
    """Tiny overrides of a model and data that ``algorithm``'s task trains, then
    ``algorithm.name``, then ``extra``."""
    from fedkin.algorithms import ALGORITHMS

    base = TINY_BY_TASK[ALGORITHMS[algorithm].task.name]
    return [*base, f"algorithm.name={algorithm}", *extra]


def registered_algorithms() -> list[str]:
    """Every registered algorithm (registry-wide equivalence tests)."""
    from fedkin.algorithms import ALGORITHMS

    return sorted(ALGORITHMS)


def tiny_config(*extra: str):
    from fedkin.config import load_config

    return load_config(None, tiny(*extra))


def dp_channel(privacy, clients: int):
    """The round channel of a run with default channel options (no compression, no attack)
    around the DP mechanism ``privacy`` (a ``UserLevelDP``) for ``clients`` clients."""
    from fedkin.channel.pipeline import ChannelConfig
    from fedkin.channel.runtime import RoundChannel

    return RoundChannel(
        ChannelConfig(), None, seed=0, num_clients=clients, num_classes=10, privacy=privacy
    )


def drop_timings(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records without wall-clock fields (keys ending in ``_s``)."""
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in records]


def hand_personal_accuracy(exp) -> float:
    """Mean over training clients of each client's personal-model test accuracy, computed one
    client at a time (its stored state, adapted if the algorithm adapts) — an independent check
    of the vectorized evaluation's ``personal_acc_mean``."""
    from fedkin.core.tree import tree_map

    accuracies = []
    for group in exp.groups:
        alg = group.algorithm
        for i in group.members[exp.is_training[group.members]].tolist():
            ids = torch.tensor([i])
            stored = group.store.gather(group.rows(ids))
            state = exp.eval_states(alg, ids, exp.population, exp.round, stored)  # adapt, if any
            params = alg.personal_params(exp.population, tree_map(lambda t: t[0], state))
            x, y = exp.dataset.client_test(i)
            with torch.no_grad():
                hits = (alg.logits(params, x).argmax(-1) == y).to(torch.float64)
            accuracies.append(float(hits.mean()))
    return sum(accuracies) / len(accuracies)


@pytest.fixture
def cli():
    """``fedkin.cli.main.main``: the real command line, called in-process."""
    from fedkin.cli.main import main

    return main


@pytest.fixture(scope="session")
def byzfl():
    """ByzFL's aggregators and attacks (the test oracle for ``fedkin.channel``), imported without
    its package ``__init__``, which pulls in its benchmark framework and so torchvision; these
    modules need only numpy, scipy and torch. scripts/setup.sh installs byzfl."""
    spec = importlib.util.find_spec("byzfl")
    if spec is None:
        pytest.skip("byzfl is not installed (scripts/setup.sh installs it)")
    if "byzfl" not in sys.modules:
        pkg = types.ModuleType("byzfl")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["byzfl"] = pkg
    names: dict[str, Any] = {}
    for module in ("byzfl.aggregators", "byzfl.attacks"):
        mod = importlib.import_module(module)
        names.update({k: v for k, v in vars(mod).items() if not k.startswith("_")})
    return types.SimpleNamespace(**names)


@pytest.fixture
def isolated_registries(tmp_path):
    """Registrations, plugin modules (files under ``tmp_path``) and ``sys.path`` changes made by
    a test are undone after it, so registries look the same to every other test."""
    from fedkin import registry

    registries = [
        registry.ALGORITHM_REGISTRY,
        registry.DATASET_REGISTRY,
        registry.MODEL_REGISTRY,
        registry.OPTIMIZER_REGISTRY,
        registry.AGGREGATOR_REGISTRY,
        registry.PREAGGREGATOR_REGISTRY,
        registry.COMPRESSOR_REGISTRY,
        registry.ATTACK_REGISTRY,
    ]
    saved = [dict(r) and dict(r._entries) for r in registries]  # dict(r) loads the built-ins
    path = list(sys.path)
    yield registries
    for r, entries in zip(registries, saved, strict=True):
        r._entries = entries
        r._version += 1
    sys.path[:] = path
    root = str(tmp_path)
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(root):
            del sys.modules[name]


def classification_algorithms() -> list[str]:
    """Registered algorithms whose task is classification (the tiny digits configs' task);
    reconstruction algorithms (ADEPT) are tested in test_adept.py."""
    from fedkin.algorithms import ALGORITHMS
    from fedkin.core.tasks import CLASSIFICATION

    return sorted(name for name, cls in ALGORITHMS.items() if cls.task is CLASSIFICATION)
