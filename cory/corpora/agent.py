"""The agent corpus: transcripts of cory's decision-making environments played by imperfect agents.

The texts are played in the environments (`cory.envs.transcripts` plays them and describes them),
which sit above the corpora and the zoo. So this module holds what the zoo needs to name and hash
the corpus without playing it (its version, seeds and size), and hands drawing the texts to the
source that `cory.envs` provides on import (`provide`).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

# Bump when the texts change: it is part of every zoo recipe hash, so cached models rebuild.
CORPUS_VERSION = 1
PRETRAIN_SEED = 5050
PRETRAIN_SIZE = 10_000
HELDOUT_SEED = 7070

_source: Callable[[], ModuleType] | None = None


def provide(source: Callable[[], ModuleType]) -> None:
    """Registers the module that plays the transcripts (called by `cory.envs` on import)."""
    global _source
    _source = source


def source() -> ModuleType:
    """The module that plays the transcripts; RuntimeError before `cory.envs` is imported."""
    if _source is None:
        raise RuntimeError("the agent corpus is played in cory's environments: import cory.envs before drawing it")
    return _source()


def pretraining_texts(n: int, seed: int = PRETRAIN_SEED) -> list[str]:
    """The first ``n`` transcripts of the stream of ``seed``, prompt and answer as one text."""
    return source().pretraining_texts(n, seed)


def heldout_texts(n: int, seed: int = HELDOUT_SEED) -> list[str]:
    """``n`` transcripts that are not among the pretraining texts: the zoo's held-out loss."""
    return source().heldout_texts(n, seed)
