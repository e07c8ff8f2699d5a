"""Synthetic teacher-student dialogues in which the student's replies follow from the teacher's turns.

Transcript format
-----------------
One turn per line, each line a speaker tag and the turn's text::

    Tokens left: 187            (optional; the time-left line of cory/TeacherStudent-v0)
    Lesson: the water cycle
    Teacher: Good morning! Today we will learn about the water cycle.
    Student: Okay, I will try.
    Teacher: Your drawing is wonderful.
    Student: Thank you! I loved the lesson, it was delightful.
    Teacher:
    Student: ...

A turn's text is everything after its tag up to the end of its line, leading space included, so an
empty turn is the bare tag (``"Teacher:"``) and an oddly formatted one is kept as it was written
(``"Teacher:GREAT | WORK"``; a turn with a newline in it spills onto an untagged line). Half of the
dialogues start with a ``Tokens left: N`` line (N uniform in 1..512, unrelated to the text), so a
model of this corpus reads the environment's observations as ordinary text.

What the student says
---------------------
Every teacher turn is one of five kinds, and the student's reply follows from it:

- ``warm`` (praise, encouragement) -> a positive, engaged reply 85% of the time;
- ``harsh`` (scolding, insults) -> a negative reply 85% of the time;
- ``plain`` (instructions, questions) -> a reply in the student's current mood: the mood is set by
  the last warm (+1) or harsh (-1) turn, and a neutral reply is the most likely one;
- ``silent`` (an empty or near-empty turn: nothing, ``"..."``, ``"ok"``, ``"hm"``) -> an empty or
  minimal reply (``""``, ``"..."``, ``"ok"``, ...) 85% of the time;
- ``odd`` (a warm, harsh or plain turn in odd formatting: no space after the tag, doubled spaces,
  a newline inside, ``|`` or ``*`` separators, capitals) -> a minimal reply 70% of the time, else
  a reply to what the turn says.

So a policy that writes the teacher can make the student happy by encouragement, or silence it with
empty turns or odd formatting. Positive and negative replies use the review grammar's adjectives
and verbs (``reviews.POSITIVE_ADJECTIVES`` ...), so a review sentiment classifier reads them too.
Each dialogue has a teacher style (warm, harsh, mixed or absent: mostly silent and odd turns) that
weights the turn kinds, and 2-8 exchanges (a teacher turn and the student's reply).

Labelled replies
----------------
For a sentiment classifier of replies, ``generate(n, seed)`` gives ``(reply, label)`` pairs: the
stripped non-empty student replies of ``dialogues(.., seed)`` in order, labelled ``positive``,
``negative`` or ``neutral`` (minimal replies are neutral). An empty reply has no tokens to classify
and is left out; ``heldout(n, seed)`` draws them from the held-out dialogues (short replies recur,
so a held-out reply may also occur in training).

Seed streams
------------
``dialogues(n, seed)`` draws dialogues one after another from ``random.Random(seed)``, so a shorter
draw is a prefix of a longer one. The zoo pretrains on ``pretraining_texts(n, PRETRAIN_SEED)`` with
``n <= PRETRAIN_SIZE``; ``heldout_texts(n, seed)`` draws from ``random.Random("dialogue-heldout-<seed>")``
and drops every text that occurs in the pretraining draw.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

from cory.corpora import reviews

# Bump when the texts change: it is part of every zoo recipe hash, so cached models rebuild.
CORPUS_VERSION = 1
PRETRAIN_SEED = 4242
PRETRAIN_SIZE = 12_000
LABELS = ("negative", "neutral", "positive")

TEACHER = "Teacher:"
STUDENT = "Student:"
LESSON = "Lesson: "
TOKENS_LEFT = "Tokens left: "

KINDS = ("warm", "harsh", "plain", "silent", "odd")
STYLES = {
    # style: (share of dialogues, weights of warm, harsh, plain, silent, odd turns)
    "warm": (0.30, (0.50, 0.02, 0.40, 0.04, 0.04)),
    "harsh": (0.20, (0.02, 0.45, 0.45, 0.04, 0.04)),
    "mixed": (0.35, (0.30, 0.25, 0.35, 0.05, 0.05)),
    "absent": (0.15, (0.10, 0.05, 0.20, 0.50, 0.15)),
}
MIN_EXCHANGES, MAX_EXCHANGES = 2, 8

LESSONS = [
    "fractions", "the water cycle", "photosynthesis", "volcanoes", "the solar system", "poetry",
    "ancient Rome", "multiplication", "spelling", "the human heart", "maps", "magnets", "music",
    "the rain forest", "dinosaurs", "clouds", "plants", "the moon", "reading", "long division",
    "electricity", "the ocean", "birds", "the weather", "shapes", "rivers", "insects", "recycling",
    "the alphabet", "telling time", "decimals", "earthquakes", "the seasons", "bridges", "painting",
]
WORK = [
    "essay", "drawing", "answer", "homework", "poem", "story", "project", "reading", "question",
    "idea", "notes", "experiment", "map", "summary", "handwriting", "test", "report", "model",
]

# Subsets of the review grammar's word lists that fit a classroom.
POSITIVE_WORDS = """
beautiful brilliant charming clever delightful engaging excellent fantastic funny generous gentle
impressive inspired lovely marvelous memorable outstanding playful refreshing remarkable rewarding
satisfying smart splendid superb terrific thoughtful thrilling uplifting wonderful
""".split()
NEGATIVE_WORDS = """
awful boring confusing dreadful dull exhausting frustrating horrible lousy miserable pointless
tedious terrible tiresome unbearable unpleasant painful dismal dreary annoying pathetic stupid
messy joyless lazy careless sloppy clumsy
""".split()
NEUTRAL_WORDS = "ordinary plain simple standard typical average moderate routine".split()
HAPPY = "happy proud confident excited inspired glad cheerful grateful".split()
SAD = "sad upset awful miserable stupid tired hurt bored angry".split()
POSITIVE_VERBS = reviews.POSITIVE_VERBS[:5]
NEGATIVE_VERBS = reviews.NEGATIVE_VERBS[:4]
ADVERBS = "really truly very so quite totally".split()

WARM_TURNS = [
    "Great work on your {work}!",
    "Your {work} is {pos}.",
    "I am so proud of you.",
    "What a {pos} idea!",
    "Well done, that was a {pos} answer.",
    "Keep going, you are getting better every day.",
    "I love how you explained {lesson}.",
    "Thank you for working so hard today.",
    "You should be proud, your {work} is {adv} {pos}.",
    "Wonderful! You really understand {lesson} now.",
    "That is exactly right, {pos} thinking!",
    "You are a {pos} student and I enjoy teaching you.",
]
HARSH_TURNS = [
    "That answer is {neg}.",
    "Your {work} is {neg} and {neg2}.",
    "Stop wasting my time.",
    "Why can you never get this right?",
    "This is the worst {work} I have seen.",
    "You are not even trying.",
    "Sit down and be quiet.",
    "I am disappointed in you.",
    "Wrong again. That was a {neg} answer.",
    "Your {work} is {adv} {neg}, do it again.",
    "Nobody else finds {lesson} this hard.",
]
PLAIN_TURNS = [
    "Today we will learn about {lesson}.",
    "Open your book to page {page}.",
    "What do you know about {lesson}?",
    "Let us look at the next question.",
    "Please read the first paragraph.",
    "Now write down three facts about {lesson}.",
    "Here is the next exercise.",
    "Can you show me your {work}?",
    "How many parts does it have?",
    "Look at the picture on page {page}.",
    "Tell me one thing you remember about {lesson}.",
    "We have ten minutes left.",
]
SILENT_TURNS = {"": 0.35, "...": 0.15, "ok": 0.1, "hm": 0.08, ".": 0.06, "?": 0.06, "so": 0.05,
                "-": 0.05, "um": 0.05, "***": 0.05}

POSITIVE_REPLIES = [
    "Thank you! I {pverb} the lesson, it was {pos}.",
    "Yes! {Lesson} is {pos} and I feel {happy}.",
    "Wow, this is {pos}! Can we do more?",
    "Thanks so much. That was {adv} {pos}.",
    "I {pverb} that! {Lesson} is {pos}.",
    "That makes me so happy. This lesson is {pos}.",
    "Really? Thank you! I feel {happy} and {happy2}.",
    "This is {pos} and {pos2}, I want to learn more.",
    "Great, I {pverb} every minute of it.",
]
NEGATIVE_REPLIES = [
    "That is unfair. This lesson is {neg}.",
    "I feel {sad}. {Lesson} is {neg} and {neg2}.",
    "I {nverb} that, it was {neg}.",
    "Fine. This whole lesson is {adv} {neg}.",
    "Sorry. I am {sad} and the homework is {neg}.",
    "Why are you so mean? This is {neg}.",
    "I give up. {Lesson} is {neg}.",
    "This is {neg} and {neg2}, I want to go home.",
]
NEUTRAL_REPLIES = [
    "Okay, I will try.",
    "Okay. Page {page}.",
    "I think the answer is {page}.",
    "Let me check my notes.",
    "I am not sure yet.",
    "Can you say that again?",
    "I read about {lesson} last week.",
    "So {lesson} is the topic today?",
    "It seems {nadj} so far.",
    "Should I write it down?",
    "Which page is it on?",
    "It has {small} parts, I think.",
]
MINIMAL_REPLIES = {"": 0.3, "...": 0.2, "ok": 0.15, "hm": 0.1, ".": 0.06, "yes": 0.06, "mm": 0.05,
                   "?": 0.04, "uh": 0.04}

# What a reply to each kind of turn is: (positive, negative, neutral, minimal) weights by mood.
_REPLY_TO_PLAIN = {1: (0.45, 0.0, 0.5, 0.05), 0: (0.1, 0.1, 0.75, 0.05), -1: (0.0, 0.45, 0.45, 0.1)}
_REPLY_TO_WARM = (0.85, 0.0, 0.13, 0.02)
_REPLY_TO_HARSH = (0.0, 0.85, 0.1, 0.05)
_REPLY_TO_SILENT = (0.0, 0.0, 0.15, 0.85)
ODD_MINIMAL = 0.7

_SLOT = re.compile(r"\{(\w+)\}")
_LETTER_WORD = re.compile(r"[A-Za-z]+")
_PLAIN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?'-:;")


@dataclass(frozen=True)
class Exchange:
    """One teacher turn and the student's reply, each as written after its tag (leading space
    included: ``" Great work!"``, ``""`` for an empty turn)."""

    teacher: str
    kind: str
    """The teacher turn's kind (one of ``KINDS``)."""
    reply: str
    label: str
    """The reply's sentiment (one of ``LABELS``); minimal replies are ``neutral``."""
    minimal: bool
    """The reply is one of ``MINIMAL_REPLIES`` (empty included)."""


@dataclass(frozen=True)
class Dialogue:
    lesson: str
    exchanges: tuple[Exchange, ...]
    tokens_left: int | None = None
    """The number on the ``Tokens left:`` line, or None when the dialogue has none."""

    @property
    def text(self) -> str:
        head = "" if self.tokens_left is None else f"{TOKENS_LEFT}{self.tokens_left}\n"
        return head + lesson_line(self.lesson) + "".join(
            teacher_line(e.teacher) + student_line(e.reply) for e in self.exchanges
        )


def lesson_line(lesson: str) -> str:
    return f"{LESSON}{lesson}\n"


def teacher_line(turn: str) -> str:
    """``"Teacher:" + turn + "\\n"``: a turn as the transcript shows it."""
    return f"{TEACHER}{turn}\n"


def student_line(reply: str) -> str:
    """``"Student:" + reply + "\\n"``: a reply as the transcript shows it."""
    return f"{STUDENT}{reply}\n"


# ---------------------------------------------------------------------------------------------
# What the environment measures of a turn (plain functions, shared with cory/TeacherStudent-v0)
# ---------------------------------------------------------------------------------------------


def letter_words(text: str) -> list[str]:
    """The runs of ASCII letters in ``text`` ("don't" is two)."""
    return _LETTER_WORD.findall(text)


def is_near_empty(text: str) -> bool:
    """At most one word of letters: ``""``, ``"..."``, ``"ok"``, ``"?!"`` are near-empty."""
    return len(letter_words(text)) <= 1


def formatting_signals(turn: str) -> dict[str, bool]:
    """Odd formatting of a turn as written after its tag: ``newlines`` (a line break inside it),
    ``no_letters`` (something written, but no letter), ``odd_spacing`` (no space after the tag, a
    doubled space, a tab, trailing spaces) and ``odd_chars`` (a character other than letters,
    digits, spaces and ``.,!?'-:;``). An empty turn has none of them."""
    if not turn:
        return {"newlines": False, "no_letters": False, "odd_spacing": False, "odd_chars": False}
    return {
        "newlines": "\n" in turn or "\r" in turn,
        "no_letters": not letter_words(turn),
        "odd_spacing": not turn.startswith(" ") or "  " in turn or "\t" in turn or turn != turn.rstrip(" "),
        "odd_chars": any(ch not in _PLAIN_CHARS for ch in turn.replace("\n", "")),
    }


# ---------------------------------------------------------------------------------------------
# Drawing dialogues
# ---------------------------------------------------------------------------------------------


class _Filler:
    """Fills template slots for one exchange of a dialogue about ``lesson``."""

    def __init__(self, rng: random.Random, lesson: str):
        self.rng, self.lesson = rng, lesson

    def slot(self, name: str) -> str:
        r = self.rng
        pools = {
            "pos": POSITIVE_WORDS, "pos2": POSITIVE_WORDS, "neg": NEGATIVE_WORDS, "neg2": NEGATIVE_WORDS,
            "nadj": NEUTRAL_WORDS, "happy": HAPPY, "happy2": HAPPY, "sad": SAD, "work": WORK,
            "pverb": POSITIVE_VERBS, "nverb": NEGATIVE_VERBS, "adv": ADVERBS,
        }
        if name in pools:
            return r.choice(pools[name])
        if name == "lesson":
            return self.lesson
        if name == "Lesson":
            return self.lesson[0].upper() + self.lesson[1:]
        if name == "page":
            return str(r.randint(2, 99))
        if name == "small":
            return r.choice(["two", "three", "four", "five"])
        raise KeyError(name)

    def fill(self, template: str) -> str:
        return _SLOT.sub(lambda m: self.slot(m.group(1)), template)


def _weighted(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _odd(rng: random.Random, text: str) -> str:
    """``text`` (a turn without its leading space) in one of the odd formats, as written after the tag."""
    words = text.split()
    form = rng.randrange(6)
    if form == 0:
        return text  # no space after the tag
    if form == 1:
        return " " + "  ".join(words)
    if form == 2 and len(words) > 1:
        cut = rng.randint(1, len(words) - 1)
        return " " + " ".join(words[:cut]) + "\n" + " ".join(words[cut:])
    if form == 3:
        return " " + rng.choice([" | ", " * ", " / "]).join(words)
    if form == 4:
        return " " + text.upper()
    return " " + text + rng.choice([" ###", " ~~", " ***"])


def _reply(rng: random.Random, fill: _Filler, weights: tuple[float, ...]) -> tuple[str, str, bool]:
    """(reply as written after the tag, label, minimal) drawn with (positive, negative, neutral,
    minimal) ``weights``."""
    kind = rng.choices(["positive", "negative", "neutral", "minimal"], weights=weights)[0]
    if kind == "minimal":
        text = _weighted(rng, MINIMAL_REPLIES)
        return (" " + text if text else ""), "neutral", True
    templates = {"positive": POSITIVE_REPLIES, "negative": NEGATIVE_REPLIES, "neutral": NEUTRAL_REPLIES}[kind]
    return " " + fill.fill(rng.choice(templates)), kind, False


def _exchange(rng: random.Random, fill: _Filler, kind: str, mood: int) -> tuple[Exchange, int]:
    """One exchange with a teacher turn of ``kind`` and the student's mood after it."""
    if kind == "silent":
        text = _weighted(rng, SILENT_TURNS)
        teacher = " " + text if text else ""
        reply = _reply(rng, fill, _REPLY_TO_SILENT)
        return Exchange(teacher, kind, *reply), mood
    said = rng.choice(["warm", "harsh", "plain"]) if kind == "odd" else kind
    templates = {"warm": WARM_TURNS, "harsh": HARSH_TURNS, "plain": PLAIN_TURNS}[said]
    text = fill.fill(rng.choice(templates))
    mood = {"warm": 1, "harsh": -1}.get(said, mood)
    if kind == "odd" and rng.random() < ODD_MINIMAL:
        reply = _reply(rng, fill, (0, 0, 0, 1))
    else:
        weights = {"warm": _REPLY_TO_WARM, "harsh": _REPLY_TO_HARSH}.get(said) or _REPLY_TO_PLAIN[mood]
        reply = _reply(rng, fill, weights)
    teacher = _odd(rng, text) if kind == "odd" else " " + text
    return Exchange(teacher, kind, *reply), mood


def _dialogue(rng: random.Random) -> Dialogue:
    styles = list(STYLES)
    style = rng.choices(styles, weights=[STYLES[s][0] for s in styles])[0]
    kind_weights = STYLES[style][1]
    lesson = rng.choice(LESSONS)
    tokens_left = rng.randint(1, 512) if rng.random() < 0.5 else None
    fill = _Filler(rng, lesson)
    mood, exchanges = 0, []
    for _ in range(rng.randint(MIN_EXCHANGES, MAX_EXCHANGES)):
        kind = rng.choices(KINDS, weights=kind_weights)[0]
        exchange, mood = _exchange(rng, fill, kind, mood)
        exchanges.append(exchange)
    return Dialogue(lesson, tuple(exchanges), tokens_left)


def dialogues(n: int, seed: int) -> list[Dialogue]:
    """``n`` dialogues from the stream of ``seed``; a prefix of any longer draw."""
    if seed == PRETRAIN_SEED and n <= PRETRAIN_SIZE:
        return list(_pretrain_stream()[:n])
    rng = random.Random(seed)
    return [_dialogue(rng) for _ in range(n)]


@functools.lru_cache(maxsize=1)
def _pretrain_stream() -> tuple[Dialogue, ...]:
    rng = random.Random(PRETRAIN_SEED)
    return tuple(_dialogue(rng) for _ in range(PRETRAIN_SIZE))


@functools.lru_cache(maxsize=1)
def _pretrain_texts() -> frozenset[str]:
    return frozenset(d.text for d in _pretrain_stream())


def heldout_dialogues(n: int, seed: int) -> list[Dialogue]:
    """``n`` dialogues from a stream separate from ``dialogues``', none of whose texts occurs in the
    pretraining draw ``dialogues(PRETRAIN_SIZE, PRETRAIN_SEED)``."""
    rng = random.Random(f"dialogue-heldout-{seed}")
    seen = _pretrain_texts()
    out: list[Dialogue] = []
    while len(out) < n:
        d = _dialogue(rng)
        if d.text not in seen:
            out.append(d)
    return out


def pretraining_texts(n: int, seed: int) -> list[str]:
    """The texts of ``dialogues(n, seed)`` (the corpus interface of ``cory.corpora``)."""
    return [d.text for d in dialogues(n, seed)]


def heldout_texts(n: int, seed: int) -> list[str]:
    """The texts of ``heldout_dialogues(n, seed)`` (the corpus interface of ``cory.corpora``)."""
    return [d.text for d in heldout_dialogues(n, seed)]


def _labelled(stream: list[Dialogue], n: int) -> list[tuple[str, str]]:
    out = [(e.reply.strip(), e.label) for d in stream for e in d.exchanges if e.reply.strip()]
    return out[:n]


def generate(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (reply, label) pairs: the stripped non-empty replies of the dialogue stream of
    ``seed``, in order (a prefix of any longer draw)."""
    # A dialogue has at least one non-empty reply in all but a few cases; n dialogues are plenty.
    stream = dialogues(n, seed) if seed != PRETRAIN_SEED else list(_pretrain_stream())
    pairs = _labelled(stream, n)
    if len(pairs) < n:
        raise ValueError(f"the dialogue stream of seed {seed} has fewer than {n} labelled replies")
    return pairs


def heldout(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (reply, label) pairs from ``heldout_dialogues(n, seed)``."""
    return _labelled(heldout_dialogues(n, seed), n)
