"""Diagnostics against hand computations: regret, coverage, intervals, probes, game rates, plots."""

import math

import numpy as np
import pytest

from cory.envs.bandit import arm_labels
from cory.envs.records import EpisodeRecord
from cory.metrics import (
    action_distribution,
    bandit_summary,
    classify_frequency_bias,
    classify_knowing_doing,
    coverage,
    coverage_curves,
    cumulative_regret,
    entropy,
    frequency_bias_history,
    frequency_bias_rates,
    knowing_doing_prompt,
    knowing_doing_rates,
    mean_ci,
    outcome_rates,
    parse_ucb_values,
    plot_coverage,
    plot_regret,
    regret_curves,
    regret_from_means,
    run_frequency_bias_probe,
    true_ucb_values,
)
from cory.metrics.probes import KnowingDoing

LABELS = ["blue", "green", "red", "yellow"]


def record(executed, regrets, outcome=None):
    n = len(executed)
    return EpisodeRecord(
        env_id="test", labels=list(LABELS), actions=list(executed), executed=list(executed), valid=[True] * n,
        env_rewards=[0.0] * n, rewards=[0.0] * n, regrets=list(regrets), best_actions=[0] * n, outcome=outcome,
    )


# ---- regret and coverage ------------------------------------------------------------------------


def test_regret_and_coverage_by_hand():
    means = [0.9, 0.5, 0.2, 0.1]
    actions = [1, 1, 0, 3, 0, 2]
    per_step = regret_from_means(actions, means)
    assert per_step.tolist() == pytest.approx([0.4, 0.4, 0.0, 0.8, 0.0, 0.7])
    assert cumulative_regret(per_step).tolist() == pytest.approx([0.4, 0.8, 0.8, 1.6, 1.6, 2.3])
    assert coverage(actions, 4).tolist() == [0.25, 0.25, 0.5, 0.75, 0.75, 1.0]


def test_curves_from_records_pad_short_episodes_with_nan():
    recs = [record([1, 0, 0], [0.4, 0.0, 0.0]), record([2, 2], [0.7, 0.7])]
    r = regret_curves(recs)
    assert r[0].tolist() == pytest.approx([0.4, 0.4, 0.4]) and r[1, :2].tolist() == pytest.approx([0.7, 1.4])
    assert math.isnan(r[1, 2])
    c = coverage_curves(recs)
    assert c[0].tolist() == [0.25, 0.5, 0.5] and c[1, :2].tolist() == [0.25, 0.25]


def test_mean_ci_is_1_96_standard_errors():
    values = np.array([[1.0, 2.0], [3.0, 2.0], [5.0, np.nan]])
    mean, half = mean_ci(values)
    assert mean.tolist() == pytest.approx([3.0, 2.0])
    # column 0: sample std 2, n 3 -> 1.96 * 2 / sqrt(3); column 1: std 0
    assert half.tolist() == pytest.approx([1.96 * 2 / math.sqrt(3), 0.0])


def test_bandit_summary():
    recs = [record([0, 1], [0.0, 0.5]), record([2, 2], [0.7, 0.7])]
    s = bandit_summary(recs)
    assert s["regret"] == pytest.approx((0.5 + 1.4) / 2) and s["coverage"] == pytest.approx((0.5 + 0.25) / 2)
    assert s["valid_rate"] == 1.0 and s["episodes"] == 2


def test_outcome_rates():
    recs = [record([0], [0], outcome=o) for o in (1.0, 1.0, 0.0, -1.0)]
    assert outcome_rates(recs) == {"win": 0.5, "draw": 0.25, "loss": 0.25, "return": 0.25, "episodes": 4}
    with pytest.raises(ValueError, match="not finished"):
        outcome_rates([record([0], [0], outcome=None)])


# ---- frequency bias -----------------------------------------------------------------------------


def test_frequency_bias_history_repeats_the_last_random_action():
    rng = np.random.default_rng(0)
    h = frequency_bias_history([0.1, 0.5, 0.9, 0.3], 0.1, rng, n_random=4, n_repeats=7)
    assert len(h) == 11 and all(a == h[3][0] for a, _ in h[3:])
    for _ in range(20):
        h = frequency_bias_history([0.1, 0.5, 0.9, 0.3], 1.0, rng)
        assert 2 <= len(h) <= 110


def test_classify_frequency_bias_by_hand():
    # blue pulled 3 times (mean 0.1), red once (mean 0.9), green once (0.5)
    history = [(2, 0.9), (1, 0.5), (0, 0.1), (0, 0.1), (0, 0.1)]
    assert classify_frequency_bias(0, history, 4) == "frequent"
    assert classify_frequency_bias(2, history, 4) == "greedy"
    assert classify_frequency_bias(1, history, 4) == "other"
    assert classify_frequency_bias(3, history, 4) == "other"  # never tried
    # the repeated action is also the best: it counts as frequent
    assert classify_frequency_bias(0, [(1, 0.2), (0, 0.8), (0, 0.8)], 4) == "frequent"
    assert frequency_bias_rates(["frequent", "frequent", "greedy", "other"]) == {"F_f": 0.5, "F_g": 0.25, "F_o": 0.25}


def test_action_distribution_and_entropy():
    p = action_distribution([math.log(0.5), math.log(0.25), math.log(0.25)])
    assert p.tolist() == pytest.approx([0.5, 0.25, 0.25])
    assert entropy(p) == pytest.approx(1.5 * math.log(2))
    assert entropy(action_distribution([0.0, -np.inf])) == 0.0
    with pytest.raises(ValueError):
        action_distribution([0.0, float("nan")])


def test_frequency_bias_probe_with_scripted_scorers():
    labels = arm_labels(5, "button")
    prompts = []

    def most_frequent_scorer(prompt, actions):
        # prefers the action written most often in the history lines
        prompts.append(prompt)
        return [float(prompt.count(f"Action={a.split('=')[1]} ")) for a in actions]

    rng = np.random.default_rng(0)
    results = run_frequency_bias_probe(most_frequent_scorer, 20, rng, n_arms=5)
    assert frequency_bias_rates([r.label for r in results])["F_f"] == 1.0
    assert all(0 <= r.n_repeats <= 100 for r in results) and all(len(r.probs) == 5 for r in results)
    assert "Output ONLY your final answer" in prompts[0] and labels[0] in prompts[0]

    uniform = run_frequency_bias_probe(lambda p, a: [0.0] * len(a), 3, rng, n_arms=5)
    assert all(r.entropy == pytest.approx(math.log(5)) for r in uniform)
    with pytest.raises(ValueError, match="4 scores for 5"):
        run_frequency_bias_probe(lambda p, a: [0.0] * 4, 1, rng, n_arms=5)


# ---- knowing-doing ------------------------------------------------------------------------------


def test_parse_ucb_values():
    text = (
        "First try <ucb_values>blue: 9</ucb_values> no wait.\n"
        "<ucb_values>\nblue: 1.25, GREEN=0.5\nred: inf; yellow : -2e-1\npurple: 3</ucb_values> ACTION=red"
    )
    assert parse_ucb_values(text, LABELS) == {0: 1.25, 1: 0.5, 2: math.inf, 3: -0.2}
    assert parse_ucb_values("no block here", LABELS) is None
    assert parse_ucb_values("<ucb_values>unclosed blue: 1", LABELS) is None
    assert parse_ucb_values("<UCB_VALUES>0: ∞, 1: .5</UCB_VALUES>", ["0", "1"]) == {0: math.inf, 1: 0.5}


def test_true_ucb_values_by_hand():
    history = [(0, 1.0), (0, 0.0), (1, 0.8)]  # t = 3
    ucb = true_ucb_values(history, 3, alpha=0.5)
    assert ucb[0] == pytest.approx(0.5 + 0.5 * math.sqrt(math.log(3) / 2))
    assert ucb[1] == pytest.approx(0.8 + 0.5 * math.sqrt(math.log(3) / 1))
    assert ucb[2] == math.inf


def test_classify_knowing_doing_by_hand():
    # blue: mean 0.9 over 4 pulls (greedy); green: mean 0.7 over 1 pull (highest UCB); red: 0.1 x1
    history = [(0, 0.9)] * 4 + [(1, 0.7), (2, 0.1)]
    ucb = true_ucb_values(history, 3)
    assert int(np.argmax(ucb)) == 1
    right = {0: 1.1, 1: 1.37, 2: 0.77}
    assert classify_knowing_doing(right, 1, history, 3) == KnowingDoing(True, "optimal")
    assert classify_knowing_doing(right, 0, history, 3) == KnowingDoing(True, "greedy")
    assert classify_knowing_doing(right, 2, history, 3) == KnowingDoing(True, "other")
    assert classify_knowing_doing(right, None, history, 3) == KnowingDoing(True, "invalid")
    assert classify_knowing_doing({0: 2.0, 1: 1.0}, 1, history, 3) == KnowingDoing(False, "optimal")
    assert classify_knowing_doing({0: 2.0, 1: 2.0}, 0, history, 3).knowing is False  # a tie names no arm
    assert classify_knowing_doing(None, 0, history, 3) == KnowingDoing(False, "greedy")
    rates = knowing_doing_rates(
        [KnowingDoing(True, "greedy"), KnowingDoing(True, "optimal"), KnowingDoing(False, "other"), KnowingDoing(True, "greedy")]
    )
    assert rates["knowing"] == 0.75
    assert rates["greedy_given_knowing"] == pytest.approx(2 / 3) and rates["optimal_given_knowing"] == pytest.approx(1 / 3)
    assert rates["other"] == 0.25


def test_knowing_doing_prompt_asks_for_the_block():
    text = knowing_doing_prompt(LABELS, "button", 50, [(0, 0.5)], alpha=0.5)
    assert "<ucb_values>" in text and "blue: chosen 1 time, mean reward 0.50" in text
    assert text.rstrip().endswith("then give your answer ACTION=X.")


# ---- plots --------------------------------------------------------------------------------------


def test_regret_and_coverage_plots_write_png(tmp_path):
    recs = {"a": [record([0, 1, 2], [0.1, 0.2, 0.0])] * 3, "b": [record([1, 1, 1], [0.3, 0.3, 0.3])] * 2}
    for fn, name in ((plot_regret, "regret.png"), (plot_coverage, "coverage.png")):
        path = fn(recs, tmp_path / name)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_t_interval_by_hand():
    from cory.metrics import t_interval

    mean, half = t_interval([1.0, 2.0, 6.0])  # sd = sqrt(7), t(2 df) = 4.30
    assert mean == 3.0 and abs(half - 4.30 * 7 ** 0.5 / 3 ** 0.5) < 1e-9
    assert t_interval([5.0])[0] == 5.0 and t_interval([5.0])[1] != t_interval([5.0])[1]  # NaN for one run


def test_t_interval_at_975_by_hand():
    from cory.metrics import t_interval

    values = [1.0, 2.0, 6.0, 3.0, 3.0]  # mean 3, sd = sqrt(14 / 4), t(4 df, two-sided 97.5%) = 3.495
    mean, half = t_interval(values, level=0.975)
    assert mean == 3.0 and abs(half - 3.495 * (14 / 4) ** 0.5 / 5 ** 0.5) < 1e-9
    assert half > t_interval(values)[1]
    with pytest.raises(ValueError, match="levels"):
        t_interval(values, level=0.9)


@pytest.mark.parametrize("level", [0.95, 0.975])
def test_t_quantiles_hold_their_level_of_the_t_density(level):
    """Each quantile q for n values (n - 1 degrees of freedom), from the table (n <= 10) or the
    expansion beyond it, holds `level` of the Student-t density between -q and q (trapezoid
    integration of the density, written from its formula)."""
    from cory.metrics.curves import T_TABLES, t_quantile

    for n in [*T_TABLES[level], 11, 12, 15, 20, 31, 60]:
        q, v = t_quantile(level, n), n - 1
        x = np.linspace(0.0, q, 400_001)
        log_c = math.lgamma((v + 1) / 2) - math.lgamma(v / 2) - 0.5 * math.log(v * math.pi)
        density = np.exp(log_c - (v + 1) / 2 * np.log1p(x * x / v))
        mass = 2 * float(np.sum((density[1:] + density[:-1]) / 2 * np.diff(x)))
        assert abs(mass - level) < 6e-4, (n, q, mass)  # the 95% table has two decimals
    assert t_quantile(level, 11) > t_quantile(level, 1000) > t_quantile(level, 10**6) - 1e-9
