"""Reading the model's action out of its response text.

The model is asked to end with `ACTION=X`. Real responses repeat the format string while thinking
("... in the format ACTION=X ..."), wrap the answer in markdown or quotes, change case, or use
full-width unicode, so the parser normalises the text first and takes the LAST `ACTION=` it finds:
the final answer comes after the reasoning. Whatever follows that last `ACTION=` must name one of
the environment's action labels; anything else (an unknown arm, an out-of-range index, `X`) is an
invalid action, and the environment decides what an invalid action costs.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

# `ACTION` not glued to a preceding letter or digit (so "REACTION=3" is not an action), optional
# spaces around "=", optional opening quotes/brackets/markdown, then the token up to whitespace or a
# closing delimiter.
_OPENERS = "\"'`\u2018\u201c([{<*_"
_STOPS = "\\s\"'`\u2019\u201d)\\]}>*,;:!?|<"
_ACTION_RE = re.compile(
    rf"(?<![A-Za-z0-9])ACTION\s*=\s*[{re.escape(_OPENERS)}\s]*([^{_STOPS}]+)",
    re.IGNORECASE,
)


def _normalise(text: str) -> str:
    if text.isascii():
        return text  # NFKC is the identity on ASCII, and ASCII has no format characters
    # NFKC folds full-width letters/digits and compatibility forms ("ＡＣＴＩＯＮ＝３") to ASCII;
    # invisible format characters (zero-width spaces, BOMs) would otherwise glue onto the token.
    text = unicodedata.normalize("NFKC", text)
    return "".join(ch for ch in text if unicodedata.category(ch) != "Cf")


def action_tokens(text: str) -> list[str]:
    """Every `ACTION=` token in `text`, in order of appearance, trailing full stops removed."""
    if not isinstance(text, str):
        return []
    return [m.group(1).rstrip(".") for m in _ACTION_RE.finditer(_normalise(text))]


def match_label(token: str, labels: Sequence[str]) -> int | None:
    """The index of the label `token` names (case-insensitive; "03" names "3"), else None."""
    key = token.strip().casefold()
    if not key:
        return None
    for i, label in enumerate(labels):
        if key == label.casefold():
            return i
    if key.isascii() and key.isdigit():
        for i, label in enumerate(labels):
            if label.isdigit() and int(key) == int(label):
                return i
    return None


def parse_action(text: str, labels: Sequence[str]) -> int | None:
    """The index into `labels` chosen by the LAST `ACTION=X` in `text`; None when there is none or
    when that last X names no label (an earlier valid match does not rescue it)."""
    tokens = action_tokens(text)
    if not tokens:
        return None
    return match_label(tokens[-1], labels)


def format_action(label: str) -> str:
    """The response text that selects `label` (what a classical agent 'says' to a text env)."""
    return f"ACTION={label}"
