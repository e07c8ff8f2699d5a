"""CORY's iteration as a two-turn text environment over a task: the pioneer answers the prompt,
the observer answers a prompt that also holds the pioneer's answer (Ma et al., NeurIPS 2024).

The observer's prompt is one of the paper's templates (`continuation` for IMDB-style continuation
tasks, `qa` for question answering), `chat` (one user turn holding the prompt and the pioneer's
answer, when prompts are chat turns), or a format string with {prompt} and {reference}.
"""

from __future__ import annotations

import numpy as np

from cory.tasks.base import PromptTask, TaskEnv

CONTINUATION_TEMPLATE = 'I can make this sentence "{prompt}{reference}" more positive: {prompt}'
"""The observer's prompt for continuation tasks (the paper's IMDB template)."""

CHAT_TEMPLATE = "{prompt}\n\nAnother assistant answered:\n{reference}\n\nWrite your own answer; improve on theirs."
"""The observer's prompt when prompts are chat turns (task.chat_template): one user message that
holds the task's prompt and the pioneer's answer; the chat template wraps it like any prompt."""

OBSERVER_TEMPLATES = ("auto", "continuation", "qa", "chat")
"""The named templates of `cory.observer_template`; any other value is a format string."""


def template_problem(template: str) -> str | None:
    """Why `template` cannot be an observer template, or None."""
    if template in OBSERVER_TEMPLATES or ("{prompt}" in template and "{reference}" in template):
        return None
    return f"must be one of {', '.join(OBSERVER_TEMPLATES)}, or a format string holding {{prompt}} and {{reference}}"


def resolve_template(template: str, task_name: str, chat: bool) -> str:
    """`auto` as the task asks (chat with chat prompts, qa for arithmetic, else continuation)."""
    if template != "auto":
        return template
    if chat:
        return "chat"
    return "qa" if task_name == "arithmetic" else "continuation"


def qa_prompt(prompt: str, reference: str) -> str:
    """The paper's question-answering template: the pioneer's answer goes in as `Reference:` just
    before the final `Answer:` of the prompt (or after the prompt if it has none)."""
    marker = "Answer:"
    stripped = prompt.rstrip()
    if stripped.endswith(marker):
        return f"{stripped[: -len(marker)]}Reference:{reference}\n{marker}"
    return f"{prompt}\nReference:{reference}\n"


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
    original prompt; `task_scores` holds (pioneer's, observer's) for the run to share out, and the
    observer's turn carries both in its infos (`pioneer_score`, `observer_score`), so that a rollout
    sampled elsewhere (an asynchronous worker) holds them."""

    def __init__(self, task: PromptTask, template: str, observe: bool = True):
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
        return [""] * n, list(self.task_scores[1]), [True] * n, [{"pioneer_score": p, "observer_score": o} for p, o in zip(*self.task_scores)]
