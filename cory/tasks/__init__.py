"""Single-turn tasks: a prompt source and a reward, served to the Sampler as one-turn episodes."""

from cory.tasks.base import PromptTask, TaskEnv, load_prompt_file
from cory.tasks.registry import BUILTIN_REWARD, TASKS, make_task

__all__ = ["PromptTask", "TaskEnv", "load_prompt_file", "TASKS", "BUILTIN_REWARD", "make_task"]
