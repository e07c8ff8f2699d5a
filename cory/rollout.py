"""The Rollout (a flat batch of turns), what training adds to it, and the Sampler that fills it.

Everything is an episode of turns. A turn is one prompt and the policy's response to it; a
single-turn task is an episode of one turn, a bandit an episode of fifty. The Sampler steps a batch
of text environments in lockstep: at each step it generates one response for every live episode in
one batched call, hands the texts to the environments, and records the turn (`Turn`).

The data that travels between the stages is typed:
    Turn         one batched generation and what the environments answered        (Sampler)
    Rollout      the turns of a batch of episodes, padded into one flat batch    (Sampler -> Learner)
    TokenScores  reference log-probs, values, per-token KL, importance weights   (Learner.score)
    Targets      shaped per-token rewards, advantages, returns, the loss mask   (shaping + estimator)

The environment protocol (`TextEnvBatch`) is deliberately small:
    reset(n, rng, group_size) -> list[str]         n * group_size first observations
    step(responses) -> (observations, rewards, dones, infos)   for the live episodes, in order
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch

from cory.drift.control import ControlOutput
from cory.generation.sampling import Generation


class TextEnvBatch(Protocol):
    def reset(self, n: int, rng: np.random.Generator, group_size: int = 1) -> list[str]: ...

    def step(self, responses: list[str]) -> tuple[list[str], list[float], list[bool], list[dict]]: ...


@dataclass
class TokenScores:
    """What scoring adds to a rollout, per response token [B, Lr] (0 at masked positions)."""

    ref_logprobs: torch.Tensor
    """log p_ref of each sampled token at the sampling temperature."""
    kl: torch.Tensor
    """Per-token KL to the reference by kl.estimator (exact over the vocabulary with `full`)."""
    values: torch.Tensor | None = None
    """V(state before each token), for algorithms with a value head."""
    kl_exact: torch.Tensor | None = None
    """Exact KL over the vocabulary of the distribution each token was drawn from (kl.exact_accounting)."""
    kl_semi: torch.Tensor | None = None
    """Exact KL against the unnormalised pessimistic ensemble reference (model.reference_ensemble)."""
    help_mass: torch.Tensor | None = None
    """The pessimistic ensemble's missing mass h at each token."""
    is_weight: torch.Tensor | None = None
    """Importance weight of tokens another engine or precision sampled (`cory.losses.importance_weights`)."""
    teacher_kl: torch.Tensor | None = None
    """Reverse KL from the policy to the teacher (distill.teacher) by distill.estimator: k1 of the
    sampled token, or exact over the vocabulary (of the distribution the token was drawn from)."""
    teacher_full_logprobs: torch.Tensor | None = None
    """[B, Lr, V] the teacher's whole distributions, with distill.estimator=full: the update's loss
    term KL(pi || teacher) is taken against them."""
    ref_full_logprobs: torch.Tensor | None = None
    """[B, Lr, V] the reference's whole distributions, kept only while the exact KL waits for the
    update's first pass (`Learner.exact_kl_waits`)."""


@dataclass
class Targets:
    """What the update trains towards, per response token [B, Lr] (0 at masked positions)."""

    rewards: torch.Tensor
    """Shaped per-token rewards: the adjusted score at a turn's last token, minus beta x KL with KL in the reward."""
    advantages: torch.Tensor
    returns: torch.Tensor | None
    """Value targets (actor-critic), or None."""
    loss_mask: torch.Tensor
    """1 on the tokens that train (the response mask less filtered responses and groups)."""


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
    """[B] the response ended by EOS, end of turn or a stop string (False: cut at max_new_tokens)."""
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
    the importance correction (algo.is_correction)."""
    control: ControlOutput | None = None
    """What a sampling control (hard budget, asking for help) recorded per response token: the
    distribution each token was actually drawn from. None when sampling was not steered."""
    trunk_hidden: torch.Tensor | None = None
    """[B, Lq + Lr, H] the frozen trunk's output at every column of [query | response], when only the
    top layers train (`cory.trunk`): kept from sampling, or filled by one pass in `Learner.score`."""
    policy_version: torch.Tensor | None = None
    """[B] the weights version (iterations trained) that sampled each row, in an asynchronous run
    (`cory.rollout_worker`); None when the trainer sampled it itself."""
    scored: TokenScores | None = None
    """Added by `Learner.score`."""
    targets: Targets | None = None
    """Added by the Learner before the update."""

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def select(self, idx: torch.Tensor | list[int]) -> "Rollout":
        """The rows at `idx` (a minibatch): every per-row tensor, list and typed part alike."""
        return _rows(self, torch.as_tensor(idx, dtype=torch.long), len(self))

    def compact(self) -> "Rollout":
        """The same rows without padding columns that none of them uses (query columns on the left,
        response columns on the right): what a batch generated for these rows alone would hold."""
        if self.scored is not None or self.targets is not None:
            raise ValueError("compact() is for sampled rollouts, before the learner scores them")
        lq = int(self.query_mask.sum(-1).max()) if len(self) else 0
        lr = int(self.response_mask.sum(-1).max()) if len(self) else 0
        q, r = slice(self.query_ids.shape[1] - lq, None), slice(0, lr)
        token = {"query_ids": q, "query_mask": q, "response_ids": r, "response_mask": r, "logprobs": r, "engine_logprobs": r}
        updates: dict[str, Any] = {k: getattr(self, k)[:, cols] for k, cols in token.items() if getattr(self, k) is not None}
        if self.control is not None:
            updates["control"] = self.control.select_columns(r)
        if self.trunk_hidden is not None:
            width = self.query_ids.shape[1]
            updates["trunk_hidden"] = torch.cat([self.trunk_hidden[:, q], self.trunk_hidden[:, width:][:, r]], dim=1)
        return replace(self, **updates)

    def to(self, device) -> "Rollout":
        return _to(self, device)


def _rows(value, idx: torch.Tensor, n: int):
    """`value` restricted to the rows `idx` of n: per-row tensors and lists, recursively through
    dataclasses; anything else (a 0-d tensor, a setting) unchanged."""
    if isinstance(value, torch.Tensor):
        return value[idx.to(value.device)] if value.dim() and value.shape[0] == n else value
    if isinstance(value, list):
        return [value[i] for i in idx.tolist()] if len(value) == n else value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return replace(value, **{f.name: _rows(getattr(value, f.name), idx, n) for f in dataclasses.fields(value)})
    return value


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return replace(value, **{f.name: _to(getattr(value, f.name), device) for f in dataclasses.fields(value)})
    return value


@dataclass
class Turn:
    """One step of a batch of episodes: the batched generation for the live episodes and what their
    environments answered (one entry per live episode, in episode order)."""

    generation: Generation
    prompts: list[str]
    """What the agent was shown (after any control's annotation)."""
    scores: list[float]
    done: list[bool]
    infos: list[dict]
    episode_ids: list[int]
    turn_index: int
    group_size: int
    control: ControlOutput | None = None


def _pad_stack(rows: list[torch.Tensor], value: int | float, left: bool) -> torch.Tensor:
    """Rows [n_i, ...] stacked into [len(rows), max n_i, ...], padded with `value` on the left or right."""
    width = max((r.shape[0] for r in rows), default=0)
    out = torch.full((len(rows), width, *rows[0].shape[1:]), value, dtype=rows[0].dtype) if rows else torch.full((0, 0), value)
    for i, r in enumerate(rows):
        if r.shape[0]:
            if left:
                out[i, width - r.shape[0] :] = r
            else:
                out[i, : r.shape[0]] = r
    return out


def concat_turns(turns: list[Turn], pad_id: int) -> Rollout:
    """Join the turns of a batch of episodes into one padded Rollout (each row's own padding dropped)."""
    q_rows, r_rows, lp_rows, engine_rows, trunk_q, trunk_r = [], [], [], [], [], []
    from_engine = turns[0].generation.engine_logprobs is not None
    with_trunk = all(t.generation.trunk_hidden is not None for t in turns)
    for turn in turns:
        gen = turn.generation
        lq = gen.query_ids.shape[1]
        for i in range(len(turn.prompts)):
            qm, rm = gen.query_mask[i].bool(), gen.response_mask[i].bool()
            q_rows.append(gen.query_ids[i][qm])
            r_rows.append(gen.response_ids[i][rm])
            lp_rows.append(gen.logprobs[i][rm])
            if from_engine:
                engine_rows.append(gen.engine_logprobs[i][rm])
            if with_trunk:
                trunk_q.append(gen.trunk_hidden[i, :lq][qm])
                trunk_r.append(gen.trunk_hidden[i, lq:][: rm.shape[0]][rm])
    controls = [t.control for t in turns if t.control is not None]
    control = ControlOutput.concat(controls, [t.generation.response_mask for t in turns]) if controls else None

    def column(name: str) -> list:
        return [x for t in turns for x in getattr(t, name)]

    return Rollout(
        query_ids=_pad_stack(q_rows, pad_id, left=True),
        query_mask=_pad_stack([torch.ones_like(r) for r in q_rows], 0, left=True),
        response_ids=_pad_stack(r_rows, pad_id, left=False),
        response_mask=_pad_stack([torch.ones_like(r) for r in r_rows], 0, left=False),
        logprobs=_pad_stack(lp_rows, 0.0, left=False),
        engine_logprobs=_pad_stack(engine_rows, 0.0, left=False) if from_engine else None,
        scores=torch.tensor(column("scores"), dtype=torch.float32),
        finished=torch.tensor([f for t in turns for f in t.generation.finished.tolist()], dtype=torch.bool),
        episode_ids=torch.tensor(column("episode_ids"), dtype=torch.long),
        turn_index=torch.tensor([t.turn_index for t in turns for _ in t.prompts], dtype=torch.long),
        done=torch.tensor(column("done"), dtype=torch.bool),
        group_ids=torch.tensor([e // t.group_size for t in turns for e in t.episode_ids], dtype=torch.long),
        prompts=column("prompts"),
        responses=[x for t in turns for x in t.generation.texts],
        infos=column("infos"),
        control=control,
        trunk_hidden=torch.cat([_pad_stack(trunk_q, 0.0, left=True), _pad_stack(trunk_r, 0.0, left=False)], dim=1) if with_trunk else None,
    )


def rollout_from_generation(gen: Generation, prompts: list[str], scores: list[float]) -> Rollout:
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
        trunk_hidden=gen.trunk_hidden,
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
        live = list(range(len(observations)))
        turns: list[Turn] = []
        control = self.control
        if control is not None:
            control.reset(len(observations))
        for index in range(self.max_turns):
            hook = control.hook(live) if control is not None else None
            seen = control.annotate(observations, live) if control is not None else observations
            hooked = {"logits_hook": hook} if hook is not None else {}
            generate = self.generators[index] if len(self.generators) > 1 else self.generators[0]
            gen = generate(seen, self.params, generator=generator, **hooked)
            next_obs, rewards, dones, infos = self.env.step(gen.texts)
            record = control.record(hook, live, gen.response_ids.shape[1], gen.response_mask) if control is not None else None
            turns.append(Turn(gen, list(seen), [float(r) for r in rewards], [bool(d) for d in dones], list(infos), live,
                              index, group_size, record))
            keep = [j for j, d in enumerate(dones) if not d]
            if not keep:
                break
            live = [live[j] for j in keep]
            observations = [next_obs[j] for j in keep]
        return concat_turns(turns, self.policy.tokenizer.pad_token_id)
