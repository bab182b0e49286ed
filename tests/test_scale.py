"""`fedkin bench scale` machinery on small populations: the counter-based synthetic population,
the disk store's footprint (grows with clients trained, not with population) and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedkin.bench.scale import (
    TEST_SIZE,
    TRAIN_MAX,
    TRAIN_MIN,
    default_algorithm,
    measure,
    scale_dataset,
)


def test_population_is_counter_based_and_small_per_client():
    big = scale_dataset(2000, seed=3)
    small = scale_dataset(500, seed=3)
    # client i's data depends only on (seed, i), not on the population size
    assert torch.equal(big.train_index[:500], small.train_index)
    assert torch.equal(big.test_index[:500], small.test_index)
    assert not torch.equal(scale_dataset(500, seed=4).train_index, small.train_index)
    assert big.train_sizes.min() == TRAIN_MIN and big.train_sizes.max() == TRAIN_MAX
    assert (big.test_sizes == TEST_SIZE).all()
    assert big.train_index.shape == (2000, TRAIN_MAX) and len(big.x) == 1797
    # every used slot is a valid digits row, padding is -1 exactly beyond each client's size
    valid = big.train_index >= 0
    assert valid.sum(1).equal(big.train_sizes)
    assert big.train_index[valid].max() < 1797 and big.test_index.min() >= 0
    # label skew: at most two classes per client, and every class occurs
    counts = big.label_counts("all")
    assert (counts > 0).sum(1).max() <= 2
    assert (counts.sum(0) > 0).all()


def test_disk_store_grows_with_clients_trained_not_with_population():
    small = measure(2000, 40, 1, seed=0)
    large = measure(20000, 40, 1, seed=0)
    longer = measure(20000, 40, 3, seed=0)
    assert small["algorithm"] == default_algorithm()
    for r in (small, large, longer):
        trained = r["clients_trained"]
        assert 40 <= trained <= 40 * (r["rounds_timed"] + 1)
        # at least the rows' bytes, at most every touched page of every state tensor
        assert r["store_allocated_bytes"] >= trained * 0.9 * r["state_bytes_per_client"]
        assert r["store_allocated_bytes"] <= trained * (r["state_bytes_per_client"] + 5 * 8192)
        assert r["store_apparent_bytes"] >= r["dense_store_bytes"]  # the sparse file's extent
        assert r["s_per_round"] > 0 and r["engine_s"] > 0 and math.isfinite(r["store_s"])
    # 10x the population, same clients trained: about the same bytes on disk
    assert large["store_allocated_bytes"] < 2 * small["store_allocated_bytes"]
    assert large["dense_store_bytes"] == 10 * small["dense_store_bytes"]
    # more rounds train more clients and take more disk
    assert longer["clients_trained"] > large["clients_trained"]
    assert longer["store_allocated_bytes"] > large["store_allocated_bytes"]


def test_cli_prints_json_with_the_reproducing_command(cli, capsys):
    args = ["--populations", "2000", "--clients-per-round", "20", "--rounds", "1"]
    assert cli(["bench", "scale", *args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["command"] == "fedkin bench scale " + " ".join(args)
    (row,) = out["results"]
    assert row["population"] == 2000 and row["clients_per_round"] == 20
    assert row["peak_rss_mb"] > 0 and row["store_allocated_bytes"] > 0


@pytest.mark.parametrize(
    "args",
    [
        ["--populations", "ten"],
        ["--populations", "100", "--clients-per-round", "1000"],
        ["--rounds", "0"],
        ["--algorithm", "nope"],
    ],
)
def test_cli_rejects_bad_options_with_exit_2(cli, capsys, args):
    assert cli(["bench", "scale", *args]) == 2
    assert capsys.readouterr().err.startswith("fedkin: error:")
