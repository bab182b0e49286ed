"""Client-state store: every client's persistent state as one stacked ``TensorDict``.

Row ``i`` holds client ``i``'s personal model, optimizer state and algorithm extras. A round
reads only its cohort's rows (``gather``) and writes them back (``scatter``), so clients that
were not sampled keep their state untouched across rounds.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict

from fedkin.core.tree import Tree


class ClientStore:
    """In-memory store of ``num_clients`` rows shaped like ``template`` (one client's state)."""

    def __init__(self, template: Tree, num_clients: int) -> None:
        self.num_clients = num_clients
        row = TensorDict(template, batch_size=[])
        self.data = row.expand(num_clients).clone()

    def gather(self, clients: torch.Tensor) -> Tree:
        return self.data[clients].to_dict()

    def scatter(
        self, clients: torch.Tensor, values: Tree, keep: torch.Tensor | None = None
    ) -> None:
        """Write cohort rows back; rows where ``keep`` is False are left unchanged."""
        if not self.data.keys():
            return
        if keep is not None:
            clients, values = clients[keep], TensorDict(values, batch_size=[len(keep)])[keep]
        self.data[clients] = TensorDict(values, batch_size=[len(clients)])

    def state_dict(self) -> dict:
        return self.data.to_dict()

    def load_state_dict(self, state: dict) -> None:
        self.data = TensorDict(state, batch_size=[self.num_clients])
