"""engine.device: validated against what this torch can use; the engine computes there."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from fedkin.core.errors import ConfigError
from fedkin.engine import EngineConfig, VectorizedEngine


def test_engine_places_every_input_on_its_device():
    """Shared and per-client inputs made on the CPU reach the client function on the engine's
    device (``meta``: shapes only, so this runs without a GPU), and the outputs come back to
    the device of the per-client inputs (here meta too, since those were made there)."""
    seen = []

    def fn(shared, own):
        seen.extend(t.device.type for t in (shared["w"], own["x"], own["y"]))
        return {"z": (shared["w"] * own["x"]).sum() + own["y"].float().sum()}

    shared = {"w": torch.ones(3)}  # on the CPU
    own = {"x": torch.ones(4, 3, device="meta"), "y": torch.zeros(4, 2, dtype=torch.long)}
    out = VectorizedEngine(device="meta").map(fn, (shared, own), (None, 0))
    assert set(seen) == {"meta"} and out["z"].device.type == "meta"
    assert out["z"].shape == (4,)


def test_engine_on_the_cpu_device_returns_the_same_numbers():
    def fn(w, x):
        return {"z": (w * x).sum()}

    w, x = torch.randn(3), torch.randn(5, 3)
    torch.testing.assert_close(
        VectorizedEngine(device="cpu").map(fn, (w, x), (None, 0)),
        VectorizedEngine().map(fn, (w, x), (None, 0)),
        rtol=0,
        atol=0,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a CPU-only torch")
def test_unavailable_device_is_one_clear_error():
    with pytest.raises(ValueError, match=r"engine\.device=cuda: CUDA is not available"):
        EngineConfig(device="cuda")
    with pytest.raises(ConfigError, match=r"engine\.device=tpu: unknown device; allowed here: cpu"):
        tiny_config("engine.device=tpu")
    assert EngineConfig(device="cpu").build().device is None
