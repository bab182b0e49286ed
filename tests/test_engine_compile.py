"""The compiled engine: cohort buckets (compile once, change nothing), the persistent compile
cache's location, and ``engine.compile=auto``'s cost model."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from conftest import tiny_config
from fedkin.algorithms.fedavg import FedAvg, FedAvgConfig
from fedkin.engine import EngineConfig, VectorizedEngine
from fedkin.engine.buckets import bucket_size, pad_args, unpad
from fedkin.engine.compile_cache import ENV, default_cache_dir, use_persistent_cache
from fedkin.engine.plan import EnginePlan, compile_pays, compile_seconds, largest_cohort
from fedkin.models import MlpConfig, build_model
from fedkin.optim import sgd


def _fedavg(steps: int = 2) -> tuple[FedAvg, dict]:
    model = build_model(MlpConfig(hidden=[8]), (12,), None, 3, seed=0)
    algorithm = FedAvg(FedAvgConfig(), model, sgd(0.1), steps)
    return algorithm, algorithm.init_population(algorithm.initial_params())


def _cohort(n: int, steps: int = 2, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(steps, n, 4, 12, generator=g)
    ys = torch.randint(0, 3, (steps, n, 4), generator=g)
    return (xs, ys), {"client_id": torch.arange(n), "round": torch.zeros(n, dtype=torch.long)}


def _train(engine, algorithm, population, n: int, seed: int = 0):
    batches, ctx = _cohort(n, seed=seed)
    return engine.map(algorithm.client_update, (population, {}, batches, ctx), (None, None, 1, 0))


# ----- buckets ------------------------------------------------------------------------------------


def test_bucket_sizes_halve_from_the_planned_largest_cohort():
    assert [bucket_size(n, 100) for n in (100, 51, 50, 26, 25, 13, 12, 7, 1)] == [
        100, 100, 50, 50, 25, 13, 13, 7, 1
    ]  # fmt: skip
    assert [bucket_size(n, 100) for n in (101, 200, 201)] == [200, 200, 400]
    assert [bucket_size(n) for n in (1, 2, 3, 5, 100)] == [1, 2, 4, 8, 128]  # powers of two
    assert [bucket_size(n, 13, halve=False) for n in (1, 6, 13, 14)] == [13, 13, 13, 26]
    for largest in (1, 7, 100, 1000):
        for n in range(1, 2 * largest + 2):
            b = bucket_size(n, largest)
            assert b >= n and (b < 2 * n or b == 1)  # never more than doubles the work
    with pytest.raises(ValueError, match="at least one client"):
        bucket_size(0)


def test_padding_repeats_the_first_client_along_each_client_dim():
    x, shared, y = torch.arange(6.0).reshape(3, 2), torch.ones(2), torch.arange(6).reshape(2, 3)
    px, pshared, py = pad_args((x, shared, {"y": y}), (0, None, 1), 2)
    assert pshared is shared
    assert torch.equal(px, torch.cat([x, x[:1], x[:1]]))
    assert torch.equal(py["y"], torch.cat([y, y[:, :1], y[:, :1]], 1))
    assert torch.equal(unpad({"a": (px,)}, 3)["a"][0], x)


def test_padded_cohorts_give_bit_identical_results():
    """Padding a cohort with copies of its first client changes nothing in the real clients'
    results, bit for bit (eager vmap; the compiled engine is checked in the slow test)."""
    algorithm, population = _fedavg()
    for n, fast in itertools.product((1, 3, 5), (True, False)):  # hand-batched and vmap paths
        batches, ctx = _cohort(n)
        args, in_dims = (population, {}, batches, ctx), (None, None, 1, 0)
        engine = VectorizedEngine(fast_path=fast)
        plain = engine.map(algorithm.client_update, args, in_dims)
        padded = unpad(engine.map(algorithm.client_update, pad_args(args, in_dims, 4), in_dims), n)
        torch.testing.assert_close(padded, plain, rtol=0, atol=0)


# ----- compile once -------------------------------------------------------------------------------


def test_varying_cohorts_compile_once_per_bucket():
    """Poisson-like cohort sizes (all within the planned largest cohort's bucket) compile the
    training function once; without buckets each size would be a new graph."""
    torch._dynamo.reset()
    algorithm, population = _fedavg()
    counter = CompileCounter()
    engine = VectorizedEngine(compile=True, plan=EnginePlan(10, 9), compiler=counter)
    eager = VectorizedEngine()  # the counter runs the compiled graph (the fast path) eagerly
    for r, n in enumerate((7, 6, 9, 6, 8)):
        out = _train(engine, algorithm, population, n, seed=r)
        ref = _train(eager, algorithm, population, n, seed=r)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)  # the counter runs the graph eagerly
        assert out[0]["delta"]["net.0.weight"].shape[0] == n
    assert counter.frame_count == 1
    _train(engine, algorithm, population, 3, seed=9)  # below half the largest: a second bucket
    assert counter.frame_count == 2


def test_without_a_plan_the_first_cohort_sets_the_largest_bucket():
    torch._dynamo.reset()
    algorithm, population = _fedavg()
    counter = CompileCounter()
    engine = VectorizedEngine(compile=True, compiler=counter)
    for n in (6, 4, 5, 6):
        _train(engine, algorithm, population, n)
    assert engine.largest == 6 and counter.frame_count == 1


def test_a_poisson_run_compiles_the_training_function_once():
    torch._dynamo.reset()
    config = tiny_config("cohort.sampling=poisson", "rounds=6", "engine.compile=true")
    from fedkin.experiment import Experiment

    exp = Experiment(config)
    exp.engine.compiler = counter = CompileCounter()
    sizes = []
    for _ in range(config.rounds):
        sizes.append(exp.run_round()["clients"])
    assert len(set(sizes)) > 1, sizes  # the cohort size did vary
    assert counter.frame_count == 1
    assert exp.engine.largest == largest_cohort(5, 20, poisson=True) == 13


@pytest.mark.slow
def test_inductor_compiled_padded_results_match_eager():
    """The real compiler on padded cohorts agrees with eager vmap (fused kernels may
    reassociate, so to float tolerance) and keeps one compiled graph for three sizes."""
    torch._dynamo.reset()
    algorithm, population = _fedavg()
    engine = VectorizedEngine(compile=True, plan=EnginePlan(10, 8))
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    for n in (8, 5, 7):
        torch.testing.assert_close(
            _train(engine, algorithm, population, n),
            _train(VectorizedEngine(), algorithm, population, n),
        )
    assert counters["stats"]["unique_graphs"] - before == 1


# ----- persistent cache ---------------------------------------------------------------------------


def test_compile_cache_goes_to_the_user_cache_dir_unless_set(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "fedkin" / "torch-compile"
    assert use_persistent_cache() == tmp_path / "fedkin" / "torch-compile"
    monkeypatch.setenv(ENV, str(tmp_path / "mine"))
    assert use_persistent_cache() == tmp_path / "mine"


# ----- compile=auto -------------------------------------------------------------------------------


def test_largest_cohort_plans_four_standard_deviations_for_poisson():
    assert largest_cohort(20, 100, poisson=False) == 20
    assert largest_cohort(100, 10_000, poisson=True) == 140  # 100 + 4·√(100·0.99) = 139.8
    assert largest_cohort(50, 50, poisson=True) == 50  # everyone: no spread
    assert largest_cohort(60, 50, poisson=False) == 50


def test_compile_pays_only_when_the_rest_of_the_run_saves_more_than_the_compile():
    plan = EnginePlan(rounds=60, largest_cohort=20, local_steps=5)
    cost = compile_seconds(5)
    assert not compile_pays(plan, 2, 0.01)  # a default-sized run: 58 × 10 ms saves < a compile
    assert compile_pays(plan, 2, 10 * cost / 58)
    assert not compile_pays(EnginePlan(2, 20, 5), 2, 100.0)  # nothing left to save


def test_auto_decides_after_the_timed_eager_call(monkeypatch):
    import fedkin.engine.engines as engines

    torch._dynamo.reset()
    algorithm, population = _fedavg()
    for pays in (False, True):
        monkeypatch.setattr(engines, "compile_pays", lambda plan, calls, s, pays=pays: pays)
        counter = CompileCounter()
        engine = VectorizedEngine(compile="auto", plan=EnginePlan(100, 4), compiler=counter)
        for _ in range(4):
            _train(engine, algorithm, population, 4)
        assert counter.frame_count == int(pays)  # calls 1-2 eager; then compiled or not
        assert engine._eager_calls[(algorithm.client_update, (None, None, 1, 0))] == 2


def test_auto_without_a_plan_stays_eager():
    algorithm, population = _fedavg()
    engine = VectorizedEngine(compile="auto")
    for _ in range(3):
        _train(engine, algorithm, population, 2)
    assert engine._compiled == {}


def test_engine_compile_config_values():
    assert EngineConfig(compile="auto").build(EnginePlan(5, 3)).plan == EnginePlan(5, 3)
    EngineConfig(name="sequential", compile="auto").build()  # nothing to compile: eager
    with pytest.raises(ValueError, match="compile"):
        EngineConfig(compile="sometimes")


def test_auto_falls_back_to_eager_when_compiling_fails():
    def failing_compiler(gm, example_inputs):
        raise RuntimeError("no compiler here")

    torch._dynamo.reset()
    algorithm, population = _fedavg()
    engine = VectorizedEngine(compile="auto", plan=EnginePlan(100, 4), compiler=failing_compiler)
    key = (algorithm.client_update, (None, None, 1, 0))
    engine._auto[key] = True  # the cost model said compile
    with pytest.warns(RuntimeWarning, match="compile=auto: compiling .* failed"):
        out = _train(engine, algorithm, population, 4)
    torch.testing.assert_close(out, _train(VectorizedEngine(), algorithm, population, 4))
    assert engine._auto[key] is False and engine._compiled == {}
    with pytest.raises(Exception, match="no compiler here"):  # compile=true does not hide it
        _train(VectorizedEngine(compile=True, compiler=failing_compiler), algorithm, population, 4)


def test_compiled_fast_path_hands_uncovered_inputs_to_vmap():
    """A shared non-empty client state is outside the hand-batched solve: the compiled engine
    then compiles vmap instead, with the same numbers."""
    torch._dynamo.reset()
    algorithm, population = _fedavg()
    batches, ctx = _cohort(4)
    args = (population, {"s": torch.ones(())}, batches, ctx)
    engine = VectorizedEngine(compile=True, compiler=CompileCounter())
    out = engine.map(algorithm.client_update, args, (None, None, 1, 0))
    ref = VectorizedEngine(fast_path=False).map(algorithm.client_update, args, (None, None, 1, 0))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_auto_goes_back_to_eager_when_the_compiled_call_is_slower(monkeypatch):
    import time

    import fedkin.engine.engines as engines

    def slow_compiler(gm, example_inputs):
        def run(*args):
            time.sleep(0.5)  # far slower than the tiny model's eager call
            return gm(*args)

        return run

    torch._dynamo.reset()
    monkeypatch.setattr(engines, "compile_pays", lambda plan, calls, s: True)
    algorithm, population = _fedavg()
    engine = VectorizedEngine(compile="auto", plan=EnginePlan(100, 4), compiler=slow_compiler)
    key = (algorithm.client_update, (None, None, 1, 0))
    for _ in range(3):  # eager, eager (timed: compile), compiled (compiles)
        _train(engine, algorithm, population, 4)
    assert engine._auto[key] and key in engine._compiled
    _train(engine, algorithm, population, 4)  # the timed compiled call: slower than eager
    assert not engine._auto[key] and key not in engine._compiled
    _train(engine, algorithm, population, 4)
    assert key not in engine._compiled  # eager from now on
