"""Reading JSONL files that users give (prompts, preference pairs): every problem is one line
naming the file and the line."""

from __future__ import annotations

import json
from pathlib import Path


def jsonl_rows(path: Path, error: type[Exception], required: tuple[str, ...], what: str = "file"):
    """Yields (line number, object) from a JSONL file, each checked to be an object with `required`
    keys; problems raise `error` with one line naming the file and line."""
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{n}: not valid JSON ({e.msg})") from None
            missing = [k for k in required if not isinstance(row, dict) or k not in row]
            if missing:
                raise error(f"{path}:{n}: missing key(s) {', '.join(missing)}")
            yield n, row
