"""fedkin's bf16 AdamW against torchao's ``_AdamW(bf16_stochastic_round=True)`` (0.18, runs on
CPU through torch.compile/inductor).

The random bits cannot be shared: torchao draws them from the global generator
(``torch.randint``) and fedkin from a counter-based hash, and torchao rounds the *states* to
nearest (``copy_`` into bf16 buffers) where fedkin rounds them stochastically. So the check is
statistical: torchao's stochastic rounding cast has the same law as fedkin's (each value rounds
away from zero with probability (low 16 bits)/2¹⁶), and in the regime where round-to-nearest
stalls (every Adam step below half a bf16 ulp) both optimizers follow fp32 in the mean while
both round-to-nearest versions keep the weights exactly where they started.
"""

from __future__ import annotations

import pytest
import torch

from fedkin.optim import AdamWConfig
from fedkin.optim.optimizer import working
from fedkin.optim.precision import stochastic_round_bf16

torchao_optim = pytest.importorskip("torchao.optim")
quant_utils = pytest.importorskip("torchao.optim.quant_utils")

pytestmark = pytest.mark.slow  # torch.compile of torchao's step: ~10 s on 2 cores


def test_stochastic_rounding_has_torchaos_law():
    """Per value, P(round away from zero) = frac/2¹⁶ for both casts: the empirical rates over
    400 draws agree with it and with each other within 5 standard errors."""
    torch.manual_seed(0)
    x = torch.tensor([1.0 + 2**-9, -3.0 - 3 * 2**-10, 0.1, 1e-3, -7.77, 2.5 + 2**-8 + 2**-12])
    down = x.view(torch.int32) & -65536
    frac = (x.view(torch.int32) & 0xFFFF).double() / 2**16
    draws = 400
    ours = torch.stack([stochastic_round_bf16(x, 0, k).float() for k in range(draws)])
    theirs = torch.stack([quant_utils._fp32_to_bf16_sr(x.clone()).float() for _ in range(draws)])
    for sample in (ours, theirs):
        away = (sample.view(torch.int32) != down).double().mean(0)
        se = (frac * (1 - frac) / draws).sqrt().clamp(min=1e-3)
        assert ((away - frac).abs() <= 5 * se).all()
        assert ((sample.double().mean(0) - x.double()).abs() <= 5 * se * 2**-7 * x.abs()).all()


def _fedkin(precision: str, w0: torch.Tensor, grads: list[torch.Tensor], lr: float):
    """Held as the local solver holds them: bf16 tensors for the bf16 optimizers (as torchao's
    bf16 parameters), fp32 for fp32."""
    opt = AdamWConfig(lr=lr, weight_decay=0.0, precision=precision).build()
    params = working(opt, {"w": w0.clone()})
    state = opt.init(params)
    for g in grads:
        params, state = opt.step({"w": g}, state, params)
    assert params["w"].dtype == (opt.dtype or torch.float32)
    return params["w"].float()


def _torchao(stochastic: bool, w0: torch.Tensor, grads: list[torch.Tensor], lr: float):
    p = torch.nn.Parameter(w0.clone().bfloat16())
    opt = torchao_optim._AdamW([p], lr=lr, weight_decay=0.0, bf16_stochastic_round=stochastic)
    for g in grads:
        p.grad = g.bfloat16()
        opt.step()
    return p.detach().float()


def test_small_updates_stall_with_nearest_and_follow_fp32_with_stochastic_rounding():
    """Weights in [1, 2) (half ulp 2⁻⁸), Adam steps of ≈ η = 2⁻¹¹ with gradients of random
    magnitude and a fixed sign per coordinate: 40 steps move fp32 by ≈ 0.02."""
    torch.manual_seed(1)
    n, steps, lr = 2048, 40, 2.0**-11
    w0 = (1 + torch.rand(n)).bfloat16().float()
    sign = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
    grads = [sign * (0.5 + torch.rand(n)) for _ in range(steps)]
    grads = [g.bfloat16().float() for g in grads]  # torchao's gradients are bf16
    fp32 = _fedkin("fp32", w0, grads, lr)
    moved = (fp32 - w0).abs().mean()
    assert moved > 0.015
    # round-to-nearest: every step is lost, in both implementations
    assert torch.equal(_fedkin("bf16-nearest", w0, grads, lr), w0)
    assert torch.equal(_torchao(False, w0, grads, lr), w0)
    # stochastic rounding: the mean displacement follows fp32 (per-coordinate noise averages
    # out over 2048 coordinates); the two implementations agree with each other likewise
    ours = _fedkin("bf16-stochastic", w0, grads, lr)
    theirs = _torchao(True, w0, grads, lr)
    for sr in (ours, theirs):
        assert torch.equal(sr.bfloat16().float(), sr)
        err = ((sr - w0) * sign).mean() - ((fp32 - w0) * sign).mean()
        assert abs(float(err)) < 0.05 * float(moved)
    assert abs(float(((ours - theirs) * sign).mean())) < 0.05 * float(moved)
