"""Measured memory (fedkin.optim.memory): the profiler's live-allocation peak is exact on known
allocations; backprop needs more than inference, MeZO about as much as inference."""

from __future__ import annotations

import torch
from torch.func import functional_call

from fedkin.optim import OPTIMIZERS
from fedkin.optim.memory import inference_bytes, peak_bytes, step_bytes


def test_peak_bytes_is_the_peak_of_live_tensor_allocations():
    def run():
        a = torch.empty(250_000)  # 1 MB
        del a
        b = torch.empty(500_000)  # 2 MB, alive with c
        c = torch.empty(125_000)  # 0.5 MB
        return b, c

    assert peak_bytes(run) == 2_500_000
    kept = torch.empty(1_000_000)
    assert peak_bytes(lambda: torch.empty(10)) == 40  # what existed before is not counted
    del kept


def _mlp():
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 10),
    ).requires_grad_(False)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def forward(p, x):
        return functional_call(model, p, (x,))

    def objective(p, x, y):
        loss = torch.nn.functional.cross_entropy(forward(p, x), y)
        return loss, loss

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 256, generator=g), torch.randint(0, 10, (32,), generator=g)
    return forward, objective, params, x, y


def test_backprop_needs_more_than_inference_and_mezo_about_as_much():
    forward, objective, params, x, y = _mlp()
    weights = sum(t.numel() * 4 for t in params.values())
    inference = inference_bytes(forward, params, x)
    assert weights < inference < 1.3 * weights  # weights dominate at batch 32
    sgd = step_bytes(objective, OPTIMIZERS.entry("sgd").config().build(), params, x, y)
    adam = step_bytes(objective, OPTIMIZERS.entry("adam").config().build(), params, x, y)
    mezo = step_bytes(objective, OPTIMIZERS.entry("mezo").config().build(), params, x, y)
    # backprop: + gradient + new weights beside the old (+ Adam's two moments)
    assert sgd > 2.5 * inference
    assert adam > sgd + 1.9 * weights
    assert inference <= mezo <= 1.3 * inference


def test_held_bytes_are_the_stored_tensors_bf16_halves_weights_and_state():
    from fedkin.optim import AdamWConfig
    from fedkin.optim.memory import held_bytes, storage_bytes

    t = torch.zeros(100)
    assert storage_bytes({"a": t, "b": t[:10]}) == 400  # one storage, counted once
    assert storage_bytes(torch.zeros(10, dtype=torch.bfloat16)) == 20
    _, objective, params, x, y = _mlp()
    d = sum(v.numel() for v in params.values())
    held = {
        p: held_bytes(objective, AdamWConfig(precision=p).build(), params, x, y)
        for p in ("fp32", "bf16-nearest", "bf16-stochastic")
    }
    assert held["fp32"][0] == 4 * d and 8 * d <= held["fp32"][1] <= 8 * d + 64
    for p in ("bf16-nearest", "bf16-stochastic"):
        weights, state = held[p]
        assert weights == 2 * d and 4 * d <= state <= 4 * d + 64
        assert weights + state <= 0.5 * sum(held["fp32"]) + 64
