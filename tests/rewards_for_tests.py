"""Deterministic rewards for tests (importable as `rewards_for_tests:NAME` with tests/ on sys.path)."""


def letter_count(prompts, responses):
    """Number of letter 'e' in each response: cheap, deterministic, easy to check by hand."""
    return [float(r.count("e")) for r in responses]


def huge(prompts, responses):
    """Finite rewards so large (about 1e30) that the policy gradient overflows."""
    return [1e30 * (1 + len(r) % 3) for r in responses]
