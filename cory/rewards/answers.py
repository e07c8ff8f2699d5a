"""Rewards that check a response against a reference answer (task.answer_column): `module:function`
rewards of the form `fn(prompts, responses, answers)`, for verifiable tasks."""

from __future__ import annotations

from cory.corpora.arithmetic import last_number


def last_number_matches(prompts: list[str], responses: list[str], answers: list) -> list[float]:
    """1 where the last number in the response equals the answer (a number, or text holding one), else 0:
    `task.reward=cory.rewards.answers:last_number_matches`."""
    out = []
    for response, answer in zip(responses, answers):
        got, truth = last_number(response), last_number(str(answer))
        out.append(float(got is not None and truth is not None and got == truth))
    return out
