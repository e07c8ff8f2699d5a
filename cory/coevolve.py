"""CORY: coevolving RL fine-tuning of two copies of one model (Ma et al., NeurIPS 2024).

Two agents start from the same model. Each iteration the *pioneer* answers the prompt alone; the
*observer* answers a prompt that also holds the pioneer's answer. Each agent is rewarded with its
own task reward plus `c` times its partner's (c = 1: the paper's cooperative sum), and each is
updated by its own Learner — so any registered algorithm runs inside CORY unchanged. The two
answers are the two turns of a `PioneerObserverEnv` episode, played by the ordinary `Sampler`
(the pioneer generates the first turn, the observer the second), which applies the run's sampling
control and the group replication exactly as in single-agent runs. Every
`swap_every` iterations the roles are exchanged; the agents keep their optimizer and KL-controller
state across exchanges (the original code rebuilt its trainers at each swap, resetting them).

Memory: with `cory.shared_base=true` both agents are LoRA adapters on one frozen base model, which
also serves as the KL reference with the adapters disabled, so CORY needs about one model's memory
instead of three (two policies and a reference).
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from cory.config import Config
from cory.drift.control import EachTurnAnEpisode
from cory.learner import Learner, reduce_metrics
from cory.lora import AdaptersDisabled, peft_config
from cory.policy import Policy
from cory.build import eval_params, make_backend, make_control, make_reference, sampling_params
from cory.errors import UsageError
from cory.rollout import Rollout, Sampler
from cory.run import Run
from cory.tasks.base import TaskEnv

CONTINUATION_TEMPLATE = 'I can make this sentence "{prompt}{reference}" more positive: {prompt}'
"""The observer's prompt for continuation tasks (the paper's IMDB template)."""


def qa_prompt(prompt: str, reference: str) -> str:
    """The paper's question-answering template: the pioneer's answer goes in as `Reference:` just
    before the final `Answer:` of the prompt (or after the prompt if it has none)."""
    marker = "Answer:"
    stripped = prompt.rstrip()
    if stripped.endswith(marker):
        return f"{stripped[: -len(marker)]}Reference:{reference}\n{marker}"
    return f"{prompt}\nReference:{reference}\n"


CHAT_TEMPLATE = "{prompt}\n\nAnother assistant answered:\n{reference}\n\nWrite your own answer; improve on theirs."
"""The observer's prompt when prompts are chat turns (task.chat_template): one user message that
holds the task's prompt and the pioneer's answer; the chat template wraps it like any prompt."""


def observer_prompts(prompts: list[str], references: list[str], template: str, observe: bool = True) -> list[str]:
    """The observer's prompts. `template` is continuation, qa, chat, or a format string with
    {prompt} and {reference}. With observe=False (ablation) the observer gets the bare prompts."""
    if not observe:
        return list(prompts)
    if template == "chat":
        template = CHAT_TEMPLATE
    if template == "qa":
        return [qa_prompt(p, r) for p, r in zip(prompts, references)]
    fmt = CONTINUATION_TEMPLATE if template == "continuation" else template
    return [fmt.format(prompt=p, reference=r) for p, r in zip(prompts, references)]


def collective_rewards(own: list[float], partner: list[float], coef: float) -> list[float]:
    """r(own) + coef * r(partner), element-wise."""
    return [a + coef * b for a, b in zip(own, partner)]


class PioneerObserverEnv:
    """CORY's iteration as a two-turn text environment (the Sampler's protocol, `cory.rollout`).

    Turn 1: the observation is the task's prompt and the pioneer answers it. Turn 2: the observation
    is the observer's prompt built from the prompt and the pioneer's answer (`observer_prompts`), and
    the observer answers it; the episode ends. Both answers are then scored as answers to the
    original prompt; `task_scores` holds (pioneer's, observer's) for the run to share out."""

    def __init__(self, task, template: str, observe: bool = True):
        self.prompts_env = TaskEnv(task)
        self.task, self.template, self.observe = task, template, observe
        self.pioneer_texts: list[str] | None = None
        self.task_scores: tuple[list[float], list[float]] | None = None

    def reset(self, n: int, rng: np.random.Generator, group_size: int = 1) -> list[str]:
        self.pioneer_texts, self.task_scores = None, None
        return self.prompts_env.reset(n, rng, group_size)

    @property
    def prompts(self) -> list[str]:
        return self.prompts_env.prompts

    def step(self, responses: list[str]) -> tuple[list[str], list[float], list[bool], list[dict]]:
        n = len(responses)
        if self.pioneer_texts is None:
            self.pioneer_texts = list(responses)
            observations = observer_prompts(self.prompts, self.pioneer_texts, self.template, self.observe)
            return observations, [0.0] * n, [False] * n, [{} for _ in range(n)]
        # Both answers are judged as answers to the original prompt.
        self.task_scores = (self.task.score(self.prompts, self.pioneer_texts), self.task.score(self.prompts, responses))
        return [""] * n, list(self.task_scores[1]), [True] * n, [{} for _ in range(n)]


def adapter_name(agent: str) -> str:
    return f"agent_{agent}"


@dataclass
class Agent:
    name: str
    policy: Policy
    learner: Learner
    adapter: str | None = None
    backend: object = None
    """Who generates this agent's responses (`cory.generation`); None = its policy's native loop."""

    def generate(self, prompts: list[str], params, generator=None, **hook):
        """The Sampler's backend for this agent's turn: its adapter made active, then its backend."""
        self.activate()
        return self.backend.generate(prompts, params, generator=generator, **hook)

    def activate(self) -> None:
        """Make this agent's adapter the active one (shared-base mode); a no-op for full copies."""
        if self.adapter is not None:
            self.policy.model.set_adapter(self.adapter)
            # set_adapter freezes the other adapters; this agent's must stay trainable.
            for p in self.learner.optimizer.param_groups[0]["params"]:
                p.requires_grad_(True)


class CoryRun(Run):
    """Two agents, a shared frozen reference, and the pioneer/observer schedule."""

    def __init__(self, cfg: Config, output_dir: str | Path, **options):
        from cory.algorithms import make_algorithm
        from cory.tasks import make_task

        super().__init__(cfg, output_dir, **options)
        self.task = make_task(cfg.task)
        dtype = getattr(torch, cfg.model.dtype)
        algorithms = {n: make_algorithm(cfg) for n in ("a", "b")}
        needs_values = algorithms["a"].needs_values
        self.group_size = algorithms["a"].group_size
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.FSDP:
            raise UsageError("CORY does not run under FSDP yet; use DDP (accelerate launch --multi_gpu) or cory.shared_base=true")
        if cfg.cory.shared_base:
            if self.accelerator.num_processes > 1:
                raise UsageError("cory.shared_base=true runs in one process; use full copies for data parallelism")
            if cfg.model.reference or cfg.model.reference_ensemble:
                raise UsageError("cory.shared_base=true uses the base model as the reference; leave model.reference and model.reference_ensemble empty")
            policies, reference, params = self._shared_base(cfg, dtype, needs_values)
        else:
            policies = {n: Policy.from_pretrained(cfg.model.name, value_head=needs_values, dtype=dtype) for n in ("a", "b")}
            reference = make_reference(cfg, dtype)
            params = {n: None for n in ("a", "b")}
        # One sampling control (hard budget or asking for help) serves both agents: each of their
        # responses is its own episode with its own budget.
        control, fallback = make_control(cfg, reference, dtype, multi_turn=False)
        self.control = EachTurnAnEpisode(control) if control is not None else None
        self.agents = {
            n: Agent(n, policies[n], Learner(policies[n], reference, algorithms[n], cfg, self.accelerator, params[n], fallback=fallback),
                     adapter=adapter_name(n) if cfg.cory.shared_base else None)
            for n in ("a", "b")
        }
        # One engine serves both agents: full copies take turns holding it, adapters are LoRA requests.
        backends = make_backend(cfg, self.accelerator, {n: (a.policy, a.adapter) for n, a in self.agents.items()})
        for n, agent in self.agents.items():
            agent.backend = backends[n]
        self.backend = backends["a"]
        self.template = self._template(cfg)
        self.env = PioneerObserverEnv(self.task, self.template, cfg.cory.observe)

    @staticmethod
    def _shared_base(cfg: Config, dtype, needs_values: bool):
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from cory import zoo

        path = zoo.resolve(cfg.model.name)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        lora = peft_config(cfg.cory.lora_r, cfg.cory.lora_alpha, cfg.cory.lora_targets)
        # Adapter names must not be substrings of PEFT's "lora_" prefix (a bare "a" is).
        peft_model = get_peft_model(base, lora, adapter_name=adapter_name("a"))
        peft_model.add_adapter(adapter_name("b"), lora)
        policies = {n: Policy(peft_model, tokenizer, value_head=needs_values) for n in ("a", "b")}
        params = {}
        for n, policy in policies.items():
            mine = [p for name, p in policy.module.named_parameters() if f".{adapter_name(n)}." in name and "lora_" in name]
            if policy.module.value_head is not None:
                mine += list(policy.module.value_head.parameters())
            for p in mine:
                p.requires_grad_(True)
            params[n] = mine
        return policies, AdaptersDisabled(peft_model), params

    def _template(self, cfg: Config) -> str:
        t = cfg.cory.observer_template
        if t == "auto":
            if cfg.task.chat_template:
                return "chat"
            return "qa" if self.task.name == "arithmetic" else "continuation"
        if t not in ("continuation", "qa", "chat") and ("{prompt}" not in t or "{reference}" not in t):
            raise UsageError("cory.observer_template must be auto, continuation, qa, chat, or contain {prompt} and {reference}")
        return t

    # -- schedule ------------------------------------------------------------------------------------
    def roles(self, iteration: int) -> tuple[Agent, Agent]:
        """(pioneer, observer) at an iteration: agent a pioneers first; roles swap every T."""
        swapped = self.cfg.cory.exchange and (iteration // self.cfg.cory.swap_every) % 2 == 1
        a, b = self.agents["a"], self.agents["b"]
        return (b, a) if swapped else (a, b)

    @property
    def learners(self) -> dict:
        return {n: agent.learner for n, agent in self.agents.items()}

    def iterate(self) -> dict:
        cfg, state = self.cfg, self.state
        t0 = time.perf_counter()
        pioneer, observer = self.roles(state.iteration)
        sampler = Sampler(pioneer.policy, self.env, sampling_params(cfg), max_turns=2, control=self.control,
                          backend=[pioneer, observer])
        rollout = sampler.collect(cfg.train.batch_size, state.rng, state.generator, group_size=self.group_size)
        observer.backend.pause()  # both agents share the engine: it sleeps once both have generated
        r_p, r_o = self.env.task_scores
        c = cfg.cory.partner_coef
        t_gen = time.perf_counter() - t0
        metrics: dict[str, float] = {}
        for role, agent, turn, own, partner in (("pioneer", pioneer, 0, r_p, r_o), ("observer", observer, 1, r_o, r_p)):
            agent.activate()
            _, m = agent.learner.step(own_turn(rollout, turn, collective_rewards(own, partner, c)), state.iteration, state.generator)
            agent.backend.mark_stale()
            m["task_reward"] = sum(own) / len(own)
            m["collective_reward"] = m.pop("reward_mean")
            for k, v in m.items():
                metrics[f"{role}/{k}"] = v
                metrics[f"{agent.name}/{k}"] = v
        state.iteration += 1
        metrics["pioneer_is_a"] = float(pioneer.name == "a")
        metrics["reward_mean"] = (metrics["pioneer/task_reward"] + metrics["observer/task_reward"]) / 2
        metrics["kl_mean"] = (metrics["pioneer/kl_mean"] + metrics["observer/kl_mean"]) / 2
        metrics["time/generate"] = t_gen
        metrics["tokens_per_s/generate"] = float(rollout.response_mask.sum()) / max(t_gen, 1e-9)
        metrics["time/iteration"] = time.perf_counter() - t0
        return reduce_metrics(self.accelerator, metrics)

    # -- evaluation and saving ----------------------------------------------------------------------
    def evaluate_all(self) -> dict:
        """Each agent answers alone from the prompt (the paper's standalone "pioneer mode")."""
        from cory.evaluate import evaluate

        cfg = self.cfg
        out: dict = {"samples": []}
        per_agent = {}
        for n, agent in self.agents.items():
            agent.activate()
            res = evaluate(agent.policy, self.task.eval_prompts, self.task.reward, eval_params(cfg),
                           cfg.eval.samples_per_prompt, cfg.eval.seed, reference=agent.learner.reference,
                           shared_prefix=cfg.train.shared_prefix)
            per_agent[n] = res
            for k, v in res.items():
                if isinstance(v, (int, float)):
                    out[f"{n}/{k}"] = v
            out["samples"] += [{"agent": n, **s} for s in res["samples"]]
        for k in ("reward_mean", "kl_mean", "response_length", "eos_rate"):
            out[k] = sum(r[k] for r in per_agent.values()) / len(per_agent)
        out["best_agent"] = max(per_agent, key=lambda n: per_agent[n]["reward_mean"])
        return out

    def save_final(self, evaluation: dict) -> None:
        agents_dir = self.output_dir / "agents"
        for n, agent in self.agents.items():
            save_standalone(agent, agents_dir / n)
        best = evaluation["best_agent"]
        final = self.output_dir / "final"
        shutil.rmtree(final, ignore_errors=True)
        # Hard links: the best agent's weights are not written a second time (540 MB per copy at 135M
        # in fp32). final/ is removed and linked afresh after every save of the agents.
        shutil.copytree(agents_dir / best, final, copy_function=_link_or_copy)
        (final / "CORY_AGENT").write_text(f"{best}\n")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def own_turn(rollout: Rollout, turn: int, rewards: list[float]) -> Rollout:
    """One agent's rows of a pioneer/observer rollout as its own single-turn episodes: the rows of
    `turn`, without padding the other agent's rows needed, rewarded with `rewards` (the sum with the
    partner's score), each row one finished episode."""
    rows = (rollout.turn_index == turn).nonzero()[:, 0]
    mine = rollout.select(rows).compact()
    n = len(mine)
    return replace(mine, scores=torch.tensor(rewards, dtype=torch.float32), turn_index=torch.zeros(n, dtype=torch.long),
                   done=torch.ones(n, dtype=torch.bool))


def save_standalone(agent: Agent, folder: Path) -> None:
    """An ordinary HF folder for one agent (LoRA merged into a copy of the base in shared mode)."""
    if agent.adapter is None:
        agent.policy.save_pretrained(folder)
        return
    merged_lm = copy.deepcopy(agent.policy.model)
    merged_lm.set_adapter(agent.adapter)
    merged_lm = merged_lm.merge_and_unload()
    standalone = Policy(merged_lm, agent.policy.tokenizer)
    if agent.policy.module.value_head is not None:
        standalone.module.value_head = copy.deepcopy(agent.policy.module.value_head)
    standalone.save_pretrained(folder)
