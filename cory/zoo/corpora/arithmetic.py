"""Synthetic arithmetic word problems: the offline analogue of GSM8K.

Each problem is a short story with one or two operations on small numbers, a question, and a
worked answer that ends with "The answer is N." The reward of the arithmetic task is 1 when the last
number in a response equals the truth. Problems for pretraining and for the task come from disjoint
seed streams, and held-out problems whose text appears in the pretraining sample are dropped.
"""

from __future__ import annotations

import random
import re

PRETRAIN_SEED = 11
PRETRAIN_SIZE = 20000
HELDOUT_SEED = 977

NAMES = ["Ana", "Ben", "Carla", "Dev", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jun", "Kofi", "Lena", "Marco",
         "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Vik", "Wen", "Yara", "Zoe"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "coins", "shells", "cards",
         "flowers", "tickets", "buttons", "crayons", "eggs", "balloons", "candles", "pebbles"]

_ADD = [
    "{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?",
    "{name} picked {a} {item} in the morning and {b} {item} in the afternoon. How many {item} did {name} pick in all?",
    "There are {a} {item} in a box and {b} {item} on the table. How many {item} are there altogether?",
]
_SUB = [
    "{name} has {a} {item}. {name} gives away {b} {item}. How many {item} does {name} have left?",
    "A shop had {a} {item} and sold {b} of them. How many {item} are left?",
]
_MUL = [
    "{name} has {a} bags with {b} {item} in each bag. How many {item} does {name} have?",
    "There are {a} rows of {item} with {b} {item} in each row. How many {item} are there?",
]
_TWO = [
    "{name} has {a} {item}, buys {b} more, then gives {c} to a friend. How many {item} does {name} have now?",
]


def _one(rng: random.Random) -> tuple[str, str, int]:
    """(question, worked answer, truth)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.choices(["add", "sub", "mul", "two"], weights=[4, 3, 2, 2])[0]
    if kind == "add":
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        q, work, truth = rng.choice(_ADD), f"{a} + {b} = {a + b}.", a + b
    elif kind == "sub":
        a = rng.randint(10, 90)
        b = rng.randint(1, a - 1)
        q, work, truth = rng.choice(_SUB), f"{a} - {b} = {a - b}.", a - b
    elif kind == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        q, work, truth = rng.choice(_MUL), f"{a} * {b} = {a * b}.", a * b
    else:
        a, b = rng.randint(5, 40), rng.randint(2, 30)
        c = rng.randint(1, a + b - 1)
        q, work, truth = rng.choice(_TWO), f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}.", a + b - c
        return q.format(name=name, item=item, a=a, b=b, c=c), f" {work} The answer is {truth}.", truth
    return q.format(name=name, item=item, a=a, b=b), f" {work} The answer is {truth}.", truth


def prompt_of(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def generate(n: int, seed: int = PRETRAIN_SEED) -> list[tuple[str, str, int]]:
    """n problems as (prompt, worked answer, truth); deterministic for a seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q, a, t = _one(rng)
        out.append((prompt_of(q), a, t))
    return out


def pretraining_texts(n: int, seed: int = PRETRAIN_SEED) -> list[str]:
    return [p + a for p, a, _ in generate(n, seed)]


def heldout(n: int, exclude: set[str] | None = None, seed: int = HELDOUT_SEED) -> list[tuple[str, int]]:
    """n (prompt, truth) problems from a separate seed stream, skipping prompts in `exclude`."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        q, _, t = _one(rng)
        p = prompt_of(q)
        if exclude is None or p not in exclude:
            out.append((p, t))
    return out


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def is_correct(response: str, truth: int) -> bool:
    value = last_number(response)
    return value is not None and abs(value - truth) < 1e-9
