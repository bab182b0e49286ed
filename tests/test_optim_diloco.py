"""DiLoCo is a configuration: inner AdamW on clients, outer Nesterov SGD on the server."""

from __future__ import annotations

from pathlib import Path

import torch

from fedkin.config import load_config
from fedkin.experiment import Experiment

CONFIG = Path(__file__).parents[1] / "configs" / "diloco.yaml"
SMALL = [
    "data.num_clients=10",
    "cohort.clients_per_round=4",
    "model.hidden=[16]",
    "client.local_steps=3",
    "client.batch_size=8",
    "rounds=3",
    "eval.holdout_clients=0",
]


def _final(*overrides: str) -> dict:
    exp = Experiment(load_config(CONFIG, [*SMALL, *overrides]))
    for _ in range(3):
        exp.run_round()
    return exp.population["global"]


def test_diloco_with_outer_lr_1_and_no_momentum_is_fedavg_exactly():
    diloco = _final(
        "server.optimizer.lr=1.0",
        "server.optimizer.momentum=0.0",
        "server.optimizer.nesterov=false",
    )
    # FedAvg: the default server (w ← w + Δ̄), same clients
    fedavg_cfg = load_config(CONFIG, SMALL)
    fedavg_cfg = fedavg_cfg.model_copy(
        update={"server": type(fedavg_cfg.server)()}  # defaults: sgd lr=1
    )
    exp = Experiment(fedavg_cfg)
    for _ in range(3):
        exp.run_round()
    for k, v in exp.population["global"].items():
        assert torch.equal(diloco[k], v), k
    outer = _final()  # the paper's outer optimizer moves elsewhere
    assert any(not torch.allclose(outer[k], v) for k, v in diloco.items())
