"""The experiment loop: non-finite updates, non-finite models, resume determinism, evaluation."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from conftest import drop_timings, tiny, tiny_config
from fedkin.core.channel import finite_rows
from fedkin.core.errors import NonFiniteModelError
from fedkin.core.evaluate import evaluate_global, evaluate_personal, summarize
from fedkin.engine import SequentialEngine, VectorizedEngine
from fedkin.experiment import CHECKPOINT, Experiment
from fedkin.runs import new_run
from fedkin.tracking import JsonlTracker, read_records

# ----- non-finite client updates are rejected -----------------------------------------------------


def test_finite_rows_is_exact_elementwise_check():
    """The sum-first fast path agrees with an elementwise isfinite on every kind of row,
    including finite rows whose sum overflows to inf and NaN/±Inf entries that could cancel."""
    big = torch.finfo(torch.float32).max
    rows = torch.randn(8, 5)
    rows[1, 3] = float("nan")
    rows[2, 0] = float("inf")
    rows[3, 4] = -float("inf")
    rows[4, :2] = torch.tensor([float("inf"), -float("inf")])  # sum is NaN, not cancelled
    rows[5] = big  # finite entries, sum overflows: must stay accepted
    rows[6, :2] = torch.tensor([big, -big])  # finite, sum 0
    tree = {"w": rows.reshape(8, 5, 1), "b": torch.zeros(8, 2)}
    tree["b"][7, 1] = float("nan")
    expected = torch.isfinite(rows).all(1) & torch.isfinite(tree["b"]).all(1)
    assert finite_rows(tree, 8).tolist() == expected.tolist()
    assert expected.tolist() == [True, False, False, False, False, True, True, False]


def _poison_train_data(exp: Experiment, clients: list[int]) -> None:
    """Make every train sample of ``clients`` infinite, so their local training yields NaN."""
    ds = exp.dataset
    ds.x = ds.x.clone()  # never write into a tensor another experiment might share
    for c in clients:
        ds.x[ds.train_index[c, : int(ds.train_sizes[c])]] = float("inf")


def _exclude(exp: Experiment, clients: list[int]) -> None:
    """Make the channel's server half give zero weight to ``clients`` (the clean reference)."""
    bad = torch.tensor(clients)
    server_half = exp.channel.server_half

    def exclude(messages, weights, *rest):
        cohort = exp.sample_cohort(exp.round)  # exp.round: rounds completed = this round's index
        return server_half(messages, weights * ~torch.isin(cohort, bad), *rest)

    exp.channel.server_half = exclude


@pytest.mark.parametrize(
    "algo", [["algorithm.name=fedavg"], ["algorithm.name=fedprox", "algorithm.mu=0.1"]]
)
def test_nonfinite_updates_rejected_and_population_is_clean_aggregate(algo):
    rounds = 3
    poisoned_exp = Experiment(tiny_config(*algo))
    cohort0 = poisoned_exp.sample_cohort(0).tolist()
    poisoned = cohort0[:2]
    _poison_train_data(poisoned_exp, poisoned)

    reference = Experiment(tiny_config(*algo))
    _exclude(reference, poisoned)

    for r in range(rounds):
        cohort = poisoned_exp.sample_cohort(r).tolist()
        expected = len(set(cohort) & set(poisoned))
        record = poisoned_exp.run_round()
        ref_record = reference.run_round()
        assert record["rejected_updates"] == expected
        assert record["accepted_updates"] == len(cohort) - expected
        assert ref_record["rejected_updates"] == 0
        assert math.isfinite(record["train_loss"])
        for t in poisoned_exp.population["global"].values():
            assert torch.isfinite(t).all()
        assert_close(poisoned_exp.population, reference.population)
    assert poisoned_exp.sample_cohort(0).tolist() == cohort0
    # the clean clients did move the model
    init = Experiment(tiny_config(*algo)).population["global"]["net.0.weight"]
    assert (poisoned_exp.population["global"]["net.0.weight"] - init).abs().max() > 1e-4
    rec = poisoned_exp.evaluate()
    assert all(math.isfinite(v) for k, v in rec.items() if k.endswith(("_mean", "_weighted")))


def test_rejected_clients_keep_their_state():
    """Local: a client whose update is non-finite keeps its previous (here: initial) state."""
    exp = Experiment(tiny_config("algorithm.name=local"))
    cohort = exp.sample_cohort(0).tolist()
    bad = cohort[0]
    _poison_train_data(exp, [bad])
    before = exp.store.gather(torch.tensor(cohort))
    record = exp.run_round()
    assert record["rejected_updates"] == 1
    after = exp.store.gather(torch.tensor(cohort))
    w_before, w_after = before["params"]["net.0.weight"], after["params"]["net.0.weight"]
    assert torch.equal(w_after[0], w_before[0])
    assert torch.isfinite(after["params"]["net.0.weight"]).all()
    for j in range(1, len(cohort)):
        assert (w_after[j] - w_before[j]).abs().max() > 1e-5


def test_all_updates_rejected_leaves_population_unchanged():
    exp = Experiment(tiny_config())
    _poison_train_data(exp, exp.sample_cohort(0).tolist())
    w0 = {k: v.clone() for k, v in exp.population["global"].items()}
    record = exp.run_round()
    assert record["rejected_updates"] == record["clients"] == 5
    assert record["accepted_updates"] == 0
    assert math.isnan(record["train_loss"])
    assert_close(exp.population["global"], w0, rtol=0, atol=0)


# ----- a non-finite population model stops the run ---------------------------------------------


def _break_population_at(exp: Experiment, call: int) -> None:
    """Make the population update of round ``call`` (1-based) return an infinite model."""
    original = exp.algorithm.population_update
    calls = {"n": 0}

    def update(population, aggregate, server):
        calls["n"] += 1
        new = original(population, aggregate, server)
        if calls["n"] == call:
            glob = dict(new["global"])
            key = next(iter(glob))
            glob[key] = glob[key] * float("inf")
            new = {**new, "global": glob}
        return new

    exp.algorithm.population_update = update


def test_nonfinite_model_raises_and_checkpoint_keeps_last_good_round(tmp_path):
    run_dir = tmp_path / "run"
    exp = new_run(tiny_config("rounds=5", "eval.every=1", "checkpoint.every=1"), run_dir)
    _break_population_at(exp, 3)
    with pytest.raises(NonFiniteModelError) as info:
        exp.run(run_dir, [JsonlTracker(run_dir)])
    msg = str(info.value)
    assert "round 3" in msg and "checkpoint is round 2" in msg
    assert "lr" in msg  # says what to change
    state = torch.load(run_dir / CHECKPOINT, weights_only=False)
    assert state["round"] == 2
    for t in state["population"]["global"].values():
        assert torch.isfinite(t).all()
    assert max(r["round"] for r in read_records(run_dir)) == 2


# ----- resume reproduces an uninterrupted run ----------------------------------------------------


class InterruptAt:
    """Tracker that raises KeyboardInterrupt when it sees the record (round, kind)."""

    def __init__(self, round_: int, kind: str) -> None:
        self.round, self.kind = round_, kind

    def start(self, info) -> None: ...

    def record(self, record) -> None:
        if record["round"] == self.round and record["kind"] == self.kind:
            raise KeyboardInterrupt

    def finish(self, summary) -> None: ...


RESUME_CASES = {
    # server momentum: the server optimizer state must survive the checkpoint
    "fedavg-server-momentum": [
        "algorithm.name=fedavg",
        "server.optimizer.name=sgd",
        "server.optimizer.momentum=0.5",
    ],
    # client momentum: optimizer state lives in the client store
    "local-client-momentum": [
        "algorithm.name=local",
        "client.optimizer.name=sgd",
        "client.optimizer.momentum=0.9",
    ],
    # robust, compressed, attacked: the aggregator's centre, the error-feedback residuals
    # (a client-state store of the channel) and the byte totals must survive the checkpoint
    "channel-robust-compressed": [
        "algorithm.name=fedavg",
        "channel.aggregator.name=centered_clipping",
        "channel.aggregator.tau=0.5",
        "channel.compress.name=top_k",
        "channel.compress.density=0.1",
        "attack.name=alie",
        "attack.fraction=0.2",
    ],
    # MoNNA with the clients' momentum and top-k error feedback: momenta and residuals share
    # the channel's client-state store, which must survive the checkpoint
    "channel-monna-momentum": [
        "algorithm.name=fedavg",
        "channel.aggregator.name=monna",
        "channel.aggregator.f=1",
        "channel.momentum.beta=0.8",
        "channel.compress.name=top_k",
        "channel.compress.density=0.1",
        "attack.name=sign_flip",
        "attack.fraction=0.2",
    ],
    # trusted-direction step refreshed every 3 rounds: its basis and refresh round must survive
    # the checkpoint of round 2 (a fresh basis in round 2 would change rounds 3 and 4)
    "channel-trusted-direction": [
        "algorithm.name=fedavg",
        "channel.aggregator.name=mean",
        "channel.aggregator.pre=[{name: trusted_direction, k: 2, updates: 3, refresh: 3}]",
        "attack.name=gaussian",
    ],
}
ROUNDS = 4


def _uninterrupted(cli, out: Path, overrides: list[str]) -> list[dict]:
    assert cli(["run", *overrides, "--out", str(out), "--quiet"]) == 0
    return read_records(out)


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """Uninterrupted runs per case (metrics.jsonl records), built once."""
    cache: dict[str, list[dict]] = {}

    def get(cli, case: str) -> list[dict]:
        if case not in cache:
            out = tmp_path_factory.mktemp("ref") / case
            cache[case] = _uninterrupted(cli, out, _resume_overrides(case))
        return cache[case]

    return get


def _resume_overrides(case: str, *extra: str) -> list[str]:
    return tiny(*RESUME_CASES[case], f"rounds={ROUNDS}", "eval.every=1", *extra)


def _interrupted_then_resumed(cli, run_dir: Path, overrides: list[str], at: tuple[int, str]):
    from fedkin.config import load_config

    exp = new_run(load_config(None, overrides), run_dir)
    with pytest.raises(KeyboardInterrupt):
        exp.run(run_dir, [JsonlTracker(run_dir), InterruptAt(*at)])
    before = read_records(run_dir)
    checkpoint_round = torch.load(run_dir / CHECKPOINT, weights_only=False)["round"]
    assert cli(["run", "--resume", str(run_dir), "--quiet"]) == 0
    return before, checkpoint_round, read_records(run_dir)


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_after_interrupt_matches_uninterrupted(cli, tmp_path, reference_runs, case):
    expected = reference_runs(cli, case)
    assert len(expected) == 2 * ROUNDS  # a train and an eval record per round
    before, ckpt, after = _interrupted_then_resumed(
        cli, tmp_path / "b", _resume_overrides(case, "checkpoint.every=1"), (3, "train")
    )
    assert ckpt == 2
    assert before[-1] == {**before[-1], "round": 3, "kind": "train"}  # written, not checkpointed
    assert drop_timings(after) == drop_timings(expected)
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["rounds"] == ROUNDS


@pytest.mark.parametrize(
    ("case", "extra"),
    [
        ("fedavg-server-momentum", []),
        ("local-client-momentum", []),
        ("local-client-momentum", ["store.backend=disk"]),
        ("channel-robust-compressed", ["store.backend=disk"]),
        ("channel-monna-momentum", ["store.backend=disk"]),
    ],
    ids=["fedavg", "local", "local-disk-store", "channel-disk-store", "momentum-disk-store"],
)
def test_resume_with_sparse_checkpoints_recomputes_truncated_rounds(
    cli, tmp_path, reference_runs, case, extra
):
    """checkpoint.every=2, interrupted in round 4 (after round 3's records were written): the
    checkpoint is round 2, round 3's records are dropped and recomputed identically."""
    expected = reference_runs(cli, case)
    overrides = _resume_overrides(case, "checkpoint.every=2", *extra)
    before, ckpt, after = _interrupted_then_resumed(cli, tmp_path / "b", overrides, (4, "train"))
    assert ckpt == 2
    assert {(r["round"], r["kind"]) for r in before} >= {(3, "train"), (3, "eval")}
    assert drop_timings(after) == drop_timings(expected)


def test_resume_of_a_finished_run_is_a_no_op(cli, tmp_path, capsys):
    out = tmp_path / "done"
    assert cli(["run", *tiny("rounds=2"), "--out", str(out), "--quiet"]) == 0
    records = read_records(out)
    capsys.readouterr()
    assert cli(["run", "--resume", str(out), "--quiet"]) == 0
    assert read_records(out) == records


def test_resume_errors(cli, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["run", "--resume", str(empty), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and err.count("\n") == 1
    assert cli(["run", "--resume", str(empty), "rounds=3"]) == 2
    assert "--resume takes only the run directory" in capsys.readouterr().err


# ----- evaluation -------------------------------------------------------------------------------


def test_summarize_matches_hand_computed_values():
    correct = torch.tensor([1.0, 3.0, 0.0, 4.0])
    count = torch.tensor([2.0, 4.0, 1.0, 5.0])
    loss = torch.tensor([1.0, 2.0, 3.0, 6.0])
    out = summarize("p", correct, loss, count)
    acc = [0.5, 0.75, 0.0, 0.8]
    mean = sum(acc) / 4
    assert out["p_acc_mean"] == pytest.approx(0.5125)
    assert out["p_acc_weighted"] == pytest.approx(8 / 12)
    std = math.sqrt(sum((a - mean) ** 2 for a in acc) / 4)  # population std over clients
    assert out["p_acc_std"] == pytest.approx(std)
    assert out["p_acc_std"] == pytest.approx(0.3169680)
    # 10th percentile, linear interpolation: sorted [0, .5, .75, .8] at position 0.3 -> 0.15
    assert out["p_acc_p10"] == pytest.approx(0.15)
    assert out["p_loss"] == pytest.approx(12 / 12)
    assert set(out) == {"p_acc_mean", "p_acc_weighted", "p_acc_std", "p_acc_p10", "p_loss"}


def test_summarize_single_client():
    out = summarize("g", torch.tensor([3.0]), torch.tensor([1.5]), torch.tensor([4.0]))
    assert out["g_acc_mean"] == out["g_acc_weighted"] == out["g_acc_p10"] == pytest.approx(0.75)
    assert out["g_acc_std"] == 0.0
    assert out["g_loss"] == pytest.approx(1.5 / 4)


def _naive(alg, params_of, ds):
    correct, loss = [], []
    for i in range(ds.num_clients):
        x, y = ds.client_test(i)
        logits = alg.logits(params_of(i), x)
        correct.append(float((logits.argmax(-1) == y).sum()))
        loss.append(float(F.cross_entropy(logits, y, reduction="sum")))
    return torch.tensor(correct, dtype=torch.float64), torch.tensor(loss, dtype=torch.float64)


@pytest.fixture(scope="module")
def trained_local():
    exp = Experiment(tiny_config("algorithm.name=local", "rounds=2"))
    exp.run_round()
    exp.run_round()
    return exp


def test_evaluate_global_equals_per_client_loop(trained_local):
    exp = trained_local
    w = exp.population["global"]
    exp_correct, exp_loss = _naive(exp.algorithm, lambda i: w, exp.dataset)
    assert exp_correct.sum() > 0
    for chunk in (7, 8192):
        correct, loss = evaluate_global(exp.algorithm, w, exp.dataset, chunk=chunk)[:2]
        assert_close(correct, exp_correct, rtol=0, atol=0)
        assert_close(loss, exp_loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("engine", [VectorizedEngine(), SequentialEngine()])
def test_evaluate_personal_equals_per_client_loop(trained_local, engine):
    exp = trained_local
    n = exp.dataset.num_clients
    states = exp.store.gather(torch.arange(n))

    def params_of(i):
        return {k: v[i] for k, v in states["params"].items()}

    exp_correct, exp_loss = _naive(exp.algorithm, params_of, exp.dataset)
    clients = torch.arange(n)
    correct, loss = evaluate_personal(
        exp.algorithm, engine, exp.population, exp.store, exp.dataset, clients, chunk=6
    )[:2]
    assert_close(correct, exp_correct, rtol=0, atol=0)
    assert_close(loss, exp_loss, rtol=1e-4, atol=1e-4)
    # personal models differ: the sampled clients' accuracies are not all the global one's
    g_correct = evaluate_global(exp.algorithm, exp.population["global"], exp.dataset)[0]
    assert not torch.equal(correct, g_correct)


def test_eval_record_matches_naive_summary(trained_local):
    exp = trained_local
    record = exp.evaluate()
    ds = exp.dataset
    states = exp.store.gather(torch.arange(ds.num_clients))
    correct, loss = _naive(
        exp.algorithm, lambda i: {k: v[i] for k, v in states["params"].items()}, ds
    )
    count = ds.test_sizes.to(torch.float64)
    expected = summarize("personal", correct, loss, count)
    for key, value in expected.items():
        assert record[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert "global_acc_mean" not in record  # Local has no population model


def test_validation_metrics_match_naive_summary_on_the_validation_rows():
    """data.validation_fraction: val_* metrics are the test summaries computed on the carved-out
    validation rows (here with Local's personal models, which never saw them)."""
    exp = Experiment(tiny_config("algorithm.name=local", "data.validation_fraction=0.25"))
    exp.run_round()
    record = exp.evaluate()
    ds = exp.dataset
    assert bool((ds.val_sizes > 0).all())
    as_test = replace(ds, test_index=ds.val_index, test_sizes=ds.val_sizes)
    states = exp.store.gather(torch.arange(ds.num_clients))
    correct, loss = _naive(
        exp.algorithm, lambda i: {k: v[i] for k, v in states["params"].items()}, as_test
    )
    expected = summarize("val_personal", correct, loss, ds.val_sizes.to(torch.float64))
    for key, value in expected.items():
        assert record[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert record["val_personal_acc_mean"] != record["personal_acc_mean"]
    assert "val_personal_acc_mean" not in Experiment(tiny_config()).evaluate()


def test_fedavg_eval_record_personal_equals_global():
    exp = Experiment(tiny_config())
    exp.run_round()
    record = exp.evaluate()
    for stat in ("acc_mean", "acc_weighted", "acc_std", "acc_p10", "loss"):
        assert record[f"personal_{stat}"] == record[f"global_{stat}"]
    w = exp.population["global"]
    correct, _ = _naive(exp.algorithm, lambda i: w, exp.dataset)
    assert record["global_acc_weighted"] == pytest.approx(
        float(correct.sum() / exp.dataset.test_sizes.sum())
    )


# ----- one round against a naive torch.optim implementation ---------------------------------------


def _naive_round(exp: Experiment, mu: float, weighting: str) -> dict[str, torch.Tensor]:
    """FedAvg/FedProx round 0 written plainly: per client, copy the model, K torch.optim.SGD
    steps on its batches (plus μ/2‖θ − w‖²), then the weighted average of the local models."""
    cfg, ds = exp.config, exp.dataset
    cohort = exp.sample_cohort(0)
    xs, ys = ds.sample_train_batches(
        cohort, exp.stream.child("batches"), 0, cfg.client.local_steps, cfg.client.batch_size
    )
    w = {k: v.clone() for k, v in exp.population["global"].items()}
    locals_, weights = [], []
    for j, c in enumerate(cohort.tolist()):
        params = {k: v.clone().requires_grad_() for k, v in w.items()}
        opt = torch.optim.SGD(list(params.values()), lr=cfg.client.optimizer.lr)
        for s in range(cfg.client.local_steps):
            opt.zero_grad()
            logits = torch.func.functional_call(exp.model, params, (xs[s, j],))
            loss = F.cross_entropy(logits, ys[s, j])
            loss = loss + 0.5 * mu * sum(((params[k] - w[k]) ** 2).sum() for k in w)
            loss.backward()
            opt.step()
        locals_.append({k: v.detach() for k, v in params.items()})
        weights.append(float(ds.train_sizes[c]) if weighting == "samples" else 1.0)
    total = sum(weights)
    return {k: sum(p * m[k] for p, m in zip(weights, locals_, strict=True)) / total for k in w}


@pytest.mark.parametrize(
    ("algo", "mu", "weighting"),
    [("fedavg", 0.0, "samples"), ("fedavg", 0.0, "uniform"), ("fedprox", 0.5, "samples")],
)
def test_round_matches_naive_implementation(algo, mu, weighting):
    extra = [f"algorithm.mu={mu}"] if algo == "fedprox" else []
    overrides = [
        f"algorithm.name={algo}",
        *extra,
        f"cohort.weighting={weighting}",
        "client.local_steps=3",
        "data.partition.name=dirichlet",  # unequal client sizes, so the weighting matters
        "data.partition.alpha=0.5",
    ]
    exp = Experiment(tiny_config(*overrides))
    sizes = exp.dataset.train_sizes[exp.sample_cohort(0)]
    assert sizes.unique().numel() > 1
    expected = _naive_round(exp, mu, weighting)
    exp.run_round()
    assert_close(exp.population["global"], expected, rtol=1e-4, atol=1e-6)
