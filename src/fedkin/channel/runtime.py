"""The configured channel of one run, built in one place from config, with explicit state.

:func:`build_channel` turns ``channel``, ``attack`` and ``privacy`` into a :class:`RoundChannel`:
immutable pieces (compressor, attack, aggregation rule, the seeded Byzantine clients, the DP
mechanism) and two halves that take their state as arguments and return the new state.

* **Client half** (on the clients: in-process for the whole cohort, on a Flower node for its
  own client): Polyak momentum (:meth:`RoundChannel.momentum_step`, momenta in and out) →
  attack simulation → compress (error-feedback residuals in and out) → the DP release (clip;
  under local DP also noise) (:meth:`RoundChannel.client_half`). Label flipping poisons the
  Byzantine clients' batches before they train (:meth:`RoundChannel.poison`).
* **Server half** (:meth:`RoundChannel.server_half`): reject non-finite messages → aggregate
  (the configured rule with its state in and out; under DP the clipped sum plus central noise,
  whose adaptive clip norm is returned as the next state) → the round's metrics.

Per-client state (error-feedback residuals, momenta: :meth:`RoundChannel.client_template`)
lives in a client-state store (:mod:`fedkin.core.store`; memory or disk, checkpointed with the
run; on a Flower node in its ``context.state``); the server's state
(:class:`ChannelState`: the rule's state and the byte totals) is part of the run's checkpoint.

A channel with default options (weighted mean, no compression, no attack) takes the plain path:
no per-row encoding, and the tree-wise weighted mean of :mod:`fedkin.core.channel`, so default
runs keep their exact numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from fedkin.channel.aggregators import AggState, TrustedUpdates
from fedkin.channel.attacks import byzantine_clients, flip_labels
from fedkin.channel.flat import flatten, unflatten
from fedkin.channel.momentum import polyak_momentum
from fedkin.channel.pipeline import MODEL_KEY, ChannelConfig, client_half, server_half
from fedkin.core.channel import finite_rows, reject_nonfinite, weighted_mean
from fedkin.core.tree import Tree, tree_leaves

if TYPE_CHECKING:
    from fedkin.config import ExperimentConfig
    from fedkin.privacy.federated import UserLevelDP


def is_default(channel: ChannelConfig, attack: Any) -> bool:
    """True when the channel is plain FedAvg's: weighted mean, no compression, no attack."""
    return channel == ChannelConfig() and attack is None


def tree_bytes(tree: Tree) -> int:
    """float32 bytes of one (unstacked) tree: what it costs on the wire uncompressed."""
    return sum(4 * t.numel() for t in tree_leaves(tree))


def model_size(messages: Tree) -> int | None:
    """d, the length of one client's flat model delta in stacked ``messages`` (None if absent)."""
    return flatten(messages[MODEL_KEY])[0].shape[1] if MODEL_KEY in messages else None


@dataclasses.dataclass
class ChannelState:
    """The server's channel state of a run: the aggregation rule's state (centered clipping's
    centre, EDiT's EWMA; sized by d on first use), the DP clip norm of the next round
    (adaptive clipping moves it; None without DP) and the byte totals since the start."""

    aggregator: AggState | None = None
    clip: float | None = None
    uplink_total: float = 0.0
    downlink_total: float = 0.0


class WireCodec(NamedTuple):
    """How an algorithm packs one message key itself (FedKSeed's per-seed scalars):
    ``encode(row) -> bytes`` on the client, ``decode(bytes) -> row`` on the server. The row's
    wire bytes are the buffer's length, and the server receives the decoded row."""

    encode: Callable[[torch.Tensor], bytes]
    decode: Callable[[bytes], torch.Tensor]


class Uplink(NamedTuple):
    """What the client half of a cohort produced."""

    messages: Tree  # [K, …] what the server receives (decoded; under DP the release)
    ok: torch.Tensor  # [K] the update passed its checks and arrives finite (before any DP)
    residuals: torch.Tensor | None  # [K, d] new error-feedback residuals (None without)
    uplink_bytes: torch.Tensor  # [K] bytes each client sent
    was_clipped: torch.Tensor  # [K] bool: the DP clip changed the message (False without DP)
    buffers: list[bytes | None] | None  # per row the compressed delta (None: sent as float32)
    scales: torch.Tensor | None  # [K] float64 DP clip factors of compressed rows (central DP)


class RoundChannel:
    """Attack, compressor, rule and DP mechanism of a run; no state of its own."""

    def __init__(
        self,
        channel: ChannelConfig,
        attack: Any,
        *,
        seed: int,
        num_clients: int,
        num_classes: int,
        privacy: UserLevelDP | None,
        trusted_updates: TrustedUpdates | None = None,
        codecs: dict[str, WireCodec] | None = None,
    ) -> None:
        self.default = is_default(channel, attack)
        self.codecs = codecs or {}  # message keys the algorithm packs itself
        self.trusted_updates = trusted_updates  # the server's trusted data (trusted_direction)
        self.aggregator = channel.aggregator.build(seed, trusted_updates)
        self.compressor = channel.compress.build(seed)
        self.compressed = channel.compress.name != "none"
        self.attack = attack.build(seed) if attack is not None else None
        #: the attack needs the round's honest messages (simulated by whoever holds them)
        self.omniscient = attack is not None and attack._sees_honest()
        self.byzantine = (
            byzantine_clients(seed, num_clients, attack.fraction)
            if attack is not None
            else torch.zeros(num_clients, dtype=torch.bool)
        )
        self.num_classes = num_classes
        self.privacy = privacy
        self.beta = channel.momentum.beta if channel.momentum is not None else 0.0

    @property
    def error_feedback(self) -> bool:
        """Whether clients keep a residual (their per-client channel state)."""
        return self.compressed and self.compressor.error_feedback

    @property
    def client_keys(self) -> tuple[str, ...]:
        """The per-client channel state kept: ``"residual"`` (error feedback), ``"momentum"``."""
        kept = (("residual", self.error_feedback), ("momentum", self.beta > 0))
        return tuple(key for key, on in kept if on)

    def client_template(self, d: int) -> dict[str, torch.Tensor]:
        """One client's channel state for a model delta of size ``d`` before its first round."""
        return {key: torch.zeros(d) for key in self.client_keys}

    def momentum_step(
        self, messages: Tree, state: dict[str, torch.Tensor], ok: torch.Tensor
    ) -> tuple[Tree, dict[str, torch.Tensor]]:
        """The first client step: the model delta of ``messages`` [K, …] replaced by the
        clients' Polyak momentum (:mod:`fedkin.channel.momentum`) and ``state`` (the clients'
        channel state, [K, d] per key) with the new momenta (kept where not ``ok``); both
        unchanged without momentum."""
        if "momentum" not in state or MODEL_KEY not in messages:
            return messages, state
        flat, spec = flatten(messages[MODEL_KEY])
        sent, momentum = polyak_momentum(state["momentum"], flat, self.beta, ok)
        return {**messages, MODEL_KEY: unflatten(sent, spec)}, {**state, "momentum": momentum}

    # ----- client half --------------------------------------------------------------------------
    def poison(self, batches: tuple[torch.Tensor, ...], cohort: torch.Tensor):
        """Batches ``(x [S, K, B, …], y [S, K, B], …)`` (DP-SGD's Poisson batches add a mask)
        with the Byzantine clients' labels flipped when the attack poisons data (label
        flipping); otherwise unchanged."""
        if self.attack is None or not self.attack.poisons_labels:
            return batches
        x, y, *rest = batches
        bad = self.byzantine[cohort.cpu()][None, :, None].to(y.device)
        return (x, torch.where(bad, flip_labels(y, self.num_classes), y), *rest)

    def client_half(
        self,
        messages: Tree,
        clients: torch.Tensor,
        ok: torch.Tensor,
        round_: int,
        residuals: torch.Tensor | None = None,
        clip: float | None = None,
    ) -> Uplink:
        """The clients' side of a round for stacked ``messages`` [K, …] of ``clients`` [K]:
        attack (Byzantine rows), compress (with the clients' ``residuals`` [K, d] under error
        feedback), then under DP each client's release (:meth:`UserLevelDP.device_release`,
        clip norm ``clip`` as the server broadcast it). ``ok`` [K]: the client's update passed
        its non-finite checks. Rows are independent except through an omniscient attack, which
        sees the honest rows given here."""
        k = len(clients)
        buffers = None
        if self.default:
            per_row = sum(4 * leaf[0].numel() for leaf in tree_leaves(messages))
            sizes = torch.full((k,), float(per_row))
        else:
            half = client_half(
                messages,
                clients,
                round_,
                compressor=self.compressor,
                residuals=residuals,
                attack=self.attack,
                byzantine=self.byzantine[clients],
                compress=self.compressed,
            )
            messages, residuals, sizes, buffers = half
            ok = ok & finite_rows(messages, k)  # (the default path leaves messages unchanged)
        was_clipped, scales = torch.zeros(k, dtype=torch.bool), None
        if self.privacy is not None:
            if buffers is not None:  # the release of a compressed delta: its buffer and factor
                scales = self._clip_factors(messages, k, clip)
                for row in range(k):
                    if buffers[row] is None:
                        continue
                    if ok[row]:
                        sizes[row] += 8
                    else:  # a rejected update goes as its NaN release, uncompressed
                        buffers[row] = None
                        sizes[row] = float(sum(4 * t[row].numel() for t in tree_leaves(messages)))
            messages, was_clipped = self.privacy.device_release(messages, ok, round_, clients, clip)
        messages, sizes = self._pack(messages, sizes)  # what goes on the wire: the release
        return Uplink(messages, ok, residuals, sizes, was_clipped, buffers, scales)

    def _pack(self, messages: Tree, sizes: torch.Tensor) -> tuple[Tree, torch.Tensor]:
        """Keys with a :class:`WireCodec`: each row encoded, counted as its buffer's length
        (instead of 4 bytes per entry) and replaced by its decoding."""
        sizes = sizes.clone()
        for key in self.codecs.keys() & messages.keys():
            codec, rows = self.codecs[key], []
            for row, value in enumerate(messages[key]):
                buffer = codec.encode(value)
                sizes[row] += len(buffer) - 4 * value.numel()
                rows.append(codec.decode(buffer).to(value.dtype))
            messages = {**messages, key: torch.stack(rows)}
        return messages, sizes

    def packed_bytes(self, message: Tree) -> float:
        """Wire bytes of one client's (unstacked) message: its codec keys as their buffers'
        lengths, the rest as float32."""
        rest = {k: v for k, v in message.items() if k not in self.codecs}
        packed = sum(len(self.codecs[k].encode(v)) for k, v in message.items() if k in self.codecs)
        return float(tree_bytes(rest) + packed)

    def _clip_factors(self, messages: Tree, k: int, clip: float | None) -> torch.Tensor:
        """[K] float64 min(1, C/‖m_k‖), the factor of the DP clip."""
        from fedkin.privacy.federated import clip_factors

        return clip_factors(messages, k, self.privacy.clip if clip is None else clip)[0]

    # ----- server half --------------------------------------------------------------------------
    def server_half(
        self,
        messages: Tree,
        weights: torch.Tensor,
        was_clipped: torch.Tensor,
        accepted: int,
        round_: int,
        state: ChannelState,
    ) -> tuple[Tree, ChannelState, dict[str, float]]:
        """Aggregate what arrived: non-finite messages get weight 0, then under DP the noisy
        clipped sum with ``state.clip`` (adaptive clipping returns the next clip norm in the new
        state), else the rule (its state in ``state.aggregator``). Returns the aggregate, the
        new state and metrics."""
        messages, weights, metrics = reject_nonfinite(messages, weights, round_)
        if self.privacy is not None:
            aggregate, clip, m = self.privacy.server_release(
                messages, weights, was_clipped, accepted, round_, state.clip
            )
            state = dataclasses.replace(state, clip=clip)
            metrics.update(m)
        elif self.default:
            aggregate = weighted_mean(messages, weights, round_)
        else:
            if state.aggregator is None and MODEL_KEY in messages:
                state = dataclasses.replace(
                    state, aggregator=self.aggregator.init(model_size(messages))
                )
            aggregate, agg_state, m = server_half(
                messages, weights, round_, aggregator=self.aggregator, state=state.aggregator
            )
            state = dataclasses.replace(state, aggregator=agg_state)
            metrics.update(m)
        metrics["accepted_updates"] = float((weights > 0).sum())
        return aggregate, state, metrics

    @staticmethod
    def count_bytes(
        state: ChannelState, uplink: float, population: Tree, clients: int
    ) -> tuple[ChannelState, dict[str, float]]:
        """The round's bytes (uplink: what the clients sent; downlink: Γ broadcast to each of
        the ``clients`` as float32) and the totals since the start."""
        down = float(clients * tree_bytes(population))
        state = dataclasses.replace(
            state,
            uplink_total=state.uplink_total + uplink,
            downlink_total=state.downlink_total + down,
        )
        return state, {
            "uplink_bytes": uplink,
            "downlink_bytes": down,
            "uplink_bytes_total": state.uplink_total,
            "downlink_bytes_total": state.downlink_total,
        }


def build_channel(
    config: ExperimentConfig,
    num_clients: int,
    num_classes: int,
    privacy: UserLevelDP | None,
    trusted_updates: TrustedUpdates | None = None,
    codecs: dict[str, WireCodec] | None = None,
) -> RoundChannel:
    """The run's channel: the one place it is assembled from config (``trusted_updates``: the
    server's trusted-data source, :func:`fedkin.channel.trusted.trusted_updates`; ``codecs``:
    the message keys the algorithm packs itself)."""
    return RoundChannel(
        config.channel,
        config.attack,
        seed=config.seed,
        num_clients=num_clients,
        num_classes=num_classes,
        privacy=privacy,
        trusted_updates=trusted_updates,
        codecs=codecs,
    )
