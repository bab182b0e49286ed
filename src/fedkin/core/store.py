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

Devices: a store's rows are read and written on its ``device`` (``engine.device``): a
:class:`MemoryStore` keeps them there; a :class:`DiskStore` keeps its memory map on the CPU,
moves gathered rows to the device and scattered rows back. Row indices, the ``initialized``
mask and checkpoints (``state_dict``) are CPU tensors, so a checkpoint loads on any device.
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
    """Client states in RAM (or the memory of ``device``), lazily initialized from ``template``
    (``device`` None: the template's device)."""

    def __init__(
        self, template: Tree, num_clients: int, device: str | torch.device | None = None
    ) -> None:
        self.num_clients = num_clients
        self.template = TensorDict(template, batch_size=[])
        first = next(iter(self.template.values(True, True)), None)
        self.device = torch.device(
            device if device is not None else first.device if first is not None else "cpu"
        )
        self.template = self.template.to(self.device)
        self.initialized = torch.zeros(num_clients, dtype=torch.bool, device="cpu")
        self.data = self._allocate()

    def _allocate(self) -> TensorDict:
        n = self.num_clients
        return self.template.apply(
            lambda t: torch.empty((n, *t.shape), dtype=t.dtype, device=self.device),
            batch_size=[n],
        )

    def gather(self, rows: torch.Tensor) -> Tree:
        """States of ``rows`` (CPU indices) as a tree stacked along dim 0 on the store's
        device (never-written rows = template)."""
        if not self.data.keys():
            return {}
        rows = rows.cpu()
        fresh = ~self.initialized[rows]
        if not fresh.any():
            return self._read(rows).to_dict()
        # never-written rows are not read at all (on disk they are holes of a sparse file)
        out = self.template.expand(rows.shape).clone()
        if not fresh.all():
            out[~fresh] = self._read(rows[~fresh])
        return out.to_dict()

    def _read(self, rows: torch.Tensor) -> TensorDict:
        return self.data[rows]

    def scatter(self, rows: torch.Tensor, values: Tree, keep: torch.Tensor | None = None) -> None:
        """Write cohort rows back; rows where ``keep`` is False are left unchanged."""
        if not self.data.keys():
            return
        rows = rows.cpu()
        values_td = TensorDict(values, batch_size=[len(rows)])
        if keep is not None:
            rows, values_td = rows[keep.cpu()], values_td[torch.nonzero(keep.cpu()).squeeze(1)]
        self._write(rows, values_td)

    def _write(self, rows: torch.Tensor, values: TensorDict) -> None:
        self.data[rows] = values.to(self._home)
        self.initialized[rows] = True

    @property
    def _home(self) -> torch.device:
        """Where the rows live."""
        return self.device

    def commit(self, round_: int | None = None) -> None:
        """Called after the checkpoint of ``round_`` has been written (nothing to do in RAM)."""

    def state_dict(self) -> dict:
        """The written rows and their values, as CPU tensors (loadable on any device)."""
        rows = torch.nonzero(self.initialized).squeeze(1)
        values = self._read(rows).to("cpu").to_dict() if self.data.keys() else {}
        return {"rows": rows, "values": values}

    def load_state_dict(self, state: dict, round_: int | None = None) -> None:
        self.initialized.zero_()
        if self.data.keys() and len(state["rows"]):
            self._write(state["rows"], TensorDict(state["values"], batch_size=[len(state["rows"])]))


class DiskStore(MemoryStore):
    """Client states in memory-mapped files under ``path`` (reopened on resume). The map stays
    on the CPU: gathered rows move to ``device``, scattered rows come back from it."""

    UNDO = "undo.pt"

    def __init__(
        self,
        template: Tree,
        num_clients: int,
        path: str | Path,
        device: str | torch.device | None = None,
    ) -> None:
        self.path = Path(path)
        self._undo_rows = _no_rows()  # first written since the checkpoint
        self._undo_saved = _no_rows()  # those of them initialized before
        self._undo_values: list[TensorDict] = []
        self._base_round = 0
        super().__init__(template, num_clients, device)

    def _allocate(self) -> TensorDict:
        rows_dir = self.path / "rows"
        if (rows_dir / "meta.json").exists():
            return _advise_random(TensorDict.load_memmap(rows_dir))
        rows_dir.mkdir(parents=True, exist_ok=True)
        # shapes and dtypes only: the template may live where it cannot be read (meta)
        template = self.template.apply(lambda t: torch.empty_like(t, device="cpu"))
        template = template.expand(self.num_clients)
        data = template.memmap_like(prefix=rows_dir, existsok=True)
        return _advise_random(data)

    def _read(self, rows: torch.Tensor) -> TensorDict:
        return self.data[rows].to(self.device)

    @property
    def _home(self) -> torch.device:
        return torch.device("cpu")

    def _write(self, rows: torch.Tensor, values: TensorDict) -> None:
        first = rows[~torch.isin(rows, self._undo_rows)]
        if len(first):
            self._undo_rows = torch.cat([self._undo_rows, first])
            # Only rows written before need their old value saved: for the others the
            # checkpoint's `initialized` mask already says "fresh" (read back as the template).
            old = first[self.initialized[first]]
            if len(old):
                self._undo_saved = torch.cat([self._undo_saved, old])
                self._undo_values.append(self.data[old].clone())  # CPU, like the map
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
        self._undo_rows = _no_rows()
        self._undo_saved = _no_rows()
        self._undo_values = []
        if round_ is not None:
            self._base_round = round_

    def state_dict(self) -> dict:
        return {"initialized": self.initialized.clone(), "path": str(self.path)}

    def load_state_dict(self, state: dict, round_: int | None = None) -> None:
        """Restore rows written after the checkpoint of ``round_`` (from the undo log)."""
        undo_path = self.path / self.UNDO
        if undo_path.exists():
            undo = torch.load(undo_path, weights_only=False, map_location="cpu")
            if round_ is None or undo["base_round"] == round_:
                rows = undo["rows"]
                self.data[rows] = TensorDict(undo["values"], batch_size=[len(rows)])
        self.initialized = state["initialized"].to("cpu", copy=True)
        self.commit(round_)


def _no_rows() -> torch.Tensor:
    return torch.empty(0, dtype=torch.long, device="cpu")


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
    config: StoreConfig,
    template: Tree,
    num_clients: int,
    path: Path | None,
    device: str | torch.device | None = None,
) -> MemoryStore | DiskStore:
    """The configured store; its rows are read and written on ``device`` (None: the
    template's device)."""
    if config.backend == "memory":
        return MemoryStore(template, num_clients, device)
    if path is None:
        from fedkin.core.errors import ConfigError

        raise ConfigError("store.backend=disk needs a run directory (use `fedkin run`)")
    return DiskStore(template, num_clients, path, device)
