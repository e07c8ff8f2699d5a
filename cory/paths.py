"""Paths that users name (models, rewards, prompt files): existence checks that answer False, not
an OSError, for a name the operating system cannot even look up (longer than the file system's
name limit, or holding a NUL byte), so that such input gets the one-line error for a missing path."""

from __future__ import annotations

import os


def is_dir(path: str | os.PathLike) -> bool:
    try:
        return os.path.isdir(path)
    except (OSError, ValueError):
        return False


def is_file(path: str | os.PathLike) -> bool:
    try:
        return os.path.isfile(path)
    except (OSError, ValueError):
        return False


def shown(name: str, limit: int = 120) -> str:
    """A name a user gave, as one short line for a message: a long one is cut, its length said."""
    return name if len(name) <= limit else f"{name[: limit // 2]}... ({len(name)} characters)"
