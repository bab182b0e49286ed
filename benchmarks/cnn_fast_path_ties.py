"""Where the CNN fast path's float32 update departs from the sequential engine's, and why.

The throughput benchmark's CNN workload (Fashion-MNIST batches, FedAvg, plain SGD, lr 0.1,
batch 16) is solved for ``--clients`` clients and ``s = 1 … --steps`` local steps by three
paths on the same batches: the hand-batched fast path (``fast:cnn``, grouped convolutions),
``vmap`` and the sequential engine. For float32 and float64 (the model's parameters and the
images cast; nothing in the engines fixes the dtype) it prints, after ``s`` steps, the largest
``|θ_path − θ_sequential|`` over clients and parameters, and the decisions of step ``s``'s
forward pass at the sequential engine's parameters ``θ_{s−1}`` computed both ways — per client
(the zoo model, NCHW, as the sequential engine runs it) and grouped (the fast path's layers):
how many ReLU masks and max-pool argmaxes differ, for which clients, and, for each flipped
max-pool window, the two candidates' values recomputed in float64 (their true gap).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/cnn_fast_path_ties.py --clients 20
"""

from __future__ import annotations

import argparse

import torch

from fedkin.algorithms.fedavg import FedAvg, FedAvgConfig
from fedkin.bench.throughput import LR, STEPS, _batches, _data, build_workload_model
from fedkin.engine import SequentialEngine, VectorizedEngine
from fedkin.engine.batched_layers import MaxPool2d, Relu
from fedkin.engine.fastpath import fast_client_update
from fedkin.optim import sgd

IN_DIMS = (None, None, 1, 0)
ENGINES = {
    "fast": lambda: VectorizedEngine(),
    "vmap": lambda: VectorizedEngine(fast_path=False),
    "sequential": SequentialEngine,
}


def solve(model, w, xs, ys, steps: int, engine) -> dict[str, torch.Tensor]:
    """Every client's parameters ``[n, …]`` after ``steps`` local steps from ``w``."""
    algorithm = FedAvg(FedAvgConfig(), model, sgd(LR), steps)
    n = xs.shape[1]
    ctx = {"client_id": torch.arange(n), "round": torch.zeros(n, dtype=torch.long)}
    args = (algorithm.init_population(w), {}, (xs, ys), ctx)
    out = engine.map(algorithm.client_update, args, IN_DIMS)
    return {k: w[k] + out[0]["delta"][k] for k in w}


def per_client_decisions(model, p, x) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """ReLU masks and max-pool argmaxes ``[n, B, …]`` of the zoo model run client by client
    (forward hooks; each pool's argmax recomputed from the input it received), and the inputs
    of the pools."""
    per, pooled = [], []

    def relu_hook(module, inputs, out):
        per[-1].append(out > 0)

    def pool_hook(module, inputs, out):
        k, s = module.kernel_size, module.stride
        idx = torch.ops.aten.max_pool2d_with_indices(inputs[0], k, s)[1]
        per[-1].append(idx)
        pooled[-1].append(inputs[0])

    hooks = [
        m.register_forward_hook(pool_hook if isinstance(m, torch.nn.MaxPool2d) else relu_hook)
        for m in model.modules()
        if isinstance(m, torch.nn.MaxPool2d | torch.nn.ReLU)
    ]
    for i in range(x.shape[0]):
        per.append([])
        pooled.append([])
        torch.func.functional_call(model, {k: v[i] for k, v in p.items()}, x[i])
    for h in hooks:
        h.remove()
    stack = [torch.stack([c[j] for c in per]) for j in range(len(per[0]))]
    return stack, [torch.stack([c[j] for c in pooled]) for j in range(len(pooled[0]))]


def grouped_decisions(layers, p, x) -> list[torch.Tensor]:
    """The same decisions from the fast path's layers (cohort folded into the channels)."""
    n, h, out = x.shape[0], x, []
    for layer in layers:
        h, kept = layer.forward(h, tuple(p[k] for k in layer.names), n)
        if isinstance(layer, Relu | MaxPool2d):
            d = h > 0 if isinstance(layer, Relu) else kept[1]
            if d.dim() == 4:  # [B, n·C, H, W] → [n, B, C, H, W]
                d = d.reshape(d.shape[0], n, -1, *d.shape[2:]).transpose(0, 1)
            out.append(d)
    return out


def rounds_gap(model, n: int, rounds: int, dtype: torch.dtype) -> dict[str, float]:
    """FedAvg for ``rounds`` rounds (all ``n`` clients, equal weights, ``w ← w + mean Δ``)
    through each engine from the same start on the same batches (round ``r`` draws the
    throughput benchmark's round-``r`` batches): the largest ``|w_path − w_sequential|``."""
    algorithm = FedAvg(FedAvgConfig(), model, sgd(LR), STEPS)
    ctx = {"client_id": torch.arange(n), "round": torch.zeros(n, dtype=torch.long)}
    final = {}
    for name, make in ENGINES.items():
        engine = make()
        w = {k: v.detach().to(dtype) for k, v in model.named_parameters()}
        for r in range(rounds):
            xs, ys = _batches(n, 0, r, "cnn")
            args = (algorithm.init_population(w), {}, (xs.to(dtype), ys), ctx)
            delta = engine.map(algorithm.client_update, args, IN_DIMS)[0]["delta"]
            w = {k: w[k] + delta[k].mean(0) for k in w}
        final[name] = w
    seq = final["sequential"]
    return {
        e: max(float((final[e][k] - seq[k]).abs().max()) for k in seq) for e in ("fast", "vmap")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--rounds", type=int, default=0, help="also compare final models after this many rounds"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = args.clients
    model = build_workload_model("cnn", 0)
    xs, ys = _batches(n, 0, 0, "cnn", args.steps)
    algorithm = FedAvg(FedAvgConfig(), model, sgd(LR), 1)
    layers = fast_client_update(algorithm.client_update, IN_DIMS).layers
    kinds = [
        "relu" if isinstance(x, Relu) else "pool" for x in layers if isinstance(x, Relu | MaxPool2d)
    ]
    names = [f"{k}{kinds[: i + 1].count(k)}" for i, k in enumerate(kinds)]  # relu1, pool1, …
    print(f"data: {_data('cnn')[2]}; {n} clients; threads 1")
    for dtype in (torch.float32, torch.float64):
        w = {k: v.detach().to(dtype) for k, v in model.named_parameters()}
        x = xs.to(dtype)
        previous = {k: v.expand(n, *v.shape) for k, v in w.items()}
        for s in range(1, args.steps + 1):
            theta = {e: solve(model, w, x, ys, s, make()) for e, make in ENGINES.items()}
            seq = theta["sequential"]
            gaps = {}
            for e in ("fast", "vmap"):
                d = torch.stack([(theta[e][k] - seq[k]).abs().flatten(1).amax(1) for k in w])
                gaps[e] = d.amax(0)  # per client
            with torch.no_grad():
                a, _ = per_client_decisions(model, previous, x[s - 1])
                b = grouped_decisions(layers, previous, x[s - 1])
            flips = [int((da != db).sum()) for da, db in zip(a, b, strict=True)]
            who = sorted(
                {
                    int(i)
                    for da, db in zip(a, b, strict=True)
                    for i in (da != db).flatten(1).any(1).nonzero().flatten()
                }
            )
            jumped = [int(i) for i in (gaps["fast"] > 1e-6).nonzero().flatten()]
            print(
                f"{str(dtype)[6:]} step {s}: max|θ_fast−θ_seq| {float(gaps['fast'].max()):.1e}, "
                f"max|θ_vmap−θ_seq| {float(gaps['vmap'].max()):.1e}; flips in step {s}'s "
                f"forward at θ_seq: {dict(zip(names, flips, strict=True))} "
                f"(clients {who}); clients with |θ_fast−θ_seq| > 1e-6: {jumped}"
            )
            for j, (da, db) in enumerate(zip(a[1::2], b[1::2], strict=True)):
                flipped = (da != db).flatten(3)
                if not flipped.any():
                    continue
                with torch.no_grad():  # the pool's input recomputed in float64
                    p64 = {k: v.double() for k, v in previous.items()}
                    _, pooled64 = per_client_decisions(model, p64, x[s - 1].double())
                h = pooled64[j].flatten(3)
                va, vb = h.gather(3, da.flatten(3))[flipped], h.gather(3, db.flatten(3))[flipped]
                print(
                    f"    {names[2 * j + 1]} flipped windows, float64 values at the per-client "
                    f"argmax {va.tolist()} and the grouped one {vb.tolist()}"
                )
            previous = seq
    for dtype in (torch.float32, torch.float64):
        if args.rounds:
            gap = rounds_gap(model, n, args.rounds, dtype)
            print(
                f"{str(dtype)[6:]} after {args.rounds} rounds: max|w_fast−w_seq| "
                f"{gap['fast']:.1e}, max|w_vmap−w_seq| {gap['vmap']:.1e}"
            )


if __name__ == "__main__":
    main()
