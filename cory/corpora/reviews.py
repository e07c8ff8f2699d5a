"""A probabilistic grammar of short movie reviews with sentiment labels.

Every review is 1-3 sentences (8-40 words). Each sentence carries a polarity: +1 (praise),
-1 (complaint) or 0 (a fact or a lukewarm remark). A contrast sentence ("the plot is dull, but
the cast is superb") takes the polarity of its last clause. The review's label follows the
sentences:

- no sentence with a polarity -> ``"neutral"``;
- otherwise the sign of the sum of polarities, and on a tie the last non-zero sentence wins.

Mixed reviews are drawn so that the majority never contradicts the last opinion ("The plot is
dull. Still, the cast is superb." is positive), so the label is also simply the polarity of the
last opinionated sentence.

So the label is a function of the text's structure, with no label noise by construction, and a
review can be pushed either way by what comes next, which is what RL fine-tuning of a review writer
needs.

Seed streams
------------
``generate(n, seed)`` draws reviews one after another from ``random.Random(seed)``, so
``generate(k, seed) == generate(n, seed)[:k]`` for ``k <= n``. The zoo recipes pretrain on
``generate(n, PRETRAIN_SEED)`` with ``n <= PRETRAIN_SIZE``. ``heldout(n, seed)`` draws from a
separate stream (``random.Random("reviews-heldout-<seed>")``) and drops every review whose exact text
occurs in ``generate(PRETRAIN_SIZE, PRETRAIN_SEED)``; ``prompts`` cuts its prompts from those
held-out reviews. Short reviews can still share a prefix with a pretraining review ("The plot
is"), which is expected of any prompt set drawn from the training distribution.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable

# Bump when the grammar changes: it is part of every zoo recipe hash, so cached models rebuild.
CORPUS_VERSION = 1
# The seed of the stream the zoo's models are pretrained on.
PRETRAIN_SEED = 20240601
# The most reviews any recipe may draw from the pretraining stream; held-out reviews exclude them all.
PRETRAIN_SIZE = 20_000
LABELS = ("negative", "neutral", "positive")
MIN_WORDS, MAX_WORDS = 8, 40

_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """The lowercased words of ``text`` (letters, with an optional ``'s``-style suffix)."""
    return [w.lower() for w in _WORD.findall(text)]


# ---------------------------------------------------------------------------------------------
# Word lists. Phrases are plain ASCII words separated by spaces (no hyphens), so that `words`
# splits them the same way everywhere.
# ---------------------------------------------------------------------------------------------

POSITIVE_ADJECTIVES = """
absorbing affecting assured authentic beautiful bold breathtaking brilliant captivating charming
charismatic clever compelling confident crisp dazzling delightful elegant electric enchanting
energetic engaging entertaining excellent exhilarating exquisite fantastic fearless fresh funny
generous gentle glorious gorgeous graceful gripping haunting heartfelt heartwarming hilarious
hypnotic immersive impressive inspired intelligent inventive irresistible joyful lovely luminous
lyrical magnificent majestic marvelous masterful memorable mesmerizing moving nuanced original
outstanding perceptive playful poignant polished powerful precise profound radiant ravishing
refreshing remarkable rewarding rich riveting rousing satisfying sharp sincere skillful smart
soulful sparkling spellbinding spirited splendid striking stunning stylish sublime subtle
sumptuous superb sweet tender terrific thoughtful thrilling tight touching transcendent triumphant
unforgettable uplifting virtuosic vivid warm winning wise witty wonderful
""".split()

NEGATIVE_ADJECTIVES = """
abysmal aimless amateurish annoying atrocious awful awkward banal bland bloated boring careless
chaotic cheap cheesy choppy clumsy confusing contrived corny crass crude cynical derivative
disappointing disjointed dismal drab dreadful dreary dull dumb embarrassing empty exhausting
feeble flat flimsy forced forgettable frustrating garish glib grating hackneyed hokey hollow
horrible humorless idiotic implausible incoherent inept insipid insufferable irritating joyless
lackluster lame lazy lethargic lifeless limp listless lousy maddening mawkish meandering mediocre
melodramatic messy miserable monotonous muddled murky noisy numbing obnoxious overlong overwrought
painful pathetic plodding pointless ponderous pretentious repetitive ridiculous saccharine shallow
shrill silly sloppy sluggish soulless sour stale sterile stiff stupid tacky tedious terrible thin
tiresome trite turgid unbearable unconvincing underwritten unfocused unfunny uninspired unpleasant
unwatchable vapid weak wooden woeful wretched
""".split()

NEUTRAL_ADJECTIVES = """
acceptable adequate average conventional familiar functional measured middling mild modest
moderate ordinary passable plain reasonable restrained routine serviceable simple standard steady
straightforward tolerable traditional typical unassuming unremarkable watchable workmanlike
""".split()

# Degree adverbs that carry no sentiment of their own.
INTENSIFIERS = """
absolutely altogether consistently decidedly deeply downright endlessly entirely especially
exceptionally extremely fairly genuinely hugely incredibly largely mostly oddly particularly
pretty quite rather really relentlessly remarkably simply somewhat strangely strikingly
surprisingly thoroughly totally truly undeniably unexpectedly unusually utterly very wildly
""".split()

# Aspects of a film, as noun phrases without an article.
SINGULAR_ASPECTS = [
    "plot", "story", "script", "screenplay", "acting", "cast", "lead", "direction", "pacing",
    "dialogue", "ending", "opening", "finale", "cinematography", "camera work", "score",
    "soundtrack", "music", "editing", "lighting", "production design", "set design",
    "sound design", "humor", "tone", "atmosphere", "villain", "hero", "heroine", "chemistry",
    "premise", "twist", "climax", "third act", "first act", "middle section", "romance",
    "world building", "mood", "message", "writing", "storytelling", "narration", "makeup",
    "choreography", "theme song", "supporting cast", "ensemble", "subplot", "backstory",
    "voice acting", "animation", "color palette", "framing", "production", "central mystery",
    "final scene", "opening scene", "love story", "car chase", "courtroom scene", "pace",
]
PLURAL_ASPECTS = [
    "characters", "performances", "visuals", "effects", "special effects", "costumes", "jokes",
    "action sequences", "fight scenes", "set pieces", "songs", "themes", "child actors",
    "flashbacks", "landscapes", "battle scenes", "dance numbers", "plot twists", "side characters",
    "musical numbers", "stunts", "sets", "close ups", "long takes",
]

GENRES = [
    "drama", "comedy", "thriller", "horror film", "western", "musical", "romance", "documentary",
    "mystery", "biopic", "satire", "melodrama", "war film", "heist film", "noir",
    "science fiction film", "fantasy", "adventure", "crime drama", "family film",
    "animated feature", "sports drama", "road movie", "period piece", "coming of age story",
    "courtroom drama", "disaster movie", "spy thriller", "romantic comedy",
    "psychological thriller", "political thriller", "slasher", "ghost story", "fairy tale",
    "space opera", "action movie", "martial arts film", "character study", "legal drama",
    "police procedural", "monster movie", "zombie film", "parody", "epic", "chamber piece",
    "boxing movie", "buddy comedy", "historical drama", "survival story", "revenge thriller",
]

TITLE_ADJECTIVES = """
Silent Crimson Hollow Golden Broken Distant Frozen Hidden Last Lost Burning Quiet Wild Iron
Silver Velvet Paper Glass Electric Bitter Northern Southern Secret Empty Falling Endless Restless
Savage Sleeping Wandering Forgotten Scarlet Midnight Winter Summer Autumn Stolen Shattered
Painted Fading Rising Drifting Blue Black White Green Little Long Final Second Crooked Gentle
Lonely Hungry Borrowed
""".split()

TITLE_NOUNS = """
Harbor Orchard Garden River Mountain Letter Promise Road Station Lighthouse Tide Mirror Storm
Kingdom Compass Lantern Bridge Window Valley Island Forest Circus Ballroom Carnival Frontier
Horizon Signal Shadow Witness Stranger Daughter Brother Sister Widow Captain Hunter Thief Prophet
Machine Engine Frequency Equation Archive Chapter Season Empire Harvest Orbit Canyon Desert
Meadow Cathedral Motel Diner Hotel Carousel Ferry Train Reckoning Masquerade Dynasty Voyage
Echo Ember Requiem Lullaby Monsoon Avalanche
""".split()

FIRST_NAMES = """
Ada Alma Amara Anton Arjun Astrid Beatrix Bruno Carmen Cecil Clara Dario Delia Dmitri Edith Elias
Elena Emeka Esther Felix Fiona Gideon Greta Hana Hector Ines Ingrid Isaac Ivy Jonas Joaquin Julia
Kenji Kofi Lars Leila Lena Luca Lydia Magnus Malik Marta Mateo Mei Milo Mira Nadia Nico Nora Olga
Omar Otto Paloma Priya Quentin Rafael Rosa Ruth Samir Selma Silas Sofia Tariq Thea Tobias Ursula
Vera Viktor Wanda Yara Yusuf Zelda Zora
""".split()

LAST_NAMES = """
Abara Alvarez Bauer Bergstrom Castellano Chen Dalton Delacroix Duarte Eriksen Ferraro Fontaine
Garcia Gallagher Haddad Hartmann Holloway Ibarra Ivanova Jensen Kaplan Kowalski Kuroda Lindqvist
Lopez Marchetti Mbeki Moreau Nakamura Novak Okafor Olsen Ortega Petrov Quinn Ramirez Rossi
Sandoval Schneider Silva Sorensen Tanaka Thornton Varga Vasquez Voss Whitaker Yilmaz Zamora
Zhang Brennan Calloway Mendez Park
""".split()

PLACES = [
    "Lisbon", "Paris", "Tokyo", "Chicago", "Berlin", "Cairo", "Dublin", "Naples", "Oslo", "Havana",
    "Seoul", "Mumbai", "Lagos", "Marseille", "Prague", "Vienna", "Montreal", "Boston", "Detroit",
    "Texas", "Alaska", "Sicily", "Iceland", "Patagonia", "Mongolia", "Istanbul", "Nairobi",
    "Glasgow", "Manila", "Lima", "a small fishing town", "a crumbling mansion", "a remote island",
    "a space station", "suburban Ohio", "a boarding school", "a busy hospital", "a submarine",
    "a desert outpost", "a mining town", "the Scottish highlands", "a Paris suburb",
    "a floating city", "a lighthouse", "a roadside motel", "an abandoned factory",
    "a mountain village", "a penthouse apartment", "a haunted theater", "a jazz club",
    "a prison", "a cruise ship", "a vineyard", "a frozen research base",
]

ROLES = [
    "a detective", "a widowed farmer", "a retired boxer", "a young nurse", "an aging rock star",
    "a con artist", "a reluctant hero", "a struggling painter", "a small town sheriff",
    "a grieving mother", "a disgraced lawyer", "an ambitious chef", "a lonely astronaut",
    "a teenage runaway", "a jazz pianist", "a school teacher", "a mob accountant",
    "a ship captain", "a forensic scientist", "a village priest", "a war photographer",
    "a stubborn grandmother", "a failed magician", "a night watchman", "a chess prodigy",
    "a retired spy", "a young widow", "an exiled prince", "a bank robber", "a stage actress",
    "a factory worker", "a junior reporter", "a country doctor", "a pop singer",
    "a professional thief", "a mountain guide", "a shy librarian", "a taxi driver",
    "a brilliant surgeon", "a fading movie star",
]

PLOT_ACTIONS = [
    "returns home after many years", "searches for a missing sister", "plans one last job",
    "falls in love with a stranger", "tries to save a failing restaurant",
    "uncovers a family secret", "must survive a long winter", "travels across the country",
    "joins a traveling circus", "trains for a big fight",
    "investigates a series of strange disappearances", "inherits a haunted house",
    "runs for mayor", "hides a fugitive", "builds a boat", "loses everything in a fire",
    "wins the lottery", "escapes from prison", "teaches music to orphans",
    "hunts for buried treasure", "fights a corrupt police chief", "writes a novel",
    "adopts a stray dog", "starts a rock band", "crosses the desert on foot",
    "protects a key witness", "wakes up with no memory", "opens a bakery",
    "confronts an old enemy", "rescues a kidnapped child", "climbs a dangerous mountain",
    "tracks down a serial killer", "saves a dying village",
]

SOURCES = [
    "novel", "true story", "stage play", "comic book", "short story", "video game", "memoir",
    "radio drama", "fairy tale", "newspaper article", "famous poem", "cult novel", "legend",
]

OCCASIONS = [
    "last weekend", "on a rainy Sunday", "at a festival", "with my family", "on a long flight",
    "at a midnight screening", "with friends", "in an empty theater", "on opening night",
    "at home", "with my kids", "on a first date", "at a drive in", "twice", "on a quiet evening",
]

RUNTIMES = [
    "ninety minutes", "about two hours", "nearly three hours", "just under two hours",
    "a brisk eighty minutes", "two and a half hours", "a hundred minutes",
]

# Past-tense verbs for "I ___ the plot".
POSITIVE_VERBS = "loved adored enjoyed admired appreciated relished savored treasured cherished".split()
NEGATIVE_VERBS = "hated loathed disliked despised detested resented dreaded".split()
# Past-tense verb phrases for "the score ___".
POSITIVE_ASPECT_VERBS = [
    "soared", "sparkled", "worked beautifully", "landed", "delivered", "shone", "crackled",
    "glowed", "dazzled", "impressed me", "charmed me", "gripped me", "resonated", "flowed",
    "clicked", "sang", "thrilled me", "delighted me", "excelled", "stood out", "hit every note",
    "won me over", "took my breath away", "kept me hooked",
]
NEGATIVE_ASPECT_VERBS = [
    "dragged", "faltered", "fizzled", "stumbled", "sagged", "collapsed", "dragged on",
    "fell flat", "misfired", "floundered", "wobbled", "crumbled", "grated on me", "bored me",
    "annoyed me", "disappointed", "underwhelmed", "plodded along", "sputtered", "stalled",
    "went nowhere", "put me to sleep", "missed the mark", "lost me",
]
POSITIVE_VERDICTS = [
    "highly recommended.", "a must see.", "worth every minute.", "go see it.",
    "I would watch it again.", "one of the best films of the year.", "do not miss it.",
    "an easy recommendation.", "bring tissues.", "I cannot wait to see it again.",
    "a real treat.", "five stars.", "a triumph.", "see it on the biggest screen you can.",
]
NEGATIVE_VERDICTS = [
    "skip it.", "a waste of time.", "avoid this one.", "not worth your money.",
    "I want those two hours back.", "one of the worst films of the year.", "save your money.",
    "I nearly walked out.", "wait for something better.", "one star.", "a total mess.",
    "a real chore.", "what a letdown.", "never again.",
]

# Openers that join a sentence to the one before it.
CONTRAST_OPENERS = ["still", "however", "even so", "then again", "on the other hand", "that said", "yet"]
ADDITIVE_OPENERS = ["also", "plus", "what is more", "on top of that", "besides", "and yes"]
POSITIVE_OPENERS = ["thankfully", "luckily", "best of all", "happily", "fortunately"]
NEGATIVE_OPENERS = ["sadly", "unfortunately", "worst of all", "alas", "regrettably"]
ANY_OPENERS = ["honestly", "frankly", "in the end", "in short", "all in all", "to be honest"]

# ---------------------------------------------------------------------------------------------
# Sentence templates. `{slot}` is filled by the function of that name in `_SLOTS`: `{adj}` has
# the sentence's polarity, `{adj_opp}` the opposite one, `{adj_pos}`/`{adj_neg}` a fixed one and
# `{nadj}` none. A template starts lowercase (except "I") because an opener may precede it; the
# first letter is capitalised at the end.
# ---------------------------------------------------------------------------------------------

OPINION_TEMPLATES = [
    "the {aspect} {be} {adv}{adj}.",
    "the {aspect} {be} {adv}{adj}.",
    "{title} is {a_adj} {genre}.",
    "{title} is {a_adv_adj} {genre}.",
    "{name} gives {a_adj} performance.",
    "{name} gives {a_adj} performance as {role}.",
    "{name} is {adv}{adj} as {role}.",
    "I {verb} the {aspect}.",
    "I {verb} every minute of it.",
    "the {aspect} {aspect_verb}.",
    "{director}'s direction is {adv}{adj}.",
    "what {a_adj} {genre}!",
    "overall, {a_adj} {genre}.",
    "the {aspect} {be} {adj} and the {aspect2} {be} {adj2}.",
    "{adj} {aspect}, {adj2} {aspect2}.",
    "it is {adv}{adj} from start to finish.",
    "the film is {adv}{adj}.",
    "this {genre} is {adv}{adj}.",
    "the whole thing feels {adv}{adj}.",
    "{verdict}",
]
# Praise turned into a complaint by negation; only used with negative polarity.
NEGATED_TEMPLATES = [
    "the {aspect} {be} not {adj_pos}.",
    "it is not {a_adj_pos} {genre}.",
    "the {aspect} {be} never {adj_pos}.",
    "{name} is not {adj_pos} as {role}.",
]
# The polarity of the whole sentence is that of its last clause.
CONTRAST_TEMPLATES = [
    "the {aspect} {be} {adj_opp}, but the {aspect2} {be} {adv}{adj}.",
    "although the {aspect} {be} {adj_opp}, the {aspect2} {be} {adj}.",
    "despite {a_adj_opp} {aspect_one}, the film is {adv}{adj}.",
    "the {aspect} {aspect_verb_opp}, but the {aspect2} {aspect_verb}.",
    "{name} is {adj_opp}, but {name2} is {adj}.",
]
NEUTRAL_OPINION_TEMPLATES = [
    "the {aspect} {be} {nadj}.",
    "it is {a_nadj} {genre}.",
    "{name} is {nadj} as {role}.",
    "it is neither {adj_pos} nor {adj_neg}.",
    "nothing special, nothing {adj_neg}.",
    "I have mixed feelings about it.",
    "it is about what you would expect from {a_genre}.",
    "fans of the {genre_one} will know what to expect.",
    "the {aspect} {be} {nadj} and the {aspect2} {be} {nadj}.",
    "some will like it and some will not.",
    "it is {adv}{nadj}.",
]
FACT_TEMPLATES = [
    "{title} is {a_genre} set in {place}.",
    "{name} plays {role}.",
    "{name} plays {role} who {plot}.",
    "the story follows {role} who {plot}.",
    "it runs {runtime}.",
    "the film was directed by {name}.",
    "it is based on a {source}.",
    "I saw it {occasion}.",
    "{title} is set in {place}.",
    "{name} stars as {role} in {title}.",
    "it is {director}'s first {genre_one}.",
    "in {title}, {role} {plot}.",
]


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _with_article(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


def _adjectives(polarity: int) -> list[str]:
    return {1: POSITIVE_ADJECTIVES, -1: NEGATIVE_ADJECTIVES, 0: NEUTRAL_ADJECTIVES}[polarity]


class _Sentence:
    """Fills one template; remembers the last aspect's number and the tense for `{be}`."""

    def __init__(self, rng: random.Random, polarity: int, past: bool):
        self.rng, self.pos, self.past, self.plural = rng, polarity, past, False

    def adj_of(self, polarity: int) -> str:
        return self.rng.choice(_adjectives(polarity))

    def aspect(self, plural_ok: bool = True) -> str:
        self.plural = plural_ok and self.rng.random() < 0.3
        return self.rng.choice(PLURAL_ASPECTS if self.plural else SINGULAR_ASPECTS)

    def adverb(self) -> str:
        return self.rng.choice(INTENSIFIERS) + " " if self.rng.random() < 0.35 else ""

    def name(self) -> str:
        return f"{self.rng.choice(FIRST_NAMES)} {self.rng.choice(LAST_NAMES)}"

    def title(self) -> str:
        r = self.rng
        form = r.randrange(4)
        if form == 0:
            return f"The {r.choice(TITLE_ADJECTIVES)} {r.choice(TITLE_NOUNS)}"
        if form == 1:
            return f"{r.choice(TITLE_ADJECTIVES)} {r.choice(TITLE_NOUNS)}"
        if form == 2:
            return f"The {r.choice(TITLE_NOUNS)} of {r.choice(TITLE_NOUNS)}"
        return f"The {r.choice(TITLE_NOUNS)}"

    def be(self) -> str:
        return [["is", "are"], ["was", "were"]][self.past][self.plural]

    def fill(self, template: str) -> str:
        # Odd-numbered parts are slot names; slots are filled left to right.
        parts = _split_template(template)
        return "".join(_SLOTS[part](self) if i % 2 else part for i, part in enumerate(parts))


@functools.lru_cache(maxsize=None)
def _split_template(template: str) -> list[str]:
    return re.split(r"\{(\w+)\}", template)


def _aspect_verb(s: _Sentence, polarity: int) -> str:
    return s.rng.choice(POSITIVE_ASPECT_VERBS if polarity > 0 else NEGATIVE_ASPECT_VERBS)


_SLOTS: dict[str, Callable[[_Sentence], str]] = {
    "aspect": lambda s: s.aspect(),
    "aspect2": lambda s: s.aspect(),
    "aspect_one": lambda s: s.aspect(plural_ok=False),
    "be": lambda s: s.be(),
    "adv": lambda s: s.adverb(),
    "adj": lambda s: s.adj_of(s.pos),
    "adj2": lambda s: s.adj_of(s.pos),
    "adj_opp": lambda s: s.adj_of(-s.pos),
    "adj_pos": lambda s: s.adj_of(1),
    "adj_neg": lambda s: s.adj_of(-1),
    "nadj": lambda s: s.adj_of(0),
    "a_adj": lambda s: _with_article(s.adj_of(s.pos)),
    "a_adv_adj": lambda s: _with_article(f"{s.rng.choice(INTENSIFIERS)} {s.adj_of(s.pos)}"),
    "a_adj_opp": lambda s: _with_article(s.adj_of(-s.pos)),
    "a_adj_pos": lambda s: _with_article(s.adj_of(1)),
    "a_nadj": lambda s: _with_article(s.adj_of(0)),
    "verb": lambda s: s.rng.choice(POSITIVE_VERBS if s.pos > 0 else NEGATIVE_VERBS),
    "aspect_verb": lambda s: _aspect_verb(s, s.pos),
    "aspect_verb_opp": lambda s: _aspect_verb(s, -s.pos),
    "verdict": lambda s: s.rng.choice(POSITIVE_VERDICTS if s.pos > 0 else NEGATIVE_VERDICTS),
    "genre": lambda s: s.rng.choice(GENRES),
    "genre_one": lambda s: s.rng.choice(GENRES),
    "a_genre": lambda s: _with_article(s.rng.choice(GENRES)),
    "title": lambda s: s.title(),
    "name": lambda s: s.name(),
    "name2": lambda s: s.name(),
    "director": lambda s: s.name(),
    "role": lambda s: s.rng.choice(ROLES),
    "place": lambda s: s.rng.choice(PLACES),
    "plot": lambda s: s.rng.choice(PLOT_ACTIONS),
    "source": lambda s: s.rng.choice(SOURCES),
    "occasion": lambda s: s.rng.choice(OCCASIONS),
    "runtime": lambda s: s.rng.choice(RUNTIMES),
}


def _sentence(rng: random.Random, polarity: int, past: bool, fact: bool = False) -> str:
    """One sentence (lowercase start) of the given polarity; a fact when ``fact`` is set."""
    if fact:
        templates = FACT_TEMPLATES
    elif polarity == 0:
        templates = NEUTRAL_OPINION_TEMPLATES
    else:
        roll = rng.random()
        if roll < 0.15:
            templates = CONTRAST_TEMPLATES
        elif roll < 0.25 and polarity < 0:
            templates = NEGATED_TEMPLATES
        else:
            templates = OPINION_TEMPLATES
    return _Sentence(rng, polarity, past).fill(rng.choice(templates))


# Templates that already open with a joining word take no opener ("Also, although ...").
_SELF_OPENING = ("overall", "what ", "although", "despite", "in ")


def _opener(rng: random.Random, previous: int, polarity: int) -> str:
    """A joining word for a sentence of ``polarity`` after one of ``previous`` ('' for none)."""
    if rng.random() < 0.5:
        return ""
    if previous and polarity and previous != polarity:
        choices = CONTRAST_OPENERS
    elif previous and polarity == previous:
        choices = ADDITIVE_OPENERS
    elif polarity:
        choices = (POSITIVE_OPENERS if polarity > 0 else NEGATIVE_OPENERS) + ANY_OPENERS
    else:
        return ""
    return rng.choice(choices) + ", "


def _plan(rng: random.Random) -> list[tuple[int, bool]]:
    """The (polarity, is_fact) of each sentence of one review."""
    mood = rng.choices([1, -1, 0], weights=[0.4, 0.4, 0.2])[0]
    plan = [(0, True)] if rng.random() < 0.35 else []
    if mood == 0:
        plan += [(0, rng.random() < 0.4) for _ in range(rng.choice([1, 1, 2]))]
        return plan
    n_opinions = rng.choice([1, 1, 2, 2, 3]) - len(plan)
    polarities = [mood] * max(n_opinions, 1)
    if len(polarities) >= 2 and rng.random() < 0.35:
        # A mixed review: one sentence goes the other way. Of three, never the last, so that the
        # majority and the last opinion always agree and the label is never a judgement call.
        polarities[rng.randrange(min(len(polarities), 2))] = -mood
    return plan + [(p, False) for p in polarities]


def label_of(polarities: list[int]) -> str:
    """The review label from its sentence polarities: majority, ties to the last non-zero one."""
    nonzero = [p for p in polarities if p]
    if not nonzero:
        return "neutral"
    total = sum(nonzero)
    sign = (total > 0) - (total < 0) or nonzero[-1]
    return "positive" if sign > 0 else "negative"


def _review(rng: random.Random) -> tuple[str, str]:
    """One review and its label, resampled until it has MIN_WORDS..MAX_WORDS words."""
    while True:
        past = rng.random() < 0.4
        sentences, polarities, previous = [], [], 0
        for polarity, fact in _plan(rng):
            body = _sentence(rng, polarity, past, fact)
            if not body.startswith(_SELF_OPENING):
                body = _opener(rng, previous, polarity) + body
            sentences.append(body[0].upper() + body[1:])
            polarities.append(polarity)
            previous = polarity or previous
        text = " ".join(sentences)
        if MIN_WORDS <= len(text.split()) <= MAX_WORDS:
            return text, label_of(polarities)


def generate(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (text, label) reviews from the stream of ``seed``; a prefix of any longer draw."""
    if seed == PRETRAIN_SEED and n <= PRETRAIN_SIZE:
        return list(_pretrain_stream()[:n])  # the same reviews, drawn once per process
    rng = random.Random(seed)
    return [_review(rng) for _ in range(n)]


@functools.lru_cache(maxsize=1)
def _pretrain_stream() -> tuple[tuple[str, str], ...]:
    rng = random.Random(PRETRAIN_SEED)
    return tuple(_review(rng) for _ in range(PRETRAIN_SIZE))


@functools.lru_cache(maxsize=1)
def _pretrain_texts() -> frozenset[str]:
    return frozenset(text for text, _ in _pretrain_stream())


def heldout(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (text, label) reviews from a stream separate from ``generate``'s, none of whose
    texts occurs in the pretraining draw ``generate(PRETRAIN_SIZE, PRETRAIN_SEED)``."""
    rng = random.Random(f"reviews-heldout-{seed}")
    seen = _pretrain_texts()
    out: list[tuple[str, str]] = []
    while len(out) < n:
        text, label = _review(rng)
        if text not in seen:
            out.append((text, label))
    return out


def pretraining_texts(n: int, seed: int) -> list[str]:
    """The texts of ``generate(n, seed)`` (the corpus interface of ``cory.corpora``)."""
    return [text for text, _ in generate(n, seed)]


def heldout_texts(n: int, seed: int) -> list[str]:
    """The texts of ``heldout(n, seed)`` (the corpus interface of ``cory.corpora``)."""
    return [text for text, _ in heldout(n, seed)]


def prompts(n: int, seed: int, min_words: int = 2, max_words: int = 8) -> list[str]:
    """``n`` prompts: the first ``min_words..max_words`` words of ``heldout(n, seed)``'s reviews,
    always leaving at least one word of the review to write."""
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words} and {max_words}")
    rng = random.Random(f"reviews-prompts-{seed}")
    out = []
    for text, _ in heldout(n, seed):
        tokens = text.split()
        k = rng.randint(min_words, max(min_words, min(max_words, len(tokens) - 1)))
        out.append(" ".join(tokens[:k]))
    return out


@functools.lru_cache(maxsize=1)
def _vocabulary() -> frozenset[str]:
    phrase_lists = [
        POSITIVE_ADJECTIVES, NEGATIVE_ADJECTIVES, NEUTRAL_ADJECTIVES, INTENSIFIERS,
        SINGULAR_ASPECTS, PLURAL_ASPECTS, GENRES, TITLE_ADJECTIVES, TITLE_NOUNS, FIRST_NAMES,
        LAST_NAMES, PLACES, ROLES, PLOT_ACTIONS, SOURCES, OCCASIONS, RUNTIMES, POSITIVE_VERBS,
        NEGATIVE_VERBS, POSITIVE_ASPECT_VERBS, NEGATIVE_ASPECT_VERBS, POSITIVE_VERDICTS,
        NEGATIVE_VERDICTS, CONTRAST_OPENERS, ADDITIVE_OPENERS, POSITIVE_OPENERS,
        NEGATIVE_OPENERS, ANY_OPENERS, OPINION_TEMPLATES, NEGATED_TEMPLATES,
        CONTRAST_TEMPLATES, NEUTRAL_OPINION_TEMPLATES, FACT_TEMPLATES,
        # Words the slot functions write themselves: articles, `{be}`, title glue.
        ["a an is are was were the of"],
    ]
    found: set[str] = set()
    for phrases in phrase_lists:
        for phrase in phrases:
            found.update(words(re.sub(r"\{\w+\}", " ", phrase)))
    # A possessive name ("Rossi's") is one word to `words`; list those forms too.
    found.update(f"{last.lower()}'s" for last in LAST_NAMES)
    return frozenset(found)


def vocabulary() -> set[str]:
    """Every lowercased word (in the sense of `words`) the grammar can produce."""
    return set(_vocabulary())
