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

from cory.drift.control import ControlOutput


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
    control: ControlOutput | None = None
    """What a sampling control (hard budget, asking for help) recorded per response token: the
    distribution each token was actually drawn from. None when sampling was not steered."""
    # Filled by the learner before the update:
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    """The learner's per-row and per-token working values (kl, advantages, returns, loss_mask, ...)."""

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
            elif isinstance(value, ControlOutput):
                updates[f.name] = value.select(idx_t)
            elif f.name == "extras":
                updates[f.name] = {
                    k: v[idx_t] if isinstance(v, torch.Tensor) and v.shape[:1] == (len(self),) else v
                    for k, v in value.items()
                }
        return replace(self, **updates)

    def compact(self) -> "Rollout":
        """The same rows without padding columns that none of them uses (query columns on the left,
        response columns on the right): what a batch generated for these rows alone would hold."""
        if self.extras:
            raise ValueError("compact() is for sampled rollouts, before the learner adds extras")
        lq = int(self.query_mask.sum(-1).max()) if len(self) else 0
        lr = int(self.response_mask.sum(-1).max()) if len(self) else 0
        q, r = slice(self.query_ids.shape[1] - lq, None), slice(0, lr)
        token = {"query_ids": q, "query_mask": q, "response_ids": r, "response_mask": r, "logprobs": r,
                 "engine_logprobs": r, "ref_logprobs": r, "values": r}
        updates = {k: getattr(self, k)[:, cols] for k, cols in token.items() if getattr(self, k) is not None}
        if self.control is not None:
            updates["control"] = self.control.select_columns(r)
        return replace(self, **updates)

    def to(self, device) -> "Rollout":
        return replace(
            self,
            **{f.name: getattr(self, f.name).to(device) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)},
            control=self.control.to(device) if self.control is not None else None,
            extras={k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.extras.items()},
        )


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
    for p in parts:
        for i in range(len(p["prompts"])):
            qm = p["query_mask"][i].bool()
            rm = p["response_mask"][i].bool()
            q_rows.append(p["query_ids"][i][qm])
            r_rows.append(p["response_ids"][i][rm])
            lp_rows.append(p["logprobs"][i][rm])
            if from_engine:
                engine_rows.append(p["engine_logprobs"][i][rm])
        for k in cols:
            cols[k].extend(p[k])
    query_ids = _pad_stack(q_rows, pad_id, left=True)
    response_ids = _pad_stack(r_rows, pad_id, left=False)
    controls = [p["control"] for p in parts if p.get("control") is not None]
    control = ControlOutput.concat(controls, [p["response_mask"] for p in parts]) if controls else None
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
        control=control,
    )


def rollout_from_generation(gen, prompts: list[str], scores: list[float]) -> Rollout:
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
        group_ids=torch.arange(n, device=device),
        prompts=list(prompts),
        responses=list(gen.texts),
        infos=[{} for _ in range(n)],
    )


class Sampler:
    """Drives a batch of text environments with one policy, in lockstep, and returns a Rollout."""

    def __init__(self, policy, env: TextEnvBatch, params, max_turns: int = 1000, control=None, backend=None):
        """`control` (optional, `cory.drift.control.SamplingControl`) steers sampling across an
        episode's turns: a hard KL budget (`cory.drift.budget.EpisodeBudget`) or asking for help
        (`cory.drift.help.AskForHelp`). It gives each turn a logits hook and returns a
        `ControlOutput`, which lands in `Rollout.control`. `backend` (optional, a `cory.generation`
        backend) generates instead of `policy.generate` (e.g. vLLM); a list of backends gives each
        turn index its own (CORY: the pioneer's, then the observer's)."""
        self.policy = policy
        backends = backend if isinstance(backend, (list, tuple)) else [backend]
        self.generators = [b.generate if b is not None else policy.generate for b in backends]
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
            generate = self.generators[turn] if len(self.generators) > 1 else self.generators[0]
            gen = generate(seen, self.params, generator=generator, **hooked)
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
                    "control": control.record(hook, live, gen.response_ids.shape[1], gen.response_mask) if control is not None else None,
                }
            )
            keep = [j for j, d in enumerate(dones) if not d]
            if not keep:
                break
            live = [live[j] for j in keep]
            observations = [next_obs[j] for j in keep]
        return concat_turns(parts, self.policy.tokenizer.pad_token_id)
