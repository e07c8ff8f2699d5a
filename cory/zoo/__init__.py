"""The embedded model zoo: ``cory:`` models built locally from synthetic corpora.

A ``cory:`` name (``cory:tiny-reviews``, ``cory:tiny-sentiment``, ``cory:tiny-arith``, ...) is built
deterministically from its recipe on first use, cached under
``cache_dir()/zoo/<name>-<recipe hash>``, and from then on is an ordinary HF folder::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from cory import zoo

    path = zoo.resolve("cory:tiny-reviews")  # builds once (about a minute on a CPU), then cached
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)

Each recipe names its corpus (``cory.corpora``: movie reviews, arithmetic word problems) and
its own tokenizer trained on that corpus; ``cory.zoo.evals`` holds each corpus's build-time
evaluation. Importing this package does not import torch; only building does.
"""

from cory.zoo.builder import build, resolve
from cory.zoo.gguf import ZooSourceError
from cory.zoo.registry import (
    ZOO_FORMAT_VERSION,
    UnknownModelError,
    cache_dir,
    is_zoo_name,
    list_models,
    recipe_hash,
)

__all__ = [
    "ZOO_FORMAT_VERSION",
    "UnknownModelError",
    "ZooSourceError",
    "build",
    "cache_dir",
    "is_zoo_name",
    "list_models",
    "recipe_hash",
    "resolve",
]
