"""Why SPIRE's new clients lose to FedAvg with full fine-tuning (issue 14): adaptation sweeps
on cached pretrained models.

Pretraining is the expensive part, so SPIRE (backbone + embeddings) and FedAvg are each trained
once in Table 2's setting (:mod:`fedkin.bench.diffusion`; ``--rounds``, ``--seed``, …) and
cached under ``--cache`` (:func:`fedkin.bench.diffusion.pretrained`, shared with ``fedkin bench
diffusion``). Only adaptation is then swept, each new client j
scored by KID of its samples against its test images on the cached feature CNN:

* ``spire``: ``--adapt-steps`` × ``--adapt-lrs`` × ``--inits`` of the embedding e_new, from
  ``mean`` (ē, the default), ``random`` (a fresh N(0, I) draw), ``zero`` or ``twin`` (the
  trained embedding of a training client holding j's digit class; only for *covered* new
  clients). 0 steps scores the initialization itself.
* ``spire-best-train-embedding``: per new client, the lowest KID over the training clients'
  trained embeddings, unadapted (what the frozen backbone can produce for j at all).
* ``fedavg-ft``: full fine-tuning from the FedAvg model for ``--ft-steps`` steps at each of
  ``--ft-lrs`` (Adam; default the client lr of pretraining).

A new client is *covered* when some training client holds its class (one class per client:
an uncovered client's digit never reaches the backbone in pretraining). Rows: the Table-2 row
shape ``{"method", "dataset", "metric", "value", "trainable_params"}`` plus the setting
(``init``, ``steps``, ``lr``, ``rounds``, ``seed``); ``metric`` is ``kid_new_mean`` (all new
clients), ``kid_new_covered_mean``, ``kid_new_uncovered_mean`` or ``kid_client{j}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fedkin.bench.diffusion import (
    adapted_count,
    add_arguments,
    base_overrides,
    client_class,
    feature_map,
    generate,
    method_overrides,
    normalize,
    optional_flags,
    pretrained,
    scores,
)
from fedkin.config import load_config
from fedkin.experiment import Experiment

INITS = ("mean", "random", "zero", "twin")


def experiment(args: argparse.Namespace, method: str, **over) -> Experiment:
    """Table 2's experiment of ``method`` (``over``: adaptation ``steps``/``lr``, fine-tuning
    ``ft_lr``: the client optimizer's lr, which only fine-tuning uses once the pretrained
    state is loaded). Adaptation longer than a round draws that many batches
    (``client.local_steps``; batch s of a solve is batch s mod local_steps with its fixed
    diffusion noise), so no step repeats a batch."""
    steps, lr = over.get("steps", args.steps), over.get("lr", args.adapt_lr)
    batches = [f"client.local_steps={steps}"] if steps > args.steps else []
    ft_lr = [f"client.optimizer.lr={over['ft_lr']}"] if "ft_lr" in over else []
    overrides = [*base_overrides(args), *method_overrides(method, steps, lr), *batches, *ft_lr]
    return Experiment(load_config(None, overrides))


def kid_of(exp: Experiment, features, params: dict, j: int, args) -> float:
    real = exp.dataset.client_test(j)[0].reshape(-1, *exp.model.image_shape)
    return scores(features, real, generate(exp, params, j, args))[0]


def summary_rows(setting: dict, values: dict[int, float], covered: dict[int, bool]) -> list[dict]:
    """kid_new_mean / _covered_mean / _uncovered_mean and per-client rows of one setting."""
    rows = [{**setting, "metric": f"kid_client{j}", "value": v} for j, v in values.items()]
    for name, keep in (("", None), ("_covered", True), ("_uncovered", False)):
        vals = [v for j, v in values.items() if keep is None or covered[j] == keep]
        if vals:
            rows.append(
                {**setting, "metric": f"kid_new{name}_mean", "value": statistics.fmean(vals)}
            )
    return rows


def sweep(args: argparse.Namespace, log=print) -> list[dict]:
    probe = experiment(args, "spire")
    features, _ = feature_map(args)
    old, new = probe.training_clients.tolist(), probe.new_clients.tolist()
    cls = {i: client_class(probe, i) for i in old + new}
    covered = {j: any(cls[i] == cls[j] for i in old) for j in new}
    twin = {j: next((i for i in old if cls[i] == cls[j]), None) for j in new}
    log(f"new clients (class, covered): {[(j, cls[j], covered[j]) for j in new]}")
    base = {"dataset": "digits", "rounds": args.rounds, "seed": args.seed}
    rows = [
        {
            **base,
            "method": "split",
            "metric": f"class_client{i}",
            "value": cls[i],
            "trainable_params": 0,
            "training": i in old,
        }
        for i in old + new
    ]
    state = pretrained(args, "spire", log)
    count = adapted_count(probe, "spire")
    probe.load_state_dict(state)
    embeddings = {}
    for i in old:
        embeddings[i] = probe.algorithm.split(probe.personal_params(i))[1]
    best = {}
    for i in old:
        params = {**probe.population["global"], **embeddings[i]}
        for j in new:
            best[j] = min(best.get(j, float("inf")), kid_of(probe, features, params, j, args))
    rows += summary_rows(
        {**base, "method": "spire-best-train-embedding", "trainable_params": 0}, best, covered
    )
    mean = probe.population["embedding_mean"]
    gen = torch.Generator().manual_seed(args.seed)
    starts = {
        "mean": lambda j: mean,
        "random": lambda j: {k: torch.randn(v.shape, generator=gen) for k, v in mean.items()},
        "zero": lambda j: {k: torch.zeros_like(v) for k, v in mean.items()},
        "twin": lambda j: embeddings[twin[j]] if twin[j] is not None else None,
    }
    for steps in args.adapt_steps:
        for lr in args.adapt_lrs if steps else [0.0]:
            exp = experiment(args, "spire", steps=steps, lr=lr or args.adapt_lr)
            exp.load_state_dict(state)
            population = exp.population
            for init in args.inits:
                t0 = time.perf_counter()
                values = {}
                for j in new:
                    start = starts[init](j)
                    if start is None:
                        continue
                    exp.population = {**population, "embedding_mean": start}
                    values[j] = kid_of(exp, features, exp.personal_params(j), j, args)
                exp.population = population
                setting = {
                    **base,
                    "method": "spire",
                    "init": init,
                    "steps": steps,
                    "lr": lr,
                    "trainable_params": count,
                }
                rows += summary_rows(setting, values, covered)
                log(
                    f"spire init={init} steps={steps} lr={lr}: "
                    f"{ {j: round(v) for j, v in values.items()} } "
                    f"({time.perf_counter() - t0:.0f}s)"
                )
    state = pretrained(args, "fedavg-ft", log)
    for steps in args.ft_steps:
        for ft_lr in args.ft_lrs or [args.lr]:
            exp = experiment(args, "fedavg-ft", steps=steps, ft_lr=ft_lr)
            exp.load_state_dict(state)
            values = {j: kid_of(exp, features, exp.personal_params(j), j, args) for j in new}
            setting = {
                **base,
                "method": "fedavg-ft",
                "steps": steps,
                "lr": ft_lr,
                "trainable_params": adapted_count(exp, "fedavg-ft"),
            }
            rows += summary_rows(setting, values, covered)
            log(f"fedavg-ft steps={steps} lr={ft_lr}: { {j: round(v) for j, v in values.items()} }")
    return rows


def markdown(rows: list[dict], command: str) -> str:
    """One line per swept setting: KID over all, covered and uncovered new clients."""
    by: dict[tuple, dict] = {}
    for r in rows:
        if r["metric"].startswith("kid_new"):
            key = (r["method"], r.get("init", ""), r.get("steps", ""), r.get("lr", ""))
            by.setdefault(key, {"params": r["trainable_params"]})[r["metric"]] = r["value"]
    lines = [
        f"`{command}`",
        "",
        "| method | init | steps | lr | KID new (all) | KID new (class covered) | "
        "KID new (class unseen) | trainable params |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(d: dict, m: str) -> str:
        return f"{d[m]:.0f}" if m in d else "–"

    for (method, init, steps, lr), d in by.items():
        lines.append(
            f"| {method} | {init} | {steps} | {lr} | {cell(d, 'kid_new_mean')} | "
            f"{cell(d, 'kid_new_covered_mean')} | {cell(d, 'kid_new_uncovered_mean')} | "
            f"{d['params']} |"
        )
    return "\n".join(lines)


def numbers(text: str, kind: type) -> list:
    return [kind(v) for v in text.split(",") if v]


def command_line(args: argparse.Namespace) -> str:
    return (
        f"fedkin bench spire-ablation --rounds {args.rounds} --seed {args.seed} "
        f"--steps {args.steps} --lr {args.lr} --adapt-steps {','.join(map(str, args.adapt_steps))} "
        f"--adapt-lrs {','.join(map(str, args.adapt_lrs))} --inits {','.join(args.inits)} "
        f"--ft-steps {','.join(map(str, args.ft_steps))} "
        + (f"--ft-lrs {','.join(map(str, args.ft_lrs))} " if args.ft_lrs else "")
        + f"--samples {args.samples} "
        f"--sample-steps {args.sample_steps}{optional_flags(args)}"
    )


def cmd_ablation(args: argparse.Namespace) -> int:
    from fedkin.core.errors import UserError

    args = normalize(args, UserError)
    args.adapt_steps = numbers(args.adapt_steps, int)
    args.adapt_lrs = numbers(args.adapt_lrs, float)
    args.ft_steps = numbers(args.ft_steps, int)
    args.ft_lrs = numbers(args.ft_lrs, float)
    args.inits = [s for s in args.inits.split(",") if s]
    bad = [s for s in args.inits if s not in INITS]
    if bad or not args.inits:
        raise UserError(f"--inits {bad}: allowed values are {', '.join(INITS)}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rows = sweep(args)
    command = command_line(args)
    text = markdown(rows, command)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        width = f"_d{args.embedding_dim}" if args.embedding_dim else ""
        shots = f"_n{args.new_client_images}" if args.new_client_images else ""
        tag = f"spire_ablation_seed{args.seed}_r{args.rounds}{width}{shots}"
        (out / f"{tag}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
        (out / f"{tag}.md").write_text(text + "\n")
    print(text)
    return 0


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "spire-ablation",
        help="SPIRE vs FedAvg-FT new-client KID: adaptation sweeps on cached pretrained models",
        description=__doc__.split("\n\n")[0],
    )
    add_arguments(p)
    p.add_argument("--adapt-steps", default="0,10,100", help="SPIRE adaptation steps to sweep")
    p.add_argument("--adapt-lrs", default="0.01,0.1,1.0", help="SPIRE embedding Adam lrs")
    p.add_argument("--inits", default=",".join(INITS), help=f"embedding inits of {INITS}")
    p.add_argument("--ft-steps", default="10,100", help="FedAvg full fine-tuning steps")
    p.add_argument(
        "--ft-lrs", default="", help="FedAvg fine-tuning Adam lrs (default: the client --lr)"
    )
    p.set_defaults(func=cmd_ablation)
