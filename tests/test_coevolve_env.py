"""CORY's pioneer/observer environment, the per-agent split of its rollout, and per-turn controls."""

import numpy as np
import torch

from cory.coevolve import own_turn
from cory.tasks.pioneer_observer import PioneerObserverEnv
from cory.drift.control import ControlOutput, EachTurnAnEpisode
from cory.generation.sampling import Generation
from cory.rollout import Turn, concat_turns
from cory.tasks.base import PromptTask


def letter_task() -> PromptTask:
    return PromptTask("letters", ["A", "B", "C"], ["A"], lambda prompts, responses: [float(r.count("e")) for r in responses])


def test_two_turns_pioneer_then_observer_with_both_scores_on_the_original_prompt():
    env = PioneerObserverEnv(letter_task(), "<{prompt}|{reference}>")
    first = env.reset(2, np.random.default_rng(0), group_size=2)
    expected = [p for p in letter_task().sample_prompts(2, np.random.default_rng(0)) for _ in range(2)]
    assert first == expected  # the same draw from the run's generator as a single-agent task
    obs, rewards, dones, _ = env.step(["e", "ee", "", "eee"])
    assert obs == [f"<{p}|{r}>" for p, r in zip(expected, ["e", "ee", "", "eee"])]
    assert rewards == [0.0] * 4 and dones == [False] * 4 and env.task_scores is None
    _, rewards, dones, _ = env.step(["eeee", "", "e", "e"])
    assert env.task_scores == ([1.0, 2.0, 0.0, 3.0], [4.0, 0.0, 1.0, 1.0])
    assert rewards == [4.0, 0.0, 1.0, 1.0] and dones == [True] * 4
    assert env.reset(1, np.random.default_rng(1)) and env.task_scores is None and env.pioneer_texts is None


def part(query_rows, response_rows, turn, control=None) -> Turn:
    """One Sampler step with given token rows (pad id 0)."""
    lq, lr = max(map(len, query_rows)), max(map(len, response_rows))
    q = torch.tensor([[0] * (lq - len(r)) + r for r in query_rows])
    r = torch.tensor([row + [0] * (lr - len(row)) for row in response_rows])
    n = len(query_rows)
    gen = Generation(q, (q > 0).long(), r, (r > 0).long(), -(r > 0).float(), torch.ones(n, dtype=torch.bool), ["r"] * n)
    return Turn(gen, ["p"] * n, [0.0] * n, [bool(turn)] * n, [{}] * n, list(range(n)), turn, 1, control)


def test_each_agent_gets_its_own_rows_without_the_other_agents_padding():
    pioneer = part([[5, 6], [7]], [[1], [2, 3]], 0, ControlOutput(torch.tensor([[1.0, 0.0], [0.5, 0.25]]), torch.zeros(2, 2)))
    observer = part([[5, 6, 8, 9], [7, 8, 9]], [[4, 4, 4], [4]], 1, ControlOutput(torch.ones(2, 3), torch.zeros(2, 3)))
    rollout = concat_turns([pioneer, observer], pad_id=0)
    assert rollout.query_ids.shape == (4, 4) and rollout.response_ids.shape == (4, 3)
    mine = own_turn(rollout, 0, [3.0, 4.0])
    assert torch.equal(mine.query_ids, pioneer.generation.query_ids)
    assert torch.equal(mine.response_ids, pioneer.generation.response_ids)
    assert torch.equal(mine.control.mix_weight, torch.tensor([[1.0, 0.0], [0.5, 0.25]]))
    assert mine.scores.tolist() == [3.0, 4.0] and mine.done.all() and (mine.turn_index == 0).all()
    theirs = own_turn(rollout, 1, [1.0, 2.0])
    assert torch.equal(theirs.query_ids, observer.generation.query_ids)
    assert torch.equal(theirs.response_mask, observer.generation.response_mask)
    assert theirs.episode_ids.tolist() == [0, 1] and theirs.turn_index.tolist() == [0, 0]


def test_each_turn_an_episode_resets_the_control_before_every_turn():
    class Counting:
        def __init__(self):
            self.resets = []

        def reset(self, n):
            self.resets.append(n)

        def hook(self, live):
            return len(self.resets)

    inner = Counting()
    control = EachTurnAnEpisode(inner)
    control.reset(6)
    assert inner.resets == []
    assert control.hook([0, 1]) == 1 and control.hook([0, 1]) == 2
    assert inner.resets == [6, 6]
