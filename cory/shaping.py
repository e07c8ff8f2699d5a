"""Reward shaping and the loss mask: pure functions from a turn's score to what the update trains on.

Applied once, for every algorithm, before the advantage estimator (`cory.advantages`):

    score'  = score + missing_eos_penalty x [cut at max_new_tokens]            (adjust_scores)
                    + overlong penalty (DAPO)
                    / running std of scores                                   (algo.normalize_rewards)
    r_t     = -beta x KL_t - coef x KL^teacher_t                                 (shaped_rewards)
              (+ task_coef x score' at the turn's last token)
    mask_t  = response mask, less cut responses (overlong filter) and groups    (loss_mask)
              whose episodes all scored the same (dynamic sampling)

Shapes: [B] per row (turn), [B, L] per response token. Every function creates its tensors on its
inputs' device.
"""

from __future__ import annotations

import torch

from cory.advantages import episode_totals, group_normalized


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float) -> torch.Tensor:
    """[B] DAPO's soft overlong penalty: 0 up to max_len - buffer tokens, then falling linearly to
    -penalty at max_len."""
    over = (lengths.to(torch.float32) - (max_len - buffer)).clamp_min(0.0)
    return -penalty * over / buffer


def adjust_scores(scores: torch.Tensor, finished: torch.Tensor, lengths: torch.Tensor, *, missing_eos_penalty: float,
                  overlong_buffer: int, overlong_penalty_at_max: float, max_new_tokens: int) -> torch.Tensor:
    """[B] task scores after the missing-EOS penalty (responses cut at max_new_tokens) and DAPO's
    overlong penalty (0 = off for either). lengths: [B] response tokens."""
    adjusted = scores.float().clone()
    if missing_eos_penalty:
        adjusted = adjusted + missing_eos_penalty * (~finished).float()
    if overlong_buffer:
        adjusted = adjusted + overlong_penalty(lengths, max_new_tokens, overlong_buffer, overlong_penalty_at_max)
    return adjusted


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float,
                   teacher_kl: torch.Tensor | None = None, teacher_coef: float = 0.0, task_coef: float = 1.0) -> torch.Tensor:
    """[B, L] per-token rewards: -beta * KL to the reference at every response token, and with a
    teacher (on-policy distillation) -teacher_coef * its reverse KL `teacher_kl` [B, L]; plus
    task_coef * the turn's score at its last token."""
    rewards = -beta * kl * mask
    if teacher_kl is not None:
        rewards = rewards - teacher_coef * teacher_kl.to(rewards.dtype) * mask
    last = (mask.sum(-1) - 1).clamp_min(0).long()
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += task_coef * scores.to(rewards.dtype)
    return rewards


def loss_mask(response_mask: torch.Tensor, finished: torch.Tensor, scores: torch.Tensor, episode_ids: torch.Tensor,
              turn_index: torch.Tensor, group_ids: torch.Tensor, *, overlong_filter: bool, dynamic_sampling: bool) -> torch.Tensor:
    """[B, L] the tokens that train: the response mask, less responses cut at max_new_tokens
    (overlong_filter) and groups whose episodes' total scores are all equal (dynamic_sampling: their
    group-relative advantage is 0, and they would only dilute the normaliser)."""
    keep = torch.ones_like(finished, dtype=torch.bool)
    if overlong_filter:
        keep = keep & finished
    if dynamic_sampling:
        # A group trains if any of its episodes' total scores differs from the group's mean.
        totals = episode_totals(scores.double(), episode_ids)
        first = turn_index == 0
        spread = group_normalized(totals, group_ids, scale=False, members=first).abs() > 1e-9
        same_group = (group_ids[:, None] == group_ids[None, :]) & first[None, :]
        keep = keep & ((same_group.double() @ spread.double()) > 0)
    return response_mask * keep[:, None].to(response_mask.dtype)


class RunningMoments:
    """Running mean and variance of scores (Chan et al.'s parallel update), for reward scaling."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def update(self, x: torch.Tensor) -> None:
        n = x.numel()
        if n == 0:
            return
        batch_mean, batch_var = x.float().mean().item(), x.float().var(unbiased=False).item()
        delta, total = batch_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.count = total

    @property
    def std(self) -> float:
        return max(self.var, 1e-8) ** 0.5

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]
