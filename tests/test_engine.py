"""Engines: vectorized (whole cohort or chunked) and sequential give the same numbers."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from conftest import tiny_config
from fedkin.engine import EngineConfig, SequentialEngine, VectorizedEngine
from fedkin.experiment import Experiment

# ----- engine.map on a toy function --------------------------------------------------------------


def toy(w, x, pair, y):
    """w: shared [3]; x: per-client [3] (dim 0); pair: ([2, 3] dim 1, {"s": []} dim 0);
    y: per-client [4] (dim 1 of [4, K])."""
    a, extra = pair
    return {
        "dot": (w * x).sum() + extra["s"],
        "vec": a.sum(0) * w + y.mean(),
        "both": ((x + 1).prod(), torch.stack([y.max(), y.min()])),
    }


def toy_args(k: int):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, generator=g)
    x = torch.randn(k, 3, generator=g)
    a = torch.randn(2, k, 3, generator=g)
    s = torch.randn(k, generator=g)
    y = torch.randn(4, k, generator=g)
    return w, x, (a, {"s": s}), y


def toy_expected(args):
    w, x, (a, extra), y = args
    outs = [toy(w, x[i], (a[:, i], {"s": extra["s"][i]}), y[:, i]) for i in range(len(x))]
    return {
        "dot": torch.stack([o["dot"] for o in outs]),
        "vec": torch.stack([o["vec"] for o in outs]),
        "both": (
            torch.stack([o["both"][0] for o in outs]),
            torch.stack([o["both"][1] for o in outs]),
        ),
    }


@pytest.mark.parametrize(
    "engine",
    [VectorizedEngine(), VectorizedEngine(chunk_size=3), VectorizedEngine(5), SequentialEngine()],
    ids=["vectorized", "chunk3", "chunk5", "sequential"],
)
def test_map_mixed_in_dims(engine):
    k = 7
    w, x, (a, extra), y = toy_args(k)

    def fn(w, x, a, s, y):
        return toy(w, x, (a, {"s": s}), y)

    out = engine.map(fn, (w, x, a, extra["s"], y), (None, 0, 1, 0, 1))
    expected = toy_expected((w, x, (a, extra), y))
    assert out["dot"].shape == (k,) and out["vec"].shape == (k, 3)
    assert out["both"][1].shape == (k, 2)
    assert_close(out, expected)


@pytest.mark.parametrize(
    "engine", [VectorizedEngine(), VectorizedEngine(chunk_size=2), SequentialEngine()]
)
def test_map_tree_arguments(engine):
    """Dict and tuple arguments carry the client dim in every leaf; shared trees are broadcast."""
    g = torch.Generator().manual_seed(1)
    shared = {"a": torch.randn(2, generator=g), "nested": {"b": torch.randn(2, generator=g)}}
    per = {"c": torch.randn(5, 2, generator=g), "d": {"e": torch.randn(5, generator=g)}}

    def fn(sh, pc):
        return {"out": sh["a"] * pc["c"] + sh["nested"]["b"] * pc["d"]["e"]}

    out = engine.map(fn, (shared, per), (None, 0))
    expected = shared["a"] * per["c"] + shared["nested"]["b"] * per["d"]["e"][:, None]
    assert_close(out["out"], expected)


def test_map_needs_a_client_dimension():
    with pytest.raises(ValueError, match="client dimension"):
        SequentialEngine().map(lambda a: a, (torch.ones(3),), (None,))


def test_engine_config_builds_engines():
    assert isinstance(EngineConfig().build(), VectorizedEngine)
    built = EngineConfig(name="vectorized", chunk_size=4).build()
    assert isinstance(built, VectorizedEngine) and built.chunk_size == 4
    assert isinstance(EngineConfig(name="sequential").build(), SequentialEngine)


# ----- whole experiments: vectorized vs sequential vs chunked ------------------------------------

ALGOS = {
    "fedavg": ["algorithm.name=fedavg"],
    "fedprox": ["algorithm.name=fedprox", "algorithm.mu=0.5"],
    # client momentum: the optimizer state lives in the client store
    "local": [
        "algorithm.name=local",
        "client.optimizer.name=sgd",
        "client.optimizer.momentum=0.9",
    ],
}
ROUNDS = 3


def _run(algo: str, *engine: str) -> tuple[Experiment, list[dict]]:
    exp = Experiment(tiny_config(*ALGOS[algo], f"rounds={ROUNDS}", *engine))
    records = [exp.run_round() for _ in range(ROUNDS)]
    records.append(exp.evaluate())
    return exp, records


@pytest.fixture(scope="module", params=list(ALGOS))
def runs(request):
    algo = request.param
    return algo, {
        "vectorized": _run(algo, "engine.name=vectorized"),
        "sequential": _run(algo, "engine.name=sequential"),
        "chunked": _run(algo, "engine.name=vectorized", "engine.chunk_size=3"),
    }


def _all_rows(exp: Experiment) -> dict:
    """Every client's stored state, stacked (independent of the store's representation)."""
    return exp.store.gather(torch.arange(exp.dataset.num_clients))


# float32 tolerances: a few rounds of SGD, batched kernels may reassociate sums
TOL = {"rtol": 1e-4, "atol": 1e-5}


@pytest.mark.parametrize("other", ["sequential", "chunked"])
def test_same_population_and_store(runs, other):
    _, by_engine = runs
    ref, ref_records = by_engine["vectorized"]
    exp, records = by_engine[other]
    assert_close(exp.population, ref.population, **TOL)
    assert_close(_all_rows(exp), _all_rows(ref), **TOL)
    assert_close(exp.server.state, ref.server.state, **TOL)
    for a, b in zip(records, ref_records, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], str):
                assert a[key] == b[key]
            elif not key.endswith("_s"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


def test_runs_actually_train(runs):
    """Guard against comparing two no-op runs: the state moved away from initialization."""
    algo, by_engine = runs
    exp, records = by_engine["vectorized"]
    init = Experiment(exp.config)
    if algo == "local":
        moved = _all_rows(exp)["params"]["net.0.weight"] - init.population["global"]["net.0.weight"]
        trained = moved.flatten(1).abs().max(1).values > 1e-4
        # exactly the clients sampled at least once have moved away from the initial model
        sampled = torch.zeros(exp.dataset.num_clients, dtype=torch.bool)
        for r in range(ROUNDS):
            sampled[exp.sample_cohort(r)] = True
        assert torch.equal(trained, sampled)
        assert (moved[~sampled] == 0).all()
        assert _all_rows(exp)["opt"]["0"]["m"]["net.0.weight"].abs().max() > 0
        assert "global_acc_mean" not in records[-1]
    else:
        moved = exp.population["global"]["net.0.weight"] - init.population["global"]["net.0.weight"]
        assert moved.abs().max() > 1e-4
        assert "global_acc_mean" in records[-1]
    assert all(r["rejected_updates"] == 0 for r in records[:-1])


def test_fedprox_with_zero_mu_is_fedavg():
    a, _ = _run("fedavg")
    exp = Experiment(tiny_config("algorithm.name=fedprox", "algorithm.mu=0", f"rounds={ROUNDS}"))
    for _ in range(ROUNDS):
        exp.run_round()
    assert_close(exp.population, a.population, **TOL)


def test_fedprox_mu_pulls_towards_global():
    """Larger μ keeps the local solution closer to w: smaller update norm in round 1."""

    def update_norm(mu: str) -> float:
        exp = Experiment(tiny_config("algorithm.name=fedprox", f"algorithm.mu={mu}"))
        w0 = exp.population["global"]["net.0.weight"].clone()
        exp.run_round()
        return float((exp.population["global"]["net.0.weight"] - w0).norm())

    assert update_norm("5.0") < update_norm("0.0")


# ----- allocator tuning ------------------------------------------------------------------------


def test_retain_freed_memory_takes_effect_on_glibc_and_zero_is_a_no_op():
    import sys

    from fedkin.engine.allocator import retain_freed_memory

    assert retain_freed_memory(0) is False
    assert retain_freed_memory(1024) is sys.platform.startswith("linux")
    with pytest.raises(ValueError, match="retain_freed_mb"):
        EngineConfig(retain_freed_mb=4096)


def test_compile_needs_the_vectorized_engine():
    with pytest.raises(ValueError, match=r"engine\.compile=true needs engine\.name=vectorized"):
        EngineConfig(name="sequential", compile=True)
    assert EngineConfig(compile=True).build().compile


def test_vectorized_engine_ships_to_workers_without_compiled_code():
    """A Ray worker receives the engine pickled: settings travel, compiled functions do not."""
    import pickle

    engine = VectorizedEngine(chunk_size=3, compile=True, retain_freed_mb=16)
    engine._compiled[(toy, (0,))] = lambda *a: a  # unpicklable, as compiled code is
    clone = pickle.loads(pickle.dumps(engine))
    assert clone._compiled == {}
    assert (clone.chunk_size, clone.compile, clone.retain_freed_mb) == (3, True, 16)
