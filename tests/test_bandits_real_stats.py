"""The statistics of the real-model bandit fine-tuning (`benchmarks/bandits.py --model real`, stage
`bandit`) against hand computations: coverage counts only the arms an agent named, differences pair by
held-out instance whatever the order, the pilot's pass rule, the declared second learning rate, and the
verdicts (nothing is supported where nothing was learned)."""

from __future__ import annotations

import math

import pytest

from cory.envs.records import EpisodeRecord


@pytest.fixture(scope="module")
def bandits(load_script):
    return load_script("benchmarks/bandits.py")


def record(named: list[int | None], executed: list[int]) -> EpisodeRecord:
    r = EpisodeRecord(env_id="cory/Bandit-v0", labels=["a", "b", "c", "d", "e"], instance_seed=7)
    for a, x in zip(named, executed):
        r.add_step(a, x, a is not None, 0.5, 0.5 if a is not None else -4.5, 0.1, 0)
    return r


def test_named_coverage_leaves_out_the_random_arms_of_invalid_answers(bandits):
    # Named arms 0 and 2 (twice); the two invalid answers executed arms 3 and 4 at random.
    r = record([0, None, 2, None, 2], [0, 3, 2, 4, 2])
    assert bandits.named_share(r) == pytest.approx(2 / 5)
    row = bandits.real_bandit_row([r])
    assert row["coverage"] == pytest.approx(4 / 5)  # executed coverage counts the fallbacks
    assert row["own_coverage"] == pytest.approx(2 / 5)
    assert row["per_episode"] == [{"instance": 7, "shaped_return": pytest.approx(0.5 * 3 - 4.5 * 2),
                                "regret": pytest.approx(0.5), "named_coverage": pytest.approx(0.4),
                                "valid_rate": pytest.approx(0.6)}]


def test_stored_probe_cells_give_named_coverage_only_where_it_is_known(bandits):
    stored = {"own_coverage": 0.3, "own_coverage_ci": 0.1, "coverage": 0.9, "coverage_ci": 0.2, "valid_rate": 0.6}
    all_valid = {"coverage": 0.1, "coverage_ci": 0.0, "valid_rate": 1.0}  # every executed arm was named
    fallbacks = {"coverage": 0.9, "coverage_ci": 0.13, "valid_rate": 0.655}
    assert bandits.named_coverage(stored) == (0.3, 0.1)
    assert bandits.named_coverage(all_valid) == (0.1, 0.0)
    assert bandits.named_coverage(fallbacks) is None


def test_differences_pair_by_instance_not_by_order(bandits):
    before = [{"instance": 1, "x": 1.0}, {"instance": 2, "x": 5.0}, {"instance": 3, "x": 0.0}]
    after = [{"instance": 3, "x": 3.0}, {"instance": 1, "x": 2.0}, {"instance": 2, "x": 7.0}]
    assert bandits.differences(before, after, "x") == [3.0, 1.0, 2.0]


def test_the_pilot_test_uses_the_standard_error_of_the_paired_differences(bandits):
    before = [{"instance": i, "x": 0.0} for i in range(3)]
    after = [{"instance": i, "x": v} for i, v in enumerate([1.0, 2.0, 3.0])]
    t = bandits.paired(before, after, "x")
    # mean 2, sd 1, SE 1 / sqrt(3) = 0.577: 2 > 2 SE = 1.15 passes; t_{0.975, 2} = 4.30.
    assert t["mean"] == pytest.approx(2.0)
    assert t["se"] == pytest.approx(1 / math.sqrt(3))
    assert t["half"] == pytest.approx(4.30 / math.sqrt(3))
    assert t["mean"] > bandits.PILOT_PASS_SE * t["se"]


def test_the_second_learning_rate_follows_the_first_runs_drift(bandits):
    moved = {"lr": 1e-3, "training": {"train_kl": [0.0, 1.0, 5.0]}}
    still = {"lr": 1e-3, "training": {"train_kl": [0.0, 0.1, 0.3]}}
    assert bandits.pilot_next_lr(moved) == pytest.approx(3e-4)
    assert bandits.pilot_next_lr(still) == pytest.approx(3e-3)


def rows(values: dict[str, list[float]]) -> dict:
    n = len(next(iter(values.values())))
    return {"per_episode": [{"instance": i, **{k: v[i] for k, v in values.items()}} for i in range(n)]}


def test_verdicts_credit_nothing_to_fine_tuning_where_nothing_was_learned(bandits):
    n = 32
    flat = {"shaped_return": [0.0] * n, "regret": [1.0] * n, "named_coverage": [0.2] * n, "valid_rate": [0.5] * n}
    # After: the reward rose on every instance, regret fell on every instance, the rest unchanged.
    moved = {**flat, "shaped_return": [2.0 + 0.1 * (i % 3) for i in range(n)], "regret": [0.5 + 0.01 * (i % 5) for i in range(n)]}
    before = {"greedy": rows(flat), "t1": rows(flat)}
    after = {"greedy": rows(moved), "t1": rows(moved)}
    learned = bandits.judge(before, after, learned=True)
    assert learned["reward"]["verdict"] == "supported"
    assert learned["regret_greedy"]["verdict"] == "supported"  # lower regret is the claim's direction
    assert learned["named_greedy"]["verdict"] == "inconclusive"  # no change at all
    assert learned["regret_greedy"]["p_holm"] >= learned["regret_greedy"]["p"]
    not_learned = bandits.judge(before, after, learned=False)
    assert {c["verdict"] for c in not_learned.values()} == {"inconclusive"}
    # A significant move against a claim stays "contradicted" whether or not anything was learned.
    worse = {"greedy": rows({**flat, "regret": [2.0 + 0.01 * (i % 5) for i in range(n)]}), "t1": rows(flat)}
    assert bandits.judge(before, worse, learned=False)["regret_greedy"]["verdict"] == "contradicted"
