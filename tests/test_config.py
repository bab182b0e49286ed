"""Experiment config: YAML + overrides, and one-line errors that name the bad key."""

from __future__ import annotations

import pytest
import yaml

from fedkin.config import (
    ExperimentConfig,
    deep_merge,
    dump_config,
    load_config,
    parse_overrides,
)
from fedkin.core.errors import ConfigError

# ----- loading and merging ---------------------------------------------------------------------


def test_defaults():
    cfg = load_config()
    assert cfg == ExperimentConfig()
    assert cfg.algorithm.name == "fedavg"
    assert cfg.data.name == "digits" and cfg.data.num_clients == 100
    assert cfg.engine.name == "vectorized"
    assert cfg.server.optimizer.name == "sgd" and cfg.server.optimizer.lr == 1.0


def test_parse_overrides_nests_and_parses_yaml_scalars():
    out = parse_overrides(
        ["rounds=7", "a.b.c=0.5", "a.b.d=[1, 2]", "a.e=true", "name=run-1", "a.b.f=1e-3"]
    )
    assert out == {
        "rounds": 7,
        "name": "run-1",
        "a": {"b": {"c": 0.5, "d": [1, 2], "f": "1e-3"}, "e": True},
    }


def test_later_override_wins():
    assert parse_overrides(["rounds=3", "rounds=4"]) == {"rounds": 4}
    assert load_config(None, ["rounds=3", "rounds=4"]).rounds == 4


@pytest.mark.parametrize("bad", ["rounds", "=5", "a.b", ""])
def test_parse_overrides_rejects_malformed(bad):
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides([bad])


def test_parse_overrides_conflict():
    with pytest.raises(ConfigError, match="conflicts"):
        parse_overrides(["data=3", "data.name=digits"])


def test_deep_merge_is_recursive_and_does_not_mutate():
    base = {"a": {"b": 1, "c": 2}, "d": 3}
    merged = deep_merge(base, {"a": {"b": 10}, "e": 5})
    assert merged == {"a": {"b": 10, "c": 2}, "d": 3, "e": 5}
    assert base == {"a": {"b": 1, "c": 2}, "d": 3}


def test_yaml_file_and_overrides_merge(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "from-file",
                "rounds": 7,
                "seed": 3,
                "data": {
                    "name": "digits",
                    "num_clients": 30,
                    "partition": {"name": "dirichlet", "alpha": 0.5},
                },
                "algorithm": {"name": "fedprox", "mu": 0.2},
                "cohort": {"clients_per_round": 6},
            }
        )
    )
    cfg = load_config(path, ["algorithm.mu=0.3", "data.partition.alpha=1.5", "rounds=9"])
    assert cfg.name == "from-file" and cfg.seed == 3
    assert cfg.rounds == 9
    assert cfg.algorithm.name == "fedprox" and cfg.algorithm.mu == 0.3
    assert cfg.data.num_clients == 30
    assert cfg.data.partition.name == "dirichlet" and cfg.data.partition.alpha == 1.5
    assert cfg.cohort.clients_per_round == 6
    # file alone
    assert load_config(path).algorithm.mu == 0.2
    # an override may switch the variant when the file's section has no variant-only keys
    cfg = load_config(path, ["cohort.weighting=uniform", "data.partition.name=dirichlet"])
    assert cfg.cohort.weighting == "uniform" and cfg.data.partition.alpha == 0.5


def test_empty_yaml_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == ExperimentConfig()


def test_dump_and_reload_round_trip(tmp_path):
    cfg = load_config(
        None,
        [
            "data.name=synthetic",
            "data.num_clients=12",
            "data.dim=5",
            "model.name=mlp",
            "model.hidden=[8, 4]",
            "algorithm.name=fedprox",
            "algorithm.mu=0.25",
            "client.optimizer.name=adam",
            "client.optimizer.lr=0.01",
            "cohort.clients_per_round=4",
            "engine.name=sequential",
        ],
    )
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


# ----- errors ---------------------------------------------------------------------------------


def _error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, list(overrides))
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_unknown_top_level_key():
    msg = _error("foo=1")
    assert "'foo'" in msg and "rounds" in msg and "algorithm" in msg


def test_unknown_nested_key_lists_allowed_keys():
    msg = _error("algorithm.name=fedprox", "algorithm.foo=1")
    assert "algorithm.foo" in msg and "mu" in msg
    msg = _error("data.name=digits", "data.partition.name=iid", "data.partition.alpha=0.5")
    assert "data.partition.alpha" in msg and "allowed keys here: name" in msg
    msg = _error("client.optimizer.name=adam", "client.optimizer.momentum=0.9")
    assert "client.optimizer.momentum" in msg
    assert all(k in msg for k in ("lr", "b1", "b2", "eps"))
    msg = _error("cohort.size=3")
    assert "cohort.size" in msg and "clients_per_round" in msg


def test_unknown_variant_name_lists_allowed_names():
    msg = _error("algorithm.name=nope")
    assert "algorithm.name" in msg and "nope" in msg
    assert all(name in msg for name in ("fedavg", "fedprox", "local"))
    msg = _error("data.name=mnist")
    assert "data.name" in msg and "digits" in msg and "synthetic" in msg
    msg = _error("model.name=resnet")
    assert "model.name" in msg and all(n in msg for n in ("logreg", "mlp", "cnn"))
    msg = _error("backend.name=flwr")
    assert "backend.name" in msg and all(n in msg for n in ("local", "ray", "flower"))
    assert "backend.client_cpus" in _error("backend.name=flower", "backend.client_cpus=0")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("rounds=abc", "rounds"),
        ("rounds=0", "rounds"),
        ("seed=-1", "seed"),
        ("cohort.clients_per_round=0", "cohort.clients_per_round"),
        ("cohort.weighting=median", "cohort.weighting"),
        ("engine.name=gpu", "engine.name"),
        ("engine.chunk_size=-2", "engine.chunk_size"),
        ("engine.retain_freed_mb=4096", "engine.retain_freed_mb"),
        ("client.local_steps=1.5", "client.local_steps"),
        ("name=has space", "name"),
    ],
)
def test_bad_values_name_the_key(override, key):
    msg = _error(override)
    assert msg.startswith("invalid config: ")
    assert key in msg


def test_dirichlet_alpha_must_be_positive():
    msg = _error("data.name=digits", "data.partition.name=dirichlet", "data.partition.alpha=0")
    assert "data.partition.alpha" in msg and "greater than 0" in msg


def test_cohort_larger_than_population():
    msg = _error("cohort.clients_per_round=1000")
    assert "cohort.clients_per_round=1000" in msg and "data.num_clients=100" in msg


# ----- privacy picks its cohort defaults; explicit conflicts fail once -------------------------

PRIVATE = ("privacy.mechanism=central", "privacy.noise_multiplier=1")


def test_privacy_defaults_cohorts_to_uniform_weights_and_poisson_sampling(tmp_path):
    cfg = load_config(None, ["algorithm.name=ditto", *PRIVATE])
    assert (cfg.cohort.weighting, cfg.cohort.sampling) == ("uniform", "poisson")
    path = tmp_path / "config.yaml"  # the resolved config states the choice and reloads equal
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    local = load_config(None, ["privacy.mechanism=local", "privacy.target_epsilon=2"])
    assert (local.cohort.weighting, local.cohort.sampling) == ("uniform", "poisson")
    plain = load_config(None, ["privacy.noise_multiplier=1"])  # mechanism none: unchanged
    assert (plain.cohort.weighting, plain.cohort.sampling) == ("samples", "fixed")


def test_privacy_keeps_explicit_choices_that_are_valid():
    cfg = load_config(None, [*PRIVATE, "cohort.sampling=fixed", "privacy.accountant=rdp"])
    assert (cfg.cohort.weighting, cfg.cohort.sampling) == ("uniform", "fixed")
    cfg = load_config(
        None, ["privacy.mechanism=local", "privacy.noise_multiplier=1", "cohort.sampling=fixed"]
    )  # local DP accounts no cohort sampling
    assert cfg.cohort.sampling == "fixed"


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (("cohort.weighting=samples",), ["cohort.weighting=samples", "cohort.weighting=uniform"]),
        (
            ("cohort.sampling=fixed",),
            ["cohort.sampling=fixed", "cohort.sampling=poisson", "privacy.accountant=rdp"],
        ),
        (
            ("cohort.weighting=samples", "cohort.sampling=fixed", "privacy.delta=0.5"),
            [
                "cohort.weighting=uniform",
                "cohort.sampling=poisson",
                "privacy.accountant=rdp",
                "privacy.delta=0.5",
                "1/population",
            ],
        ),
    ],
    ids=["weighting", "fixed-under-pld", "all-at-once"],
)
def test_explicit_conflicts_with_privacy_fail_once_naming_every_key(overrides, needles):
    msg = _error(*PRIVATE, *overrides)
    assert msg.count("invalid config") == 1
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_all_errors_reported_together():
    msg = _error("rounds=abc", "seed=-1")
    assert "rounds" in msg and "seed" in msg


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("rounds: 3\ncohort:\n  clients: 4\n")
    with pytest.raises(ConfigError, match=r"cohort\.clients"):
        load_config(unknown)


# ----- partial variant sections (overrides without `name`) ------------------------------------


@pytest.mark.parametrize(
    ("overrides", "check"),
    [
        (["data.num_clients=20", "cohort.clients_per_round=5"], lambda c: c.data.num_clients == 20),
        (["server.optimizer.lr=0.5"], lambda c: c.server.optimizer.lr == 0.5),
        (["client.optimizer.momentum=0.9"], lambda c: c.client.optimizer.momentum == 0.9),
        (["data.partition.alpha=0.7"], lambda c: c.data.partition.alpha == 0.7),
        (["model.hidden=[8]"], lambda c: c.model.hidden == [8]),
    ],
    ids=["data", "server.optimizer", "client.optimizer", "data.partition", "model"],
)
def test_partial_variant_section_keeps_default_variant(overrides, check):
    assert check(load_config(None, overrides))


def test_unknown_key_in_default_variant_lists_allowed_keys():
    msg = _error("algorithm.foo=1")
    assert "unknown key 'algorithm.foo'; allowed keys here: name" in msg
    msg = _error("data.partition.foo=1")
    assert "data.partition.foo" in msg and "alpha" in msg and "min_size" in msg


def test_partial_section_then_bad_value_names_the_key():
    msg = _error("data.partition.alpha=0")
    assert "data.partition.alpha" in msg and "greater than 0" in msg
    msg = _error("server.optimizer.lr=-1")
    assert "server.optimizer.lr" in msg


def test_variant_switch_keeps_other_sections_default():
    cfg = load_config(
        None, ["data.partition.name=iid", "data.num_clients=10", "cohort.clients_per_round=5"]
    )
    assert cfg.data.name == "digits" and cfg.data.partition.name == "iid"
    assert cfg.data.num_clients == 10


# ----- sections inside lists (client_models) -----------------------------------------------------


def test_missing_name_in_list_item_lists_variant_names():
    msg = _error("algorithm.name=local", "client_models=[{model: {hidden: [3]}, fraction: 1.0}]")
    assert "client_models.0.model.name" in msg
    assert all(n in msg for n in ("logreg", "mlp", "cnn"))


def test_unknown_key_in_list_item_lists_allowed_keys():
    msg = _error(
        "algorithm.name=local", "client_models=[{model: {name: mlp, foo: 1}, fraction: 1.0}]"
    )
    assert "unknown key 'client_models.0.model.foo'" in msg
    assert "hidden" in msg


# ----- the same errors through the command line --------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["foo=1"], ["'foo'", "allowed keys"]),
        (["algorithm.foo=1"], ["algorithm.foo", "allowed keys"]),
        (["algorithm.name=nope"], ["algorithm.name", "nope", "fedavg", "fedprox", "local"]),
        (["rounds=abc"], ["rounds", "abc"]),
        (["data.partition.alpha=0"], ["data.partition.alpha", "greater than 0"]),
        (["cohort.clients_per_round=1000"], ["cohort.clients_per_round", "100"]),
        (["missing-config.yaml"], ["missing-config.yaml", "does not exist"]),
        (["=5"], ["'=5'", "key=value"]),
        (["rounds=2", "a.yaml", "b.yaml"], ["b.yaml", "unexpected argument"]),
    ],
    ids=[
        "unknown-top",
        "unknown-nested",
        "unknown-algorithm",
        "wrong-type",
        "alpha-zero",
        "cohort-too-large",
        "missing-file",
        "malformed-override",
        "two-files",
    ],
)
def test_cli_config_errors(cli, capsys, tmp_path, monkeypatch, args, needles):
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "run"
    rc = cli(["run", *args, "--out", str(out_dir), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 2
    err = captured.err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("fedkin: error: ")
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out_dir.exists()  # nothing written for a rejected config


def test_cli_override_without_equals_is_taken_as_a_missing_file(cli, capsys, tmp_path):
    """`fedkin run rounds` (forgotten `=value`): reported as a config file that does not exist."""
    rc = cli(["run", "rounds", "--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "'rounds'" in err and "does not exist" in err and "Traceback" not in err
