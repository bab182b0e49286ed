"""Open registries: names are resolved when a config is validated, not when fedkin is imported."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

import fedkin
from conftest import drop_timings, tiny, tiny_config
from fedkin.algorithms import ALGORITHMS
from fedkin.config import ExperimentConfig, dump_config, load_config
from fedkin.core.errors import ConfigError, UserError
from fedkin.optim import OPTIMIZERS, sgd
from fedkin.registry import RegistryError
from fedkin.tracking import read_records


class HalfSgdConfig(BaseModel):
    """SGD at half the given learning rate (a test optimizer)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["half-sgd"] = "half-sgd"
    lr: float = Field(0.1, gt=0, description="twice the step size")

    def build(self):
        return sgd(self.lr / 2)


@pytest.mark.parametrize(
    ("override", "key", "builtin", "register"),
    [
        ("algorithm.name=mine", "algorithm.name", "'fedprox'", "register_algorithm"),
        ("data.name=mine", "data.name", "'digits'", "register_dataset"),
        ("model.name=mine", "model.name", "'mlp'", "register_model"),
        ("client.optimizer.name=mine", "client.optimizer.name", "'adam'", "register_optimizer"),
        ("server.optimizer.name=mine", "server.optimizer.name", "'sgd'", "register_optimizer"),
    ],
)
def test_unknown_name_lists_registered_names_and_how_to_register(override, key, builtin, register):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert f"{key}: 'mine' is not one of:" in message
    assert builtin in message
    assert f"fedkin.{register}" in message and "--plugin MODULE" in message


def test_registering_after_validation_rebuilds_the_schema(isolated_registries, tmp_path):
    """A name registered after configs were validated is accepted at once, its options are
    validated and saved, and it trains exactly like the built-in it is equivalent to."""
    tiny_config()  # the optimizer union is built (and cached) without half-sgd
    with pytest.raises(ConfigError, match="'half-sgd' is not one of"):
        tiny_config("client.optimizer.name=half-sgd")
    schema = json.dumps(ExperimentConfig.model_json_schema())
    assert '"sgd"' in schema and "half-sgd" not in schema
    assert fedkin.register_optimizer(HalfSgdConfig) is HalfSgdConfig
    assert "half-sgd" in OPTIMIZERS
    assert "half-sgd" in json.dumps(ExperimentConfig.model_json_schema())  # the JSON schema too
    with pytest.raises(ConfigError, match=r"client\.optimizer\.lr: Input should be greater"):
        tiny_config("client.optimizer.name=half-sgd", "client.optimizer.lr=-1")
    config = tiny_config("client.optimizer.name=half-sgd", "client.optimizer.lr=0.2", "rounds=2")
    assert isinstance(config.client.optimizer, HalfSgdConfig)
    saved = dump_config(config)
    assert "name: half-sgd\n    lr: 0.2" in saved
    summaries = []
    for name, optimizer in [
        ("half", ["client.optimizer.name=half-sgd", "client.optimizer.lr=0.2"]),
        ("sgd", ["client.optimizer.name=sgd", "client.optimizer.lr=0.1"]),
    ]:
        summary = fedkin.run(None, tmp_path / name, overrides=tiny(*optimizer, "rounds=2"))
        summaries.append(drop_timings([summary]))
    assert summaries[0] == summaries[1]
    assert drop_timings(read_records(tmp_path / "half")) == drop_timings(
        read_records(tmp_path / "sgd")
    )


def test_a_taken_name_cannot_be_registered_again_by_another_class(isolated_registries):
    fedkin.register_optimizer(HalfSgdConfig)
    fedkin.register_optimizer(HalfSgdConfig)  # the same class again (a re-import): fine

    class Other(HalfSgdConfig):
        pass

    with pytest.raises(RegistryError, match=r"'half-sgd' is already registered by .*HalfSgdConfig"):
        fedkin.register_optimizer(Other)


def test_bad_registrations_say_what_is_missing(isolated_registries):
    class NoName(BaseModel):
        lr: float = 0.1

        def build(self):
            return sgd(self.lr)

    with pytest.raises(RegistryError, match=r"needs a field `name: Literal"):
        fedkin.register_optimizer(NoName)

    class NoBuild(BaseModel):
        name: Literal["nobuild"] = "nobuild"

    with pytest.raises(RegistryError, match="has no `build` method"):
        fedkin.register_model(NoBuild)

    class NoClients(BaseModel):
        name: Literal["noclients"] = "noclients"

    with pytest.raises(RegistryError, match="needs the field"):
        fedkin.register_dataset(NoClients, lambda cfg, stream: None)

    fedprox = ALGORITHMS["fedprox"]

    class Renamed(fedprox):
        name = "renamed"  # but its Config still says fedprox

    with pytest.raises(RegistryError, match="`Config` whose name Literal equals it"):
        fedkin.register_algorithm(Renamed)
    with pytest.raises(RegistryError, match="not a fedkin Algorithm subclass"):
        fedkin.register_algorithm(HalfSgdConfig)


def test_algorithms_mapping_is_a_view_of_the_registry(isolated_registries):
    fedprox = ALGORITHMS["fedprox"]

    class ProxConfig(fedprox.Config):
        name: Literal["prox2"] = "prox2"

    class Prox2(fedprox):
        name = "prox2"
        Config = ProxConfig

    assert "prox2" not in ALGORITHMS
    fedkin.register_algorithm(Prox2)
    assert ALGORITHMS["prox2"] is Prox2 and list(ALGORITHMS)[-1] == "prox2"
    config = tiny_config("algorithm.name=prox2", "algorithm.mu=0.5")
    assert config.algorithm.mu == 0.5


def test_public_api_is_lazy_and_complete():
    import subprocess
    import sys

    code = (
        "import sys, fedkin; heavy = {'torch', 'fedkin.config'} & set(sys.modules); "
        "names = [n for n in fedkin.__all__ if n != '__version__']; "
        "print(sorted(heavy), all(getattr(fedkin, n) is not None for n in names))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[] True"
    assert set(fedkin.__all__) >= {
        "load_config",
        "Experiment",
        "run",
        "read_records",
        "Algorithm",
        "register_algorithm",
        "register_dataset",
        "register_model",
        "register_optimizer",
    }


def test_personal_model_predicts_as_evaluated(tmp_path):
    """``Experiment.personal_model(i)`` is the model evaluation scored for client i."""
    import torch

    summary = fedkin.run(None, tmp_path / "run", overrides=tiny("algorithm.name=ditto"))
    experiment = fedkin.Experiment.load(tmp_path / "run")
    assert experiment.round == summary["rounds"]
    for client in (0, 7):
        model = experiment.personal_model(client)
        x, y, mask = experiment.dataset.test_batches(torch.tensor([client]))
        with torch.no_grad():
            hits = (model(x[0]).argmax(-1) == y[0])[mask[0]]
        assert float(hits.float().mean()) == pytest.approx(
            summary["personal_acc_by_client"][client]
        )
    global_params = experiment.population["global"]
    personal = experiment.personal_params(0)
    assert any(not torch.equal(personal[k], global_params[k]) for k in personal)
    with pytest.raises(UserError, match=r"outside 0\.\.19"):
        experiment.personal_params(20)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rounds"] == 3
