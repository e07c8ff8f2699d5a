"""Advantage estimators against hand computations (several turns, early-ending episodes, masks)."""

import torch

from cory.advantages import ESTIMATORS, episode_sums, episode_totals, gae, group_normalized, loo_baseline, mc_baseline, rewards_to_go, whiten


def test_gae_single_turn_by_hand():
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.2, 0.4]])
    m = torch.ones(1, 3)
    g, lam = 0.9, 0.5
    d2 = 1.0 - 0.4
    d1 = 0.0 + g * 0.4 - 0.2
    d0 = 0.0 + g * 0.2 - 0.5
    a2 = d2
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    adv, ret = gae(r, v, m, g, lam)
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2]]))
    assert torch.allclose(ret, adv + v)


def test_gae_lambda_zero_is_td0_and_lambda_one_is_monte_carlo():
    r = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    v = torch.tensor([[0.3, -0.2, 0.7, 9.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    adv0, _ = gae(r, v, m, 1.0, 0.0)
    assert torch.allclose(adv0, torch.tensor([[1 - 0.2 - 0.3, 2 + 0.7 + 0.2, 3 - 0.7, 0.0]]))
    adv1, _ = gae(r, v, m, 1.0, 1.0)
    mc = rewards_to_go(r, m, 1.0)
    assert torch.allclose(adv1, (mc - v) * m)


def test_gae_crosses_turns_and_stops_at_episode_end():
    # Episode 0: turn 0 (2 tokens) then turn 1 (1 token). Episode 1 ends after one turn (padded).
    r = torch.tensor([[0.0, 1.0], [2.0, 0.0], [5.0, 0.0]])
    v = torch.tensor([[0.1, 0.2], [0.3, 0.0], [0.4, 0.0]])
    m = torch.tensor([[1, 1], [1, 0], [1, 0]])
    ep = torch.tensor([0, 0, 1])
    turn = torch.tensor([0, 1, 0])
    adv, _ = gae(r, v, m, 1.0, 1.0, ep, turn)
    # lambda = 1, gamma = 1: A_t = (sum of later rewards in the episode) - V_t
    assert torch.allclose(adv, torch.tensor([[3.0 - 0.1, 3.0 - 0.2], [2.0 - 0.3, 0.0], [5.0 - 0.4, 0.0]]))
    adv0, _ = gae(r, v, m, 1.0, 0.0, ep, turn)
    # TD(0) at the last token of turn 0 bootstraps from V at the first token of turn 1.
    assert torch.allclose(adv0[0, 1], torch.tensor(1.0 + 0.3 - 0.2))
    assert torch.allclose(adv0[1, 0], torch.tensor(2.0 - 0.3))


def test_group_normalized_with_and_without_std():
    s = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0])
    g = torch.tensor([0, 0, 0, 1, 1])
    centred = group_normalized(s, g, scale=False)
    assert torch.allclose(centred, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0]))
    scaled = group_normalized(s, g, scale=True)
    assert torch.allclose(scaled[:3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-5)  # std of 1,2,3 is 1
    assert torch.allclose(scaled[3:], torch.zeros(2))

def test_rewards_to_go_single_turn_with_padding():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    got = rewards_to_go(rewards, mask, gamma=0.5)
    # row 0: 1 + .5*2 + .25*3 = 2.75; 2 + .5*3 = 3.5; 3.   row 1: 4 + .5*5 = 6.5; 5; pad 0
    assert torch.allclose(got, torch.tensor([[2.75, 3.5, 3.0], [6.5, 5.0, 0.0]]))


def test_rewards_to_go_flows_into_previous_turn_of_same_episode():
    # episode 0 has turns 0 and 1; episode 1 has one turn. Rows in any order.
    rewards = torch.tensor([[0.0, 1.0], [2.0, 0.0], [3.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 0]])
    episode = torch.tensor([0, 0, 1])
    turn = torch.tensor([1, 0, 0])
    got = rewards_to_go(rewards, mask, 1.0, episode, turn)
    # turn 1 of ep 0: [1, 1]; turn 0 of ep 0: 2 + 1 = 3; ep 1: 3
    assert torch.allclose(got, torch.tensor([[1.0, 1.0], [3.0, 0.0], [3.0, 0.0]]))


def test_turn_gamma_discounts_once_per_turn_not_per_token():
    # Episode 0: turn 0 has 3 tokens (reward 1 on the last), turn 1 has 2 tokens (reward 4 on the last).
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 4.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    episode, turn = torch.tensor([0, 0]), torch.tensor([0, 1])
    got = rewards_to_go(rewards, mask, 1.0, episode, turn, turn_gamma=0.5)
    # Within a turn no discount; turn 0's tokens see 1 + 0.5 * 4 = 3 whatever their position.
    assert torch.allclose(got, torch.tensor([[3.0, 3.0, 3.0], [4.0, 4.0, 0.0]]))
    # GAE with lambda = 1 and V = 0 gives the same returns; with V, TD(0) at the turn boundary uses
    # 0.5 x the next turn's first value.
    zeros = torch.zeros(2, 3)
    adv, _ = gae(rewards, zeros, mask, 1.0, 1.0, episode, turn, turn_gamma=0.5)
    assert torch.allclose(adv, got)
    v = torch.tensor([[0.0, 0.0, 0.2], [0.6, 0.0, 0.0]])
    adv0, _ = gae(rewards, v, mask, 1.0, 0.0, episode, turn, turn_gamma=0.5)
    assert torch.allclose(adv0[0, 2], torch.tensor(1.0 + 0.5 * 0.6 - 0.2))


def test_mc_baseline_is_mean_per_turn_index():
    ret = torch.tensor([1.0, 3.0, 10.0, 20.0])
    turn = torch.tensor([0, 0, 1, 1])
    assert torch.allclose(mc_baseline(ret, turn), torch.tensor([2.0, 2.0, 15.0, 15.0]))
    assert torch.allclose(mc_baseline(ret), torch.full((4,), 8.5))


def test_loo_baseline_by_hand():
    ret = torch.tensor([1.0, 2.0, 6.0, 5.0, 7.0])
    groups = torch.tensor([0, 0, 0, 1, 2])
    # group 0: (2+6)/2=4, (1+6)/2=3.5, (1+2)/2=1.5; singletons get 0
    assert torch.allclose(loo_baseline(ret, groups), torch.tensor([4.0, 3.5, 1.5, 0.0, 0.0]))


def test_whiten_ignores_masked_entries():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    w = whiten(x, mask)
    vals = w[mask.bool()]
    assert abs(vals.mean().item()) < 1e-6 and abs(vals.std().item() - 1) < 1e-4
    assert (w[~mask.bool()] == 0).all()


def test_loo_baseline_in_multi_turn_runs_uses_the_other_episodes_at_the_same_turn():
    # One prompt, two episodes of two turns each: rows (episode, turn) = (0,0), (0,1), (1,0), (1,1).
    returns = torch.tensor([3.0, 1.0, 5.0, 2.0])
    group = torch.tensor([0, 0, 0, 0])
    turn = torch.tensor([0, 1, 0, 1])
    assert torch.allclose(loo_baseline(returns, group, turn), torch.tensor([5.0, 2.0, 3.0, 1.0]))


def test_reinforce_loo_estimator_by_hand():
    r = torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.5, 0.0], [4.0, 0.0]])
    m = torch.tensor([[1, 0], [1, 1], [1, 0], [1, 0]])
    ep, turn, group = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1]), torch.zeros(4, dtype=torch.long)
    a, returns = ESTIMATORS["returns"].fn(r, m, None, ep, turn, group, gamma=1.0, turn_gamma=1.0, baseline="loo")
    # returns at first tokens: ep0 turn0 = 1 + 3 = 4, ep0 turn1 = 3, ep1 turn0 = 0.5 + 4 = 4.5, ep1 turn1 = 4
    assert torch.allclose(returns[:, 0], torch.tensor([4.0, 3.0, 4.5, 4.0]))
    assert torch.allclose(a[:, 0], torch.tensor([4.0 - 4.5, 3.0 - 4.0, 4.5 - 4.0, 4.0 - 3.0]))
    assert torch.allclose(a[1, 1], torch.tensor(1.0 - 4.0))


def test_group_estimator_counts_each_episode_once_in_the_group_statistics():
    # Episode 0 has three turns (total 3), episode 1 one turn (total 1): mean 2, centred +1 / -1.
    r = torch.tensor([[1.0], [1.0], [1.0], [1.0]])
    m = torch.ones(4, 1)
    ep, turn, group = torch.tensor([0, 0, 0, 1]), torch.tensor([0, 1, 2, 0]), torch.zeros(4, dtype=torch.long)
    a, _ = ESTIMATORS["group"].fn(r, m, None, ep, turn, group, scale_rewards=False)
    assert torch.allclose(a[:, 0], torch.tensor([1.0, 1.0, 1.0, -1.0]))


def test_per_episode_sums_by_hand():
    # Episode 7 has turns in rows 0 and 2, episode 3 in rows 1 and 3, episode 5 one turn.
    per_row = torch.tensor([1.0, 10.0, 2.0, 20.0, 100.0])
    ids = torch.tensor([7, 3, 7, 3, 5])
    assert episode_totals(per_row, ids).tolist() == [3.0, 30.0, 3.0, 30.0, 100.0]
    assert episode_sums(per_row, ids).tolist() == [3.0, 30.0, 100.0]  # in the order of first rows
