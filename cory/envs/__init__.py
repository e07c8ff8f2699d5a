"""Text decision-making environments (gymnasium), registered on import:

    import cory.envs, gymnasium
    env = gymnasium.make("cory/Bandit-v0", n_arms=10, sigma=1.0)

Ids: cory/Bandit-v0, cory/ContextualBandit-v0, cory/TicTacToe-v0, cory/TeacherStudent-v0 (a
conversation with a frozen student model). Observations are prompts, actions are response texts;
`GymTextEnvBatch` drives many of them for the Sampler.
"""

from __future__ import annotations

import gymnasium

from cory.envs.bandit import BanditEnv
from cory.envs.base import AgentView, TextDecisionEnv
from cory.envs.contextual import ContextualBanditEnv
from cory.envs.parsing import format_action, parse_action
from cory.envs.prompts import PromptOptions
from cory.envs.records import EpisodeRecord
from cory.envs.tictactoe import TicTacToeEnv

ENV_IDS = {
    "cory/Bandit-v0": "cory.envs.bandit:BanditEnv",
    "cory/ContextualBandit-v0": "cory.envs.contextual:ContextualBanditEnv",
    "cory/TicTacToe-v0": "cory.envs.tictactoe:TicTacToeEnv",
    # Loads language models and a reward, so it lives a layer above them: gymnasium imports it when one is made.
    "cory/TeacherStudent-v0": "cory.teacher_student:TeacherStudentEnv",
}
"""The cory text environments: gymnasium id -> entry point (the config's allowed env.id values)."""

for _id, _entry in ENV_IDS.items():
    if _id not in gymnasium.registry:
        # No max_episode_steps: each environment ends its own episodes (horizon, game over).
        gymnasium.register(id=_id, entry_point=_entry)

from cory.envs.batch import GymTextEnvBatch  # noqa: E402  (makes environments by the ids registered above)

__all__ = [
    "AgentView", "BanditEnv", "ContextualBanditEnv", "EpisodeRecord", "GymTextEnvBatch", "PromptOptions",
    "TextDecisionEnv", "TicTacToeEnv", "ENV_IDS", "format_action", "parse_action",
]
