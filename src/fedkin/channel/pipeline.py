"""The channel's two halves over a round's message trees: attack → compress on the clients,
aggregate on the server.

Only one key of a message — the model delta (``"delta"``) — is attacked, compressed and
aggregated by the configured rule; other keys (IFCA's cluster one-hots, AdaPeD's ψ step) are
bookkeeping that a robust rule must not median by accident: they travel uncompressed and are
averaged with the clients' weights. All state (error-feedback residuals, the aggregator's state)
is passed in and returned.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedkin.channel.aggregators import (
    Aggregator,
    AggregatorConfig,
    AggState,
    MeanConfig,
    WeightedMeanConfig,
    weighted_mean,
)
from fedkin.channel.attacks import Attack
from fedkin.channel.compressors import Compressor, CompressorConfig, NoneConfig
from fedkin.channel.flat import flatten, unflatten
from fedkin.channel.momentum import MomentumConfig
from fedkin.core.tree import Tree, tree_leaves

MODEL_KEY = "delta"


class ChannelConfig(BaseModel):
    """How client messages are compressed on the way up and aggregated by the server."""

    model_config = ConfigDict(extra="forbid")
    aggregator: AggregatorConfig = Field(
        default_factory=WeightedMeanConfig,
        description="aggregation rule for the model delta, message key 'delta' (fedkin list "
        "aggregators); every other key (IFCA's cluster masses 'assign', AdaPeD's ψ step) is "
        "always averaged with the clients' weights, never by a robust rule",
    )
    compress: CompressorConfig = Field(
        default_factory=NoneConfig,
        description="uplink compressor for the model delta (fedkin list compressors)",
    )
    momentum: MomentumConfig | None = Field(
        None,
        description="client-side Polyak momentum of the model delta, kept per client and sent "
        "instead of the delta, before attack, compression and the DP clip (fedkin list "
        "client_steps); channel.aggregator.name=monna sets it to {beta: 0.9} when absent",
    )

    @model_validator(mode="after")
    def _monna_has_momentum(self) -> ChannelConfig:
        """MoNNA is momentum plus nearest-neighbour averaging: the rule implies the client step
        (β = 0.9 unless given; ``channel.momentum.beta=0`` is averaging alone)."""
        if self.aggregator.name == "monna" and self.momentum is None:
            self.momentum = MomentumConfig()
        return self


def central_dp_conflict(config: ChannelConfig) -> str | None:
    """Why this channel cannot run under central DP, or None.

    Central DP calibrates its noise to the clipped *mean*: one client moves it by at most C/K.
    A robust rule's output can move further when one input changes (a median jumps between
    order statistics, Krum switches to another client), so its sensitivity is not bounded by
    the clip norm and the noise would not cover it."""
    if isinstance(config.aggregator, MeanConfig | WeightedMeanConfig) and not config.aggregator.pre:
        return None
    return (
        f"channel.aggregator.name={config.aggregator.name}: its sensitivity to one client is not "
        "bounded by the clip norm, so central DP cannot calibrate noise for it; "
        "use channel.aggregator.name=weighted_mean or mean without pre (or privacy off)"
    )


class ClientHalf(NamedTuple):
    messages: Tree  # with the model delta replaced by what the server decodes
    residuals: torch.Tensor | None  # new error-feedback residuals [K, d] (None without feedback)
    uplink_bytes: torch.Tensor  # [K] bytes each client sent
    buffers: list[bytes | None] | None  # [K] encoded deltas (None: the row went as float32)


def _nbytes(tree: Tree, rows: int) -> torch.Tensor:
    """[rows] float32 wire bytes of a stacked tree sent uncompressed."""
    per_row = sum(4 * leaf[0].numel() for leaf in tree_leaves(tree)) if tree else 0
    return torch.full((rows,), float(per_row))


def client_half(
    messages: Tree,
    client_ids: torch.Tensor,
    round_: int,
    *,
    compressor: Compressor,
    residuals: torch.Tensor | None = None,
    attack: Attack | None = None,
    byzantine: torch.Tensor | None = None,
    compress: bool = True,
) -> ClientHalf:
    """Attack (Byzantine rows only; ``byzantine`` is the cohort's ``[K]`` mask), then compress
    each client's flat model delta (``compress`` False: the identity, sent as float32).
    Non-finite rows go out uncompressed (4 bytes per entry) and keep their residual, so the
    server's non-finite filter still sees and rejects them."""
    k = len(client_ids)
    rest = {key: v for key, v in messages.items() if key != MODEL_KEY}
    if MODEL_KEY not in messages:
        return ClientHalf(messages, residuals, _nbytes(rest, k), None)
    flat, spec = flatten(messages[MODEL_KEY])
    if attack is not None and byzantine is not None:
        flat = attack.apply(flat, byzantine, round_, client_ids)
    if not compress:
        sizes = _nbytes(rest, k) + 4 * flat.shape[1]
        return ClientHalf({**rest, MODEL_KEY: unflatten(flat, spec)}, residuals, sizes, None)
    sent = torch.empty_like(flat)
    buffers: list[bytes | None] = []
    new_residuals = torch.zeros_like(flat) if compressor.error_feedback else None
    sizes = _nbytes(rest, k)
    for row in range(k):
        x = flat[row]
        res = residuals[row] if residuals is not None else None
        if not torch.isfinite(x).all():
            sent[row] = x
            sizes[row] += 4 * x.numel()
            buffers.append(None)
            if new_residuals is not None:
                new_residuals[row] = res if res is not None else 0.0
            continue
        out = compressor.compress(x, res, round_, int(client_ids[row]))
        sent[row] = out.sent
        sizes[row] += len(out.buffer)
        buffers.append(out.buffer)
        if new_residuals is not None:
            new_residuals[row] = out.residual
    return ClientHalf({**rest, MODEL_KEY: unflatten(sent, spec)}, new_residuals, sizes, buffers)


def server_half(
    messages: Tree,
    weights: torch.Tensor,
    round_: int,
    *,
    aggregator: Aggregator,
    state: AggState,
) -> tuple[Tree, AggState, dict[str, float]]:
    """The model delta through the configured rule, every other key by weighted mean."""
    out = {key: _weighted_mean_tree(v, weights) for key, v in messages.items() if key != MODEL_KEY}
    metrics: dict[str, float] = {}
    if MODEL_KEY in messages:
        flat, spec = flatten(messages[MODEL_KEY])
        agg, state, metrics = aggregator.apply(flat, weights, state, round_)
        out[MODEL_KEY] = unflatten(agg, spec)
    return out, state, metrics


def _weighted_mean_tree(tree, weights: torch.Tensor):
    if isinstance(tree, dict):
        return {k: _weighted_mean_tree(v, weights) for k, v in tree.items()}
    return weighted_mean(tree.reshape(len(weights), -1), weights).reshape(tree.shape[1:])
