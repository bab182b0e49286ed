"""`fedkin list aggregators|preaggregators|compressors|attacks`."""

from __future__ import annotations

import pytest

from fedkin.channel import AGGREGATORS, ATTACKS, COMPRESSORS, PREAGGREGATORS


@pytest.mark.parametrize(
    ("kind", "registry", "option"),
    [
        ("aggregators", AGGREGATORS, "f = 1: declared Byzantine messages"),
        ("preaggregators", PREAGGREGATORS, "s = 2: bucket size"),
        ("compressors", COMPRESSORS, "density = 0.01: fraction of coordinates kept"),
        ("attacks", ATTACKS, "tau = 0.1: factor"),
    ],
)
def test_list_channel_kind(cli, capsys, monkeypatch, kind, registry, option):
    monkeypatch.setenv("COLUMNS", "250")
    assert cli(["list", kind]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in registry)
    assert option in out
    assert f"{kind} (config key: {registry.key.split('[')[0].split('.name')[0]}" in out
    assert "algorithms (config key" not in out


def test_every_entry_documents_every_option():
    for registry in (AGGREGATORS, PREAGGREGATORS, COMPRESSORS, ATTACKS):
        for name, cls in registry.items():
            assert cls.__doc__, name
            for key, field in cls.model_fields.items():
                assert key == "name" or field.description, (name, key)


def test_a_plugin_aggregator_registers_and_validates(isolated_registries):
    """The channel's registries are open like the others (``fedkin.register_aggregator``)."""
    from typing import Literal

    import torch
    from pydantic import BaseModel, ValidationError

    import fedkin
    from fedkin.channel.aggregators import Aggregator
    from fedkin.channel.pipeline import ChannelConfig

    class FirstConfig(BaseModel):
        """Take the first message."""

        name: Literal["first"] = "first"

        def build(self, seed: int = 0) -> Aggregator:
            return Aggregator(lambda d: {}, lambda x, w, s, r: (x[0], s, {}))

    fedkin.register_aggregator(FirstConfig)
    cfg = ChannelConfig(aggregator={"name": "first"})
    rule = cfg.aggregator.build()
    out, _, _ = rule.apply(torch.eye(2), torch.ones(2), {}, 0)
    assert torch.equal(out, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValidationError, match="bogus"):
        ChannelConfig(aggregator={"name": "bogus"})
