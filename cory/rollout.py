"""The Rollout (a flat batch of turns) and the Sampler that fills it from environments.

Everything is an episode of turns. A turn is one prompt and the policy's response to it; a
single-turn task is an episode of one turn, a bandit an episode of fifty. The Sampler steps a batch
of text environments in lockstep: at each step it generates one response for every live episode in
one batched call, hands the texts to the environments, and records the turn.

The environment protocol (`TextEnvBatch`) is deliberately small:
    reset(n, rng, group_size) -> list[str]         n * group_size first observations
    step(responses) -> (observations, rewards, dones, infos)   for the live episodes, in order
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

import numpy as np
import torch


class TextEnvBatch(Protocol):
    def reset(self, n: int, rng: np.random.Generator, group_size: int = 1) -> list[str]: ...

    def step(self, responses: list[str]) -> tuple[list[str], list[float], list[bool], list[dict]]: ...


@dataclass
class Rollout:
    """A flat batch of B turns. Token tensors are [B, Lq] (left-padded) or [B, Lr] (right-padded)."""

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    """[B, Lr] behaviour log-probs of the sampled tokens at the sampling temperature."""
    scores: torch.Tensor
    """[B] the turn's reward from the task or environment."""
    finished: torch.Tensor
    """[B] the response ended by EOS or a stop string (False: cut at max_new_tokens)."""
    episode_ids: torch.Tensor
    turn_index: torch.Tensor
    done: torch.Tensor
    """[B] the episode ended with this turn."""
    group_ids: torch.Tensor
    """[B] rows answering the same prompt share a group (GRPO, RLOO)."""
    prompts: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    infos: list[dict] = field(default_factory=list)
    engine_logprobs: torch.Tensor | None = None
    """[B, Lr] behaviour log-probs from a different sampling engine (e.g. vLLM); None for cory's own
    loop. When set, the learner recomputes `logprobs` with the trainer and corrects the mismatch by
    truncated importance sampling (algo.tis_cap)."""
    # Filled by the learner before the update:
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def select(self, idx: torch.Tensor | list[int]) -> "Rollout":
        """The rows at `idx` (a minibatch), tensors and lists alike."""
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        idx_l = idx_t.tolist()
        updates = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                updates[f.name] = value[idx_t]
            elif isinstance(value, list) and len(value) == len(self):
                updates[f.name] = [value[i] for i in idx_l]
            elif f.name == "extras":
                updates[f.name] = {
                    k: v[idx_t] if isinstance(v, torch.Tensor) and v.shape[:1] == (len(self),) else v
                    for k, v in value.items()
                }
        return replace(self, **updates)

    def to(self, device) -> "Rollout":
        return replace(
            self,
            **{f.name: getattr(self, f.name).to(device) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)},
            extras={k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.extras.items()},
        )

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)


def _pad_stack(rows: list[torch.Tensor], value: int | float, left: bool) -> torch.Tensor:
    width = max((r.shape[0] for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=rows[0].dtype if rows else torch.long)
    for i, r in enumerate(rows):
        if r.shape[0]:
            if left:
                out[i, width - r.shape[0] :] = r
            else:
                out[i, : r.shape[0]] = r
    return out


def concat_turns(parts: list[dict], pad_id: int) -> Rollout:
    """Join per-step batches (each a dict of per-row lists/tensors) into one padded Rollout."""
    q_rows, r_rows, lp_rows, engine_rows = [], [], [], []
    from_engine = parts[0].get("engine_logprobs") is not None
    cols: dict[str, list] = {k: [] for k in ("scores", "finished", "episode_ids", "turn_index", "done", "group_ids", "prompts", "responses", "infos")}
    token_extras: dict[str, list] = {k: [] for k in parts[0].get("token_extras", {})}
    for p in parts:
        for i in range(len(p["prompts"])):
            qm = p["query_mask"][i].bool()
            rm = p["response_mask"][i].bool()
            q_rows.append(p["query_ids"][i][qm])
            r_rows.append(p["response_ids"][i][rm])
            lp_rows.append(p["logprobs"][i][rm])
            if from_engine:
                engine_rows.append(p["engine_logprobs"][i][rm])
            for k, rows in token_extras.items():
                rows.append(p["token_extras"][k][i][rm.cpu()])
        for k in cols:
            cols[k].extend(p[k])
    query_ids = _pad_stack(q_rows, pad_id, left=True)
    response_ids = _pad_stack(r_rows, pad_id, left=False)
    extras = {k: _pad_stack(rows, 0.0, left=False) for k, rows in token_extras.items()}
    return Rollout(
        query_ids=query_ids,
        query_mask=_pad_stack([torch.ones_like(r) for r in q_rows], 0, left=True),
        response_ids=response_ids,
        response_mask=_pad_stack([torch.ones_like(r) for r in r_rows], 0, left=False),
        logprobs=_pad_stack(lp_rows, 0.0, left=False),
        engine_logprobs=_pad_stack(engine_rows, 0.0, left=False) if from_engine else None,
        scores=torch.tensor(cols["scores"], dtype=torch.float32),
        finished=torch.tensor(cols["finished"], dtype=torch.bool),
        episode_ids=torch.tensor(cols["episode_ids"], dtype=torch.long),
        turn_index=torch.tensor(cols["turn_index"], dtype=torch.long),
        done=torch.tensor(cols["done"], dtype=torch.bool),
        group_ids=torch.tensor(cols["group_ids"], dtype=torch.long),
        prompts=cols["prompts"],
        responses=cols["responses"],
        infos=cols["infos"],
        extras=extras,
    )


def rollout_from_generation(gen, prompts: list[str], scores: list[float], group_ids: list[int] | None = None) -> Rollout:
    """A single-turn Rollout (one episode per row) straight from a batched Generation."""
    n = len(prompts)
    device = gen.response_ids.device
    return Rollout(
        query_ids=gen.query_ids,
        query_mask=gen.query_mask,
        response_ids=gen.response_ids,
        response_mask=gen.response_mask,
        logprobs=gen.logprobs,
        engine_logprobs=gen.engine_logprobs,
        scores=torch.tensor(scores, dtype=torch.float32, device=device),
        finished=gen.finished,
        episode_ids=torch.arange(n, device=device),
        turn_index=torch.zeros(n, dtype=torch.long, device=device),
        done=torch.ones(n, dtype=torch.bool, device=device),
        group_ids=torch.tensor(group_ids if group_ids is not None else list(range(n)), dtype=torch.long, device=device),
        prompts=list(prompts),
        responses=list(gen.texts),
        infos=[{} for _ in range(n)],
    )


class Sampler:
    """Drives a batch of text environments with one policy, in lockstep, and returns a Rollout."""

    def __init__(self, policy, env: TextEnvBatch, params, max_turns: int = 1000, control=None, backend=None):
        """`control` (optional) steers sampling across an episode's turns: a hard KL budget
        (`cory.budget.EpisodeBudget`) or asking for help (`cory.ensemble.AskForHelp`). It gives each
        turn a logits hook and returns per-token tensors for training ("mix_weight",
        "fallback_logprobs", ...), which land in the Rollout's extras. `backend` (optional, a
        `cory.generation` backend) generates instead of `policy.generate` (e.g. vLLM)."""
        self.policy = policy
        self.generate = backend.generate if backend is not None else policy.generate
        self.env = env
        self.params = params
        self.max_turns = max_turns
        self.control = control

    def collect(self, n: int, rng: np.random.Generator, generator: torch.Generator | None = None, group_size: int = 1) -> Rollout:
        """Run n * group_size episodes to the end; rows of one prompt share a group id."""
        observations = self.env.reset(n, rng, group_size=group_size)
        total = len(observations)
        live = list(range(total))
        parts = []
        control = self.control
        if control is not None:
            control.reset(total)
        for turn in range(self.max_turns):
            hook = control.hook(live) if control is not None else None
            seen = control.annotate(observations, live) if control is not None else observations
            hooked = {"logits_hook": hook} if hook is not None else {}
            gen = self.generate(seen, self.params, generator=generator, **hooked)
            next_obs, rewards, dones, infos = self.env.step(gen.texts)
            parts.append(
                {
                    "query_ids": gen.query_ids,
                    "query_mask": gen.query_mask,
                    "response_ids": gen.response_ids,
                    "response_mask": gen.response_mask,
                    "logprobs": gen.logprobs,
                    "engine_logprobs": gen.engine_logprobs,
                    "scores": [float(r) for r in rewards],
                    "finished": gen.finished.tolist(),
                    "episode_ids": live,
                    "turn_index": [turn] * len(live),
                    "done": [bool(d) for d in dones],
                    "group_ids": [e // group_size for e in live],
                    "prompts": list(seen),
                    "responses": list(gen.texts),
                    "infos": list(infos),
                    "token_extras": control.record(hook, live, gen.response_ids.shape[1], gen.response_mask) if control is not None else {},
                }
            )
            keep = [j for j, d in enumerate(dones) if not d]
            if not keep:
                break
            live = [live[j] for j in keep]
            observations = [next_obs[j] for j in keep]
        return concat_turns(parts, self.policy.tokenizer.pad_token_id)
