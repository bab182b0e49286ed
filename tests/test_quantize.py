"""Quantization-aware training pieces (core/quantize.py) and the packed artifact (models/packed.py)
against closed forms, brute force and autograd."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from fedkin.core import quantize as qz
from fedkin.models.packed import load_packed, pack_codes, payload_bytes, save_packed, unpack_codes
from fedkin.optim import sgd

GRID = torch.linspace(-2, 2, 400_001, dtype=torch.float64)  # step 1e-5


def _brute_prox(z: float, c: torch.Tensor, step: float, kind: str) -> float:
    """argmin_x (x − z)²/2 + step·min_j d(x, c_j) over a fine grid (the true prox)."""
    d = (GRID.unsqueeze(1) - c.to(torch.float64)).abs()
    d = d if kind == "l1" else d.pow(2)
    return float(GRID[torch.argmin(0.5 * (GRID - z) ** 2 + step * d.min(1).values)])


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_weight_prox_is_the_true_prox(kind):
    c = torch.tensor([-0.8, -0.1, 0.3, 1.0])
    zs = torch.tensor([-1.3, -0.85, -0.6, -0.12, 0.05, 0.31, 0.5, 0.9, 1.4])
    for step in (0.02, 0.1):
        got = qz.prox_weights(zs, c, torch.tensor(step), kind)
        want = torch.tensor([_brute_prox(float(z), c, step, kind) for z in zs])
        assert_close(got, want, atol=2e-5, rtol=0)
    # ℓ1 snaps to the center inside the threshold and soft-thresholds outside it
    snap = qz.prox_weights(torch.tensor([0.31, 0.6]), c, torch.tensor(0.05), "l1")
    assert_close(snap, torch.tensor([0.3, 0.55]))


def test_l2_center_prox_zeroes_the_gradient_of_its_objective():
    """c = (z + 2ηλ Σ_{S_j} x) / (1 + 2ηλ|S_j|) minimizes
    ‖c − z‖²/(2η) + λ Σ_k (x_k − c_{j(k)})²."""
    torch.manual_seed(0)
    c = torch.tensor([-0.5, 0.0, 0.4, 0.9])
    x = torch.randn(200) * 0.5
    z = c + torch.tensor([0.01, -0.02, 0.03, 0.0])
    eta, lam = 0.1, 0.3
    new = qz.center_step(z, x, c, torch.tensor(eta * lam), "l2")
    v = new.clone().requires_grad_(True)
    member = qz.assign(x, c)
    obj = (v - z).pow(2).sum() / (2 * eta) + lam * (x - v[member]).pow(2).sum()
    (g,) = torch.autograd.grad(obj, v)
    assert_close(g, torch.zeros(4), atol=1e-4, rtol=0)


@pytest.mark.parametrize("code_sign", [False, True])
def test_l1_center_step_is_the_subgradient_step_and_the_code_flips_it(code_sign):
    torch.manual_seed(1)
    c = torch.tensor([-0.5, 0.0, 0.4])
    x = torch.randn(300) * 0.4
    z = c.clone()
    eta, lam = 1e-3, 0.5
    new = qz.center_step(z, x, c, torch.tensor(eta * lam), "l1", code_l1_sign=code_sign)
    v = c.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(lam * (x - v[qz.assign(x, c)]).abs().sum(), v)
    want = z + eta * g if code_sign else z - eta * g  # descent: c − η ∂R/∂c
    assert_close(new, torch.sort(want).values)
    # the descent step lowers the penalty; the code's sign raises it
    r_old = (x - c[qz.assign(x, c)]).abs().sum()
    r_new = (x - new[qz.assign(x, c)]).abs().sum()
    assert (r_new > r_old) if code_sign else (r_new < r_old)


def test_soft_quantizer_tends_to_the_hard_one():
    torch.manual_seed(2)
    c = torch.tensor([-0.7, -0.2, 0.1, 0.8])
    x = torch.randn(10_000)
    mids = (c[1:] + c[:-1]) / 2
    x = x[(x.unsqueeze(1) - mids).abs().min(1).values > 1e-3]  # off the midpoints
    hard = qz.hard_quantize(x, c)
    gaps = [(qz.soft_quantize(x, c, p) - hard).abs().max() for p in (10.0, 1e3, 1e5)]
    assert gaps[0] > gaps[1] > gaps[2]
    assert_close(qz.soft_quantize(x, c, 1e5), hard, atol=1e-6, rtol=0)
    assert set(hard.unique().tolist()) <= set(c.tolist())


def test_hard_quantizer_is_nearest_center_with_straight_through_gradients():
    torch.manual_seed(3)
    c = torch.tensor([-0.3, 0.2, 0.6]).requires_grad_(True)
    x = torch.randn(50).requires_grad_(True)
    q = qz.hard_quantize(x, c)
    nearest = c.detach()[(x.detach().unsqueeze(1) - c.detach()).abs().argmin(1)]
    assert_close(q.detach(), nearest)
    up = torch.randn(50)
    gx, gc = torch.autograd.grad((q * up).sum(), (x, c))
    assert_close(gx, up)
    member = qz.assign(x.detach(), c.detach())
    assert_close(gc, torch.stack([up[member == j].sum() for j in range(3)]))


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_distance_penalty_is_the_sum_of_nearest_distances(kind):
    x, c = torch.tensor([-1.0, 0.1, 0.5]), torch.tensor([-0.5, 0.4])
    d = [0.5, 0.3, 0.1]
    want = sum(d) if kind == "l1" else sum(v * v for v in d)
    assert float(qz.distance_penalty(x, c, kind)) == pytest.approx(want)


def test_layer_selection_and_center_init():
    params = {
        "conv1.weight": torch.randn(4, 1, 3, 3),
        "conv1.bias": torch.randn(4),
        "conv2.weight": torch.tensor([[-0.4, -0.2], [0.1, 0.5]]),
        "fc.weight": torch.randn(10, 6),
        "fc.bias": torch.randn(10),
    }
    assert qz.quantized_layers(params) == ["conv2.weight"]
    two = qz.init_centers(params, ["conv2.weight"], 2)["conv2.weight"]
    assert_close(two, torch.tensor([-0.3, 0.3]))
    four = qz.init_centers(params, ["conv2.weight"], 4)["conv2.weight"]
    assert_close(four, torch.linspace(-0.4, 0.5, 4))
    assert [qz.bits_for(m) for m in (2, 3, 4, 16)] == [1, 2, 2, 4]


def test_lambda_grows_linearly_with_the_round_and_is_capped():
    r = torch.tensor([0, 1, 9])
    assert_close(qz.lam_at(0.1, r), torch.tensor([0.1, 0.2, 1.0]))
    assert_close(qz.lam_at(0.1, r, lam_max=0.15), torch.tensor([0.1, 0.15, 0.15]))


def test_prox_optimizer_steps_freezes_and_keeps_centers_sorted():
    torch.manual_seed(4)
    x = {"a": torch.randn(3, 4), "b": torch.randn(5)}
    c = {"a": torch.tensor([-0.5, 0.5])}
    g = {"x": {"a": torch.randn(3, 4), "b": torch.randn(5)}, "c": {"a": torch.tensor([30.0, -1.0])}}
    params = {"x": x, "c": c}
    lam = torch.tensor(2.0)
    opt = qz.prox_optimizer(sgd(0.1), lam, 0.01, "l2", torch.tensor(False), center_grad_clip=10)
    new, _ = opt.step(g, opt.init(params), params)
    z = x["a"] - 0.1 * g["x"]["a"]
    assert_close(new["x"]["a"], qz.prox_weights(z, c["a"], 0.1 * lam, "l2"))
    assert_close(new["x"]["b"], x["b"] - 0.1 * g["x"]["b"])  # full-precision layer: plain step
    zc = c["a"] - 0.01 * torch.tensor([10.0, -1.0])  # clipped gradient
    assert_close(new["c"]["a"], qz.center_step(zc, new["x"]["a"], c["a"], 0.01 * lam, "l2"))
    frozen = qz.prox_optimizer(sgd(0.1), lam, 0.01, "l2", torch.tensor(True), finetune_lr=0.0)
    f, _ = frozen.step(g, frozen.init(params), params)
    assert_close(f["x"]["a"], qz.hard_quantize(x["a"], c["a"]))
    assert_close(f["c"]["a"], c["a"])


# ----- packed artifact -----------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_pack_unpack_roundtrip(bits):
    codes = torch.randint(0, 2**bits, (1001,))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-1001 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, 1001), codes)


@pytest.mark.parametrize("m", [2, 4])
def test_packed_file_size_is_the_bit_count_and_loads_the_quantized_model(tmp_path, m):
    torch.manual_seed(5)
    params = {
        "l0.weight": torch.randn(8, 5),
        "l0.bias": torch.randn(8),
        "l1.weight": torch.randn(33, 8),
        "l2.weight": torch.randn(3, 33),
    }
    c = qz.init_centers(params, ["l1.weight"], m)
    path = tmp_path / "model.safetensors"
    size = save_packed(params, c, path)
    header = int.from_bytes(path.read_bytes()[:8], "little")
    bits = 33 * 8 * qz.bits_for(m)
    want = -(-bits // 8) + 4 * m + 4 * (8 * 5 + 8 + 3 * 33)
    assert payload_bytes(params, c) == want
    assert size - 8 - header == want
    loaded, widths = load_packed(path)
    assert widths == {"l1.weight": qz.bits_for(m)}
    q = qz.quantize_tree(params, c)
    for k in params:
        assert torch.equal(loaded[k], q[k])
    assert loaded["l1.weight"].unique().numel() <= m
