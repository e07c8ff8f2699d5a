"""Task names -> builders. A builder takes a TaskConfig (and the order of a dataset's rows) and returns a PromptTask."""

from __future__ import annotations

from typing import Callable

from cory.corpora import arithmetic, reviews
from cory.rewards import load_reward
from cory.tasks.base import PromptTask, load_prompt_file
from cory.tasks.dataset_prompts import DatasetPrompts


SENTIMENT_CHAT_PROMPT = 'Continue this movie review in one sentence: "{start}"'
"""The sentiment task's built-in prompts with task.chat_template (a user turn to an instruct model)."""

ARITHMETIC_CHAT_EXAMPLE = (
    "Question: Sam has 7 apples. A friend gave Sam 5 more. How many apples does Sam have now?\nAnswer:",
    "7 + 5 = 12. The answer is 12.",
)
"""The arithmetic task's one-shot example with task.chat_template: a user turn in the task's prompt
format and the assistant's worked answer, ending in the number the reward reads (the last one)."""

CHAT_EXAMPLES: dict[str, tuple[tuple[str, str], ...]] = {"arithmetic": (ARITHMETIC_CHAT_EXAMPLE,)}
"""Task name -> example (user, assistant) turns put before every prompt when it is rendered as chat."""


def user_prompts(cfg, seed: int = 0, rank: int = 0, world: int = 1) -> tuple[list[str], list[str], DatasetPrompts | None]:
    """(training prompts, evaluation prompts, stream) from task.dataset (a stream; evaluation = its
    first rows, held out) or task.prompt_file (evaluation = its first prompts)."""
    if cfg.dataset:
        stream = DatasetPrompts(cfg.dataset, cfg.split, cfg.prompt_column, cfg.answer_column, cfg.num_eval_prompts, seed, rank, world)
        return [], stream.eval_prompts, stream
    prompts = load_prompt_file(cfg.prompt_file, cfg.prompt_column)
    return prompts, prompts[: cfg.num_eval_prompts], None


def task_reward(cfg, stream: DatasetPrompts | None):
    """task.reward, handed each prompt's answer (task.answer_column) when the data has one."""
    answers = stream.answers if stream is not None and cfg.answer_column else None
    return load_reward(cfg.reward, label=cfg.reward_label, on=cfg.reward_on, timeout=cfg.reward_timeout, answers=answers)


def sentiment_task(cfg, **order) -> PromptTask:
    """Continue a movie review; the reward is the sentiment classifier's positive logit.

    Built-in prompts are the first 2-8 words of synthetic reviews held out from the pretraining
    corpus of `cory:tiny-reviews`; the evaluation set is a disjoint fixed draw. task.prompt_file or
    task.dataset replace them.
    """
    stream = None
    if cfg.prompt_file or cfg.dataset:
        train, evals, stream = user_prompts(cfg, **order)
    else:
        pool = reviews.prompts(cfg.num_train_prompts + cfg.num_eval_prompts, seed=2024)
        if getattr(cfg, "chat_template", False):
            # A chat model answers a bare review opening as a message; ask for the continuation.
            pool = [SENTIMENT_CHAT_PROMPT.format(start=p) for p in pool]
        evals, train = pool[: cfg.num_eval_prompts], pool[cfg.num_eval_prompts :]
    return PromptTask("sentiment", train, evals, task_reward(cfg, stream), stream)


def prompts_task(cfg, **order) -> PromptTask:
    """A user's prompts (`task.prompt_file` or `task.dataset`) with any reward (`task.reward`)."""
    if not (cfg.prompt_file or cfg.dataset):
        raise ValueError("task 'prompts' needs task.prompt_file or task.dataset")
    train, evals, stream = user_prompts(cfg, **order)
    return PromptTask("prompts", train, evals, task_reward(cfg, stream), stream)


def arithmetic_task(cfg, **order) -> PromptTask:
    """Synthetic word problems (the offline GSM8K); reward 1 if the response's last number is right.

    Prompts are held out from `cory:tiny-arith`'s pretraining problems. `task.reward` is ignored.
    """
    seen = {p for p, _, _ in arithmetic.generate(arithmetic.PRETRAIN_SIZE, arithmetic.PRETRAIN_SEED)}
    pool = arithmetic.heldout(cfg.num_train_prompts + cfg.num_eval_prompts, exclude=seen)
    truth = dict(pool)

    def reward(prompts: list[str], responses: list[str]) -> list[float]:
        return [float(arithmetic.is_correct(r, truth[p])) for p, r in zip(prompts, responses)]

    prompts = [p for p, _ in pool]
    return PromptTask("arithmetic", prompts[cfg.num_eval_prompts :], prompts[: cfg.num_eval_prompts], reward)


TASKS: dict[str, Callable] = {"sentiment": sentiment_task, "arithmetic": arithmetic_task, "prompts": prompts_task}
BUILTIN_REWARD = {"arithmetic"}
"""Tasks that score responses themselves and ignore `task.reward`."""


def make_task(cfg, seed: int = 0, rank: int = 0, world: int = 1) -> PromptTask:
    """The task of a TaskConfig. seed, rank, world: the order a dataset's training rows are read in
    (train.seed) and this process's share of them."""
    if cfg.name not in TASKS:
        raise ValueError(f"unknown task '{cfg.name}'; tasks: {', '.join(sorted(TASKS))}")
    return TASKS[cfg.name](cfg, seed=seed, rank=rank, world=world)
