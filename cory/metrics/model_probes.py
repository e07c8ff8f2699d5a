"""The frequency-bias and knowing-doing probes run against a language model.

The probes themselves (`cory.metrics.probes`) take plain callables; this module supplies them from a
`Policy`: `action_scorer` scores each action string by the model's log-likelihood of it after the
prompt, and `responder` answers prompts by sampling. Prompts are rendered with the bandit options the
model plays with (history window, summary, chain of thought), so a model sees the probes in the format
it knows. Imports torch; `cory.metrics` itself does not.
"""

from __future__ import annotations

from collections.abc import Callable

import copy
from dataclasses import replace

import numpy as np
import torch

from cory.envs.prompts import PromptOptions
from cory.metrics.probes import (
    FrequencyBiasResult,
    KnowingDoing,
    ScoreActions,
    frequency_bias_by_repeats,
    frequency_bias_rates,
    knowing_doing_rates,
    run_frequency_bias_probe,
    run_knowing_doing_probe,
)
from cory.generation.native import lm_forward, position_ids_from_mask, prefix_cache
from cory.generation.sampling import SamplingParams
from cory.policy import Policy

PROBES = ("frequency", "knowing-doing")
ACTION_TEMPLATE = "\nACTION={}"
"""How a model's answer follows the prompt (the zoo's agent models answer on a new line)."""


def action_scorer(policy: Policy, batch_size: int = 64, params: SamplingParams | None = None) -> ScoreActions:
    """score_actions(prompt, texts) -> the model's summed log-probability of each text right after the
    prompt (at temperature 1). The prompt is run once and its KV cache is shared by the texts, which
    are scored `batch_size` at a time (inside `policy.frozen_prefix()`, successive prompts also
    share the cache of their common beginning). `params` renders the prompt as sampling would (chat template,
    system and example turns)."""
    tokenizer = policy.tokenizer
    params = params or SamplingParams()

    @torch.no_grad()
    def score(prompt: str, texts: list[str]) -> list[float]:
        responses = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        if any(len(ids) == 0 for ids in responses):
            raise ValueError("an action text has no tokens")
        query_ids, query_mask = policy.encode_prompts([prompt], params)
        lm, lq, device = policy.model, query_ids.shape[1], query_ids.device
        cache = prefix_cache(lm, query_ids[0, :-1].tolist(), getattr(policy, "prefix_store", None), device)
        head = lm_forward(lm, query_ids[:, -1:], query_mask, torch.tensor([[lq - 1]], device=device), logits_to_keep=1,
                           use_cache=True, past_key_values=cache)
        first = torch.log_softmax(head.logits[0, -1].float(), dim=-1)  # [V]: the first token of every text
        scores: list[float] = []
        for start in range(0, len(texts), batch_size):
            chunk = responses[start : start + batch_size]
            width = max(len(ids) for ids in chunk)
            total = torch.tensor([first[ids[0]].item() for ids in chunk])
            if width > 1:
                ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, toks in enumerate(chunk):
                    ids[row, : len(toks)] = torch.tensor(toks)
                    mask[row, : len(toks)] = 1
                ids, mask = ids.to(device), mask.to(device)
                cache = copy.deepcopy(head.past_key_values)
                cache.batch_repeat_interleave(len(chunk))
                attention = torch.cat([query_mask.expand(len(chunk), -1), mask], dim=1)
                positions = position_ids_from_mask(attention)[:, lq:]
                out = lm_forward(lm, ids[:, :-1], attention[:, :-1], positions[:, :-1], use_cache=True, past_key_values=cache)
                logp = torch.log_softmax(out.logits.float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]  # [K, W-1]
                total = total + (logp * mask[:, 1:]).sum(-1).cpu()
            scores += total.tolist()
        return scores

    return score


def responder(policy: Policy, params: SamplingParams, seed: int = 0, batch_size: int = 64) -> Callable[[list[str]], list[str]]:
    """respond(prompts) -> one sampled answer per prompt (seeded), in batches of `batch_size`."""
    generator = torch.Generator(device=policy.device).manual_seed(seed)

    def respond(prompts: list[str]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(prompts), batch_size):
            out += policy.generate(prompts[start : start + batch_size], params, generator=generator).texts
        return out

    return respond


def bandit_options(env_kwargs: dict) -> dict:
    """The arguments of the bandit probes taken from `cory/Bandit-v0` keyword arguments: arms,
    variant, noise, horizon, and the prompt options (chain of thought, history window, summary)."""
    kw = dict(env_kwargs)
    options = PromptOptions(cot=kw.get("cot", True), history=kw.get("history"), summary=kw.get("summary", False))
    return {"n_arms": kw.get("n_arms", 10), "variant": kw.get("variant", "button"), "sigma": kw.get("sigma", 1.0),
            "horizon": kw.get("horizon", 50), "options": options}


def frequency_bias_probe(
    policy: Policy, n_probes: int, seed: int = 0, env_kwargs: dict | None = None, action_template: str = ACTION_TEMPLATE,
    params: SamplingParams | None = None,
) -> tuple[dict, list[FrequencyBiasResult]]:
    """The frequency-bias probe on a model, with bandit prompts rendered as `cory/Bandit-v0` with
    `env_kwargs` renders them (and as `params` shows prompts to the model: chat template, system and
    example turns). Returns (summary, per-probe results); the summary holds F_f, F_g, F_o, the mean
    action entropy (nats), the probe count, and the same per repeat-count bin (`by_repeats`)."""
    opts = bandit_options(env_kwargs or {})
    results = run_frequency_bias_probe(action_scorer(policy, params=params), n_probes, np.random.default_rng(seed),
                                       action_template=action_template, **opts)
    summary = {**frequency_bias_rates([r.label for r in results]), "entropy": float(np.mean([r.entropy for r in results])),
               "probes": len(results), "by_repeats": frequency_bias_by_repeats(results)}
    return summary, results


def knowing_doing_probe(
    policy: Policy, n_probes: int, seed: int = 0, env_kwargs: dict | None = None, alpha: float = 0.5,
    max_new_tokens: int = 128, temperature: float = 1.0, params: SamplingParams | None = None,
) -> tuple[dict, list[KnowingDoing]]:
    """The knowing-doing probe on a model: prompts asking for `<ucb_values>` and an action, answered by
    sampling up to `max_new_tokens` tokens at `temperature` (with `params`' prompt rendering: chat
    template, system and example turns). Returns (`knowing_doing_rates`, per-probe results)."""
    opts = bandit_options(env_kwargs or {})
    params = replace(params or SamplingParams(), max_new_tokens=max_new_tokens, temperature=temperature)
    results = run_knowing_doing_probe(
        responder(policy, params, seed), n_probes, np.random.default_rng(seed), n_arms=opts["n_arms"],
        variant=opts["variant"], sigma=opts["sigma"], horizon=opts["horizon"], alpha=alpha, cot=opts["options"].cot,
        window=opts["options"].history,
    )
    return knowing_doing_rates(results), results
