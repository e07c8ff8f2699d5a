"""Synthetic arithmetic word problems: the offline analogue of GSM8K.

Each problem is a short story with one or two operations on small whole numbers, a question, and a
worked answer that shows each step and ends with "The answer is N."::

    Question: Ana has 7 apples. Ana gets 5 more apples. How many apples does Ana have now?
    Answer: 7 + 5 = 12. The answer is 12.

The reward of the arithmetic task is 1 when the last number in a response equals the truth.

Problems come in four kinds, drawn with fixed weights (``KIND_WEIGHTS``): one addition, one
subtraction, one multiplication, and two steps (two of those chained). Each problem is easy or hard
(``EASY_SHARE`` per kind). Easy ones use numbers of 2..5 (and a subtraction from 7..11): a table of
a few dozen facts that the zoo's small models learn within their build. Hard ones use two-digit
numbers with carries and borrows, multiplications up to 9 x 25, and two steps chained: the small
models mostly do not learn them. So a pretrained model starts partly right (the zoo's arithmetic
models at 25-35%), and RL has room to improve it. Additions and subtractions are easy more often
than multiplications and two-step problems, as in a grade-school workbook.

Seed streams
------------
``generate(n, seed)`` draws problems one after another from ``random.Random(seed)``, so a shorter
draw is a prefix of a longer one. The zoo pretrains on ``generate(n, PRETRAIN_SEED)`` with
``n <= PRETRAIN_SIZE``. ``heldout(n)`` draws from ``HELDOUT_SEED`` (or another seed) and drops every
problem whose prompt occurs in ``generate(PRETRAIN_SIZE, PRETRAIN_SEED)``.
"""

from __future__ import annotations

import functools
import random
import re
from typing import NamedTuple

# Bump when the problems change: it is part of every zoo recipe hash, so cached models rebuild.
CORPUS_VERSION = 2
PRETRAIN_SEED = 11
PRETRAIN_SIZE = 20000
HELDOUT_SEED = 977

KINDS = ("add", "sub", "mul", "two")
# How often each kind is drawn: one-step problems dominate, as in a grade-school workbook.
KIND_WEIGHTS = {"add": 4, "sub": 3, "mul": 2, "two": 2}
# The share of easy problems per kind (0.46 overall). Measured: a small model learns the easy facts
# after seeing ~2500 easy problems, so a smaller share would not be learned within a micro build.
EASY_SHARE = {"add": 0.55, "sub": 0.55, "mul": 0.35, "two": 0.25}
# The largest operand of an easy problem. With 2..9 (~200 facts) the micro model learned under a
# quarter of the easy problems in its build; with 2..5 (~50 facts) about three quarters.
EASY_MAX = 5

NAMES = ["Ana", "Ben", "Carla", "Dev", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jun", "Kofi", "Lena", "Marco",
         "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Vik", "Wen", "Yara", "Zoe"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "coins", "shells", "cards",
         "flowers", "tickets", "buttons", "crayons", "eggs", "balloons", "candles", "pebbles"]
# Containers for multiplication stories, as (singular, plural).
CONTAINERS = [("bag", "bags"), ("box", "boxes"), ("jar", "jars"), ("basket", "baskets"), ("pack", "packs"),
              ("row", "rows"), ("shelf", "shelves"), ("tray", "trays")]

# Templates. {a}, {b}, {c} are the operands in the order the worked answer uses them.
_ADD = [
    "{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?",
    "{name} picked {a} {item} in the morning and {b} {item} in the afternoon. How many {item} did {name} pick in all?",
    "There are {a} {item} in a box and {b} {item} on the table. How many {item} are there altogether?",
    "{name} found {a} {item} on Monday and {b} {item} on Tuesday. How many {item} did {name} find?",
    "{name} had {a} {item}. A friend gave {name} {b} more. How many {item} does {name} have now?",
    "A class collected {a} {item} last week and {b} {item} this week. How many {item} did the class collect?",
]
_SUB = [
    "{name} has {a} {item}. {name} gives away {b} {item}. How many {item} does {name} have left?",
    "A shop had {a} {item} and sold {b} of them. How many {item} are left?",
    "{name} had {a} {item} and lost {b} of them. How many {item} does {name} have now?",
    "There were {a} {item} in a jar. {name} took out {b}. How many {item} are still in the jar?",
    "{name} needs {a} {item} and already has {b}. How many more {item} does {name} need?",
]
_MUL = [
    "{name} has {a} {boxes} with {b} {item} in each {box}. How many {item} does {name} have?",
    "{name} buys {a} {boxes} of {item}. Each {box} holds {b} {item}. How many {item} does {name} buy?",
    "Each of {a} children brings {b} {item}. How many {item} do the children bring in all?",
    "There are {a} {boxes} with {b} {item} in every {box}. How many {item} are there?",
]
# Two steps, by the pair of operations; the worked answer does the first, then the second.
_TWO = {
    ("+", "-"): [
        "{name} has {a} {item}, buys {b} more, then gives {c} to a friend. How many {item} does {name} have now?",
        "A shop had {a} {item}. It got {b} more and then sold {c}. How many {item} does the shop have now?",
    ],
    ("-", "+"): [
        "{name} had {a} {item} and gave away {b}. Then {name} found {c} more. How many {item} does {name} have now?",
    ],
    ("+", "+"): [
        "{name} has {a} {item}. {name} gets {b} on Monday and {c} on Tuesday. How many {item} does {name} have now?",
    ],
    ("*", "+"): [
        "{name} has {a} {boxes} with {b} {item} in each {box} and {c} loose {item}. How many {item} does {name} have in all?",
    ],
}


class Problem(NamedTuple):
    prompt: str
    """``Question: ...\\nAnswer:``, what a policy is given."""
    answer: str
    """The worked answer that follows the prompt (starts with a space)."""
    truth: int
    kind: str
    """One of KINDS."""
    easy: bool
    """Drawn with small numbers (see EASY_MAX)."""


def _operand(rng: random.Random, easy: bool, high: int = 99) -> int:
    """A small number (2..EASY_MAX) for an easy problem, else a two-digit one (10..``high``)."""
    return rng.randint(2, EASY_MAX) if easy else rng.randint(10, high)


def _step(a: int, op: str, b: int) -> tuple[str, int]:
    """The worked line ``a op b = r.`` and its result."""
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"{a} {op} {b} = {result}.", result


def _operands(rng: random.Random, op: str, easy: bool) -> tuple[int, int]:
    """Two operands for one ``op`` step; every result is at least 2 (a count of plural items)."""
    if op == "+":
        return _operand(rng, easy), _operand(rng, easy, high=60)
    if op == "-":
        # Easy: a small number taken from one just above it; hard: borrowing across tens.
        a = rng.randint(EASY_MAX + 2, 2 * EASY_MAX + 1) if easy else rng.randint(20, 99)
        return a, (rng.randint(2, EASY_MAX) if easy else rng.randint(2, a - 2))
    # Easy: the small times table; hard: a one-digit number times a two-digit one.
    return rng.randint(2, EASY_MAX if easy else 9), (rng.randint(2, EASY_MAX) if easy else rng.randint(11, 25))


def _one_step(rng: random.Random, kind: str, easy: bool) -> tuple[str, list[str], int, tuple[int, ...]]:
    """(question template, worked lines, truth, operands) of a one-operation problem."""
    op, templates = {"add": ("+", _ADD), "sub": ("-", _SUB), "mul": ("*", _MUL)}[kind]
    a, b = _operands(rng, op, easy)
    line, truth = _step(a, op, b)
    return rng.choice(templates), [line], truth, (a, b)


def _two_step(rng: random.Random, easy: bool) -> tuple[str, list[str], int, tuple[int, ...]]:
    """(question template, worked lines, truth, operands) of a problem whose second step works on
    the first step's result."""
    first, second = rng.choice(list(_TWO))
    a, b = _operands(rng, first, easy)
    line1, middle = _step(a, first, b)
    if second == "-":
        c = rng.randint(2, min(EASY_MAX, middle - 2)) if easy else rng.randint(2, middle - 2)
    else:
        c = _operand(rng, easy, high=40)
    line2, truth = _step(middle, second, c)
    return rng.choice(_TWO[(first, second)]), [line1, line2], truth, (a, b, c)


def _draw(rng: random.Random) -> Problem:
    """One problem from the stream of ``rng``."""
    kind = rng.choices(KINDS, weights=[KIND_WEIGHTS[k] for k in KINDS])[0]
    easy = rng.random() < EASY_SHARE[kind]
    if kind == "two":
        template, lines, truth, operands = _two_step(rng, easy)
    else:
        template, lines, truth, operands = _one_step(rng, kind, easy)
    box, boxes = rng.choice(CONTAINERS)
    slots = dict(zip("abc", operands), name=rng.choice(NAMES), item=rng.choice(ITEMS), box=box, boxes=boxes)
    answer = " " + " ".join(lines) + f" The answer is {truth}."
    return Problem(prompt_of(template.format(**slots)), answer, truth, kind, easy)


def prompt_of(question: str) -> str:
    """The prompt a policy is given for ``question``."""
    return f"Question: {question}\nAnswer:"


def problems(n: int, seed: int = PRETRAIN_SEED) -> list[Problem]:
    """``n`` problems from the stream of ``seed``; a prefix of any longer draw."""
    if seed == PRETRAIN_SEED and n <= PRETRAIN_SIZE:
        return list(_pretrain_stream()[:n])  # drawn once per process
    rng = random.Random(seed)
    return [_draw(rng) for _ in range(n)]


def generate(n: int, seed: int = PRETRAIN_SEED) -> list[tuple[str, str, int]]:
    """``n`` problems as (prompt, worked answer, truth); deterministic for a seed."""
    return [(p.prompt, p.answer, p.truth) for p in problems(n, seed)]


def pretraining_texts(n: int, seed: int = PRETRAIN_SEED) -> list[str]:
    """Prompt and worked answer of each of ``problems(n, seed)``, as one text."""
    return [p.prompt + p.answer for p in problems(n, seed)]


@functools.lru_cache(maxsize=1)
def _pretrain_stream() -> tuple[Problem, ...]:
    rng = random.Random(PRETRAIN_SEED)
    return tuple(_draw(rng) for _ in range(PRETRAIN_SIZE))


@functools.lru_cache(maxsize=1)
def pretraining_prompts() -> frozenset[str]:
    """The prompts of ``generate(PRETRAIN_SIZE, PRETRAIN_SEED)``: what held-out problems avoid."""
    return frozenset(p.prompt for p in _pretrain_stream())


def heldout_problems(n: int, seed: int = HELDOUT_SEED, exclude: set[str] | frozenset[str] | None = None) -> list[Problem]:
    """``n`` problems from the stream of ``seed``, skipping prompts in ``exclude`` (by default every
    pretraining prompt)."""
    exclude = pretraining_prompts() if exclude is None else exclude
    rng = random.Random(seed)
    out: list[Problem] = []
    while len(out) < n:
        problem = _draw(rng)
        if problem.prompt not in exclude:
            out.append(problem)
    return out


def heldout(n: int, exclude: set[str] | None = None, seed: int = HELDOUT_SEED) -> list[tuple[str, int]]:
    """``n`` (prompt, truth) problems held out from pretraining (see ``heldout_problems``)."""
    return [(p.prompt, p.truth) for p in heldout_problems(n, seed, exclude)]


def heldout_texts(n: int, seed: int = HELDOUT_SEED) -> list[str]:
    """Prompt and worked answer of ``n`` held-out problems: the zoo's held-out loss."""
    return [p.prompt + p.answer for p in heldout_problems(n, seed)]


# A number: an optional minus, digits (commas only as thousands separators), optional decimals. A
# period with no digit after it ends a sentence ("The answer is 8.").
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The last number in ``text``: "1,200" is 1200, while "3,4" is the two numbers 3 and 4."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def is_correct(response: str, truth: int) -> bool:
    """Whether the last number in ``response`` equals ``truth``."""
    value = last_number(response)
    return value is not None and abs(value - truth) < 1e-9
