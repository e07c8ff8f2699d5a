"""Synthetic corpora: the texts the zoo's models are pretrained on, and the prompt sets drawn from the
same generators but held out from pretraining (the tasks' review openings and word problems, the
teacher-student transcript format). The lowest layer: plain Python that imports nothing of cory's,
so the zoo (to build models), tasks, rewards and environments all draw from here. (The agent
corpus is played in cory's text environments: it lives there, `cory.envs.transcripts`.)

A zoo recipe names its corpus (``CorpusSpec.name``, a key of ``cory.zoo.registry.CORPORA``). Every
corpus module is plain Python (no torch) and provides:

- ``CORPUS_VERSION: int``: bumped whenever the texts change (it is part of every recipe hash);
- ``PRETRAIN_SEED: int`` and ``PRETRAIN_SIZE: int``: the pretraining stream and its largest draw;
- ``pretraining_texts(n, seed) -> list[str]``: the first ``n`` texts of the stream of ``seed``
  (a causal LM is trained on them, and the recipe's tokenizer on the first ones);
- ``heldout_texts(n, seed) -> list[str]``: texts that never occur in the pretraining draw
  (the build's held-out loss).

A corpus that a classifier learns from also provides ``LABELS`` and labelled draws
``generate(n, seed)`` / ``heldout(n, seed)`` of ``(text, label)`` pairs (see ``reviews``).

Adding a corpus is a module here with those names plus one line in ``cory.zoo.registry.CORPORA``;
a causal LM on it then builds with the held-out loss as its evaluation, and
``cory.zoo.evals.LM_EVALS`` can add a corpus-specific one (samples, task accuracy).
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """The lowercased words of ``text`` (letters, with an optional ``'s``-style suffix)."""
    return [w.lower() for w in _WORD.findall(text)]
