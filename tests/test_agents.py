"""Classical agents: bandit regret orders, tic-tac-toe reference rates, minimax never loses, LinUCB."""

import functools

import numpy as np
import pytest

from cory.agents import (
    BetaThompsonAgent,
    EpsilonGreedyAgent,
    GaussianThompsonAgent,
    LinUCBAgent,
    MinimaxAgent,
    RandomAgent,
    UCB1Agent,
    make_agent,
    run_agent,
)
from cory.envs import BanditEnv
from cory.envs.tictactoe import EMPTY_BOARD, best_moves, move_values
from cory.metrics import outcome_rates

N_ENVS, SEED = 64, 0


@functools.cache
def regrets(sigma: float) -> tuple[dict[str, float], list]:
    """Mean cumulative regret after 50 steps per agent on 64 ten-arm Gaussian bandits (seed 0), and
    random's records. Every agent faces the same 64 bandits."""
    factories = {
        "random": RandomAgent,
        "epsilon-greedy": EpsilonGreedyAgent,
        "ucb1": UCB1Agent,
        "thompson": lambda: GaussianThompsonAgent(sigma=sigma),
    }
    means, random_records = {}, None
    for name, factory in factories.items():
        records = run_agent(factory, "cory/Bandit-v0", N_ENVS, SEED, n_arms=10, sigma=sigma, horizon=50)
        assert all(len(r) == 50 and all(r.valid) for r in records)
        means[name] = float(np.mean([r.total_regret for r in records]))
        random_records = random_records or records
    return means, random_records


@pytest.mark.parametrize("sigma", [1.0, 0.1])
def test_random_regret_is_linear_in_the_gaps(sigma):
    # E[regret of uniform play] = T * (mu* - mean(mu)) per bandit; the environments are replayed from
    # their instance seeds to read the means.
    means, records = regrets(sigma)
    expected = []
    for rec in records:
        env = BanditEnv(n_arms=10, sigma=sigma)
        env.reset(seed=0, options={"instance_seed": rec.instance_seed})
        expected.append(50 * (env.means.max() - env.means.mean()))
    assert means["random"] == pytest.approx(np.mean(expected), abs=1.0)  # SE of the mean is ~0.25


@pytest.mark.parametrize("sigma", [1.0, 0.1])
def test_ucb_and_thompson_beat_random(sigma):
    # Measured with seed 0 (64 bandits, 10 arms, T=50): sigma=1: random 18.8, eps-greedy 10.9,
    # UCB1 11.5, Thompson 14.8; sigma=0.1: random 18.8, eps-greedy 5.5, UCB1 8.8, Thompson 4.7.
    # The margins hold for seeds 0-3 (ratios to random: UCB1 <= 0.70, Thompson <= 0.80 at sigma=1).
    means, _ = regrets(sigma)
    limit = {1.0: {"ucb1": 0.8, "thompson": 0.9}, 0.1: {"ucb1": 0.6, "thompson": 0.4}}[sigma]
    for name, ratio in limit.items():
        assert means[name] < ratio * means["random"], (name, means)


def test_epsilon_greedy_beats_random_at_low_noise():
    # Not asserted at sigma=1: over 50 steps epsilon-greedy and UCB1 are about equal there.
    means, _ = regrets(0.1)
    assert means["epsilon-greedy"] < 0.5 * means["random"], means


def test_beta_thompson_beats_random_on_bernoulli():
    kwargs = dict(n_arms=5, distribution="bernoulli", gap=0.5)
    ts = run_agent(BetaThompsonAgent, "cory/Bandit-v0", 32, 1, **kwargs)
    rnd = run_agent(RandomAgent, "cory/Bandit-v0", 32, 1, **kwargs)
    # Random: 50 * 0.5 * 4/5 = 20 expected; Thompson settles on the best arm within ~15 pulls.
    assert np.mean([r.total_regret for r in ts]) < 0.5 * np.mean([r.total_regret for r in rnd])


def test_linucb_beats_random_on_the_contextual_bandit():
    lin = run_agent(LinUCBAgent, "cory/ContextualBandit-v0", 32, 0, n_items=10)
    rnd = run_agent(RandomAgent, "cory/ContextualBandit-v0", 32, 0, n_items=10)
    lin_r, rnd_r = np.mean([r.total_regret for r in lin]), np.mean([r.total_regret for r in rnd])
    # Measured (64 envs): LinUCB 12.3, random 40.0.
    assert lin_r < 0.6 * rnd_r, (lin_r, rnd_r)


def test_run_agent_is_deterministic_and_agent_independent():
    a = run_agent("ucb1", "cory/Bandit-v0", 4, 3, n_arms=5)
    b = run_agent("ucb1", "cory/Bandit-v0", 4, 3, n_arms=5)
    c = run_agent("random", "cory/Bandit-v0", 4, 3, n_arms=5)
    assert [r.to_dict() for r in a] == [r.to_dict() for r in b]
    assert [r.instance_seed for r in a] == [r.instance_seed for r in c]  # same bandits for every agent


def test_make_agent_unknown_name():
    with pytest.raises(ValueError, match="ucb1"):
        make_agent("ucb2")


# ---- tic-tac-toe --------------------------------------------------------------------------------


def test_random_vs_random_matches_known_rates():
    # Known: first player wins 58.5%, second 28.8%, draw 12.7% (both uniformly random).
    records = run_agent(RandomAgent, "cory/TicTacToe-v0", 20_000, 0, opponent="random", agent_first=True)
    rates = outcome_rates(records)
    assert rates["win"] == pytest.approx(0.585, abs=0.02)
    assert rates["loss"] == pytest.approx(0.288, abs=0.02)
    assert rates["draw"] == pytest.approx(0.127, abs=0.02)


def test_perfect_play_from_the_empty_board_is_a_draw():
    assert set(move_values(EMPTY_BOARD, 1).values()) <= {0, -2, -4, -6}  # no opening wins
    assert max(move_values(EMPTY_BOARD, 1).values()) == 0
    # Player 1 to move with two in a row takes the win rather than blocking or dawdling.
    assert best_moves((1, 1, 0, 2, 2, 0, 0, 0, 0), 1) == [2]


@pytest.mark.parametrize("opponent", ["random", "noisy"])
@pytest.mark.parametrize("agent_first", [True, False], ids=["first", "second"])
def test_minimax_never_loses(opponent, agent_first):
    records = run_agent(MinimaxAgent, "cory/TicTacToe-v0", 1000, 0, opponent=opponent, agent_first=agent_first)
    rates = outcome_rates(records)
    assert rates["loss"] == 0.0 and rates["episodes"] == 1000
    assert rates["win"] > 0.3  # it also punishes mistakes
    assert all(all(r.valid) for r in records)


def test_minimax_against_minimax_always_draws():
    records = run_agent(MinimaxAgent, "cory/TicTacToe-v0", 50, 0, opponent="minimax", agent_first=False)
    assert outcome_rates(records)["draw"] == 1.0
