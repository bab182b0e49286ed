"""Client-state stores: every client's persistent state as one stacked ``TensorDict``.

Row ``j`` holds one client's personal model, optimizer state and algorithm extras. A round
reads only its cohort's rows (``gather``) and writes them back (``scatter``); clients that were
not sampled keep their state untouched across rounds. Rows are initialized lazily: a row that
was never written reads as the template (the state ``init_client`` gives), so a population of
millions costs memory or disk only for the clients that actually trained.

* :class:`MemoryStore` — rows in RAM (allocated untouched; pages are committed when written).
* :class:`DiskStore` — rows in memory-mapped files (tensordict's ``memmap``) under a directory,
  for populations larger than RAM. Writes are made crash-safe by a write-ahead *undo log*: the
  old value of every written row first overwritten since the last checkpoint is saved before
  the write (never-written rows need none: the checkpoint marks them fresh),
  so resuming from a checkpoint restores exactly the rows that checkpoint saw.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from tensordict import TensorDict

from fedkin.core.tree import Tree, tree_map


class MemoryStore:
    """Client states in RAM, lazily initialized from ``template``."""

    def __init__(self, template: Tree, num_clients: int) -> None:
        self.num_clients = num_clients
        self.template = TensorDict(template, batch_size=[])
        self.initialized = torch.zeros(num_clients, dtype=torch.bool)
        self.data = self._allocate()

    def _allocate(self) -> TensorDict:
        n = self.num_clients
        return self.template.apply(
            lambda t: torch.empty((n, *t.shape), dtype=t.dtype), batch_size=[n]
        )

    def gather(self, rows: torch.Tensor) -> Tree:
        """States of ``rows`` as a tree stacked along dim 0 (never-written rows = template)."""
        if not self.data.keys():
            return {}
        fresh = ~self.initialized[rows]
        if not fresh.any():
            return self.data[rows].to_dict()
        # never-written rows are not read at all (on disk they are holes of a sparse file)
        out = self.template.expand(rows.shape).clone()
        if not fresh.all():
            out[~fresh] = self.data[rows[~fresh]]
        return out.to_dict()

    def scatter(self, rows: torch.Tensor, values: Tree, keep: torch.Tensor | None = None) -> None:
        """Write cohort rows back; rows where ``keep`` is False are left unchanged."""
        if not self.data.keys():
            return
        values_td = TensorDict(values, batch_size=[len(rows)])
        if keep is not None:
            rows, values_td = rows[keep], values_td[keep]
        self._write(rows, values_td)

    def _write(self, rows: torch.Tensor, values: TensorDict) -> None:
        self.data[rows] = values
        self.initialized[rows] = True

    def commit(self, round_: int | None = None) -> None:
        """Called after the checkpoint of ``round_`` has been written (nothing to do in RAM)."""

    def state_dict(self) -> dict:
        rows = torch.nonzero(self.initialized).squeeze(1)
        return {"rows": rows, "values": self.data[rows].to_dict() if self.data.keys() else {}}

    def load_state_dict(self, state: dict, round_: int | None = None) -> None:
        self.initialized.zero_()
        if self.data.keys() and len(state["rows"]):
            self._write(state["rows"], TensorDict(state["values"], batch_size=[len(state["rows"])]))


class DiskStore(MemoryStore):
    """Client states in memory-mapped files under ``path`` (reopened on resume)."""

    UNDO = "undo.pt"

    def __init__(self, template: Tree, num_clients: int, path: str | Path) -> None:
        self.path = Path(path)
        self._undo_rows = torch.empty(0, dtype=torch.long)  # first written since the checkpoint
        self._undo_saved = torch.empty(0, dtype=torch.long)  # those of them initialized before
        self._undo_values: list[TensorDict] = []
        self._base_round = 0
        super().__init__(template, num_clients)

    def _allocate(self) -> TensorDict:
        rows_dir = self.path / "rows"
        if (rows_dir / "meta.json").exists():
            return _advise_random(TensorDict.load_memmap(rows_dir))
        rows_dir.mkdir(parents=True, exist_ok=True)
        data = self.template.expand(self.num_clients).memmap_like(prefix=rows_dir, existsok=True)
        return _advise_random(data)

    def _write(self, rows: torch.Tensor, values: TensorDict) -> None:
        first = rows[~torch.isin(rows, self._undo_rows)]
        if len(first):
            self._undo_rows = torch.cat([self._undo_rows, first])
            # Only rows written before need their old value saved: for the others the
            # checkpoint's `initialized` mask already says "fresh" (read back as the template).
            old = first[self.initialized[first]]
            if len(old):
                self._undo_saved = torch.cat([self._undo_saved, old])
                self._undo_values.append(self.data[old].clone())
                self._save_undo()
        super()._write(rows, values)

    def _save_undo(self) -> None:
        undo = {
            "base_round": self._base_round,
            "rows": self._undo_saved,
            "values": torch.cat(self._undo_values).to_dict(),
        }
        tmp = self.path / (self.UNDO + ".tmp")
        torch.save(undo, tmp)
        os.replace(tmp, self.path / self.UNDO)

    def commit(self, round_: int | None = None) -> None:
        """The checkpoint of ``round_`` now covers every write: drop the undo log."""
        (self.path / self.UNDO).unlink(missing_ok=True)
        self._undo_rows = torch.empty(0, dtype=torch.long)
        self._undo_saved = torch.empty(0, dtype=torch.long)
        self._undo_values = []
        if round_ is not None:
            self._base_round = round_

    def state_dict(self) -> dict:
        return {"initialized": self.initialized.clone(), "path": str(self.path)}

    def load_state_dict(self, state: dict, round_: int | None = None) -> None:
        """Restore rows written after the checkpoint of ``round_`` (from the undo log)."""
        undo_path = self.path / self.UNDO
        if undo_path.exists():
            undo = torch.load(undo_path, weights_only=False)
            if round_ is None or undo["base_round"] == round_:
                rows = undo["rows"]
                self.data[rows] = TensorDict(undo["values"], batch_size=[len(rows)])
        self.initialized = state["initialized"].clone()
        self.commit(round_)


def _advise_random(data: TensorDict) -> TensorDict:
    """``madvise(MADV_RANDOM)`` on every memory-mapped leaf (best effort; POSIX only). Rows are
    touched at random, and without this hint each first touch of a row in a sparse file reads
    ahead a window of holes: ~100x slower writes of fresh rows at a million clients."""
    advice = getattr(mmap, "MADV_RANDOM", None)
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError, TypeError):
        advice = None
    if advice is None:
        return data
    for t in data.values(include_nested=True, leaves_only=True):
        size = t.numel() * t.element_size()
        if size:
            start = t.data_ptr() - t.data_ptr() % mmap.PAGESIZE
            madvise(ctypes.c_void_p(start), ctypes.c_size_t(t.data_ptr() + size - start), advice)
    return data


class StackedStates:
    """Read-only stacked states of some clients (e.g. adapted for evaluation), row j = client j
    of the list they were computed for; the ``gather`` interface of a store."""

    def __init__(self, data: Tree) -> None:
        self.data = data

    def gather(self, rows: torch.Tensor) -> Tree:
        return tree_map(lambda t: t[rows], self.data)


ClientStore = MemoryStore | DiskStore


class StoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    backend: Literal["memory", "disk"] = Field(
        "memory",
        description="memory: client states in RAM; disk: memory-mapped files in the run "
        "directory (for populations larger than RAM)",
    )


def make_store(
    config: StoreConfig, template: Tree, num_clients: int, path: Path | None
) -> MemoryStore | DiskStore:
    if config.backend == "memory":
        return MemoryStore(template, num_clients)
    if path is None:
        from fedkin.core.errors import ConfigError

        raise ConfigError("store.backend=disk needs a run directory (use `fedkin run`)")
    return DiskStore(template, num_clients, path)
