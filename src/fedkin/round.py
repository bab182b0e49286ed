"""One federated round and one run loop, shared by every runtime.

A round is two halves with the channel between them:

* :func:`train_cohort` — the clients' side, in this process: draw the cohort's batches
  (Byzantine clients' labels poisoned if the attack does that) → each client group through the
  engine (vectorized, sequential or Ray shards) → non-finite results rejected, accepted states
  written to the group's store → the channel's client half (Polyak momentum, attack,
  compression, the DP release; momenta and error-feedback residuals read from and written to
  the channel's client-state store).
  A Flower ClientApp runs the same steps on its node for its own client.
* :func:`server_update` — the server's side, wherever the messages came from: the channel's
  server half (non-finite filter, robust rule or DP noise) → the algorithm's population update
  with the server optimizer → guards (non-finite model, rounds where every update was
  rejected) → the round's record (accounted ε, bytes, metrics), filtered by the release policy.
  It also keeps the example-level DP-SGD ledger: participations, and the per-batch uses the
  clients report in their ``dp_steps`` metric.

:func:`run` is the loop around rounds for every runtime: the privacy-budget stop, evaluation,
checkpoints, trackers and the summary. In-process and Ray runs pass
:meth:`Experiment.run_round`; the Flower ServerApp passes its round over the grid.

All randomness is a function of (seed, round, client), so a run resumed from its checkpoint
produces exactly the records an uninterrupted run produces.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch

from fedkin.channel.runtime import model_size
from fedkin.core.channel import finite_rows
from fedkin.core.errors import NonFiniteModelError
from fedkin.core.tree import Tree, to_device, tree_leaves

if TYPE_CHECKING:
    from fedkin.experiment import Experiment

#: Consecutive rounds with every client update rejected after which a run is declared diverged.
DEAD_ROUNDS = 3


class Tracker(Protocol):
    """Subscribes to the run's records; the loop knows nothing else about it."""

    def start(self, info: dict[str, Any]) -> None: ...
    def record(self, record: dict[str, Any]) -> None: ...
    def finish(self, summary: dict[str, Any]) -> None: ...


class Arrivals(NamedTuple):
    """What reached the server in a round, row k from client ``clients[k]``."""

    messages: Tree  # [K, …] after the clients' channel half
    weights: torch.Tensor  # [K] cohort weights (sample counts or 1), 0 where not ok
    ok: torch.Tensor  # [K] trained, finite and (phantom rounds) real
    clients: torch.Tensor  # [K]
    metrics: Tree  # [K] per-client metrics ({} when the clients do not report them)
    was_clipped: torch.Tensor  # [K] the DP release clipped the update
    uplink_bytes: float
    dropped: int  # clients lost on the way (Ray workers that died, Flower nodes that failed)


def take_rows(tree: Any, positions: torch.Tensor, dim: int) -> Any:
    """Select clients ``positions`` along ``dim`` of every tensor in a tree/tuple."""
    if isinstance(tree, dict):
        return {k: take_rows(v, positions, dim) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(take_rows(v, positions, dim) for v in tree)
    return tree.index_select(dim, positions.to(tree.device))


def cat_rows(parts: list[Any]) -> Any:
    if isinstance(parts[0], dict):
        return {k: cat_rows([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def map_cohort(engine, fn, args, in_dims) -> tuple[Any, int]:
    """``engine.map`` over a training cohort, and how many of its clients were dropped.

    A backend that can lose workers mid-round (``backend.name=ray`` with
    ``on_worker_failure=drop``) has its own ``map_cohort``: it returns non-finite rows for the
    clients it lost — so the non-finite rejection keeps them out of the aggregate and the
    store — and their count (``dropped_clients`` in the round record)."""
    own = getattr(engine, "map_cohort", None)
    return own(fn, args, in_dims) if own is not None else (engine.map(fn, args, in_dims), 0)


# ----- the clients' side ------------------------------------------------------------------------
def train_cohort(exp: Experiment, r: int, cohort: torch.Tensor, phantom: bool) -> Arrivals:
    """Train ``cohort`` in round ``r`` and run the channel's client half for it (in-process
    and on Ray). A ``phantom`` cohort (an empty Poisson cohort under central DP) only shapes
    the noise release: nothing it computes is written or counted."""
    cfg, ds = exp.config, exp.dataset
    batches = exp.channel.poison(exp.client_batches(cohort, "batches", r), cohort)
    n_i = ds.train_sizes[cohort].to(torch.float32)
    ctx = {"client_id": cohort, "num_samples": n_i, "round": torch.full_like(cohort, r)}
    ctx = to_device(ctx, exp.device)  # every input of the engine is on its device
    weights = n_i if cfg.cohort.weighting == "samples" else torch.ones(len(cohort))
    messages, oks, client_metrics, kept_weights, ids = [], [], [], [], []
    dropped = 0
    for g, group in enumerate(exp.groups):
        pos = torch.nonzero(exp.group_of[cohort] == g).squeeze(1)
        if len(pos) == 0:
            continue
        whole = len(pos) == len(cohort)
        sub_batches = batches if whole else take_rows(batches, pos, 1)
        sub_ctx = ctx if whole else take_rows(ctx, pos, 0)
        rows = group.rows(cohort[pos])
        args = (exp.population, group.store.gather(rows), sub_batches, sub_ctx)
        (msg, states, metrics), lost = map_cohort(
            exp.engine, group.algorithm.client_update, args, (None, 0, 1, 0)
        )
        dropped += lost
        k = len(pos)
        ok = finite_rows(msg, k) & finite_rows(states, k) & finite_rows(metrics, k)
        ok = ok.cpu()
        if phantom:
            ok = torch.zeros_like(ok)
        group.store.scatter(rows, states, keep=ok)
        messages.append(to_device(msg, "cpu"))  # the channel runs on the host
        oks.append(ok)
        client_metrics.append(to_device(metrics, "cpu"))
        kept_weights.append(weights[pos])
        ids.append(cohort[pos])
    clients, sent = torch.cat(ids), cat_rows(messages)
    d = model_size(sent)
    store = exp.channel_store(d) if exp.channel.client_keys and d is not None else None
    kept = store.gather(clients) if store is not None else {}
    sent, kept = exp.channel.momentum_step(sent, kept, torch.cat(oks))
    up = exp.channel.client_half(
        sent, clients, torch.cat(oks), r, kept.get("residual"), exp.channel_state.clip
    )
    if store is not None and not phantom:
        if up.residuals is not None:
            kept["residual"] = up.residuals
        store.scatter(clients, kept)
    return Arrivals(
        messages=up.messages,
        weights=torch.cat(kept_weights) * up.ok,
        ok=up.ok,
        clients=clients,
        metrics=cat_rows(client_metrics),
        was_clipped=up.was_clipped,
        uplink_bytes=0.0 if phantom else float(up.uplink_bytes.sum()),
        dropped=dropped,
    )


# ----- the server's side ------------------------------------------------------------------------
def server_update(
    exp: Experiment, r: int, t0: float, phantom: bool, cohort: torch.Tensor, got: Arrivals
) -> dict[str, Any]:
    """Aggregate what arrived through the channel's server half, update the population, guard
    the run and close round ``r``; returns its (released) record."""
    ok = got.ok
    if not phantom:  # the example-level DP-SGD ledger: participations and per-batch uses
        exp.participation[cohort] += 1
    client_metrics = exp.count_dp_steps(got.metrics)
    aggregate, state, channel_metrics = exp.channel.server_half(
        got.messages, got.weights, got.was_clipped, int(ok.sum()), r, exp.channel_state
    )
    clients = 0 if phantom else len(cohort)
    exp.channel_state, bytes_metrics = exp.channel.count_bytes(
        state, got.uplink_bytes, exp.population, clients
    )
    if ok.any() or exp.privacy is not None:
        aggregate = to_device(aggregate, exp.device)  # back from the host channel
        exp.population = exp.algorithm.population_update(exp.population, aggregate, exp.server)
    if not all(torch.isfinite(t).all() for t in tree_leaves(exp.population)):
        raise NonFiniteModelError(
            f"the population model became NaN/Inf in round {r + 1}; the run stopped. "
            "Lower the learning rates (client.optimizer.lr, server.optimizer.lr). "
            f"The last good checkpoint is round {exp.round}."
        )
    exp.dead_rounds = 0 if ok.any() or phantom else exp.dead_rounds + 1
    if exp.dead_rounds >= DEAD_ROUNDS:
        raise NonFiniteModelError(
            f"every client update was NaN/Inf in rounds {r + 2 - DEAD_ROUNDS}..{r + 1}; "
            "the run stopped (the model is finite but training has diverged). Lower the "
            f"learning rates. The last checkpoint is round {exp.round}."
        )
    return finish_round(
        exp,
        r,
        t0,
        {
            "clients": clients,
            **client_metric_summary(exp, client_metrics, got.clients, ok),
            **channel_metrics,
            **bytes_metrics,
            "rejected_updates": 0.0 if phantom else float((~ok).sum()),
            "dropped_clients": float(got.dropped),
        },
    )


def finish_round(exp: Experiment, r: int, t0: float, metrics: dict[str, Any]) -> dict[str, Any]:
    """Close round r: account its privacy cost and build its record (as it may be released)."""
    if exp.privacy is not None:
        metrics.update(exp.privacy.record_round(exp.channel_state.clip))
    exp.round = r + 1
    record = {"round": exp.round, "kind": "train", **metrics}
    return exp.release.record({**record, "round_time_s": time.perf_counter() - t0})


def client_metric_summary(
    exp: Experiment, metrics: Tree, clients: torch.Tensor, ok: torch.Tensor
) -> dict[str, Any]:
    """Mean over accepted clients of every per-client metric (``train_loss``, ``psi``, …);
    metrics the algorithm lists in ``per_client_metrics`` are also logged per client id."""
    out: dict[str, Any] = {}
    for name, values in metrics.items():
        kept = values[ok].to(torch.float64)
        out[name] = float(kept.mean()) if len(kept) else float("nan")
        if name in exp.algorithm.per_client_metrics:
            out[f"{name}_by_client"] = {
                str(int(c)): float(v) for c, v in zip(clients[ok], kept, strict=True)
            }
    return out


def run_round(exp: Experiment) -> dict[str, Any]:
    """One round in this process (the cohort on the configured engine: local or Ray)."""
    r = exp.round
    t0 = time.perf_counter()
    cohort, phantom = exp.round_cohort(r)
    if len(cohort) == 0:
        return finish_round(exp, r, t0, {"clients": 0})
    return server_update(exp, r, t0, phantom, cohort, train_cohort(exp, r, cohort, phantom))


# ----- the loop ---------------------------------------------------------------------------------
def run(
    exp: Experiment,
    run_dir: Path | None,
    trackers: list[Tracker],
    *,
    train_round: Callable[[], dict[str, Any]],
    evaluate: Callable[[], dict[str, Any]],
    info: dict[str, Any],
    runtime: str | None = None,
) -> dict[str, Any]:
    """Rounds until ``config.rounds`` (or the privacy budget) with evaluation every
    ``eval.every`` rounds and at the end, a checkpoint every ``checkpoint.every`` rounds and at
    the end (when there is a ``run_dir``), every record to the trackers; returns the summary.
    ``runtime``: named in the summary (``"flower"``)."""
    cfg = exp.config
    exp.release.warn()
    for t in trackers:
        t.start(exp.release.info(info))
    last_eval: dict[str, Any] = {}
    t_start = time.perf_counter()

    def emit(record: dict[str, Any]) -> None:
        for t in trackers:
            t.record(record)

    while exp.round < cfg.rounds:
        if exp.privacy is not None and not exp.privacy.can_run_round():
            exp.stop_reason = (
                f"privacy budget: another round would spend more than "
                f"ε={cfg.privacy.budget_epsilon:g}; stopped after round {exp.round}"
            )
            break
        emit(train_round())
        if exp.round % cfg.eval.every == 0 or exp.round == cfg.rounds:
            last_eval = evaluate()
            emit(last_eval)
        if run_dir is not None and (
            exp.round % cfg.checkpoint.every == 0 or exp.round == cfg.rounds
        ):
            exp.save_checkpoint(run_dir)
    if exp.stop_reason and last_eval.get("round") != exp.round:
        last_eval = evaluate()
        emit(last_eval)
        if run_dir is not None:
            exp.save_checkpoint(run_dir)
    if not last_eval:  # resumed after the last round: its evaluation was recorded before
        last_eval = evaluate()
    summary = {
        "name": cfg.name,
        "algorithm": cfg.algorithm.name,
        **({"runtime": runtime} if runtime else {}),
        "rounds": exp.round,
        **({"stop_reason": exp.stop_reason} if exp.stop_reason else {}),
        **(exp.privacy.summary() if exp.privacy else {}),
        "session_time_s": time.perf_counter() - t_start,
        **{k: v for k, v in last_eval.items() if k not in ("kind", "round")},
        **{f"{k}_acc_by_client": v for k, v in exp.client_accuracy.items()},
    }
    summary = exp.release.summary(summary)
    for t in trackers:
        t.finish(summary)
    return summary
