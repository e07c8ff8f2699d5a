"""The two ways cory stops: a user's mistake (UsageError) and a run that cannot go on (RunError);
and `warn`, for what a user should know but need not stop for.

The CLI prints either in one line on stderr: exit status 2 for a UsageError (bad input: found before
any work starts, nothing written), 1 for a RunError (the last complete checkpoint stays).
"""

import sys


class UsageError(ValueError):
    """An expected user mistake (a config key or value, a file, a model, an output directory, a reward
    function), checked before any work starts wherever it can be; its message is one line. Its kinds
    name what was wrong: `UnknownModelError`, `RewardError`, `TaskDataError` (prompt files) and
    `PairDataError` (preference files)."""


class RunError(RuntimeError):
    """A run that cannot go on (non-finite weights, a full disk); its message is one line."""


def warn(message: str) -> None:
    """One line on stderr, prefixed like every cory message."""
    print(f"cory: warning: {message}", file=sys.stderr)
