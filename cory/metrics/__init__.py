"""Diagnostics for decision-making agents: regret and coverage curves with 95% intervals, game
outcome rates, the frequency-bias and knowing-doing probes, and PNG plots."""

from cory.envs.bandit import most_frequent_actions
from cory.metrics.curves import (
    bandit_summary,
    coverage,
    coverage_curves,
    cumulative_regret,
    mean_ci,
    pad_stack,
    regret_curves,
    regret_from_means,
    t_interval,
)
from cory.metrics.games import outcome_rates
from cory.metrics.plots import plot_coverage, plot_curves, plot_regret
from cory.metrics.probes import (
    FrequencyBiasResult,
    KnowingDoing,
    action_distribution,
    classify_frequency_bias,
    classify_knowing_doing,
    entropy,
    frequency_bias_by_repeats,
    frequency_bias_history,
    frequency_bias_rates,
    greedy_actions,
    knowing_doing_prompt,
    knowing_doing_rates,
    parse_ucb_values,
    run_frequency_bias_probe,
    run_knowing_doing_probe,
    true_ucb_values,
)

__all__ = [
    "FrequencyBiasResult", "KnowingDoing", "action_distribution", "bandit_summary", "classify_frequency_bias",
    "classify_knowing_doing", "coverage", "coverage_curves", "cumulative_regret", "entropy",
    "frequency_bias_by_repeats", "frequency_bias_history", "frequency_bias_rates", "greedy_actions", "knowing_doing_prompt",
    "knowing_doing_rates", "mean_ci", "t_interval", "most_frequent_actions", "outcome_rates", "pad_stack", "parse_ucb_values",
    "plot_coverage", "plot_curves", "plot_regret", "regret_curves", "regret_from_means",
    "run_frequency_bias_probe", "run_knowing_doing_probe", "true_ucb_values",
]
