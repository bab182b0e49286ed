"""Engines run one pure per-client function over a cohort.

``engine.map(fn, args, in_dims)`` calls ``fn(*args)`` once per client, where each argument is
a tree of tensors carrying the client dimension at ``in_dims[j]`` (``None``: shared by all
clients), and returns ``fn``'s output trees stacked along a leading client dimension.

* :class:`VectorizedEngine` — one ``torch.func.vmap`` over the whole cohort (optionally in
  chunks of ``chunk_size`` clients to bound memory). No Python loop over clients.
* :class:`SequentialEngine` — the same function one client at a time; the reference in tests
  and the fallback for models that cannot ``vmap``.

Both engines see identical inputs, so the same seed gives the same numbers up to float
reassociation in batched kernels.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch.func import vmap
from torch.utils._pytree import tree_map

from fedkin.engine.allocator import retain_freed_memory
from fedkin.engine.args import _client_device, _cohort_size, _combine, _leafwise, _narrow, _select
from fedkin.engine.buckets import bucket_size, pad_args, unpad
from fedkin.engine.compile_cache import use_persistent_cache
from fedkin.engine.fastpath import NotCoveredError, fast_client_update
from fedkin.engine.plan import AUTO_TIMED_CALL, EnginePlan, compile_pays

#: a mapped function and its ``in_dims``: what the engine compiles and times separately
_Key = tuple[Callable[..., Any], tuple[int | None, ...]]


class VectorizedEngine:
    """Trains a cohort with one ``vmap`` (per chunk of ``chunk_size`` clients; 0 = whole cohort).

    ``compile=True`` runs the mapped function through ``torch.compile`` (TorchInductor): the
    whole local solve of a cohort becomes one fused graph. Cohorts are padded to a few bucket
    sizes (:mod:`fedkin.engine.buckets`; the largest is the plan's ``largest_cohort``, else the
    first cohort seen), so a run compiles each function once however its cohort size varies,
    and compiled code is cached on disk (:mod:`fedkin.engine.compile_cache`), so the next run
    of the same config compiles from the cache. ``compile="auto"`` runs eagerly and compiles a
    function when the rest of the ``plan`` makes it pay (:mod:`fedkin.engine.plan`).
    ``compiler`` is the ``torch.compile`` backend (tests count compilations with Dynamo's
    ``CompileCounter``).

    ``retain_freed_mb`` > 0 tunes the allocator of the process the engine runs in
    (:mod:`fedkin.engine.allocator`) — on construction, and again in a Ray worker that
    receives the engine.
    """

    name = "vectorized"

    def __init__(
        self,
        chunk_size: int = 0,
        compile: bool | Literal["auto"] = False,
        retain_freed_mb: int = 0,
        plan: EnginePlan | None = None,
        compiler: Any = "inductor",
        device: str | torch.device | None = None,
        fast_path: bool = True,
    ):
        self.chunk_size = chunk_size
        self.compile = compile
        self.retain_freed_mb = retain_freed_mb
        self.plan = plan
        self.compiler = compiler
        self.device = None if device is None else torch.device(device)
        self.fast_path = fast_path
        self._fast: dict[_Key, Any] = {}
        #: which path the last ``map`` ran: ``fast:<model>`` (the hand-batched solve) or
        #: ``vmap``, prefixed ``compiled `` when compiled
        self.last_path = ""
        self.largest = plan.largest_cohort if plan is not None else 0  # 0: first cohort seen
        self._compiled: dict[_Key, Any] = {}
        self._compiled_path: dict[_Key, str] = {}
        self._eager_calls: dict[_Key, int] = {}
        self._auto: dict[_Key, bool] = {}
        self._eager_s: dict[_Key, float] = {}  # auto: the timed eager call
        self._compiled_calls: dict[_Key, int] = {}
        retain_freed_memory(retain_freed_mb)

    def __getstate__(self) -> dict[str, Any]:
        # compiled code and fast-path closures stay in their own process
        return {**self.__dict__, "_compiled": {}, "_fast": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        retain_freed_memory(self.retain_freed_mb)

    def _compiled_fn(self, key: _Key) -> Any:
        """The compiled mapped function for ``key``, or None while this function runs eagerly."""
        if key in self._compiled:
            return self._compiled[key]
        if self.compile is False or (self.compile == "auto" and not self._auto.get(key, False)):
            return None
        use_persistent_cache()
        fast = self._fast_fn(key)  # compile the hand-batched solve where it applies
        mapped = fast if fast is not None else vmap(key[0], in_dims=key[1], randomness="error")
        self._compiled[key] = torch.compile(mapped, backend=self.compiler)
        path = "vmap" if fast is None else f"fast:{fast.model}"
        self._compiled_path[key] = f"compiled {path}"
        return self._compiled[key]

    def _fast_fn(self, key: _Key) -> Any:
        """The hand-batched equivalent of mapping ``key`` (:mod:`fedkin.engine.fastpath`), or
        None where it does not apply or ``fast_path`` is off."""
        if not self.fast_path:
            return None
        if key not in self._fast:
            self._fast[key] = fast_client_update(*key)
        return self._fast[key]

    def _observe(self, key: _Key, s: float) -> None:
        """``compile="auto"``: count eager calls; the timed one decides by the cost model."""
        if key in self._auto:
            return
        calls = self._eager_calls[key] = self._eager_calls.get(key, 0) + 1
        if calls == AUTO_TIMED_CALL:
            self._eager_s[key] = s
            self._auto[key] = self.plan is not None and compile_pays(self.plan, calls, s)

    def _check_compiled(self, key: _Key, s: float) -> None:
        """``compile="auto"``: the second compiled call (the first one compiles) must beat the
        timed eager call, else the function goes back to eager for the rest of the run."""
        calls = self._compiled_calls[key] = self._compiled_calls.get(key, 0) + 1
        if calls == 2 and s >= self._eager_s.get(key, float("inf")):
            self._auto[key] = False
            del self._compiled[key]

    def map(
        self, fn: Callable[..., Any], args: Sequence[Any], in_dims: Sequence[int | None]
    ) -> Any:
        size = _cohort_size(args, in_dims)
        host = _client_device(args, in_dims)
        if self.device is not None:  # a no-op for tensors already there
            args = [_leafwise(a, lambda t: t.to(self.device)) for a in args]
        key = (fn, tuple(in_dims))
        compiled = self._compiled_fn(key)
        t0 = time.perf_counter()
        try:
            out = self._chunks(key, args, size, compiled)
        except Exception as error:
            if compiled is None or self.compile != "auto":
                raise
            # auto must never fail a run that runs eagerly: this function stays eager
            warnings.warn(
                f"engine.compile=auto: compiling {getattr(fn, '__qualname__', fn)} failed "
                f"({type(error).__name__}); it runs eagerly",
                RuntimeWarning,
                stacklevel=2,
            )
            self._auto[key] = False
            del self._compiled[key]
            out = self._chunks(key, args, size, None)
        if self.compile == "auto":
            elapsed = time.perf_counter() - t0
            if compiled is None:
                self._observe(key, elapsed)
            elif key in self._compiled:
                self._check_compiled(key, elapsed)
        return out if self.device in (None, host) else tree_map(lambda t: t.to(host), out)

    def _eager(self, key: _Key, args: list[Any]) -> Any:
        """One eager call: the hand-batched fast path where it covers the function
        (:mod:`fedkin.engine.fastpath`), else ``vmap``."""
        fast = self._fast_fn(key)
        if fast is not None:
            with contextlib.suppress(NotCoveredError):
                out = fast(*args)
                self.last_path = f"fast:{fast.model}"
                return out
        self.last_path = "vmap"
        return vmap(key[0], in_dims=key[1], randomness="error")(*args)

    def _chunks(self, key: _Key, args: Sequence[Any], size: int, compiled: Any) -> Any:
        """The mapped function over the cohort in chunks; compiled calls see padded buckets."""
        in_dims = key[1]
        chunk = self.chunk_size or size
        parts = []
        for start in range(0, size, chunk):
            n = min(chunk, size - start)
            part = [_narrow(a, d, start, n) for a, d in zip(args, in_dims, strict=True)]
            if compiled is None:
                parts.append(self._eager(key, part))
                continue
            self.largest = self.largest or size
            largest = min(self.chunk_size or self.largest, self.largest)
            bucket = bucket_size(n, largest, halve=self.plan is None or not self.plan.varying)
            padded = pad_args(part, in_dims, bucket - n)
            try:
                parts.append(unpad(compiled(*padded), n))
            except NotCoveredError:  # the fast path's inputs check: compile vmap instead
                mapped = vmap(key[0], in_dims=in_dims, randomness="error")
                compiled = self._compiled[key] = torch.compile(mapped, backend=self.compiler)
                self._compiled_path[key] = "compiled vmap"
                parts.append(unpad(compiled(*padded), n))
            self.last_path = self._compiled_path[key]
        return parts[0] if len(parts) == 1 else _combine(parts, torch.cat)


class SequentialEngine:
    """Runs the per-client function one client at a time and stacks the results."""

    name = "sequential"

    def map(
        self, fn: Callable[..., Any], args: Sequence[Any], in_dims: Sequence[int | None]
    ) -> Any:
        size = _cohort_size(args, in_dims)
        outs = [
            fn(*(_select(a, d, k) for a, d in zip(args, in_dims, strict=True))) for k in range(size)
        ]
        return _combine(outs, torch.stack)


def check_device(value: str) -> str:
    """``value`` if this torch can compute there, else a ValueError naming what is available."""
    available = ["cpu"]
    if torch.cuda.is_available():
        available += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        available.append("mps")
    if value not in available:
        kind = value.split(":")[0]
        why = {
            "cuda": "CUDA is not available to this torch build "
            f"({torch.__version__}) or no GPU is visible",
            "mps": "MPS (Apple GPU) is not available here",
        }.get(kind, "unknown device")
        raise ValueError(f"engine.device={value}: {why}; allowed here: {', '.join(available)}")
    return value


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["vectorized", "sequential"] = Field(
        "vectorized",
        description="vectorized: one vmap over the cohort; sequential: a client at a time",
    )
    chunk_size: Annotated[int, Field(ge=0)] = Field(
        0, description="vectorized engine: clients per vmap call (0 = whole cohort)"
    )
    compile: bool | Literal["auto"] = Field(
        False,
        description="vectorized engine: torch.compile the mapped client function (true; "
        "compiles once per run, cohorts padded to a few bucket sizes, cached on disk), run "
        "eagerly (false), or auto: compile when the planned rounds make it pay "
        "(fedkin.engine.plan's cost model, decided after two timed eager rounds)",
    )
    retain_freed_mb: Annotated[int, Field(ge=0, le=2047)] = Field(
        1024,
        description="vectorized engine: MiB of freed memory glibc keeps for reuse instead of "
        "unmapping (saves page faults on every cohort-sized tensor; 0 = leave the system "
        "allocator alone)",
    )

    fast_path: bool = Field(
        True,
        description="vectorized engine: run FedAvg on the zoo MLP or CNN with plain SGD "
        "through a hand-batched local solve instead of vmap (fedkin.engine.fastpath; same "
        "numbers up to float reassociation; other workloads always use vmap)",
    )
    device: str = Field(
        "cpu",
        description="where a run computes and keeps what a cohort trains on: cpu, cuda, "
        "cuda:N or mps (the data, models, population, client stores and batches live there; "
        "a disk store's map stays on the CPU and moves rows; the channel runs on the CPU; "
        "no GPU figure has been measured yet)",
    )

    @field_validator("device")
    @classmethod
    def _device_available(cls, value: str) -> str:
        return check_device(value)

    @model_validator(mode="after")
    def _compile_needs_vmap(self) -> EngineConfig:
        if self.compile is True and self.name != "vectorized":
            raise ValueError("engine.compile=true needs engine.name=vectorized")
        return self

    def build(self, plan: EnginePlan | None = None) -> VectorizedEngine | SequentialEngine:
        """The engine; ``plan`` (rounds, largest cohort) sizes the compiled engine's buckets
        and feeds ``compile=auto``'s cost model (without it, auto stays eager)."""
        if self.name == "sequential":
            return SequentialEngine()
        device = None if self.device == "cpu" else self.device
        return VectorizedEngine(
            self.chunk_size,
            self.compile,
            self.retain_freed_mb,
            plan,
            device=device,
            fast_path=self.fast_path,
        )
