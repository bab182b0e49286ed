"""Uplink compressors: a client's message ``x ∈ ℝ^d`` → the bytes that go on the wire → x̂.

Every compressor encodes to a real ``bytes`` buffer (indices, values, scales packed; nothing
implied), so the bytes a message costs are ``len(buffer)``. The receiver knows ``d`` (the model's
size) and the round's public randomness, so neither is sent. Randomness comes from
:class:`fedkin.core.rng.Stream` counters keyed by (round, client, coordinate): runs reproduce
exactly and the server regenerates random-k's coordinates instead of receiving them.

Error feedback (Stich et al. 2018; Karimireddy et al. 2019) is generic: with residual e (the
client's channel state, kept in its client-state entry), the client sends C(p) for p = x + e and
keeps e' = p − x̂. Hence Σ_t x̂_t + e_T = Σ_t x_t: nothing is ever lost, only delayed.
"""

from __future__ import annotations

import math
import struct
import zlib
from abc import abstractmethod
from collections.abc import Callable
from typing import Literal, NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from fedkin.core.rng import Stream, hash_counters
from fedkin.registry import COMPRESSOR_REGISTRY, register_compressor

Encode = Callable[[torch.Tensor, int, int], bytes]
Decode = Callable[[bytes, int, int, int], torch.Tensor]


class Compressed(NamedTuple):
    """What one client's compression produced: the wire buffer, the value the server decodes,
    and the new error-feedback residual (zeros without error feedback)."""

    buffer: bytes
    sent: torch.Tensor
    residual: torch.Tensor


class Compressor(NamedTuple):
    """``encode(p, round, client) -> bytes`` and ``decode(buffer, d, round, client) -> p̂``."""

    encode: Encode
    decode: Decode
    error_feedback: bool

    def compress(
        self, x: torch.Tensor, residual: torch.Tensor | None, round_: int, client: int
    ) -> Compressed:
        """Client half: encode x (plus the residual under error feedback); also decode it, as
        the server will, to get the value sent and the new residual e' = p − x̂."""
        p = x + residual if self.error_feedback and residual is not None else x
        buffer = self.encode(p, round_, client)
        sent = self.decode(buffer, x.numel(), round_, client).to(x.dtype)
        new = p - sent if self.error_feedback else torch.zeros_like(x)
        return Compressed(buffer, sent, new)


# ---------------------------------------------------------------------------------------------
# Packing helpers


def _f32(x: torch.Tensor) -> bytes:
    return x.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()


def _from_f32(buf: bytes | memoryview) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(buf, dtype="<f4").copy())


def index_dtype(d: int) -> np.dtype:
    """The narrowest unsigned integer type that holds a coordinate index below d."""
    return np.dtype("<u2") if d <= 2**16 else np.dtype("<u4")


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Unsigned integers below 2^bits, each written with ``bits`` bits (MSB first), padded to a
    whole byte at the end."""
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    planes = (values.astype(np.uint64)[:, None] >> shifts) & np.uint64(1)
    return np.packbits(planes.astype(np.uint8).ravel()).tobytes()


def unpack_bits(buf: bytes | memoryview, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits` for ``count`` values."""
    planes = np.unpackbits(np.frombuffer(buf, dtype=np.uint8))[: count * bits]
    weights = np.uint64(1) << np.arange(bits - 1, -1, -1, dtype=np.uint64)
    return (planes.reshape(count, bits).astype(np.uint64) * weights).sum(axis=1)


def kept(d: int, density: float) -> int:
    """k = ⌈density · d⌉ coordinates kept (at least 1)."""
    return max(1, min(d, math.ceil(density * d)))


def top_k_indices(p: torch.Tensor, k: int) -> torch.Tensor:
    """The k coordinates of largest |p_j|, ascending (ties: the lower index first)."""
    order = torch.argsort(p.abs(), descending=True, stable=True)
    return order[:k].sort().values


# ---------------------------------------------------------------------------------------------
# Compressors


class _CompressorBase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    error_feedback: bool = Field(
        False, description="add the kept residual to the next message (error feedback)"
    )

    @abstractmethod
    def _codec(self, stream: Stream) -> tuple[Encode, Decode]:
        """The compressor's (encode, decode) pair; ``stream`` seeds its randomness."""

    def build(self, seed: int = 0) -> Compressor:
        encode, decode = self._codec(Stream(seed).child(f"compress/{self.name}"))
        return Compressor(encode, decode, self.error_feedback)


class NoneConfig(_CompressorBase):
    """No compression: d float32 values (4d bytes)."""

    name: Literal["none"] = "none"

    def _codec(self, stream):
        return (lambda p, r, c: _f32(p)), (lambda buf, d, r, c: _from_f32(buf))


class TopKConfig(_CompressorBase):
    """Top-k sparsification: the k largest-magnitude coordinates as (index, float32 value)."""

    name: Literal["top_k"] = "top_k"
    density: float = Field(0.01, gt=0, le=1, description="fraction of coordinates kept k/d")
    error_feedback: bool = Field(
        True, description="add the kept residual to the next message (error feedback)"
    )

    def _codec(self, stream):
        def encode(p, round_, client):
            d = p.numel()
            idx = top_k_indices(p, kept(d, self.density))
            return idx.numpy().astype(index_dtype(d)).tobytes() + _f32(p[idx])

        def decode(buf, d, round_, client):
            k = kept(d, self.density)
            width = index_dtype(d).itemsize * k
            idx = torch.from_numpy(np.frombuffer(buf[:width], index_dtype(d)).astype(np.int64))
            return torch.zeros(d).index_put_((idx,), _from_f32(buf[width:]))

        return encode, decode


class RandomKConfig(_CompressorBase):
    """Random-k sparsification: k coordinates drawn from the round's shared randomness, so only
    their float32 values are sent."""

    name: Literal["random_k"] = "random_k"
    density: float = Field(0.01, gt=0, le=1, description="fraction of coordinates kept k/d")
    rescale: bool = Field(
        False, description="multiply kept values by d/k so E[C(x)] = x (use without feedback)"
    )
    error_feedback: bool = Field(
        True, description="add the kept residual to the next message (error feedback)"
    )

    def _codec(self, stream):
        def indices(d, round_, client):
            keys = stream.keys(round_, client, torch.arange(d))
            return keys.topk(kept(d, self.density), largest=False).indices.sort().values

        def encode(p, round_, client):
            return _f32(p[indices(p.numel(), round_, client)])

        def decode(buf, d, round_, client):
            values = _from_f32(buf)
            if self.rescale:
                values = values * (d / len(values))
            return torch.zeros(d).index_put_((indices(d, round_, client),), values)

        return encode, decode


class QsgdConfig(_CompressorBase):
    """QSGD (Alistarh et al. 2017): ‖x‖ as float32 and each coordinate as sign · level with
    stochastic rounding to s levels — unbiased, ⌈log₂(2s + 1)⌉ bits per coordinate."""

    name: Literal["qsgd"] = "qsgd"
    levels: int = Field(4, ge=1, le=2**15, description="quantization levels s")

    def _codec(self, stream):
        s = self.levels
        bits = math.ceil(math.log2(2 * s + 1))

        def encode(p, round_, client):
            p = p.to(torch.float64)
            norm = torch.linalg.vector_norm(p).to(torch.float32).to(torch.float64)
            if norm == 0:
                q = torch.zeros(p.numel(), dtype=torch.int64)
            else:
                r = (s * p.abs() / norm).clamp(max=s)
                low = r.floor()
                u = stream.uniform(round_, client, torch.arange(p.numel()))
                q = (torch.sign(p) * (low + (u < r - low))).to(torch.int64).clamp(-s, s)
            return _f32(norm) + pack_bits((q + s).numpy(), bits)

        def decode(buf, d, round_, client):
            norm = float(_from_f32(buf[:4])[0])
            q = torch.from_numpy(unpack_bits(buf[4:], bits, d).astype(np.int64)) - s
            return (norm * q.to(torch.float64) / s).to(torch.float32)

        return encode, decode


class SignConfig(_CompressorBase):
    """Scaled sign (EF-signSGD, Karimireddy et al. 2019): C(p) = (‖p‖₁/d) · sign(p), one bit per
    coordinate plus one float32 scale (sign(0) is sent as +)."""

    name: Literal["sign"] = "sign"
    error_feedback: bool = Field(
        True, description="add the kept residual to the next message (error feedback)"
    )

    def _codec(self, stream):
        def encode(p, round_, client):
            scale = p.abs().sum() / p.numel()
            return _f32(scale) + np.packbits((p >= 0).numpy()).tobytes()

        def decode(buf, d, round_, client):
            scale = _from_f32(buf[:4])[0]
            bits = np.unpackbits(np.frombuffer(buf[4:], dtype=np.uint8))[:d]
            return scale * (2.0 * torch.from_numpy(bits.astype(np.float32)) - 1.0)

        return encode, decode


class Int8Config(_CompressorBase):
    """8-bit affine quantization: min and max as float32, each coordinate rounded to one of 256
    evenly spaced values between them (d + 8 bytes)."""

    name: Literal["int8"] = "int8"

    def _codec(self, stream):
        def encode(p, round_, client):
            p = p.to(torch.float32)
            lo, hi = p.min(), p.max()
            step = (hi - lo) / 255 if hi > lo else torch.ones(())
            q = ((p - lo) / step).round().clamp(0, 255).to(torch.uint8)
            return _f32(torch.stack([lo, hi])) + q.numpy().tobytes()

        def decode(buf, d, round_, client):
            lo, hi = _from_f32(buf[:8])
            step = (hi - lo) / 255 if hi > lo else torch.ones(())
            q = torch.from_numpy(np.frombuffer(buf[8:], dtype=np.uint8).astype(np.float32))
            return lo + q * step

        return encode, decode


class Bf16Config(_CompressorBase):
    """bfloat16 (round to nearest even): 2 bytes per coordinate."""

    name: Literal["bf16"] = "bf16"

    def _codec(self, stream):
        def encode(p, round_, client):
            return p.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()

        def decode(buf, d, round_, client):
            raw = torch.from_numpy(np.frombuffer(buf, dtype="<i2").copy())
            return raw.view(torch.bfloat16).to(torch.float32)

        return encode, decode


class FedZipConfig(_CompressorBase):
    """FedZip-style pipeline (Malekijoo et al. 2021): top-k sparsification, k-means clustering of
    the kept values (scikit-learn), then the gaps between kept indices, the cluster labels and the
    centroids compressed losslessly with zlib. Applied to the whole message vector."""

    name: Literal["fedzip"] = "fedzip"
    density: float = Field(0.01, gt=0, le=1, description="fraction of coordinates kept k/d")
    clusters: int = Field(3, ge=1, le=255, description="k-means centroids for the kept values")
    level: int = Field(9, ge=0, le=9, description="zlib compression level")
    error_feedback: bool = Field(
        True, description="add the kept residual to the next message (error feedback)"
    )

    def _codec(self, stream):
        from sklearn.cluster import KMeans

        def encode(p, round_, client):
            d = p.numel()
            idx = top_k_indices(p, kept(d, self.density))
            values = p[idx].to(torch.float64).numpy()
            c = min(self.clusters, len(np.unique(values)))
            seed = int(hash_counters(stream.seed, *stream.path, round_, client).item())
            km = KMeans(n_clusters=c, n_init=1, random_state=seed).fit(values[:, None])
            gaps = np.diff(idx.numpy(), prepend=0).astype("<u4")
            raw = (
                struct.pack("<B", c)
                + km.cluster_centers_[:, 0].astype("<f4").tobytes()
                + km.labels_.astype(np.uint8).tobytes()
                + gaps.tobytes()
            )
            return zlib.compress(raw, self.level)

        def decode(buf, d, round_, client):
            raw = zlib.decompress(buf)
            c = raw[0]
            k = kept(d, self.density)
            centers = np.frombuffer(raw[1 : 1 + 4 * c], dtype="<f4")
            labels = np.frombuffer(raw[1 + 4 * c : 1 + 4 * c + k], dtype=np.uint8)
            idx = np.cumsum(np.frombuffer(raw[1 + 4 * c + k :], dtype="<u4").astype(np.int64))
            out = torch.zeros(d)
            out[torch.from_numpy(idx)] = torch.from_numpy(centers[labels].copy())
            return out

        return encode, decode


for _cls in (
    NoneConfig,
    TopKConfig,
    RandomKConfig,
    QsgdConfig,
    SignConfig,
    Int8Config,
    Bf16Config,
    FedZipConfig,
):
    register_compressor(_cls)
#: A compressor's config: any registered one (``fedkin.register_compressor``).
CompressorConfig = COMPRESSOR_REGISTRY.field
#: name → config class of every registered compressor.
COMPRESSORS = COMPRESSOR_REGISTRY
