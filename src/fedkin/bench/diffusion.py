"""Table 2 of issue 14: per-client sample quality (KID) of personalized diffusion models.

Data: scikit-learn digits (8×8) split into ``clients`` label-pure shards (pathological
partition, one class per client; with 20 clients every class is held by two), of which
``holdout`` never train: they are the *new* clients. Model: the conditional DDPM of
:mod:`fedkin.models.diffusion` (diffusers ``UNet2DModel``, client embedding added to the
timestep embedding). Every method trains ``rounds`` rounds of ``steps`` local Adam steps with
all training clients each round; a new client then gets the *same adaptation budget*, one
round's ``steps`` steps on its own training data:

* ``spire``: backbone averaged, embeddings personal; a new client trains only a fresh
  embedding (initialized at the mean embedding) — d_e parameters (``--embedding-dim``,
  default 4·channels[0]).
* ``adept-dgm``: ADEPT's Gaussian/inverse-gamma prior on every parameter; a new client runs
  ADEPT's local solver from μ (all parameters).
* ``local``: each client trains alone from the initialization; a new client from scratch.
* ``fedavg``: FedAvg's global model for every client, no adaptation (the *global* baseline).
* ``fedavg-ft``: FedAvg, then every client fine-tunes all parameters (full fine-tuning).
* ``fedavg-ft-last``: the same FedAvg model (same pretraining), fine-tuning only the last
  layer (``unet.conv_out``).

Pretraining (``rounds`` rounds per method) is cached in ``--cache`` (:func:`pretrained`), so
reruns with other adaptation settings, and ``fedkin bench spire-ablation``, reuse it. The
split matters: with one class per client a new client's digit may have no training client
(counted in the ``split`` rows); no embedding of a backbone that never saw it can make it.

Metrics (:mod:`fedkin.models.diffusion_metrics`): per client, ``samples`` images are generated
(ancestral DDPM on ``sample_steps`` evenly spaced timesteps) and compared with the client's
test images by KID and the FID-style score on the features of a CNN that fedkin trains on the
pooled training data and caches (Inception weights cannot be downloaded here). Mean and std are
over clients. ``data`` rows give the floor: KID of each client's *training* images against its
test images. Forgetting: the mean change of the old (training) clients' KID when the shared
weights are replaced by those adapted to a new client (FedAvg: the old clients then generate
with the fine-tuned model; averaged over new clients). SPIRE, ADEPT-DGM, Local and FedAvg (no
adaptation) never change the weights old clients generate with during adaptation: the population
is checked byte for byte after adaptation (an error if it moved), so their forgetting is 0
without resampling.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from fedkin.config import load_config
from fedkin.core.tree import tree_leaves
from fedkin.data import build_dataset
from fedkin.experiment import Experiment
from fedkin.models.diffusion_metrics import FeatureMap, feature_classifier, fid, kid

METHODS = ("spire", "adept-dgm", "local", "fedavg", "fedavg-ft", "fedavg-ft-last")
#: methods that reuse another's pretraining (the FedAvg model, adapted differently)
SHARED_PRETRAINING = {"fedavg": "fedavg-ft", "fedavg-ft-last": "fedavg-ft"}
LAST_LAYER = "unet.conv_out"


def method_overrides(method: str, steps: int, adapt_lr: float) -> list[str]:
    """Config overrides of one method (``steps``: the new-client adaptation budget)."""
    if method == "spire":
        return [
            "algorithm.name=spire",
            f"algorithm.adapt_steps={steps}",
            f"algorithm.adapt_lr={adapt_lr}",
        ]
    if method == "fedavg":
        return ["algorithm.name=fedavg_ft", "algorithm.finetune_steps=0"]
    if method in ("fedavg-ft", "fedavg-ft-last"):
        layers = f"[{LAST_LAYER}]" if method == "fedavg-ft-last" else "null"
        return [
            "algorithm.name=fedavg_ft",
            f"algorithm.finetune_steps={steps}",
            f"algorithm.finetune_layers={layers}",
        ]
    return [f"algorithm.name={method}"]


def base_overrides(args: argparse.Namespace) -> list[str]:
    return [
        "data.name=digits",
        f"data.num_clients={args.clients}",
        "data.partition.name=pathological",
        "data.partition.classes_per_client=1",
        f"eval.holdout_clients={args.holdout}",
        *(
            [f"eval.new_client_train_samples={args.new_client_images}"]
            if args.new_client_images
            else []
        ),
        f"cohort.clients_per_round={args.clients - round(args.clients * args.holdout)}",
        "model.name=ddpm",
        f"model.channels={json.dumps(args.channels)}",
        *([f"model.embedding_dim={args.embedding_dim}"] if args.embedding_dim else []),
        f"client.local_steps={args.steps}",
        f"client.batch_size={args.batch}",
        "client.optimizer.name=adam",
        f"client.optimizer.lr={args.lr}",
        f"rounds={args.rounds}",
        f"seed={args.seed}",
    ]


def adapted_count(exp: Experiment, method: str) -> int:
    """Parameters a new client trains in adaptation."""
    params = dict(exp.model.named_parameters())
    if method == "spire":
        return sum(v.numel() for v in exp.algorithm.split(params)[1].values())
    if method == "fedavg":
        return 0
    if method == "fedavg-ft-last":
        return sum(v.numel() for k, v in params.items() if k.startswith(LAST_LAYER + "."))
    return sum(v.numel() for v in params.values())


def train(exp: Experiment, rounds: int, log) -> None:
    for _ in range(rounds):
        t0 = time.perf_counter()
        record = exp.run_round()
        log(
            f"  round {exp.round}: train_loss {record.get('train_loss', float('nan')):.4f} "
            f"({time.perf_counter() - t0:.1f}s)"
        )


def all_new_client_data(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` without ``--new-client-images``. Training never reads a new client's data
    (tests/test_new_client_data.py), so runs that differ only in it share their pretraining,
    and the feature CNN (:func:`feature_map`) is the same for all of them."""
    return argparse.Namespace(**{**vars(args), "new_client_images": None})


def feature_map(args: argparse.Namespace) -> tuple[FeatureMap, float]:
    """The KID/FID feature CNN and its pooled test accuracy, trained on every client's full
    training data (whatever ``--new-client-images``, so few-shot KIDs share the full-data
    scale) and cached in ``args.cache``."""
    cfg = load_config(None, base_overrides(all_new_client_data(args)))
    return feature_classifier(build_dataset(cfg.data, cfg.seed), Path(args.cache))


def pretrained(args: argparse.Namespace, method: str, log) -> dict:
    """The experiment state after ``args.rounds`` training rounds of ``method`` (pretraining
    is the expensive part), cached in ``args.cache`` under a hash of the settings that shape
    it (adaptation settings do not; ``fedavg`` and ``fedavg-ft-last`` share ``fedavg-ft``'s).
    A longer run continues from the longest cached shorter one (resume is bit-identical). The
    key does not cover the code: clear the cache after changing an algorithm or the model."""
    method = SHARED_PRETRAINING.get(method, method)
    args = all_new_client_data(args)  # training never reads a new client's data
    key = json.dumps([base_overrides(argparse.Namespace(**{**vars(args), "rounds": 0})), method])
    stem = f"diffusion_pretrained_{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{stem}_r{args.rounds}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    overrides = [*base_overrides(args), *method_overrides(method, args.steps, args.adapt_lr)]
    exp = Experiment(load_config(None, overrides))
    done = [int(p.stem.rsplit("_r", 1)[1]) for p in cache.glob(f"{stem}_r*.pt")]
    start = max([r for r in done if r < args.rounds], default=0)
    if start:
        exp.load_state_dict(torch.load(cache / f"{stem}_r{start}.pt", weights_only=False))
    log(f"{method}: training rounds {start + 1}..{args.rounds}")
    train(exp, args.rounds - start, log)
    state = exp.state_dict()
    torch.save(state, path)
    return state


def generate(exp: Experiment, params: dict, tag: int, args) -> torch.Tensor:
    """``args.samples`` images from ``params``; the sampling noise is seeded by (seed, tag)."""
    return exp.model.sample(params, args.samples, args.sample_steps, args.seed * 100_003 + tag)


def scores(features, real: torch.Tensor, fake: torch.Tensor) -> tuple[float, float]:
    fr, ff = features(real), features(fake)
    return kid(fr, ff), fid(fr, ff)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values)


def evaluate_method(
    method: str, args: argparse.Namespace, features, log
) -> tuple[list[dict], dict]:
    """Rows of one method and its sample images per client (for the grids)."""
    cfg = load_config(
        None, [*base_overrides(args), *method_overrides(method, args.steps, args.adapt_lr)]
    )
    exp = Experiment(cfg)
    exp.load_state_dict(pretrained(args, method, log))
    ds, image_shape = exp.dataset, exp.model.image_shape
    old, new = exp.training_clients.tolist(), exp.new_clients.tolist()
    before = [t.clone() for t in tree_leaves(exp.population)]
    old_params = {i: exp.personal_params(i) for i in old}
    new_params = {j: exp.personal_params(j) for j in new}  # adaptation (same budget)
    unchanged = all(
        torch.equal(a, b) for a, b in zip(before, tree_leaves(exp.population), strict=True)
    )
    images, kids, fids = {}, {"train": [], "new": []}, {"train": [], "new": []}
    for part, table in (("train", old_params), ("new", new_params)):
        for i, params in table.items():
            fake = generate(exp, params, i, args)
            images[i] = fake
            real = ds.client_test(i)[0].reshape(-1, *image_shape)
            k, f = scores(features, real, fake)
            kids[part].append(k)
            fids[part].append(f)
    rows = []
    total = sum(v.numel() for v in exp.model.parameters())
    for part, count in (("train", total), ("new", adapted_count(exp, method))):
        for name, values in (("kid", kids[part]), ("fid", fids[part])):
            m, s = mean_std(values)
            rows.append(row(method, f"{name}_{part}_mean", m, count))
            rows.append(row(method, f"{name}_{part}_std", s, count))
    rows.append(
        row(
            method,
            "forgetting_kid",
            forgetting(exp, method, features, args, old, new, unchanged),
            0,
        )
    )
    log(f"{method}: KID train {mean_std(kids['train'])}, new {mean_std(kids['new'])}")
    return rows, images


def forgetting(exp, method, features, args, old, new, unchanged: bool) -> float:
    """Mean over old clients (and new clients j) of KID_i(after adapting to j) − KID_i(before)."""
    if method in ("spire", "adept-dgm", "local", "fedavg"):
        if not unchanged:
            raise RuntimeError(f"{method}: adaptation changed the population")
        return 0.0  # the weights old clients generate with are byte-identical (checked above)
    shared = exp.population["global"]
    image_shape = exp.model.image_shape
    base = generate(exp, shared, 10_000, args)
    deltas = []
    for j in new:
        adapted = generate(exp, exp.personal_params(j), 10_001 + j, args)
        for i in old:
            real = exp.dataset.client_test(i)[0].reshape(-1, *image_shape)
            deltas.append(scores(features, real, adapted)[0] - scores(features, real, base)[0])
    return statistics.fmean(deltas)


def row(method: str, metric: str, value: float, params: int, dataset: str = "digits") -> dict:
    return {
        "method": method,
        "dataset": dataset,
        "metric": metric,
        "value": value,
        "trainable_params": params,
    }


def client_class(exp: Experiment, i: int) -> int:
    """The digit class of client ``i`` (one class per client: its most common label)."""
    return int(torch.mode(exp.dataset.client_train(i)[1]).values)


def unseen_class_count(exp: Experiment) -> int:
    """New clients whose class no training client holds: no embedding of a backbone trained
    without that digit can make it, so the split decides what adaptation can reach."""
    seen = {client_class(exp, i) for i in exp.training_clients.tolist()}
    return sum(client_class(exp, j) not in seen for j in exp.new_clients.tolist())


def data_floor(exp_args: argparse.Namespace, features) -> list[dict]:
    """KID/FID of each client's training images against its test images."""
    cfg = load_config(None, base_overrides(exp_args))
    exp = Experiment(cfg)
    shape = exp.model.image_shape
    out = []
    for part, clients in (("train", exp.training_clients), ("new", exp.new_clients)):
        k, f = zip(
            *(
                scores(
                    features,
                    exp.dataset.client_test(i)[0].reshape(-1, *shape),
                    exp.dataset.client_train(i)[0].reshape(-1, *shape),
                )
                for i in clients.tolist()
            ),
            strict=True,
        )
        for name, values in (("kid", k), ("fid", f)):
            m, s = mean_std(list(values))
            out += [
                row("data", f"{name}_{part}_mean", m, 0),
                row("data", f"{name}_{part}_std", s, 0),
            ]
    return out


def table2(args: argparse.Namespace, log=print) -> tuple[list[dict], dict]:
    """All rows of Table 2 and the generated images per method and client."""
    probe = Experiment(load_config(None, base_overrides(args)))
    features, accuracy = feature_map(args)
    log(f"feature CNN: pooled test accuracy {accuracy:.3f}")
    rows = [
        row("feature-cnn", "test_accuracy", accuracy, 0),
        row("split", "new_clients_unseen_class", unseen_class_count(probe), 0),
        row("split", "new_clients", len(probe.new_clients), 0),
        *data_floor(args, features),
    ]
    images = {}
    for method in args.methods:
        method_rows, images[method] = evaluate_method(method, args, features, log)
        rows += method_rows
    return rows, images


def save_grid(
    images: dict[int, torch.Tensor], clients: list[int], path: Path, title: str, columns: int = 8
) -> None:
    """One row per client: ``columns`` samples, upscaled, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(clients), 1, figsize=(columns * 0.6, len(clients) * 0.7))
    for ax, i in zip(axes, clients, strict=True):
        strip = torch.cat(list(images[i][:columns, 0]), dim=1)
        ax.imshow(strip.numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f"{i}", rotation=0, labelpad=12, fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diffusion",
        help="Table 2: per-client KID of SPIRE, ADEPT-DGM, Local and FedAvg fine-tuning (DDPM)",
        description=__doc__.split("\n\n")[0],
    )
    add_arguments(p)
    p.set_defaults(func=cmd_diffusion)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated of {METHODS}")
    p.add_argument("--clients", type=int, default=20, help="clients, one digit class each")
    p.add_argument("--holdout", type=float, default=0.2, help="fraction of new clients")
    p.add_argument("--channels", default="16,32", help="U-Net block widths")
    p.add_argument(
        "--embedding-dim",
        type=int,
        default=None,
        help="client (timestep) embedding width d_e; default 4·channels[0]",
    )
    p.add_argument(
        "--new-client-images",
        type=int,
        default=None,
        help="training images each new client keeps to adapt on (few-shot); default all",
    )
    p.add_argument("--rounds", type=int, default=240, help="training rounds")
    p.add_argument("--steps", type=int, default=10, help="local steps = adaptation budget")
    p.add_argument("--batch", type=int, default=16, help="local batch size")
    p.add_argument("--lr", type=float, default=2e-3, help="client Adam learning rate")
    p.add_argument("--adapt-lr", type=float, default=0.1, help="SPIRE embedding Adam lr")
    p.add_argument("--samples", type=int, default=50, help="generated images per client")
    p.add_argument("--sample-steps", type=int, default=25, help="DDPM sampling steps")
    p.add_argument(
        "--seed",
        type=int,
        default=1,
        help="seed (partition, init, noise); 1: every new digit is trained on",
    )
    p.add_argument(
        "--cache",
        default=str(Path.home() / ".cache" / "fedkin"),
        help="feature CNN and pretrained models",
    )
    p.add_argument("--out", default="", help="directory for JSON, markdown and sample grids")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")


def parse(argv: list[str]) -> argparse.Namespace:
    """The options of ``fedkin bench diffusion ARGV``, lists parsed (``methods``, ``channels``)."""
    from fedkin.core.errors import UserError

    p = argparse.ArgumentParser(prog="fedkin bench diffusion")
    add_arguments(p)
    args = p.parse_args(argv)
    return normalize(args, UserError)


def normalize(args: argparse.Namespace, error: type[Exception]) -> argparse.Namespace:
    args.methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        raise error(f"--methods {bad}: allowed values are {', '.join(METHODS)}")
    args.channels = [int(c) for c in args.channels.split(",")]
    return args


def generative_table2(args: argparse.Namespace) -> list[dict]:
    """Table 2 for ``fedkin bench generative --table table2``: the rows of ``fedkin bench
    diffusion`` with its default settings (one seed; ``std`` rows are over clients), tagged
    ``"table": "table2"``; none if ``--datasets`` excludes digits."""
    if getattr(args, "datasets", None) and "digits" not in args.datasets:
        return []
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr))
    rows, _ = table2(parse([]), log)
    return [{"table": "table2", **r, "std": None} for r in rows]


def command_line(args: argparse.Namespace) -> str:
    return (
        f"fedkin bench diffusion --methods {','.join(args.methods)} --clients {args.clients} "
        f"--holdout {args.holdout} --channels {','.join(map(str, args.channels))} "
        f"--rounds {args.rounds} --steps {args.steps} --batch {args.batch} --lr {args.lr} "
        f"--adapt-lr {args.adapt_lr} --samples {args.samples} "
        f"--sample-steps {args.sample_steps} --seed {args.seed}{optional_flags(args)}"
    )


def optional_flags(args: argparse.Namespace) -> str:
    """The optional model/data flags that were given, as they appear on a command line."""
    return (f" --embedding-dim {args.embedding_dim}" if args.embedding_dim else "") + (
        f" --new-client-images {args.new_client_images}" if args.new_client_images else ""
    )


def markdown(rows: list[dict], command: str) -> str:
    """Table 2 as markdown: one line per method, KID/FID mean ± std on train and new clients."""
    by = {(r["method"], r["metric"]): r for r in rows}
    skip = ("feature-cnn", "split")
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] not in skip))
    lines = [
        f"`{command}`",
        "",
        "| method | KID train (mean ± std) | KID new (mean ± std) | FID train | FID new | "
        "forgetting (ΔKID old) | trainable params (adaptation) |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(m: str, metric: str, digits: int = 4) -> str:
        mean, std = by[(m, f"{metric}_mean")]["value"], by[(m, f"{metric}_std")]["value"]
        return f"{mean:.{digits}f} ± {std:.{digits}f}"

    for m in methods:
        forget = by.get((m, "forgetting_kid"))
        forget_cell = "" if forget is None else f"{forget['value']:+.4f}"
        params = by[(m, "kid_new_mean")]["trainable_params"]
        lines.append(
            f"| {m} | {cell(m, 'kid_train')} | {cell(m, 'kid_new')} | "
            f"{cell(m, 'fid_train', 2)} | {cell(m, 'fid_new', 2)} | {forget_cell} | "
            f"{'' if m == 'data' else params} |"
        )
    acc = by[("feature-cnn", "test_accuracy")]["value"]
    lines += ["", f"Feature CNN (KID/FID features) pooled test accuracy: {acc:.3f}."]
    if ("split", "new_clients") in by:
        unseen = by[("split", "new_clients_unseen_class")]["value"]
        total = by[("split", "new_clients")]["value"]
        lines.append(
            f"New clients whose digit class no training client holds: {unseen} of {total}."
        )
    return "\n".join(lines)


def cmd_diffusion(args: argparse.Namespace) -> int:
    from fedkin.core.errors import UserError

    args = normalize(args, UserError)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    log = (lambda *a: None) if args.json else print
    rows, images = table2(args, log)
    command = command_line(args)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "diffusion.json").write_text(
            json.dumps({"command": command, "rows": rows}, indent=1)
        )
        (out / "diffusion.md").write_text(markdown(rows, command) + "\n")
        probe = Experiment(load_config(None, base_overrides(args)))
        order = probe.training_clients.tolist() + probe.new_clients.tolist()
        for method in ("spire", "adept-dgm", "local"):
            if method in images:
                title = f"{method}: one row per client (last {len(probe.new_clients)}: new)"
                save_grid(images[method], order, out / f"samples_{method}.png", title)
    print(json.dumps(rows) if args.json else markdown(rows, command))
    return 0
