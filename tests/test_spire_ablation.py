"""``fedkin bench spire-ablation``: cached pretraining that continues bit-identically, and the
adaptation sweep's rows (covered/unseen-class split, twin init only where a twin exists)."""

from __future__ import annotations

import argparse
import json
import statistics

import pytest
import torch

pytest.importorskip("diffusers")

from fedkin.bench import diffusion, spire_ablation
from fedkin.core.tree import tree_leaves

SMALL = "--clients 10 --channels 8,16 --steps 2 --samples 12 --sample-steps 3 --seed 0"


def tiny_args(tmp_path, rounds: int, *extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    spire_ablation.add_arguments(p)
    args = p.parse_args([*SMALL.split(), "--rounds", str(rounds), "--cache", str(tmp_path), *extra])
    return spire_ablation.normalize(args, ValueError)


def test_cached_pretraining_continues_bit_identically(tmp_path):
    quiet = lambda *a: None  # noqa: E731
    diffusion.pretrained(tiny_args(tmp_path, 1), "spire", quiet)
    resumed = diffusion.pretrained(tiny_args(tmp_path, 2), "spire", quiet)
    assert len(list(tmp_path.glob("diffusion_pretrained_*_r*.pt"))) == 2

    straight = spire_ablation.experiment(tiny_args(tmp_path, 2), "spire")
    diffusion.train(straight, 2, quiet)
    assert resumed["round"] == 2
    pairs = zip(tree_leaves(resumed["population"]), tree_leaves(straight.population), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_few_shot_new_clients_share_the_pretraining_cache(tmp_path):
    """--new-client-images caps only what new clients adapt on, so pretraining is reused."""
    quiet = lambda *a: None  # noqa: E731
    full = diffusion.pretrained(tiny_args(tmp_path, 1), "spire", quiet)
    few = tiny_args(tmp_path, 1, "--new-client-images", "3")
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            *(
                tree_leaves(s["population"])
                for s in (full, diffusion.pretrained(few, "spire", quiet))
            ),
            strict=True,
        )
    )
    assert len(list(tmp_path.glob("diffusion_pretrained_*_r*.pt"))) == 1
    exp = spire_ablation.experiment(few, "spire")
    assert exp.dataset.train_sizes[exp.new_clients].tolist() == [3] * len(exp.new_clients)
    # the KID feature CNN is trained on the full data whatever the cap: one cached network
    diffusion.feature_map(tiny_args(tmp_path, 1))
    diffusion.feature_map(few)
    assert len(list(tmp_path.glob("features-*.pt"))) == 1


def test_table2_seed0_holds_out_a_class_no_training_client_has():
    """Table 2's default split (seed 0) holds out both class-5 clients; seed 1's is covered."""
    from fedkin.config import load_config
    from fedkin.experiment import Experiment

    def split(seed: int) -> Experiment:
        args = diffusion.parse(["--seed", str(seed)])
        return Experiment(load_config(None, diffusion.base_overrides(args)))

    exp = split(0)
    assert [diffusion.client_class(exp, j) for j in exp.new_clients.tolist()] == [5, 0, 5, 3]
    assert diffusion.unseen_class_count(exp) == 2
    assert diffusion.unseen_class_count(split(1)) == 0


@pytest.mark.slow
def test_ablation_rows_split_new_clients_by_class_coverage(cli, tmp_path):
    sweep = "--adapt-steps 0,2 --adapt-lrs 0.1 --inits mean,twin --ft-steps 2 --rounds 1"
    sweep += " --ft-lrs 0.002,0.05"
    args = ["bench", "spire-ablation", *SMALL.split(), *sweep.split()]
    assert cli([*args, "--cache", str(tmp_path / "cache"), "--out", str(tmp_path)]) == 0

    record = json.loads((tmp_path / "spire_ablation_seed0_r1.json").read_text())
    assert record["command"].startswith("fedkin bench spire-ablation --rounds 1 --seed 0")
    rows = record["rows"]
    split = {int(r["metric"][len("class_client") :]): r for r in rows if r["method"] == "split"}
    train_classes = {r["value"] for r in split.values() if r["training"]}
    new = [i for i, r in split.items() if not r["training"]]
    covered = {j for j in new if split[j]["value"] in train_classes}

    def setting(method, **kw):
        return {
            r["metric"]: r["value"]
            for r in rows
            if r["method"] == method and all(r.get(k) == v for k, v in kw.items())
        }

    mean2 = setting("spire", init="mean", steps=2)
    per_client = {int(m[len("kid_client") :]): v for m, v in mean2.items() if "client" in m}
    assert set(per_client) == set(new)
    assert mean2["kid_new_mean"] == pytest.approx(statistics.fmean(per_client.values()))
    twin = setting("spire", init="twin", steps=0)
    assert {int(m[len("kid_client") :]) for m in twin if "client" in m} == covered
    ft = [r for r in rows if r["method"] == "fedavg-ft" and r["metric"] == "kid_new_mean"]
    assert ft[0]["trainable_params"] > 100 * 32
    assert [r["lr"] for r in ft] == [0.002, 0.05]  # fine-tuning at each --ft-lrs value
    assert ft[0]["value"] != ft[1]["value"]  # the lr reaches the fine-tuning
    assert "| spire | mean | 2 | 0.1 |" in (tmp_path / "spire_ablation_seed0_r1.md").read_text()
