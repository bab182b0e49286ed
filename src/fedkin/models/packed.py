"""The deployable quantized model: integer codes packed at the bit-width, plus centers.

A personal model Q_c(x) is stored as a safetensors file: for each quantized layer its codes
j*(x_k) ∈ {0..M−1} packed b = ⌈log₂ M⌉ bits each (little-endian bit order, the last byte
zero-padded) as ``<name>.codes`` (uint8) and its M centers as ``<name>.centers`` (float32);
every other parameter (first and last layer, biases) as float32 under its own name. Shapes and
bit-widths live in the header metadata. The payload is therefore exactly
Σ_quantized (⌈n_l·b_l / 8⌉ + 4·M_l) + Σ_full-precision 4·n bytes (:func:`payload_bytes`); the
file adds the safetensors header. :func:`load_packed` rebuilds the float parameters.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedkin.core.quantize import Centers, assign, bits_for
from fedkin.core.tree import Tree


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2^bits) → uint8 bytes holding ``bits`` bits per code."""
    shifts = torch.arange(bits)
    stream = ((codes.flatten().unsqueeze(1) >> shifts) & 1).flatten()
    stream = torch.cat([stream, stream.new_zeros(-len(stream) % 8)])
    return (stream.reshape(-1, 8) << torch.arange(8)).sum(1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``count`` codes (int64)."""
    stream = ((packed.to(torch.int64).unsqueeze(1) >> torch.arange(8)) & 1).flatten()
    stream = stream[: count * bits].reshape(count, bits)
    return (stream << torch.arange(bits)).sum(1)


def payload_bytes(params: Tree, centers: Centers) -> int:
    """Bytes of the packed tensors: codes at ⌈log₂ M⌉ bits, centers and other params float32."""
    total = 0
    for name, p in params.items():
        if name in centers:
            m = centers[name].numel()
            total += math.ceil(p.numel() * bits_for(m) / 8) + 4 * m
        else:
            total += 4 * p.numel()
    return total


def save_packed(params: Tree, centers: Centers, path: str | Path) -> int:
    """Write Q_c(x) of weights ``params`` and ``centers`` packed to ``path``; returns its size in
    bytes. ``params`` are the full-precision weights x (or already-quantized ones)."""
    tensors, meta = {}, {}
    for name, p in params.items():
        p = p.detach().to(torch.float32)
        if name in centers:
            c = centers[name].detach().to(torch.float32)
            bits = bits_for(c.numel())
            tensors[f"{name}.codes"] = pack_codes(assign(p, c), bits)
            tensors[f"{name}.centers"] = c.contiguous()
            meta[name] = {"shape": list(p.shape), "bits": bits}
        else:
            tensors[name] = p.contiguous()
    save_file(tensors, str(path), metadata={"fedkin.quantized": json.dumps(meta)})
    return Path(path).stat().st_size


def load_packed(path: str | Path) -> tuple[Tree, dict[str, int]]:
    """The float parameters of a packed model, and the bit-width of each quantized layer."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["fedkin.quantized"])
    tensors = load_file(str(path))
    params: Tree = {}
    for name, t in tensors.items():
        layer = name.rsplit(".", 1)[0]
        if layer in meta:
            if name.endswith(".codes"):
                shape, bits = meta[layer]["shape"], meta[layer]["bits"]
                codes = unpack_codes(t, bits, math.prod(shape))
                params[layer] = tensors[f"{layer}.centers"][codes].reshape(shape)
        else:
            params[name] = t
    return params, {name: m["bits"] for name, m in meta.items()}
