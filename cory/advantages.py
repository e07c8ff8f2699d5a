"""Advantage estimators: pure functions over per-token rewards, masks and the episode structure.

A rollout is a flat batch of turns. Row i holds one turn: its response tokens (right-padded, `mask`
is 1 on real tokens), the episode it belongs to (`episode_ids[i]`) and its place in that episode
(`turn_index[i]`). Returns flow backwards through a turn's tokens and then into the previous turn of
the same episode, so a single-turn task is simply an episode of one turn.
"""

from __future__ import annotations

import torch


def _discounted_cumsum(rewards: torch.Tensor, mask: torch.Tensor, gamma: float, bootstrap: torch.Tensor) -> torch.Tensor:
    """[N, L] sum_{s>=t} gamma^(s-t) r_s over masked tokens, plus gamma^(n_t) * bootstrap.

    Padding positions are skipped (they neither add reward nor discount).
    """
    out = torch.zeros_like(rewards)
    running = bootstrap.to(rewards.dtype)
    for t in range(rewards.shape[1] - 1, -1, -1):
        live = mask[:, t].bool()
        running = torch.where(live, rewards[:, t] + gamma * running, running)
        out[:, t] = torch.where(live, running, torch.zeros_like(running))
    return out


def rewards_to_go(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    episode_ids: torch.Tensor | None = None,
    turn_index: torch.Tensor | None = None,
    turn_gamma: float = 1.0,
) -> torch.Tensor:
    """[B, L] discounted return from each token to the end of its episode.

    rewards, mask: [B, L] per-token rewards and response mask. episode_ids, turn_index: [B]; when
    omitted every row is its own one-turn episode. A turn's return is bootstrapped with
    ``turn_gamma`` times the return at the first token of the next turn of the same episode: gamma
    discounts token by token, turn_gamma once per environment step (an agent's turn is one action).
    """
    if episode_ids is None or turn_index is None:
        return _discounted_cumsum(rewards, mask, gamma, torch.zeros(rewards.shape[0], dtype=rewards.dtype))
    out = torch.zeros_like(rewards)
    start_return: dict[tuple[int, int], float] = {}
    for k in sorted(set(turn_index.tolist()), reverse=True):
        rows = (turn_index == k).nonzero(as_tuple=True)[0]
        boot = torch.tensor(
            [start_return.get((int(episode_ids[i]), k + 1), 0.0) for i in rows.tolist()], dtype=rewards.dtype
        )
        out[rows] = _discounted_cumsum(rewards[rows], mask[rows], gamma, turn_gamma * boot)
        for i in rows.tolist():
            start_return[(int(episode_ids[i]), k)] = float(out[i, 0])
    return out


def _gae_turn(rewards, values, mask, gamma, lam, next_value, next_adv):
    """GAE within one turn per row, bootstrapped by the next turn's first value and advantage."""
    adv = torch.zeros_like(rewards)
    running_adv, running_value = next_adv.to(rewards.dtype), next_value.to(rewards.dtype)
    for t in range(rewards.shape[1] - 1, -1, -1):
        live = mask[:, t].bool()
        delta = rewards[:, t] + gamma * running_value - values[:, t]
        a = delta + gamma * lam * running_adv
        running_adv = torch.where(live, a, running_adv)
        running_value = torch.where(live, values[:, t], running_value)
        adv[:, t] = torch.where(live, a, torch.zeros_like(a))
    return adv


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    episode_ids: torch.Tensor | None = None,
    turn_index: torch.Tensor | None = None,
    turn_gamma: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over tokens and turns. Returns (advantages, returns), [B, L].

    values[b, t] is V of the state before response token t. delta_t = r_t + gamma V_{t+1} - V_t and
    A_t = delta_t + gamma lam A_{t+1}, where the step after a turn's last token is the first token
    of the next turn of the same episode (V = A = 0 after the episode's last turn). lam = 0 gives
    TD(0) advantages; lam = 1 gives Monte-Carlo returns minus V. returns = A + V (the value target).
    At a turn boundary the next turn's V and A are also scaled by ``turn_gamma`` (the discount per
    environment step).
    """
    n = rewards.shape[0]
    if episode_ids is None or turn_index is None:
        zeros = torch.zeros(n, dtype=rewards.dtype)
        adv = _gae_turn(rewards, values, mask, gamma, lam, zeros, zeros)
        return adv, (adv + values) * mask
    adv = torch.zeros_like(rewards)
    start: dict[tuple[int, int], tuple[float, float]] = {}
    for k in sorted(set(turn_index.tolist()), reverse=True):
        rows = (turn_index == k).nonzero(as_tuple=True)[0]
        nxt = [start.get((int(episode_ids[i]), k + 1), (0.0, 0.0)) for i in rows.tolist()]
        next_value = torch.tensor([v for v, _ in nxt], dtype=rewards.dtype)
        next_adv = torch.tensor([a for _, a in nxt], dtype=rewards.dtype)
        adv[rows] = _gae_turn(rewards[rows], values[rows], mask[rows], gamma, lam, turn_gamma * next_value, turn_gamma * next_adv)
        for i in rows.tolist():
            start[(int(episode_ids[i]), k)] = (float(values[i, 0]), float(adv[i, 0]))
    return adv, (adv + values) * mask


def group_normalized(scores: torch.Tensor, group_ids: torch.Tensor, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """[B] GRPO advantages: each score minus its group's mean, divided by the group's std if `scale`.

    The std is the unbiased sample std of the group (0 for a group of one, which gets advantage 0).
    """
    out = torch.zeros_like(scores, dtype=torch.float32)
    for g in group_ids.unique():
        rows = group_ids == g
        x = scores[rows].float()
        centred = x - x.mean()
        if scale and len(x) > 1:
            centred = centred / (x.std() + eps)
        out[rows] = centred
    return out


def mc_baseline(turn_returns: torch.Tensor, turn_index: torch.Tensor | None = None) -> torch.Tensor:
    """[B] Monte-Carlo baseline: the mean return over the batch of all turns at the same turn index.

    turn_returns: [B] return at each turn's first token. For single-turn data this is the batch mean.
    """
    if turn_index is None:
        return turn_returns.mean().expand_as(turn_returns).clone()
    baseline = torch.empty_like(turn_returns)
    for k in turn_index.unique():
        rows = turn_index == k
        baseline[rows] = turn_returns[rows].mean()
    return baseline


def loo_baseline(returns: torch.Tensor, group_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B] leave-one-out baseline: the mean return of the *other* members of each row's group.

    With no groups the whole batch is one group. A group of one gets baseline 0.
    """
    if group_ids is None:
        group_ids = torch.zeros_like(returns, dtype=torch.long)
    baseline = torch.zeros_like(returns)
    for g in group_ids.unique():
        rows = group_ids == g
        n = int(rows.sum())
        if n > 1:
            baseline[rows] = (returns[rows].sum() - returns[rows]) / (n - 1)
    return baseline


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise masked entries of x to unit variance (and zero mean unless shift_mean is False)."""
    m = mask.to(x.dtype)
    n = m.sum().clamp_min(1.0)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / (n - 1).clamp_min(1.0)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m
