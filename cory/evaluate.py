"""Evaluation on a fixed prompt set: task reward, KL to a reference, length, EOS rate, samples; and
in a text environment, episodes of a model or of a classical agent on the same evaluation instances.

Answers are sampled by the run's backend (the native loop, or vLLM), which renders prompts as
training does; the KL to the reference is scored by a `Scorer` at the evaluation's temperature.
"""

from __future__ import annotations

import numpy as np
import torch

from cory.advantages import episode_sums
from cory.agents import run_agent
from cory.drift.exact import kl_exact
from cory.envs.batch import GymTextEnvBatch
from cory.generation.sampling import SamplingParams
from cory.kl import masked_sum
from cory.metrics import coverage, mean_ci, outcome_rates
from cory.policy import Policy
from cory.rollout import Sampler
from cory.scoring import Scorer


@torch.no_grad()
def evaluate(
    policy: Policy,
    prompts: list[str],
    reward,
    params: SamplingParams,
    samples_per_prompt: int = 1,
    seed: int = 1234,
    reference: Scorer | None = None,
    batch_size: int = 64,
    num_samples_shown: int = 3,
    exact_kl: bool = False,
    backend=None,
) -> dict:
    """Mean reward over `samples_per_prompt` sampled answers to each prompt, with a fixed seed.

    With a reference (a `Scorer` at the evaluation's temperature), also the mean sequence KL (sum
    over tokens of log q - log p of the sampled tokens) of the policy's answers from it; with
    `exact_kl`, also `kl_exact_mean`: the exact episode KL along the same answers (sum over their
    tokens of the full-vocabulary KL[q || p] at each position, as `kl.exact_accounting` logs it in
    training). `kl_std` and `kl_exact_std` are their sample standard deviations over the answers.
    `answers` holds the per-answer values behind the means (`reward`, `length`, `finished`, and
    `kl` / `kl_exact` where measured), in prompt order with each prompt's samples together, so that
    two models evaluated on the same prompts can be compared prompt by prompt.
    `backend` samples (default: the policy's native loop).
    """
    generate = backend.generate if backend is not None else policy.generate
    generator = torch.Generator(device="cpu").manual_seed(seed)
    all_prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    rewards, kls, exact, lengths, finished, texts = [], [], [], [], [], []
    for i in range(0, len(all_prompts), batch_size):
        chunk = all_prompts[i : i + batch_size]
        gen = generate(chunk, params, generator=generator)
        rewards += reward(chunk, gen.texts)
        mask = gen.response_mask
        lengths += mask.sum(-1).tolist()
        finished += gen.finished.tolist()
        texts += gen.texts
        if reference is not None:
            dev = reference.device
            ref = reference(gen, with_full_logprobs=exact_kl)
            kls += masked_sum(gen.logprobs.to(dev) - ref.logprobs, mask.to(dev)).tolist()
            if exact_kl:
                # The bare LM: a prepared module may carry a mixed-precision forward; the reference has none.
                cur = reference.of(policy.model)(gen, with_full_logprobs=True)
                exact += masked_sum(kl_exact(cur.full_logprobs.float(), ref.full_logprobs.float()), mask.to(dev)).tolist()
    r = torch.tensor(rewards)
    out = {
        "reward_mean": r.mean().item(),
        "reward_std": r.std().item() if len(r) > 1 else 0.0,
        "response_length": sum(lengths) / len(lengths),
        "eos_rate": sum(finished) / len(finished),
        "n": len(r),
        "samples": [{"prompt": p, "response": t} for p, t in list(zip(all_prompts, texts))[: num_samples_shown * samples_per_prompt : samples_per_prompt]],
        "answers": {"reward": [float(x) for x in rewards], "length": [int(x) for x in lengths], "finished": [bool(x) for x in finished]},
    }
    if reference is not None:
        out["kl_mean"], out["kl_std"] = mean_std(kls)
        out["answers"]["kl"] = kls
        if exact_kl:
            out["kl_exact_mean"], out["kl_exact_std"] = mean_std(exact)
            out["answers"]["kl_exact"] = exact
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of per-episode values."""
    std = torch.tensor(values, dtype=torch.float64).std().item() if len(values) > 1 else 0.0
    return sum(values) / len(values), std


EVAL_POOL_OFFSET = 10_000
"""Evaluation instances come from the pool seeded `EVAL_POOL_OFFSET + seed`; training pools are seeded
by the training seed, so the two never share a pool."""


@torch.no_grad()
def play_policy(
    policy: Policy,
    env_id: str,
    env_kwargs: dict,
    n_episodes: int,
    params: SamplingParams,
    seed: int = 1234,
    max_turns: int = 100,
    backend=None,
):
    """Plays one episode in each of `n_episodes` text environments with a language model. The
    instances are the evaluation pool of `seed` (the same set `play_agent` gives a classical agent).
    Returns (episode records, the Rollout of every turn)."""
    env = GymTextEnvBatch(env_id, pool_size=n_episodes, pool_seed=EVAL_POOL_OFFSET + seed, **dict(env_kwargs))
    sampler = Sampler(policy, env, params, max_turns=max_turns, backend=backend)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    rollout = sampler.collect(n_episodes, np.random.default_rng(seed), generator)
    return env.episodes(), rollout


def play_agent(name: str, env_id: str, env_kwargs: dict, n_episodes: int, seed: int = 1234) -> list:
    """Plays one episode in each of `n_episodes` text environments with the classical agent `name`
    (see `cory.agents.AGENTS`), on the same evaluation instances as `play_policy` with this seed."""
    return run_agent(name, env_id, n_episodes, seed, pool_size=n_episodes, pool_seed=EVAL_POOL_OFFSET + seed,
                     **dict(env_kwargs))


def episode_metrics(records) -> dict:
    """What a set of episodes says, whoever played them: mean shaped return (`reward_mean`), raw
    environment return, valid-action rate, episode length; for bandits the mean final cumulative regret
    (with its 95% half-width) and the final action coverage; for games the win / draw / loss rates."""
    out = {
        "reward_mean": float(np.mean([r.total_reward for r in records])),
        "env_return_mean": float(np.mean([sum(r.env_rewards) for r in records])),
        "valid_rate": float(np.mean([r.valid_rate for r in records])),
        "episode_length": float(np.mean([len(r) for r in records])),
        "n": len(records),
    }
    regrets = [r.total_regret for r in records if r.total_regret == r.total_regret]
    if regrets:
        mean, half = mean_ci(np.asarray(regrets))
        out["regret_mean"], out["regret_ci95"] = float(mean), float(half)
        out["coverage_final"] = float(np.mean([coverage(r.executed, r.n_actions)[-1] for r in records]))
    finished = [r for r in records if r.outcome is not None]
    if finished:
        rates = outcome_rates(finished)
        out.update({f"{k}_rate": rates[k] for k in ("win", "draw", "loss")})
    return out


@torch.no_grad()
def evaluate_env(
    policy: Policy,
    env_id: str,
    env_kwargs: dict,
    n_episodes: int,
    params: SamplingParams,
    seed: int = 1234,
    reference: Scorer | None = None,
    max_turns: int = 100,
    backend=None,
) -> dict:
    """Plays `n_episodes` episodes of a text environment (instances from an evaluation pool seeded by
    `seed`, disjoint from training's) and reports returns, regret, coverage, valid-action rate,
    outcomes for games, and the mean episode KL to the reference (a `Scorer` at the evaluation's
    temperature)."""
    records, rollout = play_policy(policy, env_id, env_kwargs, n_episodes, params, seed, max_turns, backend)
    out = episode_metrics(records)
    out["response_length"] = rollout.response_mask.sum(-1).float().mean().item()
    out["eos_rate"] = rollout.finished.float().mean().item()
    if reference is not None:
        dev = reference.device
        ref = reference(rollout)
        per_turn = masked_sum(rollout.logprobs.to(dev) - ref.logprobs, rollout.response_mask.to(dev))
        out["kl_mean"] = float(episode_sums(per_turn.double().cpu(), rollout.episode_ids).mean())
    out["samples"] = [{"prompt": p[-300:], "response": r} for p, r in list(zip(rollout.prompts, rollout.responses))[:3]]
    return out
