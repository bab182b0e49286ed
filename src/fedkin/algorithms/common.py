"""Small pure helpers shared by the personalized algorithms (no algorithm of their own).

* :func:`on_first_visit` — ``θ_i`` if client i has trained before, else a fallback (the current
  global model), selected with ``torch.where`` so it vmaps.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from fedkin.core.tree import Tree, tree_map

PersonalInit = Literal["global", "initial"]

PERSONAL_INIT_FIELD = Field(
    "global",
    description="personal model of a client's first round: 'global' copies the current global "
    "model w (a client first sampled late does not start from the random init); 'initial' uses "
    "the shared initial model (as in PFLlib). Unvisited clients are evaluated with w under "
    "'global' and with the initial model under 'initial'",
)


def on_first_visit(seen: torch.Tensor, own: Tree, fallback: Tree) -> Tree:
    """``own`` where ``seen > 0`` else ``fallback`` (leafwise; ``seen`` is a 0-d tensor)."""
    return tree_map(lambda a, b: torch.where(seen > 0, a, b), own, fallback)
