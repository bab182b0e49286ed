"""Model zoo: output shapes, vmap over stacked parameters, deterministic seeded construction."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap
from torch.testing import assert_close

from fedkin.core.errors import ConfigError
from fedkin.models import CNN, MLP, CnnConfig, LogisticRegression, LogRegConfig, MlpConfig
from fedkin.models import build_model as build

FEATURES = (64,)
IMAGE = (1, 8, 8)
CLASSES = 10

CONFIGS = {
    "logreg": LogRegConfig(),
    "mlp": MlpConfig(hidden=[12, 7]),
    "cnn": CnnConfig(channels=[3, 4], hidden=9),
}


def make(name: str, seed: int = 0) -> torch.nn.Module:
    return build(CONFIGS[name], FEATURES, IMAGE, CLASSES, seed=seed)


@pytest.mark.parametrize("name", CONFIGS)
def test_output_shape(name):
    model = make(name)
    for batch in (1, 5):
        out = model(torch.rand(batch, *FEATURES))
        assert out.shape == (batch, CLASSES)
        assert torch.isfinite(out).all()


def test_model_classes_and_structure():
    assert isinstance(make("logreg"), LogisticRegression)
    mlp = make("mlp")
    assert isinstance(mlp, MLP)
    linears = [m for m in mlp.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 12), (12, 7), (7, 10)]
    cnn = make("cnn")
    assert isinstance(cnn, CNN)
    convs = [m for m in cnn.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(m.in_channels, m.out_channels) for m in convs] == [(1, 3), (3, 4)]
    # two 2x2 poolings: 8x8 -> 2x2, so the head sees 4 * 2 * 2 features
    assert cnn.head[1].in_features == 16
    # the CNN accepts flat or image-shaped input with the same result
    x = torch.rand(3, 64)
    assert_close(cnn(x), cnn(x.view(3, *IMAGE)))


def test_cnn_needs_image_data():
    with pytest.raises(ConfigError, match="cnn"):
        build(CnnConfig(), FEATURES, None, CLASSES, seed=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_vmap_over_stacked_params_matches_per_model_calls(name):
    models = [make(name, seed=s) for s in range(4)]
    params, _ = stack_module_state(models)
    base = make(name)
    x = torch.rand(4, 6, *FEATURES)  # a different batch per model

    def call(p, xb):
        return functional_call(base, p, (xb,))

    batched = vmap(call)(params, x)
    assert batched.shape == (4, 6, CLASSES)
    for i, m in enumerate(models):
        assert_close(batched[i], m(x[i]), rtol=1e-5, atol=1e-5)
    # shared input, stacked params (in_dims None for x)
    shared = vmap(call, in_dims=(0, None))(params, x[0])
    for i, m in enumerate(models):
        assert_close(shared[i], m(x[0]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_build_is_deterministic_in_seed(name):
    a, b, c = make(name, 5), make(name, 5), make(name, 6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert_close(sa, sb, rtol=0, atol=0)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("name", CONFIGS)
def test_build_does_not_touch_global_rng(name):
    torch.manual_seed(321)
    state = torch.get_rng_state()
    make(name, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    # and the global RNG state does not leak into the weights
    torch.manual_seed(1)
    a = make(name, seed=2).state_dict()
    torch.manual_seed(2)
    b = make(name, seed=2).state_dict()
    assert_close(a, b, rtol=0, atol=0)
