"""The paired statistics of the real-model experiments, against hand computations: the two-level
bootstrap's distribution on cases small enough to enumerate, Holm's adjustment, and the verdicts."""

import numpy as np
import pytest

from cory.metrics.stats import (CONTRADICTED, INCONCLUSIVE, SUPPORTED, Paired, directional_verdict, holm,
                                noninferiority_verdict, paired_bootstrap)


def test_one_seed_two_prompts_bootstraps_the_enumerated_distribution():
    # Resampling {-1, 3} twice: means -1, 1, 1, 3 with probability 1/4 each, so P*(mean <= 0) = 1/4,
    # P*(mean >= 0) = 3/4, p = 2 * 1/4 = 0.5; the 95% percentile interval is [-1, 3].
    est = paired_bootstrap([[-1.0, 3.0]], n_boot=40_000)
    assert est.mean == 1.0 and (est.seeds, est.prompts) == (1, 2)
    assert est.p == pytest.approx(0.5, abs=0.02)
    assert (est.low, est.high) == (-1.0, 3.0)


def test_seeds_are_resampled_as_clusters():
    # Two seeds whose prompts agree within the seed: the bootstrap mean is the mean of the drawn
    # seeds' values, so it takes 0 (both seed 0), 1 (one each, probability 1/2) or 2: P*(<= 0) = 1/4.
    est = paired_bootstrap([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]], n_boot=40_000)
    assert est.mean == 1.0
    assert est.p == pytest.approx(0.5, abs=0.02)
    assert (est.low, est.high) == (0.0, 2.0)


def test_a_clear_difference_has_a_small_p_and_an_interval_that_excludes_zero():
    rng = np.random.default_rng(3)
    est = paired_bootstrap(1.0 + 0.1 * rng.standard_normal((3, 64)))
    assert est.low > 0.9 and est.high < 1.1 and est.p < 1e-3


def test_bad_differences_are_refused():
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 2.0])
    with pytest.raises(ValueError):
        paired_bootstrap([[1.0, float("nan")]])


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01 = 0.03, 2 * 0.03 = 0.06, max(0.06, 1 * 0.04) = 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def est(mean, low, high):
    return Paired(mean, low, high, 0.0, 0.95, 3, 64)


def test_verdicts():
    assert directional_verdict(est(-0.5, -0.8, -0.2), -1, 0.01) == SUPPORTED
    assert directional_verdict(est(0.5, 0.2, 0.8), -1, 0.01) == CONTRADICTED
    assert directional_verdict(est(-0.5, -0.8, -0.2), -1, 0.2) == INCONCLUSIVE
    assert noninferiority_verdict(est(-0.02, -0.08, 0.04), 0.1) == SUPPORTED
    assert noninferiority_verdict(est(-0.3, -0.4, -0.2), 0.1) == CONTRADICTED
    assert noninferiority_verdict(est(-0.1, -0.2, 0.0), 0.1) == INCONCLUSIVE
    with pytest.raises(ValueError):
        noninferiority_verdict(est(0, 0, 0), 0.0)
