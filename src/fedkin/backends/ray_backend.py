"""The Ray backend: each cohort is cut into shards, one per Ray worker, each run by the engine.

``backend.name=ray`` wraps the configured engine (vectorized by default) in a
:class:`RayEngine` with the same ``map(fn, args, in_dims)``. Only cohort rows travel: client
stores, checkpoints and the population stay in the driver; the experiment loop does not know
where its cohort ran.

* **Cluster.** ``backend.address`` joins an existing cluster (``ray start --head`` on one node,
  ``ray start --address=…`` on the others; every node needs fedkin installed). Without it a
  local Ray instance is started with the machine's CPUs. If Ray is already initialized in this
  process, that instance is used.
* **Workers.** One actor per worker (``backend.workers``, 0 = one per CPU of the cluster), placed
  with the ``SPREAD`` strategy; each runs torch with ``CPUs // workers`` threads (at least 1).
  The actors live in a process-wide pool reused by every experiment of the process (``fedkin
  compare`` runs many), rebuilt when the Ray session or the worker count changes.
* **Shipping.** The per-client function — usually a bound method of an :class:`Algorithm` that
  holds an ``nn.Module`` — is ``ray.put`` once and cached by the actors, keyed by its identity
  (a bound method by its instance and function, a closure by its code and the objects it
  captures). Functions and what they capture are therefore treated as immutable once shipped.
  Per call, the shared arguments (``in_dims`` None, e.g. the population) are put once and read
  by every actor; client-dimension arguments are cut into contiguous shards whose sizes differ
  by at most one, copied so that only the shard's bytes are serialized.
* **Results.** Each actor runs the engine on its shard; the driver concatenates the shards in
  cohort order. Per-client computations are identical, so the numbers equal the in-process
  engine's up to float reassociation in batched kernels.
* **Failures.** An actor that dies (process crash, node loss, OOM kill) is replaced by a fresh
  one. With ``on_worker_failure=retry`` its shard is resubmitted, at most ``max_retries`` times
  per shard and call, after which :class:`WorkerLostError` fails the round. With ``drop`` a
  *training round* (:meth:`RayEngine.map_cohort`) proceeds with the survivors: the lost
  clients' rows come back as NaN (integer leaves 0), so the experiment's non-finite rejection
  keeps them out of the aggregate and the store, and their number is reported as
  ``dropped_clients``. Plain :meth:`RayEngine.map` (evaluation, adaptation) has no rejection
  path and always retries. An exception raised by the function itself is not a worker
  failure: it propagates unchanged.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fedkin.core.errors import ConfigError, RunFailure
from fedkin.engine.engines import _cohort_size, _combine, _narrow

INSTALL_HINT = "pip install 'fedkin[ray]'"
_FN_CACHE = 64  # distinct functions kept shipped per pool (LRU)


class WorkerLostError(RunFailure):
    """A shard's Ray worker died more often than ``backend.max_retries`` allows (or every
    worker of a ``drop`` round died)."""


def require_ray():
    """The ``ray`` module, or a one-line :class:`ConfigError` naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            f"backend.name=ray needs the optional Ray extra: {INSTALL_HINT}"
        ) from None
    return ray


# ----- the worker (runs inside a Ray actor) ---------------------------------------------------


class _Worker:
    """One Ray actor: runs an engine over the shards it is sent; caches shipped functions."""

    def __init__(self, threads: int) -> None:
        torch.set_num_threads(threads)
        self.fns: OrderedDict[int, Callable[..., Any]] = OrderedDict()

    def pid(self) -> int:
        return os.getpid()

    def map(
        self,
        engine: Any,
        token: int,
        fn_box: list[Any],
        shared: dict[int, Any],
        shard: dict[int, Any],
        in_dims: Sequence[int | None],
        grad_enabled: bool,
    ) -> Any:
        fn = self.fns.get(token)
        if fn is None:
            import ray

            fn = self.fns[token] = ray.get(fn_box[0])  # once per actor and function
            while len(self.fns) > _FN_CACHE:
                self.fns.popitem(last=False)
        args = [shared[j] if d is None else shard[j] for j, d in enumerate(in_dims)]
        with torch.set_grad_enabled(grad_enabled):
            return engine.map(fn, args, in_dims)


# ----- helpers ----------------------------------------------------------------------------------


def shard_bounds(size: int, shards: int) -> list[tuple[int, int]]:
    """``(start, length)`` of ``shards`` contiguous shards of ``size`` clients; lengths differ
    by at most one (the first ``size % shards`` are one longer)."""
    base, extra = divmod(size, shards)
    lengths = [base + (i < extra) for i in range(shards)]
    starts = itertools.accumulate([0, *lengths[:-1]])
    return list(zip(starts, lengths, strict=True))


def _copy_shard(arg: Any, dim: int, start: int, length: int) -> Any:
    """A compact copy of clients ``start:start+length`` (a view would pickle its whole storage)."""
    view = _narrow(arg, dim, start, length)
    return _map_leaves(view, lambda t: t.clone(memory_format=torch.contiguous_format))


def _map_leaves(tree: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        return {k: _map_leaves(v, fn) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(_map_leaves(v, fn) for v in tree)
    return fn(tree)


def _lost_rows(template: Any, length: int) -> Any:
    """Rows for ``length`` lost clients shaped like ``template``'s: NaN (integers: 0)."""

    def fill(t: torch.Tensor) -> torch.Tensor:
        value = math.nan if (t.is_floating_point() or t.is_complex()) else 0
        return torch.full((length, *t.shape[1:]), value, dtype=t.dtype)

    return _map_leaves(template, fill)


def _fn_key(fn: Callable[..., Any]) -> tuple:
    """Identity of a function for shipping: bound methods by (instance, function), closures by
    (code, captured objects, defaults); anything else by the object itself."""
    if inspect.ismethod(fn):
        return ("method", id(fn.__self__), fn.__func__)
    if inspect.isfunction(fn):
        try:
            cells = tuple(id(c.cell_contents) for c in fn.__closure__ or ())
        except ValueError:  # an empty cell
            return ("object", id(fn))
        defaults = tuple(map(id, fn.__defaults__ or ()))
        kwdefaults = tuple((k, id(v)) for k, v in (fn.__kwdefaults__ or {}).items())
        return ("function", fn.__code__, id(fn.__globals__), cells, defaults, kwdefaults)
    return ("object", id(fn))


def _session(ray) -> tuple[str, str]:
    context = ray.get_runtime_context()
    return context.get_node_id(), context.get_job_id()


# ----- the actor pool ---------------------------------------------------------------------------


class _Pool:
    """The process's Ray actors and the functions shipped to them."""

    _tokens = itertools.count()

    def __init__(self, ray, workers: int) -> None:
        self.ray = ray
        self.key = (_session(ray), workers)
        cpus = max(float(ray.cluster_resources().get("CPU", 1.0)), 1.0)
        self.workers = workers or int(cpus)
        share = cpus / self.workers
        # whole CPUs when each worker gets at least one, else an equal fraction of the cluster
        self.cpus_per_actor = math.floor(share) if share >= 1 else share
        self.threads = max(1, math.floor(share))
        self.actor_class = ray.remote(_Worker)
        self.actors = [self._spawn() for _ in range(self.workers)]
        self.fns: OrderedDict[tuple, tuple[int, Callable[..., Any], Any]] = OrderedDict()

    def _spawn(self):
        return self.actor_class.options(
            num_cpus=self.cpus_per_actor, scheduling_strategy="SPREAD", max_restarts=0
        ).remote(self.threads)

    def replace(self, i: int) -> None:
        """Kill (if still reachable) and replace actor ``i``."""
        with contextlib.suppress(Exception):  # already dead or unreachable
            self.ray.kill(self.actors[i], no_restart=True)
        self.actors[i] = self._spawn()

    def ship(self, fn: Callable[..., Any]) -> tuple[int, Any]:
        """``(token, object ref)`` of ``fn``, put into the object store the first time it is
        seen. The cache holds ``fn`` itself, so the ids in its key stay valid."""
        key = _fn_key(fn)
        hit = self.fns.get(key)
        if hit is None:
            hit = self.fns[key] = (next(self._tokens), fn, self.ray.put(fn))
            while len(self.fns) > _FN_CACHE:
                self.fns.popitem(last=False)
        else:
            self.fns.move_to_end(key)
        return hit[0], hit[2]

    def close(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor, no_restart=True)
        self.actors, self.fns = [], OrderedDict()


_POOL: _Pool | None = None


def _pool(ray, workers: int) -> _Pool:
    """The process-wide pool for ``workers`` in the current Ray session (one pool at a time:
    a pool for another worker count or an earlier session is closed first)."""
    global _POOL
    if _POOL is None or _POOL.key != (_session(ray), workers):
        if _POOL is not None and _POOL.key[0] == _session(ray):
            _POOL.close()
        _POOL = _Pool(ray, workers)
    return _POOL


def shutdown() -> None:
    """Stop this process's Ray workers (the Ray instance itself is left running)."""
    global _POOL
    if _POOL is not None:
        ray = require_ray()
        if ray.is_initialized() and _POOL.key[0] == _session(ray):
            _POOL.close()
        _POOL = None


# ----- the engine -------------------------------------------------------------------------------


class RayEngine:
    """``map(fn, args, in_dims)`` over Ray workers, each running ``engine`` on its shard."""

    name = "ray"

    def __init__(self, engine: Any, config: Any) -> None:
        self.ray = require_ray()
        self.engine = engine
        self.config = config

    # ----- public -----------------------------------------------------------------------------
    def map(self, fn: Callable[..., Any], args: Sequence[Any], in_dims: Sequence[int | None]):
        """Outputs for every client in cohort order; lost workers are always retried."""
        return self._run(fn, args, in_dims, drop=False)[0]

    def map_cohort(
        self, fn: Callable[..., Any], args: Sequence[Any], in_dims: Sequence[int | None]
    ) -> tuple[Any, int]:
        """``map`` for a training round under the configured ``on_worker_failure`` policy:
        returns the outputs and how many clients were dropped (their rows are NaN)."""
        return self._run(fn, args, in_dims, drop=self.config.on_worker_failure == "drop")

    @property
    def workers(self) -> int:
        return self._pool().workers

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (for monitoring and tests)."""
        pool = self._pool()
        return self.ray.get([a.pid.remote() for a in pool.actors])

    # ----- internals --------------------------------------------------------------------------
    def _pool(self) -> _Pool:
        ray = self.ray
        if not ray.is_initialized():
            os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
            options: dict[str, Any] = {
                "include_dashboard": False,
                "logging_level": logging.WARNING,
            }
            if self.config.address:
                options["address"] = self.config.address
            else:
                options["num_cpus"] = os.cpu_count() or 1
            ray.init(**options)
        return _pool(ray, self.config.workers)

    def _run(
        self,
        fn: Callable[..., Any],
        args: Sequence[Any],
        in_dims: Sequence[int | None],
        drop: bool,
    ) -> tuple[Any, int]:
        ray, pool = self.ray, self._pool()
        size = _cohort_size(args, in_dims)
        token, fn_ref = pool.ship(fn)
        pairs = list(zip(args, in_dims, strict=True))
        shared = ray.put({j: a for j, (a, d) in enumerate(pairs) if d is None})
        bounds = shard_bounds(size, min(pool.workers, size))
        shards = [
            {j: _copy_shard(a, d, start, n) for j, (a, d) in enumerate(pairs) if d is not None}
            for start, n in bounds
        ]
        grad = torch.is_grad_enabled()

        def submit(i: int):  # shard i always runs on actor i
            return pool.actors[i].map.remote(
                self.engine, token, [fn_ref], shared, shards[i], list(in_dims), grad
            )

        pending = {submit(i): i for i in range(len(bounds))}
        results: list[Any] = [None] * len(bounds)
        failures = [0] * len(bounds)
        lost: list[int] = []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            try:
                results[i] = ray.get(ready[0])
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as err:
                pool.replace(i)
                if drop:
                    lost.append(i)
                    continue
                failures[i] += 1
                if failures[i] > self.config.max_retries:
                    raise WorkerLostError(
                        f"the Ray worker running clients {bounds[i][0]}..{sum(bounds[i]) - 1} "
                        f"of the cohort died {failures[i]} times (backend.max_retries="
                        f"{self.config.max_retries}): {type(err).__name__}"
                    ) from err
                pending[submit(i)] = i
        if lost:
            done = [r for r in results if r is not None]
            if not done:
                raise WorkerLostError("every Ray worker of the round died; nothing to proceed with")
            for i in lost:
                results[i] = _lost_rows(done[0], bounds[i][1])
        out = results[0] if len(results) == 1 else _combine(results, torch.cat)
        return out, sum(bounds[i][1] for i in lost)
