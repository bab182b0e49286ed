"""`fedkin bench privacy`: accuracy against ε for private (personalized) FL, the cost of DP-SGD,
and an empirical privacy audit of the DP aggregation.

Accuracy against ε. Fashion-MNIST (Debian ``dataset-fashion-mnist``) split among 1,000 clients
with Dirichlet(0.3) label skew, an MLP 784-64-10, Poisson cohorts of 50 expected clients
(q = 0.05), 5 local SGD steps of batch 16 (lr 0.1), server SGD lr 1, uniform weights,
``--rounds`` rounds (default 80). Each private run is user-level DP-FedAvg
(``privacy.mechanism=central``) with ``privacy.target_epsilon=ε`` at δ = 1e-5: the noise
multiplier is calibrated (PLD) so the planned rounds spend ε, and the clip norm follows the
median update norm (adaptive clipping, Andrew et al. 2021; the clip-count release is part of
the same ε). ε = ∞ is the same run without privacy. Reported: mean over clients of the global
model's and the personal models' test accuracy after the last round (one seed), the ε actually
spent and the noise multiplier. Algorithms: FedAvg, Ditto, AdaPeD (those registered).
These are simulations measuring utility: the private runs set
``privacy.release_diagnostics=true`` so that the accuracies on the clients' test data (not
part of the DP release, see ``fedkin.privacy.release``) can be measured at all.

DP-SGD overhead. FedAvg on the same population with a fixed cohort of 50 clients (identical
cohorts and batches in both runs), vectorized engine: rounds without privacy and rounds with
example-level DP-SGD (per-example gradients by ``vmap``, clip 1, noise 1) timed in alternation
(medians over ``--overhead-rounds`` rounds after a warm-up); the ratio is the overhead.

Privacy audit (the numbers of ``tests/test_privacy_audit.py``). One round of the central DP
aggregation (the clients' clip ``UserLevelDP.device_release``, then the server's noisy sum
``UserLevelDP.noisy_mean`` as in ``server_release``; everyone participates, z = 1, C = 1) with
and without a canary client whose update is 10⁶·e₁; the statistic is the released sum's
e₁ coordinate; thresholds on a fixed grid; Clopper–Pearson bounds (Bonferroni over thresholds)
on FPR/FNR give ε_lb = max log((1 − δ − FNR⁺)/FPR⁺). It is compared with the accountant's ε
for the honest mechanism and for deliberately under-noised copies (noise std / 2, / 10).

One torch intra-op thread by default (``--threads``): the models are tiny and the machine is
shared. The default run (15 training runs of 80 rounds, the overhead timing and the audit)
takes about 10 minutes on 2 busy cores; ``--rounds`` trades accuracy for time.
``--quick`` is a smoke version (digits, 50 clients, 2 rounds, ε ∈ {1, ∞}, few audit trials).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_OUT = Path("benchmarks/results")
INF = math.inf


@dataclass
class PrivacyBenchSpec:
    data: list[str]
    rounds: int
    epsilons: list[float]
    algorithms: list[str]
    delta: float = 1e-5
    overhead_rounds: int = 5
    audit_trials: int = 200_000
    training: list[str] = field(
        default_factory=lambda: [
            "model.name=mlp",
            "model.hidden=[64]",
            "cohort.sampling=poisson",
            "cohort.weighting=uniform",
            "client.local_steps=5",
            "client.batch_size=16",
            "client.optimizer.name=sgd",
            "client.optimizer.lr=0.1",
        ]
    )
    clients_per_round: int = 50
    adaptive_clip: bool = True  # clip at the median update norm; else a fixed clip of 0.5
    seed: int = 0


def default_spec(rounds: int = 80) -> PrivacyBenchSpec:
    return PrivacyBenchSpec(
        data=[
            "data.name=fashion-mnist",
            "data.num_clients=1000",
            "data.partition.name=dirichlet",
            "data.partition.alpha=0.3",
        ],
        rounds=rounds,
        epsilons=[1.0, 2.0, 4.0, 8.0, INF],
        algorithms=["fedavg", "ditto", "adaped"],
    )


def quick_spec() -> PrivacyBenchSpec:
    return PrivacyBenchSpec(
        data=["data.name=digits", "data.num_clients=50", "data.partition.name=iid"],
        rounds=2,
        epsilons=[1.0, INF],
        algorithms=["fedavg", "ditto"],
        overhead_rounds=1,
        audit_trials=4000,
        clients_per_round=10,
        adaptive_clip=False,
        training=[
            "model.name=mlp",
            "model.hidden=[16]",
            "cohort.sampling=poisson",
            "cohort.weighting=uniform",
            "client.local_steps=2",
            "client.batch_size=8",
        ],
    )


# ----- the audit: Clopper–Pearson ε lower bounds from a canary -----------------------------------


def clopper_pearson_upper(k: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """One-sided (1 − α) Clopper–Pearson upper bound on a rate with ``k`` events in ``n``."""
    from scipy.stats import beta

    k = np.asarray(k, dtype=np.float64)
    upper = beta.ppf(1 - alpha, k + 1, np.maximum(n - k, 1e-12))
    return np.where(k >= n, 1.0, upper)


def epsilon_lower_bound(
    null: np.ndarray,
    alt: np.ndarray,
    delta: float,
    thresholds: np.ndarray,
    alpha: float = 0.05,
) -> dict[str, float]:
    """Empirical ε lower bound from a threshold test between two worlds.

    ``null``/``alt``: the statistic without/with the canary. For each threshold τ the test
    says "canary" if the statistic is > τ; FPR⁺, FNR⁺ are Clopper–Pearson upper bounds, with a
    Bonferroni split of ``alpha`` over all thresholds and both rates, so the reported bound
    holds with probability >= 1 − α simultaneously for the best threshold. Any (ε, δ)-DP
    mechanism has FPR + e^ε·FNR >= 1 − δ and FNR + e^ε·FPR >= 1 − δ, hence
    ε >= max log((1 − δ − FNR⁺)/FPR⁺), log((1 − δ − FPR⁺)/FNR⁺).
    """
    null, alt = np.sort(np.asarray(null, np.float64)), np.sort(np.asarray(alt, np.float64))
    fp = len(null) - np.searchsorted(null, thresholds, side="right")  # null > τ
    fn = np.searchsorted(alt, thresholds, side="right")  # alt <= τ
    a = alpha / (2 * len(thresholds))
    fpr_u = clopper_pearson_upper(fp, len(null), a)
    fnr_u = clopper_pearson_upper(fn, len(alt), a)
    with np.errstate(divide="ignore", invalid="ignore"):
        one = np.log(np.clip(1 - delta - fnr_u, 0, None) / fpr_u)
        two = np.log(np.clip(1 - delta - fpr_u, 0, None) / fnr_u)
    both = np.where(np.isnan(one), -np.inf, one), np.where(np.isnan(two), -np.inf, two)
    best = np.maximum(*both)
    i = int(np.argmax(best))
    return {
        "epsilon_lb": float(max(best[i], 0.0)),
        "threshold": float(thresholds[i]),
        "fpr": float(fp[i] / len(null)),
        "fnr": float(fn[i] / len(alt)),
        "fpr_upper": float(fpr_u[i]),
        "fnr_upper": float(fnr_u[i]),
    }


def canary_audit(
    noise_multiplier: float = 1.0,
    *,
    trials: int = 200_000,
    noise_scale: float = 1.0,
    clip_canary: bool = True,
    sampling: str = "full",
    clip: float = 1.0,
    delta: float = 1e-5,
    seed: int = 0,
) -> dict[str, Any]:
    """Distinguishing audit of one round of central DP-FedAvg (UserLevelDP) with a canary.

    ``sampling``: ``"full"`` (everyone takes part, add/remove-one: world 1 adds the canary),
    ``"poisson"`` (q = 1/2, the canary and 9 other clients each join a trial with q; world 1
    adds the canary) or ``"fixed"`` (everyone takes part, replace-one: the canary's update is
    −10⁶·e₁ in world 0 and +10⁶·e₁ in world 1; RDP accounting). ``noise_scale`` < 1 breaks the
    mechanism on purpose (noise std × noise_scale) while the accountant still claims the ε of
    ``noise_multiplier``; ``clip_canary=False`` skips clipping (sensitivity ignored).
    Trial t of world w uses round counter w·trials + t, so all noise draws are independent, and
    the trials are one ``vmap`` over the round counter through the real ``aggregate``.
    """
    from torch.func import vmap

    from fedkin.privacy.config import PrivacyConfig
    from fedkin.privacy.federated import UserLevelDP

    others = 9 if sampling == "poisson" else 10
    population = others + 1
    cohort = population // 2 if sampling == "poisson" else population
    cfg = PrivacyConfig(
        mechanism="central",
        noise_multiplier=noise_multiplier,
        clip=clip,
        delta=delta,
        accountant="rdp" if sampling == "fixed" else "pld",
    )
    dp = UserLevelDP(
        cfg,
        population=population,
        cohort_size=cohort,
        sampling="fixed" if sampling == "fixed" else "poisson",
        rounds=1,
        seed=seed,
    )
    claimed = dp.epsilon_after(1)
    sigma = dp.update_noise * clip  # nominal noise std of the sum
    dp.update_noise *= noise_scale  # the (possibly broken) mechanism under audit
    gen = torch.Generator().manual_seed(seed)
    # other clients: arbitrary updates orthogonal to e1 (so they add nothing to the statistic)
    a = torch.randn(population, 3, generator=gen) * 0.5
    a[:, 0] = 0.0
    messages = {"a": a, "b": {"c": torch.randn(population, 2, generator=gen) * 0.5}}
    stats = []
    for world in (0, 1):
        m = {"a": messages["a"].clone(), "b": {"c": messages["b"]["c"].clone()}}
        m["b"]["c"][-1] = 0.0
        sign = 1.0 if world else -1.0
        m["a"][-1] = torch.tensor([sign * 1e6, 0.0, 0.0])
        present = torch.ones(population)
        if sampling != "fixed" and world == 0:
            present[-1] = 0.0  # add/remove-one: world 0 has no canary
        if clip_canary:  # every row is released; world 0's canary then has weight 0
            everyone = torch.ones(population, dtype=torch.bool)
            clipped, _ = dp.device_release(m, everyone, 0, torch.arange(population), clip)
        else:
            clipped = m
        if sampling == "poisson":
            joins = torch.rand(trials, population, generator=gen) < cohort / population
            weights = joins.to(torch.float32) * present
        else:
            weights = present.expand(trials, population)
        rounds = torch.arange(trials) + world * trials
        out = vmap(lambda w, r, c=clipped: dp.noisy_mean(c, w, r, clip))(weights, rounds)
        stats.append((out["a"][:, 0].double() * dp.cohort_size).numpy())
    # the statistic is centred at 0 (or −C, replace-one) without and +C with the canary
    low, high = (-clip if sampling == "fixed" else 0.0), (clip if clip_canary else 1e6)
    grid = np.linspace(low - 8 * sigma, high + 8 * sigma, 401)
    bound = epsilon_lower_bound(stats[0], stats[1], delta, grid)
    return {
        "sampling": sampling,
        "noise_multiplier": noise_multiplier,
        "noise_scale": noise_scale,
        "clip_canary": clip_canary,
        "trials_per_world": trials,
        "delta": delta,
        "claimed_epsilon": claimed,
        **bound,
    }


def local_canary_audit(
    noise_multiplier: float = 1.0,
    *,
    trials: int = 200_000,
    neighbour: str = "zero",
    sampling: str = "poisson",
    clip: float = 1.0,
    delta: float = 1e-5,
    seed: int = 0,
) -> dict[str, Any]:
    """Distinguishing audit of one client's message under local DP (``UserLevelDP`` with
    ``mechanism=local``): the server sees the message itself, so the canary client sends
    10⁶·e₁ (clipped to C·e₁) in world 1 and, in world 0, a zero update (``neighbour="zero"``:
    the client's data removed but the client still reporting) or −10⁶·e₁ (``"replace"``: any
    other data, the usual local-DP neighbours). One ``device_release`` of ``trials`` clients per
    world (the local noise is keyed by client id) gives all trials at once."""
    from fedkin.privacy.config import PrivacyConfig
    from fedkin.privacy.federated import UserLevelDP

    cfg = PrivacyConfig(
        mechanism="local",
        noise_multiplier=noise_multiplier,
        clip=clip,
        delta=delta,
        accountant="rdp" if sampling == "fixed" else "pld",
    )
    dp = UserLevelDP(
        cfg, population=10 * trials, cohort_size=trials, sampling=sampling, rounds=1, seed=seed
    )
    stats = []
    for world in (0, 1):
        value = 1e6 if world else (-1e6 if neighbour == "replace" else 0.0)
        a = torch.zeros(trials, 3)
        a[:, 0] = value
        ok, clients = torch.ones(trials, dtype=torch.bool), torch.arange(trials) + world * trials
        noisy, _ = dp.device_release({"a": a, "b": torch.zeros(trials, 2)}, ok, 0, clients)
        stats.append(noisy["a"][:, 0].double().numpy())
    sigma = noise_multiplier * clip
    low = -clip if neighbour == "replace" else 0.0
    grid = np.linspace(low - 8 * sigma, clip + 8 * sigma, 401)
    return {
        "mechanism": "local",
        "sampling": sampling,
        "neighbour": neighbour,
        "noise_multiplier": noise_multiplier,
        "trials_per_world": trials,
        "delta": delta,
        "claimed_epsilon": dp.epsilon_after(1),
        **epsilon_lower_bound(stats[0], stats[1], delta, grid),
    }


# ----- accuracy against ε ------------------------------------------------------------------------


def _config(spec: PrivacyBenchSpec, algorithm: str, epsilon: float, extra: list[str]):
    from fedkin.config import load_config

    privacy = (
        []
        if math.isinf(epsilon)
        else [
            "privacy.mechanism=central",
            f"privacy.target_epsilon={epsilon:g}",
            f"privacy.delta={spec.delta:g}",
            "privacy.clip=0.5",
            *(["privacy.adaptive_clip.target_quantile=0.5"] if spec.adaptive_clip else []),
            # utility is measured on the clients' test data: outside the DP release
            "privacy.release_diagnostics=true",
        ]
    )
    return load_config(
        None,
        [
            *spec.data,
            *spec.training,
            f"cohort.clients_per_round={spec.clients_per_round}",
            f"algorithm.name={algorithm}",
            f"rounds={spec.rounds}",
            f"eval.every={spec.rounds}",
            f"seed={spec.seed}",
            *privacy,
            *extra,
        ],
    )


def accuracy_run(spec: PrivacyBenchSpec, algorithm: str, epsilon: float, dataset) -> dict:
    from fedkin.experiment import Experiment

    exp = Experiment(_config(spec, algorithm, epsilon, []), dataset=dataset)
    times = []
    for _ in range(spec.rounds):
        t0 = time.perf_counter()
        exp.run_round()
        times.append(time.perf_counter() - t0)
    result = exp.evaluate()
    summary = exp.privacy.summary() if exp.privacy else {}
    return {
        "algorithm": algorithm,
        "target_epsilon": None if math.isinf(epsilon) else epsilon,
        "epsilon_spent": summary.get("epsilon"),
        "epsilon_rdp": summary.get("epsilon_rdp"),
        "noise_multiplier": summary.get("noise_multiplier"),
        "final_clip": exp.channel_state.clip,
        "global_acc": result.get("global_acc_mean"),
        "personal_acc": result["personal_acc_mean"],
        "s_per_round": statistics.median(times),
    }


class _ZeroNoise:
    """Stands in for the DP-SGD noise stream (timing only): N(0, 1) draws replaced by zeros."""

    def normal(self, *counters):
        return torch.zeros(counters[-1].shape, dtype=torch.float64)


def dp_sgd_overhead(spec: PrivacyBenchSpec, dataset) -> dict:
    """Median s/round of FedAvg without privacy, with example-level DP-SGD, and (to split the
    cost) with DP-SGD whose noise draws are replaced by zeros; rounds timed in alternation."""
    from fedkin.experiment import Experiment

    fixed = ["cohort.sampling=fixed", "algorithm.name=fedavg"]
    dp_sgd = ["privacy.dp_sgd.clip=1.0", "privacy.dp_sgd.noise_multiplier=1.0"]
    runs = {
        "plain": Experiment(_config(spec, "fedavg", INF, fixed), dataset=dataset),
        "dp_sgd": Experiment(_config(spec, "fedavg", INF, [*fixed, *dp_sgd]), dataset=dataset),
        "no_noise": Experiment(_config(spec, "fedavg", INF, [*fixed, *dp_sgd]), dataset=dataset),
    }
    for group in runs["no_noise"].groups:
        group.algorithm.dp_stream = _ZeroNoise()
    for exp in runs.values():
        exp.run_round()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(spec.overhead_rounds):
        for name, exp in runs.items():
            t0 = time.perf_counter()
            exp.run_round()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "clients_per_round": spec.clients_per_round,
        "rounds_timed": spec.overhead_rounds,
        "engine": runs["plain"].config.engine.name,
        "plain_s_per_round": med["plain"],
        "dp_sgd_s_per_round": med["dp_sgd"],
        "dp_sgd_without_noise_draws_s_per_round": med["no_noise"],
        "ratio": med["dp_sgd"] / med["plain"],
        "ratio_without_noise_draws": med["no_noise"] / med["plain"],
    }


def run_bench(spec: PrivacyBenchSpec, out: Path, command: str, prefix: str = "privacy") -> dict:
    from fedkin.algorithms import ALGORITHMS
    from fedkin.config import load_config
    from fedkin.data import build_dataset

    t_start = time.perf_counter()
    algorithms = [a for a in spec.algorithms if a in ALGORITHMS]
    missing = [a for a in spec.algorithms if a not in ALGORITHMS]
    cfg = _config(spec, "fedavg", INF, [])
    dataset = build_dataset(cfg.data, cfg.seed)
    rows = []
    for algorithm in algorithms:
        for eps in spec.epsilons:
            rows.append(accuracy_run(spec, algorithm, eps, dataset))
            print(json.dumps(rows[-1]), flush=True)
    overhead = dp_sgd_overhead(spec, dataset)
    print(json.dumps(overhead), flush=True)
    audit = [
        canary_audit(1.0, trials=spec.audit_trials),
        canary_audit(1.0, trials=spec.audit_trials, noise_scale=0.5),
        canary_audit(1.0, trials=max(spec.audit_trials // 10, 1000), noise_scale=0.1),
    ]
    result = {
        "command": command,
        "spec": asdict(spec),
        "algorithms_missing": missing,
        "dataset": load_config(None, spec.data).data.model_dump(mode="json"),
        "population": int(dataset.num_clients),
        "threads": torch.get_num_threads(),
        "commit": _commit(),
        "accuracy": rows,
        "dp_sgd_overhead": overhead,
        "audit": audit,
        "wall_s": time.perf_counter() - t_start,
    }
    write_results(result, out, prefix)
    return result


def _commit() -> str:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "?"
    except OSError:
        return "?"


# ----- output ------------------------------------------------------------------------------------


def _eps_label(e: float | None) -> str:
    return "∞" if e is None or (isinstance(e, float) and math.isinf(e)) else f"{e:g}"


def markdown(result: dict) -> str:
    spec = result["spec"]
    rows = result["accuracy"]
    algorithms = list(dict.fromkeys(r["algorithm"] for r in rows))
    eps = [_eps_label(e) for e in spec["epsilons"]]
    by = {(r["algorithm"], _eps_label(r["target_epsilon"])): r for r in rows}
    lines = [
        "# Private federated learning: accuracy against ε",
        "",
        f"Command: `{result['command']}` (wall time {result['wall_s'] / 60:.1f} min, "
        f"{result['threads']} torch thread(s), fedkin commit {result.get('commit', '?')}).",
        "",
        f"Data: {', '.join(spec['data'])}; {result['population']} clients; "
        f"{', '.join(spec['training'])}; Poisson cohorts of {spec['clients_per_round']} expected "
        f"clients; {spec['rounds']} rounds; δ = {spec['delta']:g}; user-level DP-FedAvg "
        "(central noise, PLD-calibrated to the target ε, "
        + (
            "adaptive clip at the median update norm, from 0.5"
            if spec["adaptive_clip"]
            else "clip 0.5"
        )
        + "); ε = ∞ is the same run without privacy; one seed. Private s/round includes the "
        "per-round ε (a PLD composition each round). A simulation measuring utility: the "
        "accuracies are evaluated on the clients' test data with "
        "`privacy.release_diagnostics=true`, outside the DP release (a private run does not "
        "release them).",
        "",
        "Mean test accuracy over clients after the last round — personal model (global model):",
        "",
        "| algorithm | " + " | ".join(f"ε = {e}" for e in eps) + " |",
        "|---|" + "---:|" * len(eps),
    ]
    for a in algorithms:
        cells = []
        for e in eps:
            r = by.get((a, e))
            if r is None:
                cells.append("–")
                continue
            g = r["global_acc"]
            cells.append(f"{r['personal_acc']:.3f}" + ("" if g is None else f" ({g:.3f})"))
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "ε spent (PLD) / noise multiplier z / final clip / s per round:",
        "",
        "| algorithm | ε target | ε spent | ε (RDP check) | z | clip | s/round |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:

        def f(v, fmt):
            return "–" if v is None else format(v, fmt)

        lines.append(
            f"| {r['algorithm']} | {_eps_label(r['target_epsilon'])} | "
            f"{f(r['epsilon_spent'], '.4f')} | {f(r['epsilon_rdp'], '.4f')} | "
            f"{f(r['noise_multiplier'], '.4f')} | {f(r['final_clip'], '.3f')} | "
            f"{r['s_per_round']:.3f} |"
        )
    o = result["dp_sgd_overhead"]
    lines += [
        "",
        "## Example-level DP-SGD overhead",
        "",
        f"FedAvg, fixed cohort of {o['clients_per_round']} clients, same cohorts and batches, "
        f"{o['engine']} engine, median of {o['rounds_timed']} alternating rounds: "
        f"{o['plain_s_per_round']:.3f} s/round without privacy, "
        f"{o['dp_sgd_s_per_round']:.3f} s/round with DP-SGD (per-example clip + noise): "
        f"**{o['ratio']:.1f}×**. Without the noise draws (replaced by zeros, timing only) DP-SGD "
        f"takes {o['dp_sgd_without_noise_draws_s_per_round']:.3f} s/round "
        f"({o['ratio_without_noise_draws']:.1f}×): the rest is the counter-based noise, one "
        "hashed normal per parameter, client and step.",
        "",
        "## Audit (one round of the central DP aggregation, canary with update 10⁶·e₁)",
        "",
        "| mechanism | trials/world | accountant ε (nominal z) | empirical ε_lb | verdict |",
        "|---|---:|---:|---:|---|",
    ]
    for a in result["audit"]:
        name = "honest" if a["noise_scale"] == 1 else f"noise std × {a['noise_scale']:g}"
        verdict = "ok (ε_lb ≤ ε)" if a["epsilon_lb"] <= a["claimed_epsilon"] else "CAUGHT"
        lines.append(
            f"| {name}, z = {a['noise_multiplier']:g} | {a['trials_per_world']:,} | "
            f"{a['claimed_epsilon']:.3f} | {a['epsilon_lb']:.3f} | {verdict} |"
        )
    lines += [
        "",
        "ε_lb = max over a fixed grid of thresholds of log((1 − δ − FNR⁺)/FPR⁺) (and the "
        "symmetric form), Clopper–Pearson bounds at 95% with a Bonferroni split over the "
        "thresholds; δ = 1e-5.",
    ]
    if result["algorithms_missing"]:
        lines += ["", f"Not registered, skipped: {', '.join(result['algorithms_missing'])}."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["accuracy"]
    eps = [_eps_label(e) for e in result["spec"]["epsilons"]]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, a in enumerate(dict.fromkeys(r["algorithm"] for r in rows)):
        mine = {_eps_label(r["target_epsilon"]): r for r in rows if r["algorithm"] == a}
        xs = [j for j, e in enumerate(eps) if e in mine]
        color = f"C{i}"
        label = f"{a} personal" if a != "fedavg" else "fedavg (one global model)"
        ax.plot(xs, [mine[eps[j]]["personal_acc"] for j in xs], "o-", color=color, label=label)
        if a != "fedavg":
            ax.plot(
                xs,
                [mine[eps[j]]["global_acc"] for j in xs],
                "s--",
                color=color,
                alpha=0.6,
                label=f"{a} global",
            )
    ax.set_xticks(range(len(eps)), [f"ε={e}" for e in eps])
    ax.set_ylabel("mean client test accuracy")
    ax.set_title(
        f"Accuracy vs ε (δ={result['spec']['delta']:g}, {result['spec']['rounds']} rounds)"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(result: dict, out: Path, prefix: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{prefix}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{prefix}.md").write_text(markdown(result))
    plot(result, out / f"{prefix}.png")


# ----- CLI ---------------------------------------------------------------------------------------


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "privacy",
        help="private FL: accuracy vs ε (DP-FedAvg/Ditto/AdaPeD), DP-SGD overhead, DP audit",
        description=(__doc__ or "").split("\n\n")[0],
    )
    p.add_argument("--rounds", type=int, default=80, help="rounds per run (default 80)")
    p.add_argument("--quick", action="store_true", help="tiny smoke version (digits, 2 rounds)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1: tiny models)"
    )
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})"
    )
    p.set_defaults(func=cmd_privacy_bench)


def cmd_privacy_bench(args: argparse.Namespace) -> int:
    from fedkin.core.errors import UserError

    if args.rounds < 1 or args.threads < 1:
        raise UserError(f"--rounds and --threads must be >= 1, got {args.rounds}, {args.threads}")
    torch.set_num_threads(args.threads)
    if args.quick:
        spec, prefix, command = quick_spec(), "privacy_quick", "fedkin bench privacy --quick"
    else:
        spec, prefix = default_spec(args.rounds), "privacy"
        command = "fedkin bench privacy" + (f" --rounds {args.rounds}" if args.rounds != 80 else "")
    if args.threads != 1:
        command += f" --threads {args.threads}"
    if args.out != DEFAULT_OUT:
        command += f" --out {args.out}"
    result = run_bench(spec, args.out, command, prefix)
    print(markdown(result))
    return 0
