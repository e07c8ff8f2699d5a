"""The embedded model zoo: ``cory:`` models built locally from synthetic corpora.

A ``cory:`` name (``cory:tiny-reviews``, ``cory:tiny-sentiment``, ...) is built deterministically
from its recipe on first use, cached under ``cache_dir()/zoo/<name>-<recipe hash>``, and from then
on is an ordinary HF folder::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from cory import zoo

    path = zoo.resolve("cory:tiny-reviews")  # builds once (about a minute on a CPU), then cached
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)

Importing this package does not import torch; only building does.
"""

from cory.zoo.builder import build, resolve
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
    "build",
    "cache_dir",
    "is_zoo_name",
    "list_models",
    "recipe_hash",
    "resolve",
]
