"""What a run tells its engine in advance, and the cost model of ``engine.compile=auto``.

An :class:`EnginePlan` carries the planned rounds and the largest cohort the run expects. The
compiled engine pads cohorts to buckets below that size (:mod:`fedkin.engine.buckets`), and
``compile=auto`` decides from it whether compiling pays.

The cost model of ``auto``. A mapped function runs eagerly on its first two calls; the second
(warm: vmap and the allocator have seen the shapes) is timed, ``t_e``. With ``R`` planned
rounds and each function called at most once per round, the rest of the run costs eagerly
about ``(R − 2) · t_e`` and compiled about ``C + (R − 2) · t_e / σ``, so the engine compiles
when

    (R − 2) · t_e · (1 − 1/σ)  >  C.

The bet is checked: the second compiled call (the first one compiles) is timed too, and if it
is not faster than ``t_e`` the function runs eagerly for the rest of the run (on a machine
oversubscribed by other processes, Inductor's multithreaded kernels were measured slower than
the eager fast path).

σ (``COMPILED_SPEEDUP``) and the compile time ``C`` (``compile_seconds``) are measured
constants, conservative on purpose (a compile that does not pay is the expensive mistake:
tens of seconds; a missed one costs at most the eager run). Measurements
(``benchmarks/results/compile.md``; ``fedkin bench compile`` repeats them): compiled ÷ eager
steady state on the throughput workload was 1.8x (one thread, 100 clients, eager on the fast
path), 2.3x (two threads, 100 clients) and 1.23x (two threads, 1,000 clients, eager on vmap),
so σ = 1.2, the smallest; a compile of the 5-step local solve took 15–27 s with some cache
entries present and 65–235 s on the machine under heavy load, the 2-step tiny MLP about 11 s,
so ``C = 10 s + 4 s · steps`` (30 s at 5 steps). ``C`` is a constant while the eager time is
measured live, so on a heavily loaded machine (slow eager rounds) ``auto`` compiles sooner than
on an idle one, although the compile slows down too; on the loaded machine the default
60-round run with ``auto`` compiled and finished in 218 s against 369 s eager. Evaluation
functions, called every ``eval.every`` rounds, are over-counted by this estimate, but their
forward-only rounds are cheap, so they do not cross the threshold in practice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: the eager call of a function that ``auto`` times (the first pays vmap's and the allocator's
#: warm-up)
AUTO_TIMED_CALL = 2
#: compiled ÷ eager steady-state speed, the smallest measured on the throughput workloads
COMPILED_SPEEDUP = 1.2
#: cold compile seconds of the local solve: ``COMPILE_BASE_S + COMPILE_PER_STEP_S · steps``
COMPILE_BASE_S = 10.0
COMPILE_PER_STEP_S = 4.0


@dataclass(frozen=True)
class EnginePlan:
    """A run's plan: ``rounds`` and the ``largest_cohort`` it expects; ``varying``: the cohort
    size changes from round to round (Poisson sampling), so every cohort up to the largest
    pads to it (one compile); ``local_steps`` sizes the compile-time estimate."""

    rounds: int
    largest_cohort: int
    local_steps: int = 1
    varying: bool = False


def largest_cohort(clients_per_round: int, pool: int, poisson: bool) -> int:
    """The largest cohort to plan for: ``k`` for fixed cohorts; for Poisson sampling (each of
    ``pool`` clients with probability ``k / pool``) the mean plus four standard deviations,
    ``⌈k + 4·√(k(1 − k/pool))⌉`` (exceeded in about 3 rounds in 100,000), at most ``pool``."""
    k = min(clients_per_round, pool)
    if not poisson:
        return k
    return min(pool, math.ceil(k + 4 * math.sqrt(k * (1 - k / max(pool, 1)))))


def compile_seconds(local_steps: int) -> float:
    """Estimated cold compile time of a local solve unrolling ``local_steps`` steps."""
    return COMPILE_BASE_S + COMPILE_PER_STEP_S * local_steps


def compile_pays(plan: EnginePlan, calls_done: int, eager_call_s: float) -> bool:
    """Whether compiling a function, after ``calls_done`` eager calls of ``eager_call_s``
    seconds each, saves more time over the rest of the plan than the compile costs."""
    remaining = max(plan.rounds - calls_done, 0)
    saved = remaining * eager_call_s * (1 - 1 / COMPILED_SPEEDUP)
    return saved > compile_seconds(plan.local_steps)
