"""`fedkin bench quantized`: personalized accuracy against personal-model size (QuPeD, QuPeL).

On one experiment config (a ``configs/quantized_*.yaml``), every variant runs on the same
partition, cohorts and batches (one seed): QuPeD and QuPeL at full precision, 2 bits (4 centers)
and 1 bit (2 centers); a mixed population (a third each at 1 bit, 2 bits and full precision; for
QuPeD the 2-bit third uses a second architecture, the base model at half width); and the
full-precision baselines Local, FedAvg-FT, Ditto, AdaPeD and FedAvg. Algorithm options come from
the config's ``compare.algorithm_options``.

Sizes are measured, not computed: every training client's final personal model is written with
``models.packed.save_packed`` (bit-packed codes + float32 centers; other layers float32) and
``model_bytes`` is the mean file size over clients. ``quantized_layer_bytes`` is the packed size
of the quantized layers alone and ``fp32_quantized_layer_bytes`` the same layers at float32, both
averaged over the clients that have quantized layers (0 if none do).
Each variant is an ordinary run directory under ``<out>/runs/`` (finished runs are reused).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from fedkin.config import deep_merge, parse_overrides, read_yaml, validate_config
from fedkin.core.quantize import bits_for
from fedkin.experiment import CHECKPOINT, Experiment
from fedkin.models.packed import save_packed
from fedkin.runs import execute, new_run, read_summary, resume_run

BASELINES = ("fedavg", "local", "fedavg_ft", "ditto", "adaped")


def half_width(model: dict[str, Any]) -> dict[str, Any]:
    """The base architecture at half width (the second architecture of the mixed population)."""
    out = dict(model)
    if "hidden" in out:
        h = out["hidden"]
        out["hidden"] = [max(1, v // 2) for v in h] if isinstance(h, list) else max(1, h // 2)
    if "channels" in out:
        out["channels"] = [max(1, v // 2) for v in out["channels"]]
    return out


def variants(base: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Variant label → {algorithm, bits, architecture, overrides (merged into the config)}."""
    model = base["model"]
    out: dict[str, dict[str, Any]] = {}
    for alg in ("quped", "qupel"):
        for centers, bits in ((None, "32"), (4, "2"), (2, "1")):
            out[f"{alg}-{bits}bit"] = {
                "algorithm": alg,
                "bits": bits,
                "architecture": "base",
                "overrides": {"algorithm": {"centers": centers}},
            }
    for alg, second in (("quped", half_width(model)), ("qupel", model)):
        groups = [
            {"model": model, "fraction": 0.34, "centers": 2},
            {"model": second, "fraction": 0.33, "centers": 4},
            {"model": model, "fraction": 0.33, "centers": None},
        ]
        out[f"{alg}-mixed"] = {
            "algorithm": alg,
            "bits": "mixed 1/2/32",
            "architecture": "base + half" if second != model else "base",
            "overrides": {"client_models": groups},
        }
    for alg in BASELINES:
        out[alg] = {"algorithm": alg, "bits": "32", "architecture": "base", "overrides": {}}
    return out


def run_config(base: dict[str, Any], options: dict[str, Any], label: str, spec: dict[str, Any]):
    raw = deep_merge(base, {"algorithm": {"name": spec["algorithm"], **options}})
    raw = deep_merge(raw, spec["overrides"])
    raw["name"] = f"{base.get('name', 'quantized')}-{label}"
    return validate_config(raw)


def personal_sizes(exp: Experiment) -> dict[str, float]:
    """Mean packed size over training clients of their personal models (bytes)."""
    sizes, q_bytes, fp_bytes = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        for g in exp.groups:
            clients = g.members[exp.is_training[g.members]]
            if not len(clients):
                continue
            states = g.store.gather(g.rows(clients))
            alg = g.algorithm
            for j in range(len(clients)):
                state = {k: _row(v, j) for k, v in states.items()}
                if "x" in state:  # quantizing algorithm: weights x and centers c
                    params, centers = state["x"], state["c"]
                else:  # full precision: the size does not depend on the values
                    params, centers = alg.initial_params(), {}
                sizes.append(save_packed(params, centers, path))
                q, f = 0, 0
                for name, c in centers.items():
                    n = params[name].numel()
                    q += math.ceil(n * bits_for(c.numel()) / 8) + 4 * c.numel()
                    f += 4 * n
                if centers:
                    q_bytes.append(q)
                    fp_bytes.append(f)
    mean = lambda v: sum(v) / len(v) if v else 0.0  # noqa: E731
    return {
        "model_bytes": mean(sizes),
        "quantized_layer_bytes": mean(q_bytes),
        "fp32_quantized_layer_bytes": mean(fp_bytes),
    }


def _row(tree: Any, j: int) -> Any:
    if isinstance(tree, dict):
        return {k: _row(v, j) for k, v in tree.items()}
    return tree[j]


def run_variant(config, run_dir: Path, progress: bool) -> tuple[dict[str, Any], Experiment]:
    summary = read_summary(run_dir)
    if summary is None or summary.get("rounds", 0) < config.rounds:
        exp = resume_run(run_dir) if (run_dir / CHECKPOINT).exists() else new_run(config, run_dir)
        summary = execute(exp, run_dir, progress=progress)
    exp = resume_run(run_dir)  # the final state, for the packed sizes
    return summary, exp


def cmd_quantized(args: argparse.Namespace) -> int:
    if args.config and "=" in args.config:  # no YAML, only overrides
        args.overrides, args.config = [args.config, *args.overrides], None
    raw = deep_merge(read_yaml(args.config) if args.config else {}, parse_overrides(args.overrides))
    options = (raw.pop("compare", None) or {}).get("algorithm_options", {})
    base = validate_config(raw).model_dump(mode="json")  # defaults filled in, e.g. model
    base.pop("algorithm")
    all_variants = variants(base)
    chosen = args.variants or list(all_variants)
    unknown = [v for v in chosen if v not in all_variants]
    if unknown:
        from fedkin.core.errors import ConfigError

        raise ConfigError(f"--variants: unknown {unknown}; allowed: {', '.join(all_variants)}")
    out = Path(args.out)
    rows = []
    for label in chosen:
        spec = all_variants[label]
        config = run_config(base, options.get(spec["algorithm"], {}), label, spec)
        summary, exp = run_variant(config, out / "runs" / label, progress=not args.json)
        sizes = personal_sizes(exp)
        acc = summary["personal_acc_mean"]
        rows.append(
            {
                "variant": label,
                "algorithm": spec["algorithm"],
                "bits": spec["bits"],
                "architecture": spec["architecture"],
                "personal_acc_mean": acc,
                "personal_acc_p10": summary["personal_acc_p10"],
                "global_acc_mean": summary.get("global_acc_mean"),
                **sizes,
                "acc_per_kbit": acc / (sizes["model_bytes"] * 8 / 1000),
                "run_dir": str(out / "runs" / label),
            }
        )
    result = {"config": args.config, "overrides": args.overrides, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(markdown(rows))
    print(json.dumps(result, indent=2) if args.json else markdown(rows))
    return 0


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| variant | bits | architecture | personal acc (mean) | personal acc (p10) | "
        "model bytes | quantized layers: bytes / fp32 bytes | acc per kbit |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        ratio = (
            f"{r['quantized_layer_bytes']:.0f} / {r['fp32_quantized_layer_bytes']:.0f} "
            f"(1/{r['fp32_quantized_layer_bytes'] / r['quantized_layer_bytes']:.1f})"
            if r["quantized_layer_bytes"]
            else "–"
        )
        lines.append(
            f"| {r['variant']} | {r['bits']} | {r['architecture']} | "
            f"{100 * r['personal_acc_mean']:.1f} | {100 * r['personal_acc_p10']:.1f} | "
            f"{r['model_bytes']:.0f} | {ratio} | {r['acc_per_kbit']:.4f} |"
        )
    return head + "\n".join(lines) + "\n"


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantized",
        help="QuPeD/QuPeL at FP, 2-bit, 1-bit and mixed vs baselines: accuracy and packed size",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("config", nargs="?", help="experiment YAML (e.g. configs/quantized_digits.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--out", default="runs/bench-quantized", help="output directory")
    p.add_argument("--variants", nargs="+", help="subset of variants (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_quantized)
