"""Advantage estimators: pure functions over per-token rewards, masks and the episode structure.

A rollout is a flat batch of turns. Row i holds one turn: its response tokens (right-padded, `mask`
is 1 on real tokens), the episode it belongs to (`episode_ids[i]`), its place in that episode
(`turn_index[i]`) and the prompt group it answers (`group_ids[i]`). Returns flow backwards through a
turn's tokens and then into the previous turn of the same episode, so a single-turn task is simply an
episode of one turn.

Every function creates its tensors on its inputs' device and never reads values back to the host, so
the same code runs on CPU, CUDA and the `meta` device. Rows are related through [B, B] "same key"
matrices (same group, same episode, next turn) instead of Python loops over ids.

The estimators an algorithm can name are registered in `ESTIMATORS` (`@register_estimator`); each
takes the shaped per-token rewards (task score, KL penalty, EOS/overlong penalties, normalisation,
all applied once upstream) and returns (advantages [B, L], returns [B, L] or None).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch


def _same(*keys: torch.Tensor) -> torch.Tensor:
    """[B, B] bool: rows i and j agree on every key ([B] each)."""
    out = keys[0][:, None] == keys[0][None, :]
    for k in keys[1:]:
        out = out & (k[:, None] == k[None, :])
    return out


def _next_turn(episode_ids: torch.Tensor, turn_index: torch.Tensor) -> torch.Tensor:
    """[B, B] bool: row j is the next turn (same episode, turn index + 1) of row i."""
    return (episode_ids[:, None] == episode_ids[None, :]) & (turn_index[None, :] == turn_index[:, None] + 1)


def _chain(first: torch.Tensor, link: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
    """[B] x solving x_i = first_i + link_i * x_next(i) along each episode's chain of turns.

    nxt: [B, B] next-turn matrix. The system (I - diag(link) nxt) x = first is triangular in turn
    order, so one dense solve gives every turn's value without a loop over turns.
    """
    m = link[:, None] * nxt.to(first.dtype)
    eye = torch.eye(first.shape[0], dtype=first.dtype, device=first.device)
    return torch.linalg.solve(eye - m, first[:, None])[:, 0]


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
    zeros = rewards.new_zeros(rewards.shape[0])
    within = _discounted_cumsum(rewards, mask, gamma, zeros)
    if episode_ids is None or turn_index is None:
        return within
    n = mask.sum(-1).to(rewards.dtype)
    live = n > 0
    nxt = _next_turn(episode_ids, turn_index)
    # G_first(k) = W_first(k) + gamma^n_k * turn_gamma * G_first(k + 1); an empty turn breaks the chain.
    link = torch.where(live, turn_gamma * torch.pow(torch.full_like(n, gamma), n), torch.zeros_like(n))
    first = _chain(within[:, 0], link, nxt)
    boot = turn_gamma * (nxt.to(rewards.dtype) @ first)
    return _discounted_cumsum(rewards, mask, gamma, boot)


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
    values = values.to(rewards.dtype)
    zeros = rewards.new_zeros(rewards.shape[0])
    within = _gae_turn(rewards, values, mask, gamma, lam, zeros, zeros)
    if episode_ids is None or turn_index is None:
        return within, (within + values) * mask
    n = mask.sum(-1).to(rewards.dtype)
    live = n > 0
    nxt = _next_turn(episode_ids, turn_index).to(rewards.dtype)
    # The bootstrap c = gamma * turn_gamma * (V_next + lam * A_next) reaches the first token with
    # weight (gamma lam)^(n - 1): A_first = W_first + (gamma lam)^(n-1) gamma turn_gamma (V_next + lam A_next).
    reach = torch.pow(torch.full_like(n, gamma * lam), (n - 1).clamp_min(0)) * gamma * turn_gamma
    reach = torch.where(live, reach, torch.zeros_like(reach))
    v_next = nxt @ values[:, 0]
    first = _chain(within[:, 0] + reach * v_next, reach * lam, nxt)
    a_next = nxt @ first
    adv = _gae_turn(rewards, values, mask, gamma, lam, turn_gamma * v_next, turn_gamma * a_next)
    return adv, (adv + values) * mask


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_floating_point() else x.float()


def group_normalized(scores: torch.Tensor, group_ids: torch.Tensor, scale: bool = True, eps: float = 1e-6,
                     members: torch.Tensor | None = None) -> torch.Tensor:
    """[B] GRPO advantages: each score minus its group's mean, divided by the group's std if `scale`.

    The std is the unbiased sample std of the group (0 for a group of one, which gets advantage 0).
    members: [B] bool, the rows whose scores make up the group statistics (default: all; for
    multi-turn data one row per episode, so that long episodes do not weigh more).
    """
    x = _float(scores)
    same = _same(group_ids)
    if members is not None:
        same = same & members[None, :]
    same = same.to(x.dtype)
    count = same.sum(-1)
    mean = (same @ x) / count
    centred = x - mean
    if not scale:
        return centred
    var = (same * (x[None, :] - mean[:, None]) ** 2).sum(-1) / (count - 1).clamp_min(1.0)
    return torch.where(count > 1, centred / (var.sqrt() + eps), torch.zeros_like(centred))


def mc_baseline(turn_returns: torch.Tensor, turn_index: torch.Tensor | None = None) -> torch.Tensor:
    """[B] Monte-Carlo baseline: the mean return over the batch of all turns at the same turn index.

    turn_returns: [B] return at each turn's first token. For single-turn data this is the batch mean.
    """
    if turn_index is None:
        return turn_returns.mean().expand_as(turn_returns).clone()
    same = _same(turn_index).to(turn_returns.dtype)
    return (same @ turn_returns) / same.sum(-1)


def loo_baseline(returns: torch.Tensor, group_ids: torch.Tensor | None = None, turn_index: torch.Tensor | None = None) -> torch.Tensor:
    """[B] leave-one-out baseline: the mean return of the *other* members of each row's group.

    With no groups the whole batch is one group. With `turn_index` the group of a turn is the other
    episodes of the same prompt at the same turn index (never the other turns of its own episode).
    A group of one gets baseline 0.
    """
    if group_ids is None:
        group_ids = torch.zeros_like(returns, dtype=torch.long)
    same = _same(group_ids, turn_index) if turn_index is not None else _same(group_ids)
    same = same.to(returns.dtype)
    n = same.sum(-1)
    others = (same @ returns - returns) / (n - 1).clamp_min(1.0)
    return torch.where(n > 1, others, torch.zeros_like(others))


def episode_totals(per_row: torch.Tensor, episode_ids: torch.Tensor) -> torch.Tensor:
    """[B] the sum of a per-row quantity [B] over all rows (turns) of each row's episode.

    The one per-episode sum of cory: estimators, the loss mask, training metrics and evaluation
    all use it (directly, or per episode through `episode_sums`)."""
    return _same(episode_ids).to(per_row.dtype) @ per_row


def episode_sums(per_row: torch.Tensor, episode_ids: torch.Tensor) -> torch.Tensor:
    """[episodes] the sum of a per-row quantity [B] over each episode's rows, one value per episode
    (in the order of the episodes' first rows). Not for the meta device (the shape depends on the ids)."""
    same = _same(episode_ids)
    first = ~torch.tril(same, diagonal=-1).any(-1)
    return episode_totals(per_row, episode_ids)[first]


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalise masked entries of x to zero mean and unit variance."""
    m = mask.to(x.dtype)
    n = m.sum().clamp_min(1.0)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / (n - 1).clamp_min(1.0)
    return (x - mean) * torch.rsqrt(var + eps) * m


# -- the registry ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimator:
    fn: Callable
    keys: tuple[str, ...]
    """The `algo.*` keys the estimator reads (its keyword-only parameters, plus group_size for the
    grouped ones); others refuse to be set for algorithms that use it."""
    grouped: bool
    """Needs several samples per prompt (algo.group_size)."""


ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str, grouped: bool = False, also_reads: tuple[str, ...] = ()):
    """grouped: needs algo.group_size samples per prompt; also_reads: keys read outside the
    function (a baseline that samples groups)."""

    def deco(fn):
        settings = tuple(p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY)
        ESTIMATORS[name] = Estimator(fn, settings + (("group_size",) if grouped else ()) + also_reads, grouped)
        return fn

    return deco


# Every estimator: (rewards [B, L], mask [B, L], values [B, L] | None, episode_ids [B], turn_index [B],
# group_ids [B], *, its settings) -> (advantages [B, L], returns [B, L] | None).


@register_estimator("returns", also_reads=("group_size",))
def reinforce_advantages(rewards, mask, values, episode_ids, turn_index, group_ids, *, gamma, turn_gamma, baseline):
    """A_t = G_t - b: rewards-to-go minus no baseline, the batch mean return of turns at the same
    turn index, or the leave-one-out mean of the other samples of the same prompt at that turn
    (baseline=loo samples algo.group_size answers per prompt)."""
    returns = rewards_to_go(rewards, mask, gamma, episode_ids, turn_index, turn_gamma)
    first = returns[:, 0]
    if baseline == "none":
        b = torch.zeros_like(first)
    elif baseline == "mean":
        b = mc_baseline(first, turn_index)
    else:
        b = loo_baseline(first, group_ids, turn_index)
    return (returns - b[:, None]) * mask, returns


@register_estimator("gae")
def gae_advantages(rewards, mask, values, episode_ids, turn_index, group_ids, *, gamma, turn_gamma, lam, whiten_advantages):
    """GAE(gamma, lam) against the value head's predictions; whitened over the rollout if asked."""
    adv, returns = gae(rewards, values, mask, gamma, lam, episode_ids, turn_index, turn_gamma)
    return (whiten(adv, mask) if whiten_advantages else adv), returns


@register_estimator("group", grouped=True)
def group_advantages(rewards, mask, values, episode_ids, turn_index, group_ids, *, scale_rewards):
    """GRPO: R = the episode's total shaped reward; A = (R - group mean) / group std (std optional).
    Every token of every turn of an episode gets the episode's A."""
    returns = episode_totals((rewards * mask).sum(-1), episode_ids)
    adv = group_normalized(returns, group_ids, scale=scale_rewards, members=turn_index == 0)
    return adv[:, None] * mask, None


@register_estimator("loo", grouped=True)
def loo_advantages(rewards, mask, values, episode_ids, turn_index, group_ids):
    """RLOO: R = the episode's total shaped reward; A = R - mean of the other samples of the prompt."""
    returns = episode_totals((rewards * mask).sum(-1), episode_ids)
    # The other episodes of the prompt: their first turns stand for them.
    same = (_same(group_ids) & (turn_index == 0)[None, :]).to(returns.dtype)
    n = same.sum(-1)
    baseline = torch.where(n > 1, (same @ returns - returns) / (n - 1).clamp_min(1.0), torch.zeros_like(returns))
    adv = returns - baseline
    return adv[:, None] * mask, None
