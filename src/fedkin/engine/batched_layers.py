"""Cohort-batched forward and backward of the layers the zoo's MLP and CNN are built from.

Each client ``i`` of a cohort of ``n`` has its own parameters, stacked along a leading client
dimension (``W[i]`` is client ``i``'s weight). Activations travel in one of two layouts:

* flat ``[n, B, F]``: the client is the batch dimension of ``bmm``;
* image ``[B, n·C, H, W]``: the cohort is folded into the channels (client ``i`` owns channels
  ``i·C … i·C + C − 1``), so a convolution with per-client weights is one grouped convolution
  with ``groups = n``, and ReLU and max-pooling, which act channel by channel, need nothing.

Every layer has ``forward(h, params, n) -> (out, saved)`` and ``backward(δ, saved, params, η,
need_input) -> (δ_in, new_params)``: the backward takes ``δ = ∂(B·ℓ)/∂out`` (the 1/B of the
mean loss goes into the step size ``η``) and returns the input's ``δ`` (when ``need_input``)
and the parameters after one SGD step ``θ − η ∇θ`` — for a linear layer ``W ← W − η δᵀh`` as
one fused ``baddbmm``. Convolution and max-pooling backward call the ATen kernels autograd
would call (``convolution_backward`` with only the gradients needed — none for the data —,
``max_pool2d_with_indices_backward``), so the numbers are those of ``vmap(grad(…))`` up to
float reassociation (tested in ``tests/test_engine_fastpath.py``; in float64 those of the
sequential engine to 1e-12 on quantized images). In float32 the reassociation can decide a
max-pool window whose two largest inputs are a few ulps apart the other way, which sends that
window's gradient to another position: on real images the update then differs from the
sequential engine's by ~1e-5, as vmap's does (benchmarks/results/throughput.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Params = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class ClientFlatten:
    """The cohort's inputs ``[n, B, …]`` as flat features ``[n, B, F]`` (``x.flatten(1)``)."""

    names: tuple[str, ...] = ()

    def forward(self, h: torch.Tensor, p: Params, n: int) -> tuple[torch.Tensor, Any]:
        return h.flatten(2), None


@dataclass(frozen=True)
class ClientImages:
    """The cohort's inputs ``[n, B, …]`` as images in the folded layout ``[B, n·C, H, W]``
    (``x.reshape(-1, C, H, W)`` per client)."""

    shape: tuple[int, int, int]
    channels_last: bool = False
    names: tuple[str, ...] = ()

    def forward(self, h: torch.Tensor, p: Params, n: int) -> tuple[torch.Tensor, Any]:
        c, height, width = self.shape
        images = h.reshape(n, -1, c, height, width).transpose(0, 1)
        folded = images.reshape(images.shape[0], n * c, height, width)
        if self.channels_last:
            return folded.contiguous(memory_format=torch.channels_last), None
        return folded, None


@dataclass(frozen=True)
class ImageFlatten:
    """``nn.Flatten`` after the convolutions: ``[B, n·C, H, W] → [n, B, C·H·W]``."""

    names: tuple[str, ...] = ()

    def forward(self, h: torch.Tensor, p: Params, n: int) -> tuple[torch.Tensor, Any]:
        return h.reshape(h.shape[0], n, -1).transpose(0, 1), h.shape

    def backward(
        self, delta: torch.Tensor, saved: Any, p: Params, lr: float, need_input: bool
    ) -> tuple[torch.Tensor | None, Params]:
        return delta.transpose(0, 1).reshape(saved), ()


@dataclass(frozen=True)
class Relu:
    names: tuple[str, ...] = ()

    def forward(self, h: torch.Tensor, p: Params, n: int) -> tuple[torch.Tensor, Any]:
        out = h.relu()
        return out, out

    def backward(
        self, delta: torch.Tensor, saved: Any, p: Params, lr: float, need_input: bool
    ) -> tuple[torch.Tensor | None, Params]:
        # keep δ where the output (equivalently the pre-activation) is positive
        return torch.ops.aten.threshold_backward(delta, saved, 0.0), ()


@dataclass(frozen=True)
class Linear:
    """``a = h Wᵀ + b`` per client: ``∇W = δᵀh``, ``∇b = Σ_rows δ``, ``δ_in = δ W``."""

    names: tuple[str, ...]

    def forward(self, h: torch.Tensor, p: Params, n: int) -> tuple[torch.Tensor, Any]:
        weight, bias = p
        return torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2)), h

    def backward(
        self, delta: torch.Tensor, saved: Any, p: Params, lr: float, need_input: bool
    ) -> tuple[torch.Tensor | None, Params]:
        weight, bias = p
        new = (
            torch.baddbmm(weight, delta.transpose(1, 2), saved, alpha=-lr),
            torch.add(bias, delta.sum(1), alpha=-lr),
        )
        return (torch.bmm(delta, weight) if need_input else None), new


@dataclass(frozen=True)
class Conv2d:
    """A per-client convolution as one grouped convolution over the folded channels."""

    names: tuple[str, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]

    @staticmethod
    def _folded(weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(-1, *weight.shape[2:])  # [n·O, C, k, k]

    def forward(self, h: torch.Tensor, p: Params, n: int) -> tuple[torch.Tensor, Any]:
        weight, bias = p
        out = torch.nn.functional.conv2d(
            h,
            self._folded(weight),
            bias.reshape(-1),
            self.stride,
            self.padding,
            self.dilation,
            groups=weight.shape[0],
        )
        return out, h

    def backward(
        self, delta: torch.Tensor, saved: Any, p: Params, lr: float, need_input: bool
    ) -> tuple[torch.Tensor | None, Params]:
        weight, bias = p
        folded = self._folded(weight)
        grad_in, grad_w, grad_b = torch.ops.aten.convolution_backward(
            delta,
            saved,
            folded,
            [folded.shape[0]],
            self.stride,
            self.padding,
            self.dilation,
            False,
            [0] * len(self.stride),
            weight.shape[0],
            [need_input, True, True],
        )
        new = (
            torch.add(weight, grad_w.view(weight.shape), alpha=-lr),
            torch.add(bias, grad_b.view(bias.shape), alpha=-lr),
        )
        return grad_in, new


@dataclass(frozen=True)
class MaxPool2d:
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    ceil_mode: bool
    names: tuple[str, ...] = ()

    def forward(self, h: torch.Tensor, p: Params, n: int) -> tuple[torch.Tensor, Any]:
        out, idx = torch.ops.aten.max_pool2d_with_indices(
            h, self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode
        )
        return out, (h, idx)

    def backward(
        self, delta: torch.Tensor, saved: Any, p: Params, lr: float, need_input: bool
    ) -> tuple[torch.Tensor | None, Params]:
        h, idx = saved
        grad = torch.ops.aten.max_pool2d_with_indices_backward(
            delta, h, self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode, idx
        )
        return grad, ()


Layer = ClientFlatten | ClientImages | ImageFlatten | Relu | Linear | Conv2d | MaxPool2d


def _pair(v: int | tuple[int, ...]) -> tuple[int, ...]:
    return (v, v) if isinstance(v, int) else tuple(v)


def batched_layer(module: nn.Module, prefix: str) -> Layer | None:
    """The batched equivalent of ``module`` (its parameters named ``prefix.weight`` and
    ``prefix.bias``), or None for a module or setting this file does not cover."""
    names = (f"{prefix}.weight", f"{prefix}.bias")
    if type(module) is nn.ReLU:
        return Relu()
    if type(module) is nn.Linear and module.bias is not None:
        return Linear(names)
    if type(module) is nn.Flatten and (module.start_dim, module.end_dim) == (1, -1):
        return ImageFlatten()
    if (
        type(module) is nn.Conv2d
        and module.bias is not None
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    ):
        return Conv2d(names, _pair(module.stride), _pair(module.padding), _pair(module.dilation))
    if type(module) is nn.MaxPool2d and not module.return_indices:
        kernel = _pair(module.kernel_size)
        stride = _pair(module.stride) if module.stride else kernel
        padding, dilation = _pair(module.padding), _pair(module.dilation)
        return MaxPool2d(kernel, stride, padding, dilation, bool(module.ceil_mode))
    return None
