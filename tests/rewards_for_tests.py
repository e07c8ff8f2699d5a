"""Deterministic rewards for tests (importable as `rewards_for_tests:NAME` with tests/ on sys.path)."""


def letter_count(prompts, responses):
    """Number of letter 'e' in each response: cheap, deterministic, easy to check by hand."""
    return [float(r.count("e")) for r in responses]


def huge(prompts, responses):
    """Finite rewards so large (about 1e30) that the policy gradient overflows."""
    return [1e30 * (1 + len(r) % 3) for r in responses]


def raises(prompts, responses):
    raise KeyError("label")


def returns_none(prompts, responses):
    return None


def returns_strings(prompts, responses):
    return ["good"] * len(responses)


def returns_2d(prompts, responses):
    import numpy as np

    return np.ones((len(responses), 2))


def wrong_length(prompts, responses):
    return [1.0]


def returns_nan(prompts, responses):
    return [float("nan")] * len(responses)


def never_returns(prompts, responses):
    import threading

    threading.Event().wait()


def answer_in_response(prompts, responses, answers):
    """1 where the response holds the prompt's reference answer (task.answer_column), else 0."""
    return [float(str(a) in r) for r, a in zip(responses, answers)]


ANSWERS_SEEN: list = []
"""What `record_answers` was handed, for tests that check what a reward receives."""


def record_answers(prompts, responses, answers):
    ANSWERS_SEEN.append(list(zip(prompts, answers)))
    return [0.0] * len(responses)
