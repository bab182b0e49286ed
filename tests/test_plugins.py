"""Plugins: ``--plugin MODULE`` on every command, ``plugins:`` in configs, entry points."""

from __future__ import annotations

import sys
import textwrap

import pytest
import yaml

from conftest import tiny
from fedkin import plugins
from fedkin.optim import OPTIMIZERS

PLUGIN = '''
"""A test plugin: an optimizer that is SGD at half the given learning rate."""
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

import fedkin
from fedkin.optim import sgd


@fedkin.register_optimizer
class HalfSgdConfig(BaseModel):
    """SGD at half the given learning rate."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["{name}"] = "{name}"
    lr: float = Field(0.1, gt=0, description="twice the step size")

    def build(self):
        return sgd(self.lr / 2)
'''


def write_plugin(directory, module: str, name: str = "half-sgd") -> None:
    (directory / f"{module}.py").write_text(PLUGIN.replace("{name}", name))


@pytest.mark.parametrize(
    ("source", "error"),
    [
        (None, "ModuleNotFoundError: No module named 'fedkin_missing_plugin'"),
        ("import no_such_dependency_xyz", "ModuleNotFoundError: No module named 'no_such_dep"),
        ("raise RuntimeError('boom')", "RuntimeError: boom"),
    ],
)
def test_a_plugin_that_fails_to_import_is_one_line_and_exit_2(
    cli, capsys, tmp_path, monkeypatch, isolated_registries, source, error
):
    if source is not None:
        (tmp_path / "fedkin_missing_plugin.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
    assert cli(["list", "--plugin", "fedkin_missing_plugin"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("fedkin: error: plugin 'fedkin_missing_plugin' failed to import: ")
    assert error in err


def test_every_command_takes_plugin():
    import argparse

    from fedkin.cli.main import build_parser

    def leaves(parser, path=()):
        groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not groups:
            yield path, parser
        for group in groups:
            for name, child in group.choices.items():
                yield from leaves(child, (*path, name))

    found = list(leaves(build_parser()))
    assert {p[0] for p, _ in found} >= {"run", "compare", "list", "estimate", "privacy", "bench"}
    for path, parser in found:
        options = {o for a in parser._actions for o in a.option_strings}
        assert "--plugin" in options, path


def test_run_records_its_plugins_and_resume_loads_them(
    cli, capsys, tmp_path, monkeypatch, isolated_registries
):
    write_plugin(tmp_path, "fedkin_test_opt")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    args = [*tiny("client.optimizer.name=half-sgd", "rounds=2"), "--out", str(out), "--quiet"]
    assert cli(["run", "--plugin", "fedkin_test_opt", *args]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["plugins"] == ["fedkin_test_opt"]
    assert saved["client"]["optimizer"] == {"name": "half-sgd", "lr": 0.1}
    # forget the plugin (as a new process would); resuming without --plugin brings it back
    registry = isolated_registries[3]
    del registry._entries["half-sgd"], sys.modules["fedkin_test_opt"]
    registry._version += 1
    assert "half-sgd" not in OPTIMIZERS
    (out / "summary.json").unlink()
    assert cli(["run", "--resume", str(out), "--quiet"]) == 0
    assert "half-sgd" in OPTIMIZERS and "fedkin_test_opt" in sys.modules


def test_list_shows_a_plugin_from_the_current_directory(
    cli, capsys, tmp_path, monkeypatch, isolated_registries
):
    """``--plugin MODULE`` finds MODULE in the current directory, as ``python -m`` would."""
    write_plugin(tmp_path, "fedkin_cwd_plugin", name="cwd-sgd")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    assert cli(["list", "optimizers", "--plugin", "fedkin_cwd_plugin"]) == 0
    out = capsys.readouterr().out
    assert "cwd-sgd" in out and "twice the step size" in out


def test_entry_point_plugins_load_when_a_registry_is_first_read(
    tmp_path, monkeypatch, isolated_registries
):
    """An installed package's ``fedkin.plugins`` entry point (a dist-info on sys.path)."""
    write_plugin(tmp_path, "fedkin_ep_plugin", name="ep-sgd")
    dist = tmp_path / "fedkin_ep_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fedkin-ep-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        textwrap.dedent(
            """
            [fedkin.plugins]
            ep = fedkin_ep_plugin
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    registry = isolated_registries[3]
    monkeypatch.setattr(registry, "_loaded", False)
    assert "ep-sgd" in OPTIMIZERS  # the first read loads the entry points

    (tmp_path / "fedkin_ep_plugin.py").write_text("raise ImportError('broken install')")
    del sys.modules["fedkin_ep_plugin"]
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    with pytest.raises(plugins.PluginError, match=r"entry point 'ep' .* broken install"):
        plugins.load_entry_points()
