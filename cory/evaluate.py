"""Evaluation on a fixed prompt set: task reward, KL to a reference, length, EOS rate, samples."""

from __future__ import annotations

import torch

from cory.kl import masked_sum
from cory.policy import Policy, SamplingParams, sequence_logprobs


@torch.no_grad()
def evaluate(
    policy: Policy,
    prompts: list[str],
    reward,
    params: SamplingParams,
    samples_per_prompt: int = 1,
    seed: int = 1234,
    reference: torch.nn.Module | None = None,
    batch_size: int = 64,
    num_samples_shown: int = 3,
) -> dict:
    """Mean reward over `samples_per_prompt` sampled answers to each prompt, with a fixed seed.

    With a reference model, also the mean sequence KL (sum over tokens of log q - log p of the
    sampled tokens, at the sampling temperature) of the policy's answers from it.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    all_prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    rewards, kls, lengths, finished, texts = [], [], [], [], []
    temperature = params.temperature or 1.0
    for i in range(0, len(all_prompts), batch_size):
        chunk = all_prompts[i : i + batch_size]
        gen = policy.generate(chunk, params, generator=generator)
        rewards += reward(chunk, gen.texts)
        mask = gen.response_mask
        lengths += mask.sum(-1).tolist()
        finished += gen.finished.tolist()
        texts += gen.texts
        if reference is not None:
            dev = next(reference.parameters()).device
            ref = sequence_logprobs(reference, gen.query_ids.to(dev), gen.query_mask.to(dev), gen.response_ids.to(dev), mask.to(dev), temperature=temperature)
            kls += masked_sum(gen.logprobs.to(dev) - ref.logprobs, mask.to(dev)).tolist()
    r = torch.tensor(rewards)
    out = {
        "reward_mean": r.mean().item(),
        "reward_std": r.std().item() if len(r) > 1 else 0.0,
        "response_length": sum(lengths) / len(lengths),
        "eos_rate": sum(finished) / len(finished),
        "n": len(r),
        "samples": [{"prompt": p, "response": t} for p, t in list(zip(all_prompts, texts))[: num_samples_shown * samples_per_prompt : samples_per_prompt]],
    }
    if reference is not None:
        out["kl_mean"] = sum(kls) / len(kls)
    return out
