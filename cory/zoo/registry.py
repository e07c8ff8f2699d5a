"""The zoo's names, their recipes, and where their built folders live.

This module imports no torch, so listing the zoo or resolving a cached name is instant.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from dataclasses import dataclass

from cory.zoo.corpora import reviews

# Bump when the way a recipe turns into a folder changes (training code, file layout), so that
# every cached model is rebuilt; recipe fields cover everything else.
ZOO_FORMAT_VERSION = 1
PREFIX = "cory:"


class UnknownModelError(ValueError):
    """A ``cory:`` name that the zoo does not have."""

    def __init__(self, name: str):
        super().__init__(f"unknown model {name!r}; the zoo has: {', '.join(ZOO)}")
        self.name = name


@dataclass(frozen=True)
class CorpusSpec:
    """Which synthetic reviews a model learns from and is evaluated on."""

    n_train: int
    """Reviews drawn from ``reviews.generate(n_train, seed)``."""
    seed: int = reviews.PRETRAIN_SEED
    """Seed of the pretraining stream."""
    n_eval: int = 1000
    """Held-out reviews, ``reviews.heldout(n_eval, eval_seed)``, for the build's evaluation."""
    eval_seed: int = 1
    """Seed of the held-out evaluation stream."""
    version: int = reviews.CORPUS_VERSION
    """The grammar's version: a new grammar means new models."""


@dataclass(frozen=True)
class TokenizerSpec:
    """A byte-level BPE tokenizer trained on the first ``n_texts`` pretraining reviews.

    A causal LM and a classifier with the same spec get the same tokenizer, byte for byte."""

    vocab_size: int
    """Vocabulary size including ``<pad>`` and ``<eos>``."""
    n_texts: int
    """How many reviews of the pretraining stream the tokenizer is trained on."""


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
class ZooEntry:
    name: str
    description: str
    recipe: Recipe


# One tokenizer for the whole zoo, so every policy and reward model here reads the same ids. At
# 3000 tokens nearly every corpus word is one token (full coverage takes ~3700), so even the micro
# models write whole words; fewer merges split rarer words into pieces the small models misspell.
ZOO_TOKENIZER = TokenizerSpec(vocab_size=3000, n_texts=10_000)
TINY_MODEL = ModelSpec(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384)
MICRO_MODEL = ModelSpec(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=192)
CORPUS = CorpusSpec(n_train=20_000)
# The micro models see about as many reviews as this; fewer to encode keeps their build short.
MICRO_CORPUS = CorpusSpec(n_train=10_000, n_eval=400)

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
    ]
}


def is_zoo_name(name: str) -> bool:
    """Whether ``name`` is meant for the zoo (starts with ``cory:``), known or not."""
    return name.startswith(PREFIX)


def entry(name: str) -> ZooEntry:
    """The registered entry of ``name``; raises UnknownModelError otherwise."""
    try:
        return ZOO[name]
    except KeyError:
        raise UnknownModelError(name) from None


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
