"""The configured channel of one run: attack, compressor and aggregation rule with their state.

:class:`ChannelRuntime` is what a round calls between training the cohort and updating the
population: label poisoning of the Byzantine clients' batches, the client half (attack →
compress, error-feedback residuals in a client-state store indexed by client id), the server
half as the :class:`~fedkin.core.channel.Channel`'s aggregator (its state — centered clipping's
centre, EDiT's EWMA — kept here and checkpointed), and the round's byte counts.

A run whose channel is the default (weighted mean, no compression, no attack) does not build
one: its rounds are exactly the plain FedAvg channel's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedkin.channel.aggregators import AggState, TrustedUpdates
from fedkin.channel.attacks import byzantine_clients, flip_labels
from fedkin.channel.flat import flatten
from fedkin.channel.pipeline import MODEL_KEY, ChannelConfig, client_half, server_half
from fedkin.core.store import MemoryStore, StoreConfig, make_store
from fedkin.core.tree import Tree, tree_leaves


def is_default(channel: ChannelConfig, attack: Any) -> bool:
    """True when the channel is plain FedAvg's: weighted mean, no compression, no attack."""
    return channel == ChannelConfig() and attack is None


class ChannelRuntime:
    def __init__(
        self,
        channel: ChannelConfig,
        attack: Any,
        *,
        seed: int,
        num_clients: int,
        num_classes: int,
        store: StoreConfig,
        run_dir: Path | None,
        trusted_updates: TrustedUpdates | None = None,
    ) -> None:
        self.trusted_updates = trusted_updates  # the server's trusted data (trusted_direction)
        self.aggregator = channel.aggregator.build(seed, trusted_updates)
        self.compressor = channel.compress.build(seed)
        self.attack = attack.build(seed) if attack is not None else None
        self.byzantine = (
            byzantine_clients(seed, num_clients, attack.fraction)
            if attack is not None
            else torch.zeros(num_clients, dtype=torch.bool)
        )
        self.num_classes = num_classes
        self.num_clients = num_clients
        self.store_config = store
        self.run_dir = run_dir
        # Sized by the model delta's length d, known from the first round's messages.
        self.model_size: int | None = None
        self.residuals: MemoryStore | None = None
        self.state: AggState = {}
        self.uplink_total = 0.0
        self.downlink_total = 0.0
        self._round: dict[str, float] = {}

    def _sized(self, messages: Tree) -> None:
        """Create the d-sized state (aggregator state, residual store) on first use."""
        if self.model_size is not None or MODEL_KEY not in messages:
            return
        self.model_size = flatten(messages[MODEL_KEY])[0].shape[1]
        self.state = self.aggregator.init(self.model_size)
        self._make_residuals()

    def _make_residuals(self) -> None:
        if self.compressor.error_feedback and self.model_size is not None:
            self.residuals = make_store(
                self.store_config,
                {"residual": torch.zeros(self.model_size)},
                self.num_clients,
                self.run_dir / "client_state" / "channel" if self.run_dir else None,
            )

    # ----- client side --------------------------------------------------------------------------
    def poison(self, batches: tuple[torch.Tensor, ...], cohort: torch.Tensor):
        """Batches ``(x [S, K, B, …], y [S, K, B], …)`` (DP-SGD's Poisson batches add a mask)
        with the Byzantine clients' labels flipped when the attack poisons data (label
        flipping); otherwise unchanged."""
        if self.attack is None or not self.attack.poisons_labels:
            return batches
        x, y, *rest = batches
        bad = self.byzantine[cohort][None, :, None]
        return (x, torch.where(bad, flip_labels(y, self.num_classes), y), *rest)

    def client_side(self, messages: Tree, cohort: torch.Tensor, round_: int) -> Tree:
        """Attack and compress the cohort's messages (rows in ``cohort`` order); the residuals
        of the cohort are read from and written back to the store."""
        self._sized(messages)
        residuals = (
            self.residuals.gather(cohort)["residual"] if self.residuals is not None else None
        )
        half = client_half(
            messages,
            cohort,
            round_,
            compressor=self.compressor,
            residuals=residuals,
            attack=self.attack,
            byzantine=self.byzantine[cohort],
        )
        if self.residuals is not None and half.residuals is not None:
            self.residuals.scatter(cohort, {"residual": half.residuals})
        self._round["uplink_bytes"] = float(half.uplink_bytes.sum())
        return half.messages

    # ----- server side --------------------------------------------------------------------------
    def aggregate(self, messages: Tree, weights: torch.Tensor, round_: int) -> Tree:
        """The aggregator of the run's :class:`~fedkin.core.channel.Channel`."""
        self._sized(messages)
        out, self.state, metrics = server_half(
            messages, weights, round_, aggregator=self.aggregator, state=self.state
        )
        self._round.update(metrics)
        return out

    def round_metrics(self, population: Tree, clients: int) -> dict[str, float]:
        """Bytes of the round (uplink: the encoded messages; downlink: the population model
        broadcast to each client as float32) and since the start, plus the rule's metrics."""
        down = float(clients * sum(4 * t.numel() for t in tree_leaves(population)))
        up = self._round.pop("uplink_bytes", 0.0)
        self.uplink_total += up
        self.downlink_total += down
        out = {
            **self._round,
            "uplink_bytes": up,
            "downlink_bytes": down,
            "uplink_bytes_total": self.uplink_total,
            "downlink_bytes_total": self.downlink_total,
        }
        self._round = {}
        return out

    # ----- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model_size": self.model_size,
            "aggregator": self.state,
            "uplink_total": self.uplink_total,
            "downlink_total": self.downlink_total,
            "residuals": self.residuals.state_dict() if self.residuals is not None else None,
        }

    def commit(self, round_: int) -> None:
        """The checkpoint of ``round_`` is written: the residual store drops its undo log."""
        if self.residuals is not None:
            self.residuals.commit(round_)

    def load_state_dict(self, state: dict[str, Any], round_: int) -> None:
        self.model_size = state["model_size"]
        self.state = state["aggregator"]
        self._make_residuals()
        self.uplink_total = state["uplink_total"]
        self.downlink_total = state["downlink_total"]
        if self.residuals is not None:
            self.residuals.load_state_dict(state["residuals"], round_)
